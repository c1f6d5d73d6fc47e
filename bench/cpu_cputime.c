/* bench/cpu_cputime.c: a load-independent view of the CPU kernels' speed. On a shared machine
 * wall times swing with whatever else runs; the CPU time of the one thread doing the work swings
 * much less (it still feels shared caches and memory). This times one forward (fwd_block +
 * fwd_finish) and one backward (bwd_prep + bwd_block) on ONE thread with CLOCK_THREAD_CPUTIME_ID,
 * best of N, and the same-harness OpenBLAS sgemm of the attention's two shapes (S x D . D x S and
 * S x S . S x D, one thread), and prints GFLOP/s and the ratio to sgemm. Not a test: it never
 * checks results (tests/test_kernels.c does).
 *
 * Built as build/da_cpu_cputime when OpenBLAS is found (CMakeLists.txt).
 * Run: build/da_cpu_cputime SEQ D causal|none [reps]     (DISTATTN_CPU_ISA picks the level)
 * FLOPs: forward 4 D per allowed (q, k) pair, backward 10 D (S, dP recomputed; dV, dK, dQ). */
#define _GNU_SOURCE
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kernels.h"

static double cpu_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void fill(float *x, size_t n, unsigned *seed) {
  for (size_t i = 0; i < n; i++) {
    *seed = *seed * 1664525u + 1013904223u;
    x[i] = (float)((*seed >> 8) & 0xffff) / 32768.0f - 1.0f;
  }
}

static void die(da_status_t s, const char *what) {
  if (s != DA_SUCCESS) {
    fprintf(stderr, "%s failed: %s\n", what, da_error_message());
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s SEQ D causal|none [reps [heads]]\n", argv[0]);
    return 2;
  }
  const int64_t S = atoll(argv[1]);
  const int D = atoi(argv[2]), causal = !strcmp(argv[3], "causal"), reps = argc > 4 ? atoi(argv[4]) : 5;
  const int H = argc > 5 ? atoi(argv[5]) : 1;
  da_kparams_t p = {.H = H, .G = H, .D = D, .scale = 1.0f / sqrtf((float)D), .dtype = DA_FLOAT32, .nthreads = 1};
  if (causal) p.mask.flags = DA_MASK_CAUSAL;
  const da_kernels_t *kt = &da_kernels_cpu;
  die(kt->supports(&p), "supports");
  const size_t n = (size_t)S * H * D;
  float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *out = malloc(n * 4), *dout = malloc(n * 4);
  float *dq = malloc(n * 4), *dk = malloc(n * 4), *dv = malloc(n * 4), *lse = malloc(S * H * 4), *delta = malloc(S * H * 4);
  unsigned seed = 12345;
  fill(q, n, &seed), fill(k, n, &seed), fill(v, n, &seed), fill(dout, n, &seed);
  da_fwd_state_t st = {.o = malloc(n * 4), .m = malloc(S * H * 4), .l = malloc(S * H * 4), .nq = S};
  const da_span_t pos = da_span(0, 1, S);
  const double pairs = causal ? (double)S * (double)(S + 1) / 2 : (double)S * (double)S;
  double tf = 1e30, tb = 1e30;
  for (int r = 0; r < reps; r++) {
    da_fwd_state_init_host(&p, &st);
    double t0 = cpu_now();
    die(kt->fwd_block(&p, q, H * D, pos, k, H * D, v, H * D, pos, &st, NULL), "fwd_block");
    die(kt->fwd_finish(&p, &st, out, DA_FLOAT32, H * D, lse, NULL), "fwd_finish");
    double t1 = cpu_now();
    memset(dq, 0, n * 4), memset(dk, 0, n * 4), memset(dv, 0, n * 4);
    double t2 = cpu_now();
    die(kt->bwd_prep(&p, S, out, H * D, dout, H * D, delta, NULL), "bwd_prep");
    die(kt->bwd_block(&p, q, H * D, dout, H * D, lse, delta, pos, k, H * D, v, H * D, pos, dq, dk, dv, NULL), "bwd_block");
    double t3 = cpu_now();
    if (t1 - t0 < tf) tf = t1 - t0;
    if (t3 - t2 < tb) tb = t3 - t2;
  }
  /* sgemm of the two shapes of one head, M = min(S, 2048) rows scaled to S */
  openblas_set_num_threads(1);
  const int64_t M = S < 2048 ? S : 2048;
  float *C = malloc((size_t)M * S * 4), *O = malloc((size_t)M * D * 4);
  fill(C, (size_t)M * S, &seed);
  double tg = 1e30;
  for (int r = 0; r < reps; r++) {
    double t0 = cpu_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)S, D, 1.0f, q, D, k, D, 0.0f, C, (int)S);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, D, (int)S, 1.0f, C, (int)S, v, D, 0.0f, O, D);
    double t1 = cpu_now();
    if (t1 - t0 < tg) tg = t1 - t0;
  }
  const double gf = 4.0 * H * D * pairs / tf * 1e-9, gb = 10.0 * H * D * pairs / tb * 1e-9;
  const double gs = 4.0 * D * (double)M * (double)S / tg * 1e-9, gfb = 14.0 * H * D * pairs / (tf + tb) * 1e-9;
  printf("{\"isa\": \"%s\", \"seq\": %lld, \"heads\": %d, \"dim\": %d, \"mask\": \"%s\", \"reps\": %d, \"fwd_ms\": %.2f, "
         "\"bwd_ms\": %.2f, \"fwd_gflops\": %.1f, \"bwd_gflops\": %.1f, \"fwdbwd_gflops\": %.1f, \"sgemm_gflops\": %.1f, "
         "\"fwd_ratio_sgemm\": %.3f, \"bwd_ratio_sgemm\": %.3f}\n",
         da_cpu_isa_name(), (long long)S, H, D, causal ? "causal" : "none", reps, tf * 1e3, tb * 1e3, gf, gb, gfb, gs,
         gf / gs, gb / gs);
  return 0;
}
