/* kernels_hook_gpu.h: the backend hook of test_kernels.c (see there) for the CUDA backend on a
 * real GPU (label gpu): table da_kernels_cuda, kernel-visible buffers in managed memory so the
 * host fills and reads them in place, a device synchronize before the host reads. Without a
 * usable GPU the program exits 77 (CTest: skipped). Check runs unforked (a CUDA context does not
 * survive fork). */
#ifndef DA_KERNELS_HOOK_GPU_H
#define DA_KERNELS_HOOK_GPU_H

#include <cuda_runtime_api.h>
#include <stdio.h>
#include "kernels.h"

extern const da_kernels_t da_kernels_cuda;
extern da_status_t da_cuda_status(int cuda_error, const char *what);

#define TB_NAME "cuda"
#define TB_NOFORK 1
static const da_kernels_t *tb_kernels(void) { return &da_kernels_cuda; }
static void *tb_alloc(size_t n) {
  void *p = NULL;
  return cudaMallocManaged(&p, n, cudaMemAttachGlobal) == cudaSuccess ? p : NULL;
}
/* managed memory back to CUDA, anything else (the suite's host-only arrays) to free() */
static void tb_free(void *p) {
  struct cudaPointerAttributes a;
  if (p && cudaPointerGetAttributes(&a, p) == cudaSuccess && a.type == cudaMemoryTypeManaged) {
    cudaFree(p);
    return;
  }
  (void)cudaGetLastError();
  free(p);
}
static da_status_t tb_sync(void) { return da_cuda_status(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
static int tb_init(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n < 1) {
    printf("# no usable CUDA device (%s): skipped\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 77;
  }
  struct cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) printf("# device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  return 0;
}
#define TB_DTYPES {DA_FLOAT16, DA_BFLOAT16, DA_FLOAT16}
#define TB_DS {64, 128, 64, 128, 64, 128}
#define TB_SWEEP_SCALE 1.0
#define TB_SELF_1000_FROM 0
#define TB_SELF_1000_TO (2 * TU_NMASKS)
#define TB_N_BLOCK_SIZES 4
#define TB_N_THREADS 3
#define TB_BLOCK_SPLITS_FROM 0
#define TB_BLOCK_SPLITS_TO (2 * TU_NMASKS)
#define TB_N_MASKED_ROWS 3
#define TB_N_NAN 6
#define TB_SPLIT_S_LO 150
#define TB_SPLIT_S_HI 420

#endif /* DA_KERNELS_HOOK_GPU_H */
