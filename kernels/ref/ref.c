/* ref.c: float64 reference attention. Plain loops over (query, head, key), a two-pass softmax per
 * block of keys folded with the same (o, m, l) recurrence the fast kernels use, so the
 * streaming verifier and the one-shot reference are the same code. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ref.h"

da_status_t da_ref_state_alloc(const da_kparams_t *p, int64_t nq, da_ref_state_t *st) {
  st->nq = nq;
  size_t rows = (size_t)(nq > 0 ? nq : 1) * (size_t)p->H;
  st->o = calloc(rows * (size_t)p->D, sizeof(double));
  st->m = malloc(rows * sizeof(double));
  st->l = calloc(rows, sizeof(double));
  if (!st->o || !st->m || !st->l) {
    da_ref_state_free(st);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "reference state for %lld rows", (long long)nq);
  }
  for (size_t i = 0; i < rows; i++) st->m[i] = -INFINITY;
  return DA_SUCCESS;
}

void da_ref_state_free(da_ref_state_t *st) {
  free(st->o);
  free(st->m);
  free(st->l);
  st->o = st->m = st->l = NULL;
}

static double dot(const double *a, const double *b, int D) {
  double s = 0;
  for (int d = 0; d < D; d++) s += a[d] * b[d];
  return s;
}

void da_ref_fwd_accum(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                      const double *v, da_span_t kpos, da_ref_state_t *st) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G;
  double *s = malloc((size_t)(kpos.count > 0 ? kpos.count : 1) * sizeof(double));
  if (!s) abort(); /* reference in tests only */
  for (int64_t i = 0; i < qpos.count; i++) {
    int64_t qp = da_span_at(qpos, i);
    for (int h = 0; h < H; h++) {
      const double *qi = q + (i * H + h) * D;
      int g = h / rep;
      double bmax = -INFINITY;
      int seen = 0;
      for (int64_t j = 0; j < kpos.count; j++) {
        if (!da_mask_allows(&p->mask, qp, da_span_at(kpos, j))) {
          s[j] = -INFINITY;
          continue;
        }
        s[j] = (double)p->scale * dot(qi, k + (j * G + g) * D, D);
        seen = 1;
        if (s[j] > bmax || isnan(s[j])) bmax = s[j]; /* a NaN score poisons the row, as dense */
      }
      if (!seen) continue; /* nothing visible in this block */
      double *o = st->o + (i * H + h) * D, *m = st->m + i * H + h, *l = st->l + i * H + h;
      double mnew = *m > bmax ? *m : bmax;
      double alpha = exp(*m - mnew); /* exp(-inf) = 0 on the first visible block */
      *l *= alpha;
      for (int d = 0; d < D; d++) o[d] *= alpha;
      for (int64_t j = 0; j < kpos.count; j++) {
        if (s[j] == -INFINITY) continue;
        double pj = exp(s[j] - mnew);
        *l += pj;
        const double *vj = v + (j * G + g) * D;
        for (int d = 0; d < D; d++) o[d] += pj * vj[d];
      }
      *m = mnew;
    }
  }
  free(s);
}

void da_ref_fwd_finish(const da_kparams_t *p, const da_ref_state_t *st, double *out, double *lse) {
  const int H = p->H, D = p->D;
  for (int64_t r = 0; r < st->nq * H; r++) {
    double l = st->l[r];
    /* l == 0 only for a row that saw no key (l >= 1 after any visible one, or NaN) */
    for (int d = 0; d < D; d++) out[r * D + d] = l != 0 ? st->o[r * D + d] / l : 0.0;
    if (lse) lse[r] = l != 0 ? st->m[r] + log(l) : -INFINITY;
  }
}

da_status_t da_ref_fwd(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                       const double *v, da_span_t kpos, double *out, double *lse) {
  da_ref_state_t st;
  DA_CHECK(da_ref_state_alloc(p, qpos.count, &st));
  da_ref_fwd_accum(p, q, qpos, k, v, kpos, &st);
  da_ref_fwd_finish(p, &st, out, lse);
  da_ref_state_free(&st);
  return DA_SUCCESS;
}

/* P = softmax(S) row-wise, dP = dout . v^T, dS = P * (dP - delta) with delta = rowsum(dout*out),
 * dq = scale * dS k, dk = scale * dS^T q, dv = P^T dout. */
da_status_t da_ref_bwd(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                       const double *v, da_span_t kpos, const double *dout, double *dq, double *dk,
                       double *dv) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G;
  const int64_t nq = qpos.count, nk = kpos.count;
  double *out = malloc((size_t)(nq > 0 ? nq : 1) * H * D * sizeof(double));
  double *lse = malloc((size_t)(nq > 0 ? nq : 1) * H * sizeof(double));
  if (!out || !lse) {
    free(out);
    free(lse);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "reference backward");
  }
  da_status_t st = da_ref_fwd(p, q, qpos, k, v, kpos, out, lse);
  if (st != DA_SUCCESS) {
    free(out);
    free(lse);
    return st;
  }
  memset(dq, 0, (size_t)nq * H * D * sizeof(double));
  memset(dk, 0, (size_t)nk * G * D * sizeof(double));
  memset(dv, 0, (size_t)nk * G * D * sizeof(double));
  for (int64_t i = 0; i < nq; i++) {
    int64_t qp = da_span_at(qpos, i);
    for (int h = 0; h < H; h++) {
      int g = h / rep;
      const double *qi = q + (i * H + h) * D, *doi = dout + (i * H + h) * D;
      double L = lse[i * H + h];
      if (L == -INFINITY) continue;
      double delta = dot(doi, out + (i * H + h) * D, D);
      for (int64_t j = 0; j < nk; j++) {
        if (!da_mask_allows(&p->mask, qp, da_span_at(kpos, j))) continue;
        const double *kj = k + (j * G + g) * D, *vj = v + (j * G + g) * D;
        double pij = exp((double)p->scale * dot(qi, kj, D) - L);
        double dpij = dot(doi, vj, D);
        double ds = pij * (dpij - delta);
        for (int d = 0; d < D; d++) {
          dq[(i * H + h) * D + d] += (double)p->scale * ds * kj[d];
          dk[(j * G + g) * D + d] += (double)p->scale * ds * qi[d];
          dv[(j * G + g) * D + d] += pij * doi[d];
        }
      }
    }
  }
  free(out);
  free(lse);
  return DA_SUCCESS;
}

da_status_t da_ref_decode(const da_kparams_t *p, const double *q, da_span_t qpos,
                          const da_kvpage_t *pages, int npages, double *out, double *lse) {
  const int G = p->G, D = p->D;
  da_ref_state_t st;
  DA_CHECK(da_ref_state_alloc(p, qpos.count, &st));
  for (int pg = 0; pg < npages; pg++) {
    const da_kvpage_t *pp = &pages[pg];
    int64_t n = pp->pos.count;
    double *kk = malloc((size_t)(n > 0 ? n : 1) * G * D * sizeof(double));
    double *vv = malloc((size_t)(n > 0 ? n : 1) * G * D * sizeof(double));
    if (!kk || !vv) {
      free(kk);
      free(vv);
      da_ref_state_free(&st);
      return DA_ERR(DA_ERR_OUT_OF_MEMORY, "reference decode");
    }
    for (int64_t j = 0; j < n; j++) {
      memcpy(kk + j * G * D, (const double *)pp->k + j * pp->ldk, (size_t)G * D * sizeof(double));
      memcpy(vv + j * G * D, (const double *)pp->v + j * pp->ldv, (size_t)G * D * sizeof(double));
    }
    da_ref_fwd_accum(p, q, qpos, kk, vv, pp->pos, &st);
    free(kk);
    free(vv);
  }
  da_ref_fwd_finish(p, &st, out, lse);
  da_ref_state_free(&st);
  return DA_SUCCESS;
}
