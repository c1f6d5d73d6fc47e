/* sim_kernels.c: the `sim` backend of kernels/kernels.h for the SMPI build. Every call advances
 * the simulated clock by the time the same work takes on the calibrated device (sim.h) and
 * touches no payload: the buffers alias one untouched arena (sim_alloc.c) and hold no data.
 * The mask decides the work exactly (da_mask_count_pairs on the block's global positions), so
 * the drivers' schedules, skips and imbalance are the real ones. Not a numerical backend. */
#include <simgrid/engine.h>
#include <simgrid/host.h>
#include <smpi/smpi.h>
#include "dtype.h"
#include "kernels.h"
#include "sim.h"

da_sim_calib_t da_sim_calib = {"h100", 600e12, 450e12, 3.0e12, 10e-6};
double da_sim_kernel_s;
double da_sim_pending_bytes;

/* Bytes of host copies charged but not yet spent (da_sim_memcpy): spent, in program order, before
 * the next kernel call or clock read (the drivers read the clock around every all-to-all). */
static double take_pending(void) {
  const double s = da_sim_pending_bytes / da_sim_calib.mem_bps;
  da_sim_pending_bytes = 0;
  return s;
}

static void spend(double s) {
  s += take_pending();
  if (s <= 0) return;
  da_sim_kernel_s += s;
  /* In flops of this host, so the time is right whatever speed the platform gives it
   * (smpi_execute would convert with smpi/host-speed instead). */
  smpi_execute_flops(s * sg_host_get_speed(sg_host_self()));
}

double da_sim_time_now(void) {
  if (da_sim_pending_bytes > 0) spend(0);
  return simgrid_get_clock();
}

int da_sim_payload(double bytes) {
  spend(bytes / da_sim_calib.mem_bps);
  return 0;
}

/* Allowed pairs of a block pair. The schedules of 1024 ranks call this millions of times with
 * spans of thousands of rows, so the common cases are closed forms: no mask (nq * nk), and a
 * plain causal mask with equal strides (contiguous and striped shards), where row i sees
 * clamp(c + i, 0, nk) keys. Windows and documents fall back to the exact row count. */
static int64_t tri(int64_t X, int64_t m) { /* sum of clamp(x, 0, m) for x = 0 .. X-1, X >= 0 */
  return X <= m + 1 ? X * (X - 1) / 2 : m * (m + 1) / 2 + (X - m - 1) * m;
}
static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

static int64_t count_pairs(const da_mask_t *m, da_span_t q, da_span_t k) {
  if (q.count <= 0 || k.count <= 0) return 0;
  if (m->flags == DA_MASK_NONE) return q.count * k.count;
  if (m->flags == DA_MASK_CAUSAL && q.stride == k.stride && q.stride > 0) {
    int64_t c = floor_div(q.start - k.start, k.stride) + 1, n = q.count;
    int64_t hi = c + n > 0 ? c + n : 0, lo = c > 0 ? c : 0;
    return tri(hi, k.count) - tri(lo, k.count);
  }
  return da_mask_count_pairs(m, q, k);
}

static da_status_t sim_supports(const da_kparams_t *p) { return da_kparams_check(p); }

static da_status_t sim_fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos, const void *k,
                                 int64_t ldk, const void *v, int64_t ldv, da_span_t kpos, da_fwd_state_t *st,
                                 void *stream) {
  (void)q, (void)ldq, (void)k, (void)ldk, (void)v, (void)ldv, (void)st, (void)stream;
  int64_t pairs = count_pairs(&p->mask, qpos, kpos);
  if (pairs == 0) return DA_SUCCESS; /* the real kernels skip an empty pair without launching */
  spend(da_sim_calib.call_s + 4.0 * p->H * p->D * (double)pairs / da_sim_calib.fwd_flops);
  return DA_SUCCESS;
}

static da_status_t sim_fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out, da_dtype_t odt,
                                  int64_t ldo, float *lse, void *stream) {
  (void)out, (void)ldo, (void)lse, (void)stream;
  double bytes = (double)st->nq * p->H * ((double)p->D * (4 + da_dtype_size(odt)) + 12);
  spend(da_sim_calib.call_s + bytes / da_sim_calib.mem_bps);
  return DA_SUCCESS;
}

static da_status_t sim_merge(const da_kparams_t *p, int64_t n, float *o_a, float *lse_a, const float *o_b,
                             const float *lse_b, void *stream) {
  /* Called inside MPI reduction operators (tree decode): a few KB, no simulated time. */
  (void)p, (void)n, (void)o_a, (void)lse_a, (void)o_b, (void)lse_b, (void)stream;
  return DA_SUCCESS;
}

static da_status_t sim_bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo, const void *dout,
                                int64_t lddo, float *delta, void *stream) {
  (void)out, (void)ldo, (void)dout, (void)lddo, (void)delta, (void)stream;
  double bytes = (double)nq * p->H * ((double)p->D * 2 * da_dtype_size(p->dtype) + 4);
  spend(da_sim_calib.call_s + bytes / da_sim_calib.mem_bps);
  return DA_SUCCESS;
}

static da_status_t sim_bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout, int64_t lddo,
                                 const float *lse, const float *delta, da_span_t qpos, const void *k, int64_t ldk,
                                 const void *v, int64_t ldv, da_span_t kpos, float *dq, float *dk, float *dv,
                                 void *stream) {
  (void)q, (void)ldq, (void)dout, (void)lddo, (void)lse, (void)delta, (void)k, (void)ldk, (void)v, (void)ldv;
  (void)dq, (void)dk, (void)dv, (void)stream;
  int64_t pairs = count_pairs(&p->mask, qpos, kpos);
  if (pairs == 0) return DA_SUCCESS;
  spend(da_sim_calib.call_s + 10.0 * p->H * p->D * (double)pairs / da_sim_calib.bwd_flops);
  return DA_SUCCESS;
}

/* Decode is a read of the shard's K and V (memory bound) or its FLOPs, whichever is longer. */
static da_status_t sim_decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                              const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream) {
  (void)q, (void)ldq, (void)o, (void)lse, (void)stream;
  double keys = 0, pairs = 0;
  for (int i = 0; i < npages; i++) {
    keys += (double)pages[i].pos.count;
    pairs += (double)count_pairs(&p->mask, qpos, pages[i].pos);
  }
  double bytes = keys * 2.0 * p->G * p->D * da_dtype_size(p->dtype);
  double t_mem = bytes / da_sim_calib.mem_bps, t_flop = 4.0 * p->H * p->D * pairs / da_sim_calib.fwd_flops;
  spend(da_sim_calib.call_s + (t_mem > t_flop ? t_mem : t_flop));
  return DA_SUCCESS;
}

static da_status_t sim_state_init(const da_kparams_t *p, da_fwd_state_t *st, void *stream) {
  (void)stream;
  spend((double)st->nq * p->H * (p->D + 2) * 4.0 / da_sim_calib.mem_bps);
  return DA_SUCCESS;
}

/* Takes the CPU backend's slot in the sim build (compiled with -Dda_kernels_cpu=da_kernels_sim). */
const da_kernels_t da_kernels_sim = {
    .name = "sim",
    .supports = sim_supports,
    .fwd_block = sim_fwd_block,
    .fwd_finish = sim_fwd_finish,
    .merge = sim_merge,
    .bwd_prep = sim_bwd_prep,
    .bwd_block = sim_bwd_block,
    .decode = sim_decode,
    .state_init = sim_state_init,
};
