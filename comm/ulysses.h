/* ulysses.h: the Ulysses driver of comm/ (DeepSpeed-Ulysses sequence parallelism, forward and
 * backward) and the hybrid Ulysses x ring driver built from it, as the plan sees them. Ulysses
 * runs over the ring driver's struct (da_ring_t: the contiguous layout, kernel table and
 * parameters, transport, mode, stats), of which it uses everything but the schedule and the ring
 * buffers; its own buffers live for one call. The hybrid is Ulysses inside groups of U ranks
 * whose compute phase is the unchanged ring driver across the groups (docs/ulysses.md).
 * Internal to comm/. */
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

/* ---- the phases, for drivers built on Ulysses' exchanges (the hybrid) ----
 * A call is: tokens -> heads all-to-alls, a compute phase on the gathered rows, heads -> tokens
 * all-to-alls home. The gathered rows are in source order: row (src, t, b, i) of nt tensors sent
 * together is at da_ulysses_row(R, nt, src, t, b, i) (in rows of that tensor's width). */
int64_t da_ulysses_row(const da_ring_t *R, int nt, int src, int t, int64_t b, int64_t i);

/* What the compute phase reads and writes, gathered in source order. Forward: q (nt 1), kv (k, v:
 * nt 2) in, out (dtype) and lse_out (fp32, H/P per row) out; o, ml: pure Ulysses' fp32 state.
 * Backward: q (q, out, dout: nt 3), kv, lse in; dq (nt 1), dkv (nt 2) out in fp32; delta: pure
 * Ulysses' scratch. */
typedef struct da_uly_io {
  const char *q, *kv;
  const float *lse;
  char *out;
  float *lse_out, *dq, *dkv;
  float *o, *ml, *delta;
} da_uly_io_t;
typedef da_status_t (*da_uly_compute_fn)(da_ring_t *R, const da_uly_io_t *io, void *ctx, void *stream);

/* da_ulysses_fwd / _bwd with another compute phase (called in every mode but compute-only's
 * skipped exchanges; its failure still sends the results home). */
da_status_t da_ulysses_fwd_with(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                                da_uly_compute_fn compute, void *ctx, void *stream);
da_status_t da_ulysses_bwd_with(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                                da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                                da_uly_compute_fn compute, void *ctx, void *stream);
/* Bytes of one call's exchange buffers without pure Ulysses' compute scratch. */
size_t da_ulysses_xchg_fwd_bytes(const da_ring_t *R);
size_t da_ulysses_xchg_bwd_bytes(const da_ring_t *R);

/* ---- hybrid: Ulysses inside groups of U consecutive ranks, the ring across the P/U groups ----
 * Rank r is index j = r % U of group g = r / U. The ring layout (contiguous, striped, zigzag)
 * gives group g its n_g rows over the P/U groups; rank j of the group owns the j-th of U
 * contiguous runs of those rows (in the group's local row order). */
typedef struct da_hybrid {
  int U, groups;         /* the Ulysses degree (ranks per group) and the ring degree */
  MPI_Comm gcomm, rcomm; /* this rank's group; the ranks with its index in every group */
  da_xport_t gxp, rxp;   /* transports on them */
  da_ring_t uly;         /* Ulysses over the group: P = U, rank = j, the group's rows in U runs */
  da_ring_t ring;        /* the ring across groups: P = P/U, rank = g, H/U heads, the ring layout */
  double *steps;         /* uly's stats arrays: 4 x [U] */
  uint64_t *bytes;       /* 2 x [U] */
} da_hybrid_t;

/* Can P ranks run the hybrid with Ulysses degree U on kp over transport t? U >= 1 dividing P,
 * H % U == 0, KV heads split (G % U == 0) or replicated per group (U % G == 0), an all-to-all.
 * DA_ERR_INVALID_ARGUMENT (U < 1) or DA_ERR_UNSUPPORTED with a message naming what fails. */
da_status_t da_hybrid_check(const da_kparams_t *kp, int P, int U, const da_transport_t *t);

/* Set up h for the rank top->rank of top->P (top: kt, kp, B, rank, P set; mode read per call):
 * splits comm into the group and ring communicators (collective over comm: call it only right
 * after a bounded collective on comm has seen every rank), opens `transport` on both, builds the
 * layouts (the ring's over the P/U groups: h->ring.nmax is the largest group's rows). Sets
 * top->nloc and top->nmax (the largest rank share). Then da_hybrid_schedule: the ring's schedule
 * with KV sub-blocks of `block` tokens. */
da_status_t da_hybrid_init(da_hybrid_t *h, da_ring_t *top, MPI_Comm comm, const char *transport, double timeout,
                           da_layout_kind_t kind, int U, int64_t seq);
da_status_t da_hybrid_schedule(da_hybrid_t *h, int64_t block);
void da_hybrid_free(da_hybrid_t *h);
/* This rank's global positions, in local row order ([top->nloc]). */
void da_hybrid_positions(const da_hybrid_t *h, int64_t *pos);
/* Buffers per rank (the call's exchange and regroup buffers, plus the ring's kept buffers) and
 * bytes sent per call (the group's all-to-alls and the ring's blocks). */
size_t da_hybrid_fwd_bytes(const da_hybrid_t *h);
size_t da_hybrid_bwd_bytes(const da_hybrid_t *h);
uint64_t da_hybrid_fwd_comm_bytes(const da_hybrid_t *h);
uint64_t da_hybrid_bwd_comm_bytes(const da_hybrid_t *h);
/* Same contracts as da_ring_fwd / da_ring_bwd on this rank's rows; stats land in top->fwd/bwd
 * (the all-to-alls as step 0's wait and bytes, the ring's steps as they are). */
da_status_t da_hybrid_fwd(da_ring_t *top, da_hybrid_t *h, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                          float *lse, void *stream);
da_status_t da_hybrid_bwd(da_ring_t *top, da_hybrid_t *h, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                          da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* DA_ULYSSES_H */
