/* simt_test.h: the small harness of the SIMT runner's own tests (tests/simt/test_*.cpp): a failure
 * counter with messages, a seeded RNG (printed; DA_SEED=n reproduces a run), 16-bit rounding and
 * mode dispatch (argv[1]). Each mode is its own ctest; exit 0 = pass. */
#ifndef DA_SIMT_TEST_H
#define DA_SIMT_TEST_H

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "ptx.cuh"

static int g_fail;
#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (g_fail < 20) {                                                   \
        fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
        fprintf(stderr, __VA_ARGS__);                                      \
        fprintf(stderr, "\n");                                             \
      }                                                                    \
      g_fail++;                                                            \
    }                                                                      \
  } while (0)

/* Fresh inputs every run; the seed is printed so a failure can be replayed (DA_SEED=...). */
static inline std::mt19937_64 &test_rng() {
  static std::mt19937_64 rng([] {
    const char *e = getenv("DA_SEED");
    unsigned long long s = e ? strtoull(e, nullptr, 0) : std::random_device{}();
    printf("seed %llu (DA_SEED=%llu reproduces)\n", s, s);
    return s;
  }());
  return rng;
}
static inline float urand(float lo, float hi) {
  return std::uniform_real_distribution<float>(lo, hi)(test_rng());
}

/* 16-bit storage values: bits and the float they hold (round to nearest even). */
static inline uint16_t to_bits(float x, da_tag_bf16) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}
static inline uint16_t to_bits(float x, da_tag_f16) {
  __half h = __float2half_rn(x);
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}
static inline float from_bits(uint16_t u, da_tag_bf16) {
  uint32_t w = (uint32_t)u << 16;
  float f;
  memcpy(&f, &w, 4);
  return f;
}
static inline float from_bits(uint16_t u, da_tag_f16) {
  __half_raw raw;
  raw.x = u;
  return __half2float(__half(raw));
}

static inline int test_finish(const char *mode) {
  if (g_fail) {
    printf("%s: %d check(s) FAILED\n", mode, g_fail);
    return 1;
  }
  printf("%s: all checks passed\n", mode);
  return 0;
}

#endif /* DA_SIMT_TEST_H */
