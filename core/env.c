/* env.c: the table of DISTATTN_* environment variables (core/env.h) and their strict parser. The
 * model is DISTATTN_MEM_BUDGET's parse: a value is of its type and range or it is refused, naming
 * the variable. Variables of the test harness (DISTATTN_TEST_SEED, DISTATTN_TEST_ONLY, ...), of
 * the scripts and of the Python package are not read here: docs/reliability.md lists them. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"
#include "env.h"

#define NOLIMIT 0, 0

/* name, type, min, max, choices, nocase, test_only, reader, meaning, garbage */
const da_env_var_t da_env_vars[] = {
    {"DISTATTN_NTHREADS", DA_ENV_INT, 0, DA_MAX_NTHREADS, NULL, 0, 0, "library",
     "CPU kernel threads of a context whose config says 0 (0 = the cores this process may run on)", "1.5"},
    {"DISTATTN_TIMEOUT", DA_ENV_SECONDS, DA_TIMEOUT_MIN_S, 1e6, NULL, 0, 0, "library",
     "seconds a rank waits for a peer when the config says 0 (default 300); fractions allowed", "0.5"},
    {"DISTATTN_MEM_BUDGET", DA_ENV_SIZE_OFF, NOLIMIT, NULL, 0, 0, "library",
     "bytes per rank a plan may hold when its config says 0 (a size: 512M, 8G; off or -1 = no check)", "lots"},
    {"DISTATTN_TRANSPORT", DA_ENV_WORD, NOLIMIT, "mpi|self|cuda-ipc|nccl|host-ipc|cuda-mpi|host-mpi", 0, 0, "library",
     "the data transport of plans whose config names none (default mpi; mpi in a CUDA context is cuda-mpi)",
     "carrier-pigeon"},
    {"DISTATTN_CPU_ISA", DA_ENV_WORD, NOLIMIT, "amx|avx512bf16|avx512|avx2|avx2bf16emu|generic|auto", 0, 0, "library",
     "the CPU kernel variant (default auto: the best this CPU runs)", "avx9000"},
    {"DISTATTN_HUGEPAGES", DA_ENV_BOOL, NOLIMIT, NULL, 0, 0, "library",
     "0: blocks of 4 MiB and more stay on 4 KiB pages (default 1: advised onto transparent huge pages)", "on"},
    {"DISTATTN_DEBUG", DA_ENV_WORD, NOLIMIT, "VERSION|WARN|INFO|TRACE", 1, 0, "library",
     "log level (default: nothing)", "LOUD"},
    {"DISTATTN_DEBUG_SUBSYS", DA_ENV_WORDS, NOLIMIT, "INIT|KERNEL|COMM|PLAN|ENV|IO|ALLOC|ALL", 1, 0, "library",
     "subsystems logged, comma-separated, ^ to exclude (default ALL)", "INIT,BOGUS"},
    {"DISTATTN_DEBUG_FILE", DA_ENV_TEXT, NOLIMIT, NULL, 0, 0, "library",
     "log file per process instead of stderr (%h host, %p pid)", "\xff\xfe"},
    {"DISTATTN_DECODE_BLOCKING", DA_ENV_BOOL, NOLIMIT, NULL, 0, 1, "library",
     "measurement aid: the tree decode's reduction blocks in MPI (no deadline)", "yes"},
    {"DISTATTN_WAIT_BLOCKING", DA_ENV_BOOL, NOLIMIT, NULL, 0, 1, "library",
     "measurement aid: transfers wait in blocking MPI calls (no deadline)", "2"},
    {"DISTATTN_TEST_LINK_GBPS", DA_ENV_NUMBER, 0, 1e6, NULL, 0, 1, "library",
     "test hook: slow every transfer of the mpi transport to this many GB/s (0 = off)", "fast"},
    {"DISTATTN_TEST_LINK_US", DA_ENV_NUMBER, 0, 1e9, NULL, 0, 1, "library",
     "test hook: add this many microseconds of latency to every transfer (0 = off)", "-3"},
    {"DISTATTN_TEST_IPC_SKIP", DA_ENV_WORD, NOLIMIT, "ready|consumed", 0, 1, "library",
     "test hook: the IPC transports leave out one event wait (wrong results on purpose)", "both"},
    {"DISTATTN_TEST_STAGE_SKIP", DA_ENV_WORD, NOLIMIT, "d2h|h2d", 0, 1, "library",
     "test hook: the staged mpi transports leave out one copy wait (wrong results on purpose)", "both"},
    {"DISTATTN_TEST_RING_SKIP", DA_ENV_WORD, NOLIMIT, "sync|dkv-wait", 0, 1, "library",
     "test hook: the device-mode ring leaves out one ordering step (wrong results on purpose)", "both"},
    {"DISTATTN_JSON_KEY", DA_ENV_TEXT, NOLIMIT, NULL, 0, 0, "program",
     "the caller's name for a configuration, recorded as \"key\" in every --json record", "\xc3\x28"},
    {"DISTATTN_HWLOC_XML", DA_ENV_FILE, NOLIMIT, NULL, 0, 0, "program",
     "an hwloc XML topology to place ranks on instead of this machine's", "/nonexistent/topology.xml"},
    {"DISTATTN_TEST_NONFINITE", DA_ENV_POISON, NOLIMIT, NULL, 0, 1, "program",
     "test hook: TENSOR:POS[:nan|inf|-inf],... poisons generated inputs and the reference", "q:abc"},
    {"DISTATTN_TEST_IO_FAIL", DA_ENV_INT, 0, 1 << 30, NULL, 0, 1, "program",
     "test hook: this rank reports a failed --output write after writing", "one"},
    {"DISTATTN_TEST_FAULT", DA_ENV_TEXT, NOLIMIT, NULL, 0, 1, "program",
     "test hook: RANK:POINT[:stop|kill][:DELAY_S] stops or kills a rank at a named point (launcher/fault.h)", "\xff"},
    {"DISTATTN_TEST_FAIL_ALLOC", DA_ENV_TEXT, NOLIMIT, NULL, 0, 1, "program",
     "test hook: RANK:row_stats makes that allocation fail on that rank", "\xff"},
    {"DISTATTN_TEST_PLANT", DA_ENV_TEXT, NOLIMIT, NULL, 0, 1, "program",
     "test hook: TENSOR:SIZE plants an error in a computed gradient before verification", "\xff"},
    {"DISTATTN_TEST_OUTPUT_PAUSE", DA_ENV_TEXT, NOLIMIT, NULL, 0, 1, "program",
     "test hook: write|commit:SECONDS pauses the output writer at that point (signal tests)", "\xff"},
    {"DISTATTN_TEST_AGREE_SWEEP", DA_ENV_BOOL, NOLIMIT, NULL, 0, 1, "program",
     "test hook: 1 runs the option-agreement sweep over the command's option table instead of the command", "yes"},
    {"DISTATTN_BLAS_REEXEC", DA_ENV_INTERNAL, NOLIMIT, NULL, 0, 0, "program",
     "internal: set by `distattn kernel` for the copy of itself it re-executes with OPENBLAS_CORETYPE", NULL},
    {"DISTATTN_SIM_SHARED_BYTES", DA_ENV_SIZE, 1, 1e15, NULL, 0, 0, "sim",
     "SimGrid builds (sim/): allocations at least this large share one arena (default 256K)", "0"},
    {NULL, DA_ENV_INTERNAL, NOLIMIT, NULL, 0, 0, NULL, NULL, NULL},
};

const da_env_var_t *da_env_find(const char *name) {
  for (const da_env_var_t *v = da_env_vars; name && v->name; v++)
    if (!strcmp(v->name, name)) return v;
  return NULL;
}

static da_status_t refuse(const da_env_var_t *v, const char *value, const char *expected) {
  char shown[64]; /* the value as given, with bytes that are not printable ASCII escaped */
  size_t n = 0;
  for (const unsigned char *p = (const unsigned char *)value; *p && n + 5 < sizeof shown; p++)
    n += (size_t)snprintf(shown + n, sizeof shown - n, *p >= 0x20 && *p < 0x7f ? "%c" : "\\x%02x", *p);
  shown[n] = '\0';
  return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s=%s: %s", v->name, shown, expected);
}

/* A whole decimal integer: optional '-', digits, nothing else (no 0x, no spaces, no fraction). */
static int parse_int(const char *s, int64_t *out) {
  const char *p = s + (*s == '-');
  if (!*p) return -1;
  for (const char *q = p; *q; q++)
    if (*q < '0' || *q > '9') return -1;
  errno = 0;
  long long x = strtoll(s, NULL, 10);
  if (errno) return -1;
  *out = x;
  return 0;
}

static int parse_real(const char *s, double *out) {
  char *end = NULL;
  errno = 0;
  double x = strtod(s, &end);
  if (end == s || *end || errno == ERANGE || !isfinite(x)) return -1;
  *out = x;
  return 0;
}

/* Is word one of the '|'-separated choices? */
static int is_choice(const char *choices, const char *word, size_t len, int nocase) {
  for (const char *c = choices; *c;) {
    size_t n = strcspn(c, "|");
    if (n == len && (nocase ? !strncasecmp(c, word, n) : !strncmp(c, word, n))) return 1;
    c += n + (c[n] == '|');
  }
  return 0;
}

/* TENSOR:POS[:nan|inf|-inf][,...], at most DA_ENV_POISON_MAX items, into items (may be NULL: check
 * only). The one parser of the form: da_env_check_value and da_env_poison both call it. */
static int poison_parse(const char *s, da_env_poison_t *items, int *count) {
  static const char *const tensors[] = {"q", "k", "v", "dout"};
  int n_items = 0;
  for (const char *p = s;; n_items++) {
    if (n_items >= DA_ENV_POISON_MAX) return -1;
    size_t n = strcspn(p, ","), t = strcspn(p, ":");
    if (t >= n || !is_choice("q|k|v|dout", p, t, 0)) return -1;
    const char *pos = p + t + 1;
    size_t pn = strcspn(pos, ":,");
    char num[32];
    if (pn == 0 || pn >= sizeof num) return -1;
    memcpy(num, pos, pn), num[pn] = '\0';
    int64_t x;
    if (da_parse_size(num, &x) || x < 0) return -1;
    float value = NAN;
    if (pos[pn] == ':') {
      const char *w = pos + pn + 1;
      const size_t wn = n - t - 2 - pn;
      if (!is_choice("nan|inf|-inf", w, wn, 0)) return -1;
      value = wn == 3 && !strncmp(w, "inf", 3) ? INFINITY : wn == 4 ? -INFINITY : NAN;
    }
    if (items) {
      for (int k = 0; k < 4; k++)
        if (strlen(tensors[k]) == t && !strncmp(tensors[k], p, t)) items[n_items].tensor = k;
      items[n_items].pos = x, items[n_items].value = value;
    }
    if (!p[n]) break;
    p += n + 1;
  }
  if (count) *count = n_items + 1;
  return 0;
}

da_status_t da_env_check_value(const da_env_var_t *v, const char *s) {
  char want[200];
  switch (v->type) {
    case DA_ENV_INT: {
      int64_t x;
      if (parse_int(s, &x) || x < (int64_t)v->min || x > (int64_t)v->max) {
        snprintf(want, sizeof want, "expected a whole number in [%.0f, %.0f]", v->min, v->max);
        return refuse(v, s, want);
      }
      return DA_SUCCESS;
    }
    case DA_ENV_BOOL:
      return strcmp(s, "0") && strcmp(s, "1") ? refuse(v, s, "expected 0 or 1") : DA_SUCCESS;
    case DA_ENV_SECONDS:
    case DA_ENV_NUMBER: {
      double x;
      if (parse_real(s, &x) || x < v->min || x > v->max) {
        snprintf(want, sizeof want, "expected a finite number%s in [%g, %g]", v->type == DA_ENV_SECONDS ? " of seconds" : "",
                 v->min, v->max);
        return refuse(v, s, want);
      }
      return DA_SUCCESS;
    }
    case DA_ENV_SIZE: {
      int64_t x;
      if (da_parse_size(s, &x) || (double)x < v->min || (double)x > v->max) {
        snprintf(want, sizeof want, "expected a size (K/M/G suffixes) in [%.0f, %.0f]", v->min, v->max);
        return refuse(v, s, want);
      }
      return DA_SUCCESS;
    }
    case DA_ENV_SIZE_OFF: {
      int64_t x;
      if (!strcmp(s, "off") || !strcmp(s, "-1")) return DA_SUCCESS;
      return da_parse_size(s, &x) || x <= 0 ? refuse(v, s, "expected a size > 0 (K/M/G suffixes) or off") : DA_SUCCESS;
    }
    case DA_ENV_WORD:
      if (!is_choice(v->choices, s, strlen(s), v->nocase)) {
        snprintf(want, sizeof want, "expected one of %s", v->choices);
        return refuse(v, s, want);
      }
      return DA_SUCCESS;
    case DA_ENV_WORDS: {
      const char *p = s + (*s == '^');
      for (;;) {
        size_t n = strcspn(p, ",");
        if (!is_choice(v->choices, p, n, v->nocase)) {
          snprintf(want, sizeof want, "'%.*s' is not a subsystem: expected comma-separated words of %s, optionally "
                   "led by ^", (int)(n < 32 ? n : 32), p, v->choices);
          return refuse(v, s, want);
        }
        if (!p[n]) return DA_SUCCESS;
        p += n + 1;
      }
    }
    case DA_ENV_TEXT:
      return da_utf8_valid(s) ? DA_SUCCESS : refuse(v, s, "not valid UTF-8 text");
    case DA_ENV_FILE: {
      struct stat st;
      if (stat(s, &st)) return refuse(v, s, strerror(errno));
      if (!S_ISREG(st.st_mode)) return refuse(v, s, "not a regular file");
      return access(s, R_OK) ? refuse(v, s, strerror(errno)) : DA_SUCCESS;
    }
    case DA_ENV_POISON:
      return !poison_parse(s, NULL, NULL) ? DA_SUCCESS
                          : refuse(v, s, "expected up to 16 items TENSOR:POS[:nan|inf|-inf] with TENSOR one of q, k, "
                                         "v, dout, POS a size >= 0");
    case DA_ENV_INTERNAL: return DA_SUCCESS;
  }
  return DA_ERR(DA_ERR_INTERNAL, "%s: unknown type %d in the env table", v->name, (int)v->type);
}

da_status_t da_env_check_all(void) {
  for (const da_env_var_t *v = da_env_vars; v->name; v++) {
    const char *s = getenv(v->name);
    if (s && *s) DA_CHECK(da_env_check_value(v, s));
  }
  return DA_SUCCESS;
}

/* The entry of name, its value when set, checked. */
static da_status_t lookup(const char *name, const da_env_var_t **v, const char **s) {
  *v = da_env_find(name);
  if (!*v) return DA_ERR(DA_ERR_INTERNAL, "%s is not in the env table (core/env.c)", name);
  *s = getenv(name);
  if (!*s || !**s) {
    *s = NULL;
    return DA_SUCCESS;
  }
  return da_env_check_value(*v, *s);
}

da_status_t da_env_int(const char *name, int64_t *out, int *set) {
  const da_env_var_t *v;
  const char *s;
  *set = 0;
  DA_CHECK(lookup(name, &v, &s));
  if (!s) return DA_SUCCESS;
  if (v->type != DA_ENV_INT && v->type != DA_ENV_BOOL && v->type != DA_ENV_SIZE)
    return DA_ERR(DA_ERR_INTERNAL, "%s is not an integer variable", name);
  int64_t x = 0;
  if (v->type == DA_ENV_SIZE ? da_parse_size(s, &x) : parse_int(s, &x))
    return DA_ERR(DA_ERR_INTERNAL, "%s=%s: checked but not parsed", name, s);
  *out = x, *set = 1;
  DA_INFO(DA_SUB_ENV, "%s set by environment to %lld", name, (long long)x);
  return DA_SUCCESS;
}

da_status_t da_env_double(const char *name, double *out, int *set) {
  const da_env_var_t *v;
  const char *s;
  *set = 0;
  DA_CHECK(lookup(name, &v, &s));
  if (!s) return DA_SUCCESS;
  if (v->type != DA_ENV_SECONDS && v->type != DA_ENV_NUMBER)
    return DA_ERR(DA_ERR_INTERNAL, "%s is not a real-valued variable", name);
  double x = 0;
  if (parse_real(s, &x)) return DA_ERR(DA_ERR_INTERNAL, "%s=%s: checked but not parsed", name, s);
  *out = x, *set = 1;
  DA_INFO(DA_SUB_ENV, "%s set by environment to %g", name, x);
  return DA_SUCCESS;
}

int da_utf8_next(const unsigned char *p) {
  if (p[0] < 0x80) return 1;
  int n = p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : p[0] >= 0xe0 ? 3 : p[0] >= 0xc2 && p[0] < 0xe0 ? 2 : 0;
  if (!n) return 0; /* a continuation byte, an overlong lead (c0, c1) or past U+10FFFF (f5..ff) */
  for (int i = 1; i < n; i++)
    if ((p[i] & 0xc0) != 0x80) return 0;
  /* overlong 3- and 4-byte forms, UTF-16 surrogates, past U+10FFFF */
  if ((p[0] == 0xe0 && p[1] < 0xa0) || (p[0] == 0xed && p[1] >= 0xa0) || (p[0] == 0xf0 && p[1] < 0x90) ||
      (p[0] == 0xf4 && p[1] >= 0x90))
    return 0;
  return n;
}

int da_utf8_valid(const char *s) {
  for (const unsigned char *p = (const unsigned char *)s; *p;) {
    int n = da_utf8_next(p);
    if (!n) return 0;
    p += n;
  }
  return 1;
}

da_status_t da_env_poison(const char *name, da_env_poison_t items[DA_ENV_POISON_MAX], int *n) {
  const da_env_var_t *v;
  const char *s;
  *n = 0;
  DA_CHECK(lookup(name, &v, &s));
  if (!s) return DA_SUCCESS;
  if (v->type != DA_ENV_POISON) return DA_ERR(DA_ERR_INTERNAL, "%s is not a poison-list variable", name);
  if (poison_parse(s, items, n)) return DA_ERR(DA_ERR_INTERNAL, "%s=%s: checked but not parsed", name, s);
  return DA_SUCCESS;
}
