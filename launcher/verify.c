/* verify.c: float64 recomputation of sampled rows of a distributed run (see verify.h). Plain loops
 * that read like the math; speed comes only from streaming keys in chunks and skipping the keys
 * (or queries) a row's mask interval excludes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dtype.h"
#include "env.h"
#include "core.h"
#include "ref.h"
#include "rng.h"
#include "verify.h"

#define CHUNK 256 /* keys (or queries) regenerated at a time */

uint64_t da_verify_seed(uint64_t seed, int64_t b) { return seed + 0x9E3779B97F4A7C15ull * (uint64_t)b; }

/* ---- DISTATTN_TEST_NONFINITE (parsed by core/env.c, its table's one parser) ---- */
static da_env_poison_t poison[DA_ENV_POISON_MAX];
static int npoison = -1; /* -1: not parsed yet */

int da_verify_poison_init(char *err, size_t n) {
  npoison = 0;
  if (da_env_poison("DISTATTN_TEST_NONFINITE", poison, &npoison) != DA_SUCCESS) {
    snprintf(err, n, "%s", da_error_message());
    npoison = 0;
    return -1;
  }
  return 0;
}

void da_verify_poison(uint32_t tensor, int64_t pos, int h, float *row) {
  if (npoison < 0) {
    char err[8];
    da_verify_poison_init(err, sizeof err);
  }
  static const uint32_t tensors[] = {DA_RNG_Q, DA_RNG_K, DA_RNG_V, DA_RNG_DOUT}; /* env.c's order */
  for (int i = 0; i < npoison; i++)
    if (h == 0 && tensors[poison[i].tensor] == tensor && poison[i].pos == pos) row[0] = poison[i].value;
}

int64_t da_count_nonfinite(const void *x, da_dtype_t dt, int64_t n) {
  int64_t c = 0;
  if (dt == DA_FLOAT32) {
    const float *f = x;
    for (int64_t i = 0; i < n; i++) c += !isfinite(f[i]);
  } else {
    for (int64_t i = 0; i < n; i++) c += !isfinite(da_load_f32(x, (int)dt, i));
  }
  return c;
}

/* Row (pos) of a tensor as rounded doubles [heads][D], from the row source or the RNG. */
static int gen_row64(const da_vprob_t *vp, uint32_t tensor, int64_t b, int64_t pos, int heads, double *dst, float *tmp) {
  const int D = vp->kp.D;
  if (vp->rows) return vp->rows(vp->rows_ctx, tensor, b, pos, heads, dst);
  for (int h = 0; h < heads; h++) {
    da_rng_row(da_verify_seed(vp->seed, b), tensor, pos, h, D, tmp);
    da_verify_poison(tensor, pos, h, tmp);
    for (int d = 0; d < D; d++) dst[h * D + d] = da_round_to((int)vp->kp.dtype, tmp[d]);
  }
  return 0;
}

/* Row (pos) of the two tensors the checks always read together, q and dout (H heads) or k and v
 * (G heads), into x1 and x2: 0, or -1 when either fails. */
static int gen_pair64(const da_vprob_t *vp, uint32_t t1, uint32_t t2, int64_t b, int64_t pos, int heads, double *x1,
                      double *x2, float *tmp) {
  return gen_row64(vp, t1, b, pos, heads, x1, tmp) || gen_row64(vp, t2, b, pos, heads, x2, tmp) ? -1 : 0;
}

void da_verify_gen(const da_vprob_t *vp, uint32_t tensor, int64_t b, const int64_t *pos, int64_t n, int heads,
                   void *buf, int64_t ld) {
  const int D = vp->kp.D;
  float *tmp = malloc((size_t)D * sizeof(float));
  if (!tmp) return;
  for (int64_t i = 0; i < n; i++)
    for (int h = 0; h < heads; h++) {
      da_rng_row(da_verify_seed(vp->seed, b), tensor, pos[i], h, D, tmp);
      da_verify_poison(tensor, pos[i], h, tmp);
      for (int d = 0; d < D; d++) da_store_f32(buf, (int)vp->kp.dtype, i * ld + (int64_t)h * D + d, tmp[d]);
    }
  free(tmp);
}

static double dot(const double *a, const double *b, int D) {
  double s = 0;
  for (int d = 0; d < D; d++) s += a[d] * b[d];
  return s;
}

int da_verify_fwd_row(const da_vprob_t *vp, int64_t b, int64_t qpos, double *out, double *lse) {
  const int H = vp->kp.H, G = vp->kp.G, D = vp->kp.D;
  int64_t lo, hi;
  da_mask_row_range(&vp->kp.mask, qpos, 0, vp->S - 1, &lo, &hi);
  double *q = malloc((size_t)H * D * 8), *k = malloc((size_t)CHUNK * G * D * 8), *v = malloc((size_t)CHUNK * G * D * 8);
  float *tmp = malloc((size_t)D * 4);
  da_ref_state_t st = {0};
  int rc = -1;
  if (!q || !k || !v || !tmp || da_ref_state_alloc(&vp->kp, 1, &st) != DA_SUCCESS) goto out;
  if (gen_row64(vp, DA_RNG_Q, b, qpos, H, q, tmp)) goto out;
  for (int64_t k0 = lo; k0 <= hi; k0 += CHUNK) {
    int64_t n = hi - k0 + 1 < CHUNK ? hi - k0 + 1 : CHUNK;
    for (int64_t j = 0; j < n; j++)
      if (gen_pair64(vp, DA_RNG_K, DA_RNG_V, b, k0 + j, G, k + j * G * D, v + j * G * D, tmp)) goto out;
    da_ref_fwd_accum(&vp->kp, q, da_span(qpos, 1, 1), k, v, da_span(k0, 1, n), &st);
  }
  da_ref_fwd_finish(&vp->kp, &st, out, lse);
  rc = 0;
out:
  da_ref_state_free(&st);
  free(q), free(k), free(v), free(tmp);
  return rc;
}

/* The unit roundoff of the fp32 arithmetic every kernel does its softmax statistics in. */
#define U32 (1.0 / 16777216.0)

/* Rounding noise of one pair's dS = P * (dP - delta) when dP = dout . v and delta = dout . out are
 * evaluated in fp32: u times the magnitudes that cancel (the terms of the dot product, delta,
 * and lse through P = exp(s - lse)). */
static double ds_noise(double p, double dp_abs, double delta, double lse, double ds_over_p) {
  return U32 * p * (dp_abs + fabs(delta) + fabs(lse) * fabs(ds_over_p));
}

static double dot_abs(const double *a, const double *b, int D) {
  double s = 0;
  for (int d = 0; d < D; d++) s += fabs(a[d] * b[d]);
  return s;
}

/* The largest sqrt(sum of squares) of each of n vectors of D sums: the rms noise of a row. */
static void noise_rows(const double *ss, int n, int D, double *noise) {
  for (int i = 0; i < n; i++) {
    double m = 0;
    for (int d = 0; d < D; d++) m = fmax(m, ss[i * D + d]);
    noise[i] = sqrt(m);
  }
}

int da_verify_dq_row(const da_vprob_t *vp, int64_t b, int64_t qpos, const double *out, const double *lse,
                     double *dq, double *noise) {
  const int H = vp->kp.H, G = vp->kp.G, D = vp->kp.D, rep = H / G;
  const double scale = vp->kp.scale;
  int64_t lo, hi;
  da_mask_row_range(&vp->kp.mask, qpos, 0, vp->S - 1, &lo, &hi);
  double *q = malloc((size_t)H * D * 8), *dout = malloc((size_t)H * D * 8), *delta = malloc((size_t)H * 8);
  double *k = malloc((size_t)G * D * 8), *v = malloc((size_t)G * D * 8), *ss = calloc((size_t)H * D, 8);
  float *tmp = malloc((size_t)D * 4);
  if (!q || !dout || !delta || !k || !v || !tmp || !ss) {
    free(q), free(dout), free(delta), free(k), free(v), free(tmp), free(ss);
    return -1;
  }
  int rc = gen_pair64(vp, DA_RNG_Q, DA_RNG_DOUT, b, qpos, H, q, dout, tmp);
  for (int h = 0; h < H; h++) delta[h] = dot(dout + h * D, out + h * D, D);
  memset(dq, 0, (size_t)H * D * 8);
  for (int64_t kp = lo; kp <= hi && !rc; kp++) {
    if (!da_mask_allows(&vp->kp.mask, qpos, kp)) continue;
    if ((rc = gen_pair64(vp, DA_RNG_K, DA_RNG_V, b, kp, G, k, v, tmp))) break;
    for (int h = 0; h < H; h++) {
      if (lse[h] == -INFINITY) continue;
      const double *kg = k + (h / rep) * D, *vg = v + (h / rep) * D;
      double p = exp(scale * dot(q + h * D, kg, D) - lse[h]);
      double dp = dot(dout + h * D, vg, D), ds = p * (dp - delta[h]);
      double n = scale * ds_noise(p, dot_abs(dout + h * D, vg, D), delta[h], lse[h], dp - delta[h]);
      for (int d = 0; d < D; d++) {
        dq[h * D + d] += scale * ds * kg[d];
        ss[h * D + d] += (n * kg[d]) * (n * kg[d]);
      }
    }
  }
  noise_rows(ss, H, D, noise);
  free(q), free(dout), free(delta), free(k), free(v), free(tmp), free(ss);
  return rc;
}

/* Queries that can see key kpos form an interval as well (the masks are intervals per row). */
static void col_range(const da_mask_t *m, int64_t kpos, int64_t S, int64_t *lo, int64_t *hi) {
  int64_t a = 0, z = S - 1;
  if (m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) a = kpos;
  if ((m->flags & DA_MASK_WINDOW) && z > kpos + m->window - 1) z = kpos + m->window - 1;
  if (m->flags & DA_MASK_DOC) {
    int64_t d = da_mask_doc_of(m, kpos);
    if (d < m->ndocs) {
      if (a < m->cu_seqlens[d]) a = m->cu_seqlens[d];
      if (z > m->cu_seqlens[d + 1] - 1) z = m->cu_seqlens[d + 1] - 1;
    }
  }
  *lo = a, *hi = z;
}

int da_verify_dkv_row(const da_vprob_t *vp, int64_t b, int64_t kpos, const float *lse_all, const float *delta_all,
                      double *dk, double *dv, double *noise_k, double *noise_v) {
  const int H = vp->kp.H, G = vp->kp.G, D = vp->kp.D, rep = H / G;
  const double scale = vp->kp.scale;
  int64_t lo, hi;
  col_range(&vp->kp.mask, kpos, vp->S, &lo, &hi);
  double *q = malloc((size_t)H * D * 8), *dout = malloc((size_t)H * D * 8);
  double *k = malloc((size_t)G * D * 8), *v = malloc((size_t)G * D * 8);
  double *ssk = calloc((size_t)G * D, 8), *ssv = calloc((size_t)G * D, 8);
  float *tmp = malloc((size_t)D * 4);
  if (!q || !dout || !k || !v || !tmp || !ssk || !ssv) {
    free(q), free(dout), free(k), free(v), free(tmp), free(ssk), free(ssv);
    return -1;
  }
  int rc = gen_pair64(vp, DA_RNG_K, DA_RNG_V, b, kpos, G, k, v, tmp);
  memset(dk, 0, (size_t)G * D * 8);
  memset(dv, 0, (size_t)G * D * 8);
  for (int64_t qp = lo; qp <= hi && !rc; qp++) {
    if (!da_mask_allows(&vp->kp.mask, qp, kpos)) continue;
    if ((rc = gen_pair64(vp, DA_RNG_Q, DA_RNG_DOUT, b, qp, H, q, dout, tmp))) break;
    for (int h = 0; h < H; h++) {
      double L = lse_all[qp * H + h];
      if (L == -INFINITY) continue;
      const int g = h / rep;
      const double *kg = k + g * D, *vg = v + g * D, *qh = q + h * D, *doh = dout + h * D;
      double p = exp(scale * dot(qh, kg, D) - L), delta = delta_all[qp * H + h];
      double dp = dot(doh, vg, D), ds = p * (dp - delta);
      /* dk: the pair's dS noise; dv: P's, through lse (and the exponential's own rounding) */
      double nk = scale * ds_noise(p, dot_abs(doh, vg, D), delta, L, dp - delta), nv = U32 * p * (1 + fabs(L));
      for (int d = 0; d < D; d++) {
        dk[g * D + d] += scale * ds * qh[d];
        dv[g * D + d] += p * doh[d];
        ssk[g * D + d] += (nk * qh[d]) * (nk * qh[d]);
        ssv[g * D + d] += (nv * doh[d]) * (nv * doh[d]);
      }
    }
  }
  noise_rows(ssk, G, D, noise_k);
  noise_rows(ssv, G, D, noise_v);
  free(q), free(dout), free(k), free(v), free(tmp), free(ssk), free(ssv);
  return rc;
}

void da_verify_err(const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len, double *abs_err,
                   double *ref_max) {
  double e = 0, m = 0;
  for (int64_t j = 0; j < len; j++) {
    double a = da_load_f32(x, (int)dt, off + j), d = fabs(a - ref[j]);
    if (!(d <= e)) e = isnan(d) ? INFINITY : d;
    if (fabs(ref[j]) > m) m = fabs(ref[j]);
    if (!isfinite(ref[j])) m = NAN; /* and stays NaN: fabs(ref) > NaN is false */
  }
  *abs_err = e;
  *ref_max = m;
}

double da_verify_rel(const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len, double *abs_err) {
  double m;
  da_verify_err(x, dt, off, ref, len, abs_err, &m);
  if (isnan(m)) return NAN; /* a non-finite reference: no error to measure */
  return *abs_err / (m > 1e-6 ? m : 1e-6);
}
