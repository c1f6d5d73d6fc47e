/* backend.cu: the CUDA backend's kernel table (kernels.h): what it runs (supports), the one
 * translation of CUDA errors into distattn status codes, and stream-ordered scratch. The entries
 * themselves live in fwd.cu, small.cu, decode.cu and bwd.cu. Built by nvcc it exports
 * da_kernels_cuda ("cuda"); built as host C++ with DA_SIMT (tests/simt) the same table is
 * da_kernels_cuda_simt ("cuda-simt"), running the same kernel bodies on the CPU. */
#include <stdlib.h>
#include "compat.cuh"
#include "cuda_backend.h"

extern "C" da_status_t da_cuda_status(int cuda_error, const char *what) {
  if (cuda_error == (int)cudaSuccess) return DA_SUCCESS;
  const cudaError_t e = (cudaError_t)cuda_error;
  const da_status_t st = e == cudaErrorMemoryAllocation ? DA_ERR_OUT_OF_MEMORY : DA_ERR_CUDA;
  return DA_ERR(st, "%s: CUDA error %d (%s): %s", what ? what : "CUDA", cuda_error, cudaGetErrorName(e),
                cudaGetErrorString(e));
}

extern "C" da_status_t da_cuda_scratch_alloc(void **ptr, size_t bytes, void *stream) {
  *ptr = NULL;
  if (bytes == 0) bytes = 16;
#if defined(DA_SIMT)
  (void)stream;
  *ptr = malloc(bytes); /* the SIMT launches are synchronous: plain heap memory is enough */
  return *ptr ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "cuda-simt scratch: %zu bytes", bytes);
#else
  return da_cuda_status(cudaMallocAsync(ptr, bytes, (cudaStream_t)stream), "scratch cudaMallocAsync");
#endif
}

extern "C" da_status_t da_cuda_scratch_free(void *ptr, void *stream) {
  if (!ptr) return DA_SUCCESS;
#if defined(DA_SIMT)
  (void)stream;
  free(ptr);
  return DA_SUCCESS;
#else
  /* stream-ordered: freed after the kernels queued before it, without waiting for them */
  return da_cuda_status(cudaFreeAsync(ptr, (cudaStream_t)stream), "scratch cudaFreeAsync");
#endif
}

/* bf16 and fp16 storage at head dims 64 and 128: the instantiated kernels. Everything else is
 * refused with a message saying what (fp32 storage would need an exact fp32 path the tensor-core
 * kernels do not have). */
static da_status_t supports(const da_kparams_t *p) {
  DA_CHECK(da_kparams_check(p));
  if (p->dtype != DA_BFLOAT16 && p->dtype != DA_FLOAT16)
    return DA_ERR(DA_ERR_UNSUPPORTED,
                  "cuda backend: %s storage is not supported (bf16 and fp16 only; state and lse stay fp32)",
                  p->dtype == DA_FLOAT32 ? "fp32" : "this dtype's");
  if (p->D != 64 && p->D != 128)
    return DA_ERR(DA_ERR_UNSUPPORTED, "cuda backend: head dim %d is not supported (64 and 128 only)", p->D);
#if !defined(DA_SIMT)
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return DA_ERR(DA_ERR_UNSUPPORTED, "cuda backend: no usable CUDA device: %s (%s)", cudaGetErrorString(e),
                  cudaGetErrorName(e));
  }
#endif
  return DA_SUCCESS;
}

#if defined(DA_SIMT)
#define DA_CUDA_TABLE da_kernels_cuda_simt
#define DA_CUDA_NAME "cuda-simt"
#else
#define DA_CUDA_TABLE da_kernels_cuda
#define DA_CUDA_NAME "cuda"
#endif

extern "C" const da_kernels_t DA_CUDA_TABLE = {
    /* .name = */ DA_CUDA_NAME,
    /* .supports = */ supports,
    /* .fwd_block = */ da_cuda_fwd_block,
    /* .fwd_finish = */ da_cuda_fwd_finish,
    /* .merge = */ da_cuda_merge,
    /* .bwd_prep = */ da_cuda_bwd_prep,
    /* .bwd_block = */ da_cuda_bwd_block, /* bwd.cu */
    /* .decode = */ da_cuda_decode,
    /* .state_init = */ da_cuda_state_init,
    /* .acc_store = */ da_cuda_acc_store,
#if defined(DA_SIMT)
    /* .stream_ordered = */ 0, /* the runner's launches are synchronous */
#else
    /* .stream_ordered = */ 1,
#endif
};
