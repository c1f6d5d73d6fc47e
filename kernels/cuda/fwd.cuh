/* fwd.cuh: the FlashAttention-2 style forward block kernel of the CUDA backend (fwd_block of
 * kernels.h): one CUDA block folds every KV tile a query tile of 64 rows may see, for one query
 * head, into the fp32 running state (o, m, l) kept in global memory between calls. Tensor cores
 * through mma.sync m16n8k16 (bf16 or fp16 in, fp32 accumulate), fragments loaded with ldmatrix,
 * K/V tiles streamed by cp.async into two shared-memory stages. Not the launcher (fwd.cu).
 *
 * Layout of one block (4 warps, 128 threads): warp w owns query rows [16w, 16w + 16) of the tile;
 * lane l holds rows l/4 and l/4 + 8 of that slice (the mma C-fragment rows), so row max and row
 * sum reduce over the 4 lanes of a quad. The state keeps m in log2 units: scores are
 * s = (scale * log2 e) q.k, probabilities exp2(s - m). 1/l is applied only by fwd_finish. */
#ifndef DA_CUDA_FWD_CUH
#define DA_CUDA_FWD_CUH

#include "compat.cuh"
#include "ptx.cuh"
#include "tile.cuh"

#define DA_FWD_BQ 64       /* query rows per block */
#define DA_FWD_BK 64       /* keys per KV tile */
#define DA_FWD_THREADS 128 /* 4 warps x 16 query rows */

/* Everything a launch needs, passed by value. Pointers are device memory; q, k, v rows have
 * strides ldq, ldk, ldv in elements (heads packed, head stride D); q_al etc. say whether every
 * row start is 16-byte aligned (then tiles stream through cp.async; otherwise a slower path
 * loads them element by element, same results). o/m/l are the state rows of this launch's
 * queries (o [nq][H][D], m and l [nq][H]). */
struct da_fwd_args {
  const void *q, *k, *v;
  int64_t ldq, ldk, ldv;
  da_span_t qpos, kpos;
  float *o, *m, *l;
  int H, G;
  float scale_log2; /* scale * log2(e) */
  int q_al, k_al, v_al;
  da_dmask mask;
};

/* Shared memory of one block: Q [64][D], K [2][64][D], V [2][64][D], 16-bit elements. */
__host__ __device__ constexpr int da_fwd_smem_bytes(int D) { return (DA_FWD_BQ + 4 * DA_FWD_BK) * D * 2; }

/* Rows of a tile in shared memory hold D 16-bit elements as D/8 chunks of 16 bytes; chunk c of
 * row r sits at chunk c ^ (r % 8), so the 8 rows an ldmatrix phase reads hit 8 different bank
 * groups. Returns the element offset of (row, chunk). */
DA_HD int da_fwd_smem_at(int D, int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }

/* Copy rows [0, n) of a [64][D] tile from global (row stride ld elements) into shared memory;
 * rows n..63 become zeros (tails: their scores are masked, their V rows multiply zeros). */
template <int D>
DA_DEV void da_fwd_load_tile(uint16_t *tile, const uint16_t *g, int64_t ld, int n, int aligned, int tid) {
  constexpr int CH = D / 8, RSTEP = DA_FWD_THREADS / CH; /* a thread copies chunk tid % CH of every RSTEP-th row */
  const int ch = tid % CH, row0 = tid / CH;
  const uint16_t *src = g + row0 * ld + ch * 8;
  const int64_t step = RSTEP * ld;
#pragma unroll
  for (int i = 0; i < DA_FWD_BK / RSTEP; i++, src += step) {
    const int row = row0 + i * RSTEP;
    uint16_t *dst = tile + da_fwd_smem_at(D, row, ch);
    const bool in = row < n;
    if (aligned) {
      da_cp_async_16(dst, in ? src : g, in);
    } else { /* rows not 16-byte aligned: plain 2-byte loads, stored before the stage is read */
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; e++) w[e] = in ? (uint32_t)src[2 * e] | ((uint32_t)src[2 * e + 1] << 16) : 0u;
      uint32_t *d32 = (uint32_t *)dst;
#pragma unroll
      for (int e = 0; e < 4; e++) d32[e] = w[e];
    }
  }
}

// budget: da_fwd_kernel sm_80 REG<=192 SHARED<=0
// budget: da_fwd_kernel sm_90a REG<=232 SHARED<=1024
template <int D, typename T>
DA_GLOBAL(DA_FWD_THREADS) void da_fwd_kernel(const da_fwd_args a) {
  typedef typename da_tag_of<T>::type Tag;
  constexpr int BQ = DA_FWD_BQ, BK = DA_FWD_BK, KS = D / 16, NB = BK / 8, ND = D / 8;
  DA_DYN_SMEM(uint16_t, smem);
  uint16_t *Qs = smem, *Ks = smem + BQ * D, *Vs = Ks + 2 * BK * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y, g = h / (a.H / a.G);
  /* later query tiles first: under a causal mask they hold the most work */
  const int64_t r0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BQ;
  const int nq = (int)(a.qpos.count - r0 < BQ ? a.qpos.count - r0 : BQ);
  const da_qtile_keys tk = da_qtile_keys_of(a.mask, da_pos(a.qpos, r0), da_pos(a.qpos, r0 + nq - 1), a.kpos);
  if (tk.first_lo > tk.last_hi) return; /* the mask hides every key from this tile */
  const int t0 = (int)(tk.first_lo / BK), t1 = (int)(tk.last_hi / BK);
  const int nk = (int)a.kpos.count;

  /* this lane's two rows and their allowed key indices */
  int row[2], jlo[2], jhi[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    row[i] = warp * 16 + lane / 4 + 8 * i;
    int64_t lo = 1, hi = 0;
    if (row[i] < nq) da_row_keys(a.mask, da_pos(a.qpos, r0 + row[i]), a.kpos, &lo, &hi);
    jlo[i] = (int)lo, jhi[i] = (int)hi;
  }

  const uint16_t *qg = (const uint16_t *)a.q + r0 * a.ldq + (int64_t)h * D;
  const uint16_t *kg = (const uint16_t *)a.k + (int64_t)g * D, *vg = (const uint16_t *)a.v + (int64_t)g * D;
  da_fwd_load_tile<D>(Qs, qg, a.ldq, nq, a.q_al, tid);
  {
    const int n = nk - t0 * BK < BK ? nk - t0 * BK : BK;
    da_fwd_load_tile<D>(Ks, kg + (int64_t)t0 * BK * a.ldk, a.ldk, n, a.k_al, tid);
    da_fwd_load_tile<D>(Vs, vg + (int64_t)t0 * BK * a.ldv, a.ldv, n, a.v_al, tid);
  }
  da_cp_async_commit();

  /* running state of this lane's rows: o (C fragments over D), m, and this lane's share of l
   * (the quad's four shares are summed once at the end) */
  float acc[ND][4], mrow[2], lrow[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int64_t sr = (r0 + row[i]) * a.H + h;
    const bool ok = row[i] < nq;
    mrow[i] = ok ? a.m[sr] : -INFINITY;
    lrow[i] = ok && lane % 4 == 0 ? a.l[sr] : 0.0f;
#pragma unroll
    for (int n = 0; n < ND; n++) {
      const int d = n * 8 + (lane % 4) * 2;
      acc[n][2 * i] = ok ? a.o[sr * D + d] : 0.0f;
      acc[n][2 * i + 1] = ok ? a.o[sr * D + d + 1] : 0.0f;
    }
  }

  for (int t = t0; t <= t1; t++) {
    const int stage = (t - t0) & 1;
    if (t < t1) { /* the next tile streams in while this one computes */
      const int n = nk - (t + 1) * BK < BK ? nk - (t + 1) * BK : BK;
      da_fwd_load_tile<D>(Ks + (stage ^ 1) * BK * D, kg + (int64_t)(t + 1) * BK * a.ldk, a.ldk, n, a.k_al, tid);
      da_fwd_load_tile<D>(Vs + (stage ^ 1) * BK * D, vg + (int64_t)(t + 1) * BK * a.ldv, a.ldv, n, a.v_al, tid);
    }
    da_cp_async_commit();   /* (an empty group on the last tile keeps the count uniform) */
    da_cp_async_wait<1>();  /* everything but the newest group: this tile (and Q) landed */
    __syncthreads();
    const uint16_t *Kt = Ks + stage * BK * D, *Vt = Vs + stage * BK * D;

    /* S = Q K^T for this warp's 16 rows x 64 keys */
    float s[NB][4];
#pragma unroll
    for (int n = 0; n < NB; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
      uint32_t qf[4]; /* Q fragments are re-read from shared memory: registers go to O and S */
      da_ldmatrix_x4(qf, Qs + da_fwd_smem_at(D, warp * 16 + lane % 16, 2 * kk + lane / 16));
#pragma unroll
      for (int n2 = 0; n2 < NB / 2; n2++) {
        uint32_t b[4];
        const int r = 16 * n2 + lane % 8 + (lane / 16) * 8;
        da_ldmatrix_x4(b, Kt + da_fwd_smem_at(D, r, 2 * kk + (lane / 8) % 2));
        da_mma_16816(s[2 * n2], qf, b, Tag());
        da_mma_16816(s[2 * n2 + 1], qf, b + 2, Tag());
      }
    }

    /* scores in log2 units; outside FULL tiles, keys the mask hides (and tail keys) get -inf */
    const bool full = da_ktile_full(tk, (int64_t)t * BK, (int64_t)t * BK + BK - 1);
#pragma unroll
    for (int n = 0; n < NB; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float x = s[n][e] * a.scale_log2;
        if (!full) {
          const int j = t * BK + n * 8 + (lane % 4) * 2 + (e & 1), i = e >> 1;
          x = j >= jlo[i] && j <= jhi[i] ? x : -INFINITY;
        }
        s[n][e] = x;
      }

    /* online softmax: new row max over the quad, rescale, P = exp2(S - max) */
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NB; n++) mx = da_fmax_nan(mx, da_fmax_nan(s[n][2 * i], s[n][2 * i + 1]));
      mx = da_fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = da_fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      float use, alpha;
      mrow[i] = da_softmax_fold(mrow[i], mx, &use, &alpha);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < NB; n++) {
        s[n][2 * i] = da_exp2(s[n][2 * i] - use);
        s[n][2 * i + 1] = da_exp2(s[n][2 * i + 1] - use);
        sum += s[n][2 * i] + s[n][2 * i + 1];
      }
      lrow[i] = lrow[i] * alpha + sum;
#pragma unroll
      for (int n = 0; n < ND; n++) acc[n][2 * i] *= alpha, acc[n][2 * i + 1] *= alpha;
    }

    /* O += P V: P (the S accumulators, rounded to T) is already an A fragment */
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      uint32_t pa[4];
      pa[0] = da_pack2(s[2 * kk][0], s[2 * kk][1], Tag());
      pa[1] = da_pack2(s[2 * kk][2], s[2 * kk][3], Tag());
      pa[2] = da_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], Tag());
      pa[3] = da_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], Tag());
#pragma unroll
      for (int n2 = 0; n2 < ND / 2; n2++) {
        uint32_t b[4];
        const int r = 16 * kk + lane % 8 + ((lane / 8) % 2) * 8;
        da_ldmatrix_x4_trans(b, Vt + da_fwd_smem_at(D, r, 2 * n2 + lane / 16));
        da_mma_16816(acc[2 * n2], pa, b, Tag());
        da_mma_16816(acc[2 * n2 + 1], pa, b + 2, Tag());
      }
    }
    __syncthreads(); /* this stage is refilled by the next iteration's loads */
  }

  /* state back to global memory: l summed over the quad first */
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float l = lrow[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (row[i] >= nq) continue;
    const int64_t sr = (r0 + row[i]) * a.H + h;
    if (lane % 4 == 0) a.m[sr] = mrow[i], a.l[sr] = l;
#pragma unroll
    for (int n = 0; n < ND; n++) {
      const int d = n * 8 + (lane % 4) * 2;
      a.o[sr * D + d] = acc[n][2 * i];
      a.o[sr * D + d + 1] = acc[n][2 * i + 1];
    }
  }
}

#endif /* DA_CUDA_FWD_CUH */
