/* test_race.cpp: ThreadSanitizer on the threaded SIMT runner (built with -fsanitize=thread and
 * DA_SIMT_THREADS: one std::thread per CUDA thread). Mode clean: kernels that synchronize properly
 * (shared-memory exchange behind __syncthreads, shuffles, atomics, cp.async + wait, ldmatrix + mma)
 * must give right results and no TSan report (the test sets halt_on_error, so a report fails it).
 * Mode plant_nosync: the same exchange with its __syncthreads missing; ctest passes only on
 * TSan's "data race" report naming this file. */
#include <cmath>
#include <vector>

#include "simt_test.h"

enum { NT = 64 };

/* Each thread publishes one value, then reads its neighbour's: needs the barrier in between. */
DA_GLOBAL(NT) void rotate_kernel(const float *in, float *out, bool plant_nosync) {
  __shared__ float s[NT];
  int t = threadIdx.x;
  s[t] = 2.0f * in[blockIdx.x * NT + t];
  if (!plant_nosync) __syncthreads();
  out[blockIdx.x * NT + t] = s[(t + 1) % NT];
}

/* Warp sum by xor shuffles, block total by atomicAdd; a cp.async round trip through smem. */
DA_GLOBAL(NT) void misc_kernel(const float *in, float *warp_sums, float *total, float *copy) {
  __shared__ __align__(16) float s[NT * 4];
  int t = threadIdx.x;
  float v = in[t];
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (t % 32 == 0) warp_sums[t / 32] = v;
  atomicAdd(total, in[t]);
  da_cp_async_16(&s[t * 4], &in[(t * 4) % NT], true);
  da_cp_async_commit();
  da_cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; i++) copy[t * 4 + i] = s[((t + 1) % NT) * 4 + i];
}

/* One 16 x 8 x 16 mma per warp from ldmatrix'ed shared memory (two warps, same inputs). */
DA_GLOBAL(NT) void mma_kernel(const uint16_t *a, const uint16_t *b, float *d) {
  __shared__ __align__(128) uint16_t sa[16 * 16], sb[8 * 16];
  int t = threadIdx.x, lane = t % 32;
  for (int i = t; i < 16 * 16; i += NT) sa[i] = a[i];
  for (int i = t; i < 8 * 16; i += NT) sb[i] = b[i];
  __syncthreads();
  uint32_t ra[4], rb[2];
  da_rc p = da_ldsm_x4_a(lane), q = da_ldsm_x2_b(lane);
  da_ldmatrix_x4(ra, &sa[p.row * 16 + p.col]);
  da_ldmatrix_x2(rb, &sb[q.row * 16 + q.col]);
  float acc[4] = {0, 0, 0, 0};
  da_mma_16816_bf16(acc, ra, rb);
  for (int e = 0; e < 4; e++) {
    da_rc c = da_frag_c(lane, e);
    d[(t / 32) * 128 + c.row * 8 + c.col] = acc[e];
  }
}

static void run_rotate(bool plant) {
  const int blocks = 2;
  std::vector<float> in(blocks * NT), out(blocks * NT, NAN);
  for (auto &x : in) x = urand(-1, 1);
  DA_LAUNCH(rotate_kernel, blocks, NT, 0, 0, in.data(), out.data(), plant);
  if (plant) return; /* TSan has spoken (or not): ctest reads its output */
  for (int bl = 0; bl < blocks; bl++)
    for (int t = 0; t < NT; t++)
      CHECK(out[bl * NT + t] == 2.0f * in[bl * NT + (t + 1) % NT], "rotate block %d thread %d", bl, t);
}

static void run_misc(void) {
  std::vector<float> in(NT), warp_sums(2, NAN), copy(NT * 4, NAN);
  float total = 0;
  for (auto &x : in) x = (float)(int)urand(-8, 8); /* integers: every sum order is exact */
  DA_LAUNCH(misc_kernel, 1, NT, 0, 0, in.data(), warp_sums.data(), &total, copy.data());
  double s0 = 0, s1 = 0;
  for (int t = 0; t < 32; t++) s0 += in[t], s1 += in[32 + t];
  CHECK(warp_sums[0] == s0 && warp_sums[1] == s1, "warp sums %g %g, want %g %g", warp_sums[0], warp_sums[1], s0, s1);
  CHECK(total == s0 + s1, "atomicAdd total %g, want %g", total, s0 + s1);
  for (int t = 0; t < NT; t++)
    for (int i = 0; i < 4; i++)
      CHECK(copy[t * 4 + i] == in[(((t + 1) % NT) * 4) % NT + i], "cp.async copy thread %d", t);
}

static void run_mma(void) {
  std::vector<uint16_t> a(16 * 16), b(8 * 16);
  std::vector<double> A(a.size()), B(b.size());
  for (size_t i = 0; i < a.size(); i++) A[i] = from_bits(a[i] = to_bits(urand(-1, 1), da_tag_bf16()), da_tag_bf16());
  for (size_t i = 0; i < b.size(); i++) B[i] = from_bits(b[i] = to_bits(urand(-1, 1), da_tag_bf16()), da_tag_bf16());
  std::vector<float> d(2 * 128, NAN);
  DA_LAUNCH(mma_kernel, 1, NT, 0, 0, a.data(), b.data(), d.data());
  for (int w = 0; w < 2; w++)
    for (int i = 0; i < 16; i++)
      for (int j = 0; j < 8; j++) {
        double ref = 0, mag = 0;
        for (int k = 0; k < 16; k++) ref += A[i * 16 + k] * B[j * 16 + k], mag += fabs(A[i * 16 + k] * B[j * 16 + k]);
        CHECK(fabs(d[w * 128 + i * 8 + j] - ref) <= 1e-6 * mag, "mma warp %d (%d, %d): %g vs %g", w, i, j,
              d[w * 128 + i * 8 + j], ref);
      }
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "clean";
  if (!strcmp(mode, "clean")) {
    run_rotate(false);
    run_misc();
    run_mma();
  } else if (!strcmp(mode, "plant_nosync")) {
    run_rotate(true);
    printf("plant_nosync: ran without a ThreadSanitizer report (the race went unseen)\n");
    return 1;
  } else {
    fprintf(stderr, "unknown mode %s (clean, plant_nosync)\n", mode);
    return 2;
  }
  return test_finish(mode);
}
