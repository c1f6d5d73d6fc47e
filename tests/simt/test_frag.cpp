/* test_frag.cpp: frag.cuh against the PTX ISA's fragment tables (written out once below), the SIMT
 * emulation of ldmatrix against the ISA's ldmatrix definition, the ldmatrix address rules of
 * frag.cuh (plain and swizzled tiles), and the emulated mma.sync m16n8k16 (bf16, fp16; direct
 * fragments and ldmatrix x2/x4/trans chains) against a float64 GEMM on fresh random inputs.
 * Modes: all; plant_map (a wrong A map must be caught by both the table check and the GEMM check). */
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simt_test.h"

/* ======================= the PTX ISA, written out once =======================
 * PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16 / .bf16):
 *   groupID = %laneid >> 2, threadID_in_group = %laneid % 4
 *   A (a0..a7, two per .f16x2 register, low half first):
 *     row = groupID      for ai where 0 <= i < 2 || 4 <= i < 6
 *           groupID + 8  otherwise
 *     col = (threadID_in_group * 2) + (i & 0x1)      for ai where i < 4
 *           (threadID_in_group * 2) + (i & 0x1) + 8  for ai where i >= 4
 *   B (b0..b3):
 *     row = (threadID_in_group * 2) + (i & 0x1)      for bi where i < 2
 *           (threadID_in_group * 2) + (i & 0x1) + 8  for bi where i >= 2
 *     col = groupID
 *   C, D (c0..c3, fp32):
 *     row = groupID      for ci where i < 2
 *           groupID + 8  for ci where i >= 2
 *     col = (threadID_in_group * 2) + (i & 0x1)
 * Rows of the ISA's figures (cell = Tlane:element), read left to right: */
static const char *kFigA[][2] = {
    {"0", "T0:a0 T0:a1 T1:a0 T1:a1 T2:a0 T2:a1 T3:a0 T3:a1 T0:a4 T0:a5 T1:a4 T1:a5 T2:a4 T2:a5 T3:a4 T3:a5"},
    {"8", "T0:a2 T0:a3 T1:a2 T1:a3 T2:a2 T2:a3 T3:a2 T3:a3 T0:a6 T0:a7 T1:a6 T1:a7 T2:a6 T2:a7 T3:a6 T3:a7"},
    {"15", "T28:a2 T28:a3 T29:a2 T29:a3 T30:a2 T30:a3 T31:a2 T31:a3 T28:a6 T28:a7 T29:a6 T29:a7 T30:a6 T30:a7 T31:a6 T31:a7"},
};
static const char *kFigB[][2] = {
    {"0", "T0:b0 T4:b0 T8:b0 T12:b0 T16:b0 T20:b0 T24:b0 T28:b0"},
    {"1", "T0:b1 T4:b1 T8:b1 T12:b1 T16:b1 T20:b1 T24:b1 T28:b1"},
    {"9", "T0:b3 T4:b3 T8:b3 T12:b3 T16:b3 T20:b3 T24:b3 T28:b3"},
    {"15", "T3:b3 T7:b3 T11:b3 T15:b3 T19:b3 T23:b3 T27:b3 T31:b3"},
};
static const char *kFigC[][2] = {
    {"0", "T0:c0 T0:c1 T1:c0 T1:c1 T2:c0 T2:c1 T3:c0 T3:c1"},
    {"15", "T28:c2 T28:c3 T29:c2 T29:c3 T30:c2 T30:c3 T31:c2 T31:c3"},
};

static da_rc isa_a(int laneid, int i) {
  int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  int row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? groupID : groupID + 8;
  int col = i < 4 ? (threadID_in_group * 2) + (i & 0x1) : (threadID_in_group * 2) + (i & 0x1) + 8;
  return {row, col};
}
static da_rc isa_b(int laneid, int i) {
  int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  int row = i < 2 ? (threadID_in_group * 2) + (i & 0x1) : (threadID_in_group * 2) + (i & 0x1) + 8;
  return {row, groupID};
}
static da_rc isa_c(int laneid, int i) {
  int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  return {i < 2 ? groupID : groupID + 8, (threadID_in_group * 2) + (i & 0x1)};
}
/* ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"), .m8n8 .b16: threads 0-7,
 * 8-15, 16-23, 24-31 supply the row addresses of matrices 0..3 (x2: threads 0-15; x1: 0-7); each
 * destination register i receives matrix i, thread t holding its row t / 4, elements 2 (t % 4) and
 * 2 (t % 4) + 1 (low half first). With .trans the matrix is read column-major: thread t holds
 * column t / 4, rows 2 (t % 4) and 2 (t % 4) + 1. */

/* The planted bug of mode plant_map: registers a[1] and a[2] swapped (rows + 8 taken for cols + 8). */
static da_rc planted_a(int lane, int e) {
  int r = e / 2;
  int swapped = r == 1 ? 2 : r == 2 ? 1 : r;
  return isa_a(lane, swapped * 2 + e % 2);
}

typedef da_rc (*map_fn)(int, int);

/* Compares a map with the ISA over every lane and element, checks it covers the tile exactly once,
 * and holds it against the figure rows. Returns the number of disagreements. */
static int compare_map(const char *what, map_fn f, map_fn isa, int nelem, int rows, int cols,
                       const char *(*fig)[2], int nfig, char letter) {
  int bad = 0;
  std::vector<int> seen(rows * cols, 0);
  for (int lane = 0; lane < 32; lane++)
    for (int e = 0; e < nelem; e++) {
      da_rc p = f(lane, e), q = isa(lane, e);
      if (p.row != q.row || p.col != q.col) {
        if (bad < 5)
          fprintf(stderr, "%s: lane %d element %d: (%d, %d), the ISA says (%d, %d)\n", what, lane, e,
                  p.row, p.col, q.row, q.col);
        bad++;
      } else if (p.row >= 0 && p.row < rows && p.col >= 0 && p.col < cols) {
        seen[p.row * cols + p.col]++;
      }
    }
  for (int i = 0; i < rows * cols && !bad; i++)
    if (seen[i] != 1) bad++;
  for (int r = 0; r < nfig; r++) {
    int row = atoi(fig[r][0]);
    const char *s = fig[r][1];
    for (int col = 0; col < cols; col++) {
      int lane, elem;
      char l;
      int n = 0;
      if (sscanf(s, " T%d:%c%d%n", &lane, &l, &elem, &n) != 3 || l != letter) {
        fprintf(stderr, "%s: figure row %d unreadable\n", what, row);
        return bad + 1;
      }
      s += n;
      da_rc p = f(lane, elem);
      if (p.row != row || p.col != col) {
        if (bad < 5)
          fprintf(stderr, "%s: figure row %d col %d is T%d:%c%d, the map puts that at (%d, %d)\n", what,
                  row, col, lane, letter, elem, p.row, p.col);
        bad++;
      }
    }
  }
  return bad;
}

static void test_tables(void) {
  CHECK(compare_map("da_frag_a", da_frag_a, isa_a, 8, 16, 16, kFigA, 3, 'a') == 0, "A map");
  CHECK(compare_map("da_frag_b", da_frag_b, isa_b, 4, 16, 8, kFigB, 4, 'b') == 0, "B map");
  CHECK(compare_map("da_frag_c", da_frag_c, isa_c, 4, 16, 8, kFigC, 2, 'c') == 0, "C map");
}

/* ======================= ldmatrix emulation against the ISA text ======================= */
/* 32 rows of 8 halves each at shuffled 16-byte aligned places of a pool; lane t points at
 * pool row perm[t]. out[lane][4] receives the registers. */
struct LdsmArgs {
  const uint16_t *pool; /* [64][8] */
  const int *perm;      /* [32] */
  uint32_t *out;        /* [32][4] */
  int variant;          /* 0 x4, 1 x4.trans, 2 x2, 3 x2.trans */
};

DA_GLOBAL(32) void ldsm_kernel(LdsmArgs a) {
  __shared__ __align__(128) uint16_t s[64 * 8];
  int lane = threadIdx.x;
  for (int i = lane; i < 64 * 8; i += 32) s[i] = a.pool[i];
  __syncthreads();
  const void *row = &s[a.perm[lane] * 8];
  uint32_t r[4] = {0, 0, 0, 0};
  switch (a.variant) {
    case 0: da_ldmatrix_x4(r, row); break;
    case 1: da_ldmatrix_x4_trans(r, row); break;
    case 2: da_ldmatrix_x2(r, row); break;
    default: da_ldmatrix_x2_trans(r, row); break;
  }
  for (int i = 0; i < 4; i++) a.out[lane * 4 + i] = r[i];
}

static void test_ldmatrix_isa(void) {
  std::vector<uint16_t> pool(64 * 8);
  for (auto &v : pool) v = (uint16_t)(test_rng()() & 0xffff);
  std::vector<int> perm(64);
  for (int i = 0; i < 64; i++) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), test_rng());
  for (int variant = 0; variant < 4; variant++) {
    std::vector<uint32_t> out(32 * 4, 0xdeadbeefu);
    LdsmArgs a{pool.data(), perm.data(), out.data(), variant};
    CHECK(DA_LAUNCH(ldsm_kernel, 1, 32, 0, 0, a) == cudaSuccess, "launch");
    int nmat = variant < 2 ? 4 : 2;
    bool trans = variant & 1;
    for (int t = 0; t < 32; t++)
      for (int i = 0; i < nmat; i++) {
        /* matrix i: row j is the pool row lane 8 i + j pointed at */
        int r0 = trans ? 2 * (t % 4) : t / 4, c0 = trans ? t / 4 : 2 * (t % 4);
        int r1 = trans ? 2 * (t % 4) + 1 : t / 4, c1 = trans ? t / 4 : 2 * (t % 4) + 1;
        uint32_t want = pool[perm[8 * i + r0] * 8 + c0] | (uint32_t)pool[perm[8 * i + r1] * 8 + c1] << 16;
        CHECK(out[t * 4 + i] == want, "ldmatrix variant %d lane %d reg %d: %08x, ISA %08x", variant, t, i,
              out[t * 4 + i], want);
      }
  }
}

/* ======================= frag.cuh ldmatrix address rules ======================= */
/* A 16 x 64 tile of raw 16-bit ids (id = row * 64 + col) stored plain or swizzled (ld 64); each
 * rule's registers must hold the ids the fragment maps name. rule: 0 x4_a, 1 x4_b, 2 x4_bt,
 * 3 x2_b, 4 x2_bt. The sub-tile starts at column c0. */
struct RuleArgs {
  uint32_t *out; /* [32][4] */
  int rule, c0;
  bool swz;
};

DA_GLOBAL(32) void rule_kernel(RuleArgs a) {
  __shared__ __align__(128) uint16_t s[16 * 64];
  int lane = threadIdx.x;
  for (int i = lane; i < 16 * 64; i += 32) {
    int row = i / 64, col = i % 64;
    s[da_tile_off(row, col, 64, a.swz)] = (uint16_t)i;
  }
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  da_rc p;
  switch (a.rule) {
    case 0: p = da_ldsm_x4_a(lane); break;
    case 1: p = da_ldsm_x4_b(lane); break;
    case 2: p = da_ldsm_x4_bt(lane); break;
    case 3: p = da_ldsm_x2_b(lane); break;
    default: p = da_ldsm_x2_bt(lane); break;
  }
  const void *row = &s[da_tile_off(p.row, a.c0 + p.col, 64, a.swz)];
  switch (a.rule) {
    case 0: case 1: da_ldmatrix_x4(r, row); break;
    case 2: da_ldmatrix_x4_trans(r, row); break;
    case 3: da_ldmatrix_x2(r, row); break;
    default: da_ldmatrix_x2_trans(r, row); break;
  }
  for (int i = 0; i < 4; i++) a.out[lane * 4 + i] = r[i];
}

static void test_rules(void) {
  static const char *names[] = {"x4_a", "x4_b", "x4_bt", "x2_b", "x2_bt"};
  for (int swz = 0; swz < 2; swz++)
    for (int c0 : {0, 16, 40})
      for (int rule = 0; rule < 5; rule++) {
        std::vector<uint32_t> out(32 * 4, 0);
        RuleArgs a{out.data(), rule, c0, swz != 0};
        DA_LAUNCH(rule_kernel, 1, 32, 0, 0, a);
        auto id = [&](int row, int col) { return (uint32_t)(row * 64 + c0 + col); };
        for (int t = 0; t < 32; t++) {
          int nreg = rule < 3 ? 4 : 2;
          for (int reg = 0; reg < nreg; reg++)
            for (int h = 0; h < 2; h++) {
              uint32_t want;
              if (rule == 0) { /* A fragment of the [m][k] tile */
                da_rc q = isa_a(t, reg * 2 + h);
                want = id(q.row, q.col);
              } else { /* B fragments (k, n); n block reg / 2 */
                da_rc q = isa_b(t, (reg % 2) * 2 + h);
                int n = q.col + (reg / 2) * 8, k = q.row;
                want = (rule == 1 || rule == 3) ? id(n, k) : id(k, n); /* [n][k] or [k][n] storage */
              }
              uint32_t got = (out[t * 4 + reg] >> (16 * h)) & 0xffff;
              CHECK(got == want, "rule %s swz %d c0 %d lane %d reg %d half %d: id %u, want %u", names[rule],
                    swz, c0, t, reg, h, got, want);
            }
        }
      }
}

/* The swizzle keeps each row's chunks a permutation and puts the 8 rows of one ldmatrix matrix
 * (same logical chunk) in 8 different 16-byte bank groups, for ld = 64 and 128. */
static void test_swizzle(void) {
  for (int ld : {64, 128})
    for (int r0 = 0; r0 < 32; r0 += 8)
      for (int chunk = 0; chunk < ld / 8; chunk++) {
        int groups = 0;
        for (int j = 0; j < 8; j++) {
          int off = da_tile_off(r0 + j, chunk * 8, ld, true) * 2; /* bytes */
          CHECK(off % 16 == 0, "swizzled chunk not 16-byte aligned");
          groups |= 1 << ((off / 16) % 8);
        }
        CHECK(groups == 0xff, "ld %d rows %d.. chunk %d: bank groups 0x%x, want all 8", ld, r0, chunk, groups);
      }
  for (int ld : {64, 128})
    for (int row = 0; row < 16; row++) {
      std::vector<int> hit(ld, 0);
      for (int col = 0; col < ld; col++) {
        int o = da_tile_off(row, col, ld, true) - row * ld;
        if (o >= 0 && o < ld) hit[o]++;
      }
      for (int c = 0; c < ld; c++) CHECK(hit[c] == 1, "swizzle ld %d row %d is not a permutation", ld, row);
    }
}

/* ======================= mma.sync against a float64 GEMM ======================= */
/* Direct fragments: the test builds each lane's registers from random A (16x16), B (16x8), C
 * (16x8) with a map (the ISA's, or the planted one) and the emulated mma must give A B + C. */
struct MmaArgs {
  const uint32_t *a, *b; /* [32][4], [32][2] */
  float *d;              /* [32][4] in: C fragment, out: D */
  int f16;
};

DA_GLOBAL(32) void mma_kernel(MmaArgs m) {
  int lane = threadIdx.x;
  uint32_t a[4], b[2];
  float d[4];
  for (int i = 0; i < 4; i++) a[i] = m.a[lane * 4 + i], d[i] = m.d[lane * 4 + i];
  for (int i = 0; i < 2; i++) b[i] = m.b[lane * 2 + i];
  if (m.f16)
    da_mma_16816_f16(d, a, b);
  else
    da_mma_16816_bf16(d, a, b);
  for (int i = 0; i < 4; i++) m.d[lane * 4 + i] = d[i];
}

/* Worst |D - (A B + C)| / (sum |a b| + |c|) of one random case, A's fragments built with amap. */
template <typename Tag> static double mma_case(map_fn amap) {
  double A[16][16], B[16][8], C[16][8];
  uint16_t Ab[16][16], Bb[16][8];
  for (int i = 0; i < 16; i++)
    for (int k = 0; k < 16; k++) {
      Ab[i][k] = to_bits(urand(-2, 2), Tag());
      A[i][k] = from_bits(Ab[i][k], Tag());
    }
  for (int k = 0; k < 16; k++)
    for (int j = 0; j < 8; j++) {
      Bb[k][j] = to_bits(urand(-2, 2), Tag());
      B[k][j] = from_bits(Bb[k][j], Tag());
    }
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 8; j++) C[i][j] = urand(-4, 4);
  std::vector<uint32_t> a(32 * 4, 0), b(32 * 2, 0);
  std::vector<float> d(32 * 4);
  for (int l = 0; l < 32; l++) {
    for (int e = 0; e < 8; e++) {
      da_rc p = amap(l, e);
      a[l * 4 + e / 2] |= (uint32_t)Ab[p.row][p.col] << (16 * (e % 2));
    }
    for (int e = 0; e < 4; e++) {
      da_rc p = isa_b(l, e);
      b[l * 2 + e / 2] |= (uint32_t)Bb[p.row][p.col] << (16 * (e % 2));
      da_rc q = isa_c(l, e);
      d[l * 4 + e] = (float)C[q.row][q.col];
    }
  }
  MmaArgs m{a.data(), b.data(), d.data(), std::is_same<Tag, da_tag_f16>::value};
  DA_LAUNCH(mma_kernel, 1, 32, 0, 0, m);
  double worst = 0;
  for (int l = 0; l < 32; l++)
    for (int e = 0; e < 4; e++) {
      da_rc q = isa_c(l, e);
      double ref = C[q.row][q.col], mag = fabs(ref);
      for (int k = 0; k < 16; k++) {
        ref += A[q.row][k] * B[k][q.col];
        mag += fabs(A[q.row][k] * B[k][q.col]);
      }
      worst = std::max(worst, fabs(d[l * 4 + e] - ref) / mag);
    }
  return worst;
}

/* ldmatrix -> mma chains: D (16 x N) = A (16 x K, row-major in smem) times B, with B stored [n][k]
 * (rule x2_b / x4_b) or [k][n] (x2_bt / x4_bt); N = 8 (x2) or 16 (x4), K = 32 (two mma steps). */
struct ChainArgs {
  const uint16_t *a;  /* [16][32] */
  const uint16_t *b;  /* [N][32] if nk else [32][N] */
  float *d;           /* [16][N] */
  int n, nk, f16;
};

DA_GLOBAL(32) void chain_kernel(ChainArgs c) {
  __shared__ __align__(128) uint16_t sa[16 * 32], sb[32 * 16];
  int lane = threadIdx.x;
  for (int i = lane; i < 16 * 32; i += 32) sa[i] = c.a[i];
  for (int i = lane; i < 32 * c.n; i += 32) sb[i] = c.b[i];
  __syncthreads();
  float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  for (int ks = 0; ks < 2; ks++) {
    uint32_t a[4], b[4];
    da_rc p = da_ldsm_x4_a(lane);
    da_ldmatrix_x4(a, &sa[p.row * 32 + ks * 16 + p.col]);
    if (c.n == 8) {
      if (c.nk) {
        da_rc q = da_ldsm_x2_b(lane);
        da_ldmatrix_x2(b, &sb[q.row * 32 + ks * 16 + q.col]);
      } else {
        da_rc q = da_ldsm_x2_bt(lane);
        da_ldmatrix_x2_trans(b, &sb[(ks * 16 + q.row) * 8 + q.col]);
      }
    } else {
      if (c.nk) {
        da_rc q = da_ldsm_x4_b(lane);
        da_ldmatrix_x4(b, &sb[q.row * 32 + ks * 16 + q.col]);
      } else {
        da_rc q = da_ldsm_x4_bt(lane);
        da_ldmatrix_x4_trans(b, &sb[(ks * 16 + q.row) * 16 + q.col]);
      }
    }
    for (int nb = 0; nb < c.n / 8; nb++) {
      if (c.f16)
        da_mma_16816(acc[nb], a, &b[nb * 2], da_tag_f16());
      else
        da_mma_16816(acc[nb], a, &b[nb * 2], da_tag_bf16());
    }
  }
  for (int nb = 0; nb < c.n / 8; nb++)
    for (int e = 0; e < 4; e++) {
      da_rc q = da_frag_c(lane, e);
      c.d[q.row * c.n + nb * 8 + q.col] = acc[nb][e];
    }
}

template <typename Tag> static double chain_case(int n, int nk) {
  std::vector<uint16_t> a(16 * 32), b(32 * n);
  std::vector<double> A(16 * 32), B(32 * n); /* B as [k][n] */
  for (int i = 0; i < 16 * 32; i++) {
    a[i] = to_bits(urand(-1, 1), Tag());
    A[i] = from_bits(a[i], Tag());
  }
  for (int k = 0; k < 32; k++)
    for (int j = 0; j < n; j++) {
      uint16_t v = to_bits(urand(-1, 1), Tag());
      B[k * n + j] = from_bits(v, Tag());
      b[nk ? j * 32 + k : k * n + j] = v;
    }
  std::vector<float> d(16 * n, NAN);
  ChainArgs c{a.data(), b.data(), d.data(), n, nk, std::is_same<Tag, da_tag_f16>::value};
  DA_LAUNCH(chain_kernel, 1, 32, 0, 0, c);
  double worst = 0;
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < n; j++) {
      double ref = 0, mag = 0;
      for (int k = 0; k < 32; k++) {
        ref += A[i * 32 + k] * B[k * n + j];
        mag += fabs(A[i * 32 + k] * B[k * n + j]);
      }
      double err = std::isfinite(d[i * n + j]) ? fabs(d[i * n + j] - ref) / (mag + 1e-30) : INFINITY;
      worst = std::max(worst, err);
    }
  return worst;
}

/* fp32 accumulation of exact 16-bit products: a few fp32 roundings at most. */
static const double kTol = 1e-6;

static void test_mma(void) {
  for (int rep = 0; rep < 8; rep++) {
    double e1 = mma_case<da_tag_bf16>(isa_a), e2 = mma_case<da_tag_f16>(isa_a);
    CHECK(e1 < kTol, "bf16 mma vs float64: rel. error %.3g", e1);
    CHECK(e2 < kTol, "f16 mma vs float64: rel. error %.3g", e2);
  }
  for (int n : {8, 16})
    for (int nk : {0, 1}) {
      double e1 = chain_case<da_tag_bf16>(n, nk), e2 = chain_case<da_tag_f16>(n, nk);
      CHECK(e1 < kTol, "bf16 ldmatrix->mma N=%d %s: rel. error %.3g", n, nk ? "[n][k]" : "[k][n]", e1);
      CHECK(e2 < kTol, "f16 ldmatrix->mma N=%d %s: rel. error %.3g", n, nk ? "[n][k]" : "[k][n]", e2);
    }
}

/* da_pack2 and da_exp2 (host branch) on values whose right answers are known exactly. */
static void test_pack_exp2(void) {
  /* 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even -> 1.0 (0x3f80);
   * 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even -> 1 + 2^-6 (0x3f82). */
  uint32_t p = da_pack2(1.0f + 1.0f / 256, 1.0f + 3.0f / 256, da_tag_bf16());
  CHECK(p == (0x3f80u | 0x3f82u << 16), "bf16 pack %08x", p);
  uint32_t h = da_pack2(-2.0f, 0.5f, da_tag_f16());
  CHECK(h == (0xc000u | 0x3800u << 16), "f16 pack %08x", h);
  CHECK(da_exp2(3.0f) == 8.0f && da_exp2(-INFINITY) == 0.0f && da_exp2(-126.0f) == ldexpf(1, -126) &&
            da_exp2(-127.0f) == 0.0f,
        "exp2 (ftz): %g %g %g", da_exp2(3.0f), da_exp2(-126.0f), da_exp2(-127.0f));
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "all";
  if (!strcmp(mode, "all")) {
    test_tables();
    test_ldmatrix_isa();
    test_rules();
    test_swizzle();
    test_mma();
    test_pack_exp2();
    return test_finish(mode);
  }
  if (!strcmp(mode, "plant_map")) {
    /* The planted A map must be caught twice: by the table check, and by the GEMM (the emulated
     * mma gathers with frag.cuh's map, so fragments built with the wrong one give wrong D). */
    int table_bad = compare_map("planted_a", planted_a, isa_a, 8, 16, 16, kFigA, 3, 'a');
    double err = mma_case<da_tag_bf16>(planted_a);
    printf("planted A map: %d table disagreements, GEMM rel. error %.3g (tolerance %.1g)\n", table_bad,
           err, kTol);
    CHECK(table_bad > 0, "the table check did not catch the planted map");
    CHECK(err > kTol, "the GEMM check did not catch the planted map");
    return test_finish(mode);
  }
  fprintf(stderr, "unknown mode %s (all, plant_map)\n", mode);
  return 2;
}
