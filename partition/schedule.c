/* schedule.c: the ring block schedule (which (Q segment, KV sub-block) pairs each rank computes
 * at each step, with the exact useful work of each) and its invariant checker. Pure bookkeeping:
 * it moves no data and runs no kernel; comm/ring.c walks the items it lists. */
#include <stdlib.h>
#include <string.h>
#include "partition.h"

/* S*S pairs must fit in int64_t. */
#define DA_SCHEDULE_MAX_SEQ ((int64_t)3037000499)
/* Q rows below which the pair counter stops splitting and counts row by row. */
#define DA_COUNT_LEAF 64
/* Rows of PARTIAL items the checker recounts with da_mask_count_pairs (a different algorithm
 * from the schedule's counter); items past the budget are trusted, their sum is still checked. */
#define DA_CHECK_RECOUNT_ROWS ((int64_t)1 << 24)

/* Allowed pairs between spans q and k, whose range classification is c. Splits Q in halves until
 * each half is EMPTY or FULL as a range (O(1) each) or small, so only rows near a mask boundary
 * are counted one by one: O(rows on the boundary * log) instead of O(q.count) per item. This
 * keeps a 1M-token striped schedule (every item PARTIAL) cheap. */
static int64_t tri_clamp(int64_t X, int64_t m) { /* sum of clamp(x, 0, m) for x = 0 .. X-1, X >= 0 */
  return X <= m + 1 ? X * (X - 1) / 2 : m * (m + 1) / 2 + (X - m - 1) * m;
}

static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

static int64_t count_pairs_fast(const da_mask_t *m, da_span_t q, da_span_t k, da_tile_class_t c) {
  if (c == DA_TILE_EMPTY) return 0;
  if (c == DA_TILE_FULL) return q.count * k.count;
  if (m->flags == DA_MASK_CAUSAL && q.stride == k.stride && q.stride > 0) {
    /* Plain causal, equal strides (contiguous and striped shards): row i of q sees
     * clamp(c0 + i, 0, k.count) keys, c0 = floor((q.start - k.start) / stride) + 1. A striped
     * item is PARTIAL on every row, so halving would reach the leaves: O(1) instead of O(rows). */
    int64_t c0 = floor_div(q.start - k.start, k.stride) + 1, hi = c0 + q.count;
    return tri_clamp(hi > 0 ? hi : 0, k.count) - tri_clamp(c0 > 0 ? c0 : 0, k.count);
  }
  if (q.count <= DA_COUNT_LEAF) return da_mask_count_pairs(m, q, k);
  int64_t h = q.count / 2;
  da_span_t a = da_span_sub(q, 0, h), b = da_span_sub(q, h, q.count - h);
  int64_t k0 = k.start, k1 = da_span_last(k);
  return count_pairs_fast(m, a, k, da_mask_classify(m, a.start, da_span_last(a), k0, k1)) +
         count_pairs_fast(m, b, k, da_mask_classify(m, b.start, da_span_last(b), k0, k1));
}

typedef struct {
  da_work_item_t *v;
  int64_t n, cap;
} item_vec_t;

static da_status_t item_push(item_vec_t *iv, const da_work_item_t *it) {
  if (iv->n == iv->cap) {
    int64_t cap = iv->cap ? 2 * iv->cap : 256;
    da_work_item_t *v = da_malloc((size_t)cap * sizeof *v, 64);
    if (!v) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "schedule: %lld work items", (long long)cap);
    if (iv->n) memcpy(v, iv->v, (size_t)iv->n * sizeof *v);
    da_free(iv->v);
    iv->v = v;
    iv->cap = cap;
  }
  iv->v[iv->n++] = *it;
  return DA_SUCCESS;
}

da_status_t da_schedule_ring(const da_layout_t *L, const da_mask_t *m, int64_t block,
                             da_schedule_t *S) {
  if (!S) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule: NULL schedule");
  memset(S, 0, sizeof *S);
  if (!L || !L->counts || !m)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule: NULL or uninitialized layout or mask");
  if (L->nranks < 1 || L->seq < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule: seq %lld, nranks %d", (long long)L->seq,
                  L->nranks);
  if (block < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule: block %lld must be >= 0 (0: whole segments)",
                  (long long)block);
  if (L->seq > DA_SCHEDULE_MAX_SEQ)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule: seq %lld too long to count pairs in 64 bits",
                  (long long)L->seq);
  DA_CHECK(da_mask_check(m, L->seq));

  const int P = L->nranks;
  const size_t nrs = (size_t)P * (size_t)P;
  da_status_t st = DA_SUCCESS;
  item_vec_t iv = {0};
  int64_t *first = da_calloc(nrs * sizeof *first, 64);
  int64_t *n = da_calloc(nrs * sizeof *n, 64);
  int64_t *work = da_calloc(nrs * sizeof *work, 64);
  if (!first || !n || !work) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "schedule: %d x %d step tables", P, P);
    goto fail;
  }

  for (int r = 0; r < P; r++) {
    da_span_t qs[DA_LAYOUT_MAX_SEGS];
    int64_t qoff[DA_LAYOUT_MAX_SEGS];
    int nq = da_layout_segments(L, r, qs);
    for (int i = 0; i < nq; i++) qoff[i] = i ? qoff[i - 1] + qs[i - 1].count : 0;
    for (int s = 0; s < P; s++) {
      const int src = da_ring_src(r, s, P);
      const int64_t idx = (int64_t)r * P + s;
      da_span_t ks[DA_LAYOUT_MAX_SEGS];
      int nk = da_layout_segments(L, src, ks);
      first[idx] = iv.n;
      /* KV-major order: one K/V sub-block is used by every local Q segment before moving on, so
       * it stays in cache (and a driver may start on early sub-blocks first). */
      for (int kj = 0; kj < nk; kj++) {
        int64_t kbase = 0; /* local row of this segment within src's shard */
        for (int t = 0; t < kj; t++) kbase += ks[t].count;
        int64_t bl = block > 0 ? block : ks[kj].count;
        for (int64_t j0 = 0; j0 < ks[kj].count; j0 += bl) {
          da_span_t k = da_span_sub(ks[kj], j0, ks[kj].count - j0 < bl ? ks[kj].count - j0 : bl);
          int64_t k0 = k.start, k1 = da_span_last(k);
          for (int qi = 0; qi < nq; qi++) {
            da_tile_class_t c = da_mask_classify(m, qs[qi].start, da_span_last(qs[qi]), k0, k1);
            if (c == DA_TILE_EMPTY) continue;
            int64_t pairs = count_pairs_fast(m, qs[qi], k, c);
            /* A strided PARTIAL pair can hold no allowed pair at all (window 1 on a striped
             * layout): it is skipped like an EMPTY one, so every listed item has work. */
            if (pairs == 0) continue;
            da_work_item_t it = {.qseg = qi, .kseg = kj, .q_off = qoff[qi], .q = qs[qi],
                                 .k_off = kbase + j0, .k = k, .pairs = pairs, .cls = c};
            DA_CHECK_GOTO(item_push(&iv, &it), st, fail);
            work[idx] += pairs;
          }
        }
      }
      n[idx] = iv.n - first[idx];
    }
  }
  S->nranks = P;
  S->nsteps = P;
  S->block = block;
  S->items = iv.v;
  S->first = first;
  S->n = n;
  S->work = work;
  return DA_SUCCESS;

fail:
  da_free(iv.v);
  da_free(work);
  da_free(n);
  da_free(first);
  return st;
}

void da_schedule_free(da_schedule_t *S) {
  if (!S) return;
  da_free(S->items);
  da_free(S->first);
  da_free(S->n);
  da_free(S->work);
  memset(S, 0, sizeof *S);
}

int64_t da_schedule_rank_work(const da_schedule_t *S, int r) {
  if (!S || !S->work || r < 0 || r >= S->nranks) return 0;
  int64_t w = 0;
  for (int s = 0; s < S->nsteps; s++) w += S->work[(int64_t)r * S->nsteps + s];
  return w;
}

double da_schedule_imbalance(const da_schedule_t *S) {
  if (!S || !S->work || S->nranks < 1) return 1.0;
  int64_t mx = 0, total = 0;
  for (int r = 0; r < S->nranks; r++) {
    int64_t w = da_schedule_rank_work(S, r);
    total += w;
    if (w > mx) mx = w;
  }
  if (total == 0) return 1.0; /* no work anywhere: perfectly (vacuously) balanced */
  return (double)mx * (double)S->nranks / (double)total;
}

/* ---- checker ---------------------------------------------------------------------------------- */

/* Local row rectangle of one item within its (rank, step): Q rows [q0, q1), K rows [k0, k1). */
typedef struct { int64_t q0, q1, k0, k1; } rect_t;
static int rect_cmp(const void *a, const void *b) {
  const rect_t *x = a, *y = b;
  if (x->q0 != y->q0) return (x->q0 > y->q0) - (x->q0 < y->q0);
  if (x->q1 != y->q1) return (x->q1 > y->q1) - (x->q1 < y->q1);
  return (x->k0 > y->k0) - (x->k0 < y->k0);
}
static int overlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1) { return a0 < b1 && b0 < a1; }

/* Items of one (rank, step) must not overlap. Sorted by (Q range, K start), items sharing a Q
 * range need only a running check on K; if distinct Q ranges overlap (never in schedules built
 * here, whose Q ranges are whole segments) fall back to comparing all pairs. */
static da_status_t check_disjoint(rect_t *rc, int64_t n, int r, int s) {
  qsort(rc, (size_t)n, sizeof *rc, rect_cmp);
  int crossed = 0;
  int64_t prev_q1 = INT64_MIN, kmax = INT64_MIN; /* over earlier groups; within this group */
  for (int64_t i = 0; i < n; i++) {
    int same = i > 0 && rc[i].q0 == rc[i - 1].q0 && rc[i].q1 == rc[i - 1].q1;
    if (!same) {
      if (i > 0 && rc[i - 1].q1 > prev_q1) prev_q1 = rc[i - 1].q1;
      if (rc[i].q0 < prev_q1) crossed = 1;
      kmax = INT64_MIN;
    }
    if (rc[i].k0 < kmax)
      return DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d: items overlap (q rows "
                    "[%lld,%lld), k rows from %lld)", r, s, (long long)rc[i].q0,
                    (long long)rc[i].q1, (long long)rc[i].k0);
    if (rc[i].k1 > kmax) kmax = rc[i].k1;
  }
  if (!crossed) return DA_SUCCESS;
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = i + 1; j < n; j++)
      if (overlap(rc[i].q0, rc[i].q1, rc[j].q0, rc[j].q1) &&
          overlap(rc[i].k0, rc[i].k1, rc[j].k0, rc[j].k1))
        return DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d: items overlap (q rows "
                      "[%lld,%lld) k rows [%lld,%lld))", r, s, (long long)rc[j].q0,
                      (long long)rc[j].q1, (long long)rc[j].k0, (long long)rc[j].k1);
  return DA_SUCCESS;
}

/* Does `sub` (at local offset off) lie inside segment `seg` (at local offset segoff) exactly as
 * the rows it names? */
static int inside(da_span_t sub, int64_t off, da_span_t seg, int64_t segoff) {
  int64_t i = off - segoff;
  return sub.count >= 1 && i >= 0 && i + sub.count <= seg.count && sub.stride == seg.stride &&
         sub.start == da_span_at(seg, i);
}

da_status_t da_schedule_check(const da_schedule_t *S, const da_layout_t *L, const da_mask_t *m) {
  if (!S || !L || !m)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule check: NULL argument");
  if (!S->first || !S->n || !S->work || !L->counts)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "schedule check: schedule or layout not built");
  const int P = L->nranks;
  if (S->nranks != P || S->nsteps != P)
    return DA_ERR(DA_ERR_INTERNAL, "schedule check: %d ranks x %d steps for a %d-rank layout",
                  S->nranks, S->nsteps, P);
  DA_CHECK(da_mask_check(m, L->seq));

  da_status_t st = DA_SUCCESS;
  int64_t maxn = 0, expect_first = 0;
  for (int64_t i = 0; i < (int64_t)P * P; i++) {
    if (S->first[i] != expect_first || S->n[i] < 0)
      return DA_ERR(DA_ERR_INTERNAL, "schedule check: item table entry %lld (first %lld, n %lld) "
                    "is not packed", (long long)i, (long long)S->first[i], (long long)S->n[i]);
    expect_first += S->n[i];
    if (S->n[i] > maxn) maxn = S->n[i];
  }
  if (expect_first > 0 && !S->items)
    return DA_ERR(DA_ERR_INTERNAL, "schedule check: %lld items but no item array",
                  (long long)expect_first);
  rect_t *rc = malloc(sizeof *rc * (size_t)(maxn ? maxn : 1));
  if (!rc) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "schedule check: %lld items", (long long)maxn);

  int64_t total = 0, recount_budget = DA_CHECK_RECOUNT_ROWS;
  for (int r = 0; r < P && st == DA_SUCCESS; r++) {
    da_span_t qs[DA_LAYOUT_MAX_SEGS];
    int64_t qoff[DA_LAYOUT_MAX_SEGS];
    int nq = da_layout_segments(L, r, qs);
    for (int i = 0; i < nq; i++) qoff[i] = i ? qoff[i - 1] + qs[i - 1].count : 0;
    for (int s = 0; s < P && st == DA_SUCCESS; s++) {
      const int src = da_ring_src(r, s, P);
      da_span_t ks[DA_LAYOUT_MAX_SEGS];
      int64_t koff[DA_LAYOUT_MAX_SEGS];
      int nk = da_layout_segments(L, src, ks);
      for (int i = 0; i < nk; i++) koff[i] = i ? koff[i - 1] + ks[i - 1].count : 0;
      int64_t n;
      const da_work_item_t *it = da_schedule_items(S, r, s, &n);
      int64_t work = 0;
      for (int64_t i = 0; i < n; i++) {
        const da_work_item_t *w = &it[i];
        if (w->qseg < 0 || w->qseg >= nq || w->kseg < 0 || w->kseg >= nk ||
            !inside(w->q, w->q_off, qs[w->qseg], qoff[w->qseg]) ||
            !inside(w->k, w->k_off, ks[w->kseg], koff[w->kseg])) {
          st = DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d item %lld (q seg %d rows "
                      "%lld+%lld, k seg %d rows %lld+%lld) lies outside the shards of ranks %d/%d",
                      r, s, (long long)i, w->qseg, (long long)w->q_off, (long long)w->q.count,
                      w->kseg, (long long)w->k_off, (long long)w->k.count, r, src);
          break;
        }
        da_tile_class_t c = da_mask_classify(m, w->q.start, da_span_last(w->q), w->k.start,
                                             da_span_last(w->k));
        int64_t area = w->q.count * w->k.count;
        if (w->pairs <= 0 || w->pairs > area || c == DA_TILE_EMPTY || w->cls != c ||
            (c == DA_TILE_FULL && w->pairs != area)) {
          st = DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d item %lld: %lld pairs of "
                      "%lld, class %d (mask says %d)", r, s, (long long)i, (long long)w->pairs,
                      (long long)area, (int)w->cls, (int)c);
          break;
        }
        if (c == DA_TILE_PARTIAL && recount_budget >= w->q.count) {
          recount_budget -= w->q.count;
          int64_t exact = da_mask_count_pairs(m, w->q, w->k);
          if (exact != w->pairs) {
            st = DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d item %lld claims %lld "
                        "pairs, %lld allowed", r, s, (long long)i, (long long)w->pairs,
                        (long long)exact);
            break;
          }
        }
        rc[i] = (rect_t){w->q_off, w->q_off + w->q.count, w->k_off, w->k_off + w->k.count};
        work += w->pairs;
      }
      if (st != DA_SUCCESS) break;
      if (work != S->work[(int64_t)r * P + s]) {
        st = DA_ERR(DA_ERR_INTERNAL, "schedule check: rank %d step %d: work %lld, items sum to %lld",
                    r, s, (long long)S->work[(int64_t)r * P + s], (long long)work);
        break;
      }
      total += work;
      st = check_disjoint(rc, n, r, s);
    }
  }
  free(rc);
  DA_CHECK(st);

  /* Items lie in Q_r x K_src, src runs over every rank once as s does, and items of one (r, s)
   * are disjoint: so items are disjoint globally, and their pairs sum to the allowed pairs of the
   * whole problem exactly when no allowed pair was dropped. Counted row by row over S x S. */
  int64_t want = da_mask_count_pairs(m, da_span(0, 1, L->seq), da_span(0, 1, L->seq));
  if (total != want)
    return DA_ERR(DA_ERR_INTERNAL, "schedule check: items hold %lld pairs, the mask allows %lld",
                  (long long)total, (long long)want);
  return DA_SUCCESS;
}
