/* util.c: env parameters, timers, memory accounting, thread counts, size parsing, versions. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include "core.h"
#include "env.h"

#ifndef DA_GIT_VERSION
#define DA_GIT_VERSION "unknown"
#endif

/* ---- parameters ---- */
int64_t da_param_load(const char *env, int64_t deflt, int64_t *cache, int *state) {
  /* state: 0 unread, 1 loading, 2 ready */
  if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == 2) return *cache;
  int expected = 0;
  if (__atomic_compare_exchange_n(state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    int64_t v = deflt;
    int set = 0;
    if (da_env_int(env, &v, &set) != DA_SUCCESS) {
      DA_WARN(DA_SUB_ENV, "%s (using %lld)", da_error_message(), (long long)deflt);
      v = deflt;
    }
    *cache = v;
    __atomic_store_n(state, 2, __ATOMIC_RELEASE);
    return v;
  }
  while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != 2) sched_yield();
  return *cache;
}

const char *da_param_string(const char *env_full) {
  const char *s = getenv(env_full);
  if (s && *s) DA_INFO(DA_SUB_ENV, "%s set by environment to %s", env_full, s);
  return (s && *s) ? s : NULL;
}

/* ---- timers ---- */
double da_time_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- memory accounting ----
 * A 64-byte header before each block records its size (and the offset back to the malloc'ed
 * pointer), so da_free needs no size argument. */
static size_t mem_cur, mem_peak;

typedef struct { void *base; size_t bytes; } da_hdr_t;

/* Blocks of at least two huge pages are advised onto transparent huge pages (MADV_HUGEPAGE, the
 * 2 MiB-aligned part of the block; DISTATTN_HUGEPAGES=0: never). A KV cache that decode reads in
 * 4 KiB pages takes a DTLB miss every 4 KiB of each of its K and V streams: on the AMX host the
 * decode of a 256K-key cache took 4-8% less time on 2 MiB pages at every group size and dtype
 * (bench/results/decode-spr.md). The advice may be refused (a kernel without THP): a TRACE line
 * says so and the block stays on 4 KiB pages. Where the kernel compacts memory for advised blocks
 * at fault time (THP defrag "madvise"), a fragmented machine may stall the first touch of a block:
 * DISTATTN_HUGEPAGES=0 turns the advice off. */
#define DA_HUGE_PAGE ((size_t)2 << 20)
DA_PARAM(Hugepages, "HUGEPAGES", 1)

static void advise_huge(uintptr_t p, size_t bytes) {
  if (bytes < 2 * DA_HUGE_PAGE || !da_param_Hugepages()) return;
#ifdef MADV_HUGEPAGE
  const uintptr_t a = (p + DA_HUGE_PAGE - 1) & ~(uintptr_t)(DA_HUGE_PAGE - 1);
  const uintptr_t e = (p + bytes) & ~(uintptr_t)(DA_HUGE_PAGE - 1);
  if (e > a && madvise((void *)a, e - a, MADV_HUGEPAGE) != 0)
    DA_TRACE(DA_SUB_ALLOC, "huge pages refused for %zu bytes at %p: %s", (size_t)(e - a), (void *)a,
             strerror(errno));
#endif
}

void *da_malloc(size_t bytes, size_t align) {
  if (align & (align - 1)) return NULL; /* a power of two (0 = default) */
  if (align < 64) align = 64;
  size_t hdr = align; /* >= sizeof(da_hdr_t), keeps the payload aligned */
  if (bytes > SIZE_MAX - hdr - align) return NULL;
  void *base = malloc(bytes + hdr + align);
  if (!base) return NULL;
  uintptr_t p = ((uintptr_t)base + hdr + align - 1) & ~(uintptr_t)(align - 1);
  da_hdr_t *h = (da_hdr_t *)(p - sizeof(da_hdr_t));
  h->base = base;
  h->bytes = bytes;
  advise_huge(p, bytes);
  size_t cur = __atomic_add_fetch(&mem_cur, bytes, __ATOMIC_RELAXED);
  size_t peak = __atomic_load_n(&mem_peak, __ATOMIC_RELAXED);
  while (cur > peak &&
         !__atomic_compare_exchange_n(&mem_peak, &peak, cur, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  DA_TRACE(DA_SUB_ALLOC, "alloc %zu bytes at %p (live %zu)", bytes, (void *)p, cur);
  return (void *)p;
}

void *da_calloc(size_t bytes, size_t align) {
  void *p = da_malloc(bytes, align);
  if (p) memset(p, 0, bytes);
  return p;
}

void da_free(void *p) {
  if (!p) return;
  da_hdr_t *h = (da_hdr_t *)((uintptr_t)p - sizeof(da_hdr_t));
  __atomic_sub_fetch(&mem_cur, h->bytes, __ATOMIC_RELAXED);
  free(h->base);
}

size_t da_mem_current(void) { return __atomic_load_n(&mem_cur, __ATOMIC_RELAXED); }
size_t da_mem_peak(void) { return __atomic_load_n(&mem_peak, __ATOMIC_RELAXED); }
void da_mem_reset_peak(void) { __atomic_store_n(&mem_peak, da_mem_current(), __ATOMIC_RELAXED); }

size_t da_peak_rss_bytes(void) {
  FILE *f = fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  size_t kb = 0;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "VmHWM:", 6)) {
      kb = (size_t)strtoull(line + 6, NULL, 10);
      break;
    }
  fclose(f);
  return kb * 1024;
}

/* ---- threads ---- */
static int affinity_cores(void) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int c = CPU_COUNT(&set);
    if (c > 0) return c < DA_MAX_NTHREADS ? c : DA_MAX_NTHREADS;
  }
  return 1;
}

da_status_t da_default_nthreads_checked(int *n) {
  int64_t v = 0;
  int set = 0;
  DA_CHECK(da_env_int("DISTATTN_NTHREADS", &v, &set)); /* [0, DA_MAX_NTHREADS] by the table */
  *n = set && v > 0 ? (int)v : affinity_cores();
  return DA_SUCCESS;
}

int da_default_nthreads(void) {
  int n = 1;
  if (da_default_nthreads_checked(&n) != DA_SUCCESS) {
    DA_WARN(DA_SUB_ENV, "%s (using the cores this process may run on)", da_error_message());
    n = affinity_cores();
  }
  return n;
}

/* ---- misc ---- */
const char *da_dtype_name(da_dtype_t dt) {
  switch (dt) {
    case DA_FLOAT32: return "fp32";
    case DA_BFLOAT16: return "bf16";
    case DA_FLOAT16: return "fp16";
    default: return "?";
  }
}

size_t da_dtype_size(da_dtype_t dt) { return dt == DA_FLOAT32 ? 4 : (dt < DA_NUM_DTYPES ? 2 : 0); }

int da_parse_size(const char *s, int64_t *out) {
  if (!s || !*s) return -1;
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || v < 0) return -1;
  long long mul = 1;
  if (*end == 'K' || *end == 'k') mul = 1LL << 10, end++;
  else if (*end == 'M' || *end == 'm') mul = 1LL << 20, end++;
  else if (*end == 'G' || *end == 'g') mul = 1LL << 30, end++;
  if (*end) return -1;
  /* Sizes stay below 2^53 so every one is exact as a JSON number (a double). */
  if (v > ((1LL << 53) - 1) / mul) return -1;
  *out = v * mul;
  return 0;
}

const char *da_git_version(void) { return DA_GIT_VERSION; }

const char *da_version_string(void) {
  static char buf[64];
  if (!buf[0])
    snprintf(buf, sizeof buf, "%d.%d.%d (git %s)", DISTATTN_VERSION_MAJOR, DISTATTN_VERSION_MINOR,
             DISTATTN_VERSION_PATCH, DA_GIT_VERSION);
  return buf;
}

da_status_t da_tensor_make(da_tensor_t *t, void *data, da_dtype_t dtype, int ndim, const int64_t *shape) {
  da_error_clear();
  DA_ARG_CHECK(NULL, t != NULL, "da_tensor_make: t is NULL");
  memset(t, 0, sizeof *t);
  t->data = data;
  t->dtype = dtype;
  t->device = DA_DEVICE_CPU;
  DA_ARG_CHECK(NULL, ndim >= 0 && ndim <= 4, "da_tensor_make: ndim %d (0 to 4)", ndim);
  DA_ARG_CHECK(NULL, shape != NULL || ndim == 0, "da_tensor_make: shape is NULL for ndim %d", ndim);
  int64_t st = 1;
  for (int i = ndim - 1; i >= 0; i--)
    DA_ARG_CHECK(NULL, shape[i] >= 0, "da_tensor_make: shape[%d] = %lld < 0", i, (long long)shape[i]);
  for (int i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = st;
    if (da_mul_i64(st, shape[i] > 0 ? shape[i] : 1, &st)) {
      memset(t, 0, sizeof *t);
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_tensor_make: the element count of the shape overflows int64");
    }
  }
  t->ndim = ndim;
  return DA_SUCCESS;
}
