/* ref.h: the float64 reference of distattn, written to read like the math, slow on purpose.
 * It is the oracle every backend and every distributed algorithm is tested against. Tensors are
 * double and packed: q, out, dout, dq [n][H][D]; k, v, dk, dv [n][G][D]; lse [n][H]. */
#ifndef DA_REF_H
#define DA_REF_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Streaming state (o unnormalized, m, l) in double for nq rows, so a verifier can fold keys in
 * chunks without holding them all. */
typedef struct da_ref_state {
  int64_t nq;
  double *o, *m, *l; /* [nq][H][D], [nq][H], [nq][H] */
} da_ref_state_t;

da_status_t da_ref_state_alloc(const da_kparams_t *p, int64_t nq, da_ref_state_t *st);
void da_ref_state_free(da_ref_state_t *st);
/* Fold nk keys at positions kpos into the state of queries q at positions qpos. */
void da_ref_fwd_accum(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                      const double *v, da_span_t kpos, da_ref_state_t *st);
/* out = o / l, lse = m + log l; rows with no allowed key: out = 0, lse = -inf. */
void da_ref_fwd_finish(const da_kparams_t *p, const da_ref_state_t *st, double *out, double *lse);

/* Forward of queries qpos against keys kpos (out and lse as in fwd_finish). */
da_status_t da_ref_fwd(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                       const double *v, da_span_t kpos, double *out, double *lse);

/* Backward: gradients of sum(dout * out) with out = attention(q, k, v). dq, dk, dv are
 * overwritten. out/lse are recomputed inside. */
da_status_t da_ref_bwd(const da_kparams_t *p, const double *q, da_span_t qpos, const double *k,
                       const double *v, da_span_t kpos, const double *dout, double *dq, double *dk,
                       double *dv);

/* Decode against a paged shard: pages hold double k/v rows [count][G][D] (ldk/ldv in elements). */
da_status_t da_ref_decode(const da_kparams_t *p, const double *q, da_span_t qpos,
                          const da_kvpage_t *pages, int npages, double *out, double *lse);

#ifdef __cplusplus
}
#endif
#endif /* DA_REF_H */
