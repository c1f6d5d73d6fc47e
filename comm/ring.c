/* ring.c: the ring driver for Ring (contiguous), Striped and Zigzag attention, forward and
 * backward, on any transport. Each rank keeps its queries; the KV blocks (G heads, storage dtype)
 * travel around the ring with double buffering, the transfer for step s+1 posted before the
 * compute of step s and driven by test() between work items (no helper thread). The backward
 * sends the fp32 dK/dV accumulators along with the blocks so they arrive home after P steps.
 * Validation, tensor views and the cross-rank outcome are plan.c's; this file trusts its inputs. */
#include <math.h>
#include <string.h>
#include "dtype.h"
#include "ring.h"

static size_t esize(const da_ring_t *R) { return da_dtype_size(R->kp.dtype); }
static int64_t kvrow(const da_ring_t *R) { return (int64_t)R->kp.G * R->kp.D; }
static int64_t count_of(const da_ring_t *R, int r) { return R->layout.counts[r]; }
static int next_rank(const da_ring_t *R) { return (R->rank + 1) % R->P; }
static int prev_rank(const da_ring_t *R) { return (R->rank + R->P - 1) % R->P; }

/* One travelling KV block of n rows: k [B][n][G][D] then v [B][n][G][D], no padding, so only the
 * rows that exist are sent. */
static size_t kv_block_elems(const da_ring_t *R, int64_t n) { return (size_t)(2 * R->B * n * kvrow(R)); }

size_t da_ring_fwd_bytes(const da_ring_t *R) {
  size_t slots = 2 * kv_block_elems(R, R->nmax) * esize(R);
  size_t state = (size_t)(R->B * R->nloc * R->kp.H) * (size_t)(R->kp.D + 2) * sizeof(float);
  return slots + state;
}

size_t da_ring_bwd_bytes(const da_ring_t *R) {
  size_t slots = 2 * kv_block_elems(R, R->nmax) * esize(R);
  size_t acc = 3 * kv_block_elems(R, R->nmax) * sizeof(float);
  size_t dq = (size_t)(R->B * R->nloc * R->kp.H) * (size_t)(R->kp.D + 1) * sizeof(float);
  return slots + acc + dq;
}

uint64_t da_ring_fwd_comm_bytes(const da_ring_t *R) {
  uint64_t b = 0;
  for (int s = 0; s + 1 < R->P; s++) b += kv_block_elems(R, count_of(R, da_ring_src(R->rank, s, R->P))) * esize(R);
  return b;
}

uint64_t da_ring_bwd_comm_bytes(const da_ring_t *R) {
  uint64_t b = da_ring_fwd_comm_bytes(R);
  if (R->P > 1)
    for (int s = 0; s < R->P; s++)
      b += kv_block_elems(R, count_of(R, da_ring_src(R->rank, s, R->P))) * sizeof(float);
  return b;
}

/* Copy this rank's k and v rows (any row/batch stride) into a travelling block. */
static void pack_kv(const da_ring_t *R, da_rview_t k, da_rview_t v, char *slot) {
  const size_t es = esize(R), row = (size_t)kvrow(R) * es;
  const int64_t n = R->nloc;
  char *vslot = slot + (size_t)(R->B * n) * row;
  for (int64_t b = 0; b < R->B; b++)
    for (int64_t i = 0; i < n; i++) {
      memcpy(slot + (size_t)(b * n + i) * row, k.p + (size_t)(b * k.bs + i * k.ld) * es, row);
      memcpy(vslot + (size_t)(b * n + i) * row, v.p + (size_t)(b * v.bs + i * v.ld) * es, row);
    }
}

/* fp32 packed rows [n][len] of batch element b into a dtype view. */
static void store_rows(const da_ring_t *R, da_rview_t dst, int64_t b, int64_t n, int64_t len, const float *src) {
  const size_t es = esize(R);
  const int dt = (int)R->kp.dtype;
  for (int64_t i = 0; i < n; i++) {
    char *d = dst.p + (size_t)(b * dst.bs + i * dst.ld) * es;
    const float *x = src + i * len;
    if (dt == DA_FLOAT32) memcpy(d, x, (size_t)len * sizeof(float));
    else
      for (int64_t j = 0; j < len; j++) da_store_f32(d, dt, j, x[j]);
  }
}

/* Drive progress on the transfers in flight: the point of calling this between work items is
 * that MPI (and SMPI) move rendezvous-sized messages only while someone is inside the library. */
static da_status_t poke(da_ring_t *R, da_xreq_t *a, da_xreq_t *b) {
  int done;
  if (a) DA_CHECK(R->xp->t->test(R->xp, a, &done));
  if (b) DA_CHECK(R->xp->t->test(R->xp, b, &done));
  return DA_SUCCESS;
}

/* Wait for a transfer, adding the blocked time to the step. A failure here is fatal for this
 * call: the peers will notice through their own deadlines. */
static da_status_t wait_req(da_ring_t *R, da_xreq_t **req, double *waited) {
  if (!*req) return DA_SUCCESS;
  double t0 = da_time_now();
  da_status_t st = R->xp->t->wait(R->xp, *req);
  *req = NULL;
  *waited += da_time_now() - t0;
  if (st == DA_ERR_TIMEOUT) R->broken = 1;
  return st;
}

static void stats_reset(const da_ring_t *R, da_ring_stats_t *S) {
  S->wall_s = S->compute_s = S->exposed_s = 0;
  S->bytes_sent = 0;
  for (int s = 0; s < R->P; s++) S->step_compute_s[s] = S->step_wait_s[s] = 0, S->step_bytes[s] = 0;
}

static void stats_sum(const da_ring_t *R, da_ring_stats_t *S, double t_start) {
  for (int s = 0; s < R->P; s++) {
    S->compute_s += S->step_compute_s[s];
    S->exposed_s += S->step_wait_s[s];
    S->bytes_sent += S->step_bytes[s];
  }
  S->wall_s = da_time_now() - t_start;
}

/* Compute-only mode keeps reading the local block while pretending it is the travelling one;
 * offsets of a larger block stay inside the slot's capacity (sized for the largest shard), and
 * the slot is zeroed so the extra rows are harmless numbers rather than garbage. */
static void *alloc_slot(const da_ring_t *R, size_t bytes) {
  return R->mode == DA_RING_COMPUTE_ONLY ? da_calloc(bytes, 64) : da_malloc(bytes, 64);
}

da_status_t da_ring_fwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                        void *stream) {
  const int P = R->P, r = R->rank, H = R->kp.H, D = R->kp.D;
  const int64_t B = R->B, nloc = R->nloc, row = kvrow(R);
  const size_t es = esize(R), slot_bytes = kv_block_elems(R, R->nmax) * es;
  const double t_start = da_time_now();
  da_ring_stats_t *S = &R->fwd;
  stats_reset(R, S);
  R->xp->phase = "forward";

  da_status_t st = DA_SUCCESS, st_comm = DA_SUCCESS;
  char *slot[2] = {alloc_slot(R, slot_bytes ? slot_bytes : 1), alloc_slot(R, slot_bytes ? slot_bytes : 1)};
  size_t nst = (size_t)(B * nloc * H);
  float *o = da_malloc((nst ? nst : 1) * (size_t)D * sizeof(float), 64);
  float *m = da_malloc((nst ? nst : 1) * sizeof(float), 64), *l = da_malloc((nst ? nst : 1) * sizeof(float), 64);
  if (!slot[0] || !slot[1] || !o || !m || !l) {
    /* Keep walking the ring without buffers would need them: report it, the plan makes every
     * rank agree, and peers stop at their own deadline if they already posted. */
    st_comm = DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d forward: %zu bytes of ring buffers", r, da_ring_fwd_bytes(R));
    goto done;
  }
  da_fwd_state_t all = {o, m, l, B * nloc};
  if (nst) st = da_fwd_state_init(R->kt, &R->kp, &all, stream);
  pack_kv(R, k, v, slot[0]);

  da_xreq_t *req = NULL;
  for (int s = 0; s < P; s++) {
    const int src = da_ring_src(r, s, P);
    const int64_t nsrc = count_of(R, src);
    char *cur = slot[s & 1], *nxt = slot[(s + 1) & 1];
    /* Post the next block's transfer before computing on this one: the whole point of the ring. */
    if (s + 1 < P && R->mode != DA_RING_COMPUTE_ONLY) {
      size_t sb = kv_block_elems(R, nsrc) * es;
      size_t rb = kv_block_elems(R, count_of(R, da_ring_src(r, s + 1, P))) * es;
      st_comm = R->xp->t->exchange_start(R->xp, cur, sb, next_rank(R), nxt, rb, prev_rank(R), DA_TAG_FWD_KV, s, &req);
      if (st_comm) goto done;
      S->step_bytes[s] = sb;
    }
    const double t0 = da_time_now();
    if (R->mode != DA_RING_COMM_ONLY && st == DA_SUCCESS) {
      const char *kb = R->mode == DA_RING_COMPUTE_ONLY ? slot[0] : cur;
      int64_t n;
      const da_work_item_t *it = da_schedule_items(&R->sched, r, s, &n);
      for (int64_t i = 0; i < n && st == DA_SUCCESS; i++, it++)
        for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
          const int64_t qr = b * nloc + it->q_off;
          da_fwd_state_t sub = {o + qr * H * D, m + qr * H, l + qr * H, it->q.count};
          const char *kp = kb + (size_t)((b * nsrc + it->k_off) * row) * es;
          const char *vp = kb + (size_t)(((B + b) * nsrc + it->k_off) * row) * es;
          st = R->kt->fwd_block(&R->kp, q.p + (size_t)(b * q.bs + it->q_off * q.ld) * es, q.ld, it->q, kp, row, vp,
                                row, it->k, &sub, stream);
          if ((st_comm = poke(R, req, NULL))) goto done;
        }
      /* A kernel failure does not stop the ring: this rank keeps forwarding blocks so its peers
       * finish their steps and every rank learns of the failure in the plan's agreement. */
    } else if ((st_comm = poke(R, req, NULL))) {
      goto done;
    }
    const double t1 = da_time_now();
    S->step_compute_s[s] = t1 - t0;
    if ((st_comm = wait_req(R, &req, &S->step_wait_s[s]))) goto done;
    DA_TRACE(DA_SUB_COMM, "forward step %d: kv of rank %d, compute %.3g s, wait %.3g s", s, src,
             S->step_compute_s[s], S->step_wait_s[s]);
  }
  if (st == DA_SUCCESS && R->mode != DA_RING_COMM_ONLY && nloc > 0)
    for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
      da_fwd_state_t sb = {o + b * nloc * H * D, m + b * nloc * H, l + b * nloc * H, nloc};
      st = R->kt->fwd_finish(&R->kp, &sb, out.p + (size_t)(b * out.bs) * es, R->kp.dtype, out.ld,
                             lse ? lse + b * nloc * H : NULL, stream);
    }
done:
  if (st_comm && req) R->xp->t->abort(R->xp, req);
  stats_sum(R, S, t_start);
  if (R->broken) {
    /* Messages may still land in these buffers: leak them rather than hand them to malloc. */
    DA_WARN(DA_SUB_COMM, "forward: a transfer timed out; %zu bytes of ring buffers are kept out of use", 2 * slot_bytes);
  } else {
    da_free(slot[0]), da_free(slot[1]);
  }
  da_free(o), da_free(m), da_free(l);
  return st_comm ? st_comm : st;
}

da_status_t da_ring_bwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                        da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                        void *stream) {
  const int P = R->P, r = R->rank, H = R->kp.H, D = R->kp.D;
  const int64_t B = R->B, nloc = R->nloc, row = kvrow(R);
  const size_t es = esize(R), slot_bytes = kv_block_elems(R, R->nmax) * es;
  const size_t acc_bytes = kv_block_elems(R, R->nmax) * sizeof(float);
  const double t_start = da_time_now();
  const int comm = R->mode != DA_RING_COMPUTE_ONLY, compute = R->mode != DA_RING_COMM_ONLY;
  da_ring_stats_t *S = &R->bwd;
  stats_reset(R, S);
  R->xp->phase = "backward";

  da_status_t st = DA_SUCCESS, st_comm = DA_SUCCESS;
  /* Three fp32 accumulators rotate: `sd` is on its way to rank r+1, `rv` receives the running
   * dK/dV of the next block from rank r-1, `c` takes this step's contribution, computed while
   * both transfers move and added to the incoming sum only afterwards, so the accumulators'
   * travel overlaps the next step's compute instead of delaying it. */
  char *slot[2] = {alloc_slot(R, slot_bytes ? slot_bytes : 1), alloc_slot(R, slot_bytes ? slot_bytes : 1)};
  float *sd = da_calloc(acc_bytes ? acc_bytes : 1, 64), *rv = da_calloc(acc_bytes ? acc_bytes : 1, 64);
  float *c = da_calloc(acc_bytes ? acc_bytes : 1, 64);
  size_t nrow = (size_t)(B * nloc * H);
  float *dqa = da_calloc((nrow ? nrow : 1) * (size_t)D * sizeof(float), 64);
  float *delta = da_malloc((nrow ? nrow : 1) * sizeof(float), 64);
  da_xreq_t *rkv = NULL, *rd = NULL;
  if (!slot[0] || !slot[1] || !sd || !rv || !c || !dqa || !delta) {
    st_comm = DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d backward: %zu bytes of ring buffers", r, da_ring_bwd_bytes(R));
    goto done;
  }
  if (compute && nloc > 0)
    for (int64_t b = 0; b < B && st == DA_SUCCESS; b++)
      st = R->kt->bwd_prep(&R->kp, nloc, out.p + (size_t)(b * out.bs) * es, out.ld,
                           dout.p + (size_t)(b * dout.bs) * es, dout.ld, delta + b * nloc * H, stream);
  pack_kv(R, k, v, slot[0]);

  for (int s = 0; s < P; s++) {
    const int src = da_ring_src(r, s, P);
    const int64_t nsrc = count_of(R, src), nnext = count_of(R, da_ring_src(r, s + 1, P));
    const size_t blk = kv_block_elems(R, nsrc);
    char *cur = slot[s & 1], *nxt = slot[(s + 1) & 1];
    if (s + 1 < P && comm) {
      size_t sb = blk * es, rb = kv_block_elems(R, nnext) * es;
      st_comm = R->xp->t->exchange_start(R->xp, cur, sb, next_rank(R), nxt, rb, prev_rank(R), DA_TAG_BWD_KV, s, &rkv);
      if (st_comm) goto done;
      S->step_bytes[s] += sb;
    }
    const double t0 = da_time_now();
    float *acc = s == 0 ? sd : c; /* step 0 starts the block's own sum: no incoming part yet */
    if (compute) {
      memset(acc, 0, blk * sizeof(float));
      if (st == DA_SUCCESS) {
        const char *kb = comm ? cur : slot[0];
        int64_t n;
        const da_work_item_t *it = da_schedule_items(&R->sched, r, s, &n);
        for (int64_t i = 0; i < n && st == DA_SUCCESS; i++, it++)
          for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
            const int64_t qr = b * nloc + it->q_off;
            const int64_t kr = b * nsrc + it->k_off, vr = (B + b) * nsrc + it->k_off;
            st = R->kt->bwd_block(&R->kp, q.p + (size_t)(b * q.bs + it->q_off * q.ld) * es, q.ld,
                                  dout.p + (size_t)(b * dout.bs + it->q_off * dout.ld) * es, dout.ld, lse + qr * H,
                                  delta + qr * H, it->q, kb + (size_t)(kr * row) * es, row,
                                  kb + (size_t)(vr * row) * es, row, it->k, dqa + qr * H * D, acc + kr * row,
                                  acc + vr * row, stream);
            if ((st_comm = poke(R, rkv, rd))) goto done;
          }
      }
    } else if ((st_comm = poke(R, rkv, rd))) {
      goto done;
    }
    S->step_compute_s[s] = da_time_now() - t0;
    if (s > 0) {
      /* The running sum of this block from the ranks before us: add ours, pass it on. */
      if ((st_comm = wait_req(R, &rd, &S->step_wait_s[s]))) goto done;
      if (compute) {
        double ta = da_time_now();
        for (size_t i = 0; i < blk; i++) rv[i] += c[i];
        S->step_compute_s[s] += da_time_now() - ta;
      }
      float *t = sd;
      sd = rv, rv = t;
    }
    if (P > 1 && comm) {
      /* After the last step the sum we pass on is complete and belongs to rank r+1; what we
       * receive is our own block's, home after its full round. */
      size_t sb = blk * sizeof(float), rb = kv_block_elems(R, nnext) * sizeof(float);
      st_comm = R->xp->t->exchange_start(R->xp, sd, sb, next_rank(R), rv, rb, prev_rank(R), DA_TAG_BWD_DKV, s, &rd);
      if (st_comm) goto done;
      S->step_bytes[s] += sb;
    }
    if ((st_comm = wait_req(R, &rkv, &S->step_wait_s[s]))) goto done;
    DA_TRACE(DA_SUB_COMM, "backward step %d: kv of rank %d, compute %.3g s, wait %.3g s", s, src,
             S->step_compute_s[s], S->step_wait_s[s]);
  }
  const float *home = sd; /* P == 1 (or no transfers): the step-0 sum is the whole gradient */
  if (P > 1 && comm) {
    if ((st_comm = wait_req(R, &rd, &S->step_wait_s[P - 1]))) goto done;
    home = rv;
  }
  if (st == DA_SUCCESS && compute && nloc > 0)
    for (int64_t b = 0; b < B; b++) {
      store_rows(R, dq, b, nloc, (int64_t)H * D, dqa + b * nloc * H * D);
      store_rows(R, dk, b, nloc, row, home + b * nloc * row);
      store_rows(R, dv, b, nloc, row, home + (B + b) * nloc * row);
    }
done:
  if (st_comm) {
    if (rkv) R->xp->t->abort(R->xp, rkv);
    if (rd) R->xp->t->abort(R->xp, rd);
  }
  stats_sum(R, S, t_start);
  if (R->broken) {
    DA_WARN(DA_SUB_COMM, "backward: a transfer timed out; ring buffers are kept out of use");
  } else {
    da_free(slot[0]), da_free(slot[1]), da_free(sd), da_free(rv), da_free(c);
  }
  da_free(dqa), da_free(delta);
  return st_comm ? st_comm : st;
}
