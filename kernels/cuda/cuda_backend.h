/* cuda_backend.h: the C face of the CUDA backend (kernels/cuda): the kernel table, the one place
 * CUDA errors become distattn status codes, and the entries the .cu files implement with exactly
 * the argument lists of da_kernels_t (kernels.h). Plain C, no CUDA types: streams are void *,
 * CUDA error codes int. The same sources built as host C++ with DA_SIMT (tests/simt) export the
 * table as da_kernels_cuda_simt instead. */
#ifndef DA_CUDA_BACKEND_H
#define DA_CUDA_BACKEND_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

extern const da_kernels_t da_kernels_cuda;      /* nvcc build (name "cuda") */
extern const da_kernels_t da_kernels_cuda_simt; /* DA_SIMT host build (name "cuda-simt") */

/* cudaSuccess -> DA_SUCCESS; anything else -> DA_ERR_CUDA (DA_ERR_OUT_OF_MEMORY for
 * cudaErrorMemoryAllocation) recorded with `what` and CUDA's name and message. */
da_status_t da_cuda_status(int cuda_error, const char *what);

/* The entries (arguments as in da_kernels_t; pointers are device memory, the stream last). They
 * assume supports(p) succeeded. */
da_status_t da_cuda_fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                              const void *k, int64_t ldk, const void *v, int64_t ldv,
                              da_span_t kpos, da_fwd_state_t *st, void *stream);
da_status_t da_cuda_fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out,
                               da_dtype_t odt, int64_t ldo, float *lse, void *stream);
da_status_t da_cuda_merge(const da_kparams_t *p, int64_t n, float *o_a, float *lse_a,
                          const float *o_b, const float *lse_b, void *stream);
da_status_t da_cuda_bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo,
                             const void *dout, int64_t lddo, float *delta, void *stream);
da_status_t da_cuda_state_init(const da_kparams_t *p, da_fwd_state_t *st, void *stream);
da_status_t da_cuda_acc_store(int64_t rows, int64_t len, const float *x, const float *y, void *dst,
                              da_dtype_t ddt, int64_t ldd, void *stream);
da_status_t da_cuda_decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                           const da_kvpage_t *pages, int npages, float *o, float *lse,
                           void *stream);
/* bwd.cu (helper C). */
da_status_t da_cuda_bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout,
                              int64_t lddo, const float *lse, const float *delta, da_span_t qpos,
                              const void *k, int64_t ldk, const void *v, int64_t ldv,
                              da_span_t kpos, float *dq, float *dk, float *dv, void *stream);
/* The same with the number of blocks that share one (KV tile, KV head) chosen by the caller
 * (1..H/G; 0 = as da_cuda_bwd_block chooses: 1 unless the launch would not fill the device): the
 * tests run both the owner-writes and the atomic dk/dv paths with it. */
da_status_t da_cuda_bwd_block_split(const da_kparams_t *p, const void *q, int64_t ldq,
                                    const void *dout, int64_t lddo, const float *lse,
                                    const float *delta, da_span_t qpos, const void *k, int64_t ldk,
                                    const void *v, int64_t ldv, da_span_t kpos, float *dq,
                                    float *dk, float *dv, int hsplit, void *stream);

/* Stream-ordered scratch for the entries that need it (decode): cudaMallocAsync/cudaFreeAsync
 * on the device, malloc/free in the host build. */
da_status_t da_cuda_scratch_alloc(void **ptr, size_t bytes, void *stream);
da_status_t da_cuda_scratch_free(void *ptr, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* DA_CUDA_BACKEND_H */
