/* test_decode_guard.c: the CPU decode reads a bf16 KV cache within its rows and no further
 * (regression test of b99ad93). At the generic ISA level the grouped decode path (W = 4, so a 4:1
 * GQA group is grouped) read its bf16 rows as fp32: twice the bytes, past the end of the page.
 * With a heap buffer the overrun went unnoticed (wrong output that changed from run to run); here
 * k and v each end exactly at a PROT_NONE guard page, so a read past them faults at once, and the
 * output is checked against the float64 reference. Runs at DISTATTN_CPU_ISA=generic (set before
 * the backend picks its level, once per process); not a test of the other levels. */
#define _GNU_SOURCE
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "distattn.h"
#include "dtype.h"
#include "kernels.h"
#include "ref.h"
#include "test_util.h"

/* bytes at the very end of a mapping followed by an inaccessible page */
typedef struct {
  char *map;
  size_t maplen;
  void *p;
} guarded_t;

static void guarded_alloc(guarded_t *g, size_t bytes) {
  const size_t pg = (size_t)sysconf(_SC_PAGESIZE), body = (bytes + pg - 1) / pg * pg;
  g->maplen = body + pg;
  g->map = mmap(NULL, g->maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (g->map == MAP_FAILED || mprotect(g->map + body, pg, PROT_NONE)) {
    perror("test_decode_guard: mmap / mprotect");
    exit(1);
  }
  g->p = g->map + body - bytes; /* the last byte of the rows is the last byte before the guard */
}

static void on_fault(int sig) {
  static const char msg[] = "# FAIL test_decode_guard: the decode read past the end of its bf16 k/v rows "
                            "(fault on the guard page)\n";
  (void)sig;
  if (write(2, msg, sizeof msg - 1) < 0) _exit(1);
  _exit(1);
}

static float rnd(uint64_t *s) { return (float)(2.0 * tu_rand01(s) - 1.0); }

/* One decode: H query heads over G kv heads of D, S cached tokens, T queries (causal). Returns
 * the largest error against the float64 reference, scaled like tu_err (max |v|). */
static double one(da_context_t *ctx, uint64_t *rs, int H, int G, int D, int64_t S, int64_t T) {
  const size_t krow = (size_t)G * D, qrow = (size_t)H * D;
  guarded_t gk, gv;
  guarded_alloc(&gk, (size_t)S * krow * 2);
  guarded_alloc(&gv, (size_t)S * krow * 2);
  uint16_t *k = gk.p, *v = gv.p, *q = malloc((size_t)T * qrow * 2), *out = malloc((size_t)T * qrow * 2);
  float *lse = malloc((size_t)T * H * sizeof(float));
  double *rk = malloc((size_t)S * krow * sizeof(double)), *rv = malloc((size_t)S * krow * sizeof(double));
  double *rq = malloc((size_t)T * qrow * sizeof(double)), *ro = malloc((size_t)T * qrow * sizeof(double));
  double *rl = malloc((size_t)T * H * sizeof(double));
  if (!q || !out || !lse || !rk || !rv || !rq || !ro || !rl) exit(1);
  for (size_t i = 0; i < (size_t)S * krow; i++) {
    k[i] = da_f32_to_bf16(rnd(rs)), v[i] = da_f32_to_bf16(rnd(rs));
    rk[i] = da_bf16_to_f32(k[i]), rv[i] = da_bf16_to_f32(v[i]);
  }
  for (size_t i = 0; i < (size_t)T * qrow; i++) q[i] = da_f32_to_bf16(rnd(rs)), rq[i] = da_bf16_to_f32(q[i]);
  for (size_t i = 0; i < (size_t)T * qrow; i++) out[i] = 0x7fc1; /* poisoned: a NaN the decode must overwrite */
  for (int64_t i = 0; i < T * H; i++) lse[i] = NAN;

  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = S, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = DA_BFLOAT16, prob.mask = DA_MASK_CAUSAL;
  da_tensor_t tq, tk, tv, to, tl;
  da_tensor_make(&tq, q, DA_BFLOAT16, 3, (int64_t[]){T, H, D});
  da_tensor_make(&tk, k, DA_BFLOAT16, 3, (int64_t[]){S, G, D});
  da_tensor_make(&tv, v, DA_BFLOAT16, 3, (int64_t[]){S, G, D});
  da_tensor_make(&to, out, DA_BFLOAT16, 3, (int64_t[]){T, H, D});
  da_tensor_make(&tl, lse, DA_FLOAT32, 2, (int64_t[]){T, H});
  da_status_t st = da_attention_decode(ctx, &prob, &tq, &tk, &tv, &to, &tl, NULL);
  if (st != DA_SUCCESS) {
    fprintf(stderr, "# FAIL test_decode_guard: da_attention_decode: %s: %s\n", da_status_string(st), da_last_error(ctx));
    exit(1);
  }
  da_kparams_t kp = {.H = H, .G = G, .D = D, .scale = (float)(1.0 / sqrt((double)D)), .dtype = DA_BFLOAT16,
                     .mask = {DA_MASK_CAUSAL, 0, 0, NULL}};
  if (da_ref_fwd(&kp, rq, da_span(S - T, 1, T), rk, rv, da_span(0, 1, S), ro, rl) != DA_SUCCESS) exit(1);
  double err = 0, scale = 1e-6;
  for (size_t i = 0; i < (size_t)T * qrow; i++) scale = fmax(scale, fabs(ro[i]));
  for (size_t i = 0; i < (size_t)T * qrow; i++) {
    const double o = da_bf16_to_f32(out[i]);
    err = isfinite(o) ? fmax(err, fabs(o - ro[i]) / scale) : INFINITY;
  }
  for (int64_t i = 0; i < T * H; i++) err = isfinite(lse[i]) ? fmax(err, fabs(lse[i] - rl[i]) / fmax(1.0, fabs(rl[i]))) : INFINITY;
  munmap(gk.map, gk.maplen), munmap(gv.map, gv.maplen);
  free(q), free(out), free(lse), free(rk), free(rv), free(rq), free(ro), free(rl);
  return err;
}

int main(void) {
  setenv("DISTATTN_CPU_ISA", "generic", 1); /* before the first kernel call picks the level */
  signal(SIGSEGV, on_fault);
  signal(SIGBUS, on_fault);
  const char *e = getenv("DISTATTN_TEST_SEED");
  const uint64_t seed = e && *e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL) * 1000003ull + (uint64_t)getpid();
  uint64_t rs = seed;
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = 1;
  da_context_t *ctx = NULL;
  if (da_context_create(&cfg, &ctx) != DA_SUCCESS) {
    fprintf(stderr, "# FAIL test_decode_guard: context: %s\n", da_last_error(NULL));
    return 1;
  }
  /* 4:1 GQA (the grouped path at W = 4), also 8:1 and 4:1 over two kv heads; the shipped bf16
   * head dims 64 and 128 (the in-place bf16 path) and 16 (the converting one); odd and even S. */
  static const int shapes[][3] = {{4, 1, 64}, {4, 1, 128}, {8, 1, 64}, {8, 2, 128}, {4, 1, 16}};
  int fails = 0, n = 0;
  for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++)
    for (int rep = 0; rep < 3; rep++) {
      const int H = shapes[c][0], G = shapes[c][1], D = shapes[c][2];
      const int64_t S = tu_rand(&rs, 1, 700) | (rep == 1), T = S >= 2 ? tu_rand(&rs, 1, 2) : 1;
      const double err = one(ctx, &rs, H, G, D, S, T);
      n++;
      if (!(err <= tu_tol(DA_BFLOAT16))) {
        fails++;
        fprintf(stderr, "# FAIL H %d G %d D %d S %lld T %lld: error %.3g against the float64 reference (tolerance %g)\n",
                H, G, D, (long long)S, (long long)T, err, tu_tol(DA_BFLOAT16));
      }
    }
  da_context_free(ctx);
  printf("# test_decode_guard (generic level, DISTATTN_TEST_SEED=%llu): %d decodes, %d wrong -> %s\n",
         (unsigned long long)seed, n, fails, fails ? "FAIL" : "PASS");
  return fails ? 1 : 0;
}
