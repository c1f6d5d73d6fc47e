/* test_tile.cpp: a small tile kernel of the sm_80 shape run on the SIMT runner: C = A B^T with A
 * [M][K] and B [N][K] 16-bit, 4 warps per 64 x 64 block of C, K streamed in 64-wide tiles through a
 * two-stage cp.async double buffer (swizzled shared memory, zero-filled rows past M), ldmatrix x4
 * for both operands, mma.sync m16n8k16 with fp32 accumulators; checked against float64.
 * Modes: bf16, f16; plant_nowait (the kernel skips cp.async.wait_group: must be caught, because the
 * runner performs a copy only at the wait that retires it). Also built threaded under TSan. */
#include <cmath>
#include <vector>

#include "simt_test.h"

enum { BM = 64, BN = 64, BK = 64, NTHREADS = 128 };

struct TileArgs {
  const uint16_t *a, *b; /* [M][K], [N][K] */
  float *c;              /* [M][N] */
  int M, N, K;
  bool plant_nowait;
};

/* One stage: BM rows of A and BN rows of B, BK 16-bit each (8 chunks of 16 bytes per row). */
DA_DEV void load_stage(const TileArgs &t, uint16_t *sa, uint16_t *sb, int m0, int n0, int k0) {
  for (int i = threadIdx.x; i < BM * (BK / 8); i += NTHREADS) {
    int row = i / (BK / 8), ch = i % (BK / 8);
    bool ok = m0 + row < t.M;
    const uint16_t *src = t.a + (size_t)(ok ? m0 + row : 0) * t.K + k0 + ch * 8;
    da_cp_async_16(&sa[da_tile_off(row, ch * 8, BK, true)], src, ok);
  }
  for (int i = threadIdx.x; i < BN * (BK / 8); i += NTHREADS) {
    int row = i / (BK / 8), ch = i % (BK / 8);
    bool ok = n0 + row < t.N;
    const uint16_t *src = t.b + (size_t)(ok ? n0 + row : 0) * t.K + k0 + ch * 8;
    da_cp_async_16(&sb[da_tile_off(row, ch * 8, BK, true)], src, ok);
  }
}

template <typename Tag> DA_GLOBAL(NTHREADS) void tile_kernel(TileArgs t) {
  DA_DYN_SMEM(uint16_t, smem); /* [2 stages][BM + BN][BK] */
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  float acc[BN / 8][4];
  for (int j = 0; j < BN / 8; j++)
    for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
  int nk = t.K / BK;
  load_stage(t, smem, smem + BM * BK, m0, n0, 0);
  da_cp_async_commit();
  for (int kt = 0; kt < nk; kt++) {
    uint16_t *sa = smem + (kt % 2) * (BM + BN) * BK, *sb = sa + BM * BK;
    if (kt + 1 < nk) { /* prefetch the next stage while this one is computed */
      uint16_t *na = smem + ((kt + 1) % 2) * (BM + BN) * BK;
      load_stage(t, na, na + BM * BK, m0, n0, (kt + 1) * BK);
      da_cp_async_commit();
      if (!t.plant_nowait) da_cp_async_wait<1>();
    } else if (!t.plant_nowait) {
      da_cp_async_wait<0>();
    }
    __syncthreads();
    for (int ks = 0; ks < BK / 16; ks++) {
      uint32_t a[4];
      da_rc p = da_ldsm_x4_a(lane);
      da_ldmatrix_x4(a, &sa[da_tile_off(warp * 16 + p.row, ks * 16 + p.col, BK, true)]);
      for (int nb = 0; nb < BN / 16; nb++) {
        uint32_t b[4];
        da_rc q = da_ldsm_x4_b(lane);
        da_ldmatrix_x4(b, &sb[da_tile_off(nb * 16 + q.row, ks * 16 + q.col, BK, true)]);
        da_mma_16816(acc[2 * nb], a, &b[0], Tag());
        da_mma_16816(acc[2 * nb + 1], a, &b[2], Tag());
      }
    }
    __syncthreads(); /* the stage is refilled by the next iteration's prefetch */
  }
  for (int j = 0; j < BN / 8; j++)
    for (int e = 0; e < 4; e++) {
      da_rc q = da_frag_c(lane, e);
      int row = m0 + warp * 16 + q.row, col = n0 + j * 8 + q.col;
      if (row < t.M && col < t.N) t.c[(size_t)row * t.N + col] = acc[j][e];
    }
}

template <typename Tag> static int run(bool plant) {
  const int M = 100, N = 64, K = 256; /* M not a multiple of BM: the zero-filled tail */
  std::vector<uint16_t> a((size_t)M * K), b((size_t)N * K);
  std::vector<double> A(a.size()), B(b.size());
  for (size_t i = 0; i < a.size(); i++) A[i] = from_bits(a[i] = to_bits(urand(-1, 1), Tag()), Tag());
  for (size_t i = 0; i < b.size(); i++) B[i] = from_bits(b[i] = to_bits(urand(-1, 1), Tag()), Tag());
  std::vector<float> c((size_t)M * N, NAN); /* poisoned: every element must be written */
  TileArgs t{a.data(), b.data(), c.data(), M, N, K, plant};
  size_t smem = 2 * (BM + BN) * BK * sizeof(uint16_t);
  cudaError_t e = DA_LAUNCH(tile_kernel<Tag>, dim3((M + BM - 1) / BM, (N + BN - 1) / BN), NTHREADS, smem, 0, t);
  CHECK(e == cudaSuccess, "launch: %s", cudaGetErrorString(e));
  int bad = 0;
  double worst = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; k++) {
        ref += A[(size_t)i * K + k] * B[(size_t)j * K + k];
        mag += fabs(A[(size_t)i * K + k] * B[(size_t)j * K + k]);
      }
      double got = c[(size_t)i * N + j];
      double err = std::isfinite(got) ? fabs(got - ref) / (mag + 1e-30) : INFINITY;
      worst = std::max(worst, err);
      if (!(err < 1e-5)) {
        if (bad < 3 && !plant) fprintf(stderr, "C[%d][%d] = %g, float64 %g\n", i, j, got, ref);
        bad++;
      }
    }
  printf("tile %dx%dx%d: %d of %d wrong, worst rel. error %.3g\n", M, N, K, bad, M * N, worst);
  return bad;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "bf16";
  if (!strcmp(mode, "bf16")) {
    CHECK(run<da_tag_bf16>(false) == 0, "bf16 tile kernel vs float64");
  } else if (!strcmp(mode, "f16")) {
    CHECK(run<da_tag_f16>(false) == 0, "f16 tile kernel vs float64");
  } else if (!strcmp(mode, "plant_nowait")) {
    CHECK(run<da_tag_bf16>(true) > 0, "the kernel without cp.async.wait_group passed: copies are not deferred");
  } else {
    fprintf(stderr, "unknown mode %s (bf16, f16, plant_nowait)\n", mode);
    return 2;
  }
  return test_finish(mode);
}
