/* cpu_impl.c: blockwise flash attention on the CPU, forward, backward and split-KV decode, with
 * fp32 state and accumulation whatever the storage dtype. Compiled once per ISA level (simd.h);
 * DA_ISA names the table it exports. Not the capability checks or the dispatch (cpu.c).
 *
 * The layout trick that makes every softmax step vertical: a micro-tile of QT = NV*W queries
 * keeps its queries in vector lanes. Scores are computed transposed, S^T[key][query] = K Q^T,
 * by broadcasting one element of a key row against a row of the packed Q^T [D][QT]; the row
 * max, exp and sum over keys are then lane-wise operations between rows (no horizontal
 * reductions), and the output is accumulated transposed as O^T[D][QT] += V^T P^T by
 * broadcasting V elements against rows of P^T. Q^T is packed once per call and query tile,
 * K and V rows are used as stored (converted to fp32 per tile), so no transpose sits on the
 * O(S^2) path. The backward uses the same two products plus a third (rows of dK/dV += P^T dO). */
#include <math.h>
#include <omp.h>
#include <string.h>
#include "cpu_impl.h"
#include "simd.h"

#ifndef DA_ISA
#error "DA_ISA must name the ISA level (avx512, avx2, generic)"
#endif
#define DA_CAT2(a, b) a##b
#define DA_CAT(a, b) DA_CAT2(a, b)
#define DA_STR2(a) #a
#define DA_STR(a) DA_STR2(a)

/* Register tile of the flash products (gemm_a, gemm_b: TR rows, keys or head dims, by NV vectors
 * of W query lanes; gemm_c: TRC rows of keys by NU vectors along D, TR rows for the rest of a
 * tile, bwd_dkv_f32), per level, sized to the register file (docs/decisions.md):
 *   AVX-512 (32 zmm): 8 x 2, 16 accumulators; per step 2 vector loads + 8 broadcasts feed 16 FMAs.
 *   AVX2 (16 ymm):    4 x 3, 12 accumulators + 3 operand vectors + 1 broadcast = all 16 registers;
 *                     7 loads feed 12 FMAs; gemm_c 6 x 2 (12 accumulators). The 8 x 1 it had
 *                     before fed 8 FMAs with 9 loads (the load ports, not the FMAs, set the pace)
 *                     and its gemm_c (8 x 2 = 16 accumulators) spilled 3 accumulators to the
 *                     stack inside the loop.
 *   generic (SSE2, 16 xmm): 4 x 2.
 * QT = NV * W queries per micro-tile: 32 on AVX-512, 24 on AVX2, 8 generic.
 * R is the row count of decode's grouped kernel (dec_group), kept apart from TR. */
#if defined(DA_SIMD_AVX512)
#define NV 2
#define TR 8
#define TRC 8
#define R 8
#elif defined(DA_SIMD_AVX2)
#define NV 3
#define TR 4
#define TRC 6
#define R 8
#else
#define NV 2
#define TR 4
#define TRC 4
#define R 4
#endif
#define QT (NV * W)  /* queries per micro-tile */
#define NU 2         /* vectors along D in the row-major product (gemm_c) */
#define BK_DEF 64    /* keys per KV tile unless block_k asks otherwise */
#define BK_MAX 256   /* largest KV tile (block_k is rounded to KA and clamped to [KA, BK_MAX]) */
/* KV tiles are whole multiples of KA keys: TR (gemm_a's rows), or on the AMX level 32, two tiles
 * of 16 rows, which is also the reduction step over keys (amx_gemm). */
#ifdef DA_AMX
#define KA 32
#else
#define KA TR
#endif
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }
/* KV tile of a call: block_k rounded up to KA rows, in [KA, BK_MAX]; 0 = BK_DEF, or on the AMX
 * level in bf16 256 keys for the forward (fwd_micro_amx) and 128 for the backward (4K x 4 heads,
 * 2 threads, D 64 and 128: 128 the best or within 1% of it causal and none; 256 lost 9% causal). */
static inline int kv_tile(const da_kparams_t *p, int bwd) {
#ifdef DA_AMX
  if (p->block_k <= 0 && p->dtype == DA_BFLOAT16) return bwd ? 128 : BK_MAX;
#endif
  (void)bwd;
  if (p->block_k <= 0) return BK_DEF;
  int b = (p->block_k + KA - 1) / KA * KA;
  return b < KA ? KA : b > BK_MAX ? BK_MAX : b;
}
static inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
/* Padded head dim: a multiple of both TR (gemm_b rows) and NU*W (gemm_c columns). */
static inline int pad_dim(int D) {
  int a = NU * W > TR ? NU * W : TR;
  return (D + a - 1) / a * a;
}

/* Row `row`, head h of a [rows][heads][D] tensor of the call's dtype with row stride ld. */
static inline const char *head_row(const da_kparams_t *p, const void *base, int64_t ld, int64_t row, int h) {
  return (const char *)base + (size_t)(row * ld + (int64_t)h * p->D) * da_dtype_size(p->dtype);
}

/* ---- the three register-tiled products ------------------------------------------------------
 * Each product is written once, as its loop skeleton over the reduction dimension (DEF_GEMM_*),
 * and instantiated for two kinds of operands that differ only in the step, named by a prefix:
 *   F32: fp32 operands, one element of the reduction per step: b = vload, a = vset1(*p),
 *        c = fma(a, b, c);
 *   BF:  pairs of bf16 in one 32-bit lane (simd.h vdp), two elements per step: b = vbload,
 *        a = vbcast(p), c = vdp(c, a, b) (instantiated on DA_BF16DP levels only, below).
 * S##_VT is the operand vector type, S##_K the elements per step. */
#define F32_VT vf
#define F32_K 1
#define F32_LOAD(p) vload(p)
#define F32_BCAST(p) vset1(*(p))
#define F32_MAC(c, a, b) vfma(a, b, c)

/* C[r][.] = cs * sum_{d<n} A[r*lda + K*d ..] . B[d][.]   (r < TR; B is [n][QT]; C is [TR][QT]).
 * S^T = K Q^T and dP^T = V dO^T: A rows are keys, B the packed transposed queries. */
#define DEF_GEMM_A(NAME, TA, TB, S)                                                                          \
  static __attribute__((noinline)) void NAME(int n, const TA *restrict A, int lda, const TB *restrict B,     \
                                             float *restrict C, float cs) {                                  \
    vf c[TR][NV];                                                                                            \
    _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++)                                                    \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c[r][v] = vzero();                              \
    for (int d = 0; d < n; d++) {                                                                            \
      S##_VT b[NV];                                                                                          \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) b[v] = S##_LOAD(B + d * QT + v * W);              \
      _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++) {                                                \
        const S##_VT a = S##_BCAST(A + r * lda + S##_K * d);                                                 \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c[r][v] = S##_MAC(c[r][v], a, b[v]);            \
      }                                                                                                      \
    }                                                                                                        \
    const vf vc = vset1(cs);                                                                                 \
    _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++)                                                    \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) vstore(C + r * QT + v * W, vmul(c[r][v], vc));  \
  }

/* Ct[r][.] = Ct[r][.] * alpha + sum_{j<n} A[j*lda + r] . P[j][.]   (r < TR; P is [n][QT]; alpha
 * NULL: no rescale). O^T = O^T * alpha + V^T P^T and dQ^T += K^T dS^T: A rows are keys (or pairs
 * of keys), r walks the head dim. */
#define DEF_GEMM_B(NAME, T, S)                                                                               \
  static __attribute__((noinline)) void NAME(int n, const T *restrict A, int lda, const T *restrict P,       \
                                             float *restrict Ct, const vf *alpha) {                          \
    vf c[TR][NV];                                                                                            \
    _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++)                                                    \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c[r][v] =                                       \
        alpha ? vmul(vload(Ct + r * QT + v * W), alpha[v]) : vload(Ct + r * QT + v * W);                     \
    for (int j = 0; j < n; j++) {                                                                            \
      S##_VT b[NV];                                                                                          \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) b[v] = S##_LOAD(P + j * QT + v * W);              \
      const T *a = A + (size_t)j * lda;                                                                      \
      _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++) {                                                \
        const S##_VT x = S##_BCAST(a + r);                                                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c[r][v] = S##_MAC(c[r][v], x, b[v]);            \
      }                                                                                                      \
    }                                                                                                        \
    _Pragma("GCC unroll 16") for (int r = 0; r < TR; r++)                                                    \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) vstore(Ct + r * QT + v * W, c[r][v]);           \
  }

/* C[r*ldc + u*W ..] += sum_{i<QT/K} A[r*QT + K*i ..] . X[i*ldx + u*W ..]   (r < RC, u < NU).
 * dV += P^T dO and dK += dS^T Q: A rows are keys (lanes = queries), X rows are queries (or pairs
 * of queries). */
#define DEF_GEMM_C(NAME, TA, TX, S, RC)                                                                      \
  static __attribute__((noinline)) void NAME(const TA *restrict A, const TX *restrict X, int ldx,            \
                                             float *restrict C, int ldc) {                                   \
    vf c[RC][NU];                                                                                            \
    _Pragma("GCC unroll 16") for (int r = 0; r < RC; r++)                                                    \
        _Pragma("GCC unroll 4") for (int u = 0; u < NU; u++) c[r][u] = vload(C + r * ldc + u * W);           \
    for (int i = 0; i < QT / S##_K; i++) {                                                                   \
      S##_VT x[NU];                                                                                          \
      _Pragma("GCC unroll 4") for (int u = 0; u < NU; u++) x[u] = S##_LOAD(X + i * ldx + u * W);             \
      _Pragma("GCC unroll 16") for (int r = 0; r < RC; r++) {                                                \
        const S##_VT a = S##_BCAST(A + r * QT + S##_K * i);                                                  \
        _Pragma("GCC unroll 4") for (int u = 0; u < NU; u++) c[r][u] = S##_MAC(c[r][u], a, x[u]);            \
      }                                                                                                      \
    }                                                                                                        \
    _Pragma("GCC unroll 16") for (int r = 0; r < RC; r++)                                                    \
        _Pragma("GCC unroll 4") for (int u = 0; u < NU; u++) vstore(C + r * ldc + u * W, c[r][u]);           \
  }

DEF_GEMM_A(gemm_a, float, float, F32)
DEF_GEMM_B(gemm_b, float, F32)
DEF_GEMM_C(gemm_c, float, float, F32, TR)
#if TRC != TR
DEF_GEMM_C(gemm_c_wide, float, float, F32, TRC)
#endif

#if defined(DA_SIMD_AVX512)
/* 16 x 16 32-bit transpose in registers: r[i] lane k becomes r[k] lane i (32-bit interleaves,
 * then 64-bit, then two rounds of 128-bit lane shuffles). */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2)
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]), u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]), u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  /* u[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c */
  for (int c = 0; c < 4; c++) {
    const __m512i x = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), y = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i y2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(x, x2, 0x88), r[8 + c] = _mm512_shuffle_i32x4(x, x2, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(y, y2, 0x88), r[12 + c] = _mm512_shuffle_i32x4(y, y2, 0xdd);
  }
}
#endif

/* ---- packing -------------------------------------------------------------------------------- */

/* n rows of D elements (dtype dt, row stride ld elements) -> fp32 rows of Dp, times c; rows
 * n..nrows-1 and columns D..Dp-1 are zero. */
static void pack_rows(float *restrict dst, int Dp, int nrows, const void *src, int64_t ld, int dt, int n, int D,
                      float c) {
  const size_t es = dt == 0 ? 4 : 2;
  const vf vc = vset1(c);
  for (int i = 0; i < nrows; i++) {
    float *d = dst + (size_t)i * Dp;
    if (i >= n) {
      memset(d, 0, (size_t)Dp * sizeof(float));
      continue;
    }
    const char *s = (const char *)src + (size_t)i * (size_t)ld * es;
    for (int x = 0; x < Dp; x += W) vstore(d + x, vmul(vload_dt(s + (size_t)x * es, dt, D - x), vc));
  }
}

/* Transposed: Qt[d][i] = c * q[i][d] for i < n (rows of stride ld), zero for i >= n, d >= D. */
static void pack_cols(float *restrict Qt, int Dp, const void *src, int64_t ld, int dt, int n, int D, float c) {
  const size_t es = dt == 0 ? 4 : 2;
  float row[DA_CPU_MAX_DIM + 64];
  memset(Qt, 0, (size_t)Dp * QT * sizeof(float));
  for (int i = 0; i < n; i++) {
    const char *s = (const char *)src + (size_t)i * (size_t)ld * es;
    for (int x = 0; x < D; x += W) vstore(row + x, vload_dt(s + (size_t)x * es, dt, D - x));
    for (int d = 0; d < D; d++) Qt[d * QT + i] = c * row[d];
  }
}

/* Per-lane visible key index range [lo, hi] of a query micro-tile against a key span (floats,
 * exact: tile indices are small). Lanes >= n get an empty range. */
static void lane_ranges(const da_mask_t *m, da_span_t qs, int n, da_span_t ks, float *lo, float *hi) {
  const int64_t k0 = ks.start, k1 = da_span_last(ks);
  for (int i = 0; i < QT; i++) {
    if (i >= n) {
      lo[i] = 1.0f, hi[i] = 0.0f;
      continue;
    }
    int64_t a, b;
    da_mask_row_range(m, da_span_at(qs, i), k0, k1, &a, &b);
    if (a > b || b < k0 || a > k1) {
      lo[i] = 1.0f, hi[i] = 0.0f;
      continue;
    }
    int64_t ja = a <= k0 ? 0 : (a - k0 + ks.stride - 1) / ks.stride;
    int64_t jb = b >= k1 ? ks.count - 1 : (b - k0) / ks.stride;
    lo[i] = (float)ja, hi[i] = (float)jb;
  }
}

/* ---- bf16 pair products (DA_BF16DP levels, bf16 storage) ------------------------------------
 * The same three products as above, over pairs of bf16 (simd.h vdp): the reduction dimension is
 * walked two elements at a time, so every operand is laid out with consecutive reduction indices
 * side by side in one 32-bit lane:
 *   pairs over d:     K, V rows as stored (bf16 [row][Dp]); Q^T, dO^T packed [Dp/2][QT]
 *   pairs over keys:  V, K packed [nk/2][Dp]; P^T, dS^T packed [nk/2][QT]
 *   pairs over queries: Q, dO packed [QT/2][Dp]; P^T, dS^T as bf16 rows [nk][QT]
 * Q and dO stay unscaled (bf16 inputs are exact; the softmax scale is applied to the fp32
 * results), P and dS are rounded to bf16 for their products, as FlashAttention does on GPUs;
 * state, accumulators, row sums and lse stay fp32. */
#if defined(DA_BF16DP)
#define DA_HAVE_BF16DP 1

#define BF_VT vbi
#define BF_K 2
#define BF_LOAD(p) vbload(p)
#define BF_BCAST(p) vbcast(p)
#define BF_MAC(c, a, b) vdp(c, a, b)
/* gemm_a_bf: A bf16 rows (pairs over d as stored), B [n][QT] pairs; cs scales the fp32 result
 * (Q stays unscaled). gemm_b_bf: A and P pairs over keys. gemm_c_bf: A bf16 rows [TR][QT]
 * (pairs over queries as stored), X [QT/2][ldx] pairs. */
DEF_GEMM_A(gemm_a_bf, uint16_t, uint32_t, BF)
DEF_GEMM_B(gemm_b_bf, uint32_t, BF)
DEF_GEMM_C(gemm_c_bf, uint16_t, uint32_t, BF, TR)

/* bf16 rows as stored -> [nrows][Dp], zero past D and for rows n..nrows-1 (the padding of the
 * source rows may hold anything: a neighbouring head, or NaN). */
static void pack_rows_bf(uint16_t *restrict dst, int Dp, int nrows, const uint16_t *src, int64_t ld, int n, int D) {
  for (int i = 0; i < nrows; i++) {
    uint16_t *d = dst + (size_t)i * Dp;
    if (i < n) memcpy(d, src + (size_t)i * (size_t)ld, (size_t)D * 2);
    memset(d + (i < n ? D : 0), 0, (size_t)(Dp - (i < n ? D : 0)) * 2);
  }
}

/* Pairs of consecutive rows: dst[ip][d] = (src[2ip][d], src[2ip+1][d]) for ip < npairs, zero
 * for rows >= n and d >= D. V and K over keys, Q and dO over queries. */
static void pack_row_pairs(uint32_t *restrict dst, int Dp, int npairs, const uint16_t *src, int64_t ld, int n, int D) {
  for (int ip = 0; ip < npairs; ip++) {
    uint32_t *d = dst + (size_t)ip * Dp;
    const int r0 = 2 * ip, r1 = 2 * ip + 1;
    if (r0 >= n) {
      memset(d, 0, (size_t)Dp * 4);
      continue;
    }
    const uint16_t *a = src + (size_t)r0 * (size_t)ld, *b = src + (size_t)r1 * (size_t)ld;
    if (r1 < n)
      for (int x = 0; x < D; x++) d[x] = (uint32_t)a[x] | (uint32_t)b[x] << 16;
    else
      for (int x = 0; x < D; x++) d[x] = (uint32_t)a[x];
    memset(d + D, 0, (size_t)(Dp - D) * 4);
  }
}

/* Transposed pairs over d: dst[dp][i] = (q[i][2dp], q[i][2dp+1]) for i < n, zero elsewhere. */
static void pack_cols_bf(uint32_t *restrict dst, int Dp, const uint16_t *src, int64_t ld, int n, int D) {
  memset(dst, 0, (size_t)(Dp / 2) * QT * 4);
  for (int i = 0; i < n; i++) {
    const uint16_t *s = src + (size_t)i * (size_t)ld;
    for (int dp = 0; dp < D / 2; dp++) {
      uint32_t x;
      memcpy(&x, s + 2 * dp, 4);
      dst[dp * QT + i] = x;
    }
    if (D & 1) dst[(D / 2) * QT + i] = s[D - 1]; /* the odd last element, paired with zero */
  }
}

/* fp32 tile rows [nk][QT] -> pairs over keys [nk2][QT] in bf16; a missing odd row is zero. */
static void pack_tile_pairs(uint32_t *restrict dst, const float *S, int nk) {
  for (int jp = 0; jp < (nk + 1) / 2; jp++)
    for (int v = 0; v < NV; v++) {
      const vf a = vload(S + 2 * jp * QT + v * W), b = 2 * jp + 1 < nk ? vload(S + (2 * jp + 1) * QT + v * W) : vzero();
      vbstore(dst + jp * QT + v * W, vpack_bf2(a, b));
    }
}

/* fp32 tile rows [n][QT] -> bf16 rows [n][QT]. */
static void pack_tile_bf(uint16_t *restrict dst, const float *S, int n) {
  for (int j = 0; j < n; j++)
    for (int v = 0; v < NV; v++) vstore_bf(dst + j * QT + v * W, vload(S + j * QT + v * W));
}
#endif /* DA_BF16DP */

/* ---- AMX products (the amx level, bf16 storage) ----------------------------------------------
 * The pair layouts above are the layouts of AMX's B operand, so the bf16 path's packing carries
 * over; what changes is the A operand of O^T += V^T P^T and dQ^T += K^T dS^T, which the tiles
 * need as rows over keys (V^T and K^T [Dp][nk], pack_rows_t_bf) where the pair products
 * broadcast pairs of V and K. Every product is a whole number of 32 x 32 blocks of C with a
 * reduction in steps of 32 (keys padded with zero rows to KA, the head dim to Dp, QT = 32). */
#ifdef DA_AMX
_Static_assert(QT == 32 && KA == 32, "amx_gemm works in 32 x 32 blocks and reduction steps of 32");

/* C[M][N] (fp32, row stride ldc) = (acc ? C : 0) + A B, with A bf16 rows [M][K] (stride lda
 * elements) and B pairs over K [K/2][ldb]; M, N and K multiples of 32. Tiles 0-3 hold a 32 x 32
 * block of C, 4-5 two A tiles, 6-7 two B tiles: four tdpbf16ps per four tile loads. */
static void amx_gemm(int M, int N, int K, const uint16_t *A, int lda, const uint32_t *B, int ldb, float *C, int ldc,
                     int acc) {
  const size_t sa = (size_t)lda * 2, sb = (size_t)ldb * 4, sc = (size_t)ldc * 4;
  for (int m = 0; m < M; m += 32)
    for (int n = 0; n < N; n += 32) {
      float *c = C + (size_t)m * ldc + n;
      if (acc) {
        _tile_loadd(0, c, sc);
        _tile_loadd(1, c + 16, sc);
        _tile_loadd(2, c + (size_t)16 * ldc, sc);
        _tile_loadd(3, c + (size_t)16 * ldc + 16, sc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int k = 0; k < K; k += 32) {
        const uint16_t *a = A + (size_t)m * lda + k;
        const uint32_t *b = B + (size_t)(k / 2) * ldb + n;
        _tile_loadd(4, a, sa);
        _tile_loadd(5, a + (size_t)16 * lda, sa);
        _tile_loadd(6, b, sb);
        _tile_loadd(7, b + 16, sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, sc);
      _tile_stored(1, c + 16, sc);
      _tile_stored(2, c + (size_t)16 * ldc, sc);
      _tile_stored(3, c + (size_t)16 * ldc + 16, sc);
    }
}

/* bf16 rows as stored, transposed: dst[d][j] = src[j][d] for j < n, d < D; zero for j in
 * [n, nkp) and d in [D, Dp). Row stride of dst: nkp. Built as pairs of rows (j, j+1) per d (32
 * bits: dst's two neighbours), then 16 x 16 transposes of those pairs. */
static void pack_rows_t_bf(uint16_t *restrict dst, int Dp, int nkp, const uint16_t *src, int64_t ld, int n, int D) {
  uint32_t *o = (uint32_t *)dst;
  const int ldo = nkp / 2;
  for (int jp = 0; jp < nkp / 2; jp += 16)
    for (int d0 = 0; d0 < Dp; d0 += 16) {
      const __mmask16 m = d0 >= D ? 0 : D - d0 >= 16 ? 0xffff : (__mmask16)((1u << (D - d0)) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; i++) {
        const int j = 2 * (jp + i);
        const uint16_t *ra = src + (size_t)j * (size_t)ld + d0, *rb = ra + ld;
        const __m256i a = j < n ? _mm256_maskz_loadu_epi16(m, ra) : _mm256_setzero_si256();
        const __m256i b = j + 1 < n ? _mm256_maskz_loadu_epi16(m, rb) : _mm256_setzero_si256();
        r[i] = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      }
      transpose16(r);
      for (int k = 0; k < 16; k++) _mm512_storeu_si512(o + (size_t)(d0 + k) * ldo + jp, r[k]);
    }
}

/* Zero the pair rows of keys [nk, nkp) of a [nkp/2][QT] pairs tile whose first nk keys are
 * written (the padding of the reduction over keys). */
static void zero_pairs_past(uint32_t *restrict dst, int nk, int nkp) {
  const int done = (nk + 1) / 2;
  memset(dst + (size_t)done * QT, 0, (size_t)(nkp / 2 - done) * QT * 4);
}

/* O^T [Dp][QT] *= alpha, per lane. */
static void scale_lanes(float *restrict Ot, int Dp, const vf *alpha) {
  for (int d = 0; d < Dp; d++)
    for (int v = 0; v < NV; v++) vstore(Ot + d * QT + v * W, vmul(vload(Ot + d * QT + v * W), alpha[v]));
}
#define AMXDP(dt) ((dt) == 1)
#else
#define AMXDP(dt) 0
#endif /* DA_AMX */

/* ---- forward -------------------------------------------------------------------------------- */

/* Online softmax over one tile of nk keys: S [nk][QT] times cs > 0 (log2 units) becomes
 * P = exp2(cs S - m), with m the lane's reference in M; L (per lane) is updated. P goes in place
 * of S, or where Pp is not NULL (levels with pair products only) into Pp as bf16 pairs over keys
 * [nk/2][QT] (a missing odd key zero), the layout of the PV product, S then keeping the masked
 * scores. The reference moves only when the tile's max passes it by more than RESCALE_TAU
 * (FlashAttention-4's lazy rescale): P then stays below 2^RESCALE_TAU, and most tiles leave the
 * output unscaled. Exact either way: O and L are sums relative to the same reference m, and
 * fwd_finish takes lse = m + log2 L. Returns 1 when some lane's reference moved: alpha =
 * exp2(m_old - m_new) then rescales the output; 0 when none did (alpha = 1, not written). The
 * scale is folded into the exponent's FMA, and the max is taken over the unscaled scores (cs > 0
 * keeps the order). */
#define RESCALE_TAU 8.0f
static int softmax_tile(float *restrict S, int nk, float cs, const float *lo, const float *hi, float *restrict M,
                        float *restrict L, vf *alpha, uint32_t *restrict Pp) {
  vf mt[NV], nuse[NV], ls[NV];
  const vf vcs = vset1(cs);
  for (int v = 0; v < NV; v++) mt[v] = vset1(-INFINITY);
  if (lo) {
    vf vlo[NV], vhi[NV];
    for (int v = 0; v < NV; v++) vlo[v] = vload(lo + v * W), vhi[v] = vload(hi + v * W);
    for (int j = 0; j < nk; j++) {
      vf jf = vset1((float)j);
      for (int v = 0; v < NV; v++) {
        vf s = vkeep_range(vload(S + j * QT + v * W), jf, vlo[v], vhi[v]);
        vstore(S + j * QT + v * W, s);
        mt[v] = vmax(mt[v], s);
      }
    }
  } else {
    for (int j = 0; j < nk; j++)
      for (int v = 0; v < NV; v++) mt[v] = vmax(mt[v], vload(S + j * QT + v * W));
  }
  /* per lane, in scalars (QT of them per tile, against QT * nk * D multiply-adds): the new
   * reference, max(tile max, old) where the lane had none yet or the tile passes it by more than
   * RESCALE_TAU (a NaN tile max never moves it: its P are NaN whatever the reference) */
  float tmax[QT], mold[QT];
  int moved = 0;
  for (int v = 0; v < NV; v++) vstore(tmax + v * W, vmul(mt[v], vcs));
  memcpy(mold, M, sizeof mold);
  for (int i = 0; i < QT; i++)
    if (mold[i] == -INFINITY || tmax[i] > mold[i] + RESCALE_TAU) {
      const float mn = tmax[i] > mold[i] ? tmax[i] : mold[i];
      moved |= mn != mold[i];
      M[i] = mn;
    }
  for (int v = 0; v < NV; v++) {
    /* a row that has seen nothing yet uses 0: exp2(-inf) = 0 */
    const vf use = vreplace_eq(vload(M + v * W), -INFINITY, 0.0f);
    if (moved) alpha[v] = vexp2(vsub(vload(mold + v * W), use));
    nuse[v] = vsub(vzero(), use);
    ls[v] = vzero();
  }
#ifdef DA_HAVE_BF16DP
  if (Pp) {
    for (int j = 0; j < nk; j += 2)
      for (int v = 0; v < NV; v++) {
        const vf p0 = vexp2(vfma(vload(S + j * QT + v * W), vcs, nuse[v]));
        const vf p1 = j + 1 < nk ? vexp2(vfma(vload(S + (j + 1) * QT + v * W), vcs, nuse[v])) : vzero();
        vbstore(Pp + (j / 2) * QT + v * W, vpack_bf2(p0, p1));
        ls[v] = vadd(ls[v], vadd(p0, p1));
      }
  } else
#endif
  {
    for (int j = 0; j < nk; j++)
      for (int v = 0; v < NV; v++) {
        vf pj = vexp2(vfma(vload(S + j * QT + v * W), vcs, nuse[v]));
        vstore(S + j * QT + v * W, pj);
        ls[v] = vadd(ls[v], pj);
      }
  }
  for (int v = 0; v < NV; v++)
    vstore(L + v * W, moved ? vfma(vload(L + v * W), alpha[v], ls[v]) : vadd(vload(L + v * W), ls[v]));
  return moved;
}

typedef struct {
  float *Qt, *Ot, *M, *L; /* [nmt][Dp][QT], [nmt][Dp][QT], [nmt][QT], [nmt][QT] */
  float *Kc, *Vc;         /* [BK][Dp] */
  const float *K, *V;     /* the KV tile's fp32 rows the products read: Kc, Vc or the source */
  int64_t ldk, ldv;       /* their row strides */
  float *S;               /* [BK][QT] */
  uint32_t *Pp;           /* [BK/2][QT] P in bf16 pairs over keys (bf16 pair path only) */
  float lo[QT], hi[QT];
} fwd_scratch_t;

static size_t fwd_scratch_floats(int nmt, int Dp) {
  return (size_t)nmt * (2 * (size_t)Dp * QT + 2 * QT) + 2 * (size_t)BK_MAX * Dp + (size_t)BK_MAX * QT +
         (size_t)BK_MAX / 2 * QT;
}

static void fwd_scratch_carve(fwd_scratch_t *w, float *base, int nmt, int Dp) {
  w->Qt = base;
  w->Ot = w->Qt + (size_t)nmt * Dp * QT;
  w->M = w->Ot + (size_t)nmt * Dp * QT;
  w->L = w->M + (size_t)nmt * QT;
  w->Kc = w->L + (size_t)nmt * QT;
  w->Vc = w->Kc + (size_t)BK_MAX * Dp;
  w->S = w->Vc + (size_t)BK_MAX * Dp;
  w->Pp = (uint32_t *)(w->S + (size_t)BK_MAX * QT);
}

/* bf16 storage goes through the bf16 pair products on the levels that have them. */
#ifdef DA_HAVE_BF16DP
#define BFDP(dt) ((dt) == 1)
#else
#define BFDP(dt) 0
#endif

/* The operands of one forward call, read by all its tasks. */
typedef struct {
  const da_kparams_t *p;
  int Dp;   /* padded head dim */
  float c2; /* scale * log2 e: scores in log2 units */
  const void *q, *k, *v;
  int64_t ldq, ldk, ldv;
  da_span_t qpos, kpos;
  da_fwd_state_t *st;
} fwd_call_t;

/* The query micro-tiles of one task: KV head g, query rows [r0, r0 + ntl * QT) of the block.
 * Micro-tile t of query head g * rep + i is micro-tile i * ntl + t of the scratch. */
#define FWD_MAX_TILES 64 /* query micro-tiles per task and query head, at most */
typedef struct {
  int g, ntl;
  int64_t r0;
  int n[FWD_MAX_TILES];         /* valid lanes of each tile (0: past the end of the block) */
  da_span_t pos[FWD_MAX_TILES]; /* positions of each tile */
} fwd_tiles_t;

static void fwd_tiles_of(const fwd_call_t *c, int g, int64_t r0, int nrows, int ntl, fwd_tiles_t *t) {
  t->g = g, t->ntl = ntl, t->r0 = r0;
  for (int i = 0; i < ntl; i++) {
    t->n[i] = (int)lmin(QT, nrows - (int64_t)i * QT);
    if (t->n[i] < 0) t->n[i] = 0;
    t->pos[i] = da_span_sub(c->qpos, r0 + (int64_t)i * QT, t->n[i] > 0 ? t->n[i] : 1);
  }
}

/* Q^T of n query rows of head h from row `row`: times c2 in fp32; as pairs over d, unscaled,
 * on the bf16 pair path (the layout of gemm_a_bf). */
static void fwd_pack_q(const fwd_call_t *c, int h, int64_t row, int n, float *Qt) {
  const int D = c->p->D, dt = (int)c->p->dtype;
  const char *src = head_row(c->p, c->q, c->ldq, row, h);
#ifdef DA_HAVE_BF16DP
  if (BFDP(dt)) {
    pack_cols_bf((uint32_t *)Qt, c->Dp, (const uint16_t *)src, c->ldq, n, D);
    return;
  }
#endif
  pack_cols(Qt, c->Dp, src, c->ldq, dt, n, D, c->c2);
}

/* The running state of n rows of head h from row `row` into a micro-tile: O^T [Dp][QT], M, L
 * [QT]; lanes >= n hold an empty state. A row with m = -inf and l = 0 has folded no allowed key
 * yet (da_fwd_state_init's state, or one whose keys so far were all masked): its o is not read
 * and starts at zero. (o could differ from zero only by a NaN or inf of a masked key's V times
 * its zero weight, which the float64 reference never sees.) On AVX-512 the rows are transposed
 * 16 x 16 in registers. */
static void fwd_state_load(const fwd_call_t *c, int h, int64_t row, int n, float *Ot, float *M, float *L) {
  const int H = c->p->H, D = c->p->D;
  int fresh[QT], all = 1;
  for (int i = 0; i < QT; i++) {
    const int64_t sr = (row + i) * H + h;
    M[i] = i < n ? c->st->m[sr] : -INFINITY, L[i] = i < n ? c->st->l[sr] : 0.0f;
    fresh[i] = M[i] == -INFINITY && L[i] == 0.0f;
    all &= fresh[i];
  }
  memset(Ot, 0, (size_t)c->Dp * QT * sizeof(float));
  if (all) return;
#if defined(DA_SIMD_AVX512)
  _Static_assert(QT % 16 == 0, "16-lane blocks");
  for (int i0 = 0; i0 < QT; i0 += 16)
    for (int d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = D - d0 >= 16 ? 0xffff : (__mmask16)((1u << (D - d0)) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; i++)
        r[i] = fresh[i0 + i] ? _mm512_setzero_si512()
                             : _mm512_maskz_loadu_epi32(m, c->st->o + ((row + i0 + i) * H + h) * D + d0);
      transpose16(r);
      for (int k = 0; k < 16 && d0 + k < D; k++) _mm512_storeu_si512(Ot + (size_t)(d0 + k) * QT + i0, r[k]);
    }
#else
  for (int i = 0; i < n; i++) {
    if (fresh[i]) continue;
    const float *o = c->st->o + ((row + i) * H + h) * D;
    for (int d = 0; d < D; d++) Ot[d * QT + i] = o[d];
  }
#endif
}

/* The inverse: a micro-tile's n valid lanes back into the running state. */
static void fwd_state_store(const fwd_call_t *c, int h, int64_t row, int n, const float *Ot, const float *M,
                            const float *L) {
  const int H = c->p->H, D = c->p->D;
  for (int i = 0; i < n; i++) {
    const int64_t sr = (row + i) * H + h;
    c->st->m[sr] = M[i], c->st->l[sr] = L[i];
  }
#if defined(DA_SIMD_AVX512)
  for (int i0 = 0; i0 < n; i0 += 16)
    for (int d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = D - d0 >= 16 ? 0xffff : (__mmask16)((1u << (D - d0)) - 1);
      __m512i r[16];
      for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_si512(Ot + (size_t)(d0 + k) * QT + i0);
      transpose16(r);
      for (int i = 0; i < 16 && i0 + i < n; i++)
        _mm512_mask_storeu_epi32(c->st->o + ((row + i0 + i) * H + h) * D + d0, m, r[i]);
    }
#else
  for (int i = 0; i < n; i++) {
    float *o = c->st->o + ((row + i) * H + h) * D;
    for (int d = 0; d < D; d++) o[d] = Ot[d * QT + i];
  }
#endif
}

/* fp32 K and V rows read in place, or copied per KV tile: in place on AVX2 (Zen 3, where the copy
 * cost more than it saved: docs/decisions.md, "Lazy rescale"); copied on AVX-512, where the
 * contiguous copy measured faster than source rows H * D * 4 bytes apart (Sapphire Rapids class,
 * 4K x 4 heads, 2 threads, 3 interleaved runs: D 128 none 254 -> 272 GFLOP/s, causal +7%; D 64
 * none +5%, causal +1%). */
#if defined(DA_SIMD_AVX512)
#define FWD_KV_INPLACE 0
#else
#define FWD_KV_INPLACE 1
#endif

/* KV tile [j0, j0 + nk) of KV head g into the scratch: fp32 rows Kc, Vc (K padded to whole
 * register tiles); on the bf16 pair path K as bf16 rows and V as pairs over keys; on the AMX
 * level K as bf16 rows and V^T [Dp][nkp], both padded with zeros to nkp = whole KA keys. */
static void fwd_pack_kv(const fwd_call_t *c, int g, int64_t j0, int nk, fwd_scratch_t *w) {
  const int D = c->p->D, dt = (int)c->p->dtype, Dp = c->Dp, nkr = (nk + TR - 1) / TR * TR;
  const char *ksrc = head_row(c->p, c->k, c->ldk, j0, g), *vsrc = head_row(c->p, c->v, c->ldv, j0, g);
#ifdef DA_AMX
  if (AMXDP(dt)) {
    const int nkp = (nk + KA - 1) / KA * KA;
    pack_rows_bf((uint16_t *)w->Kc, Dp, nkp, (const uint16_t *)ksrc, c->ldk, nk, D);
    pack_rows_t_bf((uint16_t *)w->Vc, Dp, nkp, (const uint16_t *)vsrc, c->ldv, nk, D);
    return;
  }
#endif
#ifdef DA_HAVE_BF16DP
  if (BFDP(dt)) {
    pack_rows_bf((uint16_t *)w->Kc, Dp, nkr, (const uint16_t *)ksrc, c->ldk, nk, D);
    pack_row_pairs((uint32_t *)w->Vc, Dp, (nk + 1) / 2, (const uint16_t *)vsrc, c->ldv, nk, D);
    return;
  }
#endif
  /* fp32 rows are read in place where the products stay inside them (gemm_b reads V columns
   * [dr, dr + TR) for dr < D, gemm_a reads K rows [jr, jr + TR) for jr < nk), on the levels where
   * that measured faster (FWD_KV_INPLACE) */
  const int inplace = FWD_KV_INPLACE && dt == 0 && D % TR == 0;
  w->K = w->Kc, w->V = w->Vc, w->ldk = w->ldv = Dp;
  if (inplace && nk % TR == 0)
    w->K = (const float *)ksrc, w->ldk = c->ldk;
  else
    pack_rows(w->Kc, Dp, nkr, ksrc, c->ldk, dt, nk, D, 1.0f);
  if (inplace)
    w->V = (const float *)vsrc, w->ldv = c->ldv;
  else
    pack_rows(w->Vc, Dp, nk, vsrc, c->ldv, dt, nk, D, 1.0f);
}

/* One micro-tile mt against the packed KV tile of nk keys, fp32 products: S^T = K Q^T, the
 * online softmax (lo, hi: per-lane key ranges of a partial tile, NULL when all are visible),
 * O^T = O^T * alpha + V^T P^T. */
static void fwd_micro_f32(const fwd_call_t *c, int nk, int mt, const float *lo, const float *hi, fwd_scratch_t *w) {
  const int D = c->p->D, Dp = c->Dp;
  const float *Qt = w->Qt + (size_t)mt * Dp * QT;
  float *Ot = w->Ot + (size_t)mt * Dp * QT;
  vf alpha[NV];
  for (int jr = 0; jr < nk; jr += TR) gemm_a(D, w->K + (size_t)jr * w->ldk, (int)w->ldk, Qt, w->S + jr * QT, 1.0f);
  const vf *al = softmax_tile(w->S, nk, 1.0f, lo, hi, w->M + mt * QT, w->L + mt * QT, alpha, NULL) ? alpha : NULL;
  for (int dr = 0; dr < D; dr += TR) gemm_b(nk, w->V + dr, (int)w->ldv, w->S, Ot + (size_t)dr * QT, al);
}

#ifdef DA_HAVE_BF16DP
/* The same over bf16 pairs: the scale applied to the fp32 scores, P rounded to bf16 pairs over
 * keys (by the softmax) for its product with V. */
static void fwd_micro_bf(const fwd_call_t *c, int nk, int mt, const float *lo, const float *hi, fwd_scratch_t *w) {
  const int D = c->p->D, Dp = c->Dp;
  const uint32_t *Qt = (const uint32_t *)(w->Qt + (size_t)mt * Dp * QT);
  float *Ot = w->Ot + (size_t)mt * Dp * QT;
  const uint16_t *Kb = (const uint16_t *)w->Kc;
  vf alpha[NV];
  for (int jr = 0; jr < nk; jr += TR) gemm_a_bf((D + 1) / 2, Kb + (size_t)jr * Dp, Dp, Qt, w->S + jr * QT, c->c2);
  const vf *al = softmax_tile(w->S, nk, 1.0f, lo, hi, w->M + mt * QT, w->L + mt * QT, alpha, w->Pp) ? alpha : NULL;
  for (int dr = 0; dr < D; dr += TR)
    gemm_b_bf((nk + 1) / 2, (const uint32_t *)w->Vc + dr, Dp, w->Pp, Ot + (size_t)dr * QT, al);
}
#endif

#ifdef DA_AMX
/* Micro-tile mt (tile i of the task) against the packed KV tile [j0, j0 + nk) on AMX tiles. The
 * scores go in sub-tiles of SUBK keys (S stays in L1), each classified against the mask on its
 * own (empty ones skipped, full ones unmasked): S^T = K Q^T, then the softmax with the scale,
 * which writes P as bf16 pairs over keys into Pp at the sub-tile's place. The PV product
 * O^T += V^T P^T runs once over the whole tile (fewer round trips of O^T through the tiles:
 * 4K x 4 heads x D 128, 1 thread: KV tiles of 256 keys ran about 10% faster than of 64), and
 * early when a sub-tile moves a lane's reference: the sub-tiles before it are folded with the
 * old reference, then O^T is rescaled. */
#define SUBK 64
static void fwd_micro_amx(const fwd_call_t *c, const fwd_tiles_t *t, int i, int64_t j0, int nk, int mt,
                          fwd_scratch_t *w) {
  const da_mask_t *mask = &c->p->mask;
  const int Dp = c->Dp, nkp = (nk + KA - 1) / KA * KA;
  const uint32_t *Qt = (const uint32_t *)(w->Qt + (size_t)mt * Dp * QT);
  const uint16_t *Kb = (const uint16_t *)w->Kc, *Vt = (const uint16_t *)w->Vc;
  float *Ot = w->Ot + (size_t)mt * Dp * QT;
  vf alpha[NV];
  int done = 0, end = 0; /* keys [0, done) folded into O^T; [done, end) waiting in Pp */
  for (int s0 = 0; s0 < nk; s0 += SUBK) {
    const int ns = imin(SUBK, nk - s0), nsp = (ns + KA - 1) / KA * KA;
    uint32_t *pp = w->Pp + (size_t)(s0 / 2) * QT;
    const da_span_t ss = da_span_sub(c->kpos, j0 + s0, ns);
    const int cl = (int)da_mask_classify(mask, t->pos[i].start, da_span_last(t->pos[i]), ss.start, da_span_last(ss));
    if (cl == DA_TILE_EMPTY) {
      memset(pp, 0, (size_t)(nsp / 2) * QT * 4);
      continue;
    }
    if (cl == DA_TILE_PARTIAL) lane_ranges(mask, t->pos[i], t->n[i], ss, w->lo, w->hi);
    const float *lo = cl == DA_TILE_PARTIAL ? w->lo : NULL, *hi = cl == DA_TILE_PARTIAL ? w->hi : NULL;
    amx_gemm(nsp, QT, Dp, Kb + (size_t)s0 * Dp, Dp, Qt, QT, w->S, QT, 0);
    if (softmax_tile(w->S, ns, c->c2, lo, hi, w->M + mt * QT, w->L + mt * QT, alpha, pp)) {
      if (end > done) amx_gemm(Dp, QT, end - done, Vt + done, nkp, w->Pp + (size_t)(done / 2) * QT, QT, Ot, QT, 1);
      scale_lanes(Ot, Dp, alpha);
      done = s0;
    }
    zero_pairs_past(pp, ns, nsp);
    end = s0 + nsp;
  }
  if (end > done) amx_gemm(Dp, QT, end - done, Vt + done, nkp, w->Pp + (size_t)(done / 2) * QT, QT, Ot, QT, 1);
}
#endif

/* Prefetch the K and V rows [a, b) of KV head g into the cache. The next KV tile is fetched a
 * slice per micro-tile while this one computes, so that its first use does not wait on memory
 * (Zen 3, 4K x 4 heads x D 128, 2 threads: 152 -> 160 GFLOP/s); in one burst it measured no
 * better than none. */
static void fwd_prefetch_kv(const fwd_call_t *c, int g, int64_t a, int64_t b) {
  const size_t rb = (size_t)c->p->D * da_dtype_size(c->p->dtype);
  for (int64_t j = a; j < b; j++) {
    const char *kr = head_row(c->p, c->k, c->ldk, j, g), *vr = head_row(c->p, c->v, c->ldv, j, g);
    for (size_t x = 0; x < rb; x += 64) __builtin_prefetch(kr + x), __builtin_prefetch(vr + x);
  }
}

/* Fold KV tile [j0, j0 + nk) into every micro-tile of the task that the mask lets see it. */
static void fwd_kv_tile(const fwd_call_t *c, const fwd_tiles_t *t, int64_t j0, int nk, fwd_scratch_t *w) {
  const da_mask_t *mask = &c->p->mask;
  const int rep = c->p->H / c->p->G;
  const da_span_t ks = da_span_sub(c->kpos, j0, nk);
  int cls[FWD_MAX_TILES], any = 0;
  for (int i = 0; i < t->ntl; i++) {
    cls[i] = t->n[i] ? (int)da_mask_classify(mask, t->pos[i].start, da_span_last(t->pos[i]), ks.start, da_span_last(ks))
                     : DA_TILE_EMPTY;
    any |= cls[i] != DA_TILE_EMPTY;
  }
  if (!any) return;
  fwd_pack_kv(c, t->g, j0, nk, w);
  const int64_t nn = lmin(nk, c->kpos.count - (j0 + nk)); /* rows of the next KV tile */
  for (int i = 0; i < t->ntl; i++) {
    fwd_prefetch_kv(c, t->g, j0 + nk + nn * i / t->ntl, j0 + nk + nn * (i + 1) / t->ntl);
    if (cls[i] == DA_TILE_EMPTY) continue;
#ifdef DA_AMX
    if (AMXDP((int)c->p->dtype)) {
      for (int hq = 0; hq < rep; hq++) fwd_micro_amx(c, t, i, j0, nk, hq * t->ntl + i, w);
      continue;
    }
#endif
    const int partial = cls[i] == DA_TILE_PARTIAL; /* lanes past n[i] are ignored */
    if (partial) lane_ranges(mask, t->pos[i], t->n[i], ks, w->lo, w->hi);
    const float *lo = partial ? w->lo : NULL, *hi = partial ? w->hi : NULL;
    for (int hq = 0; hq < rep; hq++) {
#ifdef DA_HAVE_BF16DP
      if (BFDP((int)c->p->dtype)) {
        fwd_micro_bf(c, nk, hq * t->ntl + i, lo, hi, w);
        continue;
      }
#endif
      fwd_micro_f32(c, nk, hq * t->ntl + i, lo, hi, w);
    }
  }
}

/* One task: KV head g, query rows [r0, r0 + nrows) of the block, every query head of the group,
 * against all keys of the call. The state is read at the start and written at the end. */
static void fwd_task(const fwd_call_t *c, int g, int64_t r0, int nrows, int ntl, fwd_scratch_t *w) {
  const int rep = c->p->H / c->p->G, Dp = c->Dp;
  fwd_tiles_t t;
  fwd_tiles_of(c, g, r0, nrows, ntl, &t);
  for (int hq = 0; hq < rep; hq++)
    for (int i = 0; i < ntl; i++) {
      const int mt = hq * ntl + i;
      if (t.n[i] == 0) continue;
      fwd_pack_q(c, g * rep + hq, r0 + (int64_t)i * QT, t.n[i], w->Qt + (size_t)mt * Dp * QT);
      fwd_state_load(c, g * rep + hq, r0 + (int64_t)i * QT, t.n[i], w->Ot + (size_t)mt * Dp * QT, w->M + mt * QT,
                     w->L + mt * QT);
    }
  const int bk = kv_tile(c->p, 0);
#ifdef DA_AMX
  if (AMXDP((int)c->p->dtype)) amx_on();
#endif
  for (int64_t j0 = 0; j0 < c->kpos.count; j0 += bk) fwd_kv_tile(c, &t, j0, (int)lmin(bk, c->kpos.count - j0), w);
#ifdef DA_AMX
  if (AMXDP((int)c->p->dtype)) amx_off();
#endif
  for (int hq = 0; hq < rep; hq++)
    for (int i = 0; i < ntl; i++) {
      const int mt = hq * ntl + i;
      fwd_state_store(c, g * rep + hq, r0 + (int64_t)i * QT, t.n[i], w->Ot + (size_t)mt * Dp * QT, w->M + mt * QT,
                      w->L + mt * QT);
    }
}

static int nthreads_of(const da_kparams_t *p) {
  int n = p->nthreads > 0 ? p->nthreads : da_default_nthreads();
  return n > 0 ? n : 1;
}

/* Query micro-tiles per task, over the query heads of the group: FWD_MT, so that each KV tile
 * read from memory (L3 or DRAM once the K and V of all heads pass a few MB) feeds that many
 * micro-tiles from L2; few enough that every thread gets several tasks. block_q (query rows per
 * task) overrides. Zen 3, 4K x 4 heads x D 128, 1 thread: 4 micro-tiles per task reached 70
 * GFLOP/s, 32 reached 78 (bench/results/fwd32-zen3.md). */
#define FWD_MT 32
static int fwd_tiles_per_task(const da_kparams_t *p, int64_t nq, int nthr) {
  const int rep = p->H / p->G;
  if (p->block_q > 0) return imin(FWD_MAX_TILES, imax(1, (p->block_q + QT - 1) / QT));
  int ntl = imin(FWD_MAX_TILES, imax(1, FWD_MT / rep));
  while (ntl > 1 && (int64_t)p->G * ((nq + (int64_t)ntl * QT - 1) / ((int64_t)ntl * QT)) < 4 * nthr) ntl /= 2;
  return ntl;
}

static da_status_t fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos, const void *k,
                             int64_t ldk, const void *v, int64_t ldv, da_span_t kpos, da_fwd_state_t *st,
                             void *stream) {
  (void)stream;
  if (qpos.count <= 0 || kpos.count <= 0) return DA_SUCCESS;
  if (da_mask_classify(&p->mask, qpos.start, da_span_last(qpos), kpos.start, da_span_last(kpos)) == DA_TILE_EMPTY)
    return DA_SUCCESS;
  const fwd_call_t c = {.p = p, .Dp = pad_dim(p->D), .c2 = p->scale * LOG2E, .q = q, .k = k, .v = v,
                        .ldq = ldq, .ldk = ldk, .ldv = ldv, .qpos = qpos, .kpos = kpos, .st = st};
  const int G = p->G, nthr = nthreads_of(p);
  const int ntl = fwd_tiles_per_task(p, qpos.count, nthr);
  const int64_t qb = (int64_t)ntl * QT, nqb = (qpos.count + qb - 1) / qb, ntasks = (int64_t)G * nqb;
  const int nmt = p->H / G * ntl;
  const int nt = (int)lmin(nthr, ntasks);
  const size_t per = fwd_scratch_floats(nmt, c.Dp) + 64;
  float *scratch = da_malloc(per * (size_t)nt * sizeof(float), 64);
  if (!scratch) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "cpu forward: %zu bytes of scratch", per * nt * sizeof(float));
#pragma omp parallel num_threads(nt)
  {
    fwd_scratch_t w;
    fwd_scratch_carve(&w, scratch + per * (size_t)omp_get_thread_num(), nmt, c.Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; t++) {
      /* Later query blocks first: under a causal mask they hold the most work. */
      const int64_t b = nqb - 1 - t / G, r0 = b * qb;
      fwd_task(&c, (int)(t % G), r0, (int)lmin(qb, qpos.count - r0), ntl, &w);
    }
  }
  da_free(scratch);
  return DA_SUCCESS;
}

/* out = o / l (dtype odt), lse = (m + log2 l) ln 2; rows that saw nothing: out = 0, lse = -inf. */
static da_status_t fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out, da_dtype_t odt,
                              int64_t ldo, float *lse, void *stream) {
  (void)stream;
  const int H = p->H, D = p->D, dt = (int)odt;
  const size_t es = da_dtype_size(odt);
  const int64_t n = st->nq * H;
#pragma omp parallel for schedule(static) num_threads(nthreads_of(p)) if (n * D > (1 << 16))
  for (int64_t r = 0; r < n; r++) {
    const int64_t i = r / H, h = r % H;
    /* l == 0 exactly when the row saw no allowed key; a NaN l (NaN input) stays NaN */
    const float l = st->l[r];
    const int empty = l == 0.0f;
    const float inv = 1.0f / l;
    const float *o = st->o + r * D;
    char *dst = (char *)out + (size_t)(i * ldo + h * D) * es;
    const vf vi = vset1(inv);
    for (int x = 0; x < D; x += W) {
      int c = imin(W, D - x);
      vf y = empty ? vzero() : vmul(vload_dt(o + x, 0, c), vi);
      vstore_dt(dst + (size_t)x * es, dt, y, c);
    }
    if (lse) lse[r] = empty ? -INFINITY : (st->m[r] + log2f(l)) * LN2;
  }
  return DA_SUCCESS;
}

/* a <- merge(a, b) of normalized partials (natural-log lse). */
static da_status_t merge(const da_kparams_t *p, int64_t n, float *oa, float *la, const float *ob, const float *lb,
                         void *stream) {
  (void)stream;
  const int D = p->D;
  const int64_t rows = n * p->H;
#pragma omp parallel for schedule(static) num_threads(nthreads_of(p)) if (rows * D > (1 << 16))
  for (int64_t r = 0; r < rows; r++) {
    const float a = la[r], b = lb[r];
    float *x = oa + r * D;
    const float *y = ob + r * D;
    if (b == -INFINITY) continue;
    if (a == -INFINITY) {
      memcpy(x, y, (size_t)D * sizeof(float));
      la[r] = b;
      continue;
    }
    const float mx = a > b ? a : b, wa = expf(a - mx), wb = expf(b - mx), s = wa + wb;
    const vf va = vset1(wa / s), vb = vset1(wb / s);
    int d = 0;
    for (; d + W <= D; d += W) vstore(x + d, vfma(va, vload(x + d), vmul(vb, vload(y + d))));
    for (; d < D; d++) x[d] = (wa / s) * x[d] + (wb / s) * y[d];
    la[r] = mx + logf(s);
  }
  return DA_SUCCESS;
}

/* ---- backward ------------------------------------------------------------------------------- */

static da_status_t bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo, const void *dout,
                            int64_t lddo, float *delta, void *stream) {
  (void)stream;
  const int H = p->H, D = p->D, dt = (int)p->dtype;
  const size_t es = da_dtype_size(p->dtype);
  const int64_t n = nq * H;
#pragma omp parallel for schedule(static) num_threads(nthreads_of(p)) if (n * D > (1 << 16))
  for (int64_t r = 0; r < n; r++) {
    const int64_t i = r / H, h = r % H;
    const char *o = (const char *)out + (size_t)(i * ldo + h * D) * es;
    const char *g = (const char *)dout + (size_t)(i * lddo + h * D) * es;
    vf acc = vzero();
    for (int x = 0; x < D; x += W) {
      int c = imin(W, D - x);
      acc = vfma(vload_dt(o + (size_t)x * es, dt, c), vload_dt(g + (size_t)x * es, dt, c), acc);
    }
    delta[r] = vhsum(acc);
  }
  return DA_SUCCESS;
}

/* Per-chunk packed query side of the backward, shared read-only by every task of a chunk. For
 * query head h and tile t (index ht = h * ntc + t):
 *   Qt  [Dp][QT] q * scale * log2 e, transposed (for S^T = K Q^T in log2 units)
 *   dOt [Dp][QT] dout, transposed (for dP^T = V dO^T)
 *   Qr  [QT][Dp] q * scale, rows (for dK += dS^T Q)
 *   dOr [QT][Dp] dout, rows (for dV += P^T dO)
 *   LS  [QT] lse * log2 e, +inf for rows without keys and padding lanes (so P = 0 there)
 *   DL  [QT] delta
 * On the bf16 pair path Q and dO stay unscaled, Qt and dOt are pairs over d, Qr and dOr pairs
 * over queries [QT/2][Dp]. */
typedef struct {
  float *Qt, *dOt, *Qr, *dOr, *LS, *DL;
} bwd_q_t;

typedef struct {
  float *dQt;      /* [H * ntc][Dp][QT] this thread's dQ^T partial for the chunk */
  float *Kc, *Vc;  /* [BK][Dp] */
  float *dKt, *dVt; /* [BK][Dp] */
  float *S, *dP;   /* [BK][QT] */
  /* bf16 pair path only: K as pairs over keys [BK/2][Dp], P and dS as bf16 rows [BK][QT], dS as
   * pairs over keys [BK/2][QT] */
  uint32_t *Kp, *dSp;
  uint16_t *Sb, *dSb;
  float lo[QT], hi[QT];
} bwd_scratch_t;

/* The operands of one backward call and the layout of its buffers, read by all its threads. */
typedef struct {
  const da_kparams_t *p;
  int Dp, bk, ntc; /* padded head dim, KV tile, query micro-tiles per chunk */
  float c2;        /* scale * log2 e */
  const void *q, *dout, *k, *v;
  int64_t ldq, lddo, ldk, ldv;
  const float *lse, *delta;
  da_span_t qpos, kpos;
  float *dq, *dk, *dv;
  size_t qtile, nht; /* floats of one packed query tile (Dp * QT); tiles of a chunk (H * ntc) */
  size_t per;        /* floats of one thread's scratch */
  int nt;            /* threads */
  float *scratch;    /* [nt][per], each starting with that thread's dQ^T partial */
  bwd_q_t Q;
} bwd_call_t;

/* The query rows of one chunk: [c0, c0 + rows) of the block, in nct micro-tiles. */
typedef struct {
  int64_t c0, rows;
  int nct;
  da_span_t span;
} bwd_chunk_t;

static void bwd_q_carve(bwd_q_t *Q, float *base, size_t nht, size_t qtile) {
  Q->Qt = base;
  Q->dOt = Q->Qt + nht * qtile;
  Q->Qr = Q->dOt + nht * qtile;
  Q->dOr = Q->Qr + nht * qtile;
  Q->LS = Q->dOr + nht * qtile;
  Q->DL = Q->LS + nht * QT;
}

static size_t bwd_scratch_floats(size_t nht, size_t qtile, int bk, int Dp) {
  return nht * qtile + 5 * (size_t)bk * Dp + 4 * (size_t)bk * QT + 64;
}

static void bwd_scratch_carve(bwd_scratch_t *w, float *base, const bwd_call_t *c) {
  const size_t bk = (size_t)c->bk, Dp = (size_t)c->Dp;
  w->dQt = base;
  w->Kc = w->dQt + c->nht * c->qtile;
  w->Vc = w->Kc + bk * Dp;
  w->dKt = w->Vc + bk * Dp;
  w->dVt = w->dKt + bk * Dp;
  w->S = w->dVt + bk * Dp;
  w->dP = w->S + bk * QT;
  w->Kp = (uint32_t *)(w->dP + bk * QT);
  w->dSp = w->Kp + bk * Dp;
  w->Sb = (uint16_t *)(w->dSp + bk * QT);
  w->dSb = w->Sb + bk * QT;
}

/* Pack the query side of tile ht = h * nct + t of the chunk (bwd_q_t). */
static void bwd_pack_q(const bwd_call_t *c, const bwd_chunk_t *ch, int64_t ht) {
  const int H = c->p->H, D = c->p->D, dt = (int)c->p->dtype, Dp = c->Dp;
  const int h = (int)(ht / ch->nct), t = (int)(ht % ch->nct);
  const size_t x = (size_t)h * c->ntc + t;
  const int64_t row = ch->c0 + (int64_t)t * QT;
  const int n = (int)lmin(QT, ch->rows - (int64_t)t * QT);
  const char *qs = head_row(c->p, c->q, c->ldq, row, h), *gs = head_row(c->p, c->dout, c->lddo, row, h);
  const bwd_q_t *Q = &c->Q;
#ifdef DA_HAVE_BF16DP
  if (BFDP(dt)) {
    pack_cols_bf((uint32_t *)(Q->Qt + x * c->qtile), Dp, (const uint16_t *)qs, c->ldq, n, D);
    pack_cols_bf((uint32_t *)(Q->dOt + x * c->qtile), Dp, (const uint16_t *)gs, c->lddo, n, D);
    pack_row_pairs((uint32_t *)(Q->Qr + x * c->qtile), Dp, QT / 2, (const uint16_t *)qs, c->ldq, n, D);
    pack_row_pairs((uint32_t *)(Q->dOr + x * c->qtile), Dp, QT / 2, (const uint16_t *)gs, c->lddo, n, D);
  } else
#endif
  {
    pack_cols(Q->Qt + x * c->qtile, Dp, qs, c->ldq, dt, n, D, c->c2);
    pack_cols(Q->dOt + x * c->qtile, Dp, gs, c->lddo, dt, n, D, 1.0f);
    pack_rows(Q->Qr + x * c->qtile, Dp, QT, qs, c->ldq, dt, n, D, c->p->scale);
    pack_rows(Q->dOr + x * c->qtile, Dp, QT, gs, c->lddo, dt, n, D, 1.0f);
  }
  for (int i = 0; i < QT; i++) {
    const float L = i < n ? c->lse[(row + i) * H + h] : -INFINITY;
    Q->LS[x * QT + i] = L == -INFINITY ? INFINITY : L * LOG2E;
    Q->DL[x * QT + i] = i < n ? c->delta[(row + i) * H + h] : 0.0f;
  }
}

/* KV tile [j0, j0 + nk) of KV head g: K and V rows (padded to whole register tiles); on the bf16
 * pair path bf16 rows, plus K as pairs over keys for dQ; on the AMX level bf16 rows and K^T
 * [Dp][nkp] (in Kp) for dQ, padded with zeros to nkp = whole KA keys. */
static void bwd_pack_kv(const bwd_call_t *c, int g, int64_t j0, int nk, bwd_scratch_t *w) {
  const int D = c->p->D, dt = (int)c->p->dtype, Dp = c->Dp, nkr = (nk + TR - 1) / TR * TR;
  const char *ksrc = head_row(c->p, c->k, c->ldk, j0, g), *vsrc = head_row(c->p, c->v, c->ldv, j0, g);
#ifdef DA_AMX
  if (AMXDP(dt)) {
    const int nkp = (nk + KA - 1) / KA * KA;
    pack_rows_bf((uint16_t *)w->Kc, Dp, nkp, (const uint16_t *)ksrc, c->ldk, nk, D);
    pack_rows_bf((uint16_t *)w->Vc, Dp, nkp, (const uint16_t *)vsrc, c->ldv, nk, D);
    pack_rows_t_bf((uint16_t *)w->Kp, Dp, nkp, (const uint16_t *)ksrc, c->ldk, nk, D);
    return;
  }
#endif
#ifdef DA_HAVE_BF16DP
  if (BFDP(dt)) {
    pack_rows_bf((uint16_t *)w->Kc, Dp, nkr, (const uint16_t *)ksrc, c->ldk, nk, D);
    pack_rows_bf((uint16_t *)w->Vc, Dp, nkr, (const uint16_t *)vsrc, c->ldv, nk, D);
    pack_row_pairs(w->Kp, Dp, (nk + 1) / 2, (const uint16_t *)ksrc, c->ldk, nk, D);
    return;
  }
#endif
  pack_rows(w->Kc, Dp, nkr, ksrc, c->ldk, dt, nk, D, 1.0f);
  pack_rows(w->Vc, Dp, nkr, vsrc, c->ldv, dt, nk, D, 1.0f);
}

/* P = exp2(cs S - lse2) (0 where masked), dS = P (dP - delta), in place of S and dP over the
 * tile's nkr rows (rows nk..nkr-1 zero). LS, DL [QT] of the micro-tile; lo, hi: lane ranges
 * (partial). The scale is folded into the exponent's FMA (cs = 1 where the products scaled). */
static void bwd_softmax_grad(float *restrict S, float *restrict dP, int nk, int nkr, float cs, const float *LS,
                             const float *DL, const float *lo, const float *hi, int partial) {
  const vf vcs = vset1(cs);
  vf nl[NV], vd[NV], vlo[NV], vhi[NV];
  for (int u = 0; u < NV; u++) {
    nl[u] = vsub(vzero(), vload(LS + u * W)), vd[u] = vload(DL + u * W);
    vlo[u] = vload(lo + u * W), vhi[u] = vload(hi + u * W); /* used when partial */
  }
  for (int j = 0; j < nkr; j++) {
    const vf jf = vset1((float)j);
    for (int u = 0; u < NV; u++) {
      vf s = vload(S + j * QT + u * W);
      if (partial) s = vkeep_range(s, jf, vlo[u], vhi[u]);
      vf pj = j < nk ? vexp2(vfma(s, vcs, nl[u])) : vzero();
      vf ds = vmul(pj, vsub(vload(dP + j * QT + u * W), vd[u]));
      vstore(S + j * QT + u * W, pj);
      vstore(dP + j * QT + u * W, j < nk ? ds : vzero());
    }
  }
}

/* dV += P^T dO and dK += dS^T Q over the nkr (a multiple of TR) key rows of the tile: blocks of
 * TRC rows, in pairs, where the level has a wider gemm_c (AVX2: 6 x 2, 12 accumulators), then
 * blocks of TR rows. */
static void bwd_dkv_f32(const bwd_call_t *c, size_t x, int nkr, bwd_scratch_t *w) {
  const int Dp = c->Dp;
  const float *dOr = c->Q.dOr + x * c->qtile, *Qr = c->Q.Qr + x * c->qtile;
  int jr = 0;
#if TRC != TR
  _Static_assert(2 * TRC % TR == 0, "pairs of TRC-row blocks keep the rest a multiple of TR");
  for (; jr + 2 * TRC <= nkr; jr += 2 * TRC)
    for (int h = jr; h < jr + 2 * TRC; h += TRC)
      for (int d0 = 0; d0 < Dp; d0 += NU * W) {
        gemm_c_wide(w->S + h * QT, dOr + d0, Dp, w->dVt + (size_t)h * Dp + d0, Dp);
        gemm_c_wide(w->dP + h * QT, Qr + d0, Dp, w->dKt + (size_t)h * Dp + d0, Dp);
      }
#endif
  for (; jr < nkr; jr += TR)
    for (int d0 = 0; d0 < Dp; d0 += NU * W) {
      gemm_c(w->S + jr * QT, dOr + d0, Dp, w->dVt + (size_t)jr * Dp + d0, Dp);
      gemm_c(w->dP + jr * QT, Qr + d0, Dp, w->dKt + (size_t)jr * Dp + d0, Dp);
    }
}

/* Micro-tile x of the chunk against the packed KV tile of nk keys, fp32 products: S^T = K Q^T and
 * dP^T = V dO^T, then P and dS, then dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T. */
static void bwd_micro_f32(const bwd_call_t *c, size_t x, int nk, int partial, bwd_scratch_t *w) {
  const int D = c->p->D, Dp = c->Dp, nkr = (nk + TR - 1) / TR * TR;
  const bwd_q_t *Q = &c->Q;
  for (int jr = 0; jr < nk; jr += TR) {
    gemm_a(D, w->Kc + (size_t)jr * Dp, Dp, Q->Qt + x * c->qtile, w->S + jr * QT, 1.0f);
    gemm_a(D, w->Vc + (size_t)jr * Dp, Dp, Q->dOt + x * c->qtile, w->dP + jr * QT, 1.0f);
  }
  bwd_softmax_grad(w->S, w->dP, nk, nkr, 1.0f, Q->LS + x * QT, Q->DL + x * QT, w->lo, w->hi, partial);
  bwd_dkv_f32(c, x, nkr, w);
  for (int dr = 0; dr < D; dr += TR) gemm_b(nk, w->Kc + dr, Dp, w->dP, w->dQt + x * c->qtile + (size_t)dr * QT, NULL);
}

#ifdef DA_HAVE_BF16DP
/* The same over bf16 pairs: the scale applied to the fp32 scores, P and dS rounded to bf16 for
 * the three gradient products; dK comes out in units of Q / scale (bwd_store_dkv scales it). */
static void bwd_micro_bf(const bwd_call_t *c, size_t x, int nk, int partial, bwd_scratch_t *w) {
  const int D = c->p->D, Dp = c->Dp, nkr = (nk + TR - 1) / TR * TR;
  const bwd_q_t *Q = &c->Q;
  for (int jr = 0; jr < nk; jr += TR) {
    gemm_a_bf((D + 1) / 2, (const uint16_t *)w->Kc + (size_t)jr * Dp, Dp, (const uint32_t *)(Q->Qt + x * c->qtile),
              w->S + jr * QT, c->c2);
    gemm_a_bf((D + 1) / 2, (const uint16_t *)w->Vc + (size_t)jr * Dp, Dp, (const uint32_t *)(Q->dOt + x * c->qtile),
              w->dP + jr * QT, 1.0f);
  }
  bwd_softmax_grad(w->S, w->dP, nk, nkr, 1.0f, Q->LS + x * QT, Q->DL + x * QT, w->lo, w->hi, partial);
  pack_tile_bf(w->Sb, w->S, nkr);
  pack_tile_bf(w->dSb, w->dP, nkr);
  pack_tile_pairs(w->dSp, w->dP, nk);
  for (int jr = 0; jr < nk; jr += TR)
    for (int d0 = 0; d0 < Dp; d0 += NU * W) {
      gemm_c_bf(w->Sb + jr * QT, (const uint32_t *)(Q->dOr + x * c->qtile) + d0, Dp, w->dVt + (size_t)jr * Dp + d0, Dp);
      gemm_c_bf(w->dSb + jr * QT, (const uint32_t *)(Q->Qr + x * c->qtile) + d0, Dp, w->dKt + (size_t)jr * Dp + d0, Dp);
    }
  for (int dr = 0; dr < D; dr += TR)
    gemm_b_bf((nk + 1) / 2, w->Kp + dr, Dp, w->dSp, w->dQt + x * c->qtile + (size_t)dr * QT, NULL);
}
#endif

#ifdef DA_AMX
/* The same on AMX tiles, over the keys padded to nkp: S^T = K Q^T and dP^T = V dO^T, P and dS
 * (the scale applied there), then dV += P^T dO, dK += dS^T Q and dQ^T += K^T dS^T. */
static void bwd_micro_amx(const bwd_call_t *c, size_t x, int nk, int partial, bwd_scratch_t *w) {
  const int Dp = c->Dp, nkp = (nk + KA - 1) / KA * KA;
  const bwd_q_t *Q = &c->Q;
  const uint32_t *Qt = (const uint32_t *)(Q->Qt + x * c->qtile), *dOt = (const uint32_t *)(Q->dOt + x * c->qtile);
  const uint32_t *Qr = (const uint32_t *)(Q->Qr + x * c->qtile), *dOr = (const uint32_t *)(Q->dOr + x * c->qtile);
  amx_gemm(nkp, QT, Dp, (const uint16_t *)w->Kc, Dp, Qt, QT, w->S, QT, 0);
  amx_gemm(nkp, QT, Dp, (const uint16_t *)w->Vc, Dp, dOt, QT, w->dP, QT, 0);
  bwd_softmax_grad(w->S, w->dP, nk, nkp, c->c2, Q->LS + x * QT, Q->DL + x * QT, w->lo, w->hi, partial);
  pack_tile_bf(w->Sb, w->S, nkp);
  pack_tile_bf(w->dSb, w->dP, nkp);
  pack_tile_pairs(w->dSp, w->dP, nk);
  zero_pairs_past(w->dSp, nk, nkp);
  amx_gemm(nkp, Dp, QT, w->Sb, QT, dOr, Dp, w->dVt, Dp, 1);
  amx_gemm(nkp, Dp, QT, w->dSb, QT, Qr, Dp, w->dKt, Dp, 1);
  amx_gemm(Dp, QT, nkp, (const uint16_t *)w->Kp, nkp, w->dSp, QT, w->dQt + x * c->qtile, QT, 1);
}
#endif

/* dk, dv rows of the KV tile += the task's dK, dV (dK times scale on the bf16 pair path, whose
 * products used unscaled Q). */
static void bwd_store_dkv(const bwd_call_t *c, int g, int64_t j0, int nk, const bwd_scratch_t *w) {
  const int G = c->p->G, D = c->p->D, Dp = c->Dp;
  const float ks = BFDP((int)c->p->dtype) ? c->p->scale : 1.0f;
  for (int j = 0; j < nk; j++) {
    float *dkr = c->dk + ((j0 + j) * G + g) * (int64_t)D, *dvr = c->dv + ((j0 + j) * G + g) * (int64_t)D;
    const float *a = w->dKt + (size_t)j * Dp, *b = w->dVt + (size_t)j * Dp;
    for (int d = 0; d < D; d++) dkr[d] += ks * a[d], dvr[d] += b[d];
  }
}

/* One task: KV head g and KV tile kt against every micro-tile of the chunk; it owns its rows of
 * dk and dv, and adds to this thread's dQ^T partial. */
static void bwd_task(const bwd_call_t *c, const bwd_chunk_t *ch, int g, int64_t kt, bwd_scratch_t *w) {
  const da_mask_t *mask = &c->p->mask;
  const int rep = c->p->H / c->p->G;
  const int64_t j0 = kt * c->bk;
  const int nk = (int)lmin(c->bk, c->kpos.count - j0);
  const da_span_t ks = da_span_sub(c->kpos, j0, nk);
  if (da_mask_classify(mask, ch->span.start, da_span_last(ch->span), ks.start, da_span_last(ks)) == DA_TILE_EMPTY)
    return;
  bwd_pack_kv(c, g, j0, nk, w);
  memset(w->dKt, 0, (size_t)2 * c->bk * c->Dp * sizeof(float)); /* dKt and dVt */
#ifdef DA_AMX
  if (AMXDP((int)c->p->dtype)) amx_on();
#endif
  int touched = 0;
  for (int t = 0; t < ch->nct; t++) {
    const int n = (int)lmin(QT, ch->rows - (int64_t)t * QT);
    const da_span_t ts = da_span_sub(ch->span, (int64_t)t * QT, n);
    const int cl = (int)da_mask_classify(mask, ts.start, da_span_last(ts), ks.start, da_span_last(ks));
    if (cl == DA_TILE_EMPTY) continue;
    touched = 1;
    const int partial = cl == DA_TILE_PARTIAL;
    if (partial) lane_ranges(mask, ts, n, ks, w->lo, w->hi);
    for (int hq = 0; hq < rep; hq++) {
      const size_t x = (size_t)(g * rep + hq) * c->ntc + t;
#ifdef DA_AMX
      if (AMXDP((int)c->p->dtype)) {
        bwd_micro_amx(c, x, nk, partial, w);
        continue;
      }
#endif
#ifdef DA_HAVE_BF16DP
      if (BFDP((int)c->p->dtype)) {
        bwd_micro_bf(c, x, nk, partial, w);
        continue;
      }
#endif
      bwd_micro_f32(c, x, nk, partial, w);
    }
  }
#ifdef DA_AMX
  if (AMXDP((int)c->p->dtype)) amx_off();
#endif
  if (touched) bwd_store_dkv(c, g, j0, nk, w);
}

/* dq rows of tile ht = h * nct + t of the chunk += scale * the sum over threads of dQ^T
 * (transposed back). */
static void bwd_reduce_dq(const bwd_call_t *c, const bwd_chunk_t *ch, int64_t ht) {
  const int H = c->p->H, D = c->p->D;
  const int h = (int)(ht / ch->nct), t = (int)(ht % ch->nct);
  const size_t x = (size_t)h * c->ntc + t;
  const int64_t row = ch->c0 + (int64_t)t * QT;
  const int n = (int)lmin(QT, ch->rows - (int64_t)t * QT);
  for (int d = 0; d < D; d++) {
    float sum[QT];
    memset(sum, 0, sizeof sum);
    for (int th = 0; th < c->nt; th++) {
      const float *src = c->scratch + c->per * (size_t)th + x * c->qtile + (size_t)d * QT;
      for (int i = 0; i < QT; i++) sum[i] += src[i];
    }
    for (int i = 0; i < n; i++) c->dq[((row + i) * H + h) * (int64_t)D + d] += c->p->scale * sum[i];
  }
}

/* Query rows per chunk: each thread's dQ^T partial for a chunk stays within about 2 MB, and so
 * does the packed query side of one KV head's group (Qt, dOt, Qr, dOr: 16 bytes per row, query
 * head and dim), which every task of that KV head streams through the cache once per KV tile.
 * With only the first bound one head at D 128 had 4K-row chunks, 8 MB of query side per task:
 * 10-15% slower backward at 1 and 2 threads (Zen 3, seq 4K, H 1, D 64/128, causal and none).
 * On AVX-512 both bounds are 1 MB: on the Sapphire Rapids class host (4K x 4 heads, 2 threads, 3
 * interleaved runs) fp32 backward D 128 none 257 -> 264 GFLOP/s, causal +2%, D 64 none 251 ->
 * 265, bf16 (amx) unchanged; 0.5 MB lost 10% in bf16. */
#if defined(DA_SIMD_AVX512)
#define BWD_CHUNK_LOG2 18 /* floats of the dQ^T bound; the query side's is 2 less (16 bytes a row) */
#else
#define BWD_CHUNK_LOG2 19
#endif
static int64_t bwd_chunk_rows(int H, int rep, int Dp, int64_t nq) {
  int64_t qc = lmin(((int64_t)1 << BWD_CHUNK_LOG2) / ((int64_t)H * Dp),
                    ((int64_t)1 << (BWD_CHUNK_LOG2 - 2)) / ((int64_t)rep * Dp)) /
               QT * QT;
  if (qc < QT) qc = QT;
  const int64_t nqr = (nq + QT - 1) / QT * QT;
  return qc > nqr ? nqr : qc;
}

/* Chunks of query rows in turn; in each, the threads pack its query side, then take (KV head,
 * KV tile) tasks, then reduce their dQ^T partials into dq. */
static da_status_t bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout, int64_t lddo,
                             const float *lse, const float *delta, da_span_t qpos, const void *k, int64_t ldk,
                             const void *v, int64_t ldv, da_span_t kpos, float *dq, float *dk, float *dv,
                             void *stream) {
  (void)stream;
  if (qpos.count <= 0 || kpos.count <= 0) return DA_SUCCESS;
  if (da_mask_classify(&p->mask, qpos.start, da_span_last(qpos), kpos.start, da_span_last(kpos)) == DA_TILE_EMPTY)
    return DA_SUCCESS;
  const int H = p->H, G = p->G, Dp = pad_dim(p->D);
  const int64_t qc = bwd_chunk_rows(H, H / G, Dp, qpos.count);
  bwd_call_t c = {.p = p, .Dp = Dp, .bk = kv_tile(p, 1), .ntc = (int)(qc / QT), .c2 = p->scale * LOG2E,
                  .q = q, .dout = dout, .k = k, .v = v, .ldq = ldq, .lddo = lddo, .ldk = ldk, .ldv = ldv,
                  .lse = lse, .delta = delta, .qpos = qpos, .kpos = kpos, .dq = dq, .dk = dk, .dv = dv};
  const int64_t nkt = (kpos.count + c.bk - 1) / c.bk, ntasks = (int64_t)G * nkt;
  c.nt = (int)lmin(nthreads_of(p), ntasks > 1 ? ntasks : 1);
  c.qtile = (size_t)Dp * QT, c.nht = (size_t)H * c.ntc;
  c.per = bwd_scratch_floats(c.nht, c.qtile, c.bk, Dp);
  const size_t qbytes = c.nht * (4 * c.qtile + 2 * QT) * sizeof(float);
  float *qbuf = da_malloc(qbytes, 64);
  c.scratch = da_malloc(c.per * (size_t)c.nt * sizeof(float), 64);
  if (!qbuf || !c.scratch) {
    da_free(qbuf), da_free(c.scratch);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "cpu backward: %zu bytes of scratch", qbytes + c.per * c.nt * sizeof(float));
  }
  bwd_q_carve(&c.Q, qbuf, c.nht, c.qtile);
#pragma omp parallel num_threads(c.nt)
  {
    bwd_scratch_t w;
    bwd_scratch_carve(&w, c.scratch + c.per * (size_t)omp_get_thread_num(), &c);
    for (int64_t c0 = 0; c0 < qpos.count; c0 += qc) {
      const int64_t rows = lmin(qc, qpos.count - c0);
      const bwd_chunk_t ch = {.c0 = c0, .rows = rows, .nct = (int)((rows + QT - 1) / QT),
                              .span = da_span_sub(qpos, c0, rows)};
#pragma omp for schedule(static)
      for (int64_t ht = 0; ht < (int64_t)H * ch.nct; ht++) bwd_pack_q(&c, &ch, ht);
      memset(w.dQt, 0, c.nht * c.qtile * sizeof(float));
      /* head-major: consecutive tasks (on both threads) read the same head's packed query side,
       * which then stays in cache (Zen 3, 4K x 4 heads x D 128, 1 thread: 71 -> 77 GFLOP/s) */
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < ntasks; task++) bwd_task(&c, &ch, (int)(task / nkt), task % nkt, &w);
#pragma omp for schedule(static)
      for (int64_t ht = 0; ht < (int64_t)H * ch.nct; ht++) bwd_reduce_dq(&c, &ch, ht);
    }
  }
  da_free(qbuf);
  da_free(c.scratch);
  return DA_SUCCESS;
}

/* ---- decode ---------------------------------------------------------------------------------
 * One or a few new query rows against a long KV cache: the cost is reading the cache, so every
 * K and V row is read from memory once per query row and KV head, whatever the number of query
 * heads that share it (GQA). The query heads of a group share each K/V row while it is in
 * registers: the scores of a block are a small (heads x D) by (D x keys) product, register-blocked
 * so that each loaded K vector feeds an FMA for every head of a chunk of DEC_NH heads (and each
 * Q vector one for every key of a pair or quad), and the output is the (heads x keys) by
 * (keys x D) product blocked the same way over V. Rows are read in place in their storage dtype
 * (bf16 and fp16 at half the bytes, widened in registers) when the head dim is whole vectors,
 * and converted once per block for the whole group otherwise. fp32 groups of a multiple of W
 * heads run heads-in-lanes instead (decl_group, below). The online softmax, the running state and
 * all sums are fp32. */

#define DEC_BK 32 /* keys per block: the block's K rows stay in L1 across the head chunks of a group */
#define DEC_NH 4  /* query heads per register block (the 16 AVX2 registers hold 8 accumulators) */
_Static_assert(DEC_BK % W == 0 && DEC_BK >= W, "a score row must be whole vectors (the softmax reads them so)");

/* The prefetch of the next unit's K and V rows. A unit is one block of keys of one KV head, and
 * decode_range runs the KV heads of a block before the next block: the unit after (block, head g)
 * is head g + 1 of the same block (its rows sit right after head g's in each key row of the
 * cache), or head 0 of the next block, which after a page's last block is the first block of the
 * next page. Until 2026-12-08 a page's last block prefetched nothing, so with the default pages
 * of 256 keys one block in eight came from DRAM unrequested; prefetching across the page
 * boundary lifted the AMX host's 256K-key decode (medians of three interleaved runs, fraction of
 * the stream, one / two threads) 4:1 fp32 0.78 / 0.79 -> 0.85 / 0.87, 8:1 fp32 0.72 / 0.70 ->
 * 0.77 / 0.76, 4:1 bf16 0.67 / 0.69 -> 0.72 / 0.74, 1:1 bf16 0.86 / 0.83 -> 0.92 / 0.86
 * (bench/results/decode-spr.md, "Across pages"). Prefetching a head's next block instead, G units ahead,
 * left the fp32 groups of a cache of 8 KV heads 0.1-0.17 of the stream slower (Zen 3, 256K keys,
 * 4:1 and 8:1; bench/results/decode-zen3.md, "Caches of 8 KV heads").
 *
 * Groups, paced: the kernels' inner iterations each take `rate` / 256 of a cache line from this
 * cursor (K rows, then V rows), a rate set so that the next unit's lines are requested evenly over
 * the current unit's arithmetic (dec_pf_start). Requests at the rate memory delivers them keep
 * the DRAM stream busy beside the FMAs; prefetching each row's lines in a burst a block ahead as
 * the row is read, which groups did until 2026-12-07, filled the L1 miss buffers (every software
 * prefetch takes one on Zen 3) and stalled the arithmetic behind them: the grouped decode cost
 * the sum of its arithmetic and its reads (Zen 3, 256K keys, one thread, medians: 4:1 fp32 29.5
 * -> 25.7 ms, 8:1 37.2 -> 29.4 ms; bench/results/decode-zen3.md). The pacer's requests go to L2
 * (prefetcht1): on the AMX host, where L1 requests (prefetcht0) stalled in the miss buffers,
 * 4:1 fp32 read the 256K cache at 0.77 -> 0.85 of the stream, 8:1 0.64 -> 0.70, one thread
 * (bench/results/decode-spr.md); Zen 3 treats the hints alike.
 *
 * One head has little arithmetic to pace against and keeps the burst (Zen 3: the pacer made bf16
 * 1:1 8-14% slower): as its kernels read a row, they prefetch the first pfb bytes koff (K) or voff
 * (V) bytes further, the same row of the next unit (pfb = 0: none). Except fp32 rows on the
 * AVX-512 levels (DEC_PACE_ONE), which the pacer reads faster on the AMX host: 1:1 fp32 at one /
 * two threads 0.82 / 0.84 -> 0.87 / 0.88 of the stream, where bf16 lost 0.895 / 0.84 -> 0.78 /
 * 0.79 (three interleaved runs each; bench/results/decode-spr.md, "One head"). */
#define DEC_PACE_ONE (W == 16)
typedef struct {
  const char *p, *end;  /* the next line; the end of the current row */
  const char *base[2];  /* K and V rows of the next unit */
  int64_t ld[2];        /* their row strides in bytes */
  int rb, nrows;        /* bytes per row (whole lines), rows */
  int w, row;           /* region (0 K, 1 V, 2 done) and row of p */
  int rate, acc;        /* lines per inner iteration in 1/256, and the fraction owed */
  int64_t koff, voff;   /* one head: bytes from a K (V) row to the same row of the next unit */
  int pfb;              /* one head: bytes of each such row to prefetch (0: none) */
} dec_pf_t;

/* Point the cursor at the first line of row f->row of region f->w (done when w > 1). */
static void dec_pf_row(dec_pf_t *f) {
  if (f->w > 1) return;
  const char *r = f->base[f->w] + (size_t)f->row * (size_t)f->ld[f->w];
  f->p = (const char *)((uintptr_t)r & ~(uintptr_t)63), f->end = r + f->rb;
}

static void dec_pf_next_row(dec_pf_t *f) {
  if (++f->row == f->nrows) f->row = 0, f->w++;
  dec_pf_row(f);
}

static inline void dec_pf_steps(dec_pf_t *f, int n) {
  for (f->acc += n * f->rate; f->acc >= 256 && f->w < 2; f->acc -= 256) {
    __builtin_prefetch(f->p, 0, 2);
    if ((f->p += 64) >= f->end) dec_pf_next_row(f);
  }
}

/* The horizontal sums of n vectors into out[0..n-1] (n a compile-time constant after inlining). */
static inline void dec_sums(const vf *c, int n, float *out) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vhsum4(c[i], c[i + 1], c[i + 2], c[i + 3], out + i);
  for (; i < n; i++) out[i] = vhsum(c[i]);
}

/* Scores of NH heads against keys [lo, hi]: S[h * lds + j] = Q[h * ldq ..] . K[j * ldk ..] over
 * nvec vectors (h < NH). K rows of T, read with LD (fp32, or 16-bit widened in registers). KB keys
 * at a time: per vector step, KB K loads and NH Q loads (L1) feed NH * KB FMAs into independent
 * accumulators; each such step advances the prefetch pf. */
#define DEC_QK(NAME, NH, KB, T, LD)                                                                              \
  static void NAME(int nvec, const float *restrict Q, int64_t ldq, const void *kp, int64_t ldk, int64_t lo,     \
                   int64_t hi, float *restrict S, int lds, dec_pf_t *pfp) {                                     \
    const T *K = (const T *)kp;                                                                                  \
    dec_pf_t pf = *pfp;                                                                                          \
    int64_t j = lo;                                                                                              \
    for (; j + KB - 1 <= hi; j += KB) {                                                                          \
      const T *kr = K + j * ldk;                                                                                 \
      vf c[NH * KB];                                                                                             \
      _Pragma("GCC unroll 16") for (int i = 0; i < NH * KB; i++) c[i] = vzero();                                \
      for (int r = 0; r < KB; r++)                                                                               \
        for (int b = 0; b < pf.pfb; b += 64) __builtin_prefetch((const char *)(kr + r * ldk) + pf.koff + b);     \
      for (int x = 0; x < nvec; x++) {                                                                           \
        dec_pf_steps(&pf, 1);                                                                                    \
        vf k[KB];                                                                                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < KB; r++) k[r] = LD(kr + r * ldk + x * W);                    \
        _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) {                                                   \
          const vf q = vload(Q + h * ldq + x * W);                                                               \
          _Pragma("GCC unroll 8") for (int r = 0; r < KB; r++) c[h * KB + r] = vfma(q, k[r], c[h * KB + r]);     \
        }                                                                                                        \
      }                                                                                                          \
      float t[NH * KB];                                                                                          \
      dec_sums(c, NH * KB, t);                                                                                   \
      _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++)                                                       \
          _Pragma("GCC unroll 8") for (int r = 0; r < KB; r++) S[h * lds + j + r] = t[h * KB + r];               \
    }                                                                                                            \
    for (; j <= hi; j++) { /* the last keys, one at a time */                                                    \
      const T *kr = K + j * ldk;                                                                                 \
      vf c[NH];                                                                                                  \
      _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) c[h] = vzero();                                       \
      for (int x = 0; x < nvec; x++) {                                                                           \
        const vf k = LD(kr + x * W);                                                                             \
        _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) c[h] = vfma(vload(Q + h * ldq + x * W), k, c[h]);   \
      }                                                                                                          \
      float t[NH];                                                                                               \
      dec_sums(c, NH, t);                                                                                        \
      _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) S[h * lds + j] = t[h];                                \
    }                                                                                                            \
    *pfp = pf;                                                                                                   \
  }

/* NX vectors from x of the outputs of NH heads: O[h][x..] = O[h][x..] * alpha[h] + sum_j P[h][j] V[j][x..]:
 * per key, NX V loads and NH broadcasts of P feed NH * NX FMAs, and the prefetch pf advances. */
#define DEC_PV_COLS(NH, NX, T, LD)                                                                               \
  do {                                                                                                           \
    vf c[NH][NX];                                                                                                \
    _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) {                                                       \
      const vf a = vset1(alpha[h]);                                                                              \
      _Pragma("GCC unroll 16") for (int u = 0; u < NX; u++) c[h][u] = vmul(vload(O + h * ldo + (x + u) * W), a);  \
    }                                                                                                            \
    for (int64_t j = lo; j <= hi; j++) {                                                                         \
      const T *vr = V + j * ldv + x * W;                                                                         \
      dec_pf_steps(&pf, 1);                                                                                      \
      if (x == 0)                                                                                                \
        for (int b = 0; b < pf.pfb; b += 64) __builtin_prefetch((const char *)(V + j * ldv) + pf.voff + b);      \
      vf v[NX];                                                                                                  \
      _Pragma("GCC unroll 16") for (int u = 0; u < NX; u++) v[u] = LD(vr + u * W);                                \
      _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++) {                                                     \
        const vf p = vset1(P[h * ldp + j]);                                                                      \
        _Pragma("GCC unroll 16") for (int u = 0; u < NX; u++) c[h][u] = vfma(p, v[u], c[h][u]);                   \
      }                                                                                                          \
    }                                                                                                            \
    _Pragma("GCC unroll 4") for (int h = 0; h < NH; h++)                                                         \
        _Pragma("GCC unroll 16") for (int u = 0; u < NX; u++) vstore(O + h * ldo + (x + u) * W, c[h][u]);         \
  } while (0)

/* Outputs of NH heads over nvec vectors, XV vectors at a time (then one): O[h] = O[h] * alpha[h] +
 * sum_{j in [lo, hi]} P[h * ldp + j] V[j]. V rows of T with stride ldv; O rows of stride ldo. */
#define DEC_PV(NAME, NH, XV, T, LD)                                                                              \
  static void NAME(int nvec, const float *restrict P, int ldp, const float *alpha, int64_t lo, int64_t hi,      \
                   const void *vp, int64_t ldv, float *restrict O, int64_t ldo, dec_pf_t *pfp) {                 \
    const T *V = (const T *)vp;                                                                                  \
    dec_pf_t pf = *pfp;                                                                                          \
    int x = 0;                                                                                                   \
    for (; x + XV <= nvec; x += XV) DEC_PV_COLS(NH, XV, T, LD);                                                  \
    for (; x < nvec; x++) DEC_PV_COLS(NH, 1, T, LD);                                                             \
    *pfp = pf;                                                                                                   \
  }

typedef void (*dec_qk_fn)(int, const float *, int64_t, const void *, int64_t, int64_t, int64_t, float *, int,
                          dec_pf_t *);
typedef void (*dec_pv_fn)(int, const float *, int, const float *, int64_t, int64_t, const void *, int64_t, float *,
                          int64_t, dec_pf_t *);
/* The kernels of one storage dtype, for chunks of 1..DEC_NH heads ([nh - 1]), and their blocking:
 * keys per QK step (kb) and vectors per PV step (xv), which dec_pf_start counts steps with. */
typedef struct {
  dec_qk_fn qk[DEC_NH];
  dec_pv_fn pv[DEC_NH];
  int kb[DEC_NH], xv[DEC_NH];
} dec_fns_t;

static inline vf dec_ld_bf(const uint16_t *p) { return vload_dt(p, 1, W); }
static inline vf dec_ld_f16(const uint16_t *p) { return vload_dt(p, 2, W); }
/* Blocking per chunk size: keys per QK step 4, 4, 2, K4 and vectors per PV step 16, 4, 2, K4 for
 * 1, 2, 3, 4 heads: up to 8 or 12 accumulators (independent FMA chains that cover the FMA
 * latency) plus the loaded operands within 16 registers (an operand used once is folded into its
 * FMA). Four fp32 heads at 4 x 3 (K4 = 3): the L2-resident 8:1 arithmetic 41 -> 38 us per 512
 * keys on Zen 3, 256K from DRAM 4-7% less CPU time; 16-bit rows stay at 4 x 2 (K4 = 2), where
 * 4 x 3 read the 256K cache 5% slower (bench/results/cpu-tasks-zen3.md). No spill in any loop.
 * One head is memory-bound: its PV takes a whole D-128 row per key (16 accumulators: fp32
 * spills one at most; 16-bit rows, which need a register to widen each vector, keep all 16 on
 * the stack), since walking the V rows in two column passes measured 5-10% slower on Zen 3 (the
 * rows are no longer read in address order), and for 16-bit rows, without the stack traffic,
 * no better (2026-12-07: medians moved both ways by 0.1 of the stream between runs); 8 keys per
 * QK step did not pay either (bench/results/decode-zen3.md). At AVX-512's W 16 a D-128 row is 8
 * vectors (DEC_XV1 = 128 / W, one pass per row); 16 there left the one-head PV 8 passes of one
 * vector over the rows: 1:1 fp32 0.75 -> 0.86 of the stream, bf16 0.63 -> 0.84 (AMX host, one
 * thread, bench/results/decode-spr.md). */
#define DEC_KB1 4
#define DEC_KB2 4
#define DEC_KB3 2
#define DEC_XV1 (128 / W)
#define DEC_XV2 4
#define DEC_XV3 2
/* bf16 chunks of four heads at AVX-512 take 4 keys or vectors per step (32 registers hold the 16
 * accumulators; AMX host, 4:1 bf16, 256K keys: 0.73 / 0.77 -> 0.77 / 0.77 of the stream at one
 * / two threads); fp32 stays at 3 (4 lost 8:1 fp32 0.79 / 0.78 -> 0.74 / 0.71). */
#define DEC_K4B (W == 16 ? 4 : 2)
#define DEC_FNS(S, T, LD, K4)                                                                                    \
  DEC_QK(dec_qk1_##S, 1, DEC_KB1, T, LD)                                                                         \
  DEC_QK(dec_qk2_##S, 2, DEC_KB2, T, LD)                                                                         \
  DEC_QK(dec_qk3_##S, 3, DEC_KB3, T, LD)                                                                         \
  DEC_QK(dec_qk4_##S, 4, K4, T, LD)                                                                              \
  DEC_PV(dec_pv1_##S, 1, DEC_XV1, T, LD)                                                                         \
  DEC_PV(dec_pv2_##S, 2, DEC_XV2, T, LD)                                                                         \
  DEC_PV(dec_pv3_##S, 3, DEC_XV3, T, LD)                                                                         \
  DEC_PV(dec_pv4_##S, 4, K4, T, LD)                                                                              \
  static const dec_fns_t dec_fns_##S = {{dec_qk1_##S, dec_qk2_##S, dec_qk3_##S, dec_qk4_##S},                   \
                                        {dec_pv1_##S, dec_pv2_##S, dec_pv3_##S, dec_pv4_##S},                   \
                                        {DEC_KB1, DEC_KB2, DEC_KB3, K4},                                         \
                                        {DEC_XV1, DEC_XV2, DEC_XV3, K4}};
DEC_FNS(f32, float, vload, 3)
DEC_FNS(bf16, uint16_t, dec_ld_bf, DEC_K4B)
DEC_FNS(f16, uint16_t, dec_ld_f16, 2)
_Static_assert(DEC_NH == 4, "dec_fns lists one kernel per chunk size");
/* Indexed by the storage dtype (da_dtype_t: fp32, bf16, fp16). */
static const dec_fns_t *const dec_fns[3] = {&dec_fns_f32, &dec_fns_bf16, &dec_fns_f16};

/* The inner steps that f's kernels take over nkeys keys of a group of rep heads (dec_group). */
static int64_t dec_steps(const dec_fns_t *f, int nvec, int rep, int64_t nkeys) {
  int64_t steps = 0;
  for (int h = 0; h < rep; h += DEC_NH) {
    const int c = imin(DEC_NH, rep - h) - 1;
    steps += nkeys / f->kb[c] * nvec + nkeys * (nvec / f->xv[c] + nvec % f->xv[c]);
  }
  return steps;
}

/* A cursor over nrows rows of rb bytes at k and v (row strides ldk, ldv bytes; none: nrows 0),
 * paced for the given number of inner steps of the current block (dec_steps, decl_steps,
 * deca_steps): the rows' lines (whole lines per row, as 64-byte aligned rows have) spread evenly
 * over all the steps. Until 2026-12-08 the pace counted a line more per row and finished with 1/8
 * of the steps to spare, so the requests came 1.3-1.4x denser: on the AMX host, 256K keys,
 * medians of three interleaved runs, fraction of the stream at one / two threads, the even pace
 * read 8:1 bf16 at 0.59 / 0.61 -> 0.69-0.71 / 0.70-0.72, 4:1 bf16 0.72 / 0.73 -> 0.76-0.79 /
 * 0.77, 8:1 fp32 0.76 / 0.77 -> 0.78-0.80 / 0.84, and the rest no slower (bench/results/
 * decode-spr.md, "Pace"). */
static void dec_pf_start(dec_pf_t *pf, int64_t steps, const char *k, int64_t ldk, const char *v, int64_t ldv, int rb,
                         int64_t nrows) {
  *pf = (dec_pf_t){.base = {k, v}, .ld = {ldk, ldv}, .rb = rb, .nrows = (int)nrows, .w = nrows > 0 ? 0 : 2};
  const int64_t lines = 2 * nrows * ((rb + 63) / 64);
  pf->rate = (int)lmin(1 << 24, lines * 256 / (steps > 0 ? steps : 1) + 1);
  dec_pf_row(pf);
}

/* The online softmax of one head over the scores s[lo..hi] of a block (log2 units): updates the
 * head's max *mo and sum *lr, turns s[lo..hi] into the weights 2^(s - max), and returns the
 * factor alpha that rescales the head's output. A head that has seen no finite score yet gets
 * weights 0 and alpha 1 (its output stays 0); a NaN score makes max, alpha and weights NaN, so
 * the NaN reaches the output (test_nan_propagation). */
static float dec_softmax(float *s, int64_t lo, int64_t hi, float *mo, float *lr) {
  /* Whole vectors over [lo, hi] (s is DEC_BK long, a multiple of W): lanes outside it read -inf,
   * so they drop out of the max and give exp2 = 0 in the sum. */
  const int64_t v0 = lo & ~(int64_t)(W - 1), v1 = (hi + W) & ~(int64_t)(W - 1);
  for (int64_t j = v0; j < lo; j++) s[j] = -INFINITY;
  for (int64_t j = hi + 1; j < v1; j++) s[j] = -INFINITY;
  vf vmx = vset1(-INFINITY), chk = vzero();
  for (int64_t j = v0; j < v1; j += W) vmx = vmax(vmx, vload(s + j)), chk = vadd(chk, vload(s + j));
  const float ck = vhsum(chk);
  const float mx = ck != ck ? ck : vhmax(vmx); /* a NaN score (NaN input) makes the max NaN */
  const float mn = mx > *mo || mx != mx ? mx : *mo;
  if (mn == -INFINITY) {
    for (int64_t j = lo; j <= hi; j++) s[j] = 0.0f;
    return 1.0f;
  }
  const float alpha = exp2f(*mo - mn);
  const vf vm = vset1(mn);
  vf vs = vzero();
  for (int64_t j = v0; j < v1; j += W) {
    const vf e = vexp2(vsub(vload(s + j), vm));
    vstore(s + j, e);
    vs = vadd(vs, e);
  }
  *lr = *lr * alpha + vhsum(vs);
  *mo = mn;
  return alpha;
}

/* The rep query heads of one GQA group (one query row) against keys [lo, hi] of a block: q, o
 * [rep][nvec * W] (log2-unit queries, unnormalized outputs), m, l [rep]; K, V rows as f reads
 * them (strides ldk, ldv); S [rep][DEC_BK] and alpha [rep] scratch. All chunks' scores first (the
 * K rows stay in L1 between chunks), then the softmax per head, then all chunks' outputs. Every
 * inner step of the kernels advances the prefetch pf (dec_pf_t: groups' pacer, or one head's
 * per-row burst when pf->pfb > 0). */
static void dec_group(const dec_fns_t *f, int nvec, int rep, const float *q, const void *kb, int64_t ldk,
                      const void *vb, int64_t ldv, int64_t lo, int64_t hi, float *o, float *m, float *l, float *S,
                      float *alpha, dec_pf_t *pf) {
  const int64_t Dv = (int64_t)nvec * W;
  for (int h = 0; h < rep; h += DEC_NH)
    f->qk[imin(DEC_NH, rep - h) - 1](nvec, q + h * Dv, Dv, kb, ldk, lo, hi, S + h * DEC_BK, DEC_BK, pf);
  for (int h = 0; h < rep; h++) alpha[h] = dec_softmax(S + h * DEC_BK, lo, hi, m + h, l + h);
  for (int h = 0; h < rep; h += DEC_NH)
    f->pv[imin(DEC_NH, rep - h) - 1](nvec, S + h * DEC_BK, DEC_BK, alpha + h, lo, hi, vb, ldv, o + h * Dv, Dv, pf);
}

/* ---- decode, heads in lanes ------------------------------------------------------------------
 * A GQA group of a multiple of W query heads (8:1 and 16:1 at AVX2's W 8, what Llama-class models
 * use) has enough heads to fill the vector lanes, so its decode turns the products around, as the
 * forward kernel does with its queries: each chunk of W heads keeps its heads in the lanes.
 *   scores  S^T[key][W] = sum_d K[key][d] Q^T[d][W]: per dim, one Q^T load and a broadcast of
 *           each of DECL_KT keys' elements feed DECL_KT FMAs, and no horizontal sum follows;
 *   softmax lane-wise down the keys, the running max, sum and alpha one vector per chunk;
 *   outputs O^T[d][W] = O^T[d][W] alpha + sum_key V[key][d] P^T[key][W]: per key, one P^T load
 *           and DECL_DT broadcasts of V elements feed DECL_DT FMAs.
 * The chunk's queries and outputs are stored heads-in-lanes ([Dv][W], dec_at) for the whole call;
 * decode writes the queries and combines the splits through it. fp32 caches only (a head dim
 * that is not whole vectors converted per block, dec_convert): a 16-bit cache would need a
 * widening per broadcast element, and converted per block it measured no faster than the grouped
 * kernels' in-register widening (8:1 bf16, 256K keys: 0.35 of the stream either way). Zen 3, one
 * thread, 8:1, a block in L1 with the prefetch pacer running: 72% of the FMA peak, where the
 * grouped kernels (horizontal sums per key and head chunk, P broadcast per head) reach 56%; 256K
 * keys from DRAM, 0.56 -> 0.65 of a same-run stream (bench/results/decode-zen3.md, "Heads in
 * lanes"). */
#define DECL_KT W /* keys per score step: W accumulators */
#define DECL_DT W /* dims per output pass: W accumulators */

/* Whether decode runs p's groups heads-in-lanes. */
static int dec_lanes(const da_kparams_t *p) { return p->dtype == DA_FLOAT32 && (p->H / p->G) % W == 0; }

/* Index of element (r, d) of a decode buffer of rows r = (query row, head) by Dp dims: row-major,
 * or heads-in-lanes ([Dp][W] per chunk of W heads; a chunk never straddles groups). */
static inline size_t dec_at(int lanes, int64_t r, int d, int Dp) {
  return lanes ? (size_t)(r - r % W) * Dp + (size_t)d * W + (size_t)(r % W) : (size_t)r * Dp + (size_t)d;
}

/* Scores of the W heads of Qt [Dv][W] against fp32 keys [lo, hi] (rows of stride ldk):
 * ST[j][W] for j in [lo, hi]. Every 4 dims of a step advance the prefetch pf by 4 steps. */
static __attribute__((noinline)) void decl_qk(int Dv, const float *restrict Qt, const float *restrict K, int64_t ldk,
                                              int64_t lo, int64_t hi, float *restrict ST, dec_pf_t *pfp) {
  dec_pf_t pf = *pfp; /* in registers */
  int64_t j = lo;
  for (; j + DECL_KT - 1 <= hi; j += DECL_KT) {
    const float *kr = K + j * ldk;
    vf c[DECL_KT];
    for (int i = 0; i < DECL_KT; i++) c[i] = vzero();
    for (int d = 0; d < Dv; d += 4) { /* Dv is whole vectors: a multiple of 4 */
      dec_pf_steps(&pf, 4);
      _Pragma("GCC unroll 4") for (int u = d; u < d + 4; u++) {
        const vf q = vload(Qt + (size_t)u * W);
        _Pragma("GCC unroll 16") for (int i = 0; i < DECL_KT; i++) c[i] = vfma(vset1(kr[i * ldk + u]), q, c[i]);
      }
    }
    for (int i = 0; i < DECL_KT; i++) vstore(ST + (j + i) * W, c[i]);
  }
  for (; j <= hi; j++) { /* the last keys, one at a time, over four chains */
    const float *kr = K + j * ldk;
    vf c[4] = {vzero(), vzero(), vzero(), vzero()};
    dec_pf_steps(&pf, 1);
    for (int d = 0; d < Dv; d += 4)
      _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) c[u] =
          vfma(vset1(kr[d + u]), vload(Qt + (size_t)(d + u) * W), c[u]);
    vstore(ST + j * W, vadd(vadd(c[0], c[1]), vadd(c[2], c[3])));
  }
  *pfp = pf;
}

/* The online softmax of W heads (lanes) over the scores ST[lo..hi][W] of a block (log2 units):
 * updates the heads' max m[W] and sum l[W], turns ST[lo..hi] into the weights 2^(s - max), and
 * returns the factors alpha that rescale the heads' outputs. A head that has seen nothing yet
 * keeps max -inf and takes its weights relative to 0 (all 0; its alpha 0 scales an output and sum
 * of 0). A NaN score makes the head's max NaN (vmax may drop it, and a max left at -inf would
 * read as "saw no key" when decode combines the splits), and its weight NaN. */
static vf decl_softmax(float *ST, int64_t lo, int64_t hi, float *m, float *l) {
  vf mx = vset1(-INFINITY), chk = vzero();
  for (int64_t j = lo; j <= hi; j++) mx = vmax(mx, vload(ST + j * W)), chk = vadd(chk, vload(ST + j * W));
  const vf mo = vload(m);
  float t[W], ck[W];
  vstore(t, mx);
  vstore(ck, chk);
  for (int i = 0; i < W; i++) {
    const float x = ck[i] != ck[i] ? ck[i] : t[i];
    m[i] = x > m[i] || x != x ? x : m[i];
  }
  const vf use = vreplace_eq(vload(m), -INFINITY, 0.0f), alpha = vexp2(vsub(mo, use));
  vf sum = vzero();
  for (int64_t j = lo; j <= hi; j++) {
    const vf e = vexp2(vsub(vload(ST + j * W), use));
    vstore(ST + j * W, e);
    sum = vadd(sum, e);
  }
  vstore(l, vfma(vload(l), alpha, sum));
  return alpha;
}

/* Outputs of the W heads of OT [Dv][W]: OT = OT * alpha + sum_{j in [lo, hi]} V[j] PT[j] over
 * fp32 rows of stride ldv, DECL_DT dims per pass. Every two keys of a pass advance pf by 2. */
static __attribute__((noinline)) void decl_pv(int Dv, const float *restrict PT, vf alpha, int64_t lo, int64_t hi,
                                              const float *restrict V, int64_t ldv, float *restrict OT, dec_pf_t *pfp) {
  dec_pf_t pf = *pfp; /* in registers */
  for (int d0 = 0; d0 < Dv; d0 += DECL_DT) { /* Dv is whole vectors: a multiple of DECL_DT */
    vf c[DECL_DT];
    for (int i = 0; i < DECL_DT; i++) c[i] = vmul(vload(OT + (size_t)(d0 + i) * W), alpha);
    const float *vr = V + d0;
    int64_t j = lo;
    for (; j + 1 <= hi; j += 2) {
      dec_pf_steps(&pf, 2);
      _Pragma("GCC unroll 2") for (int64_t u = j; u < j + 2; u++) {
        const vf pw = vload(PT + u * W);
        _Pragma("GCC unroll 16") for (int i = 0; i < DECL_DT; i++) c[i] = vfma(vset1(vr[u * ldv + i]), pw, c[i]);
      }
    }
    if (j <= hi) {
      dec_pf_steps(&pf, 1);
      const vf pw = vload(PT + j * W);
      for (int i = 0; i < DECL_DT; i++) c[i] = vfma(vset1(vr[j * ldv + i]), pw, c[i]);
    }
    for (int i = 0; i < DECL_DT; i++) vstore(OT + (size_t)(d0 + i) * W, c[i]);
  }
  *pfp = pf;
}

/* The inner steps of decl_group over nkeys keys of a group of rep heads: per chunk of W heads,
 * Dv per whole score step and one per remaining key, and nkeys per output pass. */
static int64_t decl_steps(int Dv, int rep, int64_t nkeys) {
  return rep / W * (nkeys / DECL_KT * Dv + nkeys % DECL_KT + Dv / DECL_DT * nkeys);
}

/* The rep heads of one group (one query row) against fp32 keys [lo, hi] of a block, W heads at
 * a time: qt, ot [rep / W][Dv][W] (heads-in-lanes queries and unnormalized outputs), m, l [rep];
 * ST [DEC_BK][W] scratch; pf advances with every inner step. */
static void decl_group(int Dv, int rep, const float *qt, const float *K, int64_t ldk, const float *V, int64_t ldv,
                       int64_t lo, int64_t hi, float *ot, float *m, float *l, float *ST, dec_pf_t *pf) {
  for (int c = 0; c < rep; c += W) {
    decl_qk(Dv, qt + (size_t)c * Dv, K, ldk, lo, hi, ST, pf);
    const vf alpha = decl_softmax(ST, lo, hi, m + c, l + c);
    decl_pv(Dv, ST, alpha, lo, hi, V, ldv, ot + (size_t)c * Dv, pf);
  }
}

/* ---- decode, bf16 groups on AMX (the level built with DA_AMX) --------------------------------
 * A bf16 cache read by a group of 3 to 16 query heads, or a multiple of 16, with a head dim of a
 * multiple of 32 (deca_rows): the tiles do both products, so the group's arithmetic no longer
 * competes with the read of the cache (the grouped FMA kernels cost 8:1 bf16 0.45-0.5 of a
 * same-run stream on the AMX host; bench/results/acceptance-spr.md).
 *   scores  S^T [keys][16 heads] = K [keys][D] . Q^T: K is the A operand, loaded from the cache
 *           rows in place (tileloadd with the cache's row stride; a block's last rows past the
 *           page through a zero-padded copy), Q^T the B operand in pair layout (deca_qt, built
 *           once per call from the unscaled bf16 queries; heads past the group's hr are zero);
 *   softmax heads-in-lanes down the keys, scaled by scale * log2(e) (deca_softmax);
 *   outputs O [hr heads][D] += P [hr][32 keys] . V: P the A operand (S^T transposed and rounded to
 *           bf16, as the prefill's AMX path rounds it), V the B operand, its key rows interleaved
 *           in pairs (deca_vpairs: two vpermt2w per 32 dims of a pair of rows, the only reshuffle
 *           of the cache's bytes). Keys outside the visible range get P = 0 and V = 0.
 * Tiles (amx_on_rows; hr rows for 5, 6 and 7): 0, 1 S^T of keys 0-15, 16-31; 2, 3 their K; 4 Q^T,
 * then V pairs; 5 P; 6, 7 O. Chunks of up to 8 heads pack the block's scores into tile 0 instead
 * (keys 0-15 in columns 0-7, keys 16-31 in columns 8-15, through a second Q^T set in tile 1), so
 * their softmax takes 16 rows of exp2 and one transpose (deca_softmax_packed: 8:1 bf16 7% less
 * time per key in L2, 0.57 -> 0.59 of the stream from DRAM). The online softmax, the running
 * state and all sums stay fp32. */
#if defined(DA_AMX)
_Static_assert(DEC_BK == 32, "deca_group takes a block as two tiles of 16 keys and one reduction of 32");

/* Groups of 1 or 2 heads stay on the grouped FMA kernels, which read a 256K cache from DRAM
 * faster there (AMX host, 2:1 one / two threads: 0.86 / 0.86 of the stream against 0.81 / 0.80
 * on the tiles); from 3:1 on the tiles win (3:1 0.77 -> 0.82, 4:1 0.77 / 0.79 -> 0.81 / 0.83, 6:1
 * 0.66 -> 0.82; bench/results/decode-spr.md, "The tiles' pace"). Before the tiles' pace left out
 * the V pairs (deca_steps) the floor was 8: 4:1 was then 0.69 on the tiles. */
#define DECA_MIN_REP 3

/* Rows of the output tiles (query heads per chunk) when decode runs p on AMX, else 0. */
static int deca_rows(const da_kparams_t *p) {
  const int rep = p->H / p->G;
  if (!AMXDP((int)p->dtype) || p->D % 32 != 0 || rep < DECA_MIN_REP) return 0;
  return rep <= 16 ? rep : rep % 16 == 0 ? 16 : 0;
}

/* Floats of a chunk's Q^T tiles: D / 32 tiles of 16 pair rows x 16 heads; twice that for chunks of
 * up to 8 heads, whose second set has the heads in columns 8-15 (deca_group's packed scores). */
static size_t deca_qt_floats(int D, int hr) { return (size_t)D / 32 * 256 * (hr <= 8 ? 2 : 1); }

/* Q^T in pair layout for every chunk of hr heads of the nq query rows (bf16, row stride ldq, heads
 * of D packed): chunk x / hr (x = row * H + first head) at qt + (x / hr) * deca_qt_floats(D, hr),
 * tile c element [r][h] = (q[h][32c + 2r], q[h][32c + 2r + 1]); heads h >= hr zero (set 1: the
 * same with head h in column h + 8). */
static void deca_qt(const uint16_t *q, int64_t ldq, int64_t nq, int H, int D, int hr, uint32_t *qt) {
  const int sets = hr <= 8 ? 2 : 1;
  for (int64_t x = 0; x < nq * H; x += hr) {
    uint32_t *t = qt + (size_t)(x / hr) * deca_qt_floats(D, hr);
    for (int st = 0; st < sets; st++)
      for (int c = 0; c < D / 32; c++)
        for (int r = 0; r < 16; r++)
          for (int col = 0; col < 16; col++) {
            const int h = col - 8 * st; /* set 1: head h in column h + 8 */
            uint32_t pair = 0;
            if (h >= 0 && h < hr) {
              const uint16_t *qr = q + (x / H) * ldq + (x % H + h) * D + 32 * c + 2 * r;
              pair = (uint32_t)qr[0] | (uint32_t)qr[1] << 16;
            }
            t[((st * (D / 32) + c) * 16 + r) * 16 + col] = pair;
          }
  }
}

/* The B operands of P . V for a block: key rows 2r and 2r + 1 (r < 16) interleaved, dims in
 * tiles of 16: vp[(d / 16) * 256 + r * 16 + d % 16] = (V[2r][d], V[2r + 1][d]); keys outside
 * [lo, hi] read as 0. No prefetch requests here: the pacer's share of this burst of loads,
 * permutes and stores cost the tiles' decode its overlap (deca_steps). */
static void deca_vpairs(int D, const uint16_t *V, int64_t ldv, int64_t lo, int64_t hi, uint32_t *vp) {
  const __m512i lo16 = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi16 = _mm512_add_epi16(lo16, _mm512_set1_epi16(16));
  for (int r = 0; r < 16; r++) {
    const int64_t ja = 2 * r, jb = ja + 1;
    const int va = ja >= lo && ja <= hi, vb = jb >= lo && jb <= hi;
    for (int c = 0; c < D / 32; c++) {
      const __m512i x = va ? _mm512_loadu_si512(V + ja * ldv + 32 * c) : _mm512_setzero_si512();
      const __m512i y = vb ? _mm512_loadu_si512(V + jb * ldv + 32 * c) : _mm512_setzero_si512();
      _mm512_store_si512(vp + (size_t)(2 * c) * 256 + r * 16, _mm512_permutex2var_epi16(x, lo16, y));
      _mm512_store_si512(vp + (size_t)(2 * c + 1) * 256 + r * 16, _mm512_permutex2var_epi16(x, hi16, y));
    }
  }
}

/* The heads' new max from a block's lane max mx and score sum chk (a NaN score, which vmax may
 * drop, makes the max NaN): updates m[16], sets *use to the reference the weights take (0 for a
 * head that has seen nothing yet) and returns alpha, the factor of the old output and sum. */
static vf deca_new_max(vf mx, vf chk, float *m, vf *use) {
  mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(chk, chk, _CMP_UNORD_Q), chk);
  const vf mo = vload(m);
  const __mmask16 up = _mm512_cmp_ps_mask(mx, mo, _CMP_GT_OQ) | _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
  const vf mn = _mm512_mask_mov_ps(mo, up, mx);
  vstore(m, mn);
  *use = vreplace_eq(mn, -INFINITY, 0.0f);
  return vexp2(vsub(mo, *use));
}

/* The online softmax of 16 heads (lanes) over the raw scores ST [32 keys][16] of a block, keys
 * [lo, hi] visible, scaled by c2 into log2 units: updates the heads' max m[16] and sum l[16], as
 * decl_softmax does, returns the factors alpha that rescale the heads' outputs, and writes the
 * weights 2^(s - max) transposed and rounded to bf16: P [16 heads][32 keys], 0 for keys outside
 * [lo, hi]. One pass over the scores in registers. */
static vf deca_softmax(const float *ST, int64_t lo, int64_t hi, float c2, float *m, float *l, uint16_t *P) {
  const vf vc2 = vset1(c2), ninf = vset1(-INFINITY);
  vf x[32], mx = ninf, chk = vzero();
  for (int j = 0; j < 32; j++) {
    x[j] = j >= lo && j <= hi ? vmul(vload(ST + j * 16), vc2) : ninf;
    if (j >= lo && j <= hi) mx = vmax(mx, x[j]), chk = vadd(chk, x[j]);
  }
  vf use;
  const vf alpha = deca_new_max(mx, chk, m, &use);
  vf sum = vzero();
  __m512i r[2][16];
  for (int j = 0; j < 32; j++) {
    const vf e = vexp2(vsub(x[j], use));
    sum = vadd(sum, e);
    r[j / 16][j % 16] = _mm512_castps_si512(e);
  }
  vstore(l, vfma(vload(l), alpha, sum));
  transpose16(r[0]);
  transpose16(r[1]);
  for (int h = 0; h < 16; h++)
    _mm512_store_si512(P + h * 32,
                       (__m512i)_mm512_cvtne2ps_pbh(_mm512_castsi512_ps(r[1][h]), _mm512_castsi512_ps(r[0][h])));
  return alpha;
}

/* deca_softmax for chunks of up to 8 heads, whose scores come packed: ST [16 rows][16], row k
 * lanes h < 8 key k, lanes 8 + h key 16 + k (head h either way). Half the rows of exp2 and one
 * transpose; the state m, l [16] holds head h in lanes h and h + 8 alike. */
static vf deca_softmax_packed(const float *ST, int64_t lo, int64_t hi, float c2, float *m, float *l, uint16_t *P) {
  const vf vc2 = vset1(c2), ninf = vset1(-INFINITY);
  vf x[16], mx = ninf, chk = vzero();
  for (int k = 0; k < 16; k++) {
    const __mmask16 vis = (__mmask16)((k >= lo && k <= hi ? 0x00ff : 0) | (16 + k >= lo && 16 + k <= hi ? 0xff00 : 0));
    x[k] = _mm512_mask_mul_ps(ninf, vis, vload(ST + k * 16), vc2);
    mx = vmax(mx, x[k]), chk = _mm512_mask_add_ps(chk, vis, chk, x[k]);
  }
  /* both key halves of a head: lanes h and h + 8 */
  mx = vmax(mx, _mm512_shuffle_f32x4(mx, mx, 0x4e));
  chk = vadd(chk, _mm512_shuffle_f32x4(chk, chk, 0x4e));
  vf use;
  const vf alpha = deca_new_max(mx, chk, m, &use);
  vf sum = vzero();
  __m512i r[16];
  for (int k = 0; k < 16; k++) {
    const vf e = vexp2(vsub(x[k], use));
    sum = vadd(sum, e);
    r[k] = _mm512_castps_si512(e);
  }
  sum = vadd(sum, _mm512_shuffle_f32x4(sum, sum, 0x4e));
  vstore(l, vfma(vload(l), alpha, sum));
  transpose16(r); /* r[h]: head h, keys 0-15; r[8 + h]: head h, keys 16-31 */
  for (int h = 0; h < 8; h++)
    _mm512_store_si512(P + h * 32,
                       (__m512i)_mm512_cvtne2ps_pbh(_mm512_castsi512_ps(r[8 + h]), _mm512_castsi512_ps(r[h])));
  return alpha;
}

/* The scores and the online softmax of one chunk of hr heads against keys [lo, hi] of a block (in
 * the key tiles t0..t1 of ks, row strides ksb bytes), for deca_group: P [16][32] and the chunk's
 * m, l [hr] updated, ST [32][16] scratch; returns alpha. Chunks of up to 8 heads take the packed
 * scores (Q^T set 0 against keys 0-15 in tile 4, set 1 against keys 16-31 in tile 1, both into
 * tile 0), the others two score tiles (0, 1) against one Q^T tile. */
static vf deca_chunk_softmax(int D, int hr, const uint32_t *q, const uint16_t *const ks[2], const int64_t ksb[2],
                             int t0, int t1, int64_t lo, int64_t hi, float c2, float *m, float *l, float *ST,
                             uint16_t *P, dec_pf_t *f) {
  const int packed = hr <= 8;
  _tile_zero(0);
  _tile_zero(1);
  for (int c = 0; c < D / 32; c++) {
    dec_pf_steps(f, 1);
    _tile_loadd(4, q + c * 256, 64);
    if (t0 == 0) {
      _tile_loadd(2, ks[0] + 32 * c, ksb[0]);
      _tile_dpbf16ps(0, 2, 4);
    }
    if (t1 == 1 && packed) {
      _tile_loadd(1, q + (D / 32 + c) * 256, 64);
      _tile_loadd(3, ks[1] + 32 * c, ksb[1]);
      _tile_dpbf16ps(0, 3, 1);
    } else if (t1 == 1) {
      _tile_loadd(3, ks[1] + 32 * c, ksb[1]);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  _tile_stored(0, ST, 64);
  if (!packed) _tile_stored(1, ST + 16 * 16, 64);
  /* the state in lanes (packed: head h in lanes h and h + 8) */
  const __mmask16 mr = (__mmask16)((1u << hr) - 1);
  vf mv = _mm512_mask_loadu_ps(vset1(-INFINITY), mr, m), lv = _mm512_maskz_loadu_ps(mr, l);
  if (packed) mv = _mm512_shuffle_f32x4(mv, mv, 0x44), lv = _mm512_shuffle_f32x4(lv, lv, 0x44);
  float mh[16], lh[16];
  vstore(mh, mv), vstore(lh, lv);
  dec_pf_steps(f, 1);
  const vf alpha = packed ? deca_softmax_packed(ST, lo, hi, c2, mh, lh, P) : deca_softmax(ST, lo, hi, c2, mh, lh, P);
  _mm512_mask_storeu_ps(m, mr, vload(mh));
  _mm512_mask_storeu_ps(l, mr, vload(lh));
  return alpha;
}

/* The rep query heads of one group (one query row) against bf16 keys [lo, hi] of a block of nb
 * rows (K, V, row strides ldk, ldv elements), in chunks of hr heads: qt the group's Q^T tiles
 * (deca_qt), o [rep][ldo] unnormalized outputs, m, l [rep]; c2 = scale * log2(e); scr the
 * split's scratch (deca_scratch_bytes). Its inner steps advance the prefetch pf (deca_steps). */
static void deca_group(int D, int rep, int hr, const uint32_t *qt, const uint16_t *K, int64_t ldk, const uint16_t *V,
                       int64_t ldv, int nb, int64_t lo, int64_t hi, float c2, float *o, int64_t ldo, float *m,
                       float *l, char *scr, dec_pf_t *pfp) {
  uint32_t *vp = (uint32_t *)scr;                   /* [D / 16][16][16] */
  uint16_t *kt = (uint16_t *)(vp + (size_t)D * 16); /* [16][D] */
  float *ST = (float *)(kt + (size_t)16 * D);       /* [32][16] */
  uint16_t *P = (uint16_t *)(ST + 32 * 16);         /* [16][32] */
  dec_pf_t f = *pfp; /* in registers */
  deca_vpairs(D, V, ldv, lo, hi, vp);
  /* the tiles of 16 keys that hold [lo, hi]; one past the block's rows reads a zero-padded copy */
  const int t0 = (int)(lo / 16), t1 = (int)(hi / 16);
  const uint16_t *ks[2] = {K, K + 16 * ldk};
  int64_t ksb[2] = {ldk * 2, ldk * 2};
  if (16 * t1 + 16 > nb) {
    memset(kt, 0, (size_t)16 * D * 2);
    for (int j = 16 * t1; j < nb; j++) memcpy(kt + (size_t)(j - 16 * t1) * D, K + j * ldk, (size_t)D * 2);
    ks[t1] = kt, ksb[t1] = (int64_t)D * 2;
  }
  const __mmask16 mr = (__mmask16)((1u << hr) - 1);
  for (int h0 = 0; h0 < rep; h0 += hr) {
    const vf alpha = deca_chunk_softmax(D, hr, qt + (size_t)(h0 / hr) * deca_qt_floats(D, hr), ks, ksb, t0, t1, lo,
                                        hi, c2, m + h0, l + h0, ST, P, &f);
    float *oc = o + h0 * ldo;
    if (_mm512_mask_cmp_ps_mask(mr, alpha, vset1(1.0f), _CMP_NEQ_UQ)) {
      float a[16];
      vstore(a, alpha);
      for (int h = 0; h < hr; h++)
        for (int d = 0; d < D; d += 16) vstore(oc + h * ldo + d, vmul(vload(oc + h * ldo + d), vset1(a[h])));
    }
    /* O += P . V, two output tiles in flight (6, 7) */
    _tile_loadd(5, P, 64);
    for (int c = 0; c < D / 16; c += 2) {
      dec_pf_steps(&f, 1);
      _tile_loadd(6, oc + 16 * c, ldo * 4);
      _tile_loadd(4, vp + (size_t)c * 256, 64);
      _tile_dpbf16ps(6, 5, 4);
      _tile_loadd(7, oc + 16 * c + 16, ldo * 4);
      _tile_loadd(4, vp + (size_t)(c + 1) * 256, 64);
      _tile_dpbf16ps(7, 5, 4);
      _tile_stored(6, oc + 16 * c, ldo * 4);
      _tile_stored(7, oc + 16 * c + 16, ldo * 4);
    }
  }
  *pfp = f;
}

/* The inner steps of deca_group over a block for a group of rep heads in chunks of hr, the tile
 * phase's only: per chunk one per reduction step of the scores, one for the softmax and one per
 * two output tiles. The V pairs (deca_vpairs) take none: with a step per pair of keys as well,
 * 64% of the requests fell in that short burst of vector loads and stores, and the decode read
 * the 256K-key cache at 8:1 bf16 at 0.70 / 0.72 of the stream (AMX host, one / two threads), 16:1
 * at 0.67 / 0.69; with the requests over the tile phase alone, 0.87 / 0.86 and 0.80 / 0.81
 * (bench/results/decode-spr.md, "The tiles' pace"). */
static int64_t deca_steps(int D, int rep, int hr) { return rep / hr * (D / 32 + 1 + D / 32); }

/* Bytes of deca_group's scratch: V pairs [D / 16][16][16] and K rows [16][D] (both bf16 pairs or
 * elements), scores [32][16] fp32, P [16][32] bf16. */
static size_t deca_scratch_bytes(int D) { return (size_t)D * 64 + (size_t)D * 32 + 32 * 16 * 4 + 16 * 32 * 2; }
#endif /* DA_AMX */

/* The keys of a block (span ks, nb keys) that query position qp sees: indices [*lo, *hi] into
 * the block, *lo > *hi when none. */
static void dec_row_range(const da_mask_t *m, int64_t qp, da_span_t ks, int nb, int64_t *lo, int64_t *hi) {
  const da_tile_class_t cl = da_mask_classify(m, qp, qp, ks.start, da_span_last(ks));
  *lo = 0, *hi = nb - 1;
  if (cl == DA_TILE_EMPTY) *lo = 1, *hi = 0;
  else if (cl == DA_TILE_PARTIAL) {
    int64_t x, y;
    da_mask_row_range(m, qp, ks.start, da_span_last(ks), &x, &y);
    *lo = x <= ks.start ? 0 : (x - ks.start + ks.stride - 1) / ks.stride;
    *hi = y >= da_span_last(ks) ? nb - 1 : (y - ks.start) / ks.stride;
  }
}

/* Rows [lo, hi] of K and V (dtype dt, D elements from k0, v0, row strides ldk, ldv) as fp32 rows
 * of Dv (zero-padded) in kf, vf_. */
static void dec_convert(const char *k0, int64_t ldk, const char *v0, int64_t ldv, int dt, int D, int Dv, int64_t lo,
                        int64_t hi, float *kf, float *vf_) {
  const size_t es = dt == 0 ? 4 : 2;
  for (int64_t j = lo; j <= hi; j++)
    for (int x = 0; x < Dv; x += W) {
      vstore(kf + j * Dv + x, vload_dt(k0 + (size_t)(j * ldk + x) * es, dt, D - x));
      vstore(vf_ + j * Dv + x, vload_dt(v0 + (size_t)(j * ldv + x) * es, dt, D - x));
    }
}

/* Per-split scratch of decode_range, in floats: converted K and V rows [DEC_BK][Dv] each, scores
 * [rep][DEC_BK], alpha [rep] (rounded to 16 floats, so that every split's scratch stays aligned). */
static size_t dec_scratch_floats(int Dv, int rep) {
  return (2 * (size_t)DEC_BK * Dv + (size_t)rep * (DEC_BK + 1) + 15) / 16 * 16;
}

/* Fold keys [a, b) of page pg into the (o, m, l) state of nq query rows, all heads, log2 units.
 * qs, o [nq][H][Dv] (queries scaled, outputs unnormalized; rows padded to Dv = nvec * W; laid out
 * as dec_at says: heads-in-lanes when dec_lanes), m, l [nq][H]; scr: dec_scratch_floats(Dv, H / G).
 * Per block of keys, query row and KV head, the rep query heads of the group share every K and V
 * row (dec_group, or decl_group heads-in-lanes). npg: the page whose keys [0, nnext) the caller
 * folds next (NULL: none), so that the range's last block prefetches its first. */
static void decode_range(const da_kparams_t *p, const float *qs, const uint32_t *qt, int nvec, da_span_t qpos,
                         const da_kvpage_t *pg, int64_t a, int64_t b, const da_kvpage_t *npg, int64_t nnext,
                         float *o, float *m, float *l, float *scr) {
  const int H = p->H, G = p->G, D = p->D, rep = H / G, dt = (int)p->dtype, Dv = nvec * W;
#if defined(DA_AMX)
  const int hr = deca_rows(p); /* AMX groups: heads per output tile */
#endif
  /* Rows are read in place, in their dtype, when the head dim is whole vectors; otherwise the
   * last vector would run past the row (into the next head, or past the page), so the visible
   * rows of a block are converted to zero-padded fp32 once for the whole group. */
  const int lanes = dec_lanes(p), direct = D == Dv;
  const dec_fns_t *f = dec_fns[direct ? dt : 0];
  /* groups (and one fp32 head on the AVX-512 levels) take the pacer, one head the per-row burst */
  const int paced = rep > 1 || (DEC_PACE_ONE && dt == DA_FLOAT32);
  const size_t es = da_dtype_size(p->dtype);
  float *kf = scr, *vf_ = kf + (size_t)DEC_BK * Dv, *S = vf_ + (size_t)DEC_BK * Dv, *alpha = S + (size_t)rep * DEC_BK;
  const int64_t nq = qpos.count;
  int64_t rlo[16], rhi[16];
  for (int64_t j0 = a; j0 < b; j0 += DEC_BK) {
    const int nb = (int)lmin(DEC_BK, b - j0);
    const da_span_t ks = da_span_sub(pg->pos, j0, nb);
    const int64_t nn = lmin(DEC_BK, b - (j0 + DEC_BK)); /* rows of the next block (of this range) */
    for (int64_t i0 = 0; i0 < nq; i0 += 16) {
      const int ni = (int)lmin(16, nq - i0);
      int64_t ulo = nb, uhi = -1; /* union of the query rows' visible ranges */
      for (int ii = 0; ii < ni; ii++) {
        dec_row_range(&p->mask, da_span_at(qpos, i0 + ii), ks, nb, &rlo[ii], &rhi[ii]);
        if (rlo[ii] <= rhi[ii]) ulo = rlo[ii] < ulo ? rlo[ii] : ulo, uhi = rhi[ii] > uhi ? rhi[ii] : uhi;
      }
      if (ulo > uhi) continue;
      for (int g = 0; g < G; g++) {
        const char *k0 = head_row(p, pg->k, pg->ldk, j0, g), *v0 = head_row(p, pg->v, pg->ldv, j0, g);
        /* the next unit (dec_pf_t): head g + 1 of this block, or head 0 of the next block (nn rows),
         * or past the range's end head 0 of the next page's first block */
        const da_kvpage_t *up = pg;
        int ng = 0;
        int64_t nj = j0 + DEC_BK, nrows = nn;
        if (g + 1 < G) ng = g + 1, nj = j0, nrows = nb;
        else if (nn <= 0 && npg) up = npg, nj = 0, nrows = lmin(DEC_BK, nnext);
        const char *kn = nrows > 0 ? head_row(p, up->k, up->ldk, nj, ng) : k0;
        const char *vn = nrows > 0 ? head_row(p, up->v, up->ldv, nj, ng) : v0;
        const void *kb = k0, *vb = v0;
        int64_t ldk = pg->ldk, ldv = pg->ldv;
        if (!direct) {
          dec_convert(k0, pg->ldk, v0, pg->ldv, dt, D, Dv, ulo, uhi, kf, vf_);
          kb = kf, vb = vf_, ldk = ldv = Dv;
        }
        /* groups: the next unit's rows, requested once, over the first visible query row's steps (a
         * cursor that is done stays done for the later rows); one head (in-place rows only): each
         * row's twin in the next unit, as the first visible query row reads it, when the next unit
         * has every row this one reads */
        dec_pf_t pf = {.w = 2};
        if (rep == 1 && !paced && direct && nrows >= nb && i0 == 0 && up->ldk == pg->ldk && up->ldv == pg->ldv)
          pf.koff = kn - k0, pf.voff = vn - v0, pf.pfb = D * (int)es;
        int first = 1;
        for (int ii = 0; ii < ni; ii++) {
          if (rlo[ii] > rhi[ii]) continue;
          if (first && nrows > 0 && i0 == 0 && paced) {
            const int64_t nk = rhi[ii] - rlo[ii] + 1;
            int64_t steps = lanes ? decl_steps(Dv, rep, nk) : dec_steps(f, nvec, rep, nk);
#if defined(DA_AMX)
            if (hr) steps = deca_steps(D, rep, hr);
#endif
            dec_pf_start(&pf, steps, kn, up->ldk * (int64_t)es, vn, up->ldv * (int64_t)es, D * (int)es, nrows);
          }
          const int64_t x = (i0 + ii) * H + (int64_t)g * rep; /* first (row, head) of the group */
#if defined(DA_AMX)
          if (hr)
            deca_group(D, rep, hr, qt + (size_t)(x / hr) * deca_qt_floats(D, hr), kb, ldk, vb, ldv, nb, rlo[ii],
                       rhi[ii], p->scale * LOG2E, o + x * Dv, Dv, m + x, l + x, (char *)scr, &pf);
          else
#endif
          if (lanes)
            decl_group(Dv, rep, qs + x * Dv, kb, ldk, vb, ldv, rlo[ii], rhi[ii], o + x * Dv, m + x, l + x, S, &pf);
          else
            dec_group(f, nvec, rep, qs + x * Dv, kb, ldk, vb, ldv, rlo[ii], rhi[ii], o + x * Dv, m + x, l + x, S, alpha,
                      &pf);
          first = 0, pf.pfb = 0; /* the burst once per unit: with the first visible query row */
        }
      }
    }
  }
}

static da_status_t decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                          const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream) {
  (void)stream;
  const int H = p->H, D = p->D, dt = (int)p->dtype;
  const int nvec = (D + W - 1) / W, Dp = nvec * W; /* row length of the decode buffers */
  const int64_t nq = qpos.count, rows = nq * H;
  const size_t es = da_dtype_size(p->dtype);
  int64_t total = 0;
  for (int i = 0; i < npages; i++) total += pages[i].pos.count > 0 ? pages[i].pos.count : 0;
  const int nthr = nthreads_of(p);
  int64_t nsplit = (total + 255) / 256;
  if (nsplit > 4 * (int64_t)nthr) nsplit = 4 * (int64_t)nthr;
  if (nsplit < 1) nsplit = 1;
  /* Per split: o [nq][H][Dp] + m, l [nq][H]; plus the queries scaled into log2 units. */
  const size_t per = ((size_t)rows * (Dp + 2) + 15) / 16 * 16;
  size_t scr = dec_scratch_floats(Dp, H / p->G), nqt = 0;
#if defined(DA_AMX)
  /* AMX groups (deca_rows): their own scratch, and the queries as Q^T tiles after the splits' */
  const int hr = deca_rows(p);
  if (hr) {
    const size_t sa = (deca_scratch_bytes(D) / 4 + 15) / 16 * 16;
    scr = scr > sa ? scr : sa, nqt = (size_t)(rows / hr) * deca_qt_floats(D, hr);
  }
#endif
  float *buf = da_malloc((per * (size_t)nsplit + (size_t)rows * Dp + scr * (size_t)nsplit + nqt) * sizeof(float), 64);
  if (!buf) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "cpu decode: %lld splits", (long long)nsplit);
  float *qs = buf + per * (size_t)nsplit;
  uint32_t *qt = (uint32_t *)(buf + per * (size_t)nsplit + (size_t)rows * Dp + scr * (size_t)nsplit);
#if defined(DA_AMX)
  if (hr) deca_qt(q, ldq, nq, H, D, hr, qt);
#endif
  const float c2 = p->scale * LOG2E;
  const int lanes = dec_lanes(p); /* qs and the splits' outputs heads-in-lanes (dec_at) */
  for (int64_t r = 0; r < rows; r++)
    for (int d = 0; d < Dp; d++)
      qs[dec_at(lanes, r, d, Dp)] =
          d < D ? c2 * da_load_f32((const char *)q + (size_t)((r / H) * ldq + (r % H) * D) * es, dt, d) : 0.0f;
#pragma omp parallel for schedule(static) num_threads((int)lmin(nthr, nsplit))
  for (int64_t sp = 0; sp < nsplit; sp++) {
    float *so = buf + per * (size_t)sp, *sm = so + rows * Dp, *sl = sm + rows;
    float *ss = buf + per * (size_t)nsplit + (size_t)rows * Dp + scr * (size_t)sp;
#if defined(DA_AMX)
    if (hr) amx_on_rows((const uint8_t[8]){16, 16, 16, 16, 16, (uint8_t)hr, (uint8_t)hr, (uint8_t)hr});
#endif
    memset(so, 0, (size_t)rows * Dp * sizeof(float));
    for (int64_t r = 0; r < rows; r++) sm[r] = -INFINITY, sl[r] = 0.0f;
    /* This split's keys: [total * sp / nsplit, total * (sp + 1) / nsplit) of the concatenation. */
    const int64_t a = total * sp / nsplit, b = total * (sp + 1) / nsplit;
    int64_t base = 0;
    for (int pi = 0; pi < npages && base < b; pi++) {
      const int64_t n = pages[pi].pos.count > 0 ? pages[pi].pos.count : 0;
      const int64_t x = a > base ? a - base : 0, y = b - base < n ? b - base : n;
      if (x < y) {
        int qi = pi + 1; /* the next page with keys: the split reads it from its first key */
        while (qi < npages && pages[qi].pos.count <= 0) qi++;
        const int64_t nnext = qi < npages ? lmin(b - (base + n), pages[qi].pos.count) : 0;
        decode_range(p, qs, qt, nvec, qpos, &pages[pi], x, y, nnext > 0 ? &pages[qi] : NULL, nnext, so, sm, sl, ss);
      }
      base += n;
    }
#if defined(DA_AMX)
    if (hr) amx_off();
#endif
  }
  /* Combine the splits: o = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. */
  for (int64_t r = 0; r < rows; r++) {
    float M = -INFINITY; /* NaN-propagating max over the splits */
    for (int64_t sp = 0; sp < nsplit; sp++) {
      const float ms = buf[per * (size_t)sp + (size_t)rows * Dp + r];
      M = ms > M || ms != ms ? ms : M;
    }
    float *dst = o + r * D;
    memset(dst, 0, (size_t)D * sizeof(float));
    if (M == -INFINITY) {
      if (lse) lse[r] = -INFINITY;
      continue;
    }
    float L = 0.0f;
    for (int64_t sp = 0; sp < nsplit; sp++) {
      const float *so = buf + per * (size_t)sp;
      const float ms = so[rows * Dp + r], ls = so[rows * Dp + rows + r];
      if (ms == -INFINITY) continue;
      const float wgt = M != M ? M : exp2f(ms - M);
      L += wgt * ls;
      for (int d = 0; d < D; d++) dst[d] += wgt * so[dec_at(lanes, r, d, Dp)];
    }
    const float inv = 1.0f / L; /* L > 0 here unless an input holds NaN, which then propagates */
    for (int d = 0; d < D; d++) dst[d] *= inv;
    if (lse) lse[r] = (M + log2f(L)) * LN2;
  }
  da_free(buf);
  return DA_SUCCESS;
}

const da_kernels_t DA_CAT(da_cpu_impl_, DA_ISA) = {
    .name = "cpu-" DA_STR(DA_ISA),
    .supports = NULL,
    .fwd_block = fwd_block,
    .fwd_finish = fwd_finish,
    .merge = merge,
    .bwd_prep = bwd_prep,
    .bwd_block = bwd_block,
    .decode = decode,
};
