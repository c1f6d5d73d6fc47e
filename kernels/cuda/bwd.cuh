/* bwd.cuh: the backward block kernel of the CUDA backend (kernels.h bwd_block), FlashAttention-2
 * style, written once for nvcc and for the SIMT host build (tests/simt). The launch, the argument
 * checks and the template instantiations live in bwd.cu; this file holds the device code, its
 * tile geometry and step schedule. The per-lane fragment rules come from frag.cuh, the mask rules
 * (per-row key intervals on global positions, tile classes) from tile.cuh.
 *
 * One thread block owns one KV tile (BC = 64 key rows) of one KV head g and keeps its dK, dV in
 * registers while it walks every Q tile (BR rows) of every query head of g's GQA group (or of one
 * slice of the group, see hsplit):
 *   S^T  = K Q^T              (per warp: its 16 keys x BR queries, mma.sync m16n8k16)
 *   P^T  = exp2(S^T * scale*log2e - lse*log2e), 0 where the mask forbids
 *   dP^T = V dO^T
 *   dS^T = P^T o (dP^T - delta)
 *   dV  += P^T dO,  dK += dS^T Q          (A operands straight from the accumulators)
 *   dQ  += dS K                            (dS^T through shared memory; fp32 atomics into dq)
 * and at the end adds scale*dK, dV to its rows of dk, dv with plain read-modify-write: the block
 * is the only writer of those rows for that KV head (the GQA group's heads are summed in
 * registers, not with atomics), so dk/dv are deterministic and cost one pass per block. When
 * that leaves too few blocks to fill the device (few KV tiles, few KV heads: MQA), the launcher
 * splits each group's heads over hsplit blocks (grid z), which then add into dk/dv with fp32
 * atomics.
 * Masks are run-time values (tile.cuh da_dmask: flags, window, the documents of the launch's
 * query rows carried by value); a Q tile the mask hides from the KV tile is never loaded, a FULL
 * one runs without the element test.
 * Not here: a Hopper (wgmma) path. */
#ifndef DA_CUDA_BWD_CUH
#define DA_CUDA_BWD_CUH

#include "compat.cuh"
#include "ptx.cuh"
#include "frag.cuh"
#include "tile.cuh"

/* Tile geometry per head dim. Four warps; each warp owns 16 of the block's 64 keys. BR (Q rows
 * per step) is 64 for D = 64 and 32 for D = 128, so that the dK + dV accumulators (D floats per
 * thread) and the S^T, dP^T tiles (BR/2 floats each) fit in 255 registers without spilling. */
template <int D>
struct da_bwd_cfg {
  static constexpr int WARPS = 4;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int BC = 16 * WARPS;     /* key rows of a block */
  static constexpr int BR = D == 64 ? 64 : 32;
  /* Shared-memory row strides in halves: 8 halves (16 B) of padding per row put the eight rows
   * an ldmatrix phase reads in eight distinct 16-byte bank groups (conflict-free), and keep every
   * row 16-byte aligned for cp.async. */
  static constexpr int LD = D + 8;          /* K, V, Q, dO rows */
  static constexpr int LDS = BR + 8;        /* dS^T rows [BC][BR] */
  static constexpr int CH = D / 8;          /* 16-byte chunks per row */
  /* Byte offsets into the dynamic shared buffer. Q and dO have two stages (cp.async double
   * buffering); so has the per-row side information (lse, delta, visible key range). */
  static constexpr int K_OFF = 0;
  static constexpr int V_OFF = K_OFF + BC * LD * 2;
  static constexpr int Q_OFF = V_OFF + BC * LD * 2;
  static constexpr int DO_OFF = Q_OFF + 2 * BR * LD * 2;
  static constexpr int DS_OFF = DO_OFF + 2 * BR * LD * 2;
  static constexpr int ROW_OFF = DS_OFF + BC * LDS * 2;
  static constexpr int ROW_BYTES = BR * 16; /* float lse2, float delta, int jlo, int jhi */
  static constexpr int SMEM = ROW_OFF + 2 * ROW_BYTES;
  /* dQ = dS K: warps split the BR x D tile into 16-row blocks x (D / WPR)-column slabs. */
  static constexpr int WPR = WARPS / (BR / 16); /* warps per 16-row block */
  static constexpr int DQC = D / WPR;           /* dq columns per warp */
};

/* Kernel arguments (one struct, passed by value). Pointers are device memory. */
typedef struct da_bwd_args {
  const void *q, *dout, *k, *v;
  int64_t ldq, lddo, ldk, ldv;   /* row strides in elements */
  const float *lse, *delta;      /* [nq][H] */
  float *dq, *dk, *dv;           /* [nq][H][D], [nk][G][D], [nk][G][D]; accumulated */
  da_span_t qpos, kpos;
  da_dmask mask;                 /* mask with the documents of these query rows (tile.cuh) */
  int H, G;
  float scale;
  int vec;                       /* 1: every row of q, dout, k, v is 16-byte aligned (cp.async) */
  int hsplit;                    /* blocks per (KV tile, KV head), each a slice of the group's
                                    H/G query heads; > 1: dk, dv by atomics (1 <= hsplit <= H/G) */
} da_bwd_args_t;

/* ---- the kernel ----------------------------------------------------------------------------- */

/* Sub-span of rows [i0, i0 + n): da_span_sub of core/mask.h for device code (mask.h's helpers
 * are host-only C; tile.cuh's da_pos is da_span_at). */
DA_HD da_span_t da_bwd_sub(da_span_t s, int64_t i0, int64_t n) {
  da_span_t r;
  r.start = s.start + i0 * s.stride, r.stride = s.stride, r.count = n;
  return r;
}

/* Lane-place rules used below, all from frag.cuh (checked there against the PTX ISA tables):
 *   da_ldsm_x4_a  : A operand of a row-major [m][k] tile (K, V rows for S^T, dP^T);
 *   da_ldsm_x4_b  : two n8 B operands of an [n][k] tile (Q, dO rows for S^T = K Q^T); with .trans
 *                   the same lane rule yields the A operand of a tile stored [k][m] (dS^T for
 *                   dQ = dS K): the four 8x8 matrices are taken in the order (k0,m0) (k0,m0+8)
 *                   (k0+8,m0) (k0+8,m0+8), and .trans turns each into a[0..3];
 *   da_ldsm_x4_bt : two n8 B operands of a [k][n] tile with .trans (dO, Q for dV, dK; K for dQ);
 *   da_frag_c     : the (row, col) of accumulator element e. */

/* grid (KV tiles, G, hsplit), block THREADS, dynamic shared memory SMEM. */
template <int D, typename T>
DA_GLOBAL(da_bwd_cfg<D>::THREADS) void da_bwd_kernel(da_bwd_args_t a);

/* The query heads [*h0, *h1) of KV head g that block slice z of hsplit walks. */
DA_HD void da_bwd_heads(int H, int G, int g, int hsplit, int z, int *h0, int *h1) {
  const int rep = H / G;
  *h0 = g * rep + z * rep / hsplit, *h1 = g * rep + (z + 1) * rep / hsplit;
}

/* Copy rows [0, n) of a tile (row r at src + r * ld elements, D halves each) into shared rows of
 * LD halves; rows n..ROWS-1 are zero-filled. vec: 16-byte cp.async (lands at the caller's wait);
 * otherwise 2-byte loads and stores (row strides or bases that are not 16-byte aligned). */
template <int D, int ROWS>
DA_DEV void da_bwd_load_tile(uint16_t *dst, const uint16_t *src, int64_t ld, int n, int vec) {
  using C = da_bwd_cfg<D>;
  for (int c = threadIdx.x; c < ROWS * C::CH; c += C::THREADS) {
    const int r = c / C::CH, ch = c % C::CH;
    uint16_t *d = dst + r * C::LD + ch * 8;
    const uint16_t *s = src + (r < n ? (int64_t)r * ld + ch * 8 : 0);
    if (vec) {
      da_cp_async_16(d, s, r < n);
    } else {
      for (int i = 0; i < 8; i++) d[i] = r < n ? s[i] : (uint16_t)0;
    }
  }
}

/* Rows [i0, i1] (inclusive) of Q tile t. */
template <int D>
DA_DEV void da_bwd_qtile_rows(const da_bwd_args_t &a, int t, int64_t *i0, int64_t *i1) {
  constexpr int BR = da_bwd_cfg<D>::BR;
  *i0 = (int64_t)t * BR;
  *i1 = (*i0 + BR < a.qpos.count ? *i0 + BR : a.qpos.count) - 1;
}

/* Class (tile.cuh) of Q tile t against the key positions [k0, k1] of the block. */
template <int D>
DA_DEV int da_bwd_class(const da_bwd_args_t &a, int t, int64_t k0, int64_t k1) {
  int64_t i0, i1;
  da_bwd_qtile_rows<D>(a, t, &i0, &i1);
  return da_dmask_classify(a.mask, da_pos(a.qpos, i0), da_pos(a.qpos, i1), k0, k1);
}

/* The Q tiles [*ta, *tb] that see some key position in [k0, k1] (none: *ta > *tb). Both ends of a
 * row's visible interval are non-decreasing in the query position (tile.cuh da_row_range), so the
 * rows whose interval reaches up to k0 form a suffix and the rows whose interval starts by k1 a
 * prefix: two binary searches instead of a walk over every Q tile (a narrow window over a long
 * block would otherwise spend more time skipping tiles than computing). No tile in the range is
 * EMPTY (da_dmask_classify of its first and last rows), so every step does work. */
template <int D>
DA_DEV void da_bwd_qtile_range(const da_bwd_args_t &a, int64_t k0, int64_t k1, int *ta, int *tb) {
  constexpr int BR = da_bwd_cfg<D>::BR;
  int64_t lo, hi, l = 0, r = a.qpos.count;
  while (l < r) { /* first row with hi >= k0 */
    const int64_t m = l + (r - l) / 2;
    da_row_range(a.mask, da_pos(a.qpos, m), &lo, &hi);
    if (hi >= k0) r = m;
    else l = m + 1;
  }
  const int64_t ra = l;
  l = ra, r = a.qpos.count;
  while (l < r) { /* first row with lo > k1 */
    const int64_t m = l + (r - l) / 2;
    da_row_range(a.mask, da_pos(a.qpos, m), &lo, &hi);
    if (lo > k1) r = m;
    else l = m + 1;
  }
  const int64_t rb = l - 1;
  *ta = (int)(ra / BR), *tb = rb >= ra ? (int)(rb / BR) : *ta - 1;
}

/* Per-row side information of a stage: lse in log2 units, delta, the visible key indices. */
template <int D>
struct da_bwd_rows {
  float lse2[da_bwd_cfg<D>::BR], delta[da_bwd_cfg<D>::BR];
  int jlo[da_bwd_cfg<D>::BR], jhi[da_bwd_cfg<D>::BR];
};

/* Issue the loads of step s into one stage: Q and dO tiles (cp.async, or plain copies), and the
 * per-row side information (plain stores; published by the caller's barrier). ktile: the key
 * positions of the block's nk rows. */
template <int D>
DA_DEV void da_bwd_load_step(const da_bwd_args_t &a, int s, int ta, int nt, int h0, uint16_t *sq, uint16_t *sdo,
                             da_bwd_rows<D> *rows, da_span_t ktile) {
  using C = da_bwd_cfg<D>;
  const int h = h0 + s / nt;
  int64_t i0, i1;
  da_bwd_qtile_rows<D>(a, ta + s % nt, &i0, &i1);
  const int n = (int)(i1 - i0 + 1);
  da_bwd_load_tile<D, C::BR>(sq, (const uint16_t *)a.q + i0 * a.ldq + (int64_t)h * D, a.ldq, n, a.vec);
  da_bwd_load_tile<D, C::BR>(sdo, (const uint16_t *)a.dout + i0 * a.lddo + (int64_t)h * D, a.lddo, n, a.vec);
  const int r = threadIdx.x;
  if (r >= C::BR) return;
  if (r < n) {
    const int64_t i = i0 + r;
    const float L = a.lse[i * a.H + h];
    /* A row that sees no key at all (lse = -inf) gets +inf, so P = exp2(s - inf) = 0. */
    rows->lse2[r] = L == -INFINITY ? INFINITY : L * 1.4426950408889634f;
    rows->delta[r] = a.delta[i * a.H + h];
    int64_t jlo, jhi;
    da_row_keys(a.mask, da_pos(a.qpos, i), ktile, &jlo, &jhi);
    rows->jlo[r] = (int)jlo, rows->jhi[r] = (int)jhi;
  } else { /* padding rows of the last Q tile: zero Q, dO; no probability */
    rows->lse2[r] = INFINITY, rows->delta[r] = 0.0f, rows->jlo[r] = C::BC, rows->jhi[r] = -1;
  }
}

template <int D, typename T>
DA_GLOBAL(da_bwd_cfg<D>::THREADS) void da_bwd_kernel(da_bwd_args_t a) {
  using C = da_bwd_cfg<D>;
  using Tag = typename da_tag_of<T>::type;
  constexpr int BR = C::BR, BC = C::BC, LD = C::LD, LDS = C::LDS;
  constexpr int NS = BR / 8;   /* n8 tiles of S^T per warp (queries) */
  constexpr int ND = D / 8;    /* n8 tiles of dK, dV per warp (head dim) */
  constexpr int NQ = C::DQC / 8;
  static_assert(C::ROW_BYTES == sizeof(da_bwd_rows<D>), "row side information layout");
  DA_DYN_SMEM(unsigned char, smem);
  uint16_t *sK = (uint16_t *)(smem + C::K_OFF), *sV = (uint16_t *)(smem + C::V_OFF);
  uint16_t *sQ = (uint16_t *)(smem + C::Q_OFF), *sdO = (uint16_t *)(smem + C::DO_OFF);
  uint16_t *sdS = (uint16_t *)(smem + C::DS_OFF);
  da_bwd_rows<D> *sRows = (da_bwd_rows<D> *)(smem + C::ROW_OFF);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = blockIdx.y;
  int h0, h1;
  da_bwd_heads(a.H, a.G, g, a.hsplit, blockIdx.z, &h0, &h1);
  const int64_t j0 = (int64_t)blockIdx.x * BC;
  const int nk = (int)(a.kpos.count - j0 < BC ? a.kpos.count - j0 : BC);
  const da_span_t ktile = da_bwd_sub(a.kpos, j0, nk);
  const int64_t k0 = ktile.start, k1 = da_pos(ktile, nk - 1);
  /* Steps s = (h - h0) * nt + (t - ta): every (query head h in [h0, h1), Q tile t in [ta, tb]). */
  int ta, tb;
  da_bwd_qtile_range<D>(a, k0, k1, &ta, &tb);
  const int nt = tb - ta + 1, nsteps = (h1 - h0) * nt;
  if (nt <= 0 || h1 <= h0) return; /* the mask hides this KV tile from every query: nothing to add */

  /* Prologue: K, V of the tile and the first step's Q, dO in one cp.async group. */
  da_bwd_load_tile<D, BC>(sK, (const uint16_t *)a.k + j0 * a.ldk + (int64_t)g * D, a.ldk, nk, a.vec);
  da_bwd_load_tile<D, BC>(sV, (const uint16_t *)a.v + j0 * a.ldv + (int64_t)g * D, a.ldv, nk, a.vec);
  da_bwd_load_step<D>(a, 0, ta, nt, h0, sQ, sdO, sRows, ktile);
  da_cp_async_commit();

  float dk[ND][4], dv[ND][4];
  for (int i = 0; i < ND; i++)
    for (int e = 0; e < 4; e++) dk[i][e] = 0.0f, dv[i][e] = 0.0f;

  const float c2 = a.scale * 1.4426950408889634f;
  /* This lane's two key rows of the tile in the S^T accumulators. Rows past nk are padding (zero
   * K, V) and get no probability: exp2(0 - lse2) could overflow. */
  const int kr0 = warp * 16 + da_frag_c(lane, 0).row, kr1 = kr0 + 8;
  const bool kv0 = kr0 < nk, kv1 = kr1 < nk;
  int stage = 0;
  for (int s = 0; s < nsteps; s++) {
    const int h = h0 + s / nt, t = ta + s % nt;
    const bool partial = da_bwd_class<D>(a, t, k0, k1) != DA_TILE_FULL;
    /* Prefetch the next step into the other stage while this one computes. That stage was last
     * read before the middle barrier of the previous step, which every thread has passed. */
    if (s + 1 < nsteps) {
      da_bwd_load_step<D>(a, s + 1, ta, nt, h0, sQ + (stage ^ 1) * BR * LD, sdO + (stage ^ 1) * BR * LD,
                          sRows + (stage ^ 1), ktile);
      da_cp_async_commit();
      da_cp_async_wait<1>();
    } else {
      da_cp_async_wait<0>();
    }
    /* Publishes this stage's tiles and rows, and orders the previous step's dQ reads of sdS
     * before this step's writes. */
    __syncthreads();
    const uint16_t *q_s = sQ + stage * BR * LD, *do_s = sdO + stage * BR * LD;
    const da_bwd_rows<D> &rw = sRows[stage];

    /* S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BR queries. */
    float sacc[NS][4], pacc[NS][4];
    for (int i = 0; i < NS; i++)
      for (int e = 0; e < 4; e++) sacc[i][e] = 0.0f, pacc[i][e] = 0.0f;
    for (int kd = 0; kd < D / 16; kd++) {
      uint32_t ak[4], av[4];
      const da_rc pa_ = da_ldsm_x4_a(lane);
      const int ao = (warp * 16 + pa_.row) * LD + kd * 16 + pa_.col;
      da_ldmatrix_x4(ak, sK + ao);
      da_ldmatrix_x4(av, sV + ao);
      for (int np = 0; np < NS / 2; np++) {
        uint32_t bq[4], bo[4];
        const da_rc pb = da_ldsm_x4_b(lane);
        const int bo_ = (np * 16 + pb.row) * LD + kd * 16 + pb.col;
        da_ldmatrix_x4(bq, q_s + bo_);
        da_ldmatrix_x4(bo, do_s + bo_);
        da_mma_16816(sacc[2 * np], ak, bq, Tag());
        da_mma_16816(sacc[2 * np + 1], ak, bq + 2, Tag());
        da_mma_16816(pacc[2 * np], av, bo, Tag());
        da_mma_16816(pacc[2 * np + 1], av, bo + 2, Tag());
      }
    }

    /* P^T and dS^T in place (sacc <- P, pacc <- dS). */
    for (int i = 0; i < NS; i++)
      for (int e = 0; e < 4; e++) {
        const int qi = i * 8 + da_frag_c(lane, e).col, kj = e < 2 ? kr0 : kr1;
        const float p = da_exp2(sacc[i][e] * c2 - rw.lse2[qi]);
        bool keep = e < 2 ? kv0 : kv1;
        if (partial) keep = keep && kj >= rw.jlo[qi] && kj <= rw.jhi[qi];
        sacc[i][e] = keep ? p : 0.0f;
        pacc[i][e] = sacc[i][e] * (pacc[i][e] - rw.delta[qi]);
      }
    /* ... as A operands (16 keys x BR queries): accumulator tiles 2kk, 2kk+1 are k-step kk. */
    uint32_t pa[BR / 16][4], sa[BR / 16][4];
    for (int kk = 0; kk < BR / 16; kk++)
      for (int x = 0; x < 4; x++) {
        const int i = 2 * kk + (x >> 1), e = (x & 1) * 2;
        pa[kk][x] = da_pack2(sacc[i][e], sacc[i][e + 1], Tag());
        sa[kk][x] = da_pack2(pacc[i][e], pacc[i][e + 1], Tag());
      }
    /* dS^T to shared memory for dQ: each register holds two adjacent queries of one key row. */
    for (int kk = 0; kk < BR / 16; kk++)
      for (int x = 0; x < 4; x++) {
        const int c = kk * 16 + (x >> 1) * 8 + da_frag_c(lane, 0).col;
        *(uint32_t *)(sdS + ((x & 1) ? kr1 : kr0) * LDS + c) = sa[kk][x];
      }

    /* dV += P^T dO, dK += dS^T Q: B operands from the [q][d] tiles with ldmatrix.trans. */
    for (int kk = 0; kk < BR / 16; kk++)
      for (int np = 0; np < ND / 2; np++) {
        uint32_t bo[4], bq[4];
        const da_rc pb = da_ldsm_x4_bt(lane);
        const int off = (kk * 16 + pb.row) * LD + np * 16 + pb.col;
        da_ldmatrix_x4_trans(bo, do_s + off);
        da_ldmatrix_x4_trans(bq, q_s + off);
        da_mma_16816(dv[2 * np], pa[kk], bo, Tag());
        da_mma_16816(dv[2 * np + 1], pa[kk], bo + 2, Tag());
        da_mma_16816(dk[2 * np], sa[kk], bq, Tag());
        da_mma_16816(dk[2 * np + 1], sa[kk], bq + 2, Tag());
      }
    __syncthreads(); /* sdS complete */

    /* dQ (BR x D) += dS (BR x BC) K (BC x D): this warp's 16 rows x DQC columns; then
     * scale * dQ into dq with fp32 atomics (every KV tile of every block adds into these rows). */
    {
      const int rb = (warp / C::WPR) * 16, cb = (warp % C::WPR) * C::DQC;
      float qacc[NQ][4];
      for (int i = 0; i < NQ; i++)
        for (int e = 0; e < 4; e++) qacc[i][e] = 0.0f;
      for (int kk = 0; kk < BC / 16; kk++) {
        uint32_t as[4];
        const da_rc pt = da_ldsm_x4_b(lane), pb = da_ldsm_x4_bt(lane);
        da_ldmatrix_x4_trans(as, sdS + (kk * 16 + pt.row) * LDS + rb + pt.col);
        for (int np = 0; np < NQ / 2; np++) {
          uint32_t bk[4];
          da_ldmatrix_x4_trans(bk, sK + (kk * 16 + pb.row) * LD + cb + np * 16 + pb.col);
          da_mma_16816(qacc[2 * np], as, bk, Tag());
          da_mma_16816(qacc[2 * np + 1], as, bk + 2, Tag());
        }
      }
      int64_t i0, i1;
      da_bwd_qtile_rows<D>(a, t, &i0, &i1);
      for (int e = 0; e < 4; e++) {
        const da_rc pc = da_frag_c(lane, e);
        const int64_t i = i0 + rb + pc.row;
        if (i > i1) continue;
        float *row = a.dq + (i * a.H + h) * D + cb + pc.col;
        for (int n = 0; n < NQ; n++) atomicAdd(row + n * 8, a.scale * qacc[n][e]);
      }
    }
    stage ^= 1;
  }

  /* dk += scale * dK, dv += dV on the tile's rows of KV head g: this block's rows alone, unless
   * the group's heads are split over several blocks. */
  for (int e = 0; e < 4; e++) {
    const da_rc pc = da_frag_c(lane, e);
    const int r = warp * 16 + pc.row;
    if (r >= nk) continue;
    float *dkr = a.dk + ((j0 + r) * a.G + g) * D + pc.col, *dvr = a.dv + ((j0 + r) * a.G + g) * D + pc.col;
    if (a.hsplit > 1) {
      for (int n = 0; n < ND; n++) {
        atomicAdd(dkr + n * 8, a.scale * dk[n][e]);
        atomicAdd(dvr + n * 8, dv[n][e]);
      }
    } else {
      for (int n = 0; n < ND; n++) {
        dkr[n * 8] += a.scale * dk[n][e];
        dvr[n * 8] += dv[n][e];
      }
    }
  }
}

#endif /* DA_CUDA_BWD_CUH */
