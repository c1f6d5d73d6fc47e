/* ptx.cuh: the inline-PTX instructions of the sm_80 path (ldmatrix, mma.sync m16n8k16, cp.async,
 * ex2.approx) behind small wrappers: the real `asm volatile` in nvcc's device pass, and in the SIMT
 * build (DA_SIMT) a lane-exact host emulation that exchanges registers across the warp through the
 * runner (tests/simt/simt.h). The emulation is one reading of the PTX ISA: tests/simt/test_frag.cpp
 * holds it against the ISA tables and a float64 GEMM, and the GPU tests confirm it on hardware. */
#ifndef DA_CUDA_PTX_CUH
#define DA_CUDA_PTX_CUH

#include "compat.cuh"
#include "frag.cuh"

#if defined(DA_SIMT) && !defined(__CUDA_ARCH__)
#include <cstdio>
#include <cstdlib>
#endif

/* Storage tags for da_pack2 (the kernels are templated on the storage type; see da_pack2_t). */
struct da_tag_bf16 {};
struct da_tag_f16 {};

/* ======================= host emulation (SIMT build only) ======================= */
#if defined(DA_SIMT) && !defined(__CUDA_ARCH__)
namespace da_emu {

inline void check_row(const void *p, const char *what) {
  if ((uintptr_t)p % 16) {
    fprintf(stderr, "simt: %s: row address %p is not 16-byte aligned (lane %d, warp %d, block %u)\n",
            what, p, da_simt_self()->lane, da_simt_self()->warp, da_simt_self()->block_idx.x);
    abort();
  }
}

/* ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16, written from the ISA text (not from
 * frag.cuh, so the tests that chain it with mma check the two against each other). */
/* The warp's published slots; the .sync.aligned instructions need every lane of the warp. */
inline const unsigned char *publish_all(const void *mine, size_t bytes, const char *what) {
  unsigned took;
  const unsigned char *slots = da_simt_warp_publish(mine, bytes, &took);
  if (took != 0xffffffffu) {
    fprintf(stderr, "simt: %s with lanes 0x%08x only: the whole warp must execute it\n", what, took);
    abort();
  }
  return slots;
}

inline void ldmatrix(uint32_t *r, int nmat, bool trans, const void *row) {
  const unsigned char *slots = publish_all(&row, sizeof row, "ldmatrix");
  auto addr = [&](int l) {
    const void *p;
    std::memcpy(&p, slots + l * DA_SIMT_SLOT, sizeof p);
    return p;
  };
  int lane = da_simt_self()->lane;
  for (int i = 0; i < nmat; i++) {
    uint32_t v = 0;
    for (int h = 0; h < 2; h++) {
      /* without .trans lane t holds row t/4, columns 2(t%4)+h; with .trans the transpose */
      int mrow = trans ? 2 * (lane % 4) + h : lane / 4;
      int mcol = trans ? lane / 4 : 2 * (lane % 4) + h;
      const void *src = addr(i * 8 + mrow);
      check_row(src, trans ? "ldmatrix.trans" : "ldmatrix");
      uint16_t e;
      std::memcpy(&e, (const char *)src + 2 * mcol, 2);
      v |= (uint32_t)e << (16 * h);
    }
    r[i] = v;
  }
}

inline double half_to_double(uint16_t bits, da_tag_bf16) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/* fp16 through a table built once with cuda_fp16's own conversion (whose host version is a
 * software routine: per element it was a visible share of the SIMT tests' time). */
inline double half_to_double(uint16_t bits, da_tag_f16) {
  struct table {
    float v[65536];
    table() {
      for (uint32_t i = 0; i < 65536; i++) {
        __half_raw raw;
        raw.x = (unsigned short)i;
        v[i] = __half2float(__half(raw));
      }
    }
  };
  static const table t;
  return t.v[bits];
}

/* Where each element of A (16 x 16) and B (16 x 8) lives in the warp's fragments: the inverse of
 * the frag.cuh maps, built once from them (so the emulation gathers with exactly those maps). */
struct frag_where {
  unsigned char a[16][16][2], b[16][8][2]; /* (lane, element) */
  frag_where() {
    for (int l = 0; l < 32; l++) {
      for (int e = 0; e < 8; e++) {
        da_rc p = da_frag_a(l, e);
        a[p.row & 15][p.col & 15][0] = (unsigned char)l, a[p.row & 15][p.col & 15][1] = (unsigned char)e;
      }
      for (int e = 0; e < 4; e++) {
        da_rc p = da_frag_b(l, e);
        b[p.row & 15][p.col & 7][0] = (unsigned char)l, b[p.row & 15][p.col & 7][1] = (unsigned char)e;
      }
    }
  }
};

/* mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: the warp's A and B fragments are
 * exchanged; each lane computes its own 4 outputs (frag.cuh da_frag_c) from the rows of A and the
 * columns of B they need, found through the inverse of the frag.cuh maps. Products of 16-bit
 * values are exact in float64; the sum is rounded once to fp32 (the hardware adds in fp32 in an
 * order it does not document, so results agree to fp32 rounding, not bit for bit). */
template <typename Tag> inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  static const frag_where where;
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]}; /* a[0..3], then b[0..1] */
  const unsigned char *slots = publish_all(mine, sizeof mine, "mma.sync");
  auto half = [&](int l, int reg, int e) { /* element e of register reg of lane l */
    uint32_t v;
    std::memcpy(&v, slots + l * DA_SIMT_SLOT + 4 * reg, 4);
    return half_to_double((uint16_t)(v >> (16 * (e % 2))), Tag());
  };
  auto elem_a = [&](int r, int k) {
    int l = where.a[r][k][0], e = where.a[r][k][1];
    return half(l, e / 2, e);
  };
  auto elem_b = [&](int k, int n) {
    int l = where.b[k][n][0], e = where.b[k][n][1];
    return half(l, 4 + e / 2, e);
  };
  int lane = da_simt_self()->lane;
  float out[4];
  for (int e = 0; e < 4; e++) { /* c is this lane's own accumulator: d[e] is element (row, col) */
    da_rc p = da_frag_c(lane, e);
    double s = d[e];
    for (int k = 0; k < 16; k++) s += elem_a(p.row, k) * elem_b(k, p.col);
    out[e] = (float)s;
  }
  for (int e = 0; e < 4; e++) d[e] = out[e];
}

} /* namespace da_emu */
#endif

/* ======================= the wrappers ======================= */
/* smem_row: the address this lane supplies (lane t: row t % 8 of matrix t / 8; x2 uses the
 * addresses of lanes 0-15), 16-byte aligned, in shared memory. frag.cuh has the address rules. */

DA_DEV void da_ldmatrix_x4(uint32_t r[4], const void *smem_row) {
#if defined(__CUDA_ARCH__)
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#elif defined(DA_SIMT)
  da_emu::ldmatrix(r, 4, false, smem_row);
#endif
}

DA_DEV void da_ldmatrix_x4_trans(uint32_t r[4], const void *smem_row) {
#if defined(__CUDA_ARCH__)
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#elif defined(DA_SIMT)
  da_emu::ldmatrix(r, 4, true, smem_row);
#endif
}

DA_DEV void da_ldmatrix_x2(uint32_t r[2], const void *smem_row) {
#if defined(__CUDA_ARCH__)
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
#elif defined(DA_SIMT)
  da_emu::ldmatrix(r, 2, false, smem_row);
#endif
}

DA_DEV void da_ldmatrix_x2_trans(uint32_t r[2], const void *smem_row) {
#if defined(__CUDA_ARCH__)
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
#elif defined(DA_SIMT)
  da_emu::ldmatrix(r, 2, true, smem_row);
#endif
}

/* d += a * b: a is the A fragment (16 x 16 bf16), b the B fragment (16 x 8), d the fp32 C/D
 * fragment (frag.cuh: da_frag_a, da_frag_b, da_frag_c). */
DA_DEV void da_mma_16816_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(DA_SIMT)
  da_emu::mma_16816<da_tag_bf16>(d, a, b);
#endif
}

DA_DEV void da_mma_16816_f16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(DA_SIMT)
  da_emu::mma_16816<da_tag_f16>(d, a, b);
#endif
}

/* The mma of a storage type: da_mma_16816(d, a, b, da_tag_bf16()) or (..., da_tag_f16()). */
DA_DEV void da_mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], da_tag_bf16) {
  da_mma_16816_bf16(d, a, b);
}
DA_DEV void da_mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], da_tag_f16) {
  da_mma_16816_f16(d, a, b);
}

/* cp.async.cg.shared.global, 16 bytes (L2 only: the tiles are streamed once per block).
 * pred false: src-size 0, the 16 bytes of smem are zero-filled and gmem is not read (it may then
 * point anywhere, but must still be 16-byte aligned). Completes at the da_cp_async_wait that
 * retires its group; never read smem it targets before that wait and a __syncthreads. */
DA_DEV void da_cp_async_16(void *smem, const void *gmem, bool pred) {
#if defined(__CUDA_ARCH__)
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(pred ? 16 : 0)
               : "memory");
#elif defined(DA_SIMT)
  da_simt_cp_async(smem, gmem, pred);
#endif
}

/* cp.async.commit_group: the copies issued since the last commit form one group. */
DA_DEV void da_cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(DA_SIMT)
  da_simt_cp_async_commit();
#endif
}

/* cp.async.wait_group N: wait until at most N of this thread's committed groups are pending.
 * Other threads' copies are visible only after a following __syncthreads. */
template <int N> DA_DEV void da_cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(DA_SIMT)
  da_simt_cp_async_wait(N);
#endif
}

/* 2^x: ex2.approx.ftz.f32 on the device (max rel. error 2^-22; subnormal results flush to +0);
 * on the host exp2f with the same flush. */
DA_DEV float da_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#elif defined(DA_SIMT)
  float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.0f : y; /* FLT_MIN: ftz, as the device */
#else
  return x; /* nvcc host pass: never called */
#endif
}

/* Two floats -> one register of two 16-bit values, round to nearest even; lo in the low half (the
 * even element of a fragment). */
DA_HD uint32_t da_pack2(float lo, float hi, da_tag_bf16) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
DA_HD uint32_t da_pack2(float lo, float hi, da_tag_f16) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

/* The tag of a storage type: da_tag_of<__nv_bfloat16>::type is da_tag_bf16. */
template <typename T> struct da_tag_of;
template <> struct da_tag_of<__nv_bfloat16> { typedef da_tag_bf16 type; };
template <> struct da_tag_of<__half> { typedef da_tag_f16 type; };

#endif /* DA_CUDA_PTX_CUH */
