/* mask.c: interval form of every mask, tile classification and pair counting. */
#include <stdio.h>
#include "core.h"
#include "mask.h"

void da_mask_row_range(const da_mask_t *m, int64_t q, int64_t kmin, int64_t kmax, int64_t *lo,
                       int64_t *hi) {
  int64_t a = kmin, b = kmax;
  if ((m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) && b > q) b = q;
  if ((m->flags & DA_MASK_WINDOW) && a < q - m->window + 1) a = q - m->window + 1;
  if (m->flags & DA_MASK_DOC) {
    int64_t d = da_mask_doc_of(m, q);
    int64_t ds = d < m->ndocs ? m->cu_seqlens[d] : m->cu_seqlens[m->ndocs];
    int64_t de = d < m->ndocs ? m->cu_seqlens[d + 1] - 1 : INT64_MAX;
    if (a < ds) a = ds;
    if (b > de) b = de;
  }
  *lo = a;
  *hi = b;
}

da_tile_class_t da_mask_classify(const da_mask_t *m, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  int full = 1;
  if (m->flags & (DA_MASK_CAUSAL | DA_MASK_WINDOW)) {
    if (k0 > q1) return DA_TILE_EMPTY;
    if (k1 > q0) full = 0;
  }
  if (m->flags & DA_MASK_WINDOW) {
    if (q0 - k1 >= m->window) return DA_TILE_EMPTY;
    if (q1 - k0 >= m->window) full = 0;
  }
  if (m->flags & DA_MASK_DOC) {
    int64_t dq0 = da_mask_doc_of(m, q0), dq1 = da_mask_doc_of(m, q1);
    int64_t dk0 = da_mask_doc_of(m, k0), dk1 = da_mask_doc_of(m, k1);
    if (dq1 < dk0 || dk1 < dq0) return DA_TILE_EMPTY;
    if (!(dq0 == dq1 && dk0 == dk1 && dq0 == dk0)) full = 0;
  }
  return full ? DA_TILE_FULL : DA_TILE_PARTIAL;
}

/* Count of span elements with position in [lo, hi]. */
static int64_t span_count_in(da_span_t s, int64_t lo, int64_t hi) {
  if (s.count <= 0 || lo > hi) return 0;
  int64_t first = s.start, last = da_span_last(s);
  if (hi < first || lo > last) return 0;
  int64_t i0 = lo <= first ? 0 : (lo - first + s.stride - 1) / s.stride;
  int64_t i1 = hi >= last ? s.count - 1 : (hi - first) / s.stride;
  return i1 >= i0 ? i1 - i0 + 1 : 0;
}

int64_t da_mask_count_pairs(const da_mask_t *m, da_span_t q, da_span_t k) {
  if (q.count <= 0 || k.count <= 0) return 0;
  int64_t k0 = k.start, k1 = da_span_last(k);
  da_tile_class_t c = da_mask_classify(m, q.start, da_span_last(q), k0, k1);
  if (c == DA_TILE_EMPTY) return 0;
  if (c == DA_TILE_FULL) return q.count * k.count;
  int64_t n = 0;
  for (int64_t i = 0; i < q.count; i++) {
    int64_t lo, hi;
    da_mask_row_range(m, da_span_at(q, i), k0, k1, &lo, &hi);
    n += span_count_in(k, lo, hi);
  }
  return n;
}

da_status_t da_mask_check(const da_mask_t *m, int64_t seq) {
  if (m->flags & ~(unsigned)(DA_MASK_CAUSAL | DA_MASK_WINDOW | DA_MASK_DOC))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: unknown flag bits 0x%x", m->flags);
  if ((m->flags & DA_MASK_WINDOW) && m->window < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: window %lld must be >= 1", (long long)m->window);
  if (m->flags & DA_MASK_DOC) {
    if (m->ndocs < 1 || !m->cu_seqlens)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: doc mask needs ndocs >= 1 and cu_seqlens");
    if (m->cu_seqlens[0] != 0)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: cu_seqlens[0] = %lld, must be 0",
                    (long long)m->cu_seqlens[0]);
    for (int64_t i = 0; i < m->ndocs; i++)
      if (m->cu_seqlens[i + 1] <= m->cu_seqlens[i])
        return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: document %lld has length %lld (must be > 0)",
                      (long long)i, (long long)(m->cu_seqlens[i + 1] - m->cu_seqlens[i]));
    if (m->cu_seqlens[m->ndocs] != seq)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mask: documents cover %lld tokens but seq = %lld",
                    (long long)m->cu_seqlens[m->ndocs], (long long)seq);
  }
  return DA_SUCCESS;
}

const char *da_mask_describe(const da_mask_t *m, char *buf, size_t n) {
  size_t off = 0;
  buf[0] = '\0';
#define APPEND(...) do { int w_ = snprintf(buf + off, off < n ? n - off : 0, __VA_ARGS__); if (w_ > 0) off += (size_t)w_; } while (0)
  if (m->flags & DA_MASK_WINDOW) APPEND("window:%lld", (long long)m->window);
  else if (m->flags & DA_MASK_CAUSAL) APPEND("causal");
  if (m->flags & DA_MASK_DOC) {
    APPEND("%sdoc:", off ? "+" : "");
    for (int64_t i = 0; i < m->ndocs && off < n; i++)
      APPEND("%s%lld", i ? "," : "", (long long)(m->cu_seqlens[i + 1] - m->cu_seqlens[i]));
  }
  if (!off) APPEND("none");
#undef APPEND
  return buf;
}
