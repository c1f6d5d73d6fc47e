/* test_kvmap.c: the shard map of the distributed paged KV cache (partition/kvmap.c), no MPI:
 * appended pages keep equal shards within one page and weighted shards within a page (plus the
 * prefill's token) of their quota at every length, for every prefill layout; every position has
 * exactly one owner and the owners agree with the counts; replay equals growing token by token;
 * bad arguments are refused. Every test calls da_kvmap_check, the invariant checker. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvmap.h"
#include "test_util.h"
#include "test_run.h"

/* Grow a sequence from its prefill L0 to len token by token, as the cache does, checking the
 * invariant at every length; then compare with da_kvmap_replay. Returns the final counts. */
static void grow_and_check(const da_kvmap_t *m, int64_t L0, int64_t len, int64_t *tokens) {
  const int P = m->nranks;
  int64_t *rep = tu_xmalloc((size_t)P * sizeof *rep);
  ck_assert_int_eq(da_kvmap_replay(m, L0, L0, tokens, NULL), DA_SUCCESS);
  ck_assert_msg(da_kvmap_check(m, L0, L0, tokens) == DA_SUCCESS, "prefill %lld: %s", (long long)L0,
                da_error_message());
  int owner = -1;
  for (int64_t pos = L0; pos < len; pos++) {
    if ((pos - L0) % m->page == 0) owner = da_kvmap_next_owner(m, tokens, pos);
    ck_assert(owner >= 0 && owner < P);
    tokens[owner]++;
    /* every length when short; else where the extremes are: page ends, mid-page, the end */
    const int64_t in_page = (pos + 1 - L0) % m->page;
    if (len - L0 > 4096 && in_page != 0 && in_page != m->page / 2 && pos + 1 != len) continue;
    ck_assert_msg(da_kvmap_check(m, L0, pos + 1, tokens) == DA_SUCCESS, "P=%d page=%lld L0=%lld len=%lld: %s", P,
                  (long long)m->page, (long long)L0, (long long)(pos + 1), da_error_message());
  }
  ck_assert_int_eq(da_kvmap_replay(m, L0, len, rep, NULL), DA_SUCCESS);
  for (int r = 0; r < P; r++) ck_assert_int_eq(rep[r], tokens[r]);
  free(rep);
}

START_TEST(equal_balance) {
  static const da_layout_kind_t kinds[] = {DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_STRIPED, DA_LAYOUT_ZIGZAG};
  static const int64_t pages[] = {1, 3, 16};
  int64_t tokens[16];
  for (int P = 1; P <= 9; P++)
    for (int k = 0; k < 3; k++)
      for (int pg = 0; pg < 3; pg++) {
        da_kvmap_t m;
        ck_assert_int_eq(da_kvmap_init(&m, P, pages[pg], kinds[k], NULL), DA_SUCCESS);
        const int64_t L0s[] = {0, 1, P - 1, 37, 1000 + P - 1};
        for (int i = 0; i < 5; i++) grow_and_check(&m, L0s[i], L0s[i] + 7 * pages[pg] * P + 5, tokens);
        da_kvmap_free(&m);
      }
}
END_TEST

START_TEST(equal_min_first) {
  /* equal weights: the new page goes to the rank holding the fewest tokens, ties to the lowest */
  da_kvmap_t m;
  ck_assert_int_eq(da_kvmap_init(&m, 4, 8, DA_LAYOUT_CONTIGUOUS, NULL), DA_SUCCESS);
  int64_t t1[4] = {10, 9, 9, 10}, t2[4] = {3, 3, 3, 3}, t3[4] = {8, 8, 8, 0};
  ck_assert_int_eq(da_kvmap_next_owner(&m, t1, 38), 1);
  ck_assert_int_eq(da_kvmap_next_owner(&m, t2, 12), 0);
  ck_assert_int_eq(da_kvmap_next_owner(&m, t3, 24), 3);
  /* from an empty sequence the pages go round robin */
  int owners[12];
  int64_t tok[4];
  ck_assert_int_eq(da_kvmap_replay(&m, 0, 12 * 8, tok, owners), DA_SUCCESS);
  for (int j = 0; j < 12; j++) ck_assert_int_eq(owners[j], j % 4);
  da_kvmap_free(&m);
}
END_TEST

START_TEST(weighted_balance) {
  uint64_t rs = 42;
  int64_t tokens[16];
  double w[16];
  for (int it = 0; it < 800; it++) {
    const int P = (int)tu_rand(&rs, 1, 12);
    for (int r = 0; r < P; r++) {
      int kind = (int)tu_rand(&rs, 0, 2); /* integers, uniform, heavy-tailed tiny shares */
      w[r] = kind == 0 ? (double)tu_rand(&rs, 1, 10) : kind == 1 ? 0.05 + tu_rand01(&rs) : 1e-3 + pow(tu_rand01(&rs), 4);
    }
    const int64_t page = tu_rand(&rs, 1, 40), L0 = tu_rand(&rs, 0, 1) ? tu_rand(&rs, 1, 3000) : 0;
    da_kvmap_t m;
    ck_assert_int_eq(da_kvmap_init(&m, P, page, DA_LAYOUT_CONTIGUOUS, w), DA_SUCCESS);
    ck_assert_int_eq(m.kind, DA_LAYOUT_WEIGHTED);
    grow_and_check(&m, L0, L0 + page * tu_rand(&rs, 1, 250) + tu_rand(&rs, 0, page), tokens);
    da_kvmap_free(&m);
  }
}
END_TEST

START_TEST(ownership) {
  /* every position has one owner; counts per owner equal the replayed counts; the appended pages
   * are runs of `page` consecutive positions */
  static const da_layout_kind_t kinds[] = {DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_STRIPED, DA_LAYOUT_ZIGZAG};
  double w[5] = {1, 3, 0.5, 2, 1};
  for (int P = 1; P <= 5; P++)
    for (int k = 0; k < 4; k++) {
      da_kvmap_t m;
      ck_assert_int_eq(da_kvmap_init(&m, P, 7, k < 3 ? kinds[k] : DA_LAYOUT_CONTIGUOUS, k < 3 ? NULL : w),
                       DA_SUCCESS);
      const int64_t L0 = 53, len = 400;
      int owners[64], counts[5] = {0};
      int64_t tok[5];
      ck_assert_int_eq(da_kvmap_replay(&m, L0, len, tok, owners), DA_SUCCESS);
      da_layout_t L;
      ck_assert_int_eq(da_kvmap_prefill_layout(&m, L0, &L), DA_SUCCESS);
      ck_assert_int_eq(da_layout_check(&L), DA_SUCCESS);
      for (int64_t pos = 0; pos < len; pos++) {
        int o = da_kvmap_owner(&m, &L, L0, owners, pos);
        ck_assert(o >= 0 && o < P);
        counts[o]++;
        if (pos > L0 && (pos - L0) % 7) ck_assert_int_eq(o, da_kvmap_owner(&m, &L, L0, owners, pos - 1));
      }
      for (int r = 0; r < P; r++) ck_assert_int_eq(counts[r], tok[r]);
      ck_assert(da_kvmap_check(&m, L0, len, tok) == DA_SUCCESS);
      da_layout_free(&L);
      da_kvmap_free(&m);
    }
}
END_TEST

START_TEST(bad_args) {
  da_kvmap_t m;
  double w[3] = {1, 0, 2}, wn[2] = {1, NAN};
  ck_assert_int_eq(da_kvmap_init(&m, 0, 8, DA_LAYOUT_CONTIGUOUS, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_kvmap_init(&m, 2, 0, DA_LAYOUT_CONTIGUOUS, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_kvmap_init(&m, 3, 8, DA_LAYOUT_CONTIGUOUS, w), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_kvmap_init(&m, 2, 8, DA_LAYOUT_CONTIGUOUS, wn), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_kvmap_init(&m, 2, 8, DA_LAYOUT_WEIGHTED, NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_int_eq(da_kvmap_init(&m, 2, 8, DA_LAYOUT_STRIPED, NULL), DA_SUCCESS);
  int64_t tok[2] = {0, 0};
  ck_assert_int_eq(da_kvmap_replay(&m, 10, 5, tok, NULL), DA_ERR_INVALID_ARGUMENT);
  /* the checker catches counts that do not add up or drift apart */
  int64_t bad1[2] = {5, 4}, bad2[2] = {20, 0};
  ck_assert_int_eq(da_kvmap_check(&m, 0, 10, bad1), DA_ERR_INTERNAL);
  ck_assert_int_eq(da_kvmap_check(&m, 0, 20, bad2), DA_ERR_INTERNAL);
  da_kvmap_free(&m);
}
END_TEST

int main(void) {
  Suite *s = suite_create("kvmap");
  TCase *tc = tcase_create("kvmap");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_test(tc, equal_balance);
  tcase_add_test(tc, equal_min_first);
  tcase_add_test(tc, weighted_balance);
  tcase_add_test(tc, ownership);
  tcase_add_test(tc, bad_args);
  suite_add_tcase(s, tc);
  return tu_run(s);
}
