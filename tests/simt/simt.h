/* simt.h: the SIMT runner's CUDA built-ins for host C++ (the DA_SIMT build of kernels/cuda). One
 * fiber (ucontext) per CUDA thread by default, or one std::thread per CUDA thread when compiled
 * with DA_SIMT_THREADS (the ThreadSanitizer build); blocks run one after another, so `static`
 * arrays serve as __shared__. Included by kernels/cuda/compat.cuh after the CUDA headers (whose
 * cuda_runtime_api.h declares the runtime functions simt.cpp implements on host memory).
 * Not a GPU model: no memory-model fences, bank conflicts or timing (docs in tests/simt/README.md). */
#ifndef DA_SIMT_H
#define DA_SIMT_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include <cuda_runtime_api.h> /* dim3, uint3, cudaError_t, cudaStream_t, the API declarations */

/* ---- qualifiers: the CUDA headers give them compiler annotations meant for nvcc; here they are
 * plain host C++ (__shared__ = static: one block runs at a time, its threads share the array). ---- */
#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __constant__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

/* ---- the running CUDA thread ---- */
struct da_simt_thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int linear; /* threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z) */
  int lane;   /* linear % 32 */
  int warp;   /* linear / 32 */
};
/* The CUDA thread running on this host thread / fiber; aborts outside a launch. */
extern thread_local da_simt_thread *da_simt_current;
[[noreturn]] void da_simt_outside(void);
inline da_simt_thread *da_simt_self(void) {
  da_simt_thread *t = da_simt_current;
  if (__builtin_expect(!t, 0)) da_simt_outside();
  return t;
}

#define threadIdx (da_simt_self()->thread_idx)
#define blockIdx (da_simt_self()->block_idx)
#define blockDim (da_simt_self()->block_dim)
#define gridDim (da_simt_self()->grid_dim)
#define warpSize 32

/* ---- synchronization and warp exchange ----
 * A barrier releases when every thread (lane) that has not exited has arrived, as on the device.
 * A barrier nobody can complete (threads waiting at different barriers) aborts with a message
 * instead of hanging. */
void __syncthreads(void);
void __syncwarp(unsigned mask = 0xffffffffu);

/* Warp-collective exchange, the building block of the shuffles and of the lane-exact PTX emulation
 * (kernels/cuda/ptx.cuh). Every lane of the warp calls it with `bytes` (<= DA_SIMT_SLOT) of its own.
 * da_simt_warp_publish returns the warp's slots: lane i's bytes at slots + i * DA_SIMT_SLOT, valid
 * until this lane's next warp-collective call; *took gets the lanes that took part (the slots of
 * the others hold stale bytes). da_simt_warp_exchange copies them out: all receives 32 * bytes,
 * lane i's at all + i * bytes (lanes that did not take part: zeros). */
enum { DA_SIMT_SLOT = 64 };
const unsigned char *da_simt_warp_publish(const void *mine, size_t bytes, unsigned *took);
void da_simt_warp_exchange(const void *mine, void *all, size_t bytes);

/* Shuffles: mask must name every lane of the warp that has not exited (partial-warp shuffles are
 * not emulated: abort). Width segments as in the CUDA programming guide. */
float __shfl_sync(unsigned mask, float v, int src_lane, int width = 32);
int __shfl_sync(unsigned mask, int v, int src_lane, int width = 32);
unsigned __shfl_sync(unsigned mask, unsigned v, int src_lane, int width = 32);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32);
int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32);
unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32);
float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = 32);
int __shfl_down_sync(unsigned mask, int v, unsigned delta, int width = 32);
unsigned __shfl_down_sync(unsigned mask, unsigned v, unsigned delta, int width = 32);

/* A real atomic (std::atomic_ref) in both modes; returns the old value. */
float atomicAdd(float *address, float val);

/* Small device built-ins kernels use. */
template <typename T> inline T __ldg(const T *p) { return *p; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

/* ---- memory ---- */
/* This block's dynamic shared memory (the launch's smem_bytes, 128-byte aligned, filled with 0xff
 * bytes (NaN in bf16, fp16 and fp32) before each block, so a read of a never-written byte shows). */
void *da_simt_dyn_smem(void);

/* cp.async, deferred: the 16 source bytes are read at issue (zeros when !pred, src not read) and
 * written to dst only when a cp.async.wait_group retires the group, so a kernel that forgets the
 * wait reads stale shared memory. Both addresses must be 16-byte aligned (abort otherwise). */
void da_simt_cp_async(void *dst, const void *src, bool pred);
void da_simt_cp_async_commit(void);
/* Perform every committed group but the newest n (uncommitted copies stay pending). */
void da_simt_cp_async_wait(int n);

/* ---- launch ----
 * Runs body once per CUDA thread of every block of grid, synchronously. func identifies the kernel
 * for cudaFuncSetAttribute (its dynamic shared memory limit). Errors (bad configuration, too much
 * dynamic shared memory) return and set the last error (cudaGetLastError) without running. */
cudaError_t da_simt_launch(const void *func, dim3 grid, dim3 block, size_t smem_bytes,
                           std::function<void()> body);

/* DA_LAUNCH's host form: the arguments become a tuple of the kernel's parameter types (evaluated
 * once, by value, like a launch), and every CUDA thread calls the kernel with its own copies. */
template <typename... P, typename... A>
inline cudaError_t da_simt_launch_kernel(const void *func, dim3 grid, dim3 block, size_t smem_bytes,
                                         void (*kernel)(P...), A &&...args) {
  static_assert(sizeof...(P) == sizeof...(A), "DA_LAUNCH: argument count differs from the kernel's");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  return da_simt_launch(func, grid, block, smem_bytes, [&params, kernel] { std::apply(kernel, params); });
}

/* cuda_runtime.h's C++ overload (kernel pointer instead of const void *), as nvcc offers it. */
template <typename T> inline cudaError_t cudaFuncSetAttribute(T *entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void *>(entry), attr, value);
}

/* The device the runner reports: sm_80 (A100) limits, so kernels are held to the smaller part. */
enum {
  DA_SIMT_SMEM_OPTIN = 166912,   /* cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_80 */
  DA_SIMT_SMEM_DEFAULT = 49152,  /* dynamic shared memory without cudaFuncSetAttribute */
  DA_SIMT_SM_COUNT = 108,
};

#endif /* DA_SIMT_H */
