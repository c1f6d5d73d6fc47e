/* report.c: headers, fixed-width tables, footers (stdout) and JSON Lines records (--json FILE)
 * for every `distattn` subcommand. Results only; diagnostics go to stderr or the logger. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include "core.h"
#include "report.h"

/* ---- machine facts ---- */

const char *da_report_hostname(void) {
  static char host[256];
  if (!host[0]) {
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
  }
  return host;
}

const char *da_report_cpu_model(void) {
  static char model[256];
  if (model[0]) return model;
  snprintf(model, sizeof model, "unknown");
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return model;
  char line[512];
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "model name", 10)) {
      char *c = strchr(line, ':');
      if (c) {
        c++;
        while (*c == ' ' || *c == '\t') c++;
        size_t n = strcspn(c, "\n");
        snprintf(model, sizeof model, "%.*s", (int)n, c);
      }
      break;
    }
  fclose(f);
  return model;
}

int da_report_online_cores(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* ---- header ---- */

void da_report_line(FILE *f, const char *fmt, ...) {
  va_list ap;
  fputs("# ", f);
  va_start(ap, fmt);
  vfprintf(f, fmt, ap);
  va_end(ap);
  fputc('\n', f);
}

void da_report_header(FILE *f, const da_cmdspec_t *cmd, int threads) {
  cpu_set_t set;
  CPU_ZERO(&set);
  int allowed = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : da_report_online_cores();
  da_report_line(f, "distattn %s %s", cmd->name, da_version_string());
  da_report_line(f, "host: %s  pid: %d  threads: %d  cores: %d online, %d allowed", da_report_hostname(),
                 (int)getpid(), threads, da_report_online_cores(), allowed);
  da_report_line(f, "cpu: %s", da_report_cpu_model());
  /* Every option with its value in effect, so a table read alone says how it was produced. */
  char line[2048];
  size_t off = 0;
  line[0] = '\0';
  for (const da_opt_t *o = cmd->opts; o->name; o++) {
    char v[256];
    if (o->type == DA_OPT_FLAG && !*(const int *)o->dest) continue;
    if (o->type == DA_OPT_STRING && !*(const char *const *)o->dest) continue;
    const char *val = o->type == DA_OPT_FLAG ? "" : da_args_format(o, v, sizeof v);
    char item[320];
    int w = snprintf(item, sizeof item, "--%s%s%s", o->name, *val ? " " : "", val);
    if (w < 0) continue;
    if (off && off + (size_t)w + 1 > 96) { /* wrap long settings over several lines */
      da_report_line(f, "settings: %s", line);
      off = 0;
      line[0] = '\0';
    }
    off += (size_t)snprintf(line + off, sizeof line - off, "%s%s", off ? " " : "", item);
    if (off >= sizeof line) off = sizeof line - 1;
  }
  if (off) da_report_line(f, "settings: %s", line);
}

/* ---- table ---- */

void da_table_init(da_table_t *t, FILE *f, int ncols, const char *const *names, const int *widths) {
  memset(t, 0, sizeof *t);
  t->f = f;
  t->ncols = ncols > DA_TABLE_MAX_COLS ? DA_TABLE_MAX_COLS : ncols;
  for (int i = 0; i < t->ncols; i++) {
    int len = (int)strlen(names[i]);
    t->names[i] = names[i];
    t->widths[i] = widths[i] > len ? widths[i] : len;
  }
}

void da_table_print_header(da_table_t *t) {
  fputc('#', t->f);
  for (int i = 0; i < t->ncols; i++) fprintf(t->f, " %*s", t->widths[i], t->names[i]);
  fputc('\n', t->f);
}

/* Rows start with one extra space where the header has '#', so every column lines up. */
void da_table_str(da_table_t *t, const char *s) {
  int w = t->col < t->ncols ? t->widths[t->col] : 10;
  fprintf(t->f, t->col == 0 ? "  %*s" : " %*s", w, s);
  t->col++;
}

void da_table_int(da_table_t *t, int64_t v) {
  char b[32];
  snprintf(b, sizeof b, "%lld", (long long)v);
  da_table_str(t, b);
}

void da_table_dbl(da_table_t *t, double v, int prec, int sci) {
  char b[48];
  if (!isfinite(v)) snprintf(b, sizeof b, "-");
  else if (sci) snprintf(b, sizeof b, "%.*e", prec, v);
  else snprintf(b, sizeof b, "%.*f", prec, v);
  da_table_str(t, b);
}

void da_table_end_row(da_table_t *t) {
  fputc('\n', t->f);
  fflush(t->f);
  t->col = 0;
}

void da_report_nonfinite(FILE *f, int n, const char *const *names, const int64_t *counts, int64_t rows,
                         int64_t wrong_rows, int inputs_poisoned) {
  char line[512];
  size_t off = 0;
  line[0] = '\0';
  for (int i = 0; i < n; i++)
    if (counts[i] > 0 && off < sizeof line - 64)
      off += (size_t)snprintf(line + off, sizeof line - off, "%s%s %lld", off ? ", " : "", names[i],
                              (long long)counts[i]);
  if (off)
    da_report_line(f, "warning: non-finite values (NaN or Inf, all ranks): %s; they propagate as in a dense "
                   "softmax(QK^T)V (docs/decisions.md)", line);
  if (rows > 0)
    da_report_line(f, "warning: %lld verified (row, head) vectors have a non-finite float64 reference "
                   "(poisoned inputs): not counted as wrong, not measured", (long long)rows);
  if (wrong_rows > 0)
    da_report_line(f, "warning: %lld of the wrong (row, head) vectors are non-finite where the float64 reference "
                   "is finite%s",
                   (long long)wrong_rows, inputs_poisoned ? ": a non-finite input reaches rows the mask hides from it "
                   "through 0 x NaN in a shared kernel tile, as in FlashAttention (docs/decisions.md)" : "");
}

int da_report_footer(FILE *f, int64_t wrong, int ok) {
  da_report_line(f, "wrong: %lld", (long long)wrong);
  int pass = ok && wrong == 0;
  da_report_line(f, "%s", pass ? "PASS" : "FAIL");
  fflush(f);
  return pass ? 0 : 1;
}

/* ---- JSON ---- */

static void jreserve(da_json_t *j, size_t more) {
  if (j->oom) return;
  if (j->len + more + 1 <= j->cap) return;
  size_t cap = j->cap ? j->cap : 512;
  while (cap < j->len + more + 1) cap *= 2;
  char *b = realloc(j->buf, cap);
  if (!b) {
    j->oom = 1;
    return;
  }
  j->buf = b;
  j->cap = cap;
}

static void jraw(da_json_t *j, const char *s, size_t n) {
  jreserve(j, n);
  if (j->oom) return;
  memcpy(j->buf + j->len, s, n);
  j->len += n;
  j->buf[j->len] = '\0';
}

static void jstring(da_json_t *j, const char *s) {
  jraw(j, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    char esc[8];
    switch (*p) {
      case '"': jraw(j, "\\\"", 2); break;
      case '\\': jraw(j, "\\\\", 2); break;
      case '\n': jraw(j, "\\n", 2); break;
      case '\r': jraw(j, "\\r", 2); break;
      case '\t': jraw(j, "\\t", 2); break;
      case '\b': jraw(j, "\\b", 2); break;
      case '\f': jraw(j, "\\f", 2); break;
      default:
        if (*p < 0x20 || *p == 0x7f) {
          snprintf(esc, sizeof esc, "\\u%04x", *p);
          jraw(j, esc, 6);
        } else if (*p < 0x80) {
          jraw(j, (const char *)p, 1);
        } else { /* well-formed UTF-8 passes through; any other byte becomes U+FFFD, so the line stays
                    valid JSON whatever a path, host or environment variable holds */
          const int n = da_utf8_next(p);
          if (n) jraw(j, (const char *)p, (size_t)n), p += n - 1;
          else jraw(j, "\\ufffd", 6);
        }
    }
  }
  jraw(j, "\"", 1);
}

static void jkey(da_json_t *j, const char *key) {
  if (j->nfields++) jraw(j, ",", 1);
  jstring(j, key);
  jraw(j, ":", 1);
}

void da_json_begin(da_json_t *j) {
  memset(j, 0, sizeof *j);
  jraw(j, "{", 1);
}

void da_json_str(da_json_t *j, const char *key, const char *val) {
  jkey(j, key);
  if (val) jstring(j, val);
  else jraw(j, "null", 4);
}

void da_json_int(da_json_t *j, const char *key, int64_t val) {
  char b[32];
  int n = snprintf(b, sizeof b, "%lld", (long long)val);
  jkey(j, key);
  jraw(j, b, (size_t)n);
}

void da_json_dbl(da_json_t *j, const char *key, double val) {
  jkey(j, key);
  if (!isfinite(val)) {
    jraw(j, "null", 4);
    return;
  }
  char b[40];
  int n = snprintf(b, sizeof b, "%.10g", val); /* 10 digits: exact enough, still readable */
  jraw(j, b, (size_t)n);
}

void da_json_bool(da_json_t *j, const char *key, int val) {
  jkey(j, key);
  jraw(j, val ? "true" : "false", val ? 4 : 5);
}

void da_json_null(da_json_t *j, const char *key) {
  jkey(j, key);
  jraw(j, "null", 4);
}

void da_json_raw(da_json_t *j, const char *key, const char *json) {
  jkey(j, key);
  jraw(j, json, strlen(json));
}

void da_json_problem(da_json_t *j, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, const char *mask,
                     const char *dtype, const char *device, int threads) {
  da_json_int(j, "batch", batch);
  da_json_int(j, "heads", heads);
  da_json_int(j, "kv_heads", kv_heads);
  da_json_int(j, "dim", dim);
  da_json_str(j, "mask", mask);
  da_json_str(j, "dtype", dtype);
  da_json_str(j, "device", device);
  da_json_int(j, "threads", threads);
}

void da_json_common(da_json_t *j, const char *hosts) {
  da_json_str(j, "git", da_git_version());
  da_json_str(j, "hosts", hosts ? hosts : da_report_hostname());
  const char *job = getenv("SLURM_JOB_ID");
  if (job && *job) da_json_str(j, "SLURM_JOB_ID", job);
  da_json_str(j, "cpu", da_report_cpu_model());
  da_json_int(j, "peak_rss_bytes", (int64_t)da_peak_rss_bytes());
}

/* How long an appender waits for another process's lock on the file before giving up (set by the
 * MPI commands to a fraction of their deadline: peers wait in a collective meanwhile). */
static double json_lock_wait_s = 10.0;
void da_json_set_lock_wait(double seconds) { json_lock_wait_s = seconds > 0 ? seconds : 10.0; }

/* flock(LOCK_EX) polled up to json_lock_wait_s: 0 locked, 1 held by another process all along
 * (*waited: seconds), -1 flock itself failed (a file system without locks: append unlocked). */
static int lock_bounded(int fd, double *waited) {
  const double t0 = da_time_now();
  for (;;) {
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) return 0;
    if (errno != EWOULDBLOCK && errno != EINTR) return -1;
    *waited = da_time_now() - t0;
    if (*waited >= json_lock_wait_s) return 1;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

int da_json_append(da_json_t *j, const char *path) {
  /* DISTATTN_JSON_KEY: the caller's name for this configuration (a sweep's), recorded last so a
   * script can tell with one grep whether a whole record of it is already in the file. */
  const char *key = getenv("DISTATTN_JSON_KEY");
  if (key && *key) da_json_str(j, "key", key);
  jraw(j, "}\n", 2);
  if (j->oom) {
    fprintf(stderr, "distattn: out of memory building the JSON record for %s\n", path);
    return -1;
  }
  int fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    fprintf(stderr, "distattn: cannot open --json %s: %s\n", path, strerror(errno));
    return -1;
  }
  /* Whole records or none. Appenders take the file's lock (jobs of a sweep may share a file),
   * look at the end of the file -- a record cut short by a full disk or a killed writer of another
   * program is closed with a newline first, so it never swallows ours -- and write the record
   * with one write() on O_APPEND. A short write is undone (truncated back) and reported. */
  double waited = 0;
  const int lk = lock_bounded(fd, &waited);
  if (lk == 1) { /* say so: left waiting, the rank would make its peers report it missing */
    fprintf(stderr, "distattn: --json %s is locked by another process (waited %.1f s for its flock): the record was "
            "not written\n", path, waited);
    close(fd);
    return -1;
  }
  int locked = lk == 0, rc = 0;
  struct stat sb;
  off_t size = fstat(fd, &sb) == 0 ? sb.st_size : -1;
  char last = '\n';
  if (size > 0 && pread(fd, &last, 1, size - 1) != 1) last = '\n';
  const char *buf = j->buf;
  size_t len = j->len;
  if (last != '\n') { /* an unterminated line ends the file: end it first, in the same write */
    char *b = malloc(len + 1);
    if (b) {
      b[0] = '\n';
      memcpy(b + 1, j->buf, len);
      buf = b, len++;
    }
  }
  ssize_t w;
  do w = write(fd, buf, len);
  while (w < 0 && errno == EINTR);
  if (w < 0 || (size_t)w != len) {
    int e = w < 0 ? errno : ENOSPC;
    if (w > 0 && size >= 0 && locked && ftruncate(fd, size) == 0)
      fprintf(stderr, "distattn: writing --json %s: %s after %zd of %zu bytes; the partial record was removed\n",
              path, strerror(e), w, len);
    else
      fprintf(stderr, "distattn: writing --json %s: %s (%zd of %zu bytes written)\n", path, strerror(e), w, len);
    rc = -1;
  }
  if (buf != j->buf) free((void *)buf);
  if (locked) flock(fd, LOCK_UN);
  if (close(fd) && !rc) {
    fprintf(stderr, "distattn: closing --json %s: %s\n", path, strerror(errno));
    rc = -1;
  }
  return rc;
}

int da_json_check_path(const char *path) {
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    fprintf(stderr, "distattn: cannot open --json %s for appending: %s\n", path, strerror(errno));
    return -1;
  }
  close(fd);
  return 0;
}

void da_json_free(da_json_t *j) {
  free(j->buf);
  memset(j, 0, sizeof *j);
}
