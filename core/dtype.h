/* dtype.h: scalar conversions between float32 and the 16-bit storage types (bf16, fp16),
 * portable C, inlined for the kernels' load/store paths. Round-to-nearest-even; NaN stays NaN,
 * Inf stays Inf; fp16 overflow gives Inf, underflow gives subnormals then signed zero. */
#ifndef DA_DTYPE_H
#define DA_DTYPE_H

#include <stdint.h>
#include <string.h>

static inline float da_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t da_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float da_bf16_to_f32(uint16_t h) { return da_bits_to_f32((uint32_t)h << 16); }

static inline uint16_t da_f32_to_bf16(float f) {
  uint32_t u = da_f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float da_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return da_bits_to_f32(sign | 0x7f800000u | (man << 13)); /* inf / nan */
  if (exp == 0) {
    if (man == 0) return da_bits_to_f32(sign);
    /* subnormal: man * 2^-24 is exact in float */
    float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return da_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t da_f32_to_f16(float f) {
  uint32_t u = da_f32_to_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
  if (a < 0x38800000u) {                                    /* below 2^-14: subnormal */
    if (a < 0x33000000u) return sign;                       /* below 2^-25: zero */
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = a - 0x38000000u; /* rebias 127 -> 15 */
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

/* Element i of a buffer of dtype dt (0 = f32, 1 = bf16, 2 = f16) as float. */
static inline float da_load_f32(const void *p, int dt, int64_t i) {
  switch (dt) {
    case 0: return ((const float *)p)[i];
    case 1: return da_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return da_f16_to_f32(((const uint16_t *)p)[i]);
  }
}
static inline void da_store_f32(void *p, int dt, int64_t i, float x) {
  switch (dt) {
    case 0: ((float *)p)[i] = x; break;
    case 1: ((uint16_t *)p)[i] = da_f32_to_bf16(x); break;
    default: ((uint16_t *)p)[i] = da_f32_to_f16(x); break;
  }
}
/* Round a float through a storage dtype (what a value becomes once stored). */
static inline float da_round_to(int dt, float x) {
  if (dt == 1) return da_bf16_to_f32(da_f32_to_bf16(x));
  if (dt == 2) return da_f16_to_f32(da_f32_to_f16(x));
  return x;
}

#endif /* DA_DTYPE_H */
