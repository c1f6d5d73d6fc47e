/* test_gpumap.c: the rank -> GPU decision of launcher/gpumap.c, without MPI or a GPU. The expected
 * maps are written out by hand from the rule (one rank per GPU; sharing in contiguous blocks when
 * asked or when ranks outnumber GPUs), never computed by the code under test. Label unit. */
#include <check.h>
#include <stdio.h>
#include <string.h>
#include "gpumap.h"
#include "test_run.h"

static char err[256];

/* The device of every local rank of an n-rank node with g GPUs and option rpg. */
static void devices(int n, int g, int rpg, int *dev, int *per) {
  for (int r = 0; r < n; r++) {
    da_gpumap_t m;
    ck_assert_msg(da_gpumap_decide(r, n, g, rpg, &m, err, sizeof err) == 0, "n %d g %d rpg %d: %s", n, g, rpg, err);
    dev[r] = m.device;
    if (per) per[r] = m.per_gpu;
  }
}

static void expect(int n, int g, int rpg, const int *want_dev, const int *want_per) {
  int dev[64], per[64];
  devices(n, g, rpg, dev, per);
  for (int r = 0; r < n; r++) {
    ck_assert_msg(dev[r] == want_dev[r], "n %d g %d rpg %d: rank %d on device %d, expected %d", n, g, rpg, r, dev[r],
                  want_dev[r]);
    if (want_per)
      ck_assert_msg(per[r] == want_per[r], "n %d g %d rpg %d: rank %d per_gpu %d, expected %d", n, g, rpg, r, per[r],
                    want_per[r]);
  }
}

START_TEST(one_per_gpu) {
  expect(8, 8, 0, (int[]){0, 1, 2, 3, 4, 5, 6, 7}, (int[]){1, 1, 1, 1, 1, 1, 1, 1});
  expect(2, 8, 0, (int[]){0, 1}, (int[]){1, 1});
  expect(1, 1, 0, (int[]){0}, (int[]){1});
  da_gpumap_t m;
  ck_assert_int_eq(da_gpumap_decide(3, 4, 8, 0, &m, err, sizeof err), 0);
  ck_assert_int_eq(m.shared, 0);
  ck_assert_int_eq(m.gpus_used, 4);
  ck_assert_str_eq(m.note, "");
}
END_TEST

START_TEST(more_ranks_than_gpus) {
  /* 8 ranks on one GPU: all on device 0, shared, and the map says so */
  expect(8, 1, 0, (int[]){0, 0, 0, 0, 0, 0, 0, 0}, (int[]){8, 8, 8, 8, 8, 8, 8, 8});
  /* 5 on 4: blocks of 2, 1, 1, 1 (every GPU used, sizes within one) */
  expect(5, 4, 0, (int[]){0, 0, 1, 2, 3}, (int[]){2, 2, 1, 1, 1});
  /* 6 on 4: 2, 1, 2, 1 */
  expect(6, 4, 0, (int[]){0, 0, 1, 2, 2, 3}, (int[]){2, 2, 1, 2, 2, 1});
  /* 16 on 8: pairs */
  expect(16, 8, 0, (int[]){0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7}, NULL);
  da_gpumap_t m;
  ck_assert_int_eq(da_gpumap_decide(4, 5, 4, 0, &m, err, sizeof err), 0);
  ck_assert_int_eq(m.shared, 1);
  ck_assert_int_eq(m.gpus_used, 4);
  ck_assert_msg(strstr(m.note, "5 ranks") && strstr(m.note, "4 GPUs") && strstr(m.note, "share"), "%s", m.note);
}
END_TEST

START_TEST(ranks_per_gpu) {
  expect(8, 2, 4, (int[]){0, 0, 0, 0, 1, 1, 1, 1}, (int[]){4, 4, 4, 4, 4, 4, 4, 4});
  expect(8, 3, 3, (int[]){0, 0, 0, 1, 1, 1, 2, 2}, (int[]){3, 3, 3, 3, 3, 3, 2, 2});
  expect(8, 1, 8, (int[]){0, 0, 0, 0, 0, 0, 0, 0}, NULL);
  /* more per GPU than ranks: all on the first GPU, still sharing */
  expect(2, 8, 4, (int[]){0, 0}, (int[]){2, 2});
  /* 1 per GPU asked explicitly: as the default */
  expect(3, 4, 1, (int[]){0, 1, 2}, (int[]){1, 1, 1});
  da_gpumap_t m;
  ck_assert_int_eq(da_gpumap_decide(0, 3, 4, 1, &m, err, sizeof err), 0);
  ck_assert_int_eq(m.shared, 0);
  ck_assert_int_eq(da_gpumap_decide(0, 1, 1, 4, &m, err, sizeof err), 0);
  ck_assert_int_eq(m.shared, 0); /* one rank alone on its GPU shares nothing */
  ck_assert_int_eq(da_gpumap_decide(5, 8, 2, 4, &m, err, sizeof err), 0);
  ck_assert_int_eq(m.shared, 1);
  ck_assert_int_eq(m.asked, 4);
  ck_assert_int_eq(m.gpus_used, 2);
  ck_assert_msg(strstr(m.note, "--ranks-per-gpu 4"), "%s", m.note);
}
END_TEST

START_TEST(invalid) {
  da_gpumap_t m;
  ck_assert_int_eq(da_gpumap_decide(0, 8, 1, 4, &m, err, sizeof err), -1); /* 8 ranks / 4 per GPU need 2 */
  ck_assert_msg(strstr(err, "need 2 GPUs") && strstr(err, "1 is visible"), "%s", err);
  ck_assert_int_eq(da_gpumap_decide(0, 2, 0, 0, &m, err, sizeof err), -1);
  ck_assert_msg(strstr(err, "CUDA"), "%s", err);
  ck_assert_int_eq(da_gpumap_decide(0, 2, 2, -1, &m, err, sizeof err), -1);
  ck_assert_msg(strstr(err, "--ranks-per-gpu -1"), "%s", err);
  ck_assert_int_eq(da_gpumap_decide(0, 2, 2, DA_GPUMAP_MAX_PER_GPU + 1, &m, err, sizeof err), -1);
  ck_assert_int_eq(da_gpumap_decide(2, 2, 2, 0, &m, err, sizeof err), -1);
  ck_assert_int_eq(da_gpumap_decide(-1, 2, 2, 0, &m, err, sizeof err), -1);
  ck_assert_int_eq(da_gpumap_decide(0, 0, 2, 0, &m, err, sizeof err), -1);
}
END_TEST

/* Over every node shape up to 24 ranks and 9 GPUs: ranks stay in range, consecutive ranks never
 * go back to an earlier GPU, per_gpu is the count of ranks on that device, and unasked sharing
 * keeps the blocks within one rank of each other and uses every GPU. */
START_TEST(properties) {
  for (int n = 1; n <= 24; n++)
    for (int g = 1; g <= 9; g++)
      for (int rpg = 0; rpg <= 5; rpg++) {
        int dev[64], per[64], cnt[16] = {0};
        if (rpg && (n + rpg - 1) / rpg > g) {
          da_gpumap_t m;
          ck_assert_int_eq(da_gpumap_decide(0, n, g, rpg, &m, err, sizeof err), -1);
          continue;
        }
        devices(n, g, rpg, dev, per);
        for (int r = 0; r < n; r++) {
          ck_assert(dev[r] >= 0 && dev[r] < g);
          if (r) ck_assert(dev[r] == dev[r - 1] || dev[r] == dev[r - 1] + 1);
          cnt[dev[r]]++;
        }
        int lo = n, hi = 0;
        for (int r = 0; r < n; r++) ck_assert_int_eq(per[r], cnt[dev[r]]);
        for (int d = 0; d < g; d++) {
          if (rpg) ck_assert(cnt[d] <= rpg);
          if (cnt[d] < lo) lo = cnt[d];
          if (cnt[d] > hi) hi = cnt[d];
        }
        if (!rpg && n > g) ck_assert_msg(lo >= 1 && hi - lo <= 1, "n %d g %d: blocks %d..%d", n, g, lo, hi);
        if (!rpg && n <= g) ck_assert_int_eq(hi, 1);
      }
}
END_TEST

START_TEST(transport) {
  da_gpumap_t m;
  ck_assert_int_eq(da_gpumap_decide(1, 8, 1, 0, &m, err, sizeof err), 0);
  ck_assert_int_eq(da_gpumap_check_transport(&m, "nccl", err, sizeof err), -1);
  ck_assert_msg(strstr(err, "cuda-ipc") && strstr(err, "Duplicate GPU"), "%s", err);
  ck_assert_int_eq(da_gpumap_check_transport(&m, "cuda-ipc", err, sizeof err), 0);
  ck_assert_int_eq(da_gpumap_decide(1, 8, 8, 0, &m, err, sizeof err), 0);
  ck_assert_int_eq(da_gpumap_check_transport(&m, "nccl", err, sizeof err), 0);
}
END_TEST

START_TEST(groups) {
  /* srun --gpus-per-task=1: each rank sees only its own GPU: groups of one */
  const char *own[] = {"0", "1", "2", "3"};
  int rk, sz;
  da_gpumap_group(own, 4, 2, &rk, &sz);
  ck_assert_int_eq(rk, 0);
  ck_assert_int_eq(sz, 1);
  /* two pairs of ranks each given two GPUs */
  const char *pairs[] = {"0,1", "2,3", "0,1", "2,3"};
  da_gpumap_group(pairs, 4, 2, &rk, &sz);
  ck_assert_int_eq(rk, 1);
  ck_assert_int_eq(sz, 2);
  da_gpumap_group(pairs, 4, 3, &rk, &sz);
  ck_assert_int_eq(rk, 1);
  ck_assert_int_eq(sz, 2);
  /* unset everywhere (NULL and "" are the same): the whole node is one group */
  const char *none[] = {NULL, "", NULL};
  da_gpumap_group(none, 3, 2, &rk, &sz);
  ck_assert_int_eq(rk, 2);
  ck_assert_int_eq(sz, 3);
}
END_TEST

int main(void) {
  Suite *s = suite_create("gpumap");
  TCase *tc = tcase_create("decide");
  tcase_add_test(tc, one_per_gpu);
  tcase_add_test(tc, more_ranks_than_gpus);
  tcase_add_test(tc, ranks_per_gpu);
  tcase_add_test(tc, invalid);
  tcase_add_test(tc, properties);
  tcase_add_test(tc, transport);
  tcase_add_test(tc, groups);
  suite_add_tcase(s, tc);
  return tu_run(s);
}
