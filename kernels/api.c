/* api.c: the public single-rank attention calls of include/distattn.h (context, forward, backward,
 * decode) over the kernel table. Validates every argument with a message naming the tensor and
 * field, packs views whose heads are not packed, and loops over the batch. No MPI here. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "core.h"
#include "env.h"
#include "dtype.h"
#include "kernels.h"
#include "tensor.h"

struct da_context {
  da_device_t device;
  int nthreads;
  const da_kernels_t *kt;
  da_errbuf_t err; /* da_last_error(ctx): this context's and its plans', caches', offloads' last failure */
};

/* Record the thread's last message in ctx on failure (set outputs only on success). */
static da_status_t finish(da_context_t *ctx, da_status_t st) { return da_errbuf_finish(ctx ? &ctx->err : NULL, st); }

da_errbuf_t *da_context_errbuf(const da_context_t *ctx) { return ctx ? (da_errbuf_t *)&ctx->err : NULL; }

/* What a context on dev (not the CPU) cannot do yet, although its kernel table is built: the
 * distributed ring plans (da_plan_*, comm/ring.c) run on device memory, but the single-rank calls
 * below, the KV cache, tree decode and offloading keep their scratch and running state in host
 * memory. They refuse such a context with this text rather than hand host pointers to device
 * kernels. */
const char *da_context_device_gap(da_device_t dev) {
  (void)dev;
  return "a CUDA context runs the distributed ring plans (da_plan_*: ring, striped, zigzag) on GPU memory; the "
         "single-rank calls (da_attention_*), the KV cache, tree decode and offloading still keep their buffers "
         "in host memory and do not take it yet (docs/design.md section 12)";
}

/* The single-rank calls: host scratch, so host contexts only (see da_context_device_gap). */
static da_status_t host_context(const da_context_t *ctx, const char *fn) {
  if (ctx->device == DA_DEVICE_CPU) return DA_SUCCESS;
  return DA_ERR(DA_ERR_UNSUPPORTED, "%s: %s", fn, da_context_device_gap(ctx->device));
}

da_status_t da_context_create(const da_config_t *cfg, da_context_t **out) {
  da_error_clear();
  DA_ARG_CHECK(NULL, out != NULL, "da_context_create: ctx pointer is NULL");
  *out = NULL;
  da_config_t def = DA_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  /* Every DISTATTN_* variable the library reads is checked here, once per context: a bad value is
   * an error naming it at the first call, not a surprise deep inside a plan or a silent default. */
  DA_CHECK(da_env_check_all());
  if (cfg->size < sizeof(size_t) + sizeof(unsigned) || cfg->version == 0 || cfg->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                  "da_config_t: size %zu / version %u not recognized (start from DA_CONFIG_INITIALIZER)",
                  cfg->size, cfg->version);
  if (cfg->nthreads < 0 || cfg->nthreads > DA_MAX_NTHREADS)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_config_t: nthreads %d out of range [0, %d] (0 = the cores this "
                  "process may use)", cfg->nthreads, DA_MAX_NTHREADS);
  int nthreads = cfg->nthreads;
  if (nthreads == 0) DA_CHECK(da_default_nthreads_checked(&nthreads));
  const da_kernels_t *kt = da_kernels_get(cfg->device);
  if (!kt) return cfg->device == DA_DEVICE_CUDA ? DA_ERR_UNSUPPORTED : DA_ERR_INVALID_ARGUMENT; /* recorded there */
  da_context_t *c = da_calloc(sizeof *c, 64);
  if (!c) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "context");
  c->device = cfg->device;
  c->nthreads = nthreads;
  c->kt = kt;
  DA_INFO(DA_SUB_INIT, "context: backend %s, %d threads", kt->name, c->nthreads);
  *out = c;
  return DA_SUCCESS;
}

void da_context_free(da_context_t *ctx) { da_free(ctx); }

const char *da_last_error(const da_context_t *ctx) { return ctx ? ctx->err.msg : da_error_message(); }

/* Build kernel params from a problem. */
static da_status_t make_params(const da_context_t *ctx, const da_problem_t *prob, da_kparams_t *p) {
  if (!prob) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "problem is NULL");
  if (prob->size < sizeof(size_t) + sizeof(unsigned) || prob->version == 0 || prob->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                  "da_problem_t: size %zu / version %u not recognized (start from DA_PROBLEM_INITIALIZER)",
                  prob->size, prob->version);
  if (prob->batch < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "batch = %lld must be >= 1", (long long)prob->batch);
  if (prob->seq < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "seq = %lld must be >= 1", (long long)prob->seq);
  if (prob->heads < 1 || prob->heads > 1 << 16)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "heads = %lld must be in 1..65536", (long long)prob->heads);
  int64_t G = prob->kv_heads ? prob->kv_heads : prob->heads;
  if (G < 1 || G > prob->heads)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv_heads = %lld must be in 1..heads (%lld)", (long long)G,
                  (long long)prob->heads);
  if (prob->dim < 1 || prob->dim > 1 << 16)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "dim = %lld must be in 1..65536", (long long)prob->dim);
  memset(p, 0, sizeof *p);
  p->H = (int)prob->heads;
  p->G = (int)G;
  p->D = (int)prob->dim;
  p->scale = prob->scale != 0.0f ? prob->scale : (float)(1.0 / sqrt((double)prob->dim));
  p->dtype = prob->dtype;
  p->mask.flags = prob->mask;
  p->mask.window = prob->window;
  p->mask.ndocs = prob->ndocs;
  p->mask.cu_seqlens = prob->cu_seqlens;
  p->nthreads = ctx->nthreads;
  p->block_q = prob->block_q;
  p->block_k = prob->block_k;
  DA_CHECK(da_kparams_check(p));
  DA_CHECK(da_mask_check(&p->mask, prob->seq));
  return ctx->kt->supports(p);
}

/* A rank-3/4 attention tensor seen per batch element: base pointer of element b, row stride,
 * head stride, and whether the heads are packed (head stride == D). */
typedef struct {
  char *base;
  int64_t batch_stride, ld, hs;
  size_t esz;
} view_t;

static da_status_t check_tensor(const char *name, const da_tensor_t *t, da_dtype_t dt, da_device_t dev,
                                int64_t B, int64_t S, int64_t H, int64_t D, view_t *v) {
  if (!t) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: tensor is NULL", name);
  if (!t->data) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: data pointer is NULL", name);
  if (t->dtype != dt)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: dtype %s, expected %s", name, da_dtype_name(t->dtype), da_dtype_name(dt));
  if (t->device != dev)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: on device %d but the context runs on device %d", name,
                  (int)t->device, (int)dev);
  int nd = D ? 4 : 3; /* lse has no D axis */
  if (t->ndim != nd && t->ndim != nd - 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: ndim = %d, expected %d or %d", name, t->ndim, nd - 1, nd);
  int off = t->ndim == nd ? 1 : 0;
  if (off && t->shape[0] != B)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: shape[0] = %lld but batch = %lld", name, (long long)t->shape[0], (long long)B);
  if (!off && B != 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: no batch axis but batch = %lld", name, (long long)B);
  int64_t want[3] = {S, H, D};
  const char *axis[3] = {"tokens", "heads", "dim"};
  for (int i = 0; i < (D ? 3 : 2); i++)
    if (t->shape[off + i] != want[i])
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: shape[%d] (%s) = %lld, expected %lld", name, off + i,
                    axis[i], (long long)t->shape[off + i], (long long)want[i]);
  /* Axis names for the message: [batch] tokens heads [dim]. */
  static const char *const names[4] = {"batch", "tokens", "heads", "dim"};
  DA_CHECK(da_tensor_check_strides(t, D ? da_dtype_size(dt) : sizeof(float), 1, "", name, names + 1 - off));
  v->esz = D ? da_dtype_size(dt) : sizeof(float);
  v->base = t->data;
  v->batch_stride = off ? t->strides[0] : 0;
  v->ld = t->strides[off];
  v->hs = D ? t->strides[off + 1] : 1;
  return DA_SUCCESS;
}

static int needs_pack(const view_t *v, int64_t H, int64_t D) { return v->hs != D && H > 1; }
/* A packing buffer for view v, or a non-NULL dummy when v is used in place. */
static void *pack_buf(const view_t *v, int64_t S, int64_t H, int64_t D) {
  static char in_place;
  return needs_pack(v, H, D) ? da_malloc((size_t)(S * H * D) * v->esz, 64) : (void *)&in_place;
}
static void pack_free(void *p, const view_t *v, int64_t H, int64_t D) {
  if (needs_pack(v, H, D)) da_free(p);
}

/* Pointer + row stride of batch element b with packed heads; packs into tmp when needed. */
static const void *rows_in(const view_t *v, int64_t b, int64_t S, int64_t H, int64_t D, void *tmp,
                           int64_t *ld) {
  const char *base = v->base + (size_t)(b * v->batch_stride) * v->esz;
  if (!needs_pack(v, H, D)) {
    *ld = v->ld;
    return base;
  }
  for (int64_t s = 0; s < S; s++)
    for (int64_t h = 0; h < H; h++)
      memcpy((char *)tmp + (size_t)((s * H + h) * D) * v->esz, base + (size_t)(s * v->ld + h * v->hs) * v->esz,
             (size_t)D * v->esz);
  *ld = H * D;
  return tmp;
}

/* Store fp32 packed rows [S][H][D] into the view (dtype conversion, any strides). */
static void rows_out_f32(const view_t *v, int64_t b, int64_t S, int64_t H, int64_t D, da_dtype_t dt,
                         const float *src) {
  char *base = v->base + (size_t)(b * v->batch_stride) * v->esz;
  for (int64_t s = 0; s < S; s++)
    for (int64_t h = 0; h < H; h++) {
      char *dst = base + (size_t)(s * v->ld + h * v->hs) * v->esz;
      const float *x = src + (s * H + h) * D;
      for (int64_t d = 0; d < D; d++) da_store_f32(dst, (int)dt, d, x[d]);
    }
}

static void lse_out(const view_t *v, int64_t b, int64_t S, int64_t H, const float *src) {
  float *base = (float *)v->base + b * v->batch_stride;
  for (int64_t s = 0; s < S; s++)
    for (int64_t h = 0; h < H; h++) base[s * v->ld + h] = src[s * H + h];
}
static void lse_in(const view_t *v, int64_t b, int64_t S, int64_t H, float *dst) {
  const float *base = (const float *)v->base + b * v->batch_stride;
  for (int64_t s = 0; s < S; s++)
    for (int64_t h = 0; h < H; h++) dst[s * H + h] = base[s * v->ld + h];
}

da_status_t da_attention_fwd(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                             const da_tensor_t *k, const da_tensor_t *v, da_tensor_t *out,
                             da_tensor_t *lse, void *stream) {
  da_error_clear();
  DA_ARG_CHECK(NULL, ctx != NULL, "%s: context is NULL", __func__);
  da_kparams_t p;
  da_status_t st = host_context(ctx, "da_attention_fwd");
  if (st == DA_SUCCESS) st = make_params(ctx, prob, &p);
  if (st) return finish(ctx, st);
  const int64_t B = prob->batch, S = prob->seq, H = p.H, G = p.G, D = p.D;
  view_t vq, vk, vv, vo, vl = {0};
  da_dtype_t dt = prob->dtype;
  if ((st = check_tensor("q", q, dt, ctx->device, B, S, H, D, &vq)) ||
      (st = check_tensor("k", k, dt, ctx->device, B, S, G, D, &vk)) ||
      (st = check_tensor("v", v, dt, ctx->device, B, S, G, D, &vv)) ||
      (st = check_tensor("out", out, dt, ctx->device, B, S, H, D, &vo)) ||
      (lse && (st = check_tensor("lse", lse, DA_FLOAT32, ctx->device, B, S, H, 0, &vl))))
    return finish(ctx, st);
  float *o = da_malloc((size_t)(S * H * D) * 4, 64), *m = da_malloc((size_t)(S * H) * 4, 64);
  float *l = da_malloc((size_t)(S * H) * 4, 64), *ls = da_malloc((size_t)(S * H) * 4, 64);
  void *tq = pack_buf(&vq, S, H, D), *tk = pack_buf(&vk, S, G, D), *tv = pack_buf(&vv, S, G, D);
  if (!o || !m || !l || !ls || !tq || !tk || !tv) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "forward work buffers for S = %lld", (long long)S);
    goto cleanup;
  }
  for (int64_t b = 0; b < B; b++) {
    int64_t ldq, ldk, ldv;
    const void *qb = rows_in(&vq, b, S, H, D, tq, &ldq), *kb = rows_in(&vk, b, S, G, D, tk, &ldk);
    const void *vb = rows_in(&vv, b, S, G, D, tv, &ldv);
    da_fwd_state_t fs = {o, m, l, S};
    DA_CHECK_GOTO(da_fwd_state_init(ctx->kt, &p, &fs, stream), st, cleanup);
    DA_CHECK_GOTO(ctx->kt->fwd_block(&p, qb, ldq, da_span(0, 1, S), kb, ldk, vb, ldv, da_span(0, 1, S), &fs, stream),
                  st, cleanup);
    DA_CHECK_GOTO(ctx->kt->fwd_finish(&p, &fs, o, DA_FLOAT32, H * D, ls, stream), st, cleanup);
    rows_out_f32(&vo, b, S, H, D, dt, o);
    if (lse) lse_out(&vl, b, S, H, ls);
  }
cleanup:
  da_free(o), da_free(m), da_free(l), da_free(ls);
  pack_free(tq, &vq, H, D), pack_free(tk, &vk, G, D), pack_free(tv, &vv, G, D);
  return finish(ctx, st);
}

da_status_t da_attention_bwd(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                             const da_tensor_t *k, const da_tensor_t *v, const da_tensor_t *out,
                             const da_tensor_t *dout, const da_tensor_t *lse, da_tensor_t *dq,
                             da_tensor_t *dk, da_tensor_t *dv, void *stream) {
  da_error_clear();
  DA_ARG_CHECK(NULL, ctx != NULL, "%s: context is NULL", __func__);
  da_kparams_t p;
  da_status_t st = host_context(ctx, "da_attention_bwd");
  if (st == DA_SUCCESS) st = make_params(ctx, prob, &p);
  if (st) return finish(ctx, st);
  const int64_t B = prob->batch, S = prob->seq, H = p.H, G = p.G, D = p.D;
  da_dtype_t dt = prob->dtype;
  view_t vq, vk, vv, vo, vdo, vl, vdq, vdk, vdv;
  if ((st = check_tensor("q", q, dt, ctx->device, B, S, H, D, &vq)) ||
      (st = check_tensor("k", k, dt, ctx->device, B, S, G, D, &vk)) ||
      (st = check_tensor("v", v, dt, ctx->device, B, S, G, D, &vv)) ||
      (st = check_tensor("out", out, dt, ctx->device, B, S, H, D, &vo)) ||
      (st = check_tensor("dout", dout, dt, ctx->device, B, S, H, D, &vdo)) ||
      (st = check_tensor("lse", lse, DA_FLOAT32, ctx->device, B, S, H, 0, &vl)) ||
      (st = check_tensor("dq", dq, dt, ctx->device, B, S, H, D, &vdq)) ||
      (st = check_tensor("dk", dk, dt, ctx->device, B, S, G, D, &vdk)) ||
      (st = check_tensor("dv", dv, dt, ctx->device, B, S, G, D, &vdv)))
    return finish(ctx, st);
  size_t nq = (size_t)(S * H * D), nk = (size_t)(S * G * D);
  float *aq = da_malloc(nq * 4, 64), *ak = da_malloc(nk * 4, 64), *av = da_malloc(nk * 4, 64);
  float *ls = da_malloc((size_t)(S * H) * 4, 64), *delta = da_malloc((size_t)(S * H) * 4, 64);
  void *tq = pack_buf(&vq, S, H, D), *tk = pack_buf(&vk, S, G, D), *tv = pack_buf(&vv, S, G, D);
  void *to = pack_buf(&vo, S, H, D), *tdo = pack_buf(&vdo, S, H, D);
  if (!aq || !ak || !av || !ls || !delta || !tq || !tk || !tv || !to || !tdo) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "backward work buffers for S = %lld", (long long)S);
    goto cleanup;
  }
  for (int64_t b = 0; b < B; b++) {
    int64_t ldq, ldk, ldv, ldo, lddo;
    const void *qb = rows_in(&vq, b, S, H, D, tq, &ldq), *kb = rows_in(&vk, b, S, G, D, tk, &ldk);
    const void *vb = rows_in(&vv, b, S, G, D, tv, &ldv), *ob = rows_in(&vo, b, S, H, D, to, &ldo);
    const void *dob = rows_in(&vdo, b, S, H, D, tdo, &lddo);
    lse_in(&vl, b, S, H, ls);
    memset(aq, 0, nq * 4), memset(ak, 0, nk * 4), memset(av, 0, nk * 4);
    DA_CHECK_GOTO(ctx->kt->bwd_prep(&p, S, ob, ldo, dob, lddo, delta, stream), st, cleanup);
    DA_CHECK_GOTO(ctx->kt->bwd_block(&p, qb, ldq, dob, lddo, ls, delta, da_span(0, 1, S), kb, ldk, vb, ldv,
                                     da_span(0, 1, S), aq, ak, av, stream),
                  st, cleanup);
    rows_out_f32(&vdq, b, S, H, D, dt, aq);
    rows_out_f32(&vdk, b, S, G, D, dt, ak);
    rows_out_f32(&vdv, b, S, G, D, dt, av);
  }
cleanup:
  da_free(aq), da_free(ak), da_free(av), da_free(ls), da_free(delta);
  pack_free(tq, &vq, H, D), pack_free(tk, &vk, G, D), pack_free(tv, &vv, G, D);
  pack_free(to, &vo, H, D), pack_free(tdo, &vdo, H, D);
  return finish(ctx, st);
}

da_status_t da_attention_decode(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                                const da_tensor_t *k, const da_tensor_t *v, da_tensor_t *out,
                                da_tensor_t *lse, void *stream) {
  da_error_clear();
  DA_ARG_CHECK(NULL, ctx != NULL, "%s: context is NULL", __func__);
  da_kparams_t p;
  da_status_t st = host_context(ctx, "da_attention_decode");
  if (st == DA_SUCCESS) st = make_params(ctx, prob, &p);
  if (st) return finish(ctx, st);
  const int64_t B = prob->batch, S = prob->seq, H = p.H, G = p.G, D = p.D;
  if (!q) return finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "q: tensor is NULL"));
  /* T read only from a well-formed q; a bad ndim is reported by check_tensor below */
  const int64_t T = q->ndim == 3 || q->ndim == 4 ? q->shape[q->ndim - 3] : 1;
  if (T < 1 || T > S)
    return finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "q: %lld new tokens, must be in 1..seq (%lld)",
                              (long long)T, (long long)S));
  da_dtype_t dt = prob->dtype;
  view_t vq, vk, vv, vo, vl = {0};
  if ((st = check_tensor("q", q, dt, ctx->device, B, T, H, D, &vq)) ||
      (st = check_tensor("k", k, dt, ctx->device, B, S, G, D, &vk)) ||
      (st = check_tensor("v", v, dt, ctx->device, B, S, G, D, &vv)) ||
      (st = check_tensor("out", out, dt, ctx->device, B, T, H, D, &vo)) ||
      (lse && (st = check_tensor("lse", lse, DA_FLOAT32, ctx->device, B, T, H, 0, &vl))))
    return finish(ctx, st);
  float *o = da_malloc((size_t)(T * H * D) * 4, 64), *ls = da_malloc((size_t)(T * H) * 4, 64);
  void *tq = pack_buf(&vq, T, H, D), *tk = pack_buf(&vk, S, G, D), *tv = pack_buf(&vv, S, G, D);
  if (!o || !ls || !tq || !tk || !tv) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "decode work buffers");
    goto cleanup;
  }
  for (int64_t b = 0; b < B; b++) {
    int64_t ldq;
    da_kvpage_t page;
    const void *qb = rows_in(&vq, b, T, H, D, tq, &ldq);
    page.k = rows_in(&vk, b, S, G, D, tk, &page.ldk);
    page.v = rows_in(&vv, b, S, G, D, tv, &page.ldv);
    page.pos = da_span(0, 1, S);
    DA_CHECK_GOTO(ctx->kt->decode(&p, qb, ldq, da_span(S - T, 1, T), &page, 1, o, ls, stream), st, cleanup);
    rows_out_f32(&vo, b, T, H, D, dt, o);
    if (lse) lse_out(&vl, b, T, H, ls);
  }
cleanup:
  da_free(o), da_free(ls);
  pack_free(tq, &vq, H, D), pack_free(tk, &vk, G, D), pack_free(tv, &vv, G, D);
  return finish(ctx, st);
}

/* ---- accessors for the distributed drivers (comm/) ---- */
const da_kernels_t *da_context_kernels(const da_context_t *ctx) { return ctx ? ctx->kt : NULL; }
da_device_t da_context_device(const da_context_t *ctx) { return ctx ? ctx->device : DA_DEVICE_CPU; }
da_status_t da_context_params(const da_context_t *ctx, const da_problem_t *prob, da_kparams_t *p) {
  DA_ARG_CHECK(NULL, ctx != NULL, "%s: context is NULL", __func__);
  return make_params(ctx, prob, p);
}
da_status_t da_context_finish(da_context_t *ctx, da_status_t st) { return finish(ctx, st); }
