/* tile.cuh: the index and arithmetic rules every CUDA kernel of distattn shares, as DA_HD
 * functions so host tests can hold them against core/mask.h and plain references: the mask on
 * global positions (as a per-row interval of allowed keys), the classification of a tile pair,
 * the key-index range a query tile visits, and the online-softmax fold in log2 units.
 * No kernels and no memory traffic here. */
#ifndef DA_CUDA_TILE_CUH
#define DA_CUDA_TILE_CUH

#include "compat.cuh"
#include "ptx.cuh"
#include <stdint.h>
#include "mask.h"

/* Document boundaries a kernel carries by value: da_mask_t.cu_seqlens is a HOST pointer, so the
 * launcher cuts the query rows of a call into chunks whose positions fall in at most
 * DA_DOC_INLINE documents and passes just those boundaries with each launch (a key is compared
 * only with the document of its query, so the other boundaries are never needed). */
#define DA_DOC_INLINE 24

/* The mask as the device sees it. bound[0..nb] are consecutive document boundaries (bound[i] is
 * the first position of the chunk's i-th document, bound[nb] the end of the last one; positions
 * past the last document of the whole mask form one more "document" ending at INT64_MAX). Only
 * queries whose positions lie in [bound[0], bound[nb]) may be asked about. */
struct da_dmask {
  unsigned flags;
  int nb;
  int64_t window;
  int64_t bound[DA_DOC_INLINE + 1];
};

/* Position of row i of a span (da_span_at of mask.h is host-only C). */
DA_HD int64_t da_pos(da_span_t s, int64_t i) { return s.start + i * s.stride; }

#define DA_POS_MIN ((int64_t)INT64_MIN / 4)
#define DA_POS_MAX ((int64_t)INT64_MAX / 4)

/* Allowed key positions of query position q: the interval [*lo, *hi] (every mask of distattn is
 * one interval per row: causal caps it at q, a window starts it at q - W + 1, a document clips it
 * to the document of q). Same semantics as da_mask_allows. Non-decreasing in q, which is what
 * makes the tile tests below exact at the tile's first and last rows. */
DA_HD void da_row_range(const da_dmask &m, int64_t q, int64_t *lo, int64_t *hi) {
  int64_t a = DA_POS_MIN, b = DA_POS_MAX;
  if (m.flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) b = q;
  if (m.flags & DA_MASK_WINDOW) a = q - m.window + 1;
  if (m.flags & DA_MASK_DOC) {
    int d = 0; /* last boundary <= q (few boundaries: a linear walk) */
    while (d + 1 < m.nb && m.bound[d + 1] <= q) d++;
    a = a > m.bound[d] ? a : m.bound[d];
    b = b < m.bound[d + 1] - 1 ? b : m.bound[d + 1] - 1;
  }
  *lo = a, *hi = b;
}

DA_HD bool da_dmask_allows(const da_dmask &m, int64_t q, int64_t k) {
  int64_t lo, hi;
  da_row_range(m, q, &lo, &hi);
  return lo <= k && k <= hi;
}

/* Key indices j (positions kpos.start + j * kpos.stride, j < kpos.count) inside the position
 * interval [lo, hi]: [*jlo, *jhi], empty when *jlo > *jhi. Both ends are clamped to [0, count]
 * and [-1, count - 1] instead of being reset when empty, so they stay non-decreasing in lo and
 * hi: the tile rules below rely on that. */
DA_HD void da_index_range(int64_t lo, int64_t hi, da_span_t kpos, int64_t *jlo, int64_t *jhi) {
  const int64_t k0 = kpos.start, k1 = kpos.start + (kpos.count - 1) * kpos.stride;
  *jlo = lo <= k0 ? 0 : lo > k1 ? kpos.count : (lo - k0 + kpos.stride - 1) / kpos.stride;
  *jhi = hi >= k1 ? kpos.count - 1 : hi < k0 ? -1 : (hi - k0) / kpos.stride;
}

/* Allowed key indices of query position q: [*jlo, *jhi] (empty: *jlo > *jhi). */
DA_HD void da_row_keys(const da_dmask &m, int64_t q, da_span_t kpos, int64_t *jlo, int64_t *jhi) {
  int64_t lo, hi;
  da_row_range(m, q, &lo, &hi);
  da_index_range(lo, hi, kpos, jlo, jhi);
}

/* The KV tiles of a query tile whose first and last rows sit at positions qa <= qb. Every row's
 * key range lies between the first row's and the last row's (both ends are non-decreasing in
 * the query position), so:
 *   visited keys: [first_lo, last_hi] (tiles outside are empty and never loaded);
 *   a KV tile of key indices [j0, j1] is FULL (no mask test) when last_lo <= j0 and
 *   first_hi >= j1.
 * Tiles in between are PARTIAL and tested per element (a PARTIAL tile may hold no allowed pair
 * for strided or documented spans; the element test then masks all of it). */
struct da_qtile_keys {
  int64_t first_lo, first_hi; /* key indices allowed for the first row */
  int64_t last_lo, last_hi;   /* ... and for the last row */
};

DA_HD da_qtile_keys da_qtile_keys_of(const da_dmask &m, int64_t qa, int64_t qb, da_span_t kpos) {
  da_qtile_keys t;
  da_row_keys(m, qa, kpos, &t.first_lo, &t.first_hi);
  da_row_keys(m, qb, kpos, &t.last_lo, &t.last_hi);
  return t;
}

DA_HD bool da_ktile_full(const da_qtile_keys &t, int64_t j0, int64_t j1) {
  return t.last_lo <= j0 && t.first_hi >= j1;
}

/* Tile class on positions, the same meaning as da_mask_classify for contiguous spans: EMPTY when
 * no (q, k) in [q0, q1] x [k0, k1] is allowed, FULL when all are, else PARTIAL. */
DA_HD int da_dmask_classify(const da_dmask &m, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  int64_t alo, ahi, blo, bhi;
  da_row_range(m, q0, &alo, &ahi);
  da_row_range(m, q1, &blo, &bhi);
  if (bhi < k0 || alo > k1) return DA_TILE_EMPTY;
  if (blo <= k0 && ahi >= k1) return DA_TILE_FULL;
  return DA_TILE_PARTIAL;
}

/* NaN-propagating max (a NaN score must poison its row, docs/decisions.md). */
DA_HD float da_fmax_nan(float a, float b) { return (b > a || b != b) ? b : a; }

/* One step of the online softmax in log2 units: a row with running max m_old sees scores whose
 * max is x. Returns the new max; *use is the value scores are shifted by (0 while the row has
 * seen nothing, so exp2(-inf - 0) = 0 instead of NaN) and *alpha the factor that rescales the
 * old sum and output. */
DA_HD float da_softmax_fold(float m_old, float x, float *use, float *alpha) {
  const float m_new = da_fmax_nan(m_old, x);
  *use = m_new == -INFINITY ? 0.0f : m_new;
#if defined(__CUDA_ARCH__) || defined(DA_SIMT)
  *alpha = da_exp2(m_old - *use);
#else
  *alpha = exp2f(m_old - *use);
#endif
  return m_new;
}

/* Host side: the device mask for the query rows [r0, *r1) of a call at positions qpos, with *r1
 * as large as DA_DOC_INLINE documents allow (all rows for masks without documents). The launcher
 * runs one launch per chunk; only documents of the chunk's queries are carried (a key outside
 * its query's document is masked whatever document it is in). */
inline da_dmask da_dmask_chunk(const da_mask_t *m, da_span_t qpos, int64_t r0, int64_t *r1) {
  da_dmask d;
  d.flags = m->flags;
  d.window = m->window;
  d.nb = 0;
  for (int i = 0; i <= DA_DOC_INLINE; i++) d.bound[i] = DA_POS_MAX;
  *r1 = qpos.count;
  if (!(m->flags & DA_MASK_DOC)) return d;
  const int64_t d0 = da_mask_doc_of(m, da_span_at(qpos, r0));
  const int64_t nd = m->ndocs + 1 - d0 < DA_DOC_INLINE ? m->ndocs + 1 - d0 : DA_DOC_INLINE;
  d.nb = (int)nd;
  for (int64_t i = 0; i <= nd; i++) d.bound[i] = d0 + i <= m->ndocs ? m->cu_seqlens[d0 + i] : DA_POS_MAX;
  const int64_t end = d.bound[nd]; /* first position past the chunk's documents */
  if (end < DA_POS_MAX) {
    const int64_t n = end <= qpos.start ? 0 : (end - qpos.start + qpos.stride - 1) / qpos.stride;
    *r1 = n < qpos.count ? n : qpos.count;
  }
  if (*r1 <= r0) *r1 = r0 + 1; /* cannot happen (row r0 is in document d0); keeps progress */
  return d;
}

#endif /* DA_CUDA_TILE_CUH */
