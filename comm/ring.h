/* ring.h: the ring driver of comm/ (Ring, Striped and Zigzag attention, forward and backward) as
 * the plan sees it: a struct holding the layout, schedule, kernel table, transport and buffers,
 * and two calls over per-rank tensors whose heads are packed. Argument checking and tensor views
 * live in plan.c; this layer trusts its inputs. Internal to comm/. */
#ifndef DA_RING_H
#define DA_RING_H

#include "transport.h" /* first: mpi.h before distattn.h declares the distributed API */
#include "kernels.h"
#include "partition.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A per-rank tensor with packed heads: row i of batch element b starts at
 * p + (b * bs + i * ld) * element size. */
typedef struct da_rview {
  char *p;
  int64_t bs, ld;
} da_rview_t;

typedef enum { DA_RING_RUN = 0, DA_RING_COMPUTE_ONLY = 1, DA_RING_COMM_ONLY = 2 } da_ring_mode_t;

/* What one call measured, per step and in total. */
typedef struct da_ring_stats {
  double wall_s, compute_s, exposed_s;
  uint64_t bytes_sent;
  double *step_compute_s, *step_wait_s; /* [nsteps] */
  uint64_t *step_bytes;                 /* [nsteps] */
} da_ring_stats_t;

/* Buffers the driver keeps between calls (allocated at the first call that needs them, zeroed):
 * the two KV slots, the forward state (big = o, small = m, l; the backward's dq and delta reuse
 * big and small[0]), and the backward's dK/dV sums (three travelling, one own). */
typedef struct da_ring_bufs {
  char *slot[2];
  float *big, *small[2];
  float *acc[3], *own;
  int reg_slots, reg_acc; /* device mode: slots / travelling sums registered with the transport */
} da_ring_bufs_t;

/* DISTATTN_TEST_RING_SKIP (tests only): leave one ordering step of the driver out, to show the
 * tests catch it. `sync`: no stream drain before host compute; `dkv-wait`: the dK/dV running
 * sum is folded before its transfer is waited for (and waited for afterwards). */
enum { DA_RING_SKIP_NONE = 0, DA_RING_SKIP_SYNC = 1, DA_RING_SKIP_DKV_WAIT = 2 };

typedef struct da_ring {
  const da_kernels_t *kt;
  da_kparams_t kp;
  da_layout_t layout;
  da_schedule_t sched;
  da_xport_t *xp;
  int rank, P;
  int64_t B, nloc, nmax; /* batch, this rank's rows, the largest shard */
  da_ring_mode_t mode;
  int broken;            /* a timeout left messages in flight: buffers must not be reused */
  da_ring_stats_t fwd, bwd;
  da_ring_bufs_t buf;
  /* Device mode (docs/ring.md): the transport's device table, NULL for host memory; the
   * compute stream of the call in progress (a da_dstream_t of dev); the test hook. */
  const da_devapi_t *dev;
  void *stream;
  int test_skip;
} da_ring_t;

/* After kt, kp, xp are set: host or device mode from the transport (xp->t->devapi), the checks
 * device mode needs (the kernel table's acc_store), and the test hook. Local. */
da_status_t da_ring_device_init(da_ring_t *R);

/* Release the buffers (kept out of use, i.e. leaked, when a transfer timed out). */
void da_ring_release(da_ring_t *R);

/* Buffers of a forward / a forward and backward, bytes on this rank (docs/ring.md derives them):
 * what the plan holds after its first forward / backward call. */
size_t da_ring_fwd_bytes(const da_ring_t *R);
size_t da_ring_bwd_bytes(const da_ring_t *R);
/* Bytes this rank sends per call. */
uint64_t da_ring_fwd_comm_bytes(const da_ring_t *R);
uint64_t da_ring_bwd_comm_bytes(const da_ring_t *R);

/* Forward: q [B][nloc][H][D], k, v [B][nloc][G][D] (dtype), out [B][nloc][H][D] (dtype),
 * lse [B][nloc][H] fp32 packed (may be NULL). In device mode every pointer is memory of R->dev
 * and `stream` (required) is the compute stream the work is queued on; the call returns with
 * that work queued, not finished, when the kernels are stream-ordered. Every rank must call it; returns this rank's local
 * status (the plan agrees on the outcome across ranks afterwards). */
da_status_t da_ring_fwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                        void *stream);

/* Backward: as the forward plus out, dout (dtype, [B][nloc][H][D]) and lse [B][nloc][H] fp32
 * packed (required); writes dq [B][nloc][H][D] and dk, dv [B][nloc][G][D] in dtype. */
da_status_t da_ring_bwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                        da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                        void *stream);

#ifdef __cplusplus
}
#endif
#endif /* DA_RING_H */
