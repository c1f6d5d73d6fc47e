/* bwd.cu: the launcher of the CUDA backward block kernel (bwd.cuh): argument checks, the choice
 * of the (head dim, storage type) instantiation, and one launch per chunk of query rows whose
 * documents fit in a da_dmask (tile.cuh). Built by nvcc into da_cuda and, as host C++, into the
 * SIMT build (tests/simt). Called through the backend table (backend.cu), never directly. */
#include "compat.cuh"
#include "bwd.cuh"
#include "cuda_backend.h"
#include "core.h"

/* Resource budgets (tests/cuda_gate.py). Registers: the dK + dV accumulators alone take D per
 * thread; 255 is the hardware cap and two 128-thread blocks per SM fit up to 256. Shared memory
 * is all dynamic (da_bwd_cfg<D>::SMEM: 67584 B for D = 64, 76288 B for D = 128), so the static
 * SHARED the gate reads is 0. */
// budget: _Z13da_bwd_kernelILi64E13__nv_bfloat16Ev11da_bwd_args sm_80 REG<=184 SHARED<=0
// budget: _Z13da_bwd_kernelILi64E6__halfEv11da_bwd_args sm_80 REG<=184 SHARED<=0
// budget: _Z13da_bwd_kernelILi128E13__nv_bfloat16Ev11da_bwd_args sm_80 REG<=248 SHARED<=0
// budget: _Z13da_bwd_kernelILi128E6__halfEv11da_bwd_args sm_80 REG<=248 SHARED<=0

static bool da_bwd_aligned(const void *p, int64_t ld) {
  return (uintptr_t)p % 16 == 0 && ld % 8 == 0;
}

/* Blocks per (KV tile, KV head): 1 (dk, dv added by their only writer: deterministic, no atomic
 * traffic) while the launch has at least two blocks per SM; otherwise the group's rep = H/G query
 * heads are split over up to rep blocks (powers of two) that add dk, dv with atomics, so a short
 * KV block under MQA or strong GQA still fills the device. */
static int da_bwd_auto_hsplit(int rep, int64_t nblocks) {
  int dev = 0, sms = 108;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    sms = 108, (void)cudaGetLastError();
  int hs = 1;
  while (hs < rep && nblocks * hs < 2 * (int64_t)sms) hs *= 2;
  return hs < rep ? hs : rep;
}

/* Launch the (D, T) kernel over the KV tiles of kpos for every chunk of query rows. The offsets
 * into q, dout, lse, delta, dq (rows r0..) and k, v, dk, dv (rows j0..) keep every pointer the
 * kernel sees at row 0 of its sub-block. */
template <int D, typename T>
static da_status_t da_bwd_launch(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout,
                                 int64_t lddo, const float *lse, const float *delta, da_span_t qpos,
                                 const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                                 float *dq, float *dk, float *dv, int hsplit, void *stream) {
  using C = da_bwd_cfg<D>;
  void (&kernel)(da_bwd_args_t) = da_bwd_kernel<D, T>; /* DA_LAUNCH needs a name without commas */
  cudaError_t err =
      cudaFuncSetAttribute((const void *)&kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (err != cudaSuccess) return da_cuda_status((int)err, "bwd_block: cudaFuncSetAttribute (dynamic shared memory)");
  const int H = p->H, G = p->G;
  const int vec = da_bwd_aligned(q, ldq) && da_bwd_aligned(dout, lddo) && da_bwd_aligned(k, ldk) &&
                  da_bwd_aligned(v, ldv);
  for (int64_t r0 = 0, r1 = 0; r0 < qpos.count; r0 = r1) {
    da_bwd_args_t a;
    a.mask = da_dmask_chunk(&p->mask, qpos, r0, &r1);
    a.qpos = da_span_sub(qpos, r0, r1 - r0);
    /* Keys outside the chunk's documents are hidden from all its queries: launch only the KV
     * tiles of the key rows inside [first document start, last document end). */
    int64_t jlo = 0, jhi = kpos.count - 1;
    if (p->mask.flags & DA_MASK_DOC) da_index_range(a.mask.bound[0], a.mask.bound[a.mask.nb] - 1, kpos, &jlo, &jhi);
    if (jlo > jhi) continue;
    a.kpos = da_span_sub(kpos, jlo, jhi - jlo + 1);
    if (da_mask_classify(&p->mask, a.qpos.start, da_span_last(a.qpos), a.kpos.start, da_span_last(a.kpos)) ==
        DA_TILE_EMPTY)
      continue;
    a.q = (const uint16_t *)q + r0 * ldq;
    a.dout = (const uint16_t *)dout + r0 * lddo;
    a.lse = lse + r0 * H, a.delta = delta + r0 * H;
    a.dq = dq + r0 * H * D;
    a.k = (const uint16_t *)k + jlo * ldk;
    a.v = (const uint16_t *)v + jlo * ldv;
    a.dk = dk + jlo * G * D, a.dv = dv + jlo * G * D;
    a.ldq = ldq, a.lddo = lddo, a.ldk = ldk, a.ldv = ldv;
    a.H = H, a.G = G, a.scale = p->scale, a.vec = vec;
    const int64_t ntiles = (a.kpos.count + C::BC - 1) / C::BC;
    if (ntiles > 0x7fffffff)
      return DA_ERR(DA_ERR_UNSUPPORTED, "bwd_block: %lld KV rows exceed the grid", (long long)a.kpos.count);
    a.hsplit = hsplit > 0 ? (hsplit < H / G ? hsplit : H / G) : da_bwd_auto_hsplit(H / G, ntiles * G);
    DA_LAUNCH(kernel, dim3((unsigned)ntiles, (unsigned)G, (unsigned)a.hsplit), dim3(C::THREADS), C::SMEM, stream, a);
    err = cudaGetLastError();
    if (err != cudaSuccess) return da_cuda_status((int)err, "bwd_block: kernel launch");
  }
  return DA_SUCCESS;
}

extern "C" da_status_t da_cuda_bwd_block_split(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout,
                                               int64_t lddo, const float *lse, const float *delta, da_span_t qpos,
                                               const void *k, int64_t ldk, const void *v, int64_t ldv,
                                               da_span_t kpos, float *dq, float *dk, float *dv, int hsplit,
                                               void *stream) {
  if (!p) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "bwd_block: NULL parameters");
  if (qpos.count <= 0 || kpos.count <= 0) return DA_SUCCESS;
  const int H = p->H, G = p->G, D = p->D;
  if (H < 1 || G < 1 || H % G)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "bwd_block: H = %d must be a positive multiple of G = %d", H, G);
  if (p->dtype != DA_BFLOAT16 && p->dtype != DA_FLOAT16)
    return DA_ERR(DA_ERR_UNSUPPORTED, "cuda bwd_block: storage dtype %d (bf16 and fp16 only)", (int)p->dtype);
  if (D != 64 && D != 128)
    return DA_ERR(DA_ERR_UNSUPPORTED, "cuda bwd_block: head dim %d (64 and 128 only)", D);
  if (!q || !dout || !lse || !delta || !k || !v || !dq || !dk || !dv)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "bwd_block: NULL tensor");
  if (ldq < (int64_t)H * D || lddo < (int64_t)H * D || ldk < (int64_t)G * D || ldv < (int64_t)G * D)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "bwd_block: row strides (q %lld, dout %lld, k %lld, v %lld) below a row",
                  (long long)ldq, (long long)lddo, (long long)ldk, (long long)ldv);
  if (qpos.stride < 1 || kpos.stride < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "bwd_block: span strides must be >= 1");
  if (da_mask_classify(&p->mask, qpos.start, da_span_last(qpos), kpos.start, da_span_last(kpos)) == DA_TILE_EMPTY)
    return DA_SUCCESS;
  if (D == 64)
    return p->dtype == DA_BFLOAT16
               ? da_bwd_launch<64, __nv_bfloat16>(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos,
                                                   dq, dk, dv, hsplit, stream)
               : da_bwd_launch<64, __half>(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos, dq, dk,
                                           dv, hsplit, stream);
  return p->dtype == DA_BFLOAT16
             ? da_bwd_launch<128, __nv_bfloat16>(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos,
                                                  dq, dk, dv, hsplit, stream)
             : da_bwd_launch<128, __half>(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos, dq, dk, dv,
                                          hsplit, stream);
}

extern "C" da_status_t da_cuda_bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout,
                                         int64_t lddo, const float *lse, const float *delta, da_span_t qpos,
                                         const void *k, int64_t ldk, const void *v, int64_t ldv, da_span_t kpos,
                                         float *dq, float *dk, float *dv, void *stream) {
  return da_cuda_bwd_block_split(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos, dq, dk, dv, 0,
                                 stream);
}
