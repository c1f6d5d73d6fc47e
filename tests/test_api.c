/* test_api.c: Check suite of the public single-rank API (include/distattn.h, kernels/api.c):
 * da_attention_fwd / bwd / decode on [S][H][D] and [B][S][H][D] views with padded head, row and
 * batch strides against the float64 reference, outputs poisoned before every call and their
 * padding checked untouched after it; bad arguments of every kind return the documented status
 * with da_last_error naming the problem, write nothing, and never crash. Fork mode. */
#define _GNU_SOURCE
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"
#include "kernels.h"
#include "ref.h"
#include "test_util.h"
#include "test_run.h"

static const int ratios[3] = {1, 4, 8};
static const da_dtype_t dtypes[3] = {DA_FLOAT32, DA_BFLOAT16, DA_FLOAT16};

static size_t esize(da_dtype_t dt) { return dt == DA_FLOAT32 ? 4 : 2; }
static double *dalloc(int64_t n) { return tu_xmalloc((size_t)(n > 0 ? n : 1) * sizeof(double)); }

/* ---- strided views ------------------------------------------------------------------------- */

/* An attention tensor [B][S][H][D] (D > 0) or an lse [B][S][H] (D == 0, fp32), with head stride
 * D + hpad, row stride H * hs + rpad and batch stride S * ld + bpad (elements), ndim 4 / 3 or,
 * when B == 1 and flat, 3 / 2. The whole buffer starts poisoned (NaN). */
typedef struct {
  da_tensor_t t;
  int64_t B, S, H, D, hs, ld, bs, n; /* n: elements in the buffer */
} view_t;

static void view_make(view_t *v, da_dtype_t dt, int flat, int64_t B, int64_t S, int64_t H, int64_t D, int64_t hpad,
                      int64_t rpad, int64_t bpad) {
  memset(v, 0, sizeof *v);
  v->B = B, v->S = S, v->H = H, v->D = D;
  v->hs = D ? D + hpad : 1;
  v->ld = H * v->hs + rpad;
  v->bs = S * v->ld + bpad;
  v->n = B * v->bs;
  void *buf = tu_xmalloc((size_t)v->n * esize(dt) + 64);
  tu_poison(buf, dt, v->n);
  v->t.data = buf;
  v->t.dtype = dt;
  v->t.device = DA_DEVICE_CPU;
  int i = 0;
  if (!flat || B != 1) v->t.shape[i] = B, v->t.strides[i++] = v->bs;
  v->t.shape[i] = S, v->t.strides[i++] = v->ld;
  v->t.shape[i] = H, v->t.strides[i++] = v->hs;
  if (D) v->t.shape[i] = D, v->t.strides[i++] = 1;
  v->t.ndim = i;
}

static int64_t view_index(const view_t *v, int64_t b, int64_t s, int64_t h, int64_t d) {
  return b * v->bs + s * v->ld + h * v->hs + d;
}

/* Seeded rows (per batch element b: seed + b) written into the view; ref gets the rounded
 * values packed [B][S][H][D]. Rows sit at positions pos0 .. pos0 + S - 1. */
static void view_fill(view_t *v, uint64_t seed, uint32_t tensor, int64_t pos0, float amp, double *ref) {
  const int64_t S = v->S, H = v->H, D = v->D;
  for (int64_t b = 0; b < v->B; b++) {
    double *r = ref + b * S * H * D;
    tu_fill(seed + (uint64_t)b, tensor, da_span(pos0, 1, S), (int)H, (int)D, v->t.dtype, NULL, 0, r, amp);
    for (int64_t s = 0; s < S; s++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++)
          da_store_f32(v->t.data, (int)v->t.dtype, view_index(v, b, s, h, d), (float)r[(s * H + h) * D + d]);
  }
}

/* The view's values as packed double [B][S][H][D] (lse: D taken as 1). */
static void view_load(const view_t *v, double *dst) {
  const int64_t D1 = v->D ? v->D : 1;
  for (int64_t b = 0; b < v->B; b++)
    for (int64_t s = 0; s < v->S; s++)
      for (int64_t h = 0; h < v->H; h++)
        for (int64_t d = 0; d < D1; d++)
          dst[((b * v->S + s) * v->H + h) * D1 + d] = da_load_f32(v->t.data, (int)v->t.dtype, view_index(v, b, s, h, d));
}

static int is_poison(const view_t *v, int64_t i) {
  if (v->t.dtype == DA_FLOAT32) return isnan(((const float *)v->t.data)[i]);
  uint16_t x = ((const uint16_t *)v->t.data)[i];
  return x == (v->t.dtype == DA_BFLOAT16 ? 0x7fc0 : 0x7e00);
}

/* Elements outside the logical view (head, row, batch padding) still hold the poison: the call
 * wrote only inside. With all = 1: every element does (a failed call wrote nothing). */
static void view_check_untouched(const view_t *v, int all, const char *name, const char *desc) {
  const int64_t D1 = v->D ? v->D : 1;
  for (int64_t i = 0; i < v->n; i++) {
    int64_t b = i / v->bs, r = i % v->bs, s = r / v->ld, r2 = r % v->ld, h = r2 / v->hs, d = r2 % v->hs;
    int inside = b < v->B && s < v->S && h < v->H && d < D1;
    if (all || !inside)
      ck_assert_msg(is_poison(v, i), "%s: %s element %lld (b %lld s %lld h %lld d %lld, %s) was written", desc, name,
                    (long long)i, (long long)b, (long long)s, (long long)h, (long long)d, inside ? "inside" : "padding");
  }
}

static da_context_t *make_ctx(int nthreads) {
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = nthreads;
  da_context_t *ctx = NULL;
  da_status_t st = da_context_create(&cfg, &ctx);
  ck_assert_msg(st == DA_SUCCESS, "context: %s", da_last_error(NULL));
  ck_assert_str_eq(da_last_error(ctx), "");
  return ctx;
}

/* ---- a problem with its views ---------------------------------------------------------------- */

typedef struct {
  da_problem_t prob;
  da_kparams_t kp; /* the same problem for the reference */
  int64_t B, S, T, H, G, D;
  view_t q, k, v, out, lse, dout, dq, dk, dv;
  double *rq, *rk, *rv, *rdo;
  int64_t cu[16];
  uint64_t seed;
  char desc[320];
} api_t;

/* Random strides: heads packed or not (the API packs such views), rows and batches padded. T
 * query rows (T == S: attention; T < S: decode of the last T positions). */
static void api_init(api_t *a, uint64_t *rs, int64_t B, int flat, int64_t S, int64_t T, int H, int G, int D,
                     da_dtype_t dt, int mkind, int bwd) {
  memset(a, 0, sizeof *a);
  a->B = B, a->S = S, a->T = T, a->H = H, a->G = G, a->D = D;
  a->seed = tu_seed(tu_next(rs));
  da_problem_t pr = DA_PROBLEM_INITIALIZER;
  pr.batch = B, pr.seq = S, pr.heads = H, pr.kv_heads = G == H && tu_rand(rs, 0, 1) ? 0 : G, pr.dim = D;
  da_mask_t m = tu_mask(mkind, S, rs, a->cu, 6);
  pr.mask = m.flags, pr.window = m.window, pr.ndocs = m.ndocs, pr.cu_seqlens = m.cu_seqlens;
  pr.dtype = dt;
  if (tu_rand(rs, 0, 2) == 0) pr.scale = (float)(0.5 + tu_rand01(rs)) / sqrtf((float)D);
  a->prob = pr;
  a->kp.H = H, a->kp.G = G, a->kp.D = D, a->kp.dtype = dt, a->kp.mask = m;
  a->kp.scale = pr.scale != 0.0f ? pr.scale : (float)(1.0 / sqrt((double)D));
#define PADS tu_rand(rs, 0, 1) ? 0 : tu_rand(rs, 1, 5), tu_rand(rs, 0, 7), tu_rand(rs, 0, 11)
  view_make(&a->q, dt, flat, B, T, H, D, PADS);
  view_make(&a->k, dt, flat, B, S, G, D, PADS);
  view_make(&a->v, dt, flat, B, S, G, D, PADS);
  view_make(&a->out, dt, flat, B, T, H, D, PADS);
  view_make(&a->lse, DA_FLOAT32, flat, B, T, H, 0, 0, tu_rand(rs, 0, 3), tu_rand(rs, 0, 5));
  a->rq = dalloc(B * T * H * D), a->rk = dalloc(B * S * G * D), a->rv = dalloc(B * S * G * D);
  view_fill(&a->q, a->seed, DA_RNG_Q, S - T, 3.0f, a->rq);
  view_fill(&a->k, a->seed, DA_RNG_K, 0, 1.0f, a->rk);
  view_fill(&a->v, a->seed, DA_RNG_V, 0, 1.0f, a->rv);
  if (bwd) {
    view_make(&a->dout, dt, flat, B, T, H, D, PADS);
    view_make(&a->dq, dt, flat, B, T, H, D, PADS);
    view_make(&a->dk, dt, flat, B, S, G, D, PADS);
    view_make(&a->dv, dt, flat, B, S, G, D, PADS);
    a->rdo = dalloc(B * T * H * D);
    view_fill(&a->dout, a->seed, DA_RNG_DOUT, S - T, 1.0f, a->rdo);
  }
#undef PADS
  char md[96];
  snprintf(a->desc, sizeof a->desc,
           "seed %llu (DISTATTN_TEST_SEED %s) %s B %lld%s S %lld T %lld H %d G %d D %d mask %s scale %g "
           "q strides %lld/%lld/%lld",
           (unsigned long long)a->seed, getenv("DISTATTN_TEST_SEED") ? getenv("DISTATTN_TEST_SEED") : "unset",
           tu_dtype_name(dt), (long long)B, flat && B == 1 ? " (3-D)" : "", (long long)S, (long long)T, H, G, D,
           da_mask_describe(&m, md, sizeof md), (double)a->kp.scale, (long long)a->q.bs, (long long)a->q.ld,
           (long long)a->q.hs);
}

static void api_free(api_t *a) {
  view_t *vs[] = {&a->q, &a->k, &a->v, &a->out, &a->lse, &a->dout, &a->dq, &a->dk, &a->dv};
  for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++) free(vs[i]->t.data);
  free(a->rq), free(a->rk), free(a->rv), free(a->rdo);
}

#define API_OK(call, ctx, a)                                                                                   \
  do {                                                                                                         \
    da_status_t st_ = (call);                                                                                  \
    ck_assert_msg(st_ == DA_SUCCESS, "%s: %s returned %s: %s", (a)->desc, #call, da_status_string(st_),       \
                  da_last_error(ctx));                                                                         \
    ck_assert_msg(da_last_error(ctx)[0] == '\0', "%s: success left last_error '%s'", (a)->desc, da_last_error(ctx)); \
  } while (0)

/* Forward (T == S) or decode (T < S) outputs against the reference, batch element by element. */
static void check_out(const api_t *a, int with_lse, const char *what) {
  const int64_t T = a->T, H = a->H, D = a->D, S = a->S, G = a->G;
  double *out = dalloc(a->B * T * H * D), *lse = dalloc(a->B * T * H), *ro = dalloc(T * H * D), *rl = dalloc(T * H);
  view_load(&a->out, out);
  if (with_lse) view_load(&a->lse, lse);
  char desc[400];
  snprintf(desc, sizeof desc, "%s [%s]", a->desc, what);
  for (int64_t b = 0; b < a->B; b++) {
    ck_assert_int_eq(da_ref_fwd(&a->kp, a->rq + b * T * H * D, da_span(S - T, 1, T), a->rk + b * S * G * D,
                                a->rv + b * S * G * D, da_span(0, 1, S), ro, rl),
                     DA_SUCCESS);
    char d2[420];
    snprintf(d2, sizeof d2, "%s batch %lld", desc, (long long)b);
    TU_CHECK_CLOSE("out", ro, out + b * T * H * D, T * H * D, H, D, D, tu_tol(a->prob.dtype), d2);
    if (with_lse) TU_CHECK_LSE("lse", rl, lse + b * T * H, T * H, H, a->prob.dtype == DA_FLOAT32 ? 2e-5 : 2e-3, d2);
  }
  view_check_untouched(&a->out, 0, "out", desc);
  view_check_untouched(&a->lse, !with_lse, "lse", desc);
  free(out), free(lse), free(ro), free(rl);
}

/* ---- forward ----------------------------------------------------------------------------------- */

/* Loop index: dtype i % 3, mask (i / 3) % 6, GQA ratio (i / 18) % 3 (54 combinations); B, 3-D or
 * 4-D, S, D and strides random. lse is requested on most calls and NULL on some. */
START_TEST(test_fwd_views) {
  uint64_t rs = tu_seed(100 + (uint64_t)_i);
  const da_dtype_t dt = dtypes[_i % 3];
  const int mkind = (_i / 3) % TU_NMASKS, ratio = ratios[(_i / 18) % 3];
  const int G = ratio == 8 ? 1 : (int)tu_rand(&rs, 1, 2), H = G * ratio;
  static const int Ds[] = {16, 64, 80, 128};
  const int D = Ds[tu_rand(&rs, 0, 3)];
  const int64_t B = tu_rand(&rs, 1, 3), S = tu_rand(&rs, 1, 200);
  const int flat = B == 1 && tu_rand(&rs, 0, 1);
  da_context_t *ctx = make_ctx((int)tu_rand(&rs, 0, 2));
  api_t a;
  api_init(&a, &rs, B, flat, S, S, H, G, D, dt, mkind, 0);
  const int with_lse = tu_rand(&rs, 0, 3) != 0;
  API_OK(da_attention_fwd(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, with_lse ? &a.lse.t : NULL, NULL), ctx, &a);
  check_out(&a, with_lse, "fwd");
  api_free(&a);
  da_context_free(ctx);
}
END_TEST

/* 1000 tokens, 4 heads, D 64, causal, [2][S][H][D] with non-packed heads: the common shape. */
START_TEST(test_fwd_1000) {
  uint64_t rs = tu_seed(150);
  da_context_t *ctx = make_ctx(2);
  api_t a;
  api_init(&a, &rs, 2, 0, 1000, 1000, 4, 1, 64, DA_BFLOAT16, TU_MASK_CAUSAL, 0);
  API_OK(da_attention_fwd(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, &a.lse.t, NULL), ctx, &a);
  check_out(&a, 1, "fwd 1000");
  api_free(&a);
  da_context_free(ctx);
}
END_TEST

/* ---- backward ---------------------------------------------------------------------------------- */

/* out and lse from da_attention_fwd, then da_attention_bwd; dq, dk, dv start poisoned and must be
 * overwritten; a second call into the same (now written) buffers must give the same values, not
 * twice them. Gradients per tensor against da_ref_bwd, dq and dk with the scale floored at one
 * cancelling term (see test_util.h, tu_err_floor). */
START_TEST(test_bwd_views) {
  uint64_t rs = tu_seed(200 + (uint64_t)_i);
  const da_dtype_t dt = dtypes[_i % 3];
  const int mkind = (_i / 3) % TU_NMASKS, ratio = ratios[(_i / 18) % 3];
  const int G = ratio == 8 ? 1 : (int)tu_rand(&rs, 1, 2), H = G * ratio;
  static const int Ds[] = {16, 64, 80};
  const int D = Ds[tu_rand(&rs, 0, 2)];
  const int64_t B = tu_rand(&rs, 1, 2), S = tu_rand(&rs, 1, 150);
  const int flat = B == 1 && tu_rand(&rs, 0, 1);
  da_context_t *ctx = make_ctx(2);
  api_t a;
  api_init(&a, &rs, B, flat, S, S, H, G, D, dt, mkind, 1);
  API_OK(da_attention_fwd(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, &a.lse.t, NULL), ctx, &a);
  const int64_t nq = S * H * D, nk = S * G * D;
  double *got[2][3];
  for (int call = 0; call < 2; call++) {
    API_OK(da_attention_bwd(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, &a.dout.t, &a.lse.t, &a.dq.t, &a.dk.t,
                            &a.dv.t, NULL),
           ctx, &a);
    got[call][0] = dalloc(B * nq), got[call][1] = dalloc(B * nk), got[call][2] = dalloc(B * nk);
    view_load(&a.dq, got[call][0]), view_load(&a.dk, got[call][1]), view_load(&a.dv, got[call][2]);
    view_check_untouched(&a.dq, 0, "dq", a.desc);
    view_check_untouched(&a.dk, 0, "dk", a.desc);
    view_check_untouched(&a.dv, 0, "dv", a.desc);
  }
  double *eq = dalloc(nq), *ek = dalloc(nk), *ev = dalloc(nk), *ro = dalloc(nq), *rl = dalloc(S * H);
  const double tol = tu_tol(dt);
  for (int64_t b = 0; b < B; b++) {
    const double *q = a.rq + b * nq, *k = a.rk + b * nk, *v = a.rv + b * nk, *dout = a.rdo + b * nq;
    ck_assert_int_eq(da_ref_bwd(&a.kp, q, da_span(0, 1, S), k, v, da_span(0, 1, S), dout, eq, ek, ev), DA_SUCCESS);
    ck_assert_int_eq(da_ref_fwd(&a.kp, q, da_span(0, 1, S), k, v, da_span(0, 1, S), ro, rl), DA_SUCCESS);
    double dmax = 0, qmax = 0, kmax = 0;
    for (int64_t r = 0; r < S * H; r++) {
      double x = 0;
      for (int d = 0; d < D; d++) x += dout[r * D + d] * ro[r * D + d];
      dmax = fmax(dmax, fabs(x));
    }
    for (int64_t i = 0; i < nq; i++) qmax = fmax(qmax, fabs(q[i]));
    for (int64_t i = 0; i < nk; i++) kmax = fmax(kmax, fabs(k[i]));
    char desc[400];
    snprintf(desc, sizeof desc, "%s batch %lld", a.desc, (long long)b);
    for (int call = 0; call < 2; call++) {
      TU_CHECK_CLOSE_FLOOR("dq", eq, got[call][0] + b * nq, nq, H, D, nq, a.kp.scale * dmax * kmax, tol, desc);
      TU_CHECK_CLOSE_FLOOR("dk", ek, got[call][1] + b * nk, nk, G, D, nk, a.kp.scale * dmax * qmax, tol, desc);
      TU_CHECK_CLOSE_FLOOR("dv", ev, got[call][2] + b * nk, nk, G, D, nk, 0.0, tol, desc);
    }
  }
  for (int call = 0; call < 2; call++)
    for (int j = 0; j < 3; j++) free(got[call][j]);
  free(eq), free(ek), free(ev), free(ro), free(rl);
  api_free(&a);
  da_context_free(ctx);
}
END_TEST

/* ---- decode ------------------------------------------------------------------------------------ */

/* T new queries at positions S - T .. S - 1 against the [B][S][G][D] cache (their own k/v
 * included). Loop index: dtype i % 3, mask (i / 3) % 6. */
START_TEST(test_decode_views) {
  uint64_t rs = tu_seed(300 + (uint64_t)_i);
  const da_dtype_t dt = dtypes[_i % 3];
  const int mkind = (_i / 3) % TU_NMASKS, ratio = ratios[_i % 3];
  const int G = ratio == 8 ? 1 : 2, H = G * ratio, D = _i % 2 ? 128 : 64;
  const int64_t B = tu_rand(&rs, 1, 3), S = tu_rand(&rs, 1, 1200), T = tu_rand(&rs, 1, S < 4 ? S : 4);
  const int flat = B == 1 && tu_rand(&rs, 0, 1);
  da_context_t *ctx = make_ctx(2);
  api_t a;
  api_init(&a, &rs, B, flat, S, T, H, G, D, dt, mkind, 0);
  const int with_lse = _i % 5 != 0;
  API_OK(da_attention_decode(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, with_lse ? &a.lse.t : NULL, NULL), ctx, &a);
  check_out(&a, with_lse, "decode");
  api_free(&a);
  da_context_free(ctx);
}
END_TEST

/* ---- bad arguments ----------------------------------------------------------------------------- */

enum { CALL_FWD, CALL_BWD, CALL_DECODE };
typedef struct {
  const char *name;
  int call;
  da_status_t want;
  const char *needle; /* substring of da_last_error */
} bad_t;

/* Every case starts from a valid problem (B 2, S 10, H 4, G 2, D 16, fp32, causal) and valid
 * views, breaks one thing, and expects the status and a message naming the problem. */
static const bad_t bad_cases[] = {
    {"null context", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "context"},
    {"null problem", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "problem"},
    {"problem not initialized", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "DA_PROBLEM_INITIALIZER"},
    {"batch 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "batch"},
    {"seq 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "seq"},
    {"seq negative", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "seq"},
    {"heads 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "heads"},
    {"heads negative", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "heads"},
    {"H % G != 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "multiple"},
    {"H % G != 0 (bwd)", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "multiple"},
    {"kv_heads > heads", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "kv_heads"},
    {"kv_heads negative", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "kv_heads"},
    {"dim 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "dim"},
    {"dim negative", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dim"},
    {"dim 1000 (unsupported)", CALL_FWD, DA_ERR_UNSUPPORTED, "1000"},
    {"dim 1000 (unsupported, decode)", CALL_DECODE, DA_ERR_UNSUPPORTED, "1000"},
    {"dim 100000", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "dim"},
    {"unknown mask bits", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "flag"},
    {"window 0", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "window"},
    {"doc without cu_seqlens", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "doc"},
    {"documents not covering seq", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "cover"},
    {"unknown dtype", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "dtype"},
    {"negative scale", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "scale"},
    {"NaN scale", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "scale"},
    {"negative block size", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "block"},
    {"q NULL", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "q: tensor is NULL"},
    {"k NULL", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "k: tensor is NULL"},
    {"v NULL", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "v: tensor is NULL"},
    {"out NULL", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "out: tensor is NULL"},
    {"q NULL (decode)", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "q: tensor is NULL"},
    {"dout NULL", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dout: tensor is NULL"},
    {"lse NULL in bwd", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "lse: tensor is NULL"},
    {"dq NULL", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dq: tensor is NULL"},
    {"dv NULL", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dv: tensor is NULL"},
    {"q data NULL", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "q: data pointer is NULL"},
    {"out data NULL", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "out: data pointer is NULL"},
    {"dk data NULL", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dk: data pointer is NULL"},
    {"k wrong dtype", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "k: dtype"},
    {"lse not fp32", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "lse: dtype"},
    {"q ndim 2", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "q: ndim"},
    {"q ndim 5", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "q: ndim"},
    {"q ndim 9 (decode)", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "q: ndim"},
    {"q ndim -1 (decode)", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "q: ndim"},
    {"lse ndim 4", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "lse: ndim"},
    {"3-D q with batch 2", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "batch"},
    {"batch axis mismatch", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "batch"},
    {"q tokens != seq", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "q: shape[1]"},
    {"k heads = H (not G)", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "k: shape[2]"},
    {"v dim wrong", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "v: shape[3]"},
    {"lse heads wrong", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "lse: shape[2]"},
    {"dk shape wrong", CALL_BWD, DA_ERR_INVALID_ARGUMENT, "dk: shape"},
    {"decode T > S", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "new tokens"},
    {"decode T = 0", CALL_DECODE, DA_ERR_INVALID_ARGUMENT, "new tokens"},
    {"last axis not contiguous", CALL_FWD, DA_ERR_UNSUPPORTED, "contiguous"},
    {"negative stride", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "negative stride"},
    {"heads overlap", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "axis 2 (heads)"},
    {"rows overlap (packed heads)", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "axis 1 (tokens)"},
    {"rows overlap (padded heads)", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "axis 1 (tokens)"},
    {"tensor on another device", CALL_FWD, DA_ERR_INVALID_ARGUMENT, "device"},
};
#define NBAD ((int)(sizeof bad_cases / sizeof bad_cases[0]))

START_TEST(test_bad_args) {
  const bad_t *bc = &bad_cases[_i];
  uint64_t rs = tu_seed(400);
  da_context_t *ctx = make_ctx(2);
  const int decode = bc->call == CALL_DECODE;
  api_t a;
  api_init(&a, &rs, 2, 0, 10, decode ? 3 : 10, 4, 2, 16, DA_FLOAT32, TU_MASK_CAUSAL, 1);
  a.prob.kv_heads = 2;
  da_problem_t pr = a.prob, *prp = &pr;
  da_tensor_t q = a.q.t, k = a.k.t, v = a.v.t, out = a.out.t, lse = a.lse.t, dout = a.dout.t, dq = a.dq.t,
              dk = a.dk.t, dv = a.dv.t;
  /* bwd reads out, lse: give them values so only the broken argument matters */
  if (bc->call == CALL_BWD) {
    for (int64_t i = 0; i < a.out.n; i++) ((float *)a.out.t.data)[i] = 0.5f;
    for (int64_t i = 0; i < a.lse.n; i++) ((float *)a.lse.t.data)[i] = 1.0f;
  }
  da_tensor_t *pq = &q, *pk = &k, *pv = &v, *po = &out, *pl = &lse, *pdo = &dout, *pdq = &dq, *pdk = &dk, *pdv = &dv;
  da_context_t *c = ctx;
  static int64_t cu_short[] = {0, 4, 9};
  float pad_rows[4096];
  const char *n = bc->name;
  if (!strcmp(n, "null context")) c = NULL;
  else if (!strcmp(n, "null problem")) prp = NULL;
  else if (!strcmp(n, "problem not initialized")) pr.size = 0, pr.version = 0;
  else if (!strcmp(n, "batch 0")) pr.batch = 0;
  else if (!strcmp(n, "seq 0")) pr.seq = 0;
  else if (!strcmp(n, "seq negative")) pr.seq = -5;
  else if (!strcmp(n, "heads 0")) pr.heads = 0;
  else if (!strcmp(n, "heads negative")) pr.heads = -4;
  else if (!strncmp(n, "H % G", 5)) pr.kv_heads = 3;
  else if (!strcmp(n, "kv_heads > heads")) pr.kv_heads = 8;
  else if (!strcmp(n, "kv_heads negative")) pr.kv_heads = -2;
  else if (!strcmp(n, "dim 0")) pr.dim = 0;
  else if (!strcmp(n, "dim negative")) pr.dim = -16;
  else if (!strncmp(n, "dim 1000 ", 9)) {
    pr.dim = 1000;
    q.shape[3] = k.shape[3] = v.shape[3] = out.shape[3] = 1000; /* problem checks come first anyway */
  } else if (!strcmp(n, "dim 100000")) pr.dim = 100000;
  else if (!strcmp(n, "unknown mask bits")) pr.mask = 0x80;
  else if (!strcmp(n, "window 0")) pr.mask = DA_MASK_WINDOW, pr.window = 0;
  else if (!strcmp(n, "doc without cu_seqlens")) pr.mask = DA_MASK_DOC, pr.ndocs = 2, pr.cu_seqlens = NULL;
  else if (!strcmp(n, "documents not covering seq")) pr.mask = DA_MASK_DOC, pr.ndocs = 2, pr.cu_seqlens = cu_short;
  else if (!strcmp(n, "unknown dtype")) pr.dtype = (da_dtype_t)9;
  else if (!strcmp(n, "negative scale")) pr.scale = -0.5f;
  else if (!strcmp(n, "NaN scale")) pr.scale = NAN;
  else if (!strcmp(n, "negative block size")) pr.block_k = -16;
  else if (!strncmp(n, "q NULL", 6)) pq = NULL;
  else if (!strcmp(n, "k NULL")) pk = NULL;
  else if (!strcmp(n, "v NULL")) pv = NULL;
  else if (!strcmp(n, "out NULL")) po = NULL;
  else if (!strcmp(n, "dout NULL")) pdo = NULL;
  else if (!strcmp(n, "lse NULL in bwd")) pl = NULL;
  else if (!strcmp(n, "dq NULL")) pdq = NULL;
  else if (!strcmp(n, "dv NULL")) pdv = NULL;
  else if (!strcmp(n, "q data NULL")) q.data = NULL;
  else if (!strcmp(n, "out data NULL")) out.data = NULL;
  else if (!strcmp(n, "dk data NULL")) dk.data = NULL;
  else if (!strcmp(n, "k wrong dtype")) k.dtype = DA_BFLOAT16;
  else if (!strcmp(n, "lse not fp32")) lse.dtype = DA_FLOAT16;
  else if (!strcmp(n, "q ndim 2")) q.ndim = 2;
  else if (!strcmp(n, "q ndim 5")) q.ndim = 5;
  else if (!strcmp(n, "q ndim 9 (decode)")) q.ndim = 9;
  else if (!strcmp(n, "q ndim -1 (decode)")) q.ndim = -1;
  else if (!strcmp(n, "lse ndim 4")) lse.ndim = 4;
  else if (!strcmp(n, "3-D q with batch 2")) {
    q.ndim = 3;
    memmove(q.shape, q.shape + 1, 3 * sizeof(int64_t));
    memmove(q.strides, q.strides + 1, 3 * sizeof(int64_t));
  } else if (!strcmp(n, "batch axis mismatch")) dv.shape[0] = 3;
  else if (!strcmp(n, "q tokens != seq")) q.shape[1] = 11;
  else if (!strcmp(n, "k heads = H (not G)")) k.shape[2] = 4;
  else if (!strcmp(n, "v dim wrong")) v.shape[3] = 15;
  else if (!strcmp(n, "lse heads wrong")) lse.shape[2] = 2;
  else if (!strcmp(n, "dk shape wrong")) dk.shape[1] = 9;
  else if (!strcmp(n, "decode T > S")) q.shape[1] = 11;
  else if (!strcmp(n, "decode T = 0")) q.shape[1] = 0;
  else if (!strcmp(n, "last axis not contiguous")) v.strides[3] = 2;
  else if (!strcmp(n, "negative stride")) k.strides[1] = -k.strides[1];
  else if (!strcmp(n, "heads overlap")) q.strides[2] = 8;
  else if (!strcmp(n, "rows overlap (packed heads)")) {
    /* out with packed heads and a row stride shorter than a row */
    out.strides[2] = 16, out.strides[1] = 4 * 16 - 1;
  } else if (!strcmp(n, "rows overlap (padded heads)")) {
    /* out with head stride 20 > D: a row spans 3 * 20 + 16 = 76 elements, row stride 64 */
    out.data = pad_rows;
    for (int i = 0; i < 4096; i++) pad_rows[i] = NAN;
    out.strides[2] = 20, out.strides[1] = 64, out.strides[0] = 10 * 64 + 80;
  } else if (!strcmp(n, "tensor on another device")) v.device = DA_DEVICE_CUDA;
  else ck_abort_msg("case '%s' not handled", n);

  da_status_t st;
  if (bc->call == CALL_FWD) st = da_attention_fwd(c, prp, pq, pk, pv, po, pl, NULL);
  else if (bc->call == CALL_BWD) st = da_attention_bwd(c, prp, pq, pk, pv, po, pdo, pl, pdq, pdk, pdv, NULL);
  else st = da_attention_decode(c, prp, pq, pk, pv, po, pl, NULL);
  const char *msg = da_last_error(c);
  ck_assert_msg(st == bc->want, "%s: status %s (%s), expected %s", n, da_status_string(st), msg, da_status_string(bc->want));
  ck_assert_msg(msg && msg[0], "%s: empty da_last_error", n);
  ck_assert_msg(strstr(msg, bc->needle) != NULL, "%s: da_last_error '%s' does not name '%s'", n, msg, bc->needle);
  ck_assert_str_ne(da_status_string(st), "");
  /* nothing written on failure */
  if (bc->call == CALL_BWD) {
    view_check_untouched(&a.dq, 1, "dq", n);
    view_check_untouched(&a.dk, 1, "dk", n);
    view_check_untouched(&a.dv, 1, "dv", n);
  } else {
    view_check_untouched(&a.out, 1, "out", n);
    view_check_untouched(&a.lse, 1, "lse", n);
    if (out.data == pad_rows)
      for (int i = 0; i < 4096; i++) ck_assert_msg(isnan(pad_rows[i]), "%s: out written", n);
  }
  /* the context recovers: the next valid call succeeds and clears the message */
  if (c) {
    if (bc->call == CALL_DECODE)
      API_OK(da_attention_decode(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, &a.lse.t, NULL), ctx, &a);
    else
      API_OK(da_attention_fwd(ctx, &a.prob, &a.q.t, &a.k.t, &a.v.t, &a.out.t, &a.lse.t, NULL), ctx, &a);
  }
  api_free(&a);
  da_context_free(ctx);
}
END_TEST

/* Context creation: bad configs, an unbuilt backend, the tensor helper, version strings. */
START_TEST(test_context_and_helpers) {
  da_context_t *ctx = (da_context_t *)0x1;
  ck_assert_int_eq(da_context_create(NULL, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_ptr_nonnull(strstr(da_last_error(NULL), "NULL"));
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = -1;
  ck_assert_int_eq(da_context_create(&cfg, &ctx), DA_ERR_INVALID_ARGUMENT);
  ck_assert_ptr_null(ctx);
  ck_assert_ptr_nonnull(strstr(da_last_error(NULL), "nthreads"));
  cfg = (da_config_t)DA_CONFIG_INITIALIZER;
  cfg.version = 99;
  ck_assert_int_eq(da_context_create(&cfg, &ctx), DA_ERR_INVALID_ARGUMENT);
  ck_assert_ptr_nonnull(strstr(da_last_error(NULL), "DA_CONFIG_INITIALIZER"));
  cfg = (da_config_t)DA_CONFIG_INITIALIZER;
  cfg.device = DA_DEVICE_CUDA;
  da_status_t st = da_context_create(&cfg, &ctx);
  if (st != DA_SUCCESS) { /* a build without the CUDA backend (or without a GPU) says so */
    ck_assert_msg(st == DA_ERR_UNSUPPORTED || st == DA_ERR_CUDA, "CUDA context: %s", da_status_string(st));
    ck_assert_ptr_nonnull(strstr(da_last_error(NULL), "CUDA"));
  } else {
    da_context_free(ctx);
  }
  ck_assert_int_eq(da_context_create(NULL, &ctx), DA_SUCCESS);
  ck_assert_str_eq(da_last_error(ctx), "");
  da_context_free(ctx);
  da_context_free(NULL);
  /* da_tensor_make: contiguous strides */
  da_tensor_t t;
  float buf[2 * 3 * 4 * 5];
  da_tensor_make(&t, buf, DA_FLOAT32, 4, (int64_t[]){2, 3, 4, 5});
  ck_assert_int_eq(t.ndim, 4);
  ck_assert(t.data == buf && t.dtype == DA_FLOAT32 && t.device == DA_DEVICE_CPU);
  ck_assert_int_eq(t.strides[0], 60);
  ck_assert_int_eq(t.strides[1], 20);
  ck_assert_int_eq(t.strides[2], 5);
  ck_assert_int_eq(t.strides[3], 1);
  ck_assert_ptr_nonnull(da_version_string());
  ck_assert_ptr_nonnull(strstr(da_version_string(), "0.1"));
  for (int s = 0; s < DA_NUM_STATUS; s++) ck_assert(da_status_string((da_status_t)s)[0] != '\0');
}
END_TEST

/* A tensor made by da_tensor_make (packed) through the whole API: forward, backward, decode with
 * bf16 [S][H][D] and lse [S][H], as in the README example. */
START_TEST(test_readme_example) {
  const int64_t S = 77, H = 8, G = 2, D = 64;
  da_context_t *ctx;
  ck_assert_int_eq(da_context_create(NULL, &ctx), DA_SUCCESS);
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = S, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.mask = DA_MASK_CAUSAL, prob.dtype = DA_BFLOAT16;
  uint16_t *qb = tu_xmalloc((size_t)(S * H * D) * 2), *kb = tu_xmalloc((size_t)(S * G * D) * 2);
  uint16_t *vb = tu_xmalloc((size_t)(S * G * D) * 2), *ob = tu_xmalloc((size_t)(S * H * D) * 2);
  float *lb = tu_xmalloc((size_t)(S * H) * 4);
  double *rq = dalloc(S * H * D), *rk = dalloc(S * G * D), *rv = dalloc(S * G * D), *ro = dalloc(S * H * D), *rl = dalloc(S * H);
  double *go = dalloc(S * H * D), *gl = dalloc(S * H);
  uint64_t seed = tu_seed(500);
  tu_fill(seed, DA_RNG_Q, da_span(0, 1, S), (int)H, (int)D, DA_BFLOAT16, qb, H * D, rq, 1.0f);
  tu_fill(seed, DA_RNG_K, da_span(0, 1, S), (int)G, (int)D, DA_BFLOAT16, kb, G * D, rk, 1.0f);
  tu_fill(seed, DA_RNG_V, da_span(0, 1, S), (int)G, (int)D, DA_BFLOAT16, vb, G * D, rv, 1.0f);
  tu_poison(ob, DA_BFLOAT16, S * H * D);
  tu_poison(lb, DA_FLOAT32, S * H);
  da_tensor_t q, k, v, out, lse;
  da_tensor_make(&q, qb, DA_BFLOAT16, 3, (int64_t[]){S, H, D});
  da_tensor_make(&k, kb, DA_BFLOAT16, 3, (int64_t[]){S, G, D});
  da_tensor_make(&v, vb, DA_BFLOAT16, 3, (int64_t[]){S, G, D});
  da_tensor_make(&out, ob, DA_BFLOAT16, 3, (int64_t[]){S, H, D});
  da_tensor_make(&lse, lb, DA_FLOAT32, 2, (int64_t[]){S, H});
  da_status_t st = da_attention_fwd(ctx, &prob, &q, &k, &v, &out, &lse, NULL);
  ck_assert_msg(st == DA_SUCCESS, "%s", da_last_error(ctx));
  da_kparams_t kp = {.H = (int)H, .G = (int)G, .D = (int)D, .scale = 0.125f, .dtype = DA_BFLOAT16, .mask = {DA_MASK_CAUSAL, 0, 0, NULL}};
  ck_assert_int_eq(da_ref_fwd(&kp, rq, da_span(0, 1, S), rk, rv, da_span(0, 1, S), ro, rl), DA_SUCCESS);
  tu_load(ob, DA_BFLOAT16, S, (int)H, (int)D, H * D, go);
  for (int64_t i = 0; i < S * H; i++) gl[i] = lb[i];
  TU_CHECK_CLOSE("out", ro, go, S * H * D, H, D, D, 2e-2, "README example");
  TU_CHECK_LSE("lse", rl, gl, S * H, H, 2e-3, "README example");
  free(qb), free(kb), free(vb), free(ob), free(lb), free(rq), free(rk), free(rv), free(ro), free(rl), free(go), free(gl);
  da_context_free(ctx);
}
END_TEST

static Suite *api_suite(void) {
  Suite *s = suite_create("api");
  TCase *tc = tcase_create("attention");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_fwd_views, 0, 54);
  tcase_add_test(tc, test_fwd_1000);
  tcase_add_loop_test(tc, test_bwd_views, 0, 54);
  tcase_add_loop_test(tc, test_decode_views, 0, 18);
  tcase_add_test(tc, test_readme_example);
  suite_add_tcase(s, tc);

  tc = tcase_create("errors");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_bad_args, 0, NBAD);
  tcase_add_test(tc, test_context_and_helpers);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return tu_run(api_suite());
}
