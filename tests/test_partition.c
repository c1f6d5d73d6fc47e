/* test_partition.c: Check suite for partition/ (token layouts, ring schedules, their checkers).
 * CPU only, fork mode. Every layout and schedule built here also passes through
 * da_layout_check / da_schedule_check; small cases are cross-checked by brute force over every
 * (q, k) pair with da_mask_allows, independently of the pair counters. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "partition.h"
#include "test_run.h"

static const int Ps[] = {1, 2, 3, 4, 5, 7, 8, 16};
#define NP ((int)(sizeof Ps / sizeof Ps[0]))
static const da_layout_kind_t kinds[] = {DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_STRIPED, DA_LAYOUT_ZIGZAG,
                                         DA_LAYOUT_WEIGHTED};
#define NKINDS 4

/* Lengths to try for P ranks: tiny, fewer tokens than ranks, exact, uneven, odd. */
static int seq_list(int P, int64_t out[8]) {
  int n = 0;
  int64_t cand[] = {1, P - 1, P, 2 * P + 1, 1000 + P - 1, 4099};
  for (size_t i = 0; i < sizeof cand / sizeof cand[0]; i++) {
    if (cand[i] < 1) continue;
    int dup = 0;
    for (int j = 0; j < n; j++) dup |= out[j] == cand[i];
    if (!dup) out[n++] = cand[i];
  }
  return n;
}

/* Weights for the weighted layout: uneven, deterministic (1, 2, 3, 1, 2, 3, ...). */
static void test_weights(int P, double *w) {
  for (int r = 0; r < P; r++) w[r] = 1.0 + (double)(r % 3);
}

static void layout_ok(da_layout_t *L, da_layout_kind_t kind, int64_t S, int P) {
  double w[64];
  test_weights(P, w);
  da_status_t st = da_layout_init(L, kind, S, P, w);
  ck_assert_msg(st == DA_SUCCESS, "init %s S=%lld P=%d: %s", da_layout_name(kind), (long long)S, P,
                da_error_message());
  st = da_layout_check(L);
  ck_assert_msg(st == DA_SUCCESS, "check %s S=%lld P=%d: %s", da_layout_name(kind), (long long)S,
                P, da_error_message());
}

/* ---- masks ---------------------------------------------------------------------------------- */
enum { M_NONE, M_CAUSAL, M_WIN7, M_WIN100, M_DOC, M_CAUSAL_DOC, M_WIN_DOC, NMASKS };

typedef struct {
  da_mask_t m;
  int64_t *cu;
} test_mask_t;

/* Documents of pseudo-random lengths 1..2*avg (the last one cut to fit), so boundaries fall
 * everywhere relative to shards and blocks. */
static int64_t *make_docs(int64_t S, int64_t avg, int64_t *ndocs) {
  int64_t *cu = malloc(sizeof *cu * (size_t)(S + 1));
  uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t)S;
  int64_t n = 0, at = 0;
  cu[0] = 0;
  while (at < S) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    int64_t len = 1 + (int64_t)((x >> 33) % (uint64_t)(2 * avg));
    if (at + len > S) len = S - at;
    at += len;
    cu[++n] = at;
  }
  *ndocs = n;
  return cu;
}

static test_mask_t mask_make(int which, int64_t S) {
  test_mask_t t = {{0}, NULL};
  switch (which) {
    case M_NONE: break;
    case M_CAUSAL: t.m.flags = DA_MASK_CAUSAL; break;
    case M_WIN7: t.m.flags = DA_MASK_WINDOW; t.m.window = 7; break;
    case M_WIN100: t.m.flags = DA_MASK_WINDOW; t.m.window = 100; break;
    case M_DOC:
    case M_CAUSAL_DOC:
    case M_WIN_DOC:
      t.m.flags = DA_MASK_DOC | (which == M_CAUSAL_DOC ? DA_MASK_CAUSAL : 0) |
                  (which == M_WIN_DOC ? DA_MASK_WINDOW : 0);
      t.m.window = 13;
      t.cu = make_docs(S, S > 300 ? 97 : 9, &t.m.ndocs);
      t.m.cu_seqlens = t.cu;
      break;
  }
  return t;
}
static void mask_free(test_mask_t *t) { free(t->cu); }

/* ---- layouts ---------------------------------------------------------------------------------- */

/* Every kind, every P, every length: the checker passes, and the owner map and the segments
 * agree row by row (recomputed here from the segments, not through the library's inverse). */
START_TEST(layout_all_kinds_round_trip) {
  for (int pi = 0; pi < NP; pi++) {
    int P = Ps[pi];
    int64_t Ss[8];
    int ns = seq_list(P, Ss);
    for (int si = 0; si < ns; si++)
      for (int ki = 0; ki < NKINDS; ki++) {
        int64_t S = Ss[si];
        da_layout_t L;
        layout_ok(&L, kinds[ki], S, P);
        unsigned char *seen = calloc((size_t)S, 1);
        int64_t total = 0;
        for (int r = 0; r < P; r++) {
          da_span_t segs[DA_LAYOUT_MAX_SEGS];
          int nseg = da_layout_segments(&L, r, segs);
          ck_assert_int_ge(nseg, 0);
          ck_assert_int_le(nseg, DA_LAYOUT_MAX_SEGS);
          int64_t row = 0, prev = -1;
          for (int g = 0; g < nseg; g++) {
            ck_assert_int_ge(segs[g].count, 1);
            for (int64_t j = 0; j < segs[g].count; j++, row++) {
              int64_t pos = da_span_at(segs[g], j), lr = -7;
              ck_assert_int_gt(pos, prev); /* local row order = increasing positions */
              prev = pos;
              ck_assert_int_lt(pos, S);
              ck_assert_int_eq(seen[pos], 0);
              seen[pos] = 1;
              ck_assert_int_eq(da_layout_owner(&L, pos, &lr), r);
              ck_assert_int_eq(lr, row);
            }
          }
          ck_assert_int_eq(row, da_layout_count(&L, r));
          ck_assert_int_eq(nseg == 0, row == 0);
          total += row;
        }
        ck_assert_int_eq(total, S);
        int64_t lr = 5;
        ck_assert_int_eq(da_layout_owner(&L, -1, &lr), -1);
        ck_assert_int_eq(lr, -1);
        ck_assert_int_eq(da_layout_owner(&L, S, NULL), -1);
        free(seen);
        da_layout_free(&L);
      }
  }
}
END_TEST

static void expect_seg(const da_layout_t *L, int r, int g, int64_t start, int64_t stride,
                       int64_t count) {
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  int n = da_layout_segments(L, r, segs);
  ck_assert_int_gt(n, g);
  ck_assert_msg(segs[g].start == start && segs[g].stride == stride && segs[g].count == count,
                "%s rank %d seg %d: (%lld,%lld,%lld), want (%lld,%lld,%lld)", da_layout_name(L->kind),
                r, g, (long long)segs[g].start, (long long)segs[g].stride, (long long)segs[g].count,
                (long long)start, (long long)stride, (long long)count);
}
static int nsegs(const da_layout_t *L, int r) {
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  return da_layout_segments(L, r, segs);
}

START_TEST(layout_contiguous_shape) {
  da_layout_t L;
  layout_ok(&L, DA_LAYOUT_CONTIGUOUS, 16, 4);
  for (int r = 0; r < 4; r++) {
    ck_assert_int_eq(nsegs(&L, r), 1);
    expect_seg(&L, r, 0, 4 * r, 1, 4);
  }
  da_layout_free(&L);
  /* S = 10, P = 4: the first S mod P ranks take one extra token. */
  layout_ok(&L, DA_LAYOUT_CONTIGUOUS, 10, 4);
  int64_t st[] = {0, 3, 6, 8}, ct[] = {3, 3, 2, 2};
  for (int r = 0; r < 4; r++) expect_seg(&L, r, 0, st[r], 1, ct[r]);
  da_layout_free(&L);
  /* S < P: ranks 3 and 4 own nothing. */
  layout_ok(&L, DA_LAYOUT_CONTIGUOUS, 3, 5);
  for (int r = 0; r < 5; r++) ck_assert_int_eq(da_layout_count(&L, r), r < 3);
  ck_assert_int_eq(nsegs(&L, 4), 0);
  ck_assert_int_eq(da_layout_max_count(&L), 1);
  da_layout_free(&L);
}
END_TEST

START_TEST(layout_striped_shape) {
  da_layout_t L;
  layout_ok(&L, DA_LAYOUT_STRIPED, 16, 4);
  for (int r = 0; r < 4; r++) {
    ck_assert_int_eq(nsegs(&L, r), 1);
    expect_seg(&L, r, 0, r, 4, 4);
  }
  int64_t lr;
  ck_assert_int_eq(da_layout_owner(&L, 13, &lr), 1);
  ck_assert_int_eq(lr, 3);
  da_layout_free(&L);
  layout_ok(&L, DA_LAYOUT_STRIPED, 10, 4); /* 0,4,8 | 1,5,9 | 2,6 | 3,7 */
  int64_t ct[] = {3, 3, 2, 2};
  for (int r = 0; r < 4; r++) expect_seg(&L, r, 0, r, 4, ct[r]);
  da_layout_free(&L);
  layout_ok(&L, DA_LAYOUT_STRIPED, 2, 3);
  ck_assert_int_eq(nsegs(&L, 2), 0);
  da_layout_free(&L);
}
END_TEST

START_TEST(layout_zigzag_shape) {
  da_layout_t L;
  /* S = 16, P = 4: 8 chunks of 2; rank r owns chunks r and 7 - r. */
  layout_ok(&L, DA_LAYOUT_ZIGZAG, 16, 4);
  for (int r = 0; r < 4; r++) {
    ck_assert_int_eq(nsegs(&L, r), 2);
    expect_seg(&L, r, 0, 2 * r, 1, 2);
    expect_seg(&L, r, 1, 14 - 2 * r, 1, 2);
  }
  int64_t lr;
  ck_assert_int_eq(da_layout_owner(&L, 15, &lr), 0);
  ck_assert_int_eq(lr, 3);
  ck_assert_int_eq(da_layout_owner(&L, 8, &lr), 3);
  ck_assert_int_eq(lr, 2);
  da_layout_free(&L);
  /* S = 22, P = 4: 6 extra tokens go to chunks 0..3, then to chunks 7 and 6 (the second chunks
   * of ranks 0 and 1): ranks hold 6, 6, 5, 5. */
  layout_ok(&L, DA_LAYOUT_ZIGZAG, 22, 4);
  expect_seg(&L, 0, 0, 0, 1, 3);
  expect_seg(&L, 0, 1, 19, 1, 3);
  expect_seg(&L, 1, 0, 3, 1, 3);
  expect_seg(&L, 1, 1, 16, 1, 3);
  expect_seg(&L, 2, 0, 6, 1, 3);
  expect_seg(&L, 2, 1, 14, 1, 2);
  expect_seg(&L, 3, 0, 9, 1, 3);
  expect_seg(&L, 3, 1, 12, 1, 2);
  da_layout_free(&L);
  /* S = 3 < P = 5: 10 chunks, only chunks 0..2 hold a token; empty chunks are not segments. */
  layout_ok(&L, DA_LAYOUT_ZIGZAG, 3, 5);
  for (int r = 0; r < 5; r++) ck_assert_int_eq(nsegs(&L, r), r < 3);
  expect_seg(&L, 2, 0, 2, 1, 1);
  da_layout_free(&L);
  /* P = 1: chunks 0 and 1 both on rank 0, still in position order. */
  layout_ok(&L, DA_LAYOUT_ZIGZAG, 5, 1);
  expect_seg(&L, 0, 0, 0, 1, 3);
  expect_seg(&L, 0, 1, 3, 1, 2);
  da_layout_free(&L);
}
END_TEST

START_TEST(layout_balance) {
  for (int pi = 0; pi < NP; pi++) {
    int P = Ps[pi];
    for (int64_t S = 1; S <= 3 * P + 5; S++)
      for (int ki = 0; ki < 3; ki++) {
        da_layout_t L;
        layout_ok(&L, kinds[ki], S, P);
        int64_t mx = 0, mn = INT64_MAX;
        for (int r = 0; r < P; r++) {
          int64_t c = da_layout_count(&L, r);
          mx = c > mx ? c : mx;
          mn = c < mn ? c : mn;
        }
        /* Within one token (the contract allows one per chunk; zigzag does better). */
        ck_assert_msg(mx - mn <= 1, "%s S=%lld P=%d: %lld..%lld", da_layout_name(kinds[ki]),
                      (long long)S, P, (long long)mn, (long long)mx);
        ck_assert_int_eq(mx, da_layout_max_count(&L));
        ck_assert_int_eq(mx, (S + P - 1) / P);
        da_layout_free(&L);
      }
  }
}
END_TEST

START_TEST(layout_weighted_proportions) {
  da_layout_t L;
  double w4[] = {1, 2, 3, 4};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 1000, 4, w4), DA_SUCCESS);
  ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
  int64_t want[] = {100, 200, 300, 400};
  for (int r = 0, at = 0; r < 4; at += (int)want[r], r++) expect_seg(&L, r, 0, at, 1, want[r]);
  ck_assert_int_eq(da_layout_owner(&L, 299, NULL), 1);
  ck_assert_int_eq(da_layout_owner(&L, 300, NULL), 2);
  da_layout_free(&L);
  /* Largest remainder: quotas 333.33 each, the extra token goes to the lowest rank. */
  double w3[] = {1, 1, 1};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 1000, 3, w3), DA_SUCCESS);
  ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
  ck_assert_int_eq(da_layout_count(&L, 0), 334);
  ck_assert_int_eq(da_layout_count(&L, 1), 333);
  da_layout_free(&L);
  /* Quotas 5.25 and 1.75: floors 5 + 1, the leftover token goes to the larger remainder. */
  double w2[] = {3, 1};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 7, 2, w2), DA_SUCCESS);
  ck_assert_int_eq(da_layout_count(&L, 0), 5);
  ck_assert_int_eq(da_layout_count(&L, 1), 2);
  da_layout_free(&L);
  /* The copy is private: changing the caller's array later changes nothing. */
  double wc[] = {1, 1};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 10, 2, wc), DA_SUCCESS);
  wc[0] = 100;
  ck_assert_ptr_ne(L.weights, wc);
  ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
  da_layout_free(&L);
  /* A tiny weight may get no token at all; the owner map skips that rank. */
  double wt[] = {1, 1e-9, 1};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 11, 3, wt), DA_SUCCESS);
  ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
  ck_assert_int_eq(da_layout_count(&L, 1), 0);
  ck_assert_int_eq(nsegs(&L, 1), 0);
  ck_assert_int_eq(da_layout_owner(&L, 6, NULL), 2);
  da_layout_free(&L);
  /* Pseudo-random weights: every count is floor or ceil of its exact quota. */
  uint64_t x = 12345;
  for (int trial = 0; trial < 200; trial++) {
    int P = 1 + trial % 16;
    double w[16], W = 0;
    for (int r = 0; r < P; r++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      w[r] = 0.01 + (double)(x >> 40) / (double)(1 << 20);
      W += w[r];
    }
    int64_t S = 1 + (int64_t)(x >> 50) + trial;
    ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, S, P, w), DA_SUCCESS);
    ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
    for (int r = 0; r < P; r++) {
      double quota = (double)S * w[r] / W;
      ck_assert_msg(fabs((double)da_layout_count(&L, r) - quota) < 1.0 + 1e-9,
                    "S=%lld P=%d rank %d: %lld vs quota %.4f", (long long)S, P, r,
                    (long long)da_layout_count(&L, r), quota);
    }
    da_layout_free(&L);
  }
}
END_TEST

/* Above the exhaustive threshold the checker works by arithmetic; it must still pass (and be
 * cheap) for long sequences. */
START_TEST(layout_long) {
  double w[8] = {1, 2, 1, 2, 1, 2, 1, 3};
  int64_t Ss[] = {(int64_t)1 << 20, ((int64_t)1 << 20) + 7, ((int64_t)1 << 30) + 12345};
  for (int si = 0; si < 3; si++)
    for (int ki = 0; ki < NKINDS; ki++) {
      da_layout_t L;
      ck_assert_int_eq(da_layout_init(&L, kinds[ki], Ss[si], 8, w), DA_SUCCESS);
      ck_assert_msg(da_layout_check(&L) == DA_SUCCESS, "%s S=%lld: %s", da_layout_name(kinds[ki]),
                    (long long)Ss[si], da_error_message());
      int64_t lr;
      int r = da_layout_owner(&L, Ss[si] - 1, &lr);
      ck_assert_int_eq(lr, da_layout_count(&L, r) - 1); /* the last position ends a shard */
      da_layout_free(&L);
    }
}
END_TEST

START_TEST(layout_check_catches_corruption) {
  da_layout_t L;
  layout_ok(&L, DA_LAYOUT_CONTIGUOUS, 100, 4);
  L.counts[1]++; /* rank 1 now claims a position of rank 2 */
  ck_assert_int_ne(da_layout_check(&L), DA_SUCCESS);
  L.counts[1]--;
  L.starts[2]++; /* hole at 50, overlap at the end */
  ck_assert_int_ne(da_layout_check(&L), DA_SUCCESS);
  da_layout_free(&L);
}
END_TEST

START_TEST(layout_names) {
  ck_assert_int_eq(da_layout_parse("ring"), DA_LAYOUT_CONTIGUOUS);
  ck_assert_int_eq(da_layout_parse("contiguous"), DA_LAYOUT_CONTIGUOUS);
  ck_assert_int_eq(da_layout_parse("striped"), DA_LAYOUT_STRIPED);
  ck_assert_int_eq(da_layout_parse("zigzag"), DA_LAYOUT_ZIGZAG);
  ck_assert_int_eq(da_layout_parse("weighted"), DA_LAYOUT_WEIGHTED);
  ck_assert_int_eq(da_layout_parse("ringx"), -1);
  ck_assert_int_eq(da_layout_parse(NULL), -1);
  for (int ki = 0; ki < NKINDS; ki++)
    ck_assert_int_eq(da_layout_parse(da_layout_name(kinds[ki])), (int)kinds[ki]);
}
END_TEST

START_TEST(bad_inputs) {
  da_layout_t L;
  double w[] = {1, 2, 3};
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_CONTIGUOUS, 0, 4, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_STRIPED, -5, 4, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_ZIGZAG, 10, 0, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_ZIGZAG, 10, -2, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(&L, (da_layout_kind_t)7, 10, 2, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(NULL, DA_LAYOUT_CONTIGUOUS, 10, 2, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 10, 3, NULL), DA_ERR_INVALID_ARGUMENT);
  double bad[][3] = {{1, -1, 1}, {1, 0, 1}, {1, NAN, 1}, {1, INFINITY, 1}, {1e308, 1e308, 1e308}};
  for (int i = 0; i < 5; i++)
    ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 10, 3, bad[i]), DA_ERR_INVALID_ARGUMENT);
  /* A failed init leaves a layout that free and check handle. */
  da_layout_free(&L);
  ck_assert_int_eq(da_layout_check(&L), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_check(NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_layout_count(&L, 0), 0);
  ck_assert_int_eq(da_layout_owner(&L, 0, NULL), -1);
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  ck_assert_int_eq(da_layout_segments(&L, 0, segs), 0);

  da_schedule_t S;
  da_mask_t causal = {.flags = DA_MASK_CAUSAL};
  ck_assert_int_eq(da_schedule_ring(&L, &causal, 16, &S), DA_ERR_INVALID_ARGUMENT); /* no layout */
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 10, 3, w), DA_SUCCESS);
  ck_assert_int_eq(da_layout_count(&L, -1), 0);
  ck_assert_int_eq(da_layout_count(&L, 3), 0);
  ck_assert_int_eq(da_layout_segments(&L, 3, segs), 0);
  ck_assert_int_eq(da_schedule_ring(&L, &causal, -1, &S), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_schedule_ring(&L, NULL, 16, &S), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_schedule_ring(NULL, &causal, 16, &S), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_schedule_ring(&L, &causal, 16, NULL), DA_ERR_INVALID_ARGUMENT);
  da_mask_t badwin = {.flags = DA_MASK_WINDOW, .window = 0};
  ck_assert_int_eq(da_schedule_ring(&L, &badwin, 16, &S), DA_ERR_INVALID_ARGUMENT);
  int64_t cu[] = {0, 4, 9}; /* covers 9 tokens of 10 */
  da_mask_t baddoc = {.flags = DA_MASK_DOC, .ndocs = 2, .cu_seqlens = cu};
  ck_assert_int_eq(da_schedule_ring(&L, &baddoc, 16, &S), DA_ERR_INVALID_ARGUMENT);
  /* A failed schedule is zeroed: free and check are safe on it. */
  da_schedule_free(&S);
  ck_assert_int_eq(da_schedule_check(&S, &L, &causal), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_schedule_check(NULL, &L, &causal), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_schedule_rank_work(&S, 0), 0);
  ck_assert(da_schedule_imbalance(&S) == 1.0);
  /* block 0 means whole segments and is valid. */
  ck_assert_int_eq(da_schedule_ring(&L, &causal, 0, &S), DA_SUCCESS);
  ck_assert_int_eq(da_schedule_check(&S, &L, &causal), DA_SUCCESS);
  da_schedule_free(&S);
  da_layout_free(&L);
}
END_TEST

/* ---- schedules -------------------------------------------------------------------------------- */

static void schedule_ok(da_schedule_t *S, const da_layout_t *L, const da_mask_t *m, int64_t block) {
  char buf[256];
  da_status_t st = da_schedule_ring(L, m, block, S);
  ck_assert_msg(st == DA_SUCCESS, "schedule %s S=%lld P=%d mask %s block %lld: %s",
                da_layout_name(L->kind), (long long)L->seq, L->nranks,
                da_mask_describe(m, buf, sizeof buf), (long long)block, da_error_message());
  st = da_schedule_check(S, L, m);
  ck_assert_msg(st == DA_SUCCESS, "check %s S=%lld P=%d mask %s block %lld: %s",
                da_layout_name(L->kind), (long long)L->seq, L->nranks,
                da_mask_describe(m, buf, sizeof buf), (long long)block, da_error_message());
}

/* Every P, length, mask, layout kind and block size: the checker passes. */
START_TEST(schedule_all_checked) {
  const int64_t blocks[] = {0, 7, 64};
  for (int pi = 0; pi < NP; pi++) {
    int P = Ps[pi];
    int64_t Ss[8];
    int ns = seq_list(P, Ss);
    for (int si = 0; si < ns; si++)
      for (int mi = 0; mi < NMASKS; mi++) {
        test_mask_t tm = mask_make(mi, Ss[si]);
        for (int ki = 0; ki < NKINDS; ki++) {
          da_layout_t L;
          layout_ok(&L, kinds[ki], Ss[si], P);
          for (int bi = 0; bi < 3; bi++) {
            da_schedule_t S;
            schedule_ok(&S, &L, &tm.m, blocks[bi]);
            ck_assert_int_eq(S.nsteps, P);
            ck_assert_int_eq(S.block, blocks[bi]);
            da_schedule_free(&S);
          }
          da_layout_free(&L);
        }
        mask_free(&tm);
      }
  }
}
END_TEST

/* Brute force on small problems, with no pair counter involved: every item's pairs equal a
 * double loop over da_mask_allows; the items' rectangles, mapped to global (q, k), cover every
 * allowed pair exactly once; the total equals the S x S double loop. */
static void brute_force(const da_layout_t *L, const da_mask_t *m, int64_t block) {
  const int64_t N = L->seq;
  const int P = L->nranks;
  da_schedule_t S;
  schedule_ok(&S, L, m, block);
  unsigned char *hit = calloc((size_t)(N * N), 1);
  int64_t sum = 0;
  for (int r = 0; r < P; r++)
    for (int s = 0; s < P; s++) {
      int64_t n, w = 0;
      const da_work_item_t *it = da_schedule_items(&S, r, s, &n);
      for (int64_t i = 0; i < n; i++) {
        /* Plain conditions in the inner loops: a Check assertion per pair costs a syscall. */
        int64_t pairs = 0, bad = 0;
        for (int64_t a = 0; a < it[i].q.count; a++) {
          int64_t qp = da_span_at(it[i].q, a);
          bad += da_layout_owner(L, qp, NULL) != r;
          for (int64_t b = 0; b < it[i].k.count; b++) {
            int64_t kp = da_span_at(it[i].k, b);
            bad += hit[qp * N + kp]++ != 0;
            pairs += da_mask_allows(m, qp, kp);
          }
        }
        for (int64_t b = 0; b < it[i].k.count; b++)
          bad += da_layout_owner(L, da_span_at(it[i].k, b), NULL) != da_ring_src(r, s, P);
        ck_assert_msg(bad == 0, "rank %d step %d item %lld: %lld rows off-shard or pairs repeated",
                      r, s, (long long)i, (long long)bad);
        ck_assert_int_eq(pairs, it[i].pairs);
        ck_assert_int_gt(pairs, 0);
        w += pairs;
      }
      ck_assert_int_eq(w, S.work[(int64_t)r * P + s]);
      sum += w;
    }
  int64_t want = 0, missed = -1;
  for (int64_t q = 0; q < N; q++)
    for (int64_t k = 0; k < N; k++)
      if (da_mask_allows(m, q, k)) {
        want++;
        if (!hit[q * N + k] && missed < 0) missed = q * N + k;
      }
  ck_assert_msg(missed < 0, "allowed pair (%lld, %lld) is in no item", (long long)(missed / N),
                (long long)(missed % N));
  ck_assert_int_eq(sum, want);
  int64_t rw = 0;
  for (int r = 0; r < P; r++) rw += da_schedule_rank_work(&S, r);
  ck_assert_int_eq(rw, want);
  free(hit);
  da_schedule_free(&S);
}

START_TEST(schedule_brute_force) {
  const int64_t Ss[] = {1, 3, 16, 37, 130, 257};
  const int64_t blocks[] = {0, 1, 5, 32};
  for (int pi = 0; pi < NP; pi++)
    for (int si = 0; si < 6; si++)
      for (int mi = 0; mi < NMASKS; mi++) {
        test_mask_t tm = mask_make(mi, Ss[si]);
        for (int ki = 0; ki < NKINDS; ki++) {
          da_layout_t L;
          layout_ok(&L, kinds[ki], Ss[si], Ps[pi]);
          for (int bi = 0; bi < 4; bi++)
            if (Ss[si] <= 130 || blocks[bi] != 1) brute_force(&L, &tm.m, blocks[bi]);
          da_layout_free(&L);
        }
        mask_free(&tm);
      }
}
END_TEST

/* Causal on contiguous shards: rank r sees src <= r only, so rank 0 has nothing after step 0 and
 * every off-diagonal block that is listed is FULL. */
START_TEST(schedule_empty_blocks_skipped) {
  const int P = 8;
  const int64_t N = 8192, n = N / P;
  da_layout_t L;
  da_mask_t causal = {.flags = DA_MASK_CAUSAL};
  layout_ok(&L, DA_LAYOUT_CONTIGUOUS, N, P);
  da_schedule_t S;
  schedule_ok(&S, &L, &causal, 0);
  for (int r = 0; r < P; r++)
    for (int s = 0; s < P; s++) {
      int64_t cnt;
      const da_work_item_t *it = da_schedule_items(&S, r, s, &cnt);
      int src = da_ring_src(r, s, P);
      if (src > r) {
        ck_assert_int_eq(cnt, 0);
        ck_assert_int_eq(S.work[r * P + s], 0);
      } else if (src < r) {
        ck_assert_int_eq(cnt, 1);
        ck_assert_int_eq(it[0].cls, DA_TILE_FULL);
        ck_assert_int_eq(it[0].pairs, n * n);
      } else {
        ck_assert_int_eq(cnt, 1);
        ck_assert_int_eq(it[0].cls, DA_TILE_PARTIAL);
        ck_assert_int_eq(it[0].pairs, n * (n + 1) / 2);
      }
    }
  for (int s = 1; s < P; s++) ck_assert_int_eq(S.n[s], 0);
  da_schedule_free(&S);
  /* With sub-blocks the diagonal block splits into n/256 KV sub-blocks, each PARTIAL against
   * the whole Q segment (Q is not split). */
  schedule_ok(&S, &L, &causal, 256);
  int64_t cnt;
  const da_work_item_t *it = da_schedule_items(&S, 0, 0, &cnt);
  ck_assert_int_eq(cnt, n / 256);
  for (int64_t i = 0; i < cnt; i++) ck_assert_int_eq(it[i].cls, DA_TILE_PARTIAL);
  it = da_schedule_items(&S, 3, 0, &cnt);
  ck_assert_int_eq(cnt, n / 256);
  /* Window 64 on contiguous shards of 1024: only the neighbouring block is touched. */
  da_schedule_free(&S);
  da_mask_t win = {.flags = DA_MASK_WINDOW, .window = 64};
  schedule_ok(&S, &L, &win, 256);
  for (int r = 0; r < P; r++)
    for (int s = 2; s < P; s++) ck_assert_int_eq(S.n[r * P + s], 0);
  it = da_schedule_items(&S, 5, 1, &cnt);
  ck_assert_int_eq(cnt, 1); /* the last sub-block of rank 4 */
  ck_assert_int_eq(it[0].k_off, n - 256);
  ck_assert_int_eq(it[0].pairs, 63 * 64 / 2);
  da_schedule_free(&S);
  da_layout_free(&L);
}
END_TEST

/* Zigzag item offsets: the second Q segment starts after the first one's rows, the second KV
 * segment after the first one's. */
START_TEST(schedule_zigzag_offsets) {
  da_layout_t L;
  da_mask_t none = {0};
  layout_ok(&L, DA_LAYOUT_ZIGZAG, 16, 4);
  da_schedule_t S;
  schedule_ok(&S, &L, &none, 0);
  int64_t cnt;
  const da_work_item_t *it = da_schedule_items(&S, 1, 1, &cnt); /* rank 1 holds rank 0's KV */
  ck_assert_int_eq(cnt, 4);
  for (int64_t i = 0; i < cnt; i++) {
    ck_assert_int_eq(it[i].q_off, it[i].qseg ? 2 : 0);
    ck_assert_int_eq(it[i].k_off, it[i].kseg ? 2 : 0);
    ck_assert_int_eq(it[i].q.start, it[i].qseg ? 12 : 2);
    ck_assert_int_eq(it[i].k.start, it[i].kseg ? 14 : 0);
    ck_assert_int_eq(it[i].pairs, 4);
    ck_assert_int_eq(it[i].cls, DA_TILE_FULL);
  }
  da_schedule_free(&S);
  da_layout_free(&L);
}
END_TEST

static double causal_imbalance(da_layout_kind_t kind, int P, int64_t N, int64_t block) {
  da_layout_t L;
  da_mask_t causal = {.flags = DA_MASK_CAUSAL};
  layout_ok(&L, kind, N, P);
  da_schedule_t S;
  schedule_ok(&S, &L, &causal, block);
  double imb = da_schedule_imbalance(&S);
  da_schedule_free(&S);
  da_layout_free(&L);
  return imb;
}

/* The facts that motivate striped and zigzag: causal work on contiguous shards is skewed toward
 * the last rank (exactly (P-1)n^2 + n(n+1)/2 over the mean S(S+1)/(2P), about 2 - 1/P), while
 * striped and zigzag are within a few per mille of perfect. */
START_TEST(schedule_causal_imbalance) {
  const int P = 8;
  const int64_t N = 8192, n = N / P;
  double ic = causal_imbalance(DA_LAYOUT_CONTIGUOUS, P, N, 512);
  double is = causal_imbalance(DA_LAYOUT_STRIPED, P, N, 512);
  double iz = causal_imbalance(DA_LAYOUT_ZIGZAG, P, N, 512);
  printf("# causal imbalance P=%d S=%lld: contiguous %.6f striped %.6f zigzag %.6f\n", P,
         (long long)N, ic, is, iz);
  double exact = ((double)(P - 1) * n * n + n * (n + 1) / 2.0) / ((double)N * (N + 1) / 2.0 / P);
  ck_assert_double_eq_tol(ic, exact, 1e-12);
  ck_assert_double_gt(ic, 1.5);
  ck_assert_double_lt(is, 1.05);
  ck_assert_double_lt(iz, 1.05);
  ck_assert_double_eq_tol(iz, 1.0, 1e-12); /* S divisible by 2P: exactly equal work */
  /* Striped: rank r does n(r+1) + P n(n-1)/2, so the last rank is over the mean by
   * (P-1)n/2 pairs. */
  double sexact = ((double)n * P + (double)P * n * (n - 1) / 2.0) / ((double)N * (N + 1) / 2.0 / P);
  ck_assert_double_eq_tol(is, sexact, 1e-12);
  /* Without a mask every layout is balanced to the token. */
  da_layout_t L;
  da_mask_t none = {0};
  for (int ki = 0; ki < 3; ki++) {
    layout_ok(&L, kinds[ki], N, P);
    da_schedule_t S;
    schedule_ok(&S, &L, &none, 512);
    ck_assert_double_eq_tol(da_schedule_imbalance(&S), 1.0, 1e-12);
    da_schedule_free(&S);
    da_layout_free(&L);
  }
  /* Odd P, uneven S: still balanced for striped and zigzag. */
  ck_assert_double_lt(causal_imbalance(DA_LAYOUT_STRIPED, 5, 10007, 333), 1.05);
  ck_assert_double_lt(causal_imbalance(DA_LAYOUT_ZIGZAG, 5, 10007, 333), 1.05);
  ck_assert_double_gt(causal_imbalance(DA_LAYOUT_CONTIGUOUS, 5, 10007, 333), 1.5);
}
END_TEST

/* Weighted shards without a mask: each rank's work is its share of rows times S. */
START_TEST(schedule_weighted_work) {
  double w[] = {1, 3};
  da_layout_t L;
  ck_assert_int_eq(da_layout_init(&L, DA_LAYOUT_WEIGHTED, 1000, 2, w), DA_SUCCESS);
  da_mask_t none = {0};
  da_schedule_t S;
  schedule_ok(&S, &L, &none, 100);
  ck_assert_int_eq(da_schedule_rank_work(&S, 0), 250 * 1000);
  ck_assert_int_eq(da_schedule_rank_work(&S, 1), 750 * 1000);
  ck_assert_double_eq_tol(da_schedule_imbalance(&S), 1.5, 1e-12);
  da_schedule_free(&S);
  da_layout_free(&L);
}
END_TEST

START_TEST(schedule_check_catches_corruption) {
  da_layout_t L;
  da_mask_t causal = {.flags = DA_MASK_CAUSAL};
  layout_ok(&L, DA_LAYOUT_STRIPED, 1000, 4);
  da_schedule_t S;
  for (int what = 0; what < 6; what++) {
    schedule_ok(&S, &L, &causal, 64);
    int64_t cnt;
    da_work_item_t *it = (da_work_item_t *)da_schedule_items(&S, 2, 1, &cnt);
    ck_assert_int_ge(cnt, 2);
    switch (what) {
      case 0: it[0].pairs++; S.work[2 * 4 + 1]++; break;          /* wrong count */
      case 1: it[1].k_off = it[0].k_off; it[1].k = it[0].k; break; /* duplicate */
      case 2: it[0].q.count++; break;                              /* past the shard */
      case 3: it[0].cls = DA_TILE_FULL; break;                     /* wrong class */
      case 4: S.work[2 * 4 + 1]--; break;                          /* work table */
      case 5: /* drop the last item of the whole schedule: total pairs fall short */
        S.n[4 * 4 - 1]--;
        S.work[4 * 4 - 1] -= S.items[S.first[15] + S.n[15]].pairs;
        break;
    }
    ck_assert_int_ne(da_schedule_check(&S, &L, &causal), DA_SUCCESS);
    da_schedule_free(&S);
  }
  da_layout_free(&L);
}
END_TEST

/* The scale the drivers use: 1M tokens, 8 ranks, 4K sub-blocks, every balanced layout, causal
 * and documents. No quadratic step anywhere (no timing asserted: speed lives in benchmarks). */
START_TEST(schedule_million_tokens) {
  const int64_t N = (int64_t)1 << 20;
  const int P = 8;
  test_mask_t doc = mask_make(M_CAUSAL_DOC, N);
  da_mask_t causal = {.flags = DA_MASK_CAUSAL};
  for (int ki = 0; ki < 3; ki++)
    for (int mi = 0; mi < 2; mi++) {
      const da_mask_t *m = mi ? &doc.m : &causal;
      da_layout_t L;
      layout_ok(&L, kinds[ki], N, P);
      da_schedule_t S;
      double t0 = da_time_now();
      schedule_ok(&S, &L, m, 4096);
      double t1 = da_time_now();
      int64_t total = 0, nitems = S.first[P * P - 1] + S.n[P * P - 1];
      for (int r = 0; r < P; r++) total += da_schedule_rank_work(&S, r);
      if (!mi) ck_assert_int_eq(total, N * (N + 1) / 2);
      printf("# S=1M P=8 block=4K %-10s %-6s: %6lld items, imbalance %.6f, build+check %.3f s\n",
             da_layout_name(kinds[ki]), mi ? "c+doc" : "causal", (long long)nitems,
             da_schedule_imbalance(&S), t1 - t0);
      da_schedule_free(&S);
      da_layout_free(&L);
    }
  mask_free(&doc);
}
END_TEST

static Suite *partition_suite(void) {
  Suite *s = suite_create("partition");
  TCase *tl = tcase_create("layout");
  tcase_add_test(tl, layout_all_kinds_round_trip);
  tcase_add_test(tl, layout_contiguous_shape);
  tcase_add_test(tl, layout_striped_shape);
  tcase_add_test(tl, layout_zigzag_shape);
  tcase_add_test(tl, layout_balance);
  tcase_add_test(tl, layout_weighted_proportions);
  tcase_add_test(tl, layout_long);
  tcase_add_test(tl, layout_check_catches_corruption);
  tcase_add_test(tl, layout_names);
  tcase_add_test(tl, bad_inputs);
  suite_add_tcase(s, tl);
  TCase *ts = tcase_create("schedule");
  tcase_set_timeout(ts, 300);
  tcase_add_test(ts, schedule_all_checked);
  tcase_add_test(ts, schedule_brute_force);
  tcase_add_test(ts, schedule_empty_blocks_skipped);
  tcase_add_test(ts, schedule_zigzag_offsets);
  tcase_add_test(ts, schedule_causal_imbalance);
  tcase_add_test(ts, schedule_weighted_work);
  tcase_add_test(ts, schedule_check_catches_corruption);
  tcase_add_test(ts, schedule_million_tokens);
  suite_add_tcase(s, ts);
  return s;
}

int main(void) {
  return tu_run(partition_suite());
}
