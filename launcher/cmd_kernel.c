/* cmd_kernel.c: `distattn kernel`, the single-rank benchmark of the CPU kernels. Times forward
 * (one fwd_block over the whole sequence + fwd_finish), backward (bwd_prep + one bwd_block) and
 * decode (the last query rows against the whole cache as pages), reports each against a baseline
 * measured in the same process with the same threads (OpenBLAS sgemm of the same shape; a
 * streaming read of the same bytes), and verifies sampled rows against float64. Not a test: the
 * speed figures are never pass/fail, only the verification is. */
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include "args.h"
#include "core.h"
#include "dtype.h"
#include "kernels.h"
#include "launcher.h"
#include "mask.h"
#include "paths.h"
#include "report.h"
#include "rng.h"
#ifdef DISTATTN_HAVE_OPENBLAS
#include <cblas.h>
#endif

enum { OP_FWD = 0, OP_BWD = 1, OP_DECODE = 2, NOPS = 3 };
static const char *const op_names[] = {"fwd", "bwd", "decode", NULL};
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};

/* Above this many float64 multiply-adds the backward's dk/dv check would need a float64 forward
 * of (nearly) every query row, which takes longer than the benchmark; it then uses the kernel's
 * own lse and delta for those rows instead (said in the header). dq and the forward are always
 * checked against a full float64 recomputation. */
#define REF_BUDGET_FLOPS 6e10

typedef struct op_result {
  int ran;
  double time_s;     /* median over iters */
  double rate;       /* GFLOP/s (fwd, bwd) or GB/s (decode) */
  double base;       /* sgemm GFLOP/s or streaming-read GB/s; NAN when not measured */
  double ratio;      /* rate / base */
  int64_t pairs;     /* allowed (q, k) pairs */
  double bytes;      /* decode: KV bytes read */
  int64_t verify_rows;
  double max_abs, max_rel;
  int64_t wrong;
} op_result_t;

enum { KBENCH_NOPTS = 18 }; /* options of `distattn kernel`, with the table's end mark */

typedef struct kbench {
  /* options */
  int64_t seq, heads, kv_heads, dim, threads, block_q, block_k, iters, warmup, seed, verify;
  int64_t decode_q, page;
  int dtype;
  unsigned ops;
  da_mask_spec_t mask;
  const char *json;
  /* derived */
  int H, G, D, T;
  int64_t S;
  size_t esz;
  da_kparams_t p;
  const da_kernels_t *kt;
  void *q, *k, *v, *dout, *out;
  float *lse, *delta;
  float *dq, *dk, *dv;
  float *dec_o, *dec_lse;
  double tol;
  char maskdesc[256];
  const char *blas_core;
  int dkdv_fallback;
  op_result_t res[NOPS];
  da_opt_t opts[KBENCH_NOPTS]; /* the command line's table, and the command for the header */
  da_cmdspec_t cmd;
  /* float64 reference of the sampled rows (shared by fwd and bwd checks) */
  int64_t nrows, *rows; /* sampled query positions (sorted) */
  double *out64, *lse64;
} kbench_t;

/* ------------------------------------------------------------------------------------------------
 * OpenBLAS core type. OpenBLAS (DYNAMIC_ARCH) chooses its kernels in a library constructor, before
 * main, and on AMD EPYC picks the AVX2 (Haswell/Zen) path although its AVX-512 SkylakeX kernels
 * run there about 2x faster. A ratio against a slow sgemm flatters the attention kernel, so when
 * the user has not chosen a core and the CPU has AVX-512, set OPENBLAS_CORETYPE=SkylakeX and
 * re-exec this program once, before anything is printed. */
#ifdef DISTATTN_HAVE_OPENBLAS
static const char *blas_core_note = "default choice";
#endif

static void blas_coretype_reexec(int argc, char **argv) {
#ifdef DISTATTN_HAVE_OPENBLAS
  if (getenv("DISTATTN_BLAS_REEXEC")) { /* we are the re-executed child */
    blas_core_note = "OPENBLAS_CORETYPE=SkylakeX set by distattn";
    unsetenv("DISTATTN_BLAS_REEXEC");
    return;
  }
  const char *env = getenv("OPENBLAS_CORETYPE");
  if (env && *env) {
    blas_core_note = "OPENBLAS_CORETYPE from the environment";
    return;
  }
  const char *core = openblas_get_corename();
  if (core && (!strcasecmp(core, "skylakex") || !strcasecmp(core, "cooperlake") ||
               !strcasecmp(core, "sapphirerapids")))
    return; /* already on an AVX-512 path */
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")))
    return; /* SkylakeX kernels would fault here */
  char **nargv = calloc((size_t)argc + 2, sizeof *nargv);
  static char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (!nargv || n <= 0) {
    free(nargv);
    return;
  }
  exe[n] = '\0';
  nargv[0] = exe;
  for (int i = 0; i < argc; i++) nargv[i + 1] = argv[i]; /* argv[0] is "kernel" */
  setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
  setenv("DISTATTN_BLAS_REEXEC", "1", 1);
  fflush(NULL);
  execv(exe, nargv);
  /* exec failed: carry on with OpenBLAS's own choice, and say so */
  DA_WARN(DA_SUB_INIT, "re-exec with OPENBLAS_CORETYPE=SkylakeX failed; sgemm baseline uses %s", core);
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv("DISTATTN_BLAS_REEXEC");
  free(nargv);
#else
  (void)argc;
  (void)argv;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * helpers */

static int cmp_dbl(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *t, int64_t n) {
  qsort(t, (size_t)n, sizeof *t, cmp_dbl);
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static int kfail(const char *what, da_status_t st) {
  if (st == DA_ERR_UNSUPPORTED) {
    fprintf(stderr, "distattn kernel: not supported: %s: %s\n", what, da_error_message());
    return 2;
  }
  fprintf(stderr, "distattn kernel: %s failed: %s: %s\n", what, da_status_string(st), da_error_message());
  return 1;
}

/* Seeded input tensor [S][heads][D] in the storage dtype: element (pos, head, d) of tensor id,
 * rounded once to the dtype, so the float64 reference reads exactly what the kernel reads. */
static void fill(const kbench_t *b, void *x, uint32_t id, int heads) {
  const int D = b->D, dt = b->dtype;
#pragma omp parallel num_threads(b->T)
  {
    float *row = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
    for (int64_t s = 0; s < b->S; s++)
      for (int h = 0; h < heads; h++) {
        da_rng_row((uint64_t)b->seed, id, s, h, D, row);
        for (int d = 0; d < D; d++) da_store_f32(x, dt, (s * heads + h) * D + d, row[d]);
      }
    free(row);
  }
}

enum { SALT_QUERY_ROWS = 3, SALT_KEY_ROWS = 7 }; /* the two samples: query rows, key rows */

/* Stratified sample of n distinct rows of [0, S): one per stratum, seeded (salt: which sample). */
static void sample_rows(int64_t S, int64_t n, uint64_t seed, uint32_t salt, int64_t *rows) {
  for (int64_t i = 0; i < n; i++) {
    int64_t lo = i * S / n, hi = (i + 1) * S / n;
    double u = 0.5 * (da_rng_uniform(seed, DA_RNG_USER + salt, i, 0, 0) + 1.0f);
    int64_t r = lo + (int64_t)(u * (double)(hi - lo));
    rows[i] = r < hi ? r : hi - 1;
  }
}

/* ------------------------------------------------------------------------------------------------
 * float64 reference of selected rows. Keys of one KV head are converted to double once and
 * streamed per query row over its visible interval (every mask is one interval per row), so the
 * cost is O(rows * visible * D) and memory O(S * D). Cloned per ISA so the dot products vectorize
 * on whatever machine runs the benchmark. */

__attribute__((target_clones("avx512f", "avx2", "default")))
static void ref_scores(const double *q, const double *K, int64_t n, int D, double scale, double *s) {
  for (int64_t j = 0; j < n; j++) {
    const double *kj = K + j * D;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < D; d++) acc += q[d] * kj[d];
    s[j] = scale * acc;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void ref_pv(const double *pj, const double *V, int64_t n, int D, double *o) {
  for (int d = 0; d < D; d++) o[d] = 0;
  for (int64_t j = 0; j < n; j++) {
    const double *vj = V + j * D;
    double w = pj[j];
#pragma omp simd
    for (int d = 0; d < D; d++) o[d] += w * vj[d];
  }
}

/* One KV head g of the whole sequence as double [S][D]. */
static double *kv_head_f64(const kbench_t *b, const void *x, int g) {
  double *y = malloc((size_t)b->S * b->D * sizeof(double));
  if (!y) return NULL;
#pragma omp parallel for num_threads(b->T) schedule(static)
  for (int64_t s = 0; s < b->S; s++)
    for (int d = 0; d < b->D; d++) y[s * b->D + d] = da_load_f32(x, b->dtype, (s * b->G + g) * b->D + d);
  return y;
}

#ifdef DISTATTN_HAVE_OPENBLAS
/* The same float64 forward as ref_rows_fwd below, by blocks of query rows through dgemm: the
 * backward check needs it for (nearly) every row, and a float64 GEMM keeps that to a fraction of
 * a second at S = 4K. Rows of a block share the union of their key intervals; entries outside a
 * row's own interval are masked before the softmax. */
static int ref_rows_fwd_blas(const kbench_t *b, const int64_t *pos, int64_t n, double *out, double *lse) {
  const int H = b->H, G = b->G, D = b->D, rep = H / G;
  const int64_t S = b->S;
  const double scale = (double)b->p.scale;
  int64_t RB = (int64_t)((8LL << 20) / S); /* the score block RB x S doubles stays <= 64 MiB */
  if (RB > 64) RB = 64;
  if (RB < 1) RB = 1;
  double *Qd = malloc((size_t)(RB * D) * sizeof(double)), *Sm = malloc((size_t)(RB * S) * sizeof(double));
  double *Ob = malloc((size_t)(RB * D) * sizeof(double)), *lsum = malloc((size_t)RB * sizeof(double));
  int64_t *lo = malloc((size_t)RB * sizeof(int64_t)), *hi = malloc((size_t)RB * sizeof(int64_t));
  int rc = -1;
  if (!Qd || !Sm || !Ob || !lsum || !lo || !hi) goto done;
  openblas_set_num_threads(b->T);
  for (int g = 0; g < G; g++) {
    double *K = kv_head_f64(b, b->k, g), *V = kv_head_f64(b, b->v, g);
    if (!K || !V) {
      free(K);
      free(V);
      goto done;
    }
    for (int hh = 0; hh < rep; hh++) {
      int h = g * rep + hh;
      for (int64_t i0 = 0; i0 < n; i0 += RB) {
        int64_t nb = n - i0 < RB ? n - i0 : RB, klo = S, khi = -1;
        for (int64_t r = 0; r < nb; r++) {
          da_mask_row_range(&b->p.mask, pos[i0 + r], 0, S - 1, &lo[r], &hi[r]);
          if (lo[r] <= hi[r]) {
            klo = lo[r] < klo ? lo[r] : klo;
            khi = hi[r] > khi ? hi[r] : khi;
          }
          for (int d = 0; d < D; d++) Qd[r * D + d] = da_load_f32(b->q, b->dtype, (pos[i0 + r] * H + h) * D + d);
        }
        int64_t cnt = khi >= klo ? khi - klo + 1 : 0;
        if (cnt)
          cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)cnt, D, scale, Qd, D, K + klo * D, D,
                      0.0, Sm, (int)cnt);
#pragma omp parallel for num_threads(b->T) schedule(static)
        for (int64_t r = 0; r < nb; r++) {
          double *s = Sm + r * cnt, m = -INFINITY, l = 0;
          int64_t a = lo[r] - klo, e = hi[r] - klo; /* the row's own interval inside the block */
          for (int64_t j = a; j <= e; j++) m = s[j] > m ? s[j] : m;
          for (int64_t j = 0; j < cnt; j++) {
            double pj = (j >= a && j <= e) ? exp(s[j] - m) : 0.0;
            s[j] = pj;
            l += pj;
          }
          lsum[r] = l;
          lse[(i0 + r) * H + h] = l > 0 ? m + log(l) : -INFINITY;
        }
        if (cnt)
          cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nb, D, (int)cnt, 1.0, Sm, (int)cnt,
                      V + klo * D, D, 0.0, Ob, D);
        for (int64_t r = 0; r < nb; r++)
          for (int d = 0; d < D; d++)
            out[((i0 + r) * H + h) * D + d] = lsum[r] > 0 && cnt ? Ob[r * D + d] / lsum[r] : 0.0;
      }
    }
    free(K);
    free(V);
  }
  rc = 0;
done:
  free(Qd), free(Sm), free(Ob), free(lsum), free(lo), free(hi);
  return rc;
}
#endif

/* Query rows pos[0..n) (positions of the q tensor): out [n][H][D] and lse [n][H] in float64. */
static int ref_rows_fwd(const kbench_t *b, const int64_t *pos, int64_t n, double *out, double *lse) {
#ifdef DISTATTN_HAVE_OPENBLAS
  if (n >= 64) return ref_rows_fwd_blas(b, pos, n, out, lse);
#endif
  const int H = b->H, G = b->G, D = b->D, rep = H / G;
  const double scale = (double)b->p.scale;
  for (int g = 0; g < G; g++) {
    double *K = kv_head_f64(b, b->k, g), *V = kv_head_f64(b, b->v, g);
    if (!K || !V) {
      free(K);
      free(V);
      return -1;
    }
#pragma omp parallel num_threads(b->T)
    {
      double *s = malloc((size_t)b->S * sizeof(double)), *qd = malloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t i = 0; i < n; i++)
        for (int hh = 0; hh < rep; hh++) {
          int h = g * rep + hh;
          double *o = out + (i * H + h) * D;
          int64_t lo, hi;
          da_mask_row_range(&b->p.mask, pos[i], 0, b->S - 1, &lo, &hi);
          if (lo > hi) {
            for (int d = 0; d < D; d++) o[d] = 0;
            lse[i * H + h] = -INFINITY;
            continue;
          }
          for (int d = 0; d < D; d++) qd[d] = da_load_f32(b->q, b->dtype, (pos[i] * H + h) * D + d);
          int64_t cnt = hi - lo + 1;
          ref_scores(qd, K + lo * D, cnt, D, scale, s);
          double m = -INFINITY, l = 0;
          for (int64_t j = 0; j < cnt; j++) m = s[j] > m ? s[j] : m;
          for (int64_t j = 0; j < cnt; j++) l += (s[j] = exp(s[j] - m));
          ref_pv(s, V + lo * D, cnt, D, o);
          for (int d = 0; d < D; d++) o[d] /= l;
          lse[i * H + h] = m + log(l);
        }
      free(s);
      free(qd);
    }
    free(K);
    free(V);
  }
  return 0;
}

/* Error of one vector x (n values read by get) against ref: absolute max, and relative to the
 * vector's own scale max(max|ref|, 1e-6) (docs/decisions.md: a per-row scale, so components near
 * zero do not inflate it). NaN anywhere counts as an infinite error. */
typedef struct err_acc {
  double max_abs, max_rel;
  int64_t wrong, checked;
} err_acc_t;

static double vec_err(const double *ref, const float *x, int n, double *abs_out) {
  double scale = 1e-6, e = 0;
  for (int d = 0; d < n; d++) scale = fabs(ref[d]) > scale ? fabs(ref[d]) : scale;
  for (int d = 0; d < n; d++) {
    double a = fabs((double)x[d] - ref[d]);
    if (!(a <= e)) e = isnan(a) ? INFINITY : a;
  }
  *abs_out = e;
  return e / scale;
}

static void acc_add(err_acc_t *a, double abs_e, double rel_e, double tol) {
  a->checked++;
  if (abs_e > a->max_abs || isnan(abs_e)) a->max_abs = isnan(abs_e) ? INFINITY : abs_e;
  if (rel_e > a->max_rel || isnan(rel_e)) a->max_rel = isnan(rel_e) ? INFINITY : rel_e;
  if (!(rel_e <= tol)) a->wrong++;
}

/* lse error: |lse - ref| / max(|ref|, 1); both -inf (no visible key) is exact. */
static double lse_err(double ref, float x, double *abs_out) {
  if (isinf(ref) && ref < 0) {
    *abs_out = (isinf(x) && x < 0) ? 0 : INFINITY;
    return *abs_out;
  }
  double a = fabs((double)x - ref);
  *abs_out = isnan(a) ? INFINITY : a;
  return *abs_out / (fabs(ref) > 1 ? fabs(ref) : 1);
}

/* Forward check: sampled rows of out (dtype) and lse against out64/lse64. One verdict per
 * (row, head): wrong when the row's out or its lse is off by more than the tolerance. */
static void verify_fwd(kbench_t *b, op_result_t *r) {
  const int H = b->H, D = b->D;
  err_acc_t a = {0};
  float *x = malloc((size_t)D * sizeof(float));
  for (int64_t i = 0; i < b->nrows; i++)
    for (int h = 0; h < H; h++) {
      int64_t base = (b->rows[i] * H + h) * D;
      for (int d = 0; d < D; d++) x[d] = da_load_f32(b->out, b->dtype, base + d);
      double ao, al;
      double ro = vec_err(b->out64 + (i * H + h) * D, x, D, &ao);
      double rl = lse_err(b->lse64[i * H + h], b->lse[b->rows[i] * H + h], &al);
      acc_add(&a, ao > al ? ao : al, ro > rl ? ro : rl, b->tol);
    }
  free(x);
  r->verify_rows = b->nrows;
  r->max_abs = a.max_abs;
  r->max_rel = a.max_rel;
  r->wrong = a.wrong;
}

/* delta = rowsum(dout * out) in float64 of the sampled query rows (out from the float64 forward). */
static void delta_rows64(const kbench_t *b, double *delta64) {
  const int H = b->H, D = b->D;
  for (int64_t i = 0; i < b->nrows; i++)
    for (int h = 0; h < H; h++) {
      double s = 0;
      for (int d = 0; d < D; d++)
        s += (double)da_load_f32(b->dout, b->dtype, (b->rows[i] * H + h) * D + d) * b->out64[(i * H + h) * D + d];
      delta64[i * H + h] = s;
    }
}

/* The checks run on at most this many threads, each with its own accumulator, folded after. */
enum { MAX_CHECK_THREADS = 64 };

static void acc_merge(err_acc_t *a, const err_acc_t *part, int nt) {
  for (int t = 0; t < nt; t++) {
    a->checked += part[t].checked;
    a->wrong += part[t].wrong;
    if (part[t].max_abs > a->max_abs) a->max_abs = part[t].max_abs;
    if (part[t].max_rel > a->max_rel) a->max_rel = part[t].max_rel;
  }
}

/* Per-thread scratch rows of D doubles. */
typedef struct ref_scratch {
  double *kd, *vd, *qd, *dod, *rk, *rv;
} ref_scratch_t;

static void scratch_alloc(ref_scratch_t *s, int D) {
  const size_t n = (size_t)D * sizeof(double);
  s->kd = malloc(n), s->vd = malloc(n), s->qd = malloc(n), s->dod = malloc(n), s->rk = malloc(n), s->rv = malloc(n);
}

static void scratch_free(ref_scratch_t *s) {
  free(s->kd), free(s->vd), free(s->qd), free(s->dod), free(s->rk), free(s->rv);
}

/* The kernel's row got (D floats) against its float64 reference ref, into a. */
static void acc_row(err_acc_t *a, const kbench_t *b, const double *ref, const float *got) {
  double ae, re = vec_err(ref, got, b->D, &ae);
  acc_add(a, ae, re, b->tol);
}

/* One check of a grid: cell (i, j) with this thread's scratch rows s, into this thread's a. */
typedef void (*check_cell_fn)(const kbench_t *b, const void *ctx, int64_t i, int j, ref_scratch_t *s, err_acc_t *a);

/* cell(i, j) for every i < n, j < m, spread over the check threads (each with its own scratch rows
 * and accumulator), folded into a after. */
static void check_grid(const kbench_t *b, int64_t n, int m, check_cell_fn cell, const void *ctx, err_acc_t *a) {
  err_acc_t part[MAX_CHECK_THREADS] = {{0}};
  const int nt = b->T < MAX_CHECK_THREADS ? b->T : MAX_CHECK_THREADS;
#pragma omp parallel num_threads(nt)
  {
    ref_scratch_t s;
    scratch_alloc(&s, b->D);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t i = 0; i < n; i++)
      for (int j = 0; j < m; j++) cell(b, ctx, i, j, &s, &part[omp_get_thread_num()]);
    scratch_free(&s);
  }
  acc_merge(a, part, nt);
}

/* float64 dq of query row qp, head h, into s->rk: the sum over its visible keys j of
 * scale * p_ij * (dp_ij - delta) * k_j, with K, V the KV head's rows in float64, L its lse and dl its delta. */
static void dq_ref_row(const kbench_t *b, const double *K, const double *V, int64_t qp, int h, double L, double dl,
                       ref_scratch_t *s) {
  const int H = b->H, D = b->D;
  const double scale = (double)b->p.scale;
  for (int d = 0; d < D; d++) {
    s->qd[d] = da_load_f32(b->q, b->dtype, (qp * H + h) * D + d);
    s->dod[d] = da_load_f32(b->dout, b->dtype, (qp * H + h) * D + d);
    s->rk[d] = 0;
  }
  int64_t lo, hi;
  da_mask_row_range(&b->p.mask, qp, 0, b->S - 1, &lo, &hi);
  for (int64_t j = lo; L > -INFINITY && j <= hi; j++) {
    const double *kj = K + j * D, *vj = V + j * D;
    double sc = 0, dp = 0;
    for (int d = 0; d < D; d++) sc += s->qd[d] * kj[d], dp += s->dod[d] * vj[d];
    double ds = exp(scale * sc - L) * (dp - dl);
    for (int d = 0; d < D; d++) s->rk[d] += scale * ds * kj[d];
  }
}

/* What a dq check cell reads: KV head g in float64 and the sampled rows' delta. */
typedef struct dq_cells {
  const double *K, *V, *delta64;
  int g;
} dq_cells_t;

/* Sampled query row i, head hh of KV head c->g: dq against its float64 sum. */
static void dq_cell(const kbench_t *b, const void *ctx, int64_t i, int hh, ref_scratch_t *s, err_acc_t *a) {
  const dq_cells_t *c = ctx;
  const int H = b->H, D = b->D, h = c->g * (H / b->G) + hh;
  const int64_t qp = b->rows[i];
  dq_ref_row(b, c->K, c->V, qp, h, b->lse64[i * H + h], c->delta64[i * H + h], s);
  acc_row(a, b, s->rk, b->dq + (qp * H + h) * D);
}

/* dq of the sampled query rows against float64 built from lse64 / delta64 of those rows, into a.
 * -1 when out of memory. */
static int verify_dq(const kbench_t *b, const double *delta64, err_acc_t *a) {
  for (int g = 0; g < b->G; g++) {
    double *K = kv_head_f64(b, b->k, g), *V = kv_head_f64(b, b->v, g);
    if (!K || !V) {
      free(K), free(V);
      return -1;
    }
    const dq_cells_t c = {.K = K, .V = V, .delta64 = delta64, .g = g};
    check_grid(b, b->nrows, b->H / b->G, dq_cell, &c, a);
    free(K), free(V);
  }
  return 0;
}

/* The query rows whose dk / dv contributions the check sums: those that see any sampled key. */
typedef struct qrows {
  int64_t *need, n;    /* query positions, ascending */
  double *lse, *delta; /* [n][H]: their lse and delta */
} qrows_t;

/* The query rows that see at least one sampled key (krows, sorted) into q->need; returns the
 * float64 multiply-adds of their forward. */
static double dkdv_query_rows(const kbench_t *b, const int64_t *krows, qrows_t *q) {
  const int64_t S = b->S, n = b->nrows;
  double work = 0;
  q->n = 0;
  for (int64_t i = 0; i < S; i++) {
    int64_t lo, hi;
    da_mask_row_range(&b->p.mask, i, 0, S - 1, &lo, &hi);
    if (lo > hi) continue;
    /* first sampled key >= lo (krows sorted) */
    int64_t l = 0, u = n;
    while (l < u) {
      int64_t m = (l + u) / 2;
      if (krows[m] < lo) l = m + 1;
      else u = m;
    }
    if (l < n && krows[l] <= hi) {
      q->need[q->n++] = i;
      work += 4.0 * (double)(hi - lo + 1) * b->H * b->D;
    }
  }
  return work;
}

/* lse and delta of the query rows q in float64 (their float64 forward), or past REF_BUDGET_FLOPS
 * of work the kernel's lse and a delta from the kernel's out (b->dkdv_fallback). -1 out of memory. */
static int dkdv_lse_delta(kbench_t *b, qrows_t *q, double work) {
  const int H = b->H, D = b->D;
  double *nout = NULL;
  b->dkdv_fallback = work > REF_BUDGET_FLOPS;
  const double t0 = da_time_now();
  if (!b->dkdv_fallback) {
    nout = malloc((size_t)(q->n ? q->n : 1) * H * D * sizeof(double));
    if (!nout || ref_rows_fwd(b, q->need, q->n, nout, q->lse)) {
      free(nout);
      return -1;
    }
  }
  DA_INFO(DA_SUB_KERNEL, "verify bwd: float64 forward of %lld rows (%.2g flops) took %.2f s", (long long)q->n, work,
          da_time_now() - t0);
  for (int64_t t = 0; t < q->n; t++)
    for (int h = 0; h < H; h++) {
      int64_t i = q->need[t];
      double s = 0;
      for (int d = 0; d < D; d++) {
        double o = b->dkdv_fallback ? da_load_f32(b->out, b->dtype, (i * H + h) * D + d) : nout[(t * H + h) * D + d];
        s += (double)da_load_f32(b->dout, b->dtype, (i * H + h) * D + d) * o;
      }
      q->delta[t * H + h] = s;
      if (b->dkdv_fallback) q->lse[t * H + h] = b->lse[i * H + h];
    }
  free(nout);
  return 0;
}

/* float64 dk, dv of key row kp of KV head g into s->rk, s->rv: sums over the query rows q that
 * see it, every query head of the group. */
static void dkdv_ref_row(const kbench_t *b, const qrows_t *q, int64_t kp, int g, ref_scratch_t *s) {
  const int H = b->H, G = b->G, D = b->D, rep = H / G;
  const double scale = (double)b->p.scale;
  for (int d = 0; d < D; d++) {
    s->kd[d] = da_load_f32(b->k, b->dtype, (kp * G + g) * D + d);
    s->vd[d] = da_load_f32(b->v, b->dtype, (kp * G + g) * D + d);
    s->rk[d] = s->rv[d] = 0;
  }
  for (int64_t t = 0; t < q->n; t++) {
    int64_t i = q->need[t], lo, hi;
    da_mask_row_range(&b->p.mask, i, 0, b->S - 1, &lo, &hi);
    if (kp < lo || kp > hi) continue;
    for (int hh = 0; hh < rep; hh++) {
      int h = g * rep + hh;
      double L = q->lse[t * H + h];
      if (!(L > -INFINITY)) continue;
      double sc = 0, dp = 0;
      for (int d = 0; d < D; d++) {
        s->qd[d] = da_load_f32(b->q, b->dtype, (i * H + h) * D + d);
        s->dod[d] = da_load_f32(b->dout, b->dtype, (i * H + h) * D + d);
        sc += s->qd[d] * s->kd[d];
        dp += s->dod[d] * s->vd[d];
      }
      double pij = exp(scale * sc - L), ds = pij * (dp - q->delta[t * H + h]);
      for (int d = 0; d < D; d++) {
        s->rk[d] += scale * ds * s->qd[d];
        s->rv[d] += pij * s->dod[d];
      }
    }
  }
}

/* dk and dv of the sampled key rows krows, every KV head, against their float64 sums, into a. */
typedef struct dkdv_cells {
  const qrows_t *q;
  const int64_t *krows;
} dkdv_cells_t;

/* Sampled key row jj, KV head g: dk and dv against their float64 sums. */
static void dkdv_cell(const kbench_t *b, const void *ctx, int64_t jj, int g, ref_scratch_t *s, err_acc_t *a) {
  const dkdv_cells_t *c = ctx;
  const int64_t kp = c->krows[jj], at = (kp * b->G + g) * b->D;
  dkdv_ref_row(b, c->q, kp, g, s);
  acc_row(a, b, s->rk, b->dk + at);
  acc_row(a, b, s->rv, b->dv + at);
}

static void dkdv_check(const kbench_t *b, const qrows_t *q, const int64_t *krows, err_acc_t *a) {
  const dkdv_cells_t c = {.q = q, .krows = krows};
  check_grid(b, b->nrows, b->G, dkdv_cell, &c, a);
}

/* dk and dv of the sampled key rows krows against float64 sums over every query row that sees
 * them, with those rows' lse and delta in float64 too (or the kernel's, past REF_BUDGET_FLOPS),
 * into a. -1 when out of memory. */
static int verify_dkdv(kbench_t *b, const int64_t *krows, err_acc_t *a) {
  qrows_t q = {.need = malloc((size_t)b->S * sizeof(int64_t))};
  if (!q.need) return -1;
  const double work = dkdv_query_rows(b, krows, &q);
  q.lse = malloc((size_t)(q.n ? q.n : 1) * b->H * sizeof(double));
  q.delta = malloc((size_t)(q.n ? q.n : 1) * b->H * sizeof(double));
  int rc = q.lse && q.delta ? dkdv_lse_delta(b, &q, work) : -1;
  if (rc == 0) {
    const double t0 = da_time_now();
    dkdv_check(b, &q, krows, a);
    DA_INFO(DA_SUB_KERNEL, "verify bwd: dk/dv of %lld key rows took %.2f s", (long long)b->nrows, da_time_now() - t0);
  }
  free(q.need), free(q.lse), free(q.delta);
  return rc;
}

/* Backward check. dq of the sampled query rows against float64 dq built from lse64/delta64 of
 * those rows; dk and dv of sampled key rows against float64 sums over every query row that sees
 * them, with lse/delta of those rows in float64 too (or the kernel's, past REF_BUDGET_FLOPS). */
static int verify_bwd(kbench_t *b, op_result_t *r) {
  const int64_t n = b->nrows;
  err_acc_t a = {0};
  int rc = -1;
  double *delta64 = malloc((size_t)n * b->H * sizeof(double));
  int64_t *krows = malloc((size_t)n * sizeof(int64_t));
  if (delta64 && krows) {
    delta_rows64(b, delta64);
    sample_rows(b->S, n, (uint64_t)b->seed, SALT_KEY_ROWS, krows);
    if (verify_dq(b, delta64, &a) == 0 && verify_dkdv(b, krows, &a) == 0) rc = 0;
  }
  if (rc) fprintf(stderr, "distattn kernel: out of memory in the backward verification\n");
  else {
    r->verify_rows = n;
    r->max_abs = a.max_abs;
    r->max_rel = a.max_rel;
    r->wrong = a.wrong;
  }
  free(delta64);
  free(krows);
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * baselines */

#define IDLE_US 50000 /* a pause before each baseline: the kernels' worker threads go idle */

/* Sum of a buffer as 64-bit words, T threads, each a contiguous part: the fastest plain read the
 * machine does, to which the decode kernel's KV read rate is compared. Integer adds vectorize
 * without reassociation concerns. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static uint64_t stream_sum(const uint64_t *x, int64_t n) {
  uint64_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += x[i];
  return s;
}

static volatile uint64_t sink;

static double stream_read_once(const uint64_t *x, int64_t n, int T) {
  uint64_t total = 0;
  double t0 = da_time_now();
#pragma omp parallel num_threads(T) reduction(+ : total)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    total += stream_sum(x + lo, hi - lo);
  }
  double dt = da_time_now() - t0;
  sink += total;
  return dt;
}

/* A buffer of twice the last-level cache, read between timed decode/stream iterations so both
 * start from DRAM (a decode step in a model reads a KV cache that is not in cache). */
static uint64_t *flush_buf;
static int64_t flush_n;

static void cache_flush(int T) {
  if (!flush_buf) {
    long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (llc <= 0) llc = 64L << 20;
    flush_n = 2 * (int64_t)llc / 8;
    if (flush_n < (32L << 20) / 8) flush_n = (32L << 20) / 8;
    flush_buf = malloc((size_t)flush_n * 8);
    if (!flush_buf) return;
    for (int64_t i = 0; i < flush_n; i++) flush_buf[i] = (uint64_t)i;
  }
  stream_read_once(flush_buf, flush_n, T);
}

/* The read rate of a buffer of `bytes`, allocated as the decode's cache is (da_malloc: on huge
 * pages when the cache is), so that the ratio compares like with like. */
static double membw_gbps(const kbench_t *b, double bytes) {
  int64_t n = (int64_t)(bytes / 8) > 0 ? (int64_t)(bytes / 8) : 1;
  uint64_t *x = da_malloc((size_t)n * 8, 64);
  if (!x) return NAN;
  for (int64_t i = 0; i < n; i++) x[i] = (uint64_t)i * 2654435761u;
  double *t = malloc((size_t)(b->iters) * sizeof(double));
  for (int64_t it = 0; it < b->warmup + b->iters; it++) {
    cache_flush(b->T);
    double dt = stream_read_once(x, n, b->T);
    if (it >= b->warmup) t[it - b->warmup] = dt;
  }
  double med = median(t, b->iters);
  free(t);
  da_free(x);
  return (double)n * 8 / med * 1e-9;
}

/* Median times of the two sgemm shapes an attention head is made of, per head:
 *   t1: [S x D] . [D x S]  (scores),  t2: [S x S] . [S x D]  (probabilities times values).
 * For long sequences the S x S operand would not fit, so the first Mp rows are timed and the time
 * scaled by S / Mp (sgemm's rate is flat in M once M is in the thousands). */
static int sgemm_times(const kbench_t *b, double *t1, double *t2) {
#ifdef DISTATTN_HAVE_OPENBLAS
  const int64_t S = b->S, D = b->D;
  int64_t Mp = (int64_t)((64LL << 20) / S); /* S x Mp floats <= 256 MiB */
  if (Mp > S) Mp = S;
  if (Mp < 1) Mp = 1;
  float *A = malloc((size_t)(S * D) * 4), *B = malloc((size_t)(S * D) * 4);
  float *C = malloc((size_t)(Mp * S) * 4), *O = malloc((size_t)(Mp * D) * 4);
  double *ta = malloc((size_t)b->iters * sizeof(double)), *tb = malloc((size_t)b->iters * sizeof(double));
  if (!A || !B || !C || !O || !ta || !tb) {
    free(A), free(B), free(C), free(O), free(ta), free(tb);
    return -1;
  }
  for (int64_t i = 0; i < S * D; i++) A[i] = B[i] = (float)((i * 7919) % 2001 - 1000) * 1e-3f;
  for (int64_t i = 0; i < Mp * S; i++) C[i] = (float)((i * 104729) % 2001) * 1e-6f;
  openblas_set_num_threads(b->T);
  for (int64_t it = 0; it < b->warmup + b->iters; it++) {
    double t0 = da_time_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Mp, (int)S, (int)D, 1.0f, A, (int)D, B,
                (int)D, 0.0f, C, (int)S);
    double t1_ = da_time_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)Mp, (int)D, (int)S, 1.0f, C, (int)S, B,
                (int)D, 0.0f, O, (int)D);
    double t2_ = da_time_now();
    if (it >= b->warmup) {
      ta[it - b->warmup] = (t1_ - t0) * (double)S / (double)Mp;
      tb[it - b->warmup] = (t2_ - t1_) * (double)S / (double)Mp;
    }
  }
  *t1 = median(ta, b->iters);
  *t2 = median(tb, b->iters);
  free(A), free(B), free(C), free(O), free(ta), free(tb);
  return 0;
#else
  (void)b;
  *t1 = *t2 = NAN;
  return -1;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * the three operations */

static int run_fwd(kbench_t *b, int timed, op_result_t *r) {
  const int64_t S = b->S;
  da_fwd_state_t st = {0};
  st.nq = S;
  st.o = da_malloc((size_t)(S * b->H * b->D) * sizeof(float), 64);
  st.m = da_malloc((size_t)(S * b->H) * sizeof(float), 64);
  st.l = da_malloc((size_t)(S * b->H) * sizeof(float), 64);
  int64_t reps = timed ? b->warmup + b->iters : 1;
  double *t = malloc((size_t)reps * sizeof(double));
  int rc = 0;
  if (!st.o || !st.m || !st.l || !t) {
    fprintf(stderr, "distattn kernel: out of memory for the forward state (%lld rows)\n", (long long)S);
    rc = 1;
    goto done;
  }
  da_span_t all = da_span(0, 1, S);
  for (int64_t it = 0; it < reps; it++) {
    da_status_t s = da_fwd_state_init(b->kt, &b->p, &st, NULL); /* untimed: a memset */
    if (s) { rc = kfail("state_init", s); goto done; }
    double t0 = da_time_now();
    s = b->kt->fwd_block(&b->p, b->q, (int64_t)b->H * b->D, all, b->k, (int64_t)b->G * b->D, b->v,
                         (int64_t)b->G * b->D, all, &st, NULL);
    if (s) { rc = kfail("fwd_block", s); goto done; }
    s = b->kt->fwd_finish(&b->p, &st, b->out, b->p.dtype, (int64_t)b->H * b->D, b->lse, NULL);
    if (s) { rc = kfail("fwd_finish", s); goto done; }
    t[it] = da_time_now() - t0;
  }
  if (timed) {
    r->ran = 1;
    r->time_s = median(t + b->warmup, b->iters);
    r->pairs = da_mask_count_pairs(&b->p.mask, all, all);
    r->rate = 4.0 * b->H * b->D * (double)r->pairs / r->time_s * 1e-9;
  }
done:
  free(t);
  da_free(st.o);
  da_free(st.m);
  da_free(st.l);
  return rc;
}

static int run_bwd(kbench_t *b, op_result_t *r) {
  const int64_t S = b->S;
  size_t nq = (size_t)(S * b->H * b->D), nk = (size_t)(S * b->G * b->D);
  int64_t reps = b->warmup + b->iters;
  double *t = malloc((size_t)reps * sizeof(double));
  if (!t) return 1;
  da_span_t all = da_span(0, 1, S);
  int rc = 0;
  for (int64_t it = 0; it < reps; it++) {
    memset(b->dq, 0, nq * 4); /* untimed: bwd_block accumulates (+=) */
    memset(b->dk, 0, nk * 4);
    memset(b->dv, 0, nk * 4);
    double t0 = da_time_now();
    da_status_t s = b->kt->bwd_prep(&b->p, S, b->out, (int64_t)b->H * b->D, b->dout, (int64_t)b->H * b->D,
                                    b->delta, NULL);
    if (s) { rc = kfail("bwd_prep", s); break; }
    s = b->kt->bwd_block(&b->p, b->q, (int64_t)b->H * b->D, b->dout, (int64_t)b->H * b->D, b->lse, b->delta,
                         all, b->k, (int64_t)b->G * b->D, b->v, (int64_t)b->G * b->D, all, b->dq, b->dk,
                         b->dv, NULL);
    if (s) { rc = kfail("bwd_block", s); break; }
    t[it] = da_time_now() - t0;
  }
  if (!rc) {
    r->ran = 1;
    r->time_s = median(t + b->warmup, b->iters);
    r->pairs = da_mask_count_pairs(&b->p.mask, all, all);
    r->rate = 10.0 * b->H * b->D * (double)r->pairs / r->time_s * 1e-9;
  }
  free(t);
  return rc;
}

static int run_decode(kbench_t *b, op_result_t *r) {
  const int64_t S = b->S, T = b->decode_q, P = b->page;
  int npages = (int)((S + P - 1) / P);
  da_kvpage_t *pages = calloc((size_t)npages, sizeof *pages);
  int64_t reps = b->warmup + b->iters;
  double *t = malloc((size_t)reps * sizeof(double));
  if (!pages || !t) {
    free(pages);
    free(t);
    return 1;
  }
  const int64_t ldk = (int64_t)b->G * b->D;
  for (int i = 0; i < npages; i++) {
    int64_t s0 = (int64_t)i * P, cnt = S - s0 < P ? S - s0 : P;
    pages[i].k = (const char *)b->k + (size_t)(s0 * ldk) * b->esz;
    pages[i].v = (const char *)b->v + (size_t)(s0 * ldk) * b->esz;
    pages[i].ldk = pages[i].ldv = ldk;
    pages[i].pos = da_span(s0, 1, cnt);
  }
  /* Bytes the decode must read: keys visible to at least one of its query rows. */
  int64_t kmin = S, kmax = -1, visible = 0;
  char *seen = calloc((size_t)S, 1);
  for (int64_t i = S - T; seen && i < S; i++) {
    int64_t lo, hi;
    da_mask_row_range(&b->p.mask, i, 0, S - 1, &lo, &hi);
    for (int64_t j = lo; j <= hi; j++) visible += !seen[j], seen[j] = 1;
    if (lo <= hi) kmin = lo < kmin ? lo : kmin, kmax = hi > kmax ? hi : kmax;
  }
  free(seen);
  r->bytes = 2.0 * (double)visible * b->G * b->D * (double)b->esz;
  r->pairs = da_mask_count_pairs(&b->p.mask, da_span(S - T, 1, T), da_span(0, 1, S));
  const void *q = (const char *)b->q + (size_t)((S - T) * b->H * b->D) * b->esz;
  int rc = 0;
  for (int64_t it = 0; it < reps; it++) {
    cache_flush(b->T);
    double t0 = da_time_now();
    da_status_t s = b->kt->decode(&b->p, q, (int64_t)b->H * b->D, da_span(S - T, 1, T), pages, npages,
                                  b->dec_o, b->dec_lse, NULL);
    if (s) { rc = kfail("decode", s); break; }
    t[it] = da_time_now() - t0;
  }
  if (!rc) {
    r->ran = 1;
    r->time_s = median(t + b->warmup, b->iters);
    r->rate = r->bytes / r->time_s * 1e-9;
  }
  free(pages);
  free(t);
  return rc;
}

static int verify_decode(kbench_t *b, op_result_t *r) {
  const int H = b->H, D = b->D;
  int64_t T = b->decode_q;
  int64_t *pos = malloc((size_t)T * sizeof(int64_t));
  double *o64 = malloc((size_t)(T * H * D) * sizeof(double)), *l64 = malloc((size_t)(T * H) * sizeof(double));
  if (!pos || !o64 || !l64) {
    free(pos), free(o64), free(l64);
    return -1;
  }
  for (int64_t i = 0; i < T; i++) pos[i] = b->S - T + i;
  int rc = ref_rows_fwd(b, pos, T, o64, l64);
  err_acc_t a = {0};
  for (int64_t i = 0; !rc && i < T; i++)
    for (int h = 0; h < H; h++) {
      double ao, al;
      double ro = vec_err(o64 + (i * H + h) * D, b->dec_o + (i * H + h) * D, D, &ao);
      double rl = lse_err(l64[i * H + h], b->dec_lse[i * H + h], &al);
      acc_add(&a, ao > al ? ao : al, ro > rl ? ro : rl, b->tol);
    }
  r->verify_rows = T;
  r->max_abs = a.max_abs;
  r->max_rel = a.max_rel;
  r->wrong = a.wrong;
  free(pos), free(o64), free(l64);
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * the command */

static int json_record(const kbench_t *b, int op, const op_result_t *r) {
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "kernel");
  da_json_str(&j, "op", op_names[op]);
  da_json_str(&j, "backend", b->kt->name);
  if (b->kt == &da_kernels_cpu) da_json_str(&j, "isa", da_cpu_isa_name());
  da_json_int(&j, "seq", b->S);
  da_json_problem(&j, 1, b->H, b->G, b->D, b->maskdesc, dtype_names[b->dtype], "cpu", b->T);
  da_json_int(&j, "block_q", b->block_q);
  da_json_int(&j, "block_k", b->block_k);
  da_json_int(&j, "iters", b->iters);
  da_json_int(&j, "warmup", b->warmup);
  da_json_int(&j, "seed", b->seed);
  da_json_int(&j, "pairs", r->pairs);
  da_json_dbl(&j, "time_s", r->time_s);
  if (op == OP_DECODE) {
    da_json_int(&j, "decode_q", b->decode_q);
    da_json_int(&j, "page", b->page);
    da_json_dbl(&j, "kv_bytes", r->bytes);
    da_json_dbl(&j, "gbps", r->rate);
    da_json_dbl(&j, "membw_gbps", r->base);
    da_json_dbl(&j, "ratio_membw", r->ratio);
  } else {
    da_json_dbl(&j, op == OP_FWD ? "fwd_s" : "bwd_s", r->time_s);
    da_json_dbl(&j, "gflops", r->rate);
    da_json_dbl(&j, "sgemm_gflops", r->base);
    da_json_dbl(&j, "ratio_sgemm", r->ratio);
    da_json_str(&j, "blas_core", b->blas_core);
  }
  da_json_int(&j, "verify_rows", r->verify_rows);
  da_json_dbl(&j, "max_abs_err", b->verify ? r->max_abs : NAN);
  da_json_dbl(&j, "max_rel_err", b->verify ? r->max_rel : NAN);
  da_json_dbl(&j, "tolerance", b->tol);
  da_json_int(&j, "wrong", r->wrong);
  if (op == OP_BWD) da_json_bool(&j, "dkdv_ref_uses_kernel_lse", b->dkdv_fallback);
  da_json_common(&j, NULL);
  int rc = da_json_append(&j, b->json);
  da_json_free(&j);
  return rc;
}

/* Defaults and the option table (kept in b: the header prints every option's value). */
static void kbench_init(kbench_t *b) {
  memset(b, 0, sizeof *b);
  b->seq = 4096, b->heads = 4, b->kv_heads = 0, b->dim = 128, b->threads = da_default_nthreads();
  b->iters = 5, b->warmup = 1, b->seed = 1, b->verify = 16, b->decode_q = 1, b->page = 256;
  b->dtype = DA_FLOAT32;
  b->ops = (1u << OP_FWD) | (1u << OP_BWD) | (1u << OP_DECODE);
  const da_opt_t opts[KBENCH_NOPTS] = {
      {.name = "seq", .type = DA_OPT_SIZE, .dest = &b->seq, .help = "sequence length S", .min = 1, .max = 1LL << 30},
      {.name = "heads", .type = DA_OPT_INT, .dest = &b->heads, .help = "query heads H", .min = 1, .max = 4096},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &b->kv_heads, .help = "KV heads G (H % G == 0; 0 = H)", .min = 0,
       .max = 4096},
      {.name = "dim", .type = DA_OPT_INT, .dest = &b->dim, .help = "head dim D", .min = 1, .max = 4096},
      {.name = "mask", .type = DA_OPT_MASK, .dest = &b->mask, .help = "attention mask"},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &b->dtype, .help = "storage dtype of q, k, v, out, dout",
       .choices = dtype_names},
      {.name = "ops", .type = DA_OPT_SET, .dest = &b->ops, .help = "operations to time", .choices = op_names},
      {.name = "threads", .type = DA_OPT_INT, .dest = &b->threads,
       .help = "threads for the kernels and the baselines (default: the cores this process may use)", .min = 1,
       .max = DA_MAX_NTHREADS},
      {.name = "block-q", .type = DA_OPT_INT, .dest = &b->block_q, .help = "q tile rows (0 = backend default)",
       .min = 0, .max = 1 << 20},
      {.name = "block-k", .type = DA_OPT_INT, .dest = &b->block_k, .help = "k/v tile rows (0 = backend default)",
       .min = 0, .max = 1 << 20},
      {.name = "iters", .type = DA_OPT_INT, .dest = &b->iters, .help = "timed iterations (the median is reported)",
       .min = 1, .max = 1000000},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &b->warmup, .help = "untimed iterations first", .min = 0,
       .max = 1000000},
      {.name = "seed", .type = DA_OPT_INT, .dest = &b->seed, .help = "seed of the counter-based inputs", .min = 0,
       .max = INT64_MAX},
      {.name = "verify", .type = DA_OPT_INT, .dest = &b->verify,
       .help = "rows checked against float64 per op (0 = off)", .min = 0, .max = 1 << 20},
      {.name = "decode-q", .type = DA_OPT_INT, .dest = &b->decode_q,
       .help = "query rows of the decode (the last positions)", .min = 1, .max = 4096, .alias = "decode-batch"},
      {.name = "page", .type = DA_OPT_INT, .dest = &b->page, .help = "KV cache page size in tokens (decode)", .min = 1,
       .max = 1 << 30},
      {.name = "json", .type = DA_OPT_STRING, .dest = &b->json, .metavar = "FILE",
       .help = "append one JSON object per op to FILE (JSON Lines)"},
      {0},
  };
  memcpy(b->opts, opts, sizeof opts);
  b->cmd = (da_cmdspec_t){.name = "kernel",
                          .summary =
                              "single-rank benchmark of the CPU kernels (fwd, bwd, decode) against same-run sgemm and "
                              "memory bandwidth, with float64 verification of sampled rows",
                          .opts = b->opts};
}

/* The problem after parsing: derived sizes and the usage errors the parser cannot see. 0 or 2. */
static int check_args(kbench_t *b) {
  const da_cmdspec_t *cmd = &b->cmd;
  b->S = b->seq;
  b->H = (int)b->heads;
  b->G = b->kv_heads ? (int)b->kv_heads : b->H;
  b->D = (int)b->dim;
  b->T = (int)b->threads;
  b->esz = da_dtype_size((da_dtype_t)b->dtype);
  b->tol = b->dtype == DA_FLOAT32 ? 1e-4 : 2e-2;
  if (b->H % b->G) return da_args_error(cmd, "--heads %d is not a multiple of --kv-heads %d", b->H, b->G);
  if (b->G > b->H) return da_args_error(cmd, "--kv-heads %d exceeds --heads %d", b->G, b->H);
  if (da_mask_check(&b->mask.mask, b->S) != DA_SUCCESS) {
    const char *msg = da_error_message();
    return da_args_error(cmd, "--mask: %s", strncmp(msg, "mask: ", 6) ? msg : msg + 6);
  }
  if ((b->ops & (1u << OP_DECODE)) && b->decode_q > b->S)
    return da_args_error(cmd, "--decode-q %lld exceeds --seq %lld", (long long)b->decode_q, (long long)b->S);
  if (da_paths_refuse_json("kernel", b->json)) return 2;
  if (b->json && da_json_check_path(b->json)) return 2;
  da_mask_describe(&b->mask.mask, b->maskdesc, sizeof b->maskdesc);
  return 0;
}

/* The kernel parameters and the CPU backend, which must support the problem and every op asked
 * for: "not supported" (exit 2) otherwise. 0 or 2. */
static int pick_backend(kbench_t *b) {
  b->p.H = b->H, b->p.G = b->G, b->p.D = b->D;
  b->p.scale = 1.0f / sqrtf((float)b->D);
  b->p.dtype = (da_dtype_t)b->dtype;
  b->p.mask = b->mask.mask;
  b->p.nthreads = b->T;
  b->p.block_q = (int)b->block_q, b->p.block_k = (int)b->block_k;
  b->kt = da_kernels_get(DA_DEVICE_CPU);
  if (!b->kt) {
    fprintf(stderr, "distattn kernel: not supported: %s\n", da_error_message());
    return 2;
  }
  da_status_t sst = b->kt->supports(&b->p);
  if (sst != DA_SUCCESS) {
    if (sst == DA_ERR_UNSUPPORTED)
      fprintf(stderr, "distattn kernel: not supported by the %s backend: %s\n", b->kt->name, da_error_message());
    else
      fprintf(stderr, "distattn kernel: invalid problem: %s\n", da_error_message());
    return 2;
  }
  const char *missing = NULL;
  if (!b->kt->fwd_block || !b->kt->fwd_finish)
    missing = "fwd_block/fwd_finish";
  else if ((b->ops & (1u << OP_BWD)) && (!b->kt->bwd_prep || !b->kt->bwd_block))
    missing = "bwd_prep/bwd_block";
  else if ((b->ops & (1u << OP_DECODE)) && !b->kt->decode)
    missing = "decode";
  if (missing) {
    fprintf(stderr, "distattn kernel: not supported: the %s backend has no %s\n", b->kt->name, missing);
    return 2;
  }
  return 0;
}

static void print_header(kbench_t *b) {
#ifdef DISTATTN_HAVE_OPENBLAS
  b->blas_core = openblas_get_corename();
#else
  b->blas_core = "none";
#endif
  da_report_header(stdout, &b->cmd, b->T);
  da_report_line(stdout, "backend: %s (%s)  scale: 1/sqrt(%d)  pairs/row mask: %s", b->kt->name,
                 b->kt == &da_kernels_cpu ? da_cpu_isa_name() : b->kt->name, b->D, b->maskdesc);
#ifdef DISTATTN_HAVE_OPENBLAS
  da_report_line(stdout, "openblas: %s  core: %s (%s)", openblas_get_config(), b->blas_core, blas_core_note);
#else
  da_report_line(stdout, "openblas: not built in (none found, or DISTATTN_OPENBLAS=OFF): ratio_sgemm not measured");
#endif
  da_report_line(stdout,
                 "rate: GFLOP/s (fwd 4*H*D*pairs, bwd 10*H*D*pairs) or GB/s of KV read (decode), "
                 "median of %lld",
                 (long long)b->iters);
  da_report_line(stdout,
                 "base: same-run OpenBLAS sgemm GFLOP/s of the same shape, %d threads (fwd, bwd), or "
                 "streaming-read GB/s of the same bytes (decode; both from DRAM)",
                 b->T);
  if (b->verify)
    da_report_line(stdout,
                   "verify: %lld sampled rows per op vs float64 on the same rounded inputs; "
                   "rel err = max|x - ref| / max(max|ref|, 1e-6) per (row, head); tolerance %g",
                   (long long)b->verify, b->tol);
  else
    da_report_line(stdout, "verify: off");
  fflush(stdout);
}

/* Inputs q, k, v (and dout for the backward) filled from the seed, and every output buffer. 0 or 1. */
static int alloc_inputs(kbench_t *b) {
  const int64_t S = b->S;
  size_t nq = (size_t)(S * b->H * b->D), nk = (size_t)(S * b->G * b->D);
  int need_bwd = !!(b->ops & (1u << OP_BWD));
  b->q = da_malloc(nq * b->esz, 64);
  b->k = da_malloc(nk * b->esz, 64);
  b->v = da_malloc(nk * b->esz, 64);
  b->out = da_malloc(nq * b->esz, 64);
  b->lse = da_malloc((size_t)(S * b->H) * 4, 64);
  if (need_bwd) {
    b->dout = da_malloc(nq * b->esz, 64);
    b->delta = da_malloc((size_t)(S * b->H) * 4, 64);
    b->dq = da_malloc(nq * 4, 64);
    b->dk = da_malloc(nk * 4, 64);
    b->dv = da_malloc(nk * 4, 64);
  }
  b->dec_o = da_malloc((size_t)(b->decode_q * b->H * b->D) * 4, 64);
  b->dec_lse = da_malloc((size_t)(b->decode_q * b->H) * 4, 64);
  if (!b->q || !b->k || !b->v || !b->out || !b->lse || !b->dec_o || !b->dec_lse ||
      (need_bwd && (!b->dout || !b->delta || !b->dq || !b->dk || !b->dv))) {
    fprintf(stderr, "distattn kernel: out of memory for S = %lld, H = %d, G = %d, D = %d\n", (long long)S, b->H, b->G,
            b->D);
    return 1;
  }
  fill(b, b->q, DA_RNG_Q, b->H);
  fill(b, b->k, DA_RNG_K, b->G);
  fill(b, b->v, DA_RNG_V, b->G);
  if (need_bwd) fill(b, b->dout, DA_RNG_DOUT, b->H);
  return 0;
}

/* The timed operations, all before the baselines: OpenBLAS's threads keep spinning for a while
 * after a call and would slow the attention kernels down. The backward needs the forward's out
 * and lse, so the forward runs (untimed) for it alone too. 0 or the exit code. */
static int run_ops(kbench_t *b) {
  int rc = 0;
  if (b->ops & ((1u << OP_FWD) | (1u << OP_BWD))) rc = run_fwd(b, !!(b->ops & (1u << OP_FWD)), &b->res[OP_FWD]);
  if (rc == 0 && (b->ops & (1u << OP_BWD))) rc = run_bwd(b, &b->res[OP_BWD]);
  if (rc == 0 && (b->ops & (1u << OP_DECODE))) rc = run_decode(b, &b->res[OP_DECODE]);
  return rc;
}

/* Same-run baselines: sgemm of the attention's shapes (fwd, bwd), a streaming read (decode). */
static void measure_baselines(kbench_t *b) {
  usleep(IDLE_US); /* let the kernels' worker threads go idle */
  if (b->ops & ((1u << OP_FWD) | (1u << OP_BWD))) {
    double t1, t2;
    if (sgemm_times(b, &t1, &t2) == 0) {
      double sd = (double)b->S * (double)b->S * b->D;
      if (b->res[OP_FWD].ran) b->res[OP_FWD].base = 4.0 * sd / (t1 + t2) * 1e-9;
      if (b->res[OP_BWD].ran) b->res[OP_BWD].base = 10.0 * sd / (2 * t1 + 3 * t2) * 1e-9;
    } else {
      b->res[OP_FWD].base = b->res[OP_BWD].base = NAN;
    }
  }
  if (b->res[OP_DECODE].ran) {
    usleep(IDLE_US);
    b->res[OP_DECODE].base = membw_gbps(b, b->res[OP_DECODE].bytes);
  }
  for (int op = 0; op < NOPS; op++) b->res[op].ratio = b->res[op].rate / b->res[op].base;
}

static int verify_oom(void) {
  fprintf(stderr, "distattn kernel: out of memory for verification\n");
  return 1;
}

/* Every op that ran, checked on sampled rows against float64 (--verify rows). 0 or 1. */
static int verify_ops(kbench_t *b) {
  if (!b->verify) return 0;
  b->nrows = b->verify < b->S ? b->verify : b->S;
  b->rows = malloc((size_t)b->nrows * sizeof(int64_t));
  b->out64 = malloc((size_t)(b->nrows * b->H * b->D) * sizeof(double));
  b->lse64 = malloc((size_t)(b->nrows * b->H) * sizeof(double));
  if (!b->rows || !b->out64 || !b->lse64) return verify_oom();
  sample_rows(b->S, b->nrows, (uint64_t)b->seed, SALT_QUERY_ROWS, b->rows);
  double t0 = da_time_now();
  if (b->ops & ((1u << OP_FWD) | (1u << OP_BWD))) {
    if (ref_rows_fwd(b, b->rows, b->nrows, b->out64, b->lse64)) return verify_oom();
    if (b->res[OP_FWD].ran) verify_fwd(b, &b->res[OP_FWD]);
    if (b->res[OP_BWD].ran && verify_bwd(b, &b->res[OP_BWD])) return 1;
  }
  if (b->res[OP_DECODE].ran && verify_decode(b, &b->res[OP_DECODE])) return verify_oom();
  DA_INFO(DA_SUB_KERNEL, "verification took %.2f s", da_time_now() - t0);
  if (b->dkdv_fallback)
    da_report_line(stdout,
                   "verify: bwd dk/dv rows use the kernel's lse and delta (a float64 forward of "
                   "every query row would exceed %.0e flops)",
                   REF_BUDGET_FLOPS);
  return 0;
}

/* The table (one row per op), the JSON records and the footer. The exit code: 0 on PASS. */
static int print_table(const kbench_t *b) {
  static const char *const names[] = {"op",      "seq",      "heads", "kv",   "dim",   "mask",        "dtype",
                                      "threads", "time(ms)", "rate",  "base", "ratio", "max_rel_err", "#wrong"};
  static const int widths[] = {6, 8, 5, 4, 4, 10, 5, 7, 10, 9, 9, 6, 11, 6};
  da_table_t t;
  da_table_init(&t, stdout, 14, names, widths);
  da_table_print_header(&t);
  int64_t wrong = 0;
  int json_ok = 1;
  for (int op = 0; op < NOPS; op++) {
    const op_result_t *r = &b->res[op];
    if (!r->ran) continue;
    da_table_str(&t, op_names[op]);
    da_table_int(&t, b->S), da_table_int(&t, b->H), da_table_int(&t, b->G), da_table_int(&t, b->D);
    da_table_str(&t, b->maskdesc), da_table_str(&t, dtype_names[b->dtype]);
    da_table_int(&t, b->T);
    da_table_dbl(&t, r->time_s * 1e3, 3, 0), da_table_dbl(&t, r->rate, 2, 0), da_table_dbl(&t, r->base, 2, 0);
    da_table_dbl(&t, r->ratio, 3, 0);
    if (b->verify) {
      da_table_dbl(&t, r->max_rel, 2, 1);
      da_table_int(&t, r->wrong);
    } else {
      da_table_str(&t, "-");
      da_table_str(&t, "-");
    }
    da_table_end_row(&t);
    wrong += r->wrong;
    if (b->json && json_record(b, op, r)) json_ok = 0; /* said on stderr; the run is not recorded */
  }
  return da_report_footer(stdout, wrong, json_ok);
}

static void kbench_free(kbench_t *b) {
  void *dev[] = {b->q, b->k, b->v, b->out, b->lse, b->dout, b->delta, b->dq, b->dk, b->dv, b->dec_o, b->dec_lse};
  for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) da_free(dev[i]);
  free(b->rows);
  free(b->out64);
  free(b->lse64);
  free(flush_buf);
  flush_buf = NULL;
  da_mask_spec_free(&b->mask);
}

int da_cmd_kernel(int argc, char **argv) {
  blas_coretype_reexec(argc, argv);
  kbench_t b;
  kbench_init(&b);
  int prc = da_args_parse(&b.cmd, argc, argv);
  if (prc == DA_ARGS_HELP) return 0;
  if (prc != DA_ARGS_OK) {
    da_mask_spec_free(&b.mask);
    return 2;
  }
  int rc = check_args(&b);
  if (rc == 0) rc = pick_backend(&b);
  if (rc == 0) {
    print_header(&b);
    rc = alloc_inputs(&b);
  }
  if (rc == 0) rc = run_ops(&b);
  if (rc == 0) {
    measure_baselines(&b);
    rc = verify_ops(&b);
  }
  if (rc == 0) rc = print_table(&b);
  kbench_free(&b);
  return rc;
}
