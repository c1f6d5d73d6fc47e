/* test_util.h: small helpers shared by the unit suites (test_ref, test_kernels, test_api):
 * seeded inputs from core/rng.h stored in any dtype with padded row strides, NaN poisoning, and
 * the error measures used against the float64 reference. Header-only, static functions; it is
 * not a test framework and computes no attention itself. */
#ifndef DA_TEST_UTIL_H
#define DA_TEST_UTIL_H

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "dtype.h"
#include "mask.h"
#include "rng.h"

/* Check's default per-test timeout is 4 s; the 1000-token reference cases need more. Scaled by
 * CK_TIMEOUT_MULTIPLIER as usual (e.g. under the sanitizers). */
#define TU_TIMEOUT 120

/* A deterministic generator for choosing shapes and split points (splitmix64): seeds are the
 * loop index of the test, so a failing case can be rerun alone. */
static inline uint64_t tu_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* Uniform integer in [lo, hi]. */
static inline int64_t tu_rand(uint64_t *s, int64_t lo, int64_t hi) {
  return lo + (int64_t)(tu_next(s) % (uint64_t)(hi - lo + 1));
}
static inline double tu_rand01(uint64_t *s) { return (double)(tu_next(s) >> 11) * 0x1.0p-53; }

static inline void *tu_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  ck_assert_msg(p != NULL, "out of memory (%zu bytes)", n);
  return p;
}

/* Fill rows [n][heads][D] of buf (dtype dt, row stride ld elements, heads packed) with seeded
 * values at the global positions of pos, times amp, rounded to dt. ref (may be NULL) receives the
 * same rounded values as double, packed [n][heads][D]: the reference sees exactly what the
 * kernel sees. Values are uniform in [-amp, amp), never all zero. */
static inline void tu_fill(uint64_t seed, uint32_t tensor, da_span_t pos, int heads, int D, da_dtype_t dt,
                           void *buf, int64_t ld, double *ref, float amp) {
  float *row = tu_xmalloc((size_t)D * sizeof(float));
  for (int64_t i = 0; i < pos.count; i++)
    for (int h = 0; h < heads; h++) {
      da_rng_row(seed, tensor, da_span_at(pos, i), h, D, row);
      for (int d = 0; d < D; d++) {
        float x = da_round_to((int)dt, amp * row[d]);
        if (buf) da_store_f32(buf, (int)dt, i * ld + (int64_t)h * D + d, x);
        if (ref) ref[(i * heads + h) * D + d] = x;
      }
    }
  free(row);
}

/* Fill n elements of dtype dt with NaN, so an output a kernel forgets to write is caught. */
static inline void tu_poison(void *buf, da_dtype_t dt, int64_t n) {
  if (dt == DA_FLOAT32) {
    for (int64_t i = 0; i < n; i++) ((float *)buf)[i] = NAN;
  } else {
    uint16_t nan16 = dt == DA_BFLOAT16 ? 0x7fc0 : 0x7e00;
    for (int64_t i = 0; i < n; i++) ((uint16_t *)buf)[i] = nan16;
  }
}

/* Rows [n][heads][D] of a dtype buffer with row stride ld, as packed double. */
static inline void tu_load(const void *buf, da_dtype_t dt, int64_t n, int heads, int D, int64_t ld, double *dst) {
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < (int64_t)heads * D; j++) dst[i * heads * D + j] = da_load_f32(buf, (int)dt, i * ld + j);
}

/* Tolerances (design §5, docs/decisions.md "Verification"): fp32 1e-4; bf16/fp16 2e-2. The
 * reference runs in float64 on the same rounded inputs, so the budget covers only the kernel's
 * fp32 accumulation and, for 16-bit, the rounding of the stored output (2^-9 relative for bf16). */
static inline double tu_tol(da_dtype_t dt) { return dt == DA_FLOAT32 ? 1e-4 : 2e-2; }

/* Error of a result: returns the worst normalized error and where it was (index into the packed
 * array). Per-row mode (row_len = D) divides by the row's max |ref| (floored at 1e-6), as the
 * verifier does: an output row is a convex combination of v rows, so its own size is the right
 * scale. Per-tensor mode (row_len = n) divides by the whole tensor's max |ref|: used for
 * gradients, whose rows are sums of signed terms and can be small by cancellation alone, which
 * says nothing about the kernel. A NaN/Inf where the reference is finite is an infinite error. */
static inline double tu_err(const double *ref, const double *got, int64_t n, int64_t row_len, int64_t *where) {
  double worst = 0;
  *where = -1;
  for (int64_t r0 = 0; r0 < n; r0 += row_len) {
    int64_t r1 = r0 + row_len < n ? r0 + row_len : n;
    double scale = 1e-6;
    for (int64_t i = r0; i < r1; i++)
      if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    for (int64_t i = r0; i < r1; i++) {
      double e = isfinite(got[i]) ? fabs(got[i] - ref[i]) / scale : INFINITY;
      if (isnan(ref[i]) && isnan(got[i])) e = 0;
      if (*where < 0 || e > worst) {
        worst = e;
        *where = i;
      }
    }
  }
  return worst;
}

/* lse: -inf must match -inf exactly (a fully masked row); finite values compare with an absolute
 * error scaled by 1 + |lse| (lse is a log: its absolute error is the relative error of the
 * softmax denominator). */
static inline double tu_lse_err(const double *ref, const double *got, int64_t n, int64_t *where) {
  double worst = 0;
  *where = -1;
  for (int64_t i = 0; i < n; i++) {
    double e;
    if (ref[i] == -INFINITY) e = got[i] == -INFINITY ? 0 : INFINITY;
    else e = isfinite(got[i]) ? fabs(got[i] - ref[i]) / (1 + fabs(ref[i])) : INFINITY;
    if (*where < 0 || e > worst) {
      worst = e;
      *where = i;
    }
  }
  return worst;
}

/* Assert a result is within tol; the message names the case, the tensor and the worst element
 * (row, head, d) so a failure can be reproduced by hand. */
#define TU_CHECK_CLOSE(what, ref, got, n, H, D, row_len, tol, desc)                                        \
  do {                                                                                                     \
    int64_t w_;                                                                                            \
    double e_ = tu_err((ref), (got), (n), (row_len), &w_);                                                 \
    ck_assert_msg(e_ <= (tol),                                                                             \
                  "%s: %s error %.3g > %.3g at row %lld head %lld d %lld: got %.9g, reference %.9g",      \
                  (desc), (what), e_, (double)(tol), (long long)(w_ / ((int64_t)(H) * (D))),               \
                  (long long)((w_ / (D)) % (H)), (long long)(w_ % (D)), (got)[w_], (ref)[w_]);             \
  } while (0)

#define TU_CHECK_LSE(what, ref, got, n, H, tol, desc)                                                      \
  do {                                                                                                     \
    int64_t w_;                                                                                            \
    double e_ = tu_lse_err((ref), (got), (n), &w_);                                                        \
    ck_assert_msg(e_ <= (tol), "%s: %s error %.3g > %.3g at row %lld head %lld: got %.9g, reference %.9g", \
                  (desc), (what), e_, (double)(tol), (long long)(w_ / (H)), (long long)(w_ % (H)),         \
                  (got)[w_], (ref)[w_]);                                                                   \
  } while (0)

/* max_j |x - ref| / max(max_j |ref|, floor) over one row of len elements of x (dtype dt, from
 * element off): a per-row scale, floored (at least 1e-6) so that rows whose exact value is 0 (dq
 * of a query that sees a single key) are measured against the tensor's scale
 * (docs/decisions.md, Verification). NaN in x is a failure. */
static inline double tu_row_err(const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len,
                                double floor) {
  double e = 0, m = 0;
  for (int64_t j = 0; j < len; j++) {
    double a = da_load_f32(x, (int)dt, off + j), d = fabs(a - ref[j]);
    if (!(d <= e)) e = d;
    if (fabs(ref[j]) > m) m = fabs(ref[j]);
  }
  if (floor < 1e-6) floor = 1e-6;
  return e / (m > floor ? m : floor);
}

/* Documents covering [0, S): ndocs lengths >= 1 around S / ndocs with random jitter (ndocs is
 * clamped to S). cu gets ndocs + 1 entries; returns the number of documents. */
static inline int64_t tu_docs(uint64_t *rs, int64_t S, int64_t ndocs, int64_t *cu) {
  if (ndocs > S) ndocs = S;
  int64_t j = S / (3 * ndocs);
  cu[0] = 0;
  for (int64_t i = 1; i < ndocs; i++) {
    int64_t c = S * i / ndocs + tu_rand(rs, -j, j);
    if (c < cu[i - 1] + 1) c = cu[i - 1] + 1;
    if (c > S - (ndocs - i)) c = S - (ndocs - i);
    cu[i] = c;
  }
  cu[ndocs] = S;
  return ndocs;
}

/* ---- added for test_ref / test_kernels / test_api ------------------------------------------ */

/* The six mask kinds every suite sweeps (design §2: none, causal, window, doc and combinations). */
enum { TU_MASK_NONE, TU_MASK_CAUSAL, TU_MASK_WINDOW, TU_MASK_DOC, TU_MASK_CAUSAL_DOC, TU_MASK_WINDOW_DOC, TU_NMASKS };

/* A mask of kind `kind` over positions [0, S): window W drawn in [1, S] (small windows favoured,
 * so query blocks that see nothing of a KV block occur), documents from tu_docs with at most
 * ndocs_max documents (cu needs ndocs_max + 1 entries and must outlive the mask). */
static inline da_mask_t tu_mask(int kind, int64_t S, uint64_t *rs, int64_t *cu, int64_t ndocs_max) {
  da_mask_t m;
  memset(&m, 0, sizeof m);
  if (kind == TU_MASK_CAUSAL || kind == TU_MASK_CAUSAL_DOC) m.flags |= DA_MASK_CAUSAL;
  if (kind == TU_MASK_WINDOW || kind == TU_MASK_WINDOW_DOC) {
    m.flags |= DA_MASK_WINDOW;
    m.window = tu_rand(rs, 0, 3) == 0 ? tu_rand(rs, 1, S) : tu_rand(rs, 1, S / 8 + 1);
  }
  if (kind >= TU_MASK_DOC) {
    m.flags |= DA_MASK_DOC;
    m.ndocs = tu_docs(rs, S, tu_rand(rs, 1, ndocs_max), cu);
    m.cu_seqlens = cu;
  }
  return m;
}

static inline const char *tu_dtype_name(da_dtype_t dt) {
  return dt == DA_FLOAT32 ? "fp32" : dt == DA_BFLOAT16 ? "bf16" : "fp16";
}

/* Base seed of the seeded inputs: DISTATTN_TEST_SEED when set (to try other inputs), else a
 * fixed value, so a failure reproduces; every failure message prints the seed in use. */
static inline uint64_t tu_seed(uint64_t salt) {
  const char *e = getenv("DISTATTN_TEST_SEED");
  uint64_t base = e && *e ? strtoull(e, NULL, 0) : 20261123ull;
  return base * 1000003ull + salt;
}

/* Number of NaN entries in n doubles. */
static inline int64_t tu_count_nan(const double *x, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; i++) c += isnan(x[i]) != 0;
  return c;
}

/* tu_err with the scale floored at `floor` rather than 1e-6: for gradients that vanish in exact
 * arithmetic by cancellation (a row that sees one key has dS = P (dP - delta) = 0), where the
 * kernel's honest rounding error is relative to the terms that cancel, not to the result. */
static inline double tu_err_floor(const double *ref, const double *got, int64_t n, int64_t row_len, double floor,
                                  int64_t *where) {
  double worst = 0;
  *where = -1;
  for (int64_t r0 = 0; r0 < n; r0 += row_len) {
    int64_t r1 = r0 + row_len < n ? r0 + row_len : n;
    double scale = floor > 1e-6 ? floor : 1e-6;
    for (int64_t i = r0; i < r1; i++)
      if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    for (int64_t i = r0; i < r1; i++) {
      double e = isfinite(got[i]) ? fabs(got[i] - ref[i]) / scale : INFINITY;
      if (isnan(ref[i]) && isnan(got[i])) e = 0;
      if (*where < 0 || e > worst) {
        worst = e;
        *where = i;
      }
    }
  }
  return worst;
}

#define TU_CHECK_CLOSE_FLOOR(what, ref, got, n, H, D, row_len, floor, tol, desc)                            \
  do {                                                                                                     \
    int64_t w_;                                                                                            \
    double e_ = tu_err_floor((ref), (got), (n), (row_len), (floor), &w_);                                  \
    ck_assert_msg(e_ <= (tol),                                                                             \
                  "%s: %s error %.3g > %.3g (scale floor %.3g) at row %lld head %lld d %lld: got %.9g, "  \
                  "reference %.9g",                                                                        \
                  (desc), (what), e_, (double)(tol), (double)(floor), (long long)(w_ / ((int64_t)(H) * (D))), \
                  (long long)((w_ / (D)) % (H)), (long long)(w_ % (D)), (got)[w_], (ref)[w_]);             \
  } while (0)

#endif /* DA_TEST_UTIL_H */
