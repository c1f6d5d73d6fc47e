/* mask.h: attention masks evaluated on global token positions, shared by the kernels (per
 * element and per tile) and by partition/ (which block pairs a schedule may skip, how much useful
 * work a pair holds). Positions of a block are an arithmetic progression (a span). */
#ifndef DA_MASK_H
#define DA_MASK_H

#include <stdint.h>
#include "distattn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Global positions start, start + stride, ..., start + (count-1)*stride; stride >= 1. */
typedef struct da_span {
  int64_t start, stride, count;
} da_span_t;

static inline da_span_t da_span(int64_t start, int64_t stride, int64_t count) {
  da_span_t s = {start, stride, count};
  return s;
}
static inline int64_t da_span_at(da_span_t s, int64_t i) { return s.start + i * s.stride; }
static inline int64_t da_span_last(da_span_t s) { return s.start + (s.count - 1) * s.stride; }
/* Sub-span of rows [i0, i0 + n). */
static inline da_span_t da_span_sub(da_span_t s, int64_t i0, int64_t n) {
  da_span_t r = {s.start + i0 * s.stride, s.stride, n};
  return r;
}

typedef struct da_mask {
  unsigned flags;             /* DA_MASK_CAUSAL | DA_MASK_WINDOW | DA_MASK_DOC */
  int64_t window;             /* W: allowed iff 0 <= q - k < W (window implies causal) */
  int64_t ndocs;              /* documents for DA_MASK_DOC ... */
  const int64_t *cu_seqlens;  /* ... cumulative lengths [ndocs + 1], cu_seqlens[0] == 0 */
} da_mask_t;

/* Document index of a position (binary search); positions past the last document get ndocs. */
static inline int64_t da_mask_doc_of(const da_mask_t *m, int64_t pos) {
  int64_t lo = 0, hi = m->ndocs; /* invariant: cu[lo] <= pos, answer in [lo, hi] */
  if (pos >= m->cu_seqlens[m->ndocs]) return m->ndocs;
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (m->cu_seqlens[mid] <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* Does query position q see key position k? */
static inline int da_mask_allows(const da_mask_t *m, int64_t q, int64_t k) {
  if ((m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) && k > q) return 0;
  if ((m->flags & DA_MASK_WINDOW) && q - k >= m->window) return 0;
  if ((m->flags & DA_MASK_DOC) && da_mask_doc_of(m, q) != da_mask_doc_of(m, k)) return 0;
  return 1;
}

/* For query position q, the allowed key positions form the interval [*lo, *hi] (may be empty:
 * *lo > *hi), given keys exist in [kmin, kmax]. Every mask here is an interval per query row. */
void da_mask_row_range(const da_mask_t *m, int64_t q, int64_t kmin, int64_t kmax, int64_t *lo,
                       int64_t *hi);

typedef enum { DA_TILE_EMPTY = 0, DA_TILE_PARTIAL = 1, DA_TILE_FULL = 2 } da_tile_class_t;

/* Classify the block pair (q positions in [q0, q1], k positions in [k0, k1]): EMPTY when no pair
 * is allowed, FULL when every pair is, PARTIAL otherwise (conservative: a PARTIAL block may turn
 * out empty for strided spans; EMPTY and FULL are exact). */
da_tile_class_t da_mask_classify(const da_mask_t *m, int64_t q0, int64_t q1, int64_t k0, int64_t k1);

/* Number of allowed (q, k) pairs between two spans: the useful work of a block pair. */
int64_t da_mask_count_pairs(const da_mask_t *m, da_span_t q, da_span_t k);

/* Validate a mask against a sequence length; DA_ERR_INVALID_ARGUMENT with a message if bad. */
da_status_t da_mask_check(const da_mask_t *m, int64_t seq);

/* "none", "causal", "window:128", "doc:100,200", "causal+doc:..", ... into buf. */
const char *da_mask_describe(const da_mask_t *m, char *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* DA_MASK_H */
