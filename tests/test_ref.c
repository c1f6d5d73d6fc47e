/* test_ref.c: Check suite of the float64 reference (kernels/ref), the oracle every backend and
 * distributed algorithm is tested against, so it is checked here against code that shares none of
 * it: a naive dense computation written below (whole score matrix per head from explicit position
 * lists and a mask test by linear search, softmax, P.V, lse; the backward from the softmax
 * Jacobian written out) and central finite differences of the forward. Fork mode, CPU only. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "ref.h"
#include "test_util.h"
#include "test_run.h"

/* Both sides compute in float64 with different summation orders and formulas: they agree to a
 * few ulps of the largest term. */
#define REF_TOL 1e-11

static const int ratios[3] = {1, 4, 8};

/* ---- the independent dense computation ------------------------------------------------------ */

/* Mask by definition (design §2), documents found by linear search. */
static int naive_allows(const da_mask_t *m, int64_t q, int64_t k) {
  if ((m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) && !(k <= q)) return 0;
  if ((m->flags & DA_MASK_WINDOW) && !(q - k < m->window)) return 0;
  if (m->flags & DA_MASK_DOC) {
    int64_t dq = m->ndocs, dk = m->ndocs;
    for (int64_t d = 0; d < m->ndocs; d++) {
      if (m->cu_seqlens[d] <= q && q < m->cu_seqlens[d + 1]) dq = d;
      if (m->cu_seqlens[d] <= k && k < m->cu_seqlens[d + 1]) dk = d;
    }
    if (dq != dk) return 0;
  }
  return 1;
}

static void positions(da_span_t s, int64_t *out) {
  for (int64_t i = 0; i < s.count; i++) out[i] = s.start + i * s.stride;
}

/* Dense forward over explicit positions: for each head the score row s_ij = scale q_i.k_j over
 * the keys the mask allows, P = softmax(s), out_i = sum_j P_ij v_j, lse_i = log sum_j exp(s_ij).
 * A row that sees no key: out = 0, lse = -inf. A NaN score makes the whole row NaN (the max of a
 * row holding a NaN is NaN, as numpy's max); a NaN in v reaches the columns it sits in. Only
 * keys the mask allows enter the sums. P (optional) gets [nq][H][nk] probabilities. */
static void dense_fwd(const da_kparams_t *p, const double *q, const int64_t *qp, int64_t nq, const double *k,
                      const double *v, const int64_t *kp, int64_t nk, double *out, double *lse, double *P) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G;
  double *s = tu_xmalloc((size_t)(nk + 1) * sizeof(double));
  char *ok = tu_xmalloc((size_t)(nk + 1));
  for (int64_t i = 0; i < nq; i++)
    for (int h = 0; h < H; h++) {
      const int g = h / rep;
      int any = 0, nan = 0;
      double mx = -INFINITY;
      for (int64_t j = 0; j < nk; j++) {
        ok[j] = (char)naive_allows(&p->mask, qp[i], kp[j]);
        if (!ok[j]) continue;
        double dotp = 0;
        for (int d = 0; d < D; d++) dotp += q[(i * H + h) * D + d] * k[(j * G + g) * D + d];
        s[j] = (double)p->scale * dotp;
        any = 1;
        if (isnan(s[j])) nan = 1;
        else if (s[j] > mx) mx = s[j];
      }
      double *o = out + (i * H + h) * D;
      double *prow = P ? P + (i * H + h) * nk : NULL;
      if (prow)
        for (int64_t j = 0; j < nk; j++) prow[j] = 0;
      if (!any) {
        for (int d = 0; d < D; d++) o[d] = 0;
        lse[i * H + h] = -INFINITY;
        continue;
      }
      if (nan) mx = NAN;
      double sum = 0;
      for (int64_t j = 0; j < nk; j++)
        if (ok[j]) sum += exp(s[j] - mx);
      for (int d = 0; d < D; d++) o[d] = 0;
      for (int64_t j = 0; j < nk; j++) {
        if (!ok[j]) continue;
        double pij = exp(s[j] - mx) / sum;
        if (prow) prow[j] = pij;
        for (int d = 0; d < D; d++) o[d] += pij * v[(j * G + g) * D + d];
      }
      lse[i * H + h] = mx + log(sum);
    }
  free(s);
  free(ok);
}

/* Dense backward of f = sum(dout * out), through the softmax Jacobian:
 *   dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - sum_l P_il dP_il),
 *   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i,
 * dk and dv summed over the query heads that share KV head g. (The reference uses
 * delta = dout_i . out_i in place of sum_l P_il dP_il: equal in exact arithmetic only.) */
static void dense_bwd(const da_kparams_t *p, const double *q, const int64_t *qp, int64_t nq, const double *k,
                      const double *v, const int64_t *kp, int64_t nk, const double *dout, double *dq, double *dk,
                      double *dv) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G;
  double *P = tu_xmalloc((size_t)(nq * H * nk + 1) * sizeof(double));
  double *out = tu_xmalloc((size_t)(nq * H * D + 1) * sizeof(double));
  double *lse = tu_xmalloc((size_t)(nq * H + 1) * sizeof(double));
  double *dP = tu_xmalloc((size_t)(nk + 1) * sizeof(double));
  dense_fwd(p, q, qp, nq, k, v, kp, nk, out, lse, P);
  memset(dq, 0, (size_t)(nq * H * D) * sizeof(double));
  memset(dk, 0, (size_t)(nk * G * D) * sizeof(double));
  memset(dv, 0, (size_t)(nk * G * D) * sizeof(double));
  for (int64_t i = 0; i < nq; i++)
    for (int h = 0; h < H; h++) {
      const int g = h / rep;
      const double *prow = P + (i * H + h) * nk, *doi = dout + (i * H + h) * D;
      double c = 0;
      for (int64_t j = 0; j < nk; j++) {
        double x = 0;
        for (int d = 0; d < D; d++) x += doi[d] * v[(j * G + g) * D + d];
        dP[j] = x;
        c += prow[j] * x;
      }
      for (int64_t j = 0; j < nk; j++) {
        if (prow[j] == 0) continue; /* masked (or underflowed: contributes 0 either way) */
        double ds = prow[j] * (dP[j] - c);
        for (int d = 0; d < D; d++) {
          dq[(i * H + h) * D + d] += (double)p->scale * ds * k[(j * G + g) * D + d];
          dk[(j * G + g) * D + d] += (double)p->scale * ds * q[(i * H + h) * D + d];
          dv[(j * G + g) * D + d] += prow[j] * doi[d];
        }
      }
    }
  free(P);
  free(out);
  free(lse);
  free(dP);
}

/* ---- a problem: spans, seeded inputs, mask ---------------------------------------------------- */

typedef struct {
  da_kparams_t p;
  da_span_t qs, ks;
  int64_t *qp, *kp;
  double *q, *k, *v, *dout;
  int64_t cu[16];
  uint64_t seed;
  char desc[256];
} prob_t;

/* Inputs are seeded by global position (tu_fill), so a span's rows are the rows of the whole
 * sequence at those positions: what a striped or zigzag shard holds. */
static void prob_init(prob_t *P, int H, int G, int D, da_span_t qs, da_span_t ks, int64_t S, int mkind,
                      uint64_t *rs, uint64_t seed) {
  memset(P, 0, sizeof *P);
  P->p.H = H;
  P->p.G = G;
  P->p.D = D;
  P->p.scale = (float)(0.25 + tu_rand01(rs)) / sqrtf((float)D) * 2.0f;
  P->p.dtype = DA_FLOAT32;
  P->p.mask = tu_mask(mkind, S, rs, P->cu, 5);
  P->qs = qs;
  P->ks = ks;
  P->seed = seed;
  P->qp = tu_xmalloc((size_t)qs.count * sizeof(int64_t));
  P->kp = tu_xmalloc((size_t)ks.count * sizeof(int64_t));
  positions(qs, P->qp);
  positions(ks, P->kp);
  P->q = tu_xmalloc((size_t)(qs.count * H * D) * sizeof(double));
  P->dout = tu_xmalloc((size_t)(qs.count * H * D) * sizeof(double));
  P->k = tu_xmalloc((size_t)(ks.count * G * D) * sizeof(double));
  P->v = tu_xmalloc((size_t)(ks.count * G * D) * sizeof(double));
  /* q larger than k, v so scores spread over several units and the softmax is far from flat */
  tu_fill(seed, DA_RNG_Q, qs, H, D, DA_FLOAT32, NULL, 0, P->q, 3.0f);
  tu_fill(seed, DA_RNG_K, ks, G, D, DA_FLOAT32, NULL, 0, P->k, 1.0f);
  tu_fill(seed, DA_RNG_V, ks, G, D, DA_FLOAT32, NULL, 0, P->v, 1.0f);
  tu_fill(seed, DA_RNG_DOUT, qs, H, D, DA_FLOAT32, NULL, 0, P->dout, 1.0f);
  char mdesc[96];
  snprintf(P->desc, sizeof P->desc,
           "seed %llu H %d G %d D %d scale %.4g mask %s q %lld+%lld*i (n %lld) k %lld+%lld*j (n %lld)",
           (unsigned long long)seed, H, G, D, (double)P->p.scale, da_mask_describe(&P->p.mask, mdesc, sizeof mdesc),
           (long long)qs.start, (long long)qs.stride, (long long)qs.count, (long long)ks.start, (long long)ks.stride,
           (long long)ks.count);
}

static void prob_free(prob_t *P) {
  free(P->qp), free(P->kp), free(P->q), free(P->k), free(P->v), free(P->dout);
}

/* A span of n positions inside [0, S) with the given stride, at a random start. */
static da_span_t rand_span(uint64_t *rs, int64_t S, int64_t stride, int64_t nmax) {
  int64_t room = 1 + (S - 1) / stride; /* positions available from start 0 */
  int64_t n = tu_rand(rs, 1, nmax < room ? nmax : room);
  int64_t start = tu_rand(rs, 0, S - 1 - (n - 1) * stride);
  return da_span(start, stride, n);
}

static double *dalloc(int64_t n) { return tu_xmalloc((size_t)(n > 0 ? n : 1) * sizeof(double)); }

/* Gradients compare per tensor (test_util.h): their rows are signed sums that may cancel. */
#define CHECK_GRAD(what, ref, got, n, H, D, tol, desc) TU_CHECK_CLOSE(what, ref, got, n, H, D, (n) > 0 ? (n) : 1, tol, desc)

/* ---- forward and backward against the dense computation -------------------------------------- */

/* Loop index: mask kind (6) x GQA ratio (1, 4, 8) x layout (self-attention on [0, S) / two
 * unrelated strided spans, as a striped or zigzag shard pair). */
START_TEST(test_ref_vs_dense) {
  uint64_t rs = tu_seed(100 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS, ratio = ratios[(_i / TU_NMASKS) % 3], strided = _i / (3 * TU_NMASKS);
  for (int rep = 0; rep < 3; rep++) {
    const int G = (int)tu_rand(&rs, 1, 2), H = G * ratio;
    static const int Ds[] = {1, 3, 16, 33};
    const int D = Ds[tu_rand(&rs, 0, 3)];
    const int64_t S = tu_rand(&rs, 1, 70);
    da_span_t qs, ks;
    if (!strided) qs = ks = da_span(0, 1, S);
    else {
      qs = rand_span(&rs, S, tu_rand(&rs, 1, 4), 30);
      ks = rand_span(&rs, S, tu_rand(&rs, 1, 4), 30);
    }
    prob_t P;
    prob_init(&P, H, G, D, qs, ks, S, mkind, &rs, tu_seed(rs));
    const int64_t nq = qs.count, nk = ks.count;
    double *out = dalloc(nq * H * D), *lse = dalloc(nq * H), *dout_ = dalloc(nq * H * D), *dlse = dalloc(nq * H);
    ck_assert_int_eq(da_ref_fwd(&P.p, P.q, qs, P.k, P.v, ks, out, lse), DA_SUCCESS);
    dense_fwd(&P.p, P.q, P.qp, nq, P.k, P.v, P.kp, nk, dout_, dlse, NULL);
    TU_CHECK_CLOSE("out", dout_, out, nq * H * D, H, D, D, REF_TOL, P.desc);
    TU_CHECK_LSE("lse", dlse, lse, nq * H, H, REF_TOL, P.desc);
    /* rows that see no key: exactly 0 and -inf, whatever the dense side's formula */
    for (int64_t r = 0; r < nq * H; r++)
      if (dlse[r] == -INFINITY)
        for (int d = 0; d < D; d++)
          ck_assert_msg(out[r * D + d] == 0.0, "%s: masked row %lld has out %g", P.desc, (long long)(r / H), out[r * D + d]);

    double *dq = dalloc(nq * H * D), *dk = dalloc(nk * G * D), *dv = dalloc(nk * G * D);
    double *eq = dalloc(nq * H * D), *ek = dalloc(nk * G * D), *ev = dalloc(nk * G * D);
    ck_assert_int_eq(da_ref_bwd(&P.p, P.q, qs, P.k, P.v, ks, P.dout, dq, dk, dv), DA_SUCCESS);
    dense_bwd(&P.p, P.q, P.qp, nq, P.k, P.v, P.kp, nk, P.dout, eq, ek, ev);
    CHECK_GRAD("dq", eq, dq, nq * H * D, H, D, REF_TOL, P.desc);
    CHECK_GRAD("dk", ek, dk, nk * G * D, G, D, REF_TOL, P.desc);
    CHECK_GRAD("dv", ev, dv, nk * G * D, G, D, REF_TOL, P.desc);
    free(out), free(lse), free(dout_), free(dlse), free(dq), free(dk), free(dv), free(eq), free(ek), free(ev);
    prob_free(&P);
  }
}
END_TEST

/* The streaming form: folding the keys in pieces (contiguous chunks in shuffled order, or the
 * interleaved sub-spans of a striped layout, each gathered into its own buffer) into one state
 * equals one call. (The backward is not block-additive in the reference: da_ref_bwd recomputes
 * the lse of the keys it is given; the block-additive bwd_block is tested in test_kernels.) */
START_TEST(test_ref_streaming) {
  uint64_t rs = tu_seed(200 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS;
  for (int rep = 0; rep < 4; rep++) {
    const int G = (int)tu_rand(&rs, 1, 2), H = G * ratios[tu_rand(&rs, 0, 2)], D = (int)tu_rand(&rs, 1, 20);
    const int64_t S = tu_rand(&rs, 2, 90);
    da_span_t qs = rand_span(&rs, S, tu_rand(&rs, 1, 3), 40), ks = rand_span(&rs, S, tu_rand(&rs, 1, 2), 90);
    prob_t P;
    prob_init(&P, H, G, D, qs, ks, S, mkind, &rs, tu_seed(rs));
    const int64_t nq = qs.count, nk = ks.count;
    double *o1 = dalloc(nq * H * D), *l1 = dalloc(nq * H), *o2 = dalloc(nq * H * D), *l2 = dalloc(nq * H);
    double *eo = dalloc(nq * H * D), *el = dalloc(nq * H);
    ck_assert_int_eq(da_ref_fwd(&P.p, P.q, qs, P.k, P.v, ks, o1, l1), DA_SUCCESS);
    dense_fwd(&P.p, P.q, P.qp, nq, P.k, P.v, P.kp, nk, eo, el, NULL);

    /* pieces of the key span, as (first local row, local stride, count) */
    const int striped = rep & 1;
    int64_t starts[100], counts[100], strides[100];
    int npieces = 0;
    if (striped) {
      const int64_t Pk = tu_rand(&rs, 2, 5);
      for (int64_t r = 0; r < Pk && r < nk; r++) {
        starts[npieces] = r;
        strides[npieces] = Pk;
        counts[npieces++] = (nk - r + Pk - 1) / Pk;
      }
    } else {
      for (int64_t j = 0; j < nk;) {
        int64_t n = tu_rand(&rs, 1, nk - j < 25 ? nk - j : 25);
        starts[npieces] = j;
        strides[npieces] = 1;
        counts[npieces++] = n;
        j += n;
      }
    }
    for (int i = npieces - 1; i > 0; i--) { /* any order */
      int j = (int)tu_rand(&rs, 0, i);
      int64_t t;
      t = starts[i], starts[i] = starts[j], starts[j] = t;
      t = counts[i], counts[i] = counts[j], counts[j] = t;
      t = strides[i], strides[i] = strides[j], strides[j] = t;
    }
    da_ref_state_t st;
    ck_assert_int_eq(da_ref_state_alloc(&P.p, nq, &st), DA_SUCCESS);
    double *kb = dalloc(nk * G * D), *vb = dalloc(nk * G * D);
    for (int c = 0; c < npieces; c++) {
      for (int64_t i = 0; i < counts[c]; i++) {
        memcpy(kb + i * G * D, P.k + (starts[c] + i * strides[c]) * G * D, (size_t)(G * D) * sizeof(double));
        memcpy(vb + i * G * D, P.v + (starts[c] + i * strides[c]) * G * D, (size_t)(G * D) * sizeof(double));
      }
      da_span_t piece = da_span(ks.start + starts[c] * ks.stride, ks.stride * strides[c], counts[c]);
      da_ref_fwd_accum(&P.p, P.q, qs, kb, vb, piece, &st);
    }
    da_ref_fwd_finish(&P.p, &st, o2, l2);
    da_ref_state_free(&st);
    TU_CHECK_CLOSE("chunked out", o1, o2, nq * H * D, H, D, D, REF_TOL, P.desc);
    TU_CHECK_LSE("chunked lse", l1, l2, nq * H, H, REF_TOL, P.desc);
    TU_CHECK_CLOSE("chunked out vs dense", eo, o2, nq * H * D, H, D, D, REF_TOL, P.desc);
    TU_CHECK_LSE("chunked lse vs dense", el, l2, nq * H, H, REF_TOL, P.desc);
    free(o1), free(l1), free(o2), free(l2), free(eo), free(el), free(kb), free(vb);
    prob_free(&P);
  }
}
END_TEST

/* Central finite differences of f(q, k, v) = sum(dout * out) against da_ref_bwd, on a tiny
 * strided problem per mask (every element of q, k and v perturbed). */
static double objective(const prob_t *P, const double *q, const double *k, const double *v) {
  const int64_t n = P->qs.count * P->p.H * P->p.D;
  double *out = dalloc(n), *lse = dalloc(P->qs.count * P->p.H);
  ck_assert_int_eq(da_ref_fwd(&P->p, q, P->qs, k, v, P->ks, out, lse), DA_SUCCESS);
  double f = 0;
  for (int64_t i = 0; i < n; i++) f += P->dout[i] * out[i];
  free(out), free(lse);
  return f;
}

START_TEST(test_ref_finite_difference) {
  uint64_t rs = tu_seed(300 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS;
  const int H = 4, G = (_i / TU_NMASKS) ? 1 : 2, D = 3;
  const int64_t S = 24;
  prob_t P;
  prob_init(&P, H, G, D, da_span(1, 2, 11), da_span(0, 3, 8), S, mkind, &rs, tu_seed(rs));
  P.p.scale = 0.7f;
  const int64_t nq = P.qs.count, nk = P.ks.count;
  double *dq = dalloc(nq * H * D), *dk = dalloc(nk * G * D), *dv = dalloc(nk * G * D);
  ck_assert_int_eq(da_ref_bwd(&P.p, P.q, P.qs, P.k, P.v, P.ks, P.dout, dq, dk, dv), DA_SUCCESS);
  struct { const char *name; double *x, *g; int64_t n; } t[3] = {
      {"dq", P.q, dq, nq * H * D}, {"dk", P.k, dk, nk * G * D}, {"dv", P.v, dv, nk * G * D}};
  const double eps = 1e-5;
  for (int a = 0; a < 3; a++) {
    double gmax = 1e-3, worst = 0;
    int64_t at = 0;
    double *fd = dalloc(t[a].n);
    for (int64_t e = 0; e < t[a].n; e++) {
      double x0 = t[a].x[e];
      t[a].x[e] = x0 + eps;
      double fp = objective(&P, P.q, P.k, P.v);
      t[a].x[e] = x0 - eps;
      double fm = objective(&P, P.q, P.k, P.v);
      t[a].x[e] = x0;
      fd[e] = (fp - fm) / (2 * eps);
      if (fabs(fd[e]) > gmax) gmax = fabs(fd[e]);
    }
    for (int64_t e = 0; e < t[a].n; e++)
      if (fabs(fd[e] - t[a].g[e]) > worst) worst = fabs(fd[e] - t[a].g[e]), at = e;
    /* truncation O(eps^2) and cancellation O(1e-16 / eps): both far below 1e-6 of the scale */
    ck_assert_msg(worst <= 1e-6 * gmax, "%s: %s differs from finite differences by %.3g (scale %.3g) at %lld: %.10g vs %.10g",
                  P.desc, t[a].name, worst, gmax, (long long)at, t[a].g[at], fd[at]);
    free(fd);
  }
  free(dq), free(dk), free(dv);
  prob_free(&P);
}
END_TEST

/* Rows whose mask allows no key (causal with the queries before every key, a window that ends
 * before the key block, documents that do not meet): out = 0, lse = -inf, zero gradients, no
 * NaN; and a key block nothing sees gets zero dk/dv. */
START_TEST(test_ref_masked_rows) {
  int64_t cu[3] = {0, 40, 100};
  struct { unsigned flags; int64_t window; da_span_t qs, ks; int all_masked; } cases[] = {
      {DA_MASK_CAUSAL, 0, {0, 1, 20}, {20, 1, 30}, 1},
      {DA_MASK_WINDOW, 8, {60, 2, 15}, {0, 1, 40}, 1},
      {DA_MASK_DOC, 0, {0, 3, 13}, {40, 1, 60}, 1},
      {DA_MASK_CAUSAL | DA_MASK_DOC, 0, {30, 1, 30}, {40, 1, 10}, 0}, /* rows 30..39: other document */
      {DA_MASK_WINDOW | DA_MASK_DOC, 3, {30, 1, 20}, {0, 5, 20}, 0},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    uint64_t rs = tu_seed(400 + c);
    prob_t P;
    prob_init(&P, 4, 2, 8, cases[c].qs, cases[c].ks, 100, TU_MASK_NONE, &rs, tu_seed(rs));
    P.p.mask.flags = cases[c].flags;
    P.p.mask.window = cases[c].window;
    P.p.mask.ndocs = 2;
    P.p.mask.cu_seqlens = cu;
    char mdesc[96];
    snprintf(P.desc, sizeof P.desc, "masked-rows case %zu (%s)", c, da_mask_describe(&P.p.mask, mdesc, sizeof mdesc));
    const int H = 4, G = 2, D = 8;
    const int64_t nq = P.qs.count, nk = P.ks.count;
    double *out = dalloc(nq * H * D), *lse = dalloc(nq * H), *eo = dalloc(nq * H * D), *el = dalloc(nq * H);
    double *dq = dalloc(nq * H * D), *dk = dalloc(nk * G * D), *dv = dalloc(nk * G * D);
    ck_assert_int_eq(da_ref_fwd(&P.p, P.q, P.qs, P.k, P.v, P.ks, out, lse), DA_SUCCESS);
    ck_assert_int_eq(da_ref_bwd(&P.p, P.q, P.qs, P.k, P.v, P.ks, P.dout, dq, dk, dv), DA_SUCCESS);
    dense_fwd(&P.p, P.q, P.qp, nq, P.k, P.v, P.kp, nk, eo, el, NULL);
    int64_t masked = 0;
    for (int64_t i = 0; i < nq; i++) {
      int sees = 0;
      for (int64_t j = 0; j < nk; j++) sees |= naive_allows(&P.p.mask, P.qp[i], P.kp[j]);
      if (sees) continue;
      masked++;
      for (int h = 0; h < H; h++) {
        ck_assert_msg(lse[i * H + h] == -INFINITY, "case %zu: masked row %lld lse %g", c, (long long)i, lse[i * H + h]);
        for (int d = 0; d < D; d++) {
          ck_assert_msg(out[(i * H + h) * D + d] == 0.0, "case %zu: masked row %lld out %g", c, (long long)i,
                        out[(i * H + h) * D + d]);
          ck_assert_msg(dq[(i * H + h) * D + d] == 0.0, "case %zu: masked row %lld dq %g", c, (long long)i,
                        dq[(i * H + h) * D + d]);
        }
      }
    }
    ck_assert_msg(masked > 0, "case %zu: meant to hold fully masked rows", c);
    if (cases[c].all_masked) {
      ck_assert_int_eq(masked, nq);
      for (int64_t e = 0; e < nk * G * D; e++) ck_assert(dk[e] == 0.0 && dv[e] == 0.0);
    }
    TU_CHECK_CLOSE("out", eo, out, nq * H * D, H, D, D, REF_TOL, P.desc);
    TU_CHECK_LSE("lse", el, lse, nq * H, H, REF_TOL, P.desc);
    ck_assert_int_eq(tu_count_nan(out, nq * H * D) + tu_count_nan(lse, nq * H) + tu_count_nan(dq, nq * H * D) +
                         tu_count_nan(dk, nk * G * D) + tu_count_nan(dv, nk * G * D),
                     0);
    free(out), free(lse), free(eo), free(el), free(dq), free(dk), free(dv);
    prob_free(&P);
  }
}
END_TEST

/* NaN propagation as in the dense computation (decisions.md, "Fully masked rows"): one NaN put in
 * q (row i0, head h0), k or v (key j0, KV head g0, element d0). Asserted: a NaN in q makes row
 * (i0, h0) NaN in every element and in lse when that row sees any key; a NaN in k makes NaN every
 * row of the heads of g0 that sees key j0 (out and lse); a NaN in v makes NaN exactly element d0
 * of those rows, lse stays finite. Every other value equals the clean dense result. */
START_TEST(test_ref_nan_propagation) {
  const int H = 4, G = 2, D = 6, rep = H / G;
  for (int which = 0; which < 3; which++)
    for (int mkind = 0; mkind < TU_NMASKS; mkind++) {
      uint64_t rs = tu_seed(500 + (uint64_t)(which * 10 + mkind));
      const int64_t S = 40;
      prob_t P;
      prob_init(&P, H, G, D, da_span(0, 1, S), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
      const int64_t n = S;
      const int64_t i0 = tu_rand(&rs, 0, n - 1), j0 = tu_rand(&rs, 0, n - 1);
      const int h0 = (int)tu_rand(&rs, 0, H - 1), g0 = (int)tu_rand(&rs, 0, G - 1), d0 = (int)tu_rand(&rs, 0, D - 1);
      if (which == 0) P.q[(i0 * H + h0) * D + d0] = NAN;
      if (which == 1) P.k[(j0 * G + g0) * D + d0] = NAN;
      if (which == 2) P.v[(j0 * G + g0) * D + d0] = NAN;
      double *out = dalloc(n * H * D), *lse = dalloc(n * H), *eo = dalloc(n * H * D), *el = dalloc(n * H);
      ck_assert_int_eq(da_ref_fwd(&P.p, P.q, P.qs, P.k, P.v, P.ks, out, lse), DA_SUCCESS);
      dense_fwd(&P.p, P.q, P.qp, n, P.k, P.v, P.kp, n, eo, el, NULL);
      for (int64_t i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
          int sees_any = 0;
          for (int64_t j = 0; j < n; j++) sees_any |= naive_allows(&P.p.mask, P.qp[i], P.kp[j]);
          int sees_j0 = naive_allows(&P.p.mask, P.qp[i], P.kp[j0]) && h / rep == g0;
          int row_nan = (which == 0 && i == i0 && h == h0 && sees_any) || (which == 1 && sees_j0);
          for (int d = 0; d < D; d++) {
            int want_nan = row_nan || (which == 2 && sees_j0 && d == d0);
            double x = out[(i * H + h) * D + d], e = eo[(i * H + h) * D + d];
            ck_assert_msg(isnan(e) == want_nan, "dense side disagrees with the stated rule (%s)", P.desc);
            if (want_nan)
              ck_assert_msg(isnan(x), "%s: NaN in %c: out[%lld][%d][%d] = %g, expected NaN", P.desc, "qkv"[which],
                            (long long)i, h, d, x);
            else
              ck_assert_msg(fabs(x - e) <= REF_TOL * (1 + fabs(e)), "%s: NaN in %c: out[%lld][%d][%d] = %g, expected %g",
                            P.desc, "qkv"[which], (long long)i, h, d, x, e);
          }
          double L = lse[i * H + h];
          if (row_nan) ck_assert_msg(isnan(L), "%s: NaN in %c: lse[%lld][%d] = %g, expected NaN", P.desc, "qkv"[which], (long long)i, h, L);
          else if (!sees_any) ck_assert_msg(L == -INFINITY, "%s: masked row lse %g", P.desc, L);
          else ck_assert_msg(fabs(L - el[i * H + h]) <= REF_TOL * (1 + fabs(L)), "%s: NaN in %c: lse[%lld][%d] = %g, expected %g",
                             P.desc, "qkv"[which], (long long)i, h, L, el[i * H + h]);
        }
      free(out), free(lse), free(eo), free(el);
      prob_free(&P);
    }
}
END_TEST

/* Decode against pages (contiguous pages with padded row strides, given in shuffled order, or the
 * stride-P pages of a striped shard read in place with row stride P * G * D) equals ref_fwd over
 * the concatenated cache and the dense computation, for T new queries at the end. */
START_TEST(test_ref_decode_pages) {
  uint64_t rs = tu_seed(600 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS, striped = _i / TU_NMASKS;
  for (int rep = 0; rep < 3; rep++) {
    const int G = (int)tu_rand(&rs, 1, 2), H = G * ratios[tu_rand(&rs, 0, 2)], D = (int)tu_rand(&rs, 1, 24);
    const int64_t S = tu_rand(&rs, 5, 150), T = tu_rand(&rs, 1, 4 < S ? 4 : S);
    prob_t P;
    prob_init(&P, H, G, D, da_span(S - T, 1, T), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
    double *o1 = dalloc(T * H * D), *l1 = dalloc(T * H), *o2 = dalloc(T * H * D), *l2 = dalloc(T * H);
    double *eo = dalloc(T * H * D), *el = dalloc(T * H);
    ck_assert_int_eq(da_ref_fwd(&P.p, P.q, P.qs, P.k, P.v, P.ks, o1, l1), DA_SUCCESS);
    dense_fwd(&P.p, P.q, P.qp, T, P.k, P.v, P.kp, S, eo, el, NULL);
    TU_CHECK_CLOSE("fwd out", eo, o1, T * H * D, H, D, D, REF_TOL, P.desc);

    da_kvpage_t pages[8];
    int npages = 0;
    double *bufs[16] = {0};
    if (striped) {
      const int64_t Pr = tu_rand(&rs, 2, 5);
      for (int64_t r = 0; r < Pr && r < S; r++) {
        pages[npages].k = P.k + r * G * D;
        pages[npages].v = P.v + r * G * D;
        pages[npages].ldk = pages[npages].ldv = Pr * G * D;
        pages[npages++].pos = da_span(r, Pr, (S - r + Pr - 1) / Pr);
      }
    } else {
      for (int64_t j = 0; j < S && npages < 8;) {
        int64_t n = npages == 7 ? S - j : tu_rand(&rs, 1, S - j);
        int64_t ldk = G * D + tu_rand(&rs, 0, 5), ldv = G * D + tu_rand(&rs, 0, 5);
        double *kb = dalloc(n * ldk), *vb = dalloc(n * ldv);
        for (int64_t i = 0; i < n; i++) {
          memcpy(kb + i * ldk, P.k + (j + i) * G * D, (size_t)(G * D) * sizeof(double));
          memcpy(vb + i * ldv, P.v + (j + i) * G * D, (size_t)(G * D) * sizeof(double));
        }
        bufs[2 * npages] = kb, bufs[2 * npages + 1] = vb;
        pages[npages] = (da_kvpage_t){kb, vb, ldk, ldv, da_span(j, 1, n)};
        npages++;
        j += n;
      }
    }
    for (int i = npages - 1; i > 0; i--) {
      int j = (int)tu_rand(&rs, 0, i);
      da_kvpage_t t = pages[i];
      pages[i] = pages[j];
      pages[j] = t;
    }
    ck_assert_int_eq(da_ref_decode(&P.p, P.q, P.qs, pages, npages, o2, l2), DA_SUCCESS);
    TU_CHECK_CLOSE("decode out", o1, o2, T * H * D, H, D, D, REF_TOL, P.desc);
    TU_CHECK_LSE("decode lse", l1, l2, T * H, H, REF_TOL, P.desc);
    TU_CHECK_LSE("decode lse vs dense", el, l2, T * H, H, REF_TOL, P.desc);
    for (int i = 0; i < 16; i++) free(bufs[i]);
    free(o1), free(l1), free(o2), free(l2), free(eo), free(el);
    prob_free(&P);
  }
}
END_TEST

static Suite *ref_suite(void) {
  Suite *s = suite_create("ref");
  TCase *tc = tcase_create("dense");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_ref_vs_dense, 0, 6 * TU_NMASKS);
  tcase_add_loop_test(tc, test_ref_streaming, 0, TU_NMASKS);
  tcase_add_loop_test(tc, test_ref_finite_difference, 0, 2 * TU_NMASKS);
  tcase_add_test(tc, test_ref_masked_rows);
  tcase_add_test(tc, test_ref_nan_propagation);
  suite_add_tcase(s, tc);

  tc = tcase_create("decode");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_ref_decode_pages, 0, 2 * TU_NMASKS);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return tu_run(ref_suite());
}
