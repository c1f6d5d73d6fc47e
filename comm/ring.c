/* ring.c: the ring driver for Ring (contiguous), Striped and Zigzag attention, forward and
 * backward, on any transport. Each rank keeps its queries; the KV blocks (G heads, storage dtype)
 * travel around the ring with double buffering, the transfer for step s+1 posted before the
 * compute of step s and driven by test() between work items (no helper thread). The backward
 * sends the fp32 dK/dV sums one hop behind the blocks, so they arrive home after P-1 hops, the
 * last one hidden behind part of the rank's own block (docs/ring.md). Buffers are allocated at
 * the first call and kept by the plan. Validation, tensor views and the cross-rank outcome are
 * plan.c's; this file trusts its inputs.
 * Host or device memory: when the transport moves device memory (xp->t->devapi), every buffer is
 * allocated on that device and the payload work (packing, clearing, folding, storing) is queued
 * on the compute stream; the schedule code is the same, it calls the helpers of the "memory"
 * section below, which do one or the other (docs/ring.md, "Device mode"). */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "dtype.h"
#include "ring.h"

/* Host payload work outside the kernel table (packing the KV block, clearing and summing the fp32
 * dK/dV accumulators, storing gradients) runs only when da_payload(bytes moved) says so. Here it
 * always does; the SimGrid build (sim/sim.h, included first there) charges the bytes to the
 * simulated clock at the device's memory rate instead, since its buffers hold no data. */
#ifndef da_payload
#define da_payload(bytes) 1
#endif

static size_t esize(const da_ring_t *R) { return da_dtype_size(R->kp.dtype); }
static int64_t kvrow(const da_ring_t *R) { return (int64_t)R->kp.G * R->kp.D; }
static int64_t count_of(const da_ring_t *R, int r) { return R->layout.counts[r]; }
static int next_rank(const da_ring_t *R) { return (R->rank + 1) % R->P; }
static int prev_rank(const da_ring_t *R) { return (R->rank + R->P - 1) % R->P; }

/* One travelling KV block of n rows: k [B][n][G][D] then v [B][n][G][D], no padding, so only the
 * rows that exist are sent. */
static size_t kv_block_elems(const da_ring_t *R, int64_t n) { return (size_t)(2 * R->B * n * kvrow(R)); }

/* Buffer sizes in bytes: the two KV slots (largest shard), the per-query fp32 state (forward:
 * o [B][nloc][H][D], m and l [B][nloc][H]; the backward reuses them for dq and delta), and the
 * backward's dK/dV sums: three travelling blocks (largest shard) and this rank's own. */
static size_t slots_bytes(const da_ring_t *R) { return 2 * kv_block_elems(R, R->nmax) * esize(R); }
static size_t big_elems(const da_ring_t *R) { return (size_t)(R->B * R->nloc * R->kp.H) * (size_t)R->kp.D; }
static size_t small_elems(const da_ring_t *R) { return (size_t)(R->B * R->nloc * R->kp.H); }
static size_t acc_elems(const da_ring_t *R) { return kv_block_elems(R, R->nmax); }
static size_t own_elems(const da_ring_t *R) { return kv_block_elems(R, R->nloc); }

size_t da_ring_fwd_bytes(const da_ring_t *R) {
  return slots_bytes(R) + (big_elems(R) + 2 * small_elems(R)) * sizeof(float);
}

size_t da_ring_bwd_bytes(const da_ring_t *R) {
  return da_ring_fwd_bytes(R) + (3 * acc_elems(R) + own_elems(R)) * sizeof(float);
}

/* ---- memory: host, or the transport's device ------------------------------------------------
 * The schedule code calls only these. Host mode: malloc, memcpy, memset and loops, guarded by
 * da_payload. Device mode (R->dev set): allocations through the device table (counted, devmem.c),
 * copies and clears queued on the call's compute stream, fp32 arithmetic through the kernel
 * table's acc_store on the same stream, so the kernels that read the results queue behind it. */

da_status_t da_ring_device_init(da_ring_t *R) {
  R->dev = R->xp->t->devapi;
  R->test_skip = DA_RING_SKIP_NONE;
  if (!R->dev) return DA_SUCCESS;
  if (!R->kt->acc_store)
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: the %s transport moves device memory and the %s kernels have no "
                  "acc_store entry (the device ring folds dK/dV with it)", R->rank, R->xp->t->name, R->kt->name);
  const char *skip = da_param_string("DISTATTN_TEST_RING_SKIP");
  if (skip) {
    if (!strcmp(skip, "sync")) R->test_skip = DA_RING_SKIP_SYNC;
    else if (!strcmp(skip, "dkv-wait")) R->test_skip = DA_RING_SKIP_DKV_WAIT;
    else return DA_ERR(DA_ERR_INVALID_ARGUMENT, "DISTATTN_TEST_RING_SKIP=%s: expected sync or dkv-wait", skip);
    DA_WARN(DA_SUB_COMM, "ring test hook on: the %s step is left out (results will be wrong)", skip);
  }
  return DA_SUCCESS;
}

/* *p = `bytes` of zeroed memory (compute-only mode reads a slot's rows past the local shard as if
 * they were a larger block, and they must be numbers); nothing if *p is already set. */
static da_status_t buf_alloc(da_ring_t *R, void *pp, size_t bytes) {
  void **p = pp;
  if (*p) return DA_SUCCESS;
  if (!bytes) bytes = 1;
  if (!R->dev) {
    *p = da_calloc(bytes, 64);
    return *p ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "%zu bytes", bytes);
  }
  DA_CHECK(da_dev_alloc(R->dev, p, bytes));
  return R->dev->memset_async(*p, 0, bytes, R->stream);
}

static void buf_free(const da_ring_t *R, void *p) {
  if (R->dev) da_dev_free(R->dev, p);
  else da_free(p);
}

static da_status_t mem_copy(da_ring_t *R, void *dst, const void *src, size_t bytes) {
  if (R->dev) return R->dev->copy_async(dst, src, bytes, R->stream);
  memcpy(dst, src, bytes);
  return DA_SUCCESS;
}

static da_status_t mem_zero(da_ring_t *R, void *p, size_t bytes) {
  if (R->dev) return R->dev->memset_async(p, 0, bytes, R->stream);
  memset(p, 0, bytes);
  return DA_SUCCESS;
}

/* y += x over n floats: the dK/dV folds. */
static da_status_t acc_fold(da_ring_t *R, float *y, const float *x, size_t n) {
  if (R->dev) return R->kt->acc_store(1, (int64_t)n, y, x, y, DA_FLOAT32, (int64_t)n, R->stream);
  for (size_t i = 0; i < n; i++) y[i] += x[i];
  return DA_SUCCESS;
}

/* Device mode with host kernels (kt->stream_ordered == 0: the CPU backend on the host seam): the
 * kernels run now, on the host, so whatever the stream was asked to do before (packing a block,
 * clearing an accumulator) must have happened first. The one rule: drain the stream before each
 * batch of host compute. Stream-ordered kernels need nothing: they queue behind that work, and
 * the step's only host wait stays the transport's. */
static da_status_t host_compute_fence(da_ring_t *R) {
  if (!R->dev || R->kt->stream_ordered || R->test_skip == DA_RING_SKIP_SYNC) return DA_SUCCESS;
  return R->dev->stream_sync(R->stream);
}

/* Make [p, p + bytes) (one whole allocation) writable by peers: collective through the transport,
 * called on every rank in the same order even where the allocation failed (p NULL), so that the
 * transport's agreement fails every rank rather than leaving the others waiting. */
static da_status_t buf_register(da_ring_t *R, void *p, size_t bytes) {
  if (!R->dev || !R->xp->t->register_mem) return DA_SUCCESS;
  return R->xp->t->register_mem(R->xp, p, bytes ? bytes : 1);
}

static void keep_first(da_status_t *st, da_status_t s, char *msg, size_t n) {
  if (*st == DA_SUCCESS && s != DA_SUCCESS) *st = s, snprintf(msg, n, "%s", da_error_message());
}

/* Allocate what a pass needs, once; in device mode register the buffers peers write into (the two
 * KV slots; the three travelling dK/dV sums), once per plan. */
static da_status_t ring_buffers(da_ring_t *R, int bwd) {
  da_ring_bufs_t *b = &R->buf;
  const size_t sb = slots_bytes(R) / 2, big = big_elems(R) * sizeof(float), small = small_elems(R) * sizeof(float);
  const size_t accb = acc_elems(R) * sizeof(float);
  da_status_t st = DA_SUCCESS;
  char msg[DA_ERRMSG_MAX] = "";
  for (int i = 0; i < 2; i++) {
    keep_first(&st, buf_alloc(R, &b->slot[i], sb), msg, sizeof msg);
    keep_first(&st, buf_alloc(R, &b->small[i], small), msg, sizeof msg);
  }
  keep_first(&st, buf_alloc(R, &b->big, big), msg, sizeof msg);
  if (bwd) {
    for (int i = 0; i < 3; i++) keep_first(&st, buf_alloc(R, &b->acc[i], accb), msg, sizeof msg);
    keep_first(&st, buf_alloc(R, &b->own, own_elems(R) * sizeof(float)), msg, sizeof msg);
  }
  if (st != DA_SUCCESS)
    DA_ERR(st, "rank %d %s: %zu bytes of ring buffers%s: %s", R->rank, bwd ? "backward" : "forward",
           bwd ? da_ring_bwd_bytes(R) : da_ring_fwd_bytes(R), R->dev ? " on the device" : "", msg);
  snprintf(msg, sizeof msg, "%s", da_error_message());
  /* Registration agrees across ranks inside the transport: every rank stops at the same call. */
  da_status_t reg = DA_SUCCESS;
  if (!b->reg_slots) {
    b->reg_slots = 1;
    for (int i = 0; i < 2 && reg == DA_SUCCESS; i++) reg = buf_register(R, b->slot[i], sb);
  }
  if (bwd && !b->reg_acc) {
    b->reg_acc = 1;
    for (int i = 0; i < 3 && reg == DA_SUCCESS; i++) reg = buf_register(R, b->acc[i], accb);
  }
  if (st != DA_SUCCESS) return DA_ERR(st, "%s", msg); /* the allocation's message is the better one */
  return reg;
}

void da_ring_release(da_ring_t *R) {
  da_ring_bufs_t *b = &R->buf;
  if (R->broken) {
    /* A transfer timed out: messages may still land in the slots and sums. Leak them rather
     * than hand them back to the allocator. */
    DA_WARN(DA_SUB_COMM, "a transfer timed out; %zu bytes of ring buffers are kept out of use", da_ring_bwd_bytes(R));
  } else {
    buf_free(R, b->slot[0]), buf_free(R, b->slot[1]);
    for (int i = 0; i < 3; i++) buf_free(R, b->acc[i]);
    buf_free(R, b->own);
  }
  buf_free(R, b->big), buf_free(R, b->small[0]), buf_free(R, b->small[1]);
  memset(b, 0, sizeof *b);
}

uint64_t da_ring_fwd_comm_bytes(const da_ring_t *R) {
  uint64_t b = 0;
  for (int s = 0; s + 1 < R->P; s++) b += kv_block_elems(R, count_of(R, da_ring_src(R->rank, s, R->P))) * esize(R);
  return b;
}

uint64_t da_ring_bwd_comm_bytes(const da_ring_t *R) {
  uint64_t b = da_ring_fwd_comm_bytes(R);
  /* dK/dV sums start at the first rank that sees a block: P - 1 hops, the last one home. */
  if (R->P > 1)
    for (int s = 1; s < R->P; s++)
      b += kv_block_elems(R, count_of(R, da_ring_src(R->rank, s, R->P))) * sizeof(float);
  return b;
}

/* Copy this rank's k and v rows (any row/batch stride) into a travelling block: one copy per
 * batch element and tensor when the rows are adjacent (what device mode is given), else per row. */
static da_status_t pack_kv(da_ring_t *R, da_rview_t k, da_rview_t v, char *slot) {
  const size_t es = esize(R), row = (size_t)kvrow(R) * es;
  const int64_t n = R->nloc;
  char *vslot = slot + (size_t)(R->B * n) * row;
  const da_rview_t src[2] = {k, v};
  char *const dst[2] = {slot, vslot};
  for (int t = 0; t < 2; t++)
    for (int64_t b = 0; b < R->B; b++) {
      const char *from = src[t].p + (size_t)(b * src[t].bs) * es;
      char *to = dst[t] + (size_t)(b * n) * row;
      if ((size_t)src[t].ld * es == row) {
        DA_CHECK(mem_copy(R, to, from, (size_t)n * row));
      } else {
        for (int64_t i = 0; i < n; i++) DA_CHECK(mem_copy(R, to + (size_t)i * row, from + (size_t)(i * src[t].ld) * es, row));
      }
    }
  return DA_SUCCESS;
}

/* fp32 packed rows [n][len] of batch element b into a dtype view. */
static da_status_t store_rows(da_ring_t *R, da_rview_t dst, int64_t b, int64_t n, int64_t len, const float *src) {
  const size_t es = esize(R);
  const int dt = (int)R->kp.dtype;
  if (R->dev) return R->kt->acc_store(n, len, src, NULL, dst.p + (size_t)(b * dst.bs) * es, R->kp.dtype, dst.ld, R->stream);
  for (int64_t i = 0; i < n; i++) {
    char *d = dst.p + (size_t)(b * dst.bs + i * dst.ld) * es;
    const float *x = src + i * len;
    if (dt == DA_FLOAT32) memcpy(d, x, (size_t)len * sizeof(float));
    else
      for (int64_t j = 0; j < len; j++) da_store_f32(d, dt, j, x[j]);
  }
  return DA_SUCCESS;
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

da_status_t da_ring_fwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                        void *stream) {
  const int P = R->P, r = R->rank, H = R->kp.H, D = R->kp.D;
  const int64_t B = R->B, nloc = R->nloc, row = kvrow(R);
  const size_t es = esize(R);
  const double t_start = da_time_now();
  da_ring_stats_t *S = &R->fwd;
  stats_reset(R, S);
  R->xp->phase = "forward";
  R->stream = R->xp->stream = stream; /* device mode: compute stream; exchanges start after it */

  da_status_t st = DA_SUCCESS, st_comm = DA_SUCCESS;
  da_xreq_t *req = NULL;
  /* Without buffers this rank cannot take part: report it; the plan makes every rank agree, and
   * peers that already posted stop at their own deadline. */
  if ((st_comm = ring_buffers(R, 0))) goto done;
  char *const slot[2] = {R->buf.slot[0], R->buf.slot[1]};
  const size_t nst = small_elems(R);
  float *const o = R->buf.big, *const m = R->buf.small[0], *const l = R->buf.small[1];
  da_fwd_state_t all = {o, m, l, B * nloc};
  /* (host kernels: the state is written on the host, after the clears buf_alloc queued) */
  if (nst && (st_comm = host_compute_fence(R))) goto done;
  if (nst) st = da_fwd_state_init(R->kt, &R->kp, &all, stream);
  if (da_payload(2.0 * kv_block_elems(R, nloc) * es) && (st_comm = pack_kv(R, k, v, slot[0]))) goto done;

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
      if ((st_comm = host_compute_fence(R))) goto done;
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
  if (st == DA_SUCCESS && R->mode != DA_RING_COMM_ONLY && nloc > 0 && (st_comm = host_compute_fence(R)) == DA_SUCCESS)
    for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
      da_fwd_state_t sb = {o + b * nloc * H * D, m + b * nloc * H, l + b * nloc * H, nloc};
      st = R->kt->fwd_finish(&R->kp, &sb, out.p + (size_t)(b * out.bs) * es, R->kp.dtype, out.ld,
                             lse ? lse + b * nloc * H : NULL, stream);
    }
done:
  if (st_comm && req) R->xp->t->abort(R->xp, req);
  stats_sum(R, S, t_start);
  return st_comm ? st_comm : st;
}

/* Where the backward splits this rank's own-block items (step 0): items [0, split) run at
 * step 0, while the first KV block travels; items [split, n) run after the last step, while this
 * rank's own dK/dV sum makes its final hop home. The work is divided in proportion to the bytes
 * each part has to hide (KV block in the storage dtype vs dK/dV block in fp32), by pairs. */
static int64_t own_split(const da_ring_t *R) {
  int64_t n;
  const da_work_item_t *it = da_schedule_items(&R->sched, R->rank, 0, &n);
  if (R->P == 1 || n < 2) return n;
  const double kv = (double)esize(R), dkv = (double)sizeof(float);
  int64_t total = 0, acc = 0, i = 0;
  for (int64_t j = 0; j < n; j++) total += it[j].pairs;
  const double pre = (double)total * kv / (kv + dkv);
  while (i < n - 1 && (double)(acc + it[i].pairs) <= pre) acc += it[i++].pairs;
  /* At least one item at step 0 (it hides the first transfer) and one deferred. */
  return i < 1 ? 1 : i;
}

/* One backward pass: its inputs, the transfers in flight and the fp32 dK/dV accumulators.
 * `own` holds this rank's contribution to its own block and never travels. The sum of every other
 * block starts at the first rank that sees it (step 1) and moves one hop per step: `c` takes this
 * step's contribution, computed while the transfers move; `rv` receives the running sum of the
 * next block from rank r-1; `sd` is on its way to rank r+1. After step P-1 the sum `sd` is complete
 * and belongs to rank r+1, and `rv` receives this rank's own block's sum from rank r-1, which meets
 * `own` at home. */
typedef struct bwd_pass {
  da_ring_t *R;
  da_rview_t q, k, v, dout; /* this rank's inputs */
  const float *lse;
  void *stream;
  int comm, compute, travel; /* blocks move; kernels run; dK/dV sums move between ranks */
  int64_t split;             /* own_split: the own block's items run before / after the ring */
  char *slot[2];             /* the two KV block slots */
  float *dqa, *delta;        /* the forward's state buffers, reused: dq fp32, delta */
  float *sd, *rv, *c, *own;  /* the dK/dV accumulators (above) */
  da_xreq_t *rkv, *rd;       /* the KV block's and the dK/dV sum's transfers in flight */
  da_status_t st;            /* the first kernel failure: the ring goes on regardless */
} bwd_pass_t;

/* Items [i0, i1) of step s into the dK/dV accumulator acc ([2][B][nsrc][G][D]: k part, then v),
 * reading keys and values of the KV block through the views kk, vv, poking the transfers in flight
 * after each item. A kernel failure is left in w->st: this rank keeps passing blocks so its peers
 * finish, and the plan agrees on the outcome afterwards. Returns a transfer failure. */
static da_status_t bwd_items(bwd_pass_t *w, int s, int64_t i0, int64_t i1, da_rview_t kk, da_rview_t vv, int64_t nsrc,
                             float *acc) {
  da_ring_t *R = w->R;
  const int H = R->kp.H, D = R->kp.D;
  const int64_t B = R->B, nloc = R->nloc, row = kvrow(R);
  const size_t es = esize(R);
  const da_rview_t q = w->q, dout = w->dout;
  int64_t n;
  const da_work_item_t *items = da_schedule_items(&R->sched, R->rank, s, &n);
  for (int64_t i = i0; i < i1 && i < n && w->st == DA_SUCCESS; i++)
    for (int64_t b = 0; b < B && w->st == DA_SUCCESS; b++) {
      const da_work_item_t *x = items + i;
      const int64_t qr = b * nloc + x->q_off, kr = b * nsrc + x->k_off, vr = (B + b) * nsrc + x->k_off;
      w->st = R->kt->bwd_block(&R->kp, q.p + (size_t)(b * q.bs + x->q_off * q.ld) * es, q.ld,
                               dout.p + (size_t)(b * dout.bs + x->q_off * dout.ld) * es, dout.ld, w->lse + qr * H,
                               w->delta + qr * H, x->q, kk.p + (size_t)(b * kk.bs + x->k_off * kk.ld) * es, kk.ld,
                               vv.p + (size_t)(b * vv.bs + x->k_off * vv.ld) * es, vv.ld, x->k, w->dqa + qr * H * D,
                               acc + kr * row, acc + vr * row, w->stream);
      DA_CHECK(poke(R, w->rkv, w->rd));
    }
  return DA_SUCCESS;
}

/* Buffers, delta of every local row, and this rank's KV block packed into slot 0. */
static da_status_t bwd_begin(bwd_pass_t *w, da_rview_t out) {
  da_ring_t *R = w->R;
  const int64_t B = R->B, nloc = R->nloc;
  const size_t es = esize(R);
  DA_CHECK(ring_buffers(R, 1));
  w->slot[0] = R->buf.slot[0], w->slot[1] = R->buf.slot[1];
  w->sd = R->buf.acc[0], w->rv = R->buf.acc[1], w->c = R->buf.acc[2], w->own = R->buf.own;
  w->dqa = R->buf.big, w->delta = R->buf.small[0];
  if (da_payload((double)(big_elems(R) + own_elems(R)) * sizeof(float))) {
    DA_CHECK(mem_zero(R, w->dqa, big_elems(R) * sizeof(float)));
    DA_CHECK(mem_zero(R, w->own, own_elems(R) * sizeof(float)));
  }
  if (w->compute && nloc > 0) DA_CHECK(host_compute_fence(R));
  if (w->compute && nloc > 0)
    for (int64_t b = 0; b < B && w->st == DA_SUCCESS; b++)
      w->st = R->kt->bwd_prep(&R->kp, nloc, out.p + (size_t)(b * out.bs) * es, out.ld,
                              w->dout.p + (size_t)(b * w->dout.bs) * es, w->dout.ld, w->delta + b * nloc * R->kp.H,
                              w->stream);
  if (da_payload(2.0 * kv_block_elems(R, nloc) * es)) DA_CHECK(pack_kv(R, w->k, w->v, w->slot[0]));
  w->split = own_split(R);
  return DA_SUCCESS;
}

/* The kernels of step s on the block in slot cur: at step 0 the first part of the own block
 * (straight from k, v) into `own`; later, the travelling block into a cleared `c`. */
static da_status_t bwd_compute(bwd_pass_t *w, int s, char *cur, int64_t nsrc) {
  da_ring_t *R = w->R;
  const int64_t B = R->B, row = kvrow(R);
  const size_t blk = kv_block_elems(R, nsrc);
  if (s == 0) {
    DA_CHECK(host_compute_fence(R));
    return bwd_items(w, 0, 0, w->split, w->k, w->v, nsrc, w->own);
  }
  /* A travelling block: k [B][nsrc][G][D] then v; its rows are packed. */
  char *kb = w->comm ? cur : w->slot[0];
  const da_rview_t bk = {kb, nsrc * row, row}, bv = {kb + (size_t)(B * nsrc * row) * esize(R), nsrc * row, row};
  if (da_payload((double)blk * sizeof(float))) DA_CHECK(mem_zero(R, w->c, blk * sizeof(float)));
  DA_CHECK(host_compute_fence(R));
  return bwd_items(w, s, 0, INT64_MAX, bk, bv, nsrc, w->c);
}

/* After the kernels of step s: fold this step's dK/dV part into the running sum and send it on,
 * posting the receive of the next one (after the last step: this rank's own block's). */
static da_status_t bwd_pass_sums(bwd_pass_t *w, int s, size_t blk, int64_t nnext) {
  da_ring_t *R = w->R;
  da_ring_stats_t *S = &R->bwd;
  if (s >= 2 && w->travel) {
    /* The running sum of this block from the ranks before us: add ours, pass it on. */
    const int planted = R->test_skip == DA_RING_SKIP_DKV_WAIT;
    if (!planted) DA_CHECK(wait_req(R, &w->rd, &S->step_wait_s[s]));
    if (w->compute) {
      double ta = da_time_now();
      if (da_payload(3.0 * blk * sizeof(float))) {
        DA_CHECK(host_compute_fence(R));
        DA_CHECK(acc_fold(R, w->rv, w->c, blk));
      }
      S->step_compute_s[s] += da_time_now() - ta;
    }
    if (planted) DA_CHECK(wait_req(R, &w->rd, &S->step_wait_s[s])); /* the test hook: too late */
    float *t = w->sd;
    w->sd = w->rv, w->rv = t;
  } else if (s == 1) {
    float *t = w->sd; /* we are the first to see this block: our part is the whole sum so far */
    w->sd = w->c, w->c = t;
  }
  if (s >= 1 && w->travel) {
    size_t sb = blk * sizeof(float), rb = kv_block_elems(R, nnext) * sizeof(float);
    DA_CHECK(
        R->xp->t->exchange_start(R->xp, w->sd, sb, next_rank(R), w->rv, rb, prev_rank(R), DA_TAG_BWD_DKV, s, &w->rd));
    S->step_bytes[s] += sb;
  }
  return DA_SUCCESS;
}

/* Step s of the ring: post the next KV block, compute on this one, pass the dK/dV sums. */
static da_status_t bwd_step(bwd_pass_t *w, int s) {
  da_ring_t *R = w->R;
  da_ring_stats_t *S = &R->bwd;
  const int P = R->P, r = R->rank, src = da_ring_src(r, s, P);
  const int64_t nsrc = count_of(R, src), nnext = count_of(R, da_ring_src(r, s + 1, P));
  const size_t blk = kv_block_elems(R, nsrc), es = esize(R);
  char *cur = w->slot[s & 1], *nxt = w->slot[(s + 1) & 1];
  if (s + 1 < P && w->comm) {
    size_t sb = blk * es, rb = kv_block_elems(R, nnext) * es;
    DA_CHECK(R->xp->t->exchange_start(R->xp, cur, sb, next_rank(R), nxt, rb, prev_rank(R), DA_TAG_BWD_KV, s, &w->rkv));
    S->step_bytes[s] += sb;
  }
  const double t0 = da_time_now();
  DA_CHECK(w->compute ? bwd_compute(w, s, cur, nsrc) : poke(R, w->rkv, w->rd));
  S->step_compute_s[s] = da_time_now() - t0;
  DA_CHECK(bwd_pass_sums(w, s, blk, nnext));
  DA_CHECK(wait_req(R, &w->rkv, &S->step_wait_s[s]));
  DA_TRACE(DA_SUB_COMM, "backward step %d: kv of rank %d, compute %.3g s, wait %.3g s", s, src, S->step_compute_s[s],
           S->step_wait_s[s]);
  return DA_SUCCESS;
}

/* After the ring: the deferred part of the own block (while the own sum makes its last hop), the
 * sum that came home added to it, and dq, dk, dv stored in the input dtype. */
static da_status_t bwd_finish(bwd_pass_t *w, da_rview_t dq, da_rview_t dk, da_rview_t dv) {
  da_ring_t *R = w->R;
  da_ring_stats_t *S = &R->bwd;
  const int H = R->kp.H, D = R->kp.D;
  const int64_t B = R->B, nloc = R->nloc, row = kvrow(R);
  if (w->compute) {
    const double t0 = da_time_now();
    DA_CHECK(host_compute_fence(R));
    DA_CHECK(bwd_items(w, 0, w->split, INT64_MAX, w->k, w->v, nloc, w->own));
    S->step_compute_s[0] += da_time_now() - t0;
  }
  const float *home = w->own;
  if (w->travel) {
    const int planted = R->test_skip == DA_RING_SKIP_DKV_WAIT;
    if (!planted) DA_CHECK(wait_req(R, &w->rd, &S->step_wait_s[R->P - 1]));
    if (w->compute) {
      double ta = da_time_now();
      if (da_payload(3.0 * kv_block_elems(R, nloc) * sizeof(float))) {
        DA_CHECK(host_compute_fence(R));
        DA_CHECK(acc_fold(R, w->rv, w->own, kv_block_elems(R, nloc)));
      }
      S->step_compute_s[0] += da_time_now() - ta;
    }
    if (planted) DA_CHECK(wait_req(R, &w->rd, &S->step_wait_s[R->P - 1])); /* the test hook: too late */
    home = w->rv;
  }
  if (w->st == DA_SUCCESS && w->compute && nloc > 0 &&
      da_payload((double)(big_elems(R) + own_elems(R)) * (sizeof(float) + esize(R)))) {
    DA_CHECK(host_compute_fence(R));
    for (int64_t b = 0; b < B; b++) {
      DA_CHECK(store_rows(R, dq, b, nloc, (int64_t)H * D, w->dqa + b * nloc * H * D));
      DA_CHECK(store_rows(R, dk, b, nloc, row, home + b * nloc * row));
      DA_CHECK(store_rows(R, dv, b, nloc, row, home + (B + b) * nloc * row));
    }
  }
  return DA_SUCCESS;
}

da_status_t da_ring_bwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, da_rview_t dout,
                        const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv, void *stream) {
  const double t_start = da_time_now();
  stats_reset(R, &R->bwd);
  R->xp->phase = "backward";
  R->stream = R->xp->stream = stream; /* device mode: compute stream; exchanges start after it */
  bwd_pass_t w = {.R = R, .q = q, .k = k, .v = v, .dout = dout, .lse = lse, .stream = stream, .st = DA_SUCCESS};
  w.comm = R->mode != DA_RING_COMPUTE_ONLY, w.compute = R->mode != DA_RING_COMM_ONLY;
  w.travel = R->P > 1 && w.comm;
  /* Without buffers this rank cannot take part: report it; the plan makes every rank agree. */
  da_status_t st_comm = bwd_begin(&w, out);
  for (int s = 0; s < R->P && st_comm == DA_SUCCESS; s++) st_comm = bwd_step(&w, s);
  if (st_comm == DA_SUCCESS) st_comm = bwd_finish(&w, dq, dk, dv);
  if (st_comm) {
    if (w.rkv) R->xp->t->abort(R->xp, w.rkv);
    if (w.rd) R->xp->t->abort(R->xp, w.rd);
  }
  stats_sum(R, &R->bwd, t_start);
  return st_comm ? st_comm : w.st;
}
