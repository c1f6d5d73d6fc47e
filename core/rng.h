/* rng.h: counter-based random numbers (Philox4x32-10, Salmon et al. 2011) keyed by
 * (seed, tensor, global position, head, dim), so any rank regenerates any row of any input
 * without communication or state. Not a cryptographic generator. */
#ifndef DA_RNG_H
#define DA_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Tensor ids of the seeded inputs. */
enum { DA_RNG_Q = 1, DA_RNG_K = 2, DA_RNG_V = 3, DA_RNG_DOUT = 4, DA_RNG_USER = 16 };

/* Four 32-bit words of Philox4x32-10 for counter (c0..c3) and key (k0, k1). */
void da_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

/* Uniform in [-1, 1) for element (pos, head, d) of a tensor. */
float da_rng_uniform(uint64_t seed, uint32_t tensor, int64_t pos, int64_t head, int64_t d);

/* Row (pos, head) of a tensor: out[d] = da_rng_uniform(seed, tensor, pos, head, d), d < D. */
void da_rng_row(uint64_t seed, uint32_t tensor, int64_t pos, int64_t head, int64_t D, float *out);

#ifdef __cplusplus
}
#endif
#endif /* DA_RNG_H */
