/* verify.h: float64 verification of sampled rows of a distributed run, on the rank that owns
 * them: inputs are regenerated from the counter RNG (any rank can make any row), keys are
 * streamed in chunks, and no q/k/v/out rows are gathered. Used by `distattn run`. */
#ifndef DA_VERIFY_H
#define DA_VERIFY_H

#include <stdint.h>
#include "kernels.h"

typedef struct da_vprob {
  int64_t B, S;
  da_kparams_t kp; /* H, G, D, scale, dtype, mask */
  uint64_t seed;
  /* Where the reference reads input rows: NULL = regenerated from the counter RNG (seed);
   * otherwise rows(rows_ctx, tensor, b, pos, heads, dst) puts row pos of tensor (DA_RNG_Q/K/V/
   * DOUT) of batch element b, as stored, into dst [heads][D] and returns 0, or -1 when it cannot
   * (a read error). Rows are asked for in increasing position, so a source can read ahead. */
  int (*rows)(void *rows_ctx, uint32_t tensor, int64_t b, int64_t pos, int heads, double *dst);
  void *rows_ctx;
} da_vprob_t;

/* The RNG seed of batch element b (each element gets its own stream). */
uint64_t da_verify_seed(uint64_t seed, int64_t b);

/* Rows at global positions pos[0..n) of tensor (DA_RNG_Q/K/V/DOUT) of batch element b, rounded to
 * the dtype, into buf [n][heads][D] (dtype, row stride ld elements). */
void da_verify_gen(const da_vprob_t *vp, uint32_t tensor, int64_t b, const int64_t *pos, int64_t n, int heads,
                   void *buf, int64_t ld);

/* Query row (b, qpos) from scratch in float64: out [H][D], lse [H]. 0 on success, -1 on OOM or
 * when the row source fails (likewise below). */
int da_verify_fwd_row(const da_vprob_t *vp, int64_t b, int64_t qpos, double *out, double *lse);

/* dq row [H][D] of query (b, qpos) in float64, given its float64 out and lse from fwd_row; noise
 * [H]: the rounding noise of each head's row (da_verify_den). */
int da_verify_dq_row(const da_vprob_t *vp, int64_t b, int64_t qpos, const double *out, const double *lse,
                     double *dq, double *noise);

/* dk, dv rows [G][D] of key (b, kpos) in float64 over every query that sees it. The per-query
 * softmax statistics lse and delta = rowsum(dout * out) ([S][H] of batch b) come from the run:
 * recomputing them exactly would cost a full float64 forward of every query. */
int da_verify_dkv_row(const da_vprob_t *vp, int64_t b, int64_t kpos, const float *lse_all, const float *delta_all,
                      double *dk, double *dv, double *noise_k, double *noise_v);

/* Error of len values of x (dtype dt, from offset off) against ref: *abs_err = max|x - ref|
 * (NaN -> +inf) and *ref_max = max|ref|, or NaN when ref itself holds a NaN or an infinity
 * (poisoned inputs: the row is counted apart, never as wrong). The relative error of the row is then
 * abs_err / max(ref_max, floor): see da_verify_floor. */
void da_verify_err(const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len, double *abs_err,
                   double *ref_max);

/* max|x - ref| / max(max|ref|, 1e-6) of one row, for outputs (never exactly 0 in practice); NaN
 * when ref holds a non-finite value. */
double da_verify_rel(const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len, double *abs_err);

/* The floor of the per-row scale: 10% of the largest |ref| over the verified rows of the same
 * tensor (at least 1e-6). A row whose exact value is 0 (dq of a query that sees one key, say)
 * is then measured against the tensor's scale instead of against rounding noise. */
static inline double da_verify_floor(double tensor_ref_max) {
  double f = 0.1 * tensor_ref_max;
  return f > 1e-6 ? f : 1e-6;
}

/* The gradients cancel: dS = P * (dP - delta) is a difference of two dot products the kernels
 * evaluate in fp32, so a gradient row is known only to within its rounding noise, whatever its
 * size: the unit roundoff 2^-24 times the magnitudes that cancel (the terms of dP, delta, lse),
 * summed over the row's pairs in quadrature (rounding errors of different pairs are independent)
 * and taken at the largest element of the row (da_verify_dq_row, da_verify_dkv_row). When every
 * pair cancels exactly (a query that sees one key: seq 1, window:1, documents of one token) the
 * whole tensor is 0 in exact arithmetic and both the kernel's result and the float64 reference
 * built from the run's fp32 lse and delta are pure noise of that size. So the scale of a row is
 * max(its max|ref|, the tensor floor, DA_VERIFY_NOISE_K * noise / tol): an error of up to
 * DA_VERIFY_NOISE_K times the row's rounding noise passes, a larger one is measured as before.
 * For rows that do not cancel the noise term is orders of magnitude below the row's own |ref|
 * (its share of the scale is u * sqrt(pairs) / sqrt(pairs) ~ 1e-7 per unit of magnitude), so the
 * check is unchanged there. K = 8 covers the largest of a row's D elements of a dot product of up
 * to D terms (a few standard deviations) with room. */
#define DA_VERIFY_NOISE_K 8.0
static inline double da_verify_den(double row_ref_max, double tensor_ref_max, double noise, double tol) {
  double f = da_verify_floor(tensor_ref_max), n = DA_VERIFY_NOISE_K * noise / tol;
  double den = row_ref_max > f ? row_ref_max : f;
  return n > den ? n : den;
}

/* ---- non-finite values: a testing aid and the counts the reports show ----
 * DISTATTN_TEST_NONFINITE="TENSOR:POS[:nan|inf|-inf][,...]" (testing aid, docs/reliability.md)
 * poisons the seeded inputs: element 0 of head 0 of the row at global position POS of TENSOR
 * (q, k, v, dout), in every batch element, becomes NaN (default), +Inf or -Inf, both in what the
 * ranks compute on (da_verify_gen, and the decode's own generation through da_verify_poison) and
 * in the float64 reference, so verification knows which rows must come out non-finite.
 * da_verify_poison_init parses it; call it once before any generation: 0 when unset or valid,
 * -1 with a message in err when malformed. */
int da_verify_poison_init(char *err, size_t n);
/* Apply the poison to a generated row [D] of tensor (DA_RNG_*) at global position pos, head h. */
void da_verify_poison(uint32_t tensor, int64_t pos, int h, float *row);

/* Number of values among x[0..n) (dtype dt) that are NaN or infinite. */
int64_t da_count_nonfinite(const void *x, da_dtype_t dt, int64_t n);

#endif /* DA_VERIFY_H */
