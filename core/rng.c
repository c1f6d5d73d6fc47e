/* rng.c: Philox4x32-10 and the row generator of the seeded inputs. Element (pos, head, d) is word
 * d % 4 of the Philox block at counter (pos_lo, pos_hi | tensor << 16, head, d / 4), so a row is
 * generated four elements per block and any element can be generated alone with the same value. */
#include "rng.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void da_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

static inline float u32_to_sym(uint32_t u) {
  /* top 24 bits -> [0, 1) exactly representable, then to [-1, 1) */
  return (float)(u >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

static inline void block(uint64_t seed, uint32_t tensor, int64_t pos, int64_t head, int64_t blk,
                         uint32_t out[4]) {
  uint32_t ctr[4] = {(uint32_t)pos, (uint32_t)((uint64_t)pos >> 32) | (tensor << 16),
                     (uint32_t)head, (uint32_t)blk};
  uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  da_philox4x32(ctr, key, out);
}

float da_rng_uniform(uint64_t seed, uint32_t tensor, int64_t pos, int64_t head, int64_t d) {
  uint32_t w[4];
  block(seed, tensor, pos, head, d >> 2, w);
  return u32_to_sym(w[d & 3]);
}

void da_rng_row(uint64_t seed, uint32_t tensor, int64_t pos, int64_t head, int64_t D, float *out) {
  uint32_t w[4];
  for (int64_t b = 0; b * 4 < D; b++) {
    block(seed, tensor, pos, head, b, w);
    for (int j = 0; j < 4 && b * 4 + j < D; j++) out[b * 4 + j] = u32_to_sym(w[j]);
  }
}
