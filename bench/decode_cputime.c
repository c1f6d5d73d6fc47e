/* decode_cputime.c: the CPU decode kernel timed in CPU time, not wall time, so that a machine
 * shared with other work still gives comparable numbers (the time slices other processes take
 * do not count; their memory traffic still does). One query row at the last position against a
 * causal cache of ctx keys in pages of 256 rows, the cache evicted from the caches before every
 * call. Prints one JSON line: best-of-reps thread CPU time of the calling thread (the whole call
 * at 1 thread), process CPU time (all threads), the KV read rate those give, and ratio_membw_cpu:
 * the process CPU time of a plain streaming read of the same bytes with the same threads (from
 * DRAM too) over the decode's (1: the decode reads at the stream's rate). Not a test.
 *   da_decode_cputime CTX D H G fp32|bf16|fp16 THREADS REPS [warm]   (DISTATTN_CPU_ISA picks the level,
 *   DISTATTN_BENCH_HUGEPAGES=1 puts the cache in transparent huge pages)
 * warm: no eviction, and 100 calls per timing (a cache that fits the L2 then times the arithmetic
 * alone). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <sys/mman.h>
#include <time.h>
#include "dtype.h"
#include "kernels.h"

/* Sum of a buffer as 64-bit words over T threads, each a contiguous part: the plain streaming
 * read of launcher/cmd_kernel.c, to which the decode's read is compared. */
__attribute__((target_clones("avx2", "default"))) static uint64_t stream_sum(const uint64_t *x, int64_t n) {
  uint64_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += x[i];
  return s;
}

static uint64_t stream_read(const char *a, const char *b, int64_t bytes, int T) {
  uint64_t total = 0;
#pragma omp parallel num_threads(T) reduction(+ : total)
  {
    const int64_t n = bytes / 8, t = omp_get_thread_num(), nt = omp_get_num_threads();
    total += stream_sum((const uint64_t *)a + n * t / nt, n * (t + 1) / nt - n * t / nt);
    total += stream_sum((const uint64_t *)b + n * t / nt, n * (t + 1) / nt - n * t / nt);
  }
  return total;
}

/* The K or V cache: exactly its bytes (so that memcheck sees a read past the last row), or, with
 * DISTATTN_BENCH_HUGEPAGES=1, 2 MiB-aligned in transparent huge pages (an experiment: 4 KiB pages
 * cost a TLB miss and stop the hardware prefetchers every 8 fp32 rows of D 128). */
static char *cache_alloc(size_t bytes) {
  const char *e = getenv("DISTATTN_BENCH_HUGEPAGES");
  if (!e || strcmp(e, "1")) return malloc(bytes);
  const size_t a = 2u << 20, n = (bytes + a - 1) / a * a;
  char *p = aligned_alloc(a, n);
  if (p) madvise(p, n, MADV_HUGEPAGE);
  return p;
}

static double cpu_s(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 8 && !(argc == 9 && !strcmp(argv[8], "warm"))) {
    fprintf(stderr, "usage: %s CTX D H G fp32|bf16|fp16 THREADS REPS [warm]\n", argv[0]);
    return 2;
  }
  const int64_t S = atoll(argv[1]);
  const int D = atoi(argv[2]), H = atoi(argv[3]), G = atoi(argv[4]), nthr = atoi(argv[6]), reps = atoi(argv[7]);
  const da_dtype_t dt = !strcmp(argv[5], "bf16") ? DA_BFLOAT16 : !strcmp(argv[5], "fp16") ? DA_FLOAT16 : DA_FLOAT32;
  if (S < 1 || D < 1 || H < 1 || G < 1 || H % G || nthr < 1 || reps < 1 ||
      (dt == DA_FLOAT32 && strcmp(argv[5], "fp32"))) {
    fprintf(stderr, "%s: bad arguments\n", argv[0]);
    return 2;
  }
  const da_kernels_t *kt = da_kernels_get(DA_DEVICE_CPU);
  if (!kt) {
    fprintf(stderr, "%s: %s\n", argv[0], da_error_message());
    return 1;
  }
  const size_t es = da_dtype_size(dt), row = (size_t)G * D * es;
  char *k = cache_alloc((size_t)S * row), *v = cache_alloc((size_t)S * row), *q = malloc((size_t)H * D * es);
  const size_t nflush = 64u << 20; /* twice the 32 MiB L3 */
  volatile char *flush = malloc(nflush);
  float *o = malloc((size_t)H * D * 4), *lse = malloc((size_t)H * 4);
  if (!k || !v || !q || !flush || !o || !lse) return fprintf(stderr, "%s: out of memory\n", argv[0]), 1;
  uint64_t x = 88172645463325252ull;
  for (int64_t i = 0; i < S * G * D; i++) { /* values in [-1, 1) in the storage dtype */
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    da_store_f32(k, dt, i, (float)((double)(x >> 11) / 9007199254740992.0 * 2 - 1));
    da_store_f32(v, dt, i, (float)((double)(x & 0xffff) / 65536.0 * 2 - 1));
  }
  for (int i = 0; i < H * D; i++) da_store_f32(q, dt, i, (float)((i % 7) - 3) * 0.25f);
  for (size_t i = 0; i < nflush; i++) flush[i] = (char)i;
  const int64_t P = 256;
  const int np = (int)((S + P - 1) / P);
  da_kvpage_t *pg = calloc((size_t)np, sizeof *pg);
  for (int i = 0; i < np; i++) {
    const int64_t s0 = (int64_t)i * P;
    pg[i] = (da_kvpage_t){k + (size_t)s0 * row, v + (size_t)s0 * row, (int64_t)G * D, (int64_t)G * D,
                          da_span(s0, 1, S - s0 < P ? S - s0 : P)};
  }
  da_kparams_t p = {.H = H, .G = G, .D = D, .scale = 0.088f, .dtype = dt, .nthreads = nthr};
  p.mask.flags = DA_MASK_CAUSAL;
  double best_t = 1e30, best_p = 1e30;
  const int calls = argc == 8 ? 1 : 100; /* warm: 100 calls per timing (the CPU clocks tick in 10 us here) */
  for (int r = 0; r <= reps; r++) { /* r = 0: warm-up */
    unsigned sink = 0;
    for (size_t i = 0; argc == 8 && i < nflush; i += 64) sink += (unsigned)flush[i];
    const double t0 = cpu_s(CLOCK_THREAD_CPUTIME_ID), p0 = cpu_s(CLOCK_PROCESS_CPUTIME_ID);
    for (int c = 0; c < calls; c++)
      if (kt->decode(&p, q, (int64_t)H * D, da_span(S - 1, 1, 1), pg, np, o, lse, NULL) != DA_SUCCESS) {
        fprintf(stderr, "%s: decode: %s\n", argv[0], da_error_message());
        return 1;
      }
    const double t1 = cpu_s(CLOCK_THREAD_CPUTIME_ID), p1 = cpu_s(CLOCK_PROCESS_CPUTIME_ID);
    if (r && (t1 - t0) / calls < best_t) best_t = (t1 - t0) / calls;
    if (r && (p1 - p0) / calls < best_p) best_p = (p1 - p0) / calls;
    if (sink == 12345u) fputc(' ', stderr); /* keeps the flush read */
  }
  /* The same bytes (K and V) read by a plain stream with the same threads, from DRAM, best of reps
   * in process CPU time (all threads), like the decode's process time. */
  double best_s = 1e30;
  for (int r = 0; r <= reps; r++) {
    unsigned sink = 0;
    for (size_t i = 0; i < nflush; i += 64) sink += (unsigned)flush[i];
    const double p0 = cpu_s(CLOCK_PROCESS_CPUTIME_ID);
    const uint64_t z = stream_read(k, v, S * (int64_t)row, nthr);
    const double p1 = cpu_s(CLOCK_PROCESS_CPUTIME_ID);
    if (r && p1 - p0 < best_s) best_s = p1 - p0;
    if (z == 12345u || sink == 12345u) fputc(' ', stderr);
  }
  const double bytes = 2.0 * (double)S * (double)row;
  printf("{\"ctx\": %lld, \"D\": %d, \"H\": %d, \"G\": %d, \"dtype\": \"%s\", \"threads\": %d, \"isa\": \"%s\", "
         "\"thread_cpu_ms\": %.4f, \"process_cpu_ms\": %.4f, \"gbs_thread_cpu\": %.2f, \"stream_process_cpu_ms\": %.4f, "
         "\"ratio_membw_cpu\": %.3f, \"o0\": %.6g}\n",
         (long long)S, D, H, G, argv[5], nthr, kt->name ? kt->name : "?", best_t * 1e3, best_p * 1e3,
         bytes / best_t * 1e-9, best_s * 1e3, best_s / best_p, (double)o[0]);
  return 0;
}
