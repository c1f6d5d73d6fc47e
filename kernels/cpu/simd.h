/* simd.h: the few vector operations the CPU kernels are written in, for one ISA level chosen by
 * the compiler flags of the file that includes it (AVX-512, AVX2+FMA, or portable C with GCC
 * vector extensions). Lanes are W floats. Only cpu_impl.c includes this; it is compiled once
 * per level and the level is picked at run time (cpu.c). */
#ifndef DA_CPU_SIMD_H
#define DA_CPU_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "dtype.h"

/* 2^f on [-0.5, 0.5], the polynomial of the vector exp2s (highest degree first): degree 6 fitted
 * to the relative error, max 1.04e-7 evaluated in fp32 by Horner's rule (the degree-7 Taylor
 * polynomial it replaced: 9.9e-8, one FMA more per vector on the softmax's path). */
static const float da_exp2_poly[7] = {1.5345806605e-4f, 1.3399930904e-3f, 9.6184890717e-3f, 5.5503286421e-2f,
                                      2.4022646248e-1f, 6.9314718246e-1f, 1.0f};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define DA_SIMD_AVX512 1
#define W 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
/* x where lo <= j <= hi (lane-wise), -inf elsewhere. */
static inline vf vkeep_range(vf x, vf j, vf lo, vf hi) {
  __mmask16 k = _mm512_cmp_ps_mask(lo, j, _CMP_LE_OQ) & _mm512_cmp_ps_mask(j, hi, _CMP_LE_OQ);
  return _mm512_mask_blend_ps(k, _mm512_set1_ps(-INFINITY), x);
}
/* x, with lanes equal to `bad` replaced by `repl`. */
static inline vf vreplace_eq(vf x, float bad, float repl) {
  __mmask16 k = _mm512_cmp_ps_mask(x, _mm512_set1_ps(bad), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(k, x, _mm512_set1_ps(repl));
}
/* 2^x. Below -126 (and -inf) 0, computed from -126 under a zero mask: results in the subnormal
 * range cost a microcode assist on Intel cores, about 260 cycles per vector against 8 (Sapphire
 * Rapids, measured), which every masked score of a partial tile used to pay. */
static inline vf vexp2(vf x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ); /* NaN: false */
  /* max/min return their second operand when one is NaN: x second keeps a NaN a NaN */
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(128.0f), x);
  vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = _mm512_sub_ps(x, n);
  vf p = vset1(da_exp2_poly[0]);
  for (int i = 1; i < 7; i++) p = vfma(p, f, vset1(da_exp2_poly[i]));
  return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DA_SIMD_AVX2 1
#define W 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vhsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float vhmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vf vkeep_range(vf x, vf j, vf lo, vf hi) {
  vf k = _mm256_and_ps(_mm256_cmp_ps(lo, j, _CMP_LE_OQ), _mm256_cmp_ps(j, hi, _CMP_LE_OQ));
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, k);
}
static inline vf vreplace_eq(vf x, float bad, float repl) {
  vf k = _mm256_cmp_ps(x, _mm256_set1_ps(bad), _CMP_EQ_OQ);
  return _mm256_blendv_ps(x, _mm256_set1_ps(repl), k);
}
static inline vf vexp2(vf x) {
  vf tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-126.0f), x); /* NaN stays NaN (second operand) */
  x = _mm256_min_ps(_mm256_set1_ps(127.0f), x);
  vf n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = _mm256_sub_ps(x, n);
  vf p = vset1(da_exp2_poly[0]);
  for (int i = 1; i < 7; i++) p = vfma(p, f, vset1(da_exp2_poly[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  vf r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(tiny, r); /* x < -126 (or -inf): 0; NaN compares false and stays */
}
#else
/* Portable C: GCC/Clang vector extensions; the compiler lowers them to whatever the target has. */
#define DA_SIMD_GENERIC 1
#define W 4
typedef float vf __attribute__((vector_size(16)));
typedef float vfu __attribute__((vector_size(16), aligned(4)));
static inline vf vzero(void) { return (vf){0, 0, 0, 0}; }
static inline vf vset1(float x) { return (vf){x, x, x, x}; }
static inline vf vload(const float *p) { return *(const vfu *)p; }
static inline void vstore(float *p, vf x) { *(vfu *)p = x; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vmax(vf a, vf b) {
  vf r;
  for (int i = 0; i < W; i++) r[i] = a[i] > b[i] || b[i] != b[i] ? a[i] : b[i];
  return r;
}
static inline float vhsum(vf a) { return (a[0] + a[1]) + (a[2] + a[3]); }
static inline float vhmax(vf a) {
  float m = a[0];
  for (int i = 1; i < W; i++) m = a[i] > m ? a[i] : m;
  return m;
}
static inline vf vkeep_range(vf x, vf j, vf lo, vf hi) {
  vf r;
  for (int i = 0; i < W; i++) r[i] = lo[i] <= j[i] && j[i] <= hi[i] ? x[i] : -INFINITY;
  return r;
}
static inline vf vreplace_eq(vf x, float bad, float repl) {
  vf r;
  for (int i = 0; i < W; i++) r[i] = x[i] == bad ? repl : x[i];
  return r;
}
static inline vf vexp2(vf x) {
  vf r;
  for (int i = 0; i < W; i++) r[i] = x[i] < -150.0f ? 0.0f : exp2f(x[i]);
  return r;
}
#endif

/* The horizontal sums of four vectors, into out[0..3]. */
static inline void vhsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
#if defined(DA_SIMD_AVX512)
  /* pairwise within 128-bit blocks, then across the four blocks: 12 instructions, not 4 x 9 */
  __m512 x = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  __m512 y = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  __m512 z = _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#elif defined(DA_SIMD_AVX2)
  /* pairwise adds within the 128-bit halves, then the two halves: 6 instructions, not 4 x 6 */
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
#else
  out[0] = vhsum(a0), out[1] = vhsum(a1), out[2] = vhsum(a2), out[3] = vhsum(a3);
#endif
}

/* W elements of dtype dt at p (n <= W valid; the rest read as 0) as fp32 lanes. */
static inline vf vload_dt(const void *p, int dt, int n) {
  if (n <= 0) return vzero();
#if defined(DA_SIMD_AVX512)
  __mmask16 k = n >= W ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
  if (dt == 0) return _mm512_maskz_loadu_ps(k, p);
  __m256i h = _mm256_maskz_loadu_epi16(k, p);
  if (dt == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
#elif defined(DA_SIMD_AVX2)
  /* whole vectors in registers (the scalar loop below made bf16 decode 4x slower than fp32) */
  if (n >= W) {
    if (dt == 0) return _mm256_loadu_ps((const float *)p);
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    if (dt == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
  }
  float t[W];
  for (int i = 0; i < W; i++) t[i] = i < n ? da_load_f32(p, dt, i) : 0.0f;
  return vload(t);
#else
  float t[W];
  for (int i = 0; i < W; i++) t[i] = i < n ? da_load_f32(p, dt, i) : 0.0f;
  return vload(t);
#endif
}

/* Store n <= W lanes of x as dtype dt at p. */
static inline void vstore_dt(void *p, int dt, vf x, int n) {
  if (n <= 0) return;
#if defined(DA_SIMD_AVX512)
  __mmask16 k = n >= W ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
  if (dt == 0) {
    _mm512_mask_storeu_ps(p, k, x);
    return;
  }
  if (dt == 2) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
  if (dt == 1) { /* da_f32_to_bf16 in lanes: round to nearest even, a NaN stays a quiet NaN */
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
    return;
  }
#elif defined(DA_SIMD_AVX2)
  if (n >= W && dt == 0) {
    _mm256_storeu_ps((float *)p, x);
    return;
  }
  if (n >= W && dt == 2) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
  float t[W];
  vstore(t, x);
  for (int i = 0; i < n && i < W; i++) da_store_f32(p, dt, i, t[i]);
}

/* ---- bf16 pair products (levels built with DA_BF16DP) ---------------------------------------
 * A vbi holds W 32-bit lanes, each a pair of bf16 (element 2i in the low half, 2i+1 in the high
 * half, as bf16 rows sit in memory). vdp(acc, a, b) adds a.lo*b.lo + a.hi*b.hi to each fp32 lane:
 * the AVX512-BF16 instruction vdpbf16ps (DA_BF16DP == 1), or the same products in two FMAs on
 * AVX2 (DA_BF16DP == 2), which runs the identical tiling and packing on CPUs without the
 * instruction so that the layout logic of the bf16 path is tested everywhere. */
#if defined(DA_BF16DP)
#if DA_BF16DP == 1 && defined(DA_SIMD_AVX512) && defined(__AVX512BF16__)
typedef __m512i vbi;
static inline vbi vbload(const void *p) { return _mm512_loadu_si512(p); }
static inline void vbstore(void *p, vbi x) { _mm512_storeu_si512(p, x); }
static inline vbi vbcast(const void *p) {
  uint32_t x;
  memcpy(&x, p, 4);
  return _mm512_set1_epi32((int)x);
}
static inline vf vdp(vf acc, vbi a, vbi b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
/* Lanes (bf16(x0[i]), bf16(x1[i])), round to nearest even (the instruction's conversion). */
static inline vbi vpack_bf2(vf x0, vf x1) {
  /* cvtne2ps gives x0 in bf16 elements 0..15 and x1 in 16..31; interleave them into pairs */
  static const uint16_t idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_loadu_si512(idx), (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
}
/* W bf16 values of x at p. */
static inline void vstore_bf(uint16_t *p, vf x) {
  __m256bh h = _mm512_cvtneps_pbh(x);
  memcpy(p, &h, sizeof h);
}
#elif DA_BF16DP == 2 && defined(DA_SIMD_AVX2)
typedef __m256i vbi;
static inline vbi vbload(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void vbstore(void *p, vbi x) { _mm256_storeu_si256((__m256i *)p, x); }
static inline vbi vbcast(const void *p) {
  uint32_t x;
  memcpy(&x, p, 4);
  return _mm256_set1_epi32((int)x);
}
static inline vf vdp(vf acc, vbi a, vbi b) {
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, hi)), _mm256_castsi256_ps(_mm256_and_si256(b, hi)), acc);
}
/* bf16 of each lane (round to nearest even, NaN kept a quiet NaN) in the high 16 bits. */
static inline __m256i vbf_bits(vf x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
  return _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
}
static inline vbi vpack_bf2(vf x0, vf x1) { return _mm256_or_si256(_mm256_srli_epi32(vbf_bits(x0), 16), vbf_bits(x1)); }
static inline void vstore_bf(uint16_t *p, vf x) {
  const __m256i r = _mm256_srli_epi32(vbf_bits(x), 16);
  _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#else
#error "DA_BF16DP: 1 needs AVX-512 with -mavx512bf16, 2 needs AVX2"
#endif
#endif /* DA_BF16DP */

/* ---- AMX tiles (the level built with DA_AMX) -------------------------------------------------
 * Every tile of this level is 64 bytes wide, and 16 rows high but for decode's tiles of a group
 * of fewer than 16 heads (amx_on_rows): an fp32 accumulator of 16 x 16, a bf16 operand of 16
 * rows x 32 elements, or a pair-layout operand of 16 pair rows x 16 columns (the layout of the
 * pair products above: tdpbf16ps reads B as pairs over the reduction, as vdpbf16ps does). amx_on
 * loads the all-16-row configuration into the calling thread; amx_off releases the tiles.
 * Linux grants the tile state per process (cpu.c asks for it before picking this level). */
#if defined(DA_AMX)
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(DA_SIMD_AVX512)
#error "DA_AMX needs -mamx-tile -mamx-bf16 and AVX-512"
#endif
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_cfg_t;
/* Tiles 0..7 of rows[t] rows (1..16) of 64 bytes each. */
static inline void amx_on_rows(const uint8_t rows[8]) {
  amx_cfg_t c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = rows[t];
  _tile_loadconfig(&c);
}
static inline void amx_on(void) { amx_on_rows((const uint8_t[8]){16, 16, 16, 16, 16, 16, 16, 16}); }
static inline void amx_off(void) { _tile_release(); }
#endif /* DA_AMX */

#endif /* DA_CPU_SIMD_H */
