/* cpu.c: interim scalar CPU backend (plain loops, fp32 state), correct for every mask, dtype and
 * GQA ratio; replaced by the blocked, vectorized kernels. Not fast. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "dtype.h"
#include "kernels.h"

static da_status_t sup(const da_kparams_t *p) {
  DA_CHECK(da_kparams_check(p));
  if (p->D > 256) return DA_ERR(DA_ERR_UNSUPPORTED, "cpu backend: head dim %d > 256", p->D);
  return DA_SUCCESS;
}

static float dotx(const void *a, const void *b, int dt, int D) {
  float s = 0;
  for (int d = 0; d < D; d++) s += da_load_f32(a, dt, d) * da_load_f32(b, dt, d);
  return s;
}

static da_status_t fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                             const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                             da_fwd_state_t *st, void *stream) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G, dt = (int)p->dtype;
  const size_t es = da_dtype_size(p->dtype);
#pragma omp parallel for collapse(2) schedule(dynamic, 4) num_threads(p->nthreads > 0 ? p->nthreads : 1)
  for (int64_t i = 0; i < qpos.count; i++)
    for (int h = 0; h < H; h++) {
      const char *qi = (const char *)q + (size_t)(i * ldq + h * D) * es;
      int64_t qp = da_span_at(qpos, i);
      float *o = st->o + (i * H + h) * D, *m = st->m + i * H + h, *l = st->l + i * H + h;
      int g = h / rep;
      for (int64_t j = 0; j < kpos.count; j++) {
        if (!da_mask_allows(&p->mask, qp, da_span_at(kpos, j))) continue;
        const char *kj = (const char *)k + (size_t)(j * ldk + g * D) * es;
        const char *vj = (const char *)v + (size_t)(j * ldv + g * D) * es;
        float s = p->scale * dotx(qi, kj, dt, D);
        float mn = s > *m ? s : *m;
        float a = expf(*m - mn), e = expf(s - mn);
        *l = *l * a + e;
        for (int d = 0; d < D; d++) o[d] = o[d] * a + e * da_load_f32(vj, dt, d);
        *m = mn;
      }
    }
  return DA_SUCCESS;
}

static da_status_t fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out, da_dtype_t odt,
                              int64_t ldo, float *lse, void *stream) {
  const int H = p->H, D = p->D;
  const size_t es = da_dtype_size(odt);
  for (int64_t i = 0; i < st->nq; i++)
    for (int h = 0; h < H; h++) {
      float l = st->l[i * H + h];
      char *dst = (char *)out + (size_t)(i * ldo + h * D) * es;
      for (int d = 0; d < D; d++) da_store_f32(dst, (int)odt, d, l > 0 ? st->o[(i * H + h) * D + d] / l : 0.0f);
      if (lse) lse[i * H + h] = l > 0 ? st->m[i * H + h] + logf(l) : -INFINITY;
    }
  return DA_SUCCESS;
}

static da_status_t merge(const da_kparams_t *p, int64_t n, float *oa, float *la, const float *ob, const float *lb,
                         void *stream) {
  const int H = p->H, D = p->D;
  for (int64_t r = 0; r < n * H; r++) {
    float a = la[r], b = lb[r];
    if (b == -INFINITY) continue;
    if (a == -INFINITY) {
      memcpy(oa + r * D, ob + r * D, (size_t)D * 4);
      la[r] = b;
      continue;
    }
    float mx = a > b ? a : b, wa = expf(a - mx), wb = expf(b - mx), s = wa + wb;
    for (int d = 0; d < D; d++) oa[r * D + d] = (wa * oa[r * D + d] + wb * ob[r * D + d]) / s;
    la[r] = mx + logf(s);
  }
  return DA_SUCCESS;
}

static da_status_t bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo, const void *dout,
                            int64_t lddo, float *delta, void *stream) {
  const int H = p->H, D = p->D, dt = (int)p->dtype;
  const size_t es = da_dtype_size(p->dtype);
  for (int64_t i = 0; i < nq; i++)
    for (int h = 0; h < H; h++)
      delta[i * H + h] = dotx((const char *)out + (size_t)(i * ldo + h * D) * es,
                              (const char *)dout + (size_t)(i * lddo + h * D) * es, dt, D);
  return DA_SUCCESS;
}

static da_status_t bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout, int64_t lddo,
                             const float *lse, const float *delta, da_span_t qpos, const void *k, int64_t ldk,
                             const void *v, int64_t ldv, da_span_t kpos, float *dq, float *dk, float *dv,
                             void *stream) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G, dt = (int)p->dtype;
  const size_t es = da_dtype_size(p->dtype);
  for (int64_t i = 0; i < qpos.count; i++)
    for (int h = 0; h < H; h++) {
      float L = lse[i * H + h];
      if (L == -INFINITY) continue;
      const char *qi = (const char *)q + (size_t)(i * ldq + h * D) * es;
      const char *doi = (const char *)dout + (size_t)(i * lddo + h * D) * es;
      int64_t qp = da_span_at(qpos, i);
      int g = h / rep;
      for (int64_t j = 0; j < kpos.count; j++) {
        if (!da_mask_allows(&p->mask, qp, da_span_at(kpos, j))) continue;
        const char *kj = (const char *)k + (size_t)(j * ldk + g * D) * es;
        const char *vj = (const char *)v + (size_t)(j * ldv + g * D) * es;
        float pij = expf(p->scale * dotx(qi, kj, dt, D) - L);
        float ds = pij * (dotx(doi, vj, dt, D) - delta[i * H + h]);
        for (int d = 0; d < D; d++) {
          dq[(i * H + h) * D + d] += p->scale * ds * da_load_f32(kj, dt, d);
          dk[(j * G + g) * D + d] += p->scale * ds * da_load_f32(qi, dt, d);
          dv[(j * G + g) * D + d] += pij * da_load_f32(doi, dt, d);
        }
      }
    }
  return DA_SUCCESS;
}

static da_status_t decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                          const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream) {
  const int H = p->H, D = p->D;
  float *m = malloc((size_t)(qpos.count * H) * 4), *l = malloc((size_t)(qpos.count * H) * 4);
  if (!m || !l) {
    free(m), free(l);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "decode state");
  }
  da_fwd_state_t st = {o, m, l, qpos.count};
  da_fwd_state_init_host(p, &st);
  for (int pg = 0; pg < npages; pg++)
    fwd_block(p, q, ldq, qpos, pages[pg].k, pages[pg].ldk, pages[pg].v, pages[pg].ldv, pages[pg].pos, &st, stream);
  fwd_finish(p, &st, o, DA_FLOAT32, (int64_t)H * D, lse, stream);
  free(m), free(l);
  return DA_SUCCESS;
}

const da_kernels_t da_kernels_cpu = {
    .name = "cpu",
    .supports = sup,
    .fwd_block = fwd_block,
    .fwd_finish = fwd_finish,
    .merge = merge,
    .bwd_prep = bwd_prep,
    .bwd_block = bwd_block,
    .decode = decode,
};
