/* registry.c: the one place that knows which backends were built. The CUDA table is linked in
 * only when DISTATTN_HAVE_CUDA is defined (kernels/cuda, a later milestone). */
#include <math.h>
#include <string.h>
#include "kernels.h"

#ifdef DISTATTN_HAVE_CUDA
extern const da_kernels_t da_kernels_cuda;
#endif

const da_kernels_t *da_kernels_get(da_device_t dev) {
  switch (dev) {
    case DA_DEVICE_CPU: return &da_kernels_cpu;
    case DA_DEVICE_CUDA:
#ifdef DISTATTN_HAVE_CUDA
      return &da_kernels_cuda;
#else
      DA_ERR(DA_ERR_UNSUPPORTED, "the CUDA backend is not built in (configure with DISTATTN_CUDA=ON "
                                 "on a machine with nvcc)");
      return NULL;
#endif
  }
  DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown device %d", (int)dev);
  return NULL;
}

da_status_t da_kparams_check(const da_kparams_t *p) {
  if (!p) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kernel params are NULL");
  if (p->H < 1 || p->G < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "heads = %d, kv_heads = %d: both must be >= 1", p->H, p->G);
  if (p->H % p->G)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "heads = %d is not a multiple of kv_heads = %d", p->H, p->G);
  if (p->D < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "head dim D = %d must be >= 1", p->D);
  if (!(p->scale > 0.0f) || !isfinite(p->scale))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "softmax scale %g must be finite and > 0", (double)p->scale);
  if ((unsigned)p->dtype >= DA_NUM_DTYPES)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown dtype %d", (int)p->dtype);
  if (p->block_q < 0 || p->block_k < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "block sizes must be >= 0 (got %d, %d)", p->block_q, p->block_k);
  if (p->nthreads < 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "nthreads %d < 0", p->nthreads);
  if ((p->mask.flags & DA_MASK_DOC) && (p->mask.ndocs < 1 || !p->mask.cu_seqlens))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "doc mask without documents");
  if ((p->mask.flags & DA_MASK_WINDOW) && p->mask.window < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "window %lld must be >= 1", (long long)p->mask.window);
  return DA_SUCCESS;
}

void da_fwd_state_init_host(const da_kparams_t *p, da_fwd_state_t *st) {
  int64_t n = st->nq * p->H;
  memset(st->o, 0, (size_t)(n * p->D) * sizeof(float));
  memset(st->l, 0, (size_t)n * sizeof(float));
  for (int64_t i = 0; i < n; i++) st->m[i] = -INFINITY;
}

da_status_t da_fwd_state_init(const da_kernels_t *kt, const da_kparams_t *p, da_fwd_state_t *st,
                              void *stream) {
  if (kt->state_init) return kt->state_init(p, st, stream);
  da_fwd_state_init_host(p, st);
  return DA_SUCCESS;
}
