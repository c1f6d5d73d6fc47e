/* compat.cuh: the first include of every CUDA kernel file (kernels/cuda: the .cu and .cuh files). Under nvcc it
 * is the CUDA headers plus the DA_* qualifiers and launch macro; under a plain host C++ compiler with
 * -DDA_SIMT (the SIMT build of tests/simt) the same names map onto the host runner, so the very same
 * kernel bodies run on the CPU. It is not a portability layer for anything beyond these two builds. */
#ifndef DA_CUDA_COMPAT_CUH
#define DA_CUDA_COMPAT_CUH

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
/* ---- nvcc (both its host and device passes) ---- */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define DA_HD __host__ __device__ inline /* inline: defined in headers included by several .cu */
#define DA_DEV __device__ __forceinline__
#define DA_GLOBAL(bounds) __global__ __launch_bounds__(bounds)
/* Dynamic shared memory of the launch; 128-byte aligned so 16-byte cp.async / ldmatrix rows and
 * the XOR swizzle (frag.cuh) start on a bank-line boundary. */
#define DA_DYN_SMEM(type, name) extern __shared__ __align__(128) type name[]
/* A kernel template with a comma in its arguments must be named through an alias first. */
#define DA_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (cudaStream_t)(stream)>>>(__VA_ARGS__)

#elif defined(DA_SIMT)
/* ---- host C++ (tests/simt): CUDA built-ins from the SIMT runner ---- */
#include <cuda_bf16.h> /* compiles under g++: host __nv_bfloat16, and cuda_runtime_api.h's types */
#include <cuda_fp16.h>
#include "simt.h"

#define DA_HD inline
#define DA_DEV inline
#define DA_GLOBAL(bounds) /* a plain host function, run once per CUDA thread by the runner */
#define DA_DYN_SMEM(type, name) type *const name = reinterpret_cast<type *>(da_simt_dyn_smem())
/* Synchronous: the whole grid has run when DA_LAUNCH returns; errors as cudaGetLastError reports
 * them on a device (bad configuration, dynamic shared memory over the configured maximum). The
 * arguments are evaluated once and converted to the kernel's parameter types, as a launch does. */
#define DA_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                      \
  ((void)(stream), da_simt_launch_kernel(reinterpret_cast<const void *>(&kernel), dim3(grid),        \
                                         dim3(block), (size_t)(smem_bytes),                          \
                                         kernel __VA_OPT__(, ) __VA_ARGS__))

#else
#error "kernels/cuda/compat.cuh: compile with nvcc, or as host C++ with -DDA_SIMT (tests/simt)"
#endif

#endif /* DA_CUDA_COMPAT_CUH */
