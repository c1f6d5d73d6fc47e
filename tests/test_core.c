/* test_core.c: Check suite of core/: 16-bit conversions, Philox RNG and the seeded-input
 * generator, size parsing, mask helpers, status strings and errors, memory accounting, env
 * parameters and the logger. Every expected value comes from an independent source (published
 * test vectors, hand-derived bit patterns, double-precision arithmetic, brute force); none is
 * produced by the code under test. Fork mode: the logger and env tests rely on a fresh process. */
#define _GNU_SOURCE
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"
#include "dtype.h"
#include "mask.h"
#include "rng.h"
#include "test_util.h"
#include "test_run.h"

/* ---- 16-bit conversions ------------------------------------------------------------------- */

/* Independent oracle: round a float to a binary format with p significand bits, minimum normal
 * exponent emin and largest finite value maxf, round-to-nearest-even, in double arithmetic
 * (x / quantum is exact, nearbyint rounds half to even in the default rounding mode). */
static double round_fmt(double x, int p, int emin, double maxf) {
  if (x == 0 || !isfinite(x)) return x;
  int e;
  frexp(x, &e); /* |x| = f * 2^e, f in [0.5, 1): leading bit has exponent e - 1 */
  int ex = e - 1 < emin ? emin : e - 1;
  double quantum = ldexp(1.0, ex - (p - 1));
  double r = nearbyint(x / quantum) * quantum;
  if (fabs(r) > maxf) return copysign(INFINITY, x);
  if (r == 0) return copysign(0.0, x);
  return r;
}
#define BF16_MAX 3.38953138925153547590470800371487866880e+38 /* 0x7f7f */
static double oracle_bf16(float x) { return round_fmt(x, 8, -126, BF16_MAX); }
static double oracle_f16(float x) { return round_fmt(x, 11, -14, 65504.0); }

static int same_value(double a, float b) {
  if (isnan(a)) return isnan(b);
  return a == (double)b && !signbit(a) == !signbit(b);
}

START_TEST(test_bf16_chosen_patterns) {
  /* (float bits, expected bf16 bits), derived by hand from the bit layouts */
  static const uint32_t cases[][2] = {
      {0x3F800000u, 0x3F80u}, /* 1.0 */
      {0x3F808000u, 0x3F80u}, /* 1 + 2^-8: halfway, 0x3F80 is even */
      {0x3F818000u, 0x3F82u}, /* halfway between 0x3F81 (odd) and 0x3F82: to even */
      {0x3F808001u, 0x3F81u}, /* just above halfway */
      {0x3F807FFFu, 0x3F80u}, /* just below halfway */
      {0x40490FDBu, 0x4049u}, /* pi */
      {0xC0490FDBu, 0xC049u}, /* -pi */
      {0x7F7FFFFFu, 0x7F80u}, /* FLT_MAX rounds up to inf */
      {0x7F7F7FFFu, 0x7F7Fu}, /* below half of the last ulp: stays finite */
      {0x7F7F8000u, 0x7F80u}, /* halfway between 0x7F7F (odd) and inf: to even = inf */
      {0x7F800000u, 0x7F80u}, /* inf */
      {0xFF800000u, 0xFF80u}, /* -inf */
      {0x00000000u, 0x0000u}, /* +0 */
      {0x80000000u, 0x8000u}, /* -0 */
      {0x00008000u, 0x0000u}, /* float subnormal, halfway to 0x0001: to even = 0 */
      {0x00018000u, 0x0002u}, /* halfway between 0x0001 and 0x0002: to even */
      {0x00000001u, 0x0000u}, /* smallest subnormal */
      {0x807FFFFFu, 0x8080u}, /* largest negative subnormal rounds to -FLT_MIN */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint16_t got = da_f32_to_bf16(da_bits_to_f32(cases[i][0]));
    ck_assert_msg(got == cases[i][1], "bf16(0x%08x) = 0x%04x, expected 0x%04x", cases[i][0], got, cases[i][1]);
  }
  /* NaNs stay NaN (and quiet), whatever mantissa bits they carry, including ones only in the
   * low half that a plain rounding add would turn into inf */
  static const uint32_t nans[] = {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FBFFFFFu, 0x7FFFFFFFu, 0xFFC00000u};
  for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
    uint16_t h = da_f32_to_bf16(da_bits_to_f32(nans[i]));
    ck_assert_msg((h & 0x7F80u) == 0x7F80u && (h & 0x7Fu) != 0, "bf16(NaN 0x%08x) = 0x%04x is not NaN", nans[i], h);
    ck_assert_msg((h & 0x8000u) == ((nans[i] >> 16) & 0x8000u), "bf16(NaN 0x%08x) lost its sign", nans[i]);
  }
}
END_TEST

START_TEST(test_f16_chosen_patterns) {
  static const struct { float x; uint16_t h; } cases[] = {
      {1.0f, 0x3C00u},
      {1.00048828125f, 0x3C00u},   /* 1 + 2^-11: halfway, 0x3C00 even */
      {1.00146484375f, 0x3C02u},   /* 1 + 3*2^-11: halfway between 0x3C01 and 0x3C02 */
      {1.0005f, 0x3C01u},          /* above halfway */
      {0.1f, 0x2E66u},             /* the usual fp16 0.1 */
      {3.14159265f, 0x4248u},      /* pi */
      {-2.0f, 0xC000u},
      {65504.0f, 0x7BFFu},         /* max finite */
      {65519.0f, 0x7BFFu},         /* below the overflow threshold */
      {65520.0f, 0x7C00u},         /* halfway between 65504 (odd) and 65536: inf */
      {1e6f, 0x7C00u},
      {-1e6f, 0xFC00u},
      {INFINITY, 0x7C00u},
      {-INFINITY, 0xFC00u},
      {0x1p-24f, 0x0001u},         /* smallest subnormal */
      {0x1p-25f, 0x0000u},         /* halfway between 0 and 0x0001: to even = 0 */
      {0x1.000002p-25f, 0x0001u},  /* just above halfway */
      {0x1.8p-24f, 0x0002u},       /* 1.5 * 2^-24: halfway between 0x0001 and 0x0002 */
      {0x1.4p-23f, 0x0002u},       /* 2.5 * 2^-24: halfway between 0x0002 and 0x0003: to even */
      {0x1p-14f, 0x0400u},         /* smallest normal */
      {0x1.ffcp-15f, 0x0400u},     /* 1023.5 * 2^-24: halfway, 0x03FF odd: up to the normal */
      {0x1.ff8p-15f, 0x03FFu},     /* largest subnormal */
      {1e-10f, 0x0000u},
      {-1e-10f, 0x8000u},
      {-0.0f, 0x8000u},
      {0x1p-30f, 0x0000u},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint16_t got = da_f32_to_f16(cases[i].x);
    ck_assert_msg(got == cases[i].h, "f16(%a) = 0x%04x, expected 0x%04x", (double)cases[i].x, got, cases[i].h);
  }
  static const uint32_t nans[] = {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu};
  for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
    uint16_t h = da_f32_to_f16(da_bits_to_f32(nans[i]));
    ck_assert_msg((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0, "f16(NaN 0x%08x) = 0x%04x is not NaN", nans[i], h);
  }
}
END_TEST

/* Every fp16 bit pattern: decode against the format's definition, then back to the same bits. */
START_TEST(test_f16_exhaustive_roundtrip) {
  for (uint32_t h = 0; h < 65536u; h++) {
    float f = da_f16_to_f32((uint16_t)h);
    uint32_t s = h >> 15, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    double want;
    if (e == 0x1F) want = m ? NAN : INFINITY;
    else if (e == 0) want = ldexp((double)m, -24);
    else want = ldexp((double)(1024 + m), (int)e - 25);
    if (s) want = -want;
    ck_assert_msg(same_value(want, f), "f16 0x%04x decodes to %a, expected %a", h, (double)f, want);
    uint16_t back = da_f32_to_f16(f);
    if (e == 0x1F && m) {
      ck_assert_msg((back & 0x7C00u) == 0x7C00u && (back & 0x3FFu) && (back & 0x8000u) == (h & 0x8000u),
                    "NaN 0x%04x came back as 0x%04x", h, back);
      if (m & 0x200u) ck_assert_msg(back == h, "quiet NaN 0x%04x came back as 0x%04x", h, back);
    } else {
      ck_assert_msg(back == h, "f16 0x%04x -> %a -> 0x%04x", h, (double)f, back);
    }
#ifdef __FLT16_MANT_DIG__
    /* the compiler's own _Float16 as a second opinion */
    _Float16 c;
    memcpy(&c, &(uint16_t){(uint16_t)h}, 2);
    ck_assert(same_value((double)(float)c, f));
#endif
  }
}
END_TEST

START_TEST(test_bf16_exhaustive_roundtrip) {
  for (uint32_t h = 0; h < 65536u; h++) {
    float f = da_bf16_to_f32((uint16_t)h);
    uint32_t e = (h >> 7) & 0xFFu, m = h & 0x7Fu;
    double want;
    if (e == 0xFF) want = m ? NAN : INFINITY;
    else if (e == 0) want = ldexp((double)m, -133);
    else want = ldexp((double)(128 + m), (int)e - 134);
    if (h & 0x8000u) want = -want;
    ck_assert_msg(same_value(want, f), "bf16 0x%04x decodes to %a, expected %a", h, (double)f, want);
    uint16_t back = da_f32_to_bf16(f);
    if (e == 0xFF && m) {
      ck_assert_msg((back & 0x7F80u) == 0x7F80u && (back & 0x7Fu) && (back & 0x8000u) == (h & 0x8000u),
                    "NaN 0x%04x came back as 0x%04x", h, back);
      if (m & 0x40u) ck_assert_msg(back == h, "quiet NaN 0x%04x came back as 0x%04x", h, back);
    } else {
      ck_assert_msg(back == h, "bf16 0x%04x -> %a -> 0x%04x", h, (double)f, back);
    }
  }
}
END_TEST

/* Random float bit patterns (all exponents: subnormal, normal, overflow) against the
 * double-precision oracle, plus the compiler's _Float16 when it has one. */
START_TEST(test_round_random_vs_oracle) {
  uint64_t rs = 12345;
  for (int i = 0; i < 2000000; i++) {
    uint32_t u = (uint32_t)tu_next(&rs);
    if (i & 1) u = (u & 0x807FFFFFu) | ((uint32_t)tu_rand(&rs, 90, 150) << 23); /* fp16's range */
    float x = da_bits_to_f32(u);
    if (isnan(x)) continue;
    float b = da_bf16_to_f32(da_f32_to_bf16(x));
    ck_assert_msg(same_value(oracle_bf16(x), b), "bf16 round of %a (0x%08x): got %a, expected %a", (double)x, u,
                  (double)b, oracle_bf16(x));
    float h = da_f16_to_f32(da_f32_to_f16(x));
    ck_assert_msg(same_value(oracle_f16(x), h), "f16 round of %a (0x%08x): got %a, expected %a", (double)x, u,
                  (double)h, oracle_f16(x));
    ck_assert(same_value(da_round_to(1, x), b) && same_value(da_round_to(2, x), h) && same_value(da_round_to(0, x), x));
#ifdef __FLT16_MANT_DIG__
    _Float16 c = (_Float16)x;
    ck_assert_msg(same_value((double)(float)c, h), "f16 round of %a: _Float16 says %a, got %a", (double)x,
                  (double)(float)c, (double)h);
#endif
  }
}
END_TEST

START_TEST(test_load_store) {
  /* da_load_f32/da_store_f32 address elements of the right width for each dtype */
  float f32[3] = {0};
  uint16_t u16[3] = {0xAAAA, 0xAAAA, 0xAAAA};
  da_store_f32(f32, 0, 1, 1.5f);
  ck_assert(f32[1] == 1.5f && f32[0] == 0 && f32[2] == 0);
  da_store_f32(u16, 1, 1, -2.0f);
  ck_assert_uint_eq(u16[1], 0xC000u);
  ck_assert_uint_eq(u16[0], 0xAAAAu);
  ck_assert_uint_eq(u16[2], 0xAAAAu);
  ck_assert(da_load_f32(u16, 1, 1) == -2.0f);
  da_store_f32(u16, 2, 2, 0.5f);
  ck_assert_uint_eq(u16[2], 0x3800u);
  ck_assert(da_load_f32(u16, 2, 2) == 0.5f);
  ck_assert_uint_eq(da_dtype_size(DA_FLOAT32), 4);
  ck_assert_uint_eq(da_dtype_size(DA_BFLOAT16), 2);
  ck_assert_uint_eq(da_dtype_size(DA_FLOAT16), 2);
  ck_assert_str_eq(da_dtype_name(DA_BFLOAT16), "bf16");
  ck_assert_str_eq(da_dtype_name(DA_FLOAT16), "fp16");
  ck_assert_str_eq(da_dtype_name(DA_FLOAT32), "fp32");
}
END_TEST

/* ---- Philox and the seeded inputs ---------------------------------------------------------- */

/* Known-answer vectors of philox4x32-10 from Random123 (kat_vectors). */
START_TEST(test_philox_kat) {
  static const uint32_t kat[][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
      {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0x408f276du, 0x41c83b0eu,
       0xa20bc7c6u, 0x6d5451fdu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u, 0xd16cfe09u, 0x94fdccebu,
       0x5001e420u, 0x24126ea1u},
  };
  for (int t = 0; t < 3; t++) {
    uint32_t out[4];
    da_philox4x32(&kat[t][0], &kat[t][4], out);
    for (int j = 0; j < 4; j++)
      ck_assert_msg(out[j] == kat[t][6 + j], "KAT %d word %d: 0x%08x, expected 0x%08x", t, j, out[j], kat[t][6 + j]);
  }
}
END_TEST

START_TEST(test_rng_row_matches_uniform) {
  uint64_t rs = 777;
  float row[300];
  for (int it = 0; it < 2000; it++) {
    uint64_t seed = tu_next(&rs);
    uint32_t tensor = (uint32_t)tu_rand(&rs, 1, 20);
    int64_t pos = it % 3 ? tu_rand(&rs, 0, 1 << 20) : (int64_t)(tu_next(&rs) >> 20); /* up to 2^44 */
    int64_t head = tu_rand(&rs, 0, 127);
    int64_t D = tu_rand(&rs, 1, 300);
    row[D - 1] = NAN;
    da_rng_row(seed, tensor, pos, head, D, row);
    for (int64_t d = 0; d < D; d++) {
      float u = da_rng_uniform(seed, tensor, pos, head, d);
      ck_assert_msg(u == row[d], "uniform(%llu, %u, %lld, %lld, %lld) = %g but row has %g", (unsigned long long)seed,
                    tensor, (long long)pos, (long long)head, (long long)d, (double)u, (double)row[d]);
      ck_assert_msg(u >= -1.0f && u < 1.0f, "value %g outside [-1, 1)", (double)u);
    }
  }
}
END_TEST

START_TEST(test_rng_distribution_and_independence) {
  /* 2^18 samples of one tensor: mean 0 and variance 1/3 of U[-1, 1) within a few sigma */
  const int64_t N = 1 << 18;
  double sum = 0, sum2 = 0;
  int64_t hist[16] = {0};
  float row[64];
  for (int64_t pos = 0; pos < N / 64; pos++) {
    da_rng_row(42, DA_RNG_Q, pos, pos % 7, 64, row);
    for (int d = 0; d < 64; d++) {
      sum += row[d];
      sum2 += (double)row[d] * row[d];
      hist[(int)((row[d] + 1.0f) * 8.0f)]++;
    }
  }
  double mean = sum / N, var = sum2 / N - mean * mean;
  ck_assert_msg(fabs(mean) < 5 * sqrt(1.0 / 3 / N), "mean %g", mean);
  ck_assert_msg(fabs(var - 1.0 / 3) < 0.01, "variance %g, expected 1/3", var);
  for (int b = 0; b < 16; b++) /* each bin 1/16 of the samples, 5 sigma */
    ck_assert_msg(fabs((double)hist[b] - N / 16.0) < 5 * sqrt(N / 16.0), "bin %d holds %lld", b, (long long)hist[b]);

  /* different seeds, tensors, positions, heads give different rows */
  float a[32], b[32];
  struct { uint64_t seed; uint32_t t; int64_t pos, head; } base = {1, DA_RNG_K, 1000, 3}, var_[] = {
      {2, DA_RNG_K, 1000, 3}, {1ull << 32 | 1, DA_RNG_K, 1000, 3}, {1, DA_RNG_V, 1000, 3}, {1, DA_RNG_K, 1001, 3},
      {1, DA_RNG_K, 1000 + (1ll << 32), 3}, {1, DA_RNG_K, 1000, 4}};
  da_rng_row(base.seed, base.t, base.pos, base.head, 32, a);
  for (size_t i = 0; i < sizeof var_ / sizeof var_[0]; i++) {
    da_rng_row(var_[i].seed, var_[i].t, var_[i].pos, var_[i].head, 32, b);
    int same = 0;
    for (int d = 0; d < 32; d++) same += a[d] == b[d];
    ck_assert_msg(same < 4, "variant %zu repeats %d of 32 values of the base row", i, same);
  }
  /* the same arguments give the same row (it is a function, not a stream) */
  da_rng_row(base.seed, base.t, base.pos, base.head, 32, b);
  ck_assert(memcmp(a, b, sizeof a) == 0);
}
END_TEST

/* ---- sizes, status, errors ----------------------------------------------------------------- */

START_TEST(test_parse_size) {
  static const struct { const char *s; int64_t v; } good[] = {
      {"0", 0}, {"3", 3}, {"4K", 4096}, {"4k", 4096}, {"1M", 1048576}, {"2G", 2147483648LL},
      {"1000", 1000}, {"1023K", 1023 * 1024}, {"8388607G", 8388607LL << 30}};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    int64_t v = -7;
    ck_assert_msg(da_parse_size(good[i].s, &v) == 0, "\"%s\" rejected", good[i].s);
    ck_assert_msg(v == good[i].v, "\"%s\" = %lld, expected %lld", good[i].s, (long long)v, (long long)good[i].v);
  }
  static const char *bad[] = {"", "K", "4KB", "4 K", "-1", "1.5K", "abc", "4T", "0x10",
                              "99999999999999999999", "9223372036854775807K", "8388608G", "12x"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int64_t v = -7;
    ck_assert_msg(da_parse_size(bad[i], &v) == -1, "\"%s\" accepted as %lld", bad[i], (long long)v);
    ck_assert_msg(v == -7, "\"%s\": output written on failure", bad[i]);
  }
  int64_t v;
  ck_assert_int_eq(da_parse_size(NULL, &v), -1);
}
END_TEST

START_TEST(test_status_strings) {
  for (int a = 0; a < DA_NUM_STATUS; a++) {
    const char *s = da_status_string((da_status_t)a);
    ck_assert_msg(s && *s && strcmp(s, "unknown status"), "status %d has no string", a);
    for (int b = 0; b < a; b++) ck_assert_msg(strcmp(s, da_status_string((da_status_t)b)), "codes %d and %d share \"%s\"", a, b, s);
  }
  ck_assert_str_eq(da_status_string(DA_SUCCESS), "success");
  ck_assert_str_eq(da_status_string(DA_ERR_INVALID_ARGUMENT), "invalid argument");
  ck_assert_str_eq(da_status_string(DA_ERR_UNSUPPORTED), "unsupported");
  /* out of range: still a string, never NULL */
  ck_assert_str_eq(da_status_string(DA_NUM_STATUS), "unknown status");
  ck_assert_str_eq(da_status_string((da_status_t)-1), "unknown status");
  ck_assert_str_eq(da_status_string((da_status_t)1000), "unknown status");
}
END_TEST

START_TEST(test_error_message) {
  da_error_clear();
  ck_assert_str_eq(da_error_message(), "");
  ck_assert_int_eq(DA_ERR(DA_ERR_IO, "file %s: %d", "x.npy", 7), DA_ERR_IO);
  ck_assert_str_eq(da_error_message(), "file x.npy: 7");
  /* long messages are truncated, not overflowed */
  char big[2 * DA_ERRMSG_MAX];
  memset(big, 'a', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  DA_ERR(DA_ERR_INTERNAL, "%s", big);
  ck_assert_uint_eq(strlen(da_error_message()), DA_ERRMSG_MAX - 1);
  da_error_clear();
  ck_assert_str_eq(da_error_message(), "");
  ck_assert_str_eq(da_last_error(NULL), "");
}
END_TEST

/* ---- masks ---------------------------------------------------------------------------------- */

/* A random mask over [0, S): causal / window / doc and combinations. */
static void random_mask(uint64_t *rs, int64_t S, da_mask_t *m, int64_t *cu, int which) {
  static const unsigned flags[] = {DA_MASK_NONE, DA_MASK_CAUSAL, DA_MASK_WINDOW, DA_MASK_DOC,
                                   DA_MASK_CAUSAL | DA_MASK_DOC, DA_MASK_WINDOW | DA_MASK_DOC,
                                   DA_MASK_WINDOW | DA_MASK_CAUSAL};
  memset(m, 0, sizeof *m);
  m->flags = flags[which % 7];
  m->window = tu_rand(rs, 1, S);
  if (m->flags & DA_MASK_DOC) {
    m->ndocs = tu_docs(rs, S, tu_rand(rs, 1, 6), cu);
    m->cu_seqlens = cu;
  }
}

/* Brute force: allowed pairs from the definition in distattn.h, not from mask.c. */
static int brute_allows(const da_mask_t *m, int64_t q, int64_t k) {
  if ((m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) && k > q) return 0;
  if ((m->flags & DA_MASK_WINDOW) && !(q - k < m->window)) return 0;
  if (m->flags & DA_MASK_DOC) {
    int64_t dq = -1, dk = -1;
    for (int64_t d = 0; d < m->ndocs; d++) {
      if (m->cu_seqlens[d] <= q && q < m->cu_seqlens[d + 1]) dq = d;
      if (m->cu_seqlens[d] <= k && k < m->cu_seqlens[d + 1]) dk = d;
    }
    if (dq != dk) return 0;
  }
  return 1;
}

START_TEST(test_mask_random_spans) {
  uint64_t rs = 1000 + (uint64_t)_i;
  int64_t cu[8];
  for (int it = 0; it < 300; it++) {
    const int64_t S = tu_rand(&rs, 1, 120);
    da_mask_t m;
    random_mask(&rs, S, &m, cu, it);
    da_span_t q, k;
    q.stride = tu_rand(&rs, 1, 5);
    k.stride = tu_rand(&rs, 1, 5);
    q.start = tu_rand(&rs, 0, S - 1);
    k.start = tu_rand(&rs, 0, S - 1);
    q.count = tu_rand(&rs, 1, 1 + (S - 1 - q.start) / q.stride);
    k.count = tu_rand(&rs, 1, 1 + (S - 1 - k.start) / k.stride);
    char desc[128];
    da_mask_describe(&m, desc, sizeof desc);
    int64_t pairs = 0;
    for (int64_t i = 0; i < q.count; i++) {
      int64_t qp = da_span_at(q, i);
      for (int64_t j = 0; j < k.count; j++) {
        int64_t kp = da_span_at(k, j);
        int a = brute_allows(&m, qp, kp);
        ck_assert_msg(da_mask_allows(&m, qp, kp) == a, "%s: allows(%lld, %lld) != %d", desc, (long long)qp,
                      (long long)kp, a);
        pairs += a;
      }
      /* the row's interval agrees with allows() on every key of [kmin, kmax] */
      int64_t kmin = k.start, kmax = da_span_last(k), lo, hi;
      da_mask_row_range(&m, qp, kmin, kmax, &lo, &hi);
      for (int64_t kp = kmin; kp <= kmax; kp++)
        ck_assert_msg(brute_allows(&m, qp, kp) == (lo <= kp && kp <= hi), "%s: q %lld k %lld vs row range [%lld, %lld]",
                      desc, (long long)qp, (long long)kp, (long long)lo, (long long)hi);
    }
    ck_assert_msg(da_mask_count_pairs(&m, q, k) == pairs, "%s: count_pairs(q %lld+%lld*%lld, k %lld+%lld*%lld) = %lld, brute %lld",
                  desc, (long long)q.start, (long long)q.stride, (long long)q.count, (long long)k.start,
                  (long long)k.stride, (long long)k.count, (long long)da_mask_count_pairs(&m, q, k), (long long)pairs);

    /* classify on the position box [q0, q1] x [k0, k1] (every integer position in it):
     * EMPTY and FULL must be right; for a single mask kind they must also be found whenever true */
    int64_t q0 = q.start, q1 = da_span_last(q), k0 = k.start, k1 = da_span_last(k);
    int64_t any = 0, all = 1;
    for (int64_t a = q0; a <= q1; a++)
      for (int64_t b = k0; b <= k1; b++) {
        int ok = brute_allows(&m, a, b);
        any |= ok;
        all &= ok;
      }
    da_tile_class_t c = da_mask_classify(&m, q0, q1, k0, k1);
    if (c == DA_TILE_EMPTY) ck_assert_msg(!any, "%s: box [%lld,%lld]x[%lld,%lld] classified EMPTY but has pairs", desc,
                                          (long long)q0, (long long)q1, (long long)k0, (long long)k1);
    if (c == DA_TILE_FULL) ck_assert_msg(all, "%s: box classified FULL but has masked pairs", desc);
    if (all) ck_assert_msg(c == DA_TILE_FULL, "%s: fully visible box [%lld,%lld]x[%lld,%lld] classified %d", desc,
                           (long long)q0, (long long)q1, (long long)k0, (long long)k1, (int)c);
    unsigned f = m.flags & ~(unsigned)DA_MASK_CAUSAL;
    int single = m.flags == DA_MASK_CAUSAL || f == DA_MASK_WINDOW || m.flags == DA_MASK_DOC || m.flags == 0;
    if (!any && single) ck_assert_msg(c == DA_TILE_EMPTY, "%s: empty box [%lld,%lld]x[%lld,%lld] classified %d", desc,
                                      (long long)q0, (long long)q1, (long long)k0, (long long)k1, (int)c);
  }
}
END_TEST

START_TEST(test_mask_check_errors) {
  int64_t cu_ok[] = {0, 3, 10}, cu_bad0[] = {1, 3, 10}, cu_empty[] = {0, 3, 3, 10}, cu_short[] = {0, 3, 9},
          cu_long[] = {0, 3, 11}, cu_desc[] = {0, 5, 4, 10};
  struct { da_mask_t m; da_status_t want; const char *needle; } cases[] = {
      {{DA_MASK_NONE, 0, 0, NULL}, DA_SUCCESS, NULL},
      {{DA_MASK_CAUSAL, 0, 0, NULL}, DA_SUCCESS, NULL},
      {{DA_MASK_WINDOW, 1, 0, NULL}, DA_SUCCESS, NULL},
      {{DA_MASK_DOC | DA_MASK_CAUSAL, 0, 2, cu_ok}, DA_SUCCESS, NULL},
      {{0x80u, 0, 0, NULL}, DA_ERR_INVALID_ARGUMENT, "flag"},
      {{DA_MASK_WINDOW, 0, 0, NULL}, DA_ERR_INVALID_ARGUMENT, "window"},
      {{DA_MASK_WINDOW, -5, 0, NULL}, DA_ERR_INVALID_ARGUMENT, "window"},
      {{DA_MASK_DOC, 0, 0, cu_ok}, DA_ERR_INVALID_ARGUMENT, "doc"},
      {{DA_MASK_DOC, 0, 2, NULL}, DA_ERR_INVALID_ARGUMENT, "doc"},
      {{DA_MASK_DOC, 0, 2, cu_bad0}, DA_ERR_INVALID_ARGUMENT, "cu_seqlens[0]"},
      {{DA_MASK_DOC, 0, 3, cu_empty}, DA_ERR_INVALID_ARGUMENT, "length"},
      {{DA_MASK_DOC, 0, 3, cu_desc}, DA_ERR_INVALID_ARGUMENT, "length"},
      {{DA_MASK_DOC, 0, 2, cu_short}, DA_ERR_INVALID_ARGUMENT, "seq"},
      {{DA_MASK_DOC, 0, 2, cu_long}, DA_ERR_INVALID_ARGUMENT, "seq"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    da_error_clear();
    da_status_t st = da_mask_check(&cases[i].m, 10);
    ck_assert_msg(st == cases[i].want, "case %zu: status %d, expected %d (%s)", i, st, cases[i].want, da_error_message());
    if (cases[i].needle)
      ck_assert_msg(strstr(da_error_message(), cases[i].needle), "case %zu: message \"%s\" does not mention %s", i,
                    da_error_message(), cases[i].needle);
  }
}
END_TEST

START_TEST(test_mask_describe) {
  char buf[64];
  int64_t cu[] = {0, 100, 300};
  da_mask_t m = {DA_MASK_NONE, 0, 0, NULL};
  ck_assert_str_eq(da_mask_describe(&m, buf, sizeof buf), "none");
  m.flags = DA_MASK_CAUSAL;
  ck_assert_str_eq(da_mask_describe(&m, buf, sizeof buf), "causal");
  m.flags = DA_MASK_WINDOW | DA_MASK_CAUSAL;
  m.window = 128;
  ck_assert_str_eq(da_mask_describe(&m, buf, sizeof buf), "window:128");
  m.flags = DA_MASK_DOC;
  m.ndocs = 2;
  m.cu_seqlens = cu;
  ck_assert_str_eq(da_mask_describe(&m, buf, sizeof buf), "doc:100,200");
  m.flags = DA_MASK_DOC | DA_MASK_CAUSAL;
  ck_assert_str_eq(da_mask_describe(&m, buf, sizeof buf), "causal+doc:100,200");
  /* a short buffer truncates and stays terminated */
  char small[8];
  da_mask_describe(&m, small, sizeof small);
  ck_assert_uint_lt(strlen(small), sizeof small);
}
END_TEST

/* ---- memory accounting ---------------------------------------------------------------------- */

START_TEST(test_malloc_accounting) {
  size_t base = da_mem_current();
  da_mem_reset_peak();
  ck_assert_uint_eq(da_mem_peak(), base);
  char *a = da_malloc(1000, 0), *b = da_malloc(5000, 4096);
  ck_assert(a && b);
  ck_assert_uint_eq((uintptr_t)a % 64, 0);
  ck_assert_uint_eq((uintptr_t)b % 4096, 0);
  memset(a, 1, 1000), memset(b, 2, 5000); /* the whole payload is writable (ASan checks) */
  ck_assert_uint_eq(da_mem_current(), base + 6000);
  da_free(a);
  ck_assert_uint_eq(da_mem_current(), base + 5000);
  ck_assert_uint_eq(da_mem_peak(), base + 6000);
  char *c = da_calloc(3000, 128);
  ck_assert(c && (uintptr_t)c % 128 == 0);
  for (int i = 0; i < 3000; i++) ck_assert_int_eq(c[i], 0);
  ck_assert_uint_eq(da_mem_peak(), base + 8000);
  da_free(b), da_free(c);
  da_free(NULL);
  ck_assert_uint_eq(da_mem_current(), base);
  ck_assert_uint_eq(da_mem_peak(), base + 8000);
  da_mem_reset_peak();
  ck_assert_uint_eq(da_mem_peak(), base);
  ck_assert_ptr_null(da_malloc(16, 48)); /* alignment must be a power of two */
  ck_assert_ptr_null(da_malloc(SIZE_MAX - 8, 64));
  ck_assert_uint_eq(da_mem_current(), base);
  ck_assert_uint_gt(da_peak_rss_bytes(), 0);
}
END_TEST

/* The VmFlags of the mapping of /proc/self/smaps that holds address a, into flags; 0 if none. */
static int vma_flags(uintptr_t a, char *flags, size_t n) {
  FILE *f = fopen("/proc/self/smaps", "r");
  if (!f) return 0;
  char line[512];
  int in = 0, found = 0;
  while (!found && fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) in = a >= lo && a < hi;
    else if (in && !strncmp(line, "VmFlags:", 8)) snprintf(flags, n, "%s", line + 8), found = 1;
  }
  fclose(f);
  return found;
}

/* Blocks of 4 MiB and more are advised onto transparent huge pages (the mapping's VmFlags say
 * "hg"), smaller ones and all with DISTATTN_HUGEPAGES=0 are not. _i 0: default, 1: =0. Each test
 * runs in its own process, so the parameter is read afresh. Only where the kernel has THP. */
START_TEST(test_malloc_hugepages) {
  if (access("/sys/kernel/mm/transparent_hugepage/enabled", R_OK) != 0) {
    printf("# no transparent huge pages in this kernel: not checked\n");
    return;
  }
  if (_i == 1) setenv("DISTATTN_HUGEPAGES", "0", 1);
  else unsetenv("DISTATTN_HUGEPAGES");
  const size_t big = (9u << 20) + 4096;
  char *p = da_malloc(big, 64), *q = da_malloc(1u << 20, 64);
  ck_assert(p && q);
  memset(p, 1, big), memset(q, 1, 1u << 20);
  const uintptr_t mid = ((uintptr_t)p + (4u << 20)) & ~(uintptr_t)((2u << 20) - 1); /* inside the advised part */
  char flags[512];
  ck_assert_msg(vma_flags(mid, flags, sizeof flags), "no mapping holds %p", (void *)mid);
  const int hg = strstr(flags, " hg") != NULL;
  ck_assert_msg(hg == (_i == 0), "9 MiB block, DISTATTN_HUGEPAGES %s: VmFlags%s", _i ? "0" : "unset", flags);
  /* the advice covers the 2 MiB-aligned part of the big block only (madvise splits the mapping there) */
  const uintptr_t a = ((uintptr_t)p + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1);
  const uintptr_t e = ((uintptr_t)p + big) & ~(uintptr_t)((2u << 20) - 1);
  if ((uintptr_t)q + (1u << 20) <= a || (uintptr_t)q >= e) {
    ck_assert_msg(vma_flags((uintptr_t)q, flags, sizeof flags), "no mapping holds %p", (void *)q);
    ck_assert_msg(strstr(flags, " hg") == NULL, "a 1 MiB block was advised: VmFlags%s", flags);
  }
  da_free(p), da_free(q);
}
END_TEST

/* ---- env parameters, threads ------------------------------------------------------------------ */

START_TEST(test_params) {
  int64_t cache;
  int state = 0;
  /* through the table of core/env.c: DISTATTN_TEST_IO_FAIL is a whole number in [0, 2^30] */
  unsetenv("DISTATTN_TEST_IO_FAIL");
  ck_assert_int_eq(da_param_load("DISTATTN_TEST_IO_FAIL", 5, &cache, &state), 5);
  setenv("DISTATTN_TEST_IO_FAIL", "42", 1);
  ck_assert_int_eq(da_param_load("DISTATTN_TEST_IO_FAIL", 5, &cache, &state), 5); /* read once, cached */
  state = 0;
  ck_assert_int_eq(da_param_load("DISTATTN_TEST_IO_FAIL", 5, &cache, &state), 42);
  static const char *const refused[] = {"0x10", "4x", "-3", "1.5", " 4"}; /* strict: default, with a warning */
  for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
    setenv("DISTATTN_TEST_IO_FAIL", refused[i], 1);
    state = 0;
    ck_assert_int_eq(da_param_load("DISTATTN_TEST_IO_FAIL", 5, &cache, &state), 5);
  }
  unsetenv("DISTATTN_TEST_IO_FAIL");
  setenv("DISTATTN_TEST_P", "42", 1); /* a name outside the table is never read */
  state = 0;
  ck_assert_int_eq(da_param_load("DISTATTN_TEST_P", 5, &cache, &state), 5);
  ck_assert_ptr_null(da_param_string("DISTATTN_TEST_UNSET_S"));
  setenv("DISTATTN_TEST_S", "abc", 1);
  ck_assert_str_eq(da_param_string("DISTATTN_TEST_S"), "abc");
  setenv("DISTATTN_NTHREADS", "3", 1); /* before the first call: the parameter is cached */
  ck_assert_int_eq(da_default_nthreads(), 3);
  double t0 = da_time_now(), t1 = da_time_now();
  ck_assert(t1 >= t0 && t0 > 0);
}
END_TEST

START_TEST(test_default_nthreads_affinity) {
  unsetenv("DISTATTN_NTHREADS");
  int n = da_default_nthreads();
  ck_assert_int_ge(n, 1);
  ck_assert_int_le(n, (int)sysconf(_SC_NPROCESSORS_CONF));
}
END_TEST

/* ---- logger (each test runs in its own forked process: the logger reads its env once) ------- */

static char log_dir[256];

static void make_log_dir(void) {
  snprintf(log_dir, sizeof log_dir, "/tmp/da_test_log_XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(log_dir));
}

/* Contents of the log file the logger should have created for this process. */
static char *read_log(const char *suffix_pattern) {
  char host[64] = {0}, path[512];
  gethostname(host, sizeof host - 1);
  char *dot = strchr(host, '.');
  if (dot) *dot = '\0';
  (void)suffix_pattern;
  snprintf(path, sizeof path, "%s/log.%s.%d", log_dir, host, (int)getpid());
  FILE *f = fopen(path, "r");
  ck_assert_msg(f != NULL, "log file %s was not created", path);
  static char buf[8192];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  unlink(path);
  rmdir(log_dir);
  return buf;
}

START_TEST(test_log_file_info) {
  make_log_dir();
  char pattern[300];
  snprintf(pattern, sizeof pattern, "%s/log.%%h.%%p", log_dir);
  setenv("DISTATTN_DEBUG", "INFO", 1);
  setenv("DISTATTN_DEBUG_FILE", pattern, 1);
  unsetenv("DISTATTN_DEBUG_SUBSYS");
  da_log_set_rank(3);
  DA_INFO(DA_SUB_KERNEL, "hello %d", 1234);
  DA_TRACE(DA_SUB_KERNEL, "trace line %d", 99); /* above the level: not written */
  DA_ERR(DA_ERR_IO, "broken file %s", "f.npy");  /* errors are logged at WARN */
  const char *log = read_log(NULL);
  ck_assert_msg(strstr(log, "DISTATTN INFO hello 1234"), "INFO line missing in:\n%s", log);
  ck_assert_msg(strstr(log, "[3]"), "rank missing in:\n%s", log);
  ck_assert_msg(strstr(log, "distattn version"), "version line missing in:\n%s", log);
  ck_assert_msg(strstr(log, "DISTATTN WARN") && strstr(log, "broken file f.npy"), "error not logged:\n%s", log);
  ck_assert_msg(!strstr(log, "trace line"), "TRACE written at level INFO:\n%s", log);
}
END_TEST

START_TEST(test_log_levels_and_subsys) {
  make_log_dir();
  char pattern[300];
  snprintf(pattern, sizeof pattern, "%s/log.%%h.%%p", log_dir);
  setenv("DISTATTN_DEBUG", "trace", 1); /* case-insensitive */
  setenv("DISTATTN_DEBUG_FILE", pattern, 1);
  setenv("DISTATTN_DEBUG_SUBSYS", "^KERNEL", 1);
  DA_INFO(DA_SUB_KERNEL, "kernel line");
  DA_INFO(DA_SUB_COMM, "comm line");
  DA_TRACE(DA_SUB_PLAN, "plan trace");
  const char *log = read_log(NULL);
  ck_assert_msg(!strstr(log, "kernel line"), "excluded subsystem written:\n%s", log);
  ck_assert_msg(strstr(log, "comm line"), "COMM line missing:\n%s", log);
  ck_assert_msg(strstr(log, "TRACE") && strstr(log, "plan trace"), "TRACE line missing:\n%s", log);
}
END_TEST

START_TEST(test_log_off_by_default) {
  unsetenv("DISTATTN_DEBUG");
  ck_assert_int_eq(da_log_enabled(DA_LOG_WARN), 0);
  ck_assert_int_eq(da_log_level_cached, DA_LOG_NONE);
  make_log_dir();
  char pattern[300];
  snprintf(pattern, sizeof pattern, "%s/log.%%h.%%p", log_dir);
  setenv("DISTATTN_DEBUG_FILE", pattern, 1); /* too late and no level: nothing created */
  DA_WARN(DA_SUB_ALL, "not written");
  char host[64] = {0}, path[512];
  gethostname(host, sizeof host - 1);
  if (strchr(host, '.')) *strchr(host, '.') = '\0';
  snprintf(path, sizeof path, "%s/log.%s.%d", log_dir, host, (int)getpid());
  struct stat sb;
  ck_assert_int_ne(stat(path, &sb), 0);
  rmdir(log_dir);
}
END_TEST

static Suite *core_suite(void) {
  Suite *s = suite_create("core");
  TCase *tc = tcase_create("dtype");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_test(tc, test_bf16_chosen_patterns);
  tcase_add_test(tc, test_f16_chosen_patterns);
  tcase_add_test(tc, test_f16_exhaustive_roundtrip);
  tcase_add_test(tc, test_bf16_exhaustive_roundtrip);
  tcase_add_test(tc, test_round_random_vs_oracle);
  tcase_add_test(tc, test_load_store);
  suite_add_tcase(s, tc);

  tc = tcase_create("rng");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_test(tc, test_philox_kat);
  tcase_add_test(tc, test_rng_row_matches_uniform);
  tcase_add_test(tc, test_rng_distribution_and_independence);
  suite_add_tcase(s, tc);

  tc = tcase_create("util");
  tcase_add_test(tc, test_parse_size);
  tcase_add_test(tc, test_status_strings);
  tcase_add_test(tc, test_error_message);
  tcase_add_test(tc, test_malloc_accounting);
  tcase_add_loop_test(tc, test_malloc_hugepages, 0, 2);
  tcase_add_test(tc, test_params);
  tcase_add_test(tc, test_default_nthreads_affinity);
  suite_add_tcase(s, tc);

  tc = tcase_create("mask");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_mask_random_spans, 0, 8);
  tcase_add_test(tc, test_mask_check_errors);
  tcase_add_test(tc, test_mask_describe);
  suite_add_tcase(s, tc);

  tc = tcase_create("log");
  tcase_add_test(tc, test_log_file_info);
  tcase_add_test(tc, test_log_levels_and_subsys);
  tcase_add_test(tc, test_log_off_by_default);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  /* The parent must not initialize the logger: each forked test reads the env afresh. */
  return tu_run(core_suite());
}
