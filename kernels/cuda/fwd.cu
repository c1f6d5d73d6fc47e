/* fwd.cu: launcher of the forward block kernel (fwd.cuh): one instantiation per (head dim,
 * dtype) of {64, 128} x {bf16, fp16}; masks and GQA are run-time parameters. The launcher cuts
 * the query rows into document chunks (tile.cuh, da_dmask_chunk) and launches one grid
 * (query tiles x heads) per chunk. It never synchronizes. */
#include "fwd.cuh"
#include "cuda_backend.h"

#define DA_LOG2E 1.4426950408889634f

template <int D, typename T>
static da_status_t fwd_launch(const da_fwd_args &a, int64_t nrows, cudaStream_t stream) {
  const int smem = da_fwd_smem_bytes(D);
  /* a reference, not a pointer: the SIMT launch identifies the kernel by &kern (template-ids would
   * split DA_LAUNCH's arguments) */
  void (&kern)(const da_fwd_args) = da_fwd_kernel<D, T>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return da_cuda_status(e, "fwd_block: setting the shared-memory size");
  dim3 grid((unsigned)((nrows + DA_FWD_BQ - 1) / DA_FWD_BQ), (unsigned)a.H), block(DA_FWD_THREADS);
  DA_LAUNCH(kern, grid, block, smem, stream, a);
  return da_cuda_status(cudaGetLastError(), "fwd_block launch");
}

static int aligned16(const void *p, int64_t ld) { return ((uintptr_t)p % 16 == 0) && (ld * 2) % 16 == 0; }

extern "C" da_status_t da_cuda_fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                                         const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                                         da_fwd_state_t *st, void *stream) {
  if (qpos.count <= 0 || kpos.count <= 0) return DA_SUCCESS;
  if (kpos.count > (1 << 30) || qpos.count > ((int64_t)1 << 40))
    return DA_ERR(DA_ERR_UNSUPPORTED, "cuda fwd_block: %lld keys in one call (at most 2^30)", (long long)kpos.count);
  if (da_mask_classify(&p->mask, qpos.start, da_span_last(qpos), kpos.start, da_span_last(kpos)) == DA_TILE_EMPTY)
    return DA_SUCCESS;
  const int64_t es = 2, hd = (int64_t)p->D;
  da_fwd_args a;
  a.k = k, a.v = v, a.ldq = ldq, a.ldk = ldk, a.ldv = ldv, a.kpos = kpos;
  a.H = p->H, a.G = p->G;
  a.scale_log2 = p->scale * DA_LOG2E;
  a.k_al = aligned16(k, ldk); /* head offsets g * D * 2 bytes are multiples of 16 */
  a.v_al = aligned16(v, ldv);
  for (int64_t r0 = 0, r1; r0 < qpos.count; r0 = r1) {
    a.mask = da_dmask_chunk(&p->mask, qpos, r0, &r1);
    a.q = (const char *)q + r0 * ldq * es;
    a.q_al = aligned16(a.q, ldq);
    a.qpos = da_span_sub(qpos, r0, r1 - r0);
    a.o = st->o + r0 * p->H * hd, a.m = st->m + r0 * p->H, a.l = st->l + r0 * p->H;
    da_status_t s;
    const int bf = p->dtype == DA_BFLOAT16;
    cudaStream_t cs = (cudaStream_t)stream;
    if (p->D == 64) s = bf ? fwd_launch<64, __nv_bfloat16>(a, r1 - r0, cs) : fwd_launch<64, __half>(a, r1 - r0, cs);
    else s = bf ? fwd_launch<128, __nv_bfloat16>(a, r1 - r0, cs) : fwd_launch<128, __half>(a, r1 - r0, cs);
    if (s != DA_SUCCESS) return s;
  }
  return DA_SUCCESS;
}
