/* kernels.h: the block contract of distattn (design §3) and the backend table. A backend folds
 * one block of keys/values into the fp32 running state of one block of queries, for any mask on
 * global positions. The distributed drivers (comm/) call only this table; they never know which
 * backend runs. No MPI, no CUDA types here (streams travel as void *). */
#ifndef DA_KERNELS_H
#define DA_KERNELS_H

#include <stdint.h>
#include "core.h"
#include "mask.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Shape and numerics shared by every call of one problem.
 * Tensors: q, out, dout, dq rows are [H][D]; k, v, dk, dv rows are [G][D]; heads are packed
 * (head stride D), rows have an explicit row stride (ld, in elements). Query head h reads KV head
 * h / (H / G): GQA without replicating KV. */
typedef struct da_kparams {
  int H, G, D;
  float scale;        /* softmax scale (> 0) */
  da_dtype_t dtype;   /* storage of q, k, v, out, dout (state and accumulators are fp32) */
  da_mask_t mask;
  int nthreads;       /* CPU threads for one call; 0 = da_default_nthreads() */
  int block_q;        /* tile rows of q; 0 = backend default */
  int block_k;        /* tile rows of k/v; 0 = backend default */
} da_kparams_t;

/* fp32 running state of the forward for nq query rows (all host or all device memory):
 *   o [nq][H][D]  unnormalized sum of exp(s - m) * v
 *   m [nq][H]     running max of the scores in log2 units, s = scale * log2(e) * q.k (so the
 *                 kernels use exp2), -INFINITY while the row has seen no allowed key; a backend
 *                 may lag it behind the max by a bounded amount (the CPU kernels move it only
 *                 when the max passes it by more than 8, docs/decisions.md): o and l are
 *                 relative to m, whatever it is
 *   l [nq][H]     running sum of exp2(s - m)
 * Only fwd_block and fwd_finish of one backend read a state; lse leaves in natural log.
 * Initialized by da_fwd_state_init (o = 0, m = -inf, l = 0). */
typedef struct da_fwd_state {
  float *o, *m, *l;
  int64_t nq;
} da_fwd_state_t;

/* One page (block) of a KV cache shard: rows [count][G][D] at positions pos. */
typedef struct da_kvpage {
  const void *k, *v;
  int64_t ldk, ldv;
  da_span_t pos;
} da_kvpage_t;

typedef struct da_kernels {
  const char *name;

  /* DA_SUCCESS if this backend runs p; DA_ERR_UNSUPPORTED (with a message saying what) if not,
   * DA_ERR_INVALID_ARGUMENT if p is malformed. Required. */
  da_status_t (*supports)(const da_kparams_t *p);

  /* Fold KV block (k, v at positions kpos) into st for Q block q at positions qpos
   * (qpos.count == st->nq). Block pairs the mask empties are skipped; order of calls does not
   * matter beyond rounding. Required. */
  da_status_t (*fwd_block)(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                           const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                           da_fwd_state_t *st, void *stream);

  /* out = o / l in dtype odt (row stride ldo), lse [nq][H] = m + log(l) (fp32, may be NULL).
   * Rows that saw no allowed key: out = 0, lse = -INFINITY. Required. */
  da_status_t (*fwd_finish)(const da_kparams_t *p, const da_fwd_state_t *st, void *out,
                            da_dtype_t odt, int64_t ldo, float *lse, void *stream);

  /* a <- merge(a, b) of n normalized partials: o [n][H][D] fp32, lse [n][H] fp32 (log-sum-exp
   * rescaling; -inf partials contribute nothing). Associative and commutative up to rounding.
   * Required. */
  da_status_t (*merge)(const da_kparams_t *p, int64_t n, float *o_a, float *lse_a,
                       const float *o_b, const float *lse_b, void *stream);

  /* delta [nq][H] = rowsum(dout * out) in fp32. Required. */
  da_status_t (*bwd_prep)(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo,
                          const void *dout, int64_t lddo, float *delta, void *stream);

  /* Accumulate (+=) the gradients of one block pair: dq [nq][H][D] for the Q block, dk and dv
   * [nk][G][D] for the KV block, all fp32 and packed. lse and delta [nq][H] fp32. Required. */
  da_status_t (*bwd_block)(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout,
                           int64_t lddo, const float *lse, const float *delta, da_span_t qpos,
                           const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                           float *dq, float *dk, float *dv, void *stream);

  /* Split-KV decode: nq query rows (few) against a shard given as pages, producing the
   * normalized partial o [nq][H][D] fp32 and lse [nq][H] fp32 (-inf where nothing is visible),
   * ready for merge. Threads split the KV. Required. */
  da_status_t (*decode)(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                        const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream);

  /* (optional) Zero-initialize a running state; NULL: host memset/fill by da_fwd_state_init. */
  da_status_t (*state_init)(const da_kparams_t *p, da_fwd_state_t *st, void *stream);

  /* (optional; the device-memory ring driver refuses a table without it) Row-wise fp32
   * arithmetic in the backend's memory, for the ring's dK/dV folds and gradient stores:
   *   dst[i * ldd + j] = x[i * len + j] (+ y[i * len + j] when y is not NULL), stored in ddt,
   * for i < rows, j < len; x and y are fp32 and packed. dst may be x itself (fp32, ldd == len):
   * each element is read before it is written. NULL on a backend whose drivers do it on the host. */
  da_status_t (*acc_store)(int64_t rows, int64_t len, const float *x, const float *y, void *dst,
                           da_dtype_t ddt, int64_t ldd, void *stream);

  /* 1: the entries queue their work on the stream and return before it ran (CUDA), so the
   * caller orders them with stream work simply by queueing; 0: they run on the host before
   * returning and ignore the stream (CPU, the SIMT runner), so a caller that queued copies on a
   * stream for them to read must drain that stream first (comm/ring.c: one stream_sync before
   * each batch of host compute, docs/ring.md "Device mode"). */
  int stream_ordered;
} da_kernels_t;

/* Backends. da_kernels_get returns NULL and records an error when the backend is not built. */
const da_kernels_t *da_kernels_get(da_device_t dev);
extern const da_kernels_t da_kernels_cpu;
/* The ISA level the CPU kernels run at in this process ("cpu-amx", "cpu-avx512bf16", "cpu-avx512",
 * "cpu-avx2", "cpu-generic"; "cpu-avx2bf16emu" only when DISTATTN_CPU_ISA asks for it). */
const char *da_cpu_isa_name(void);

/* Common argument checks every backend's supports() starts with (H % G, D, scale, mask). */
da_status_t da_kparams_check(const da_kparams_t *p);

/* Host helpers for running state: o = 0, m = -inf, l = 0. */
void da_fwd_state_init_host(const da_kparams_t *p, da_fwd_state_t *st);
da_status_t da_fwd_state_init(const da_kernels_t *kt, const da_kparams_t *p, da_fwd_state_t *st,
                              void *stream);

/* Internal accessors for the drivers in comm/ (the context struct stays private to api.c):
 * the backend table and thread count of a context, the problem -> kernel-params validation the
 * single-rank API uses (same messages), and recording a failure as the context's last error. */
const da_kernels_t *da_context_kernels(const da_context_t *ctx);
da_device_t da_context_device(const da_context_t *ctx);
da_status_t da_context_params(const da_context_t *ctx, const da_problem_t *prob, da_kparams_t *p);
da_status_t da_context_finish(da_context_t *ctx, da_status_t st);
/* The context's error buffer (core.h: da_errbuf_t) for DA_ARG_CHECK; NULL for a NULL context. */
da_errbuf_t *da_context_errbuf(const da_context_t *ctx);
/* What a context on dev (not the CPU) cannot do yet although its kernel table is built (the ring
 * plans run on device memory; the single-rank calls, KV cache, tree decode and offloading do not):
 * the refusals of those calls print it. */
const char *da_context_device_gap(da_device_t dev);

#ifdef __cplusplus
}
#endif
#endif /* DA_KERNELS_H */
