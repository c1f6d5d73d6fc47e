/* ulysses.h: the Ulysses driver of comm/ (DeepSpeed-Ulysses sequence parallelism, forward and
 * backward) as the plan sees it. It runs over the ring driver's struct (da_ring_t: the contiguous
 * layout, kernel table and parameters, transport, mode, stats), of which it uses everything but
 * the schedule and the ring buffers; its own buffers live for one call. Internal to comm/. */
#ifndef DA_ULYSSES_H
#define DA_ULYSSES_H

#include "ring.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Can P ranks run Ulysses on kernel params kp over transport t? H % P == 0 (each rank takes H/P
 * query heads), and the KV heads split evenly (G % P == 0: G/P KV heads per rank) or are
 * replicated per group (P % G == 0: each rank takes the one KV head its query heads read);
 * the transport needs an all-to-all. DA_ERR_UNSUPPORTED with a message naming what fails. */
da_status_t da_ulysses_check(const da_kparams_t *kp, int P, const da_transport_t *t);

/* Bytes this rank allocates for one forward / one backward call (the whole sequence for H/P
 * heads: Ulysses' memory by design), and bytes it sends to other ranks per call. */
size_t da_ulysses_fwd_bytes(const da_ring_t *R);
size_t da_ulysses_bwd_bytes(const da_ring_t *R);
uint64_t da_ulysses_fwd_comm_bytes(const da_ring_t *R);
uint64_t da_ulysses_bwd_comm_bytes(const da_ring_t *R);

/* Same contracts as da_ring_fwd / da_ring_bwd (ring.h), on the contiguous layout. */
da_status_t da_ulysses_fwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                           void *stream);
da_status_t da_ulysses_bwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                           da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                           void *stream);

#ifdef __cplusplus
}
#endif
#endif /* DA_ULYSSES_H */
