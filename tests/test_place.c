/* test_place.c: placement decisions (launcher/place.c) on topologies that are not this machine:
 * the DGX-like XML of tests/topo (2 packages, 4 NUMA nodes, 32 cores, 8 GPUs behind PCIe
 * switches, a BMC VGA that is not a GPU) and hwloc synthetic 1-socket nodes. Label unit. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "place.h"
#include "test_run.h"

static char err[256];

static da_topo_t *dgx(void) {
  da_topo_t *t = NULL;
  ck_assert_msg(da_topo_load(&t, DA_TOPO_DIR "/dgx-2s8g.xml", NULL, err, sizeof err) == 0, "%s", err);
  return t;
}
static da_topo_t *synth(const char *desc) {
  da_topo_t *t = NULL;
  ck_assert_msg(da_topo_load(&t, NULL, desc, err, sizeof err) == 0, "%s", err);
  return t;
}

/* Every local rank of an n-rank node with the GPU da_place_gpu gives it under `visible`. */
static void node(da_topo_t *t, da_bind_t b, int n, const char *visible, const char *const *cur, da_placement_t *out) {
  int gpu[64], vis;
  for (int r = 0; r < n; r++) gpu[r] = da_place_gpu(t, visible, r, &vis);
  ck_assert_msg(da_place_node(t, b, n, gpu, cur, out, err, sizeof err) == 0, "%s", err);
}

START_TEST(dgx_discovery) {
  da_topo_t *t = dgx();
  da_topo_info_t i;
  da_topo_info(t, &i);
  ck_assert_int_eq(i.packages, 2);
  ck_assert_int_eq(i.numa, 4);
  ck_assert_int_eq(i.cores, 32);
  ck_assert_int_eq(i.pus, 64);
  ck_assert_int_eq(i.gpus, 8); /* the ASPEED VGA and the NICs are not GPUs */
  ck_assert_int_eq(i.this_system, 0);
  char bus[32], cpus[DA_PLACE_LIST];
  ck_assert_int_eq(da_topo_gpu(t, 0, bus, sizeof bus, cpus, sizeof cpus), 0);
  ck_assert_str_eq(bus, "0000:08:00.0");
  ck_assert_str_eq(cpus, "0-7,32-39");
  ck_assert_int_eq(da_topo_gpu(t, 3, bus, sizeof bus, cpus, sizeof cpus), 0);
  ck_assert_str_eq(bus, "0000:29:00.0");
  ck_assert_str_eq(cpus, "8-15,40-47");
  ck_assert_int_eq(da_topo_gpu(t, 7, bus, sizeof bus, cpus, sizeof cpus), 0);
  ck_assert_str_eq(bus, "0000:69:00.0");
  ck_assert_str_eq(cpus, "24-31,56-63");
  ck_assert_int_eq(da_topo_gpu(t, 8, bus, sizeof bus, cpus, sizeof cpus), -1);
  ck_assert_int_eq(da_topo_gpu_by_busid(t, "0000:48:00.0"), 4);
  ck_assert_int_eq(da_topo_gpu_by_busid(t, "49:00.0"), 5);
  ck_assert_int_eq(da_topo_gpu_by_busid(t, "0000:05:00.0"), -1); /* the BMC */
  ck_assert_int_eq(da_topo_gpu_by_busid(t, "junk"), -1);
  da_topo_free(t);
}
END_TEST

START_TEST(visible_devices) {
  da_topo_t *t = dgx();
  int v;
  ck_assert_int_eq(da_place_gpu(t, NULL, 3, &v), 3); ck_assert_int_eq(v, 3);
  ck_assert_int_eq(da_place_gpu(t, NULL, 11, &v), 3);      /* 16 ranks on 8 GPUs: two per GPU */
  ck_assert_int_eq(da_place_gpu(t, "3", 5, &v), 3); ck_assert_int_eq(v, 0); /* srun --gpus-per-task=1 */
  ck_assert_int_eq(da_place_gpu(t, "2,5", 1, &v), 5); ck_assert_int_eq(v, 1);
  ck_assert_int_eq(da_place_gpu(t, "2,5", 2, &v), 2); ck_assert_int_eq(v, 0);
  ck_assert_int_eq(da_place_gpu(t, "GPU-8f2a", 0, &v), -2); ck_assert_int_eq(v, 0);
  ck_assert_int_eq(da_place_gpu(t, "9", 0, &v), -2);
  ck_assert_int_eq(da_place_gpu(t, "", 0, &v), -1); ck_assert_int_eq(v, -1);
  ck_assert_int_eq(da_place_gpu(t, "NoDevFiles", 0, &v), -1);
  da_topo_free(t);
  t = synth("pack:1 numa:1 core:4 pu:1");
  ck_assert_int_eq(da_place_gpu(t, NULL, 0, &v), -1);
  ck_assert_int_eq(da_place_gpu(t, "0", 0, &v), -2); /* fake gres: a device the topology lacks */
  da_topo_free(t);
}
END_TEST

START_TEST(dgx_gpu_local_8) {
  da_topo_t *t = dgx();
  da_placement_t p[8];
  node(t, DA_BIND_GPU_LOCAL, 8, NULL, NULL, p);
  /* two GPUs per NUMA node: the two ranks split its 8 cores */
  ck_assert_str_eq(p[0].cpus, "0-3,32-35");
  ck_assert_str_eq(p[1].cpus, "4-7,36-39");
  ck_assert_str_eq(p[5].cpus, "20-23,52-55");
  ck_assert_str_eq(p[7].cpus, "28-31,60-63");
  ck_assert_str_eq(p[7].gpu_busid, "0000:69:00.0");
  ck_assert_str_eq(p[7].gpu_cpus, "24-31,56-63");
  for (int r = 0; r < 8; r++) {
    ck_assert_int_eq(p[r].gpu, r);
    ck_assert_int_eq(p[r].cores, 4);
    ck_assert_int_eq(p[r].sharing, 1);
    ck_assert_int_eq(p[r].threads, 4);
    ck_assert_int_eq(p[r].changed, 1);
    ck_assert_str_eq(p[r].note, "");
  }
  da_topo_free(t);
}
END_TEST

START_TEST(dgx_gpu_local_16) {
  da_topo_t *t = dgx();
  da_placement_t p[16];
  node(t, DA_BIND_GPU_LOCAL, 16, NULL, NULL, p);
  /* NUMA node 0 holds GPUs 0, 1 and so ranks 0, 1, 8, 9: two cores each, in local rank order */
  ck_assert_str_eq(p[0].cpus, "0-1,32-33");
  ck_assert_str_eq(p[1].cpus, "2-3,34-35");
  ck_assert_str_eq(p[8].cpus, "4-5,36-37");
  ck_assert_str_eq(p[9].cpus, "6-7,38-39");
  ck_assert_int_eq(p[8].gpu, 0);
  for (int r = 0; r < 16; r++) ck_assert_int_eq(p[r].threads, 2);
  da_topo_free(t);
}
END_TEST

START_TEST(dgx_gpu_local_per_task_visible) {
  /* srun --gpus-per-task=1: each rank sees one GPU (its own CUDA_VISIBLE_DEVICES) */
  da_topo_t *t = dgx();
  int gpu[4] = {4, 5, 6, 7};
  da_placement_t p[4];
  ck_assert_msg(da_place_node(t, DA_BIND_GPU_LOCAL, 4, gpu, NULL, p, err, sizeof err) == 0, "%s", err);
  ck_assert_str_eq(p[0].cpus, "16-19,48-51");
  ck_assert_str_eq(p[1].cpus, "20-23,52-55");
  ck_assert_str_eq(p[2].cpus, "24-27,56-59");
  ck_assert_str_eq(p[3].gpu_busid, "0000:69:00.0");
  da_topo_free(t);
}
END_TEST

START_TEST(dgx_numa) {
  da_topo_t *t = dgx();
  da_placement_t p[8];
  node(t, DA_BIND_NUMA, 8, NULL, NULL, p);
  ck_assert_str_eq(p[0].cpus, "0-3,32-35");
  ck_assert_str_eq(p[2].cpus, "8-11,40-43");
  ck_assert_str_eq(p[7].cpus, "28-31,60-63");
  node(t, DA_BIND_NUMA, 2, NULL, NULL, p); /* fewer ranks than NUMA nodes: two nodes each */
  ck_assert_str_eq(p[0].cpus, "0-15,32-47");
  ck_assert_str_eq(p[1].cpus, "16-31,48-63");
  ck_assert_int_eq(p[1].threads, 16);
  node(t, DA_BIND_NUMA, 3, NULL, NULL, p);
  ck_assert_str_eq(p[0].cpus, "0-7,32-39");
  ck_assert_str_eq(p[1].cpus, "8-15,40-47");
  ck_assert_str_eq(p[2].cpus, "16-31,48-63");
  da_topo_free(t);
}
END_TEST

START_TEST(inherit_and_none) {
  da_topo_t *t = dgx();
  da_placement_t p[4];
  const char *bound[4] = {"0", "1", "2", "3"};
  node(t, DA_BIND_INHERIT, 4, NULL, bound, p); /* mpirun --bind-to hwthread */
  for (int r = 0; r < 4; r++) {
    ck_assert_str_eq(p[r].cpus, bound[r]);
    ck_assert_int_eq(p[r].changed, 0);
    ck_assert_int_eq(p[r].threads, 1);
  }
  node(t, DA_BIND_INHERIT, 4, NULL, NULL, p); /* --bind-to none: four ranks share 32 cores */
  ck_assert_str_eq(p[2].cpus, "0-63");
  ck_assert_int_eq(p[2].sharing, 4);
  ck_assert_int_eq(p[2].threads, 8);
  const char *pair[2] = {"0-1,32-33", "0-1,32-33"};
  node(t, DA_BIND_INHERIT, 2, NULL, pair, p); /* two ranks given the same two cores */
  ck_assert_int_eq(p[0].threads, 1);
  node(t, DA_BIND_NONE, 4, NULL, bound, p);
  ck_assert_str_eq(p[1].cpus, "0-63");
  ck_assert_int_eq(p[1].changed, 1);
  ck_assert_int_eq(p[1].threads, 8);
  const char *bad[1] = {"zz"};
  ck_assert_int_eq(da_place_node(t, DA_BIND_INHERIT, 1, NULL, bad, p, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "bad cpu list 'zz'"));
  ck_assert_int_eq(da_place_node(t, DA_BIND_INHERIT, 0, NULL, NULL, p, err, sizeof err), -1);
  da_topo_free(t);
}
END_TEST

START_TEST(one_socket) {
  da_topo_t *t = synth("pack:1 numa:1 core:16 pu:2");
  da_topo_info_t i;
  da_topo_info(t, &i);
  ck_assert_int_eq(i.packages, 1); ck_assert_int_eq(i.cores, 16); ck_assert_int_eq(i.gpus, 0);
  da_placement_t p[4];
  node(t, DA_BIND_GPU_LOCAL, 4, NULL, NULL, p); /* no GPU: numa instead, said so */
  ck_assert_str_eq(p[0].cpus, "0-7");
  ck_assert_str_eq(p[3].cpus, "24-31");
  ck_assert_int_eq(p[3].threads, 4);
  ck_assert_ptr_nonnull(strstr(p[0].note, "no GPU for this rank; numa instead"));
  node(t, DA_BIND_NUMA, 3, NULL, NULL, p); /* 16 cores in 3: 5, 5, 6 */
  ck_assert_int_eq(p[0].cores, 5); ck_assert_int_eq(p[1].cores, 5); ck_assert_int_eq(p[2].cores, 6);
  ck_assert_str_eq(p[2].cpus, "20-31");
  node(t, DA_BIND_GPU_LOCAL, 1, "0", NULL, p); /* a GPU the topology lacks (fake gres) */
  ck_assert_int_eq(p[0].gpu, -2);
  ck_assert_ptr_nonnull(strstr(p[0].note, "not in the topology"));
  ck_assert_str_eq(p[0].cpus, "0-31");
  da_topo_free(t);
}
END_TEST

START_TEST(more_ranks_than_cores) {
  da_topo_t *t = synth("pack:1 core:2 pu:1");
  da_placement_t p[4];
  node(t, DA_BIND_NUMA, 4, NULL, NULL, p);
  ck_assert_str_eq(p[0].cpus, "0"); ck_assert_str_eq(p[1].cpus, "0");
  ck_assert_str_eq(p[2].cpus, "1"); ck_assert_str_eq(p[3].cpus, "1");
  for (int r = 0; r < 4; r++) {
    ck_assert_int_eq(p[r].sharing, 2);
    ck_assert_int_eq(p[r].threads, 1);
  }
  da_topo_free(t);
}
END_TEST

START_TEST(load_errors_and_apply) {
  da_topo_t *t = NULL;
  ck_assert_int_eq(da_topo_load(&t, "/nonexistent/topo.xml", NULL, err, sizeof err), -1);
  ck_assert_ptr_null(t);
  ck_assert_ptr_nonnull(strstr(err, "/nonexistent/topo.xml"));
  ck_assert_int_eq(da_topo_load(&t, NULL, "pack:zz", err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "synthetic"));
  t = dgx();
  da_placement_t p[1];
  node(t, DA_BIND_NUMA, 1, NULL, (const char *const[]){"0"}, p);
  ck_assert_int_eq(p[0].changed, 1);
  ck_assert_int_eq(da_place_apply(t, &p[0], err, sizeof err), -1); /* never bind to an XML machine */
  ck_assert_ptr_nonnull(strstr(err, "not this machine"));
  da_topo_free(t);
  /* this machine: loads, knows the current binding, and re-applying it is a no-op */
  ck_assert_msg(da_topo_load(&t, NULL, NULL, err, sizeof err) == 0, "%s", err);
  da_topo_info_t i;
  da_topo_info(t, &i);
  ck_assert_int_eq(i.this_system, 1);
  char cur[DA_PLACE_LIST];
  da_place_current(t, cur, sizeof cur);
  ck_assert_str_ne(cur, "");
  node(t, DA_BIND_INHERIT, 1, NULL, (const char *const[]){cur}, p);
  ck_assert_int_eq(p[0].changed, 0);
  ck_assert_int_eq(da_place_apply(t, &p[0], err, sizeof err), 0);
  da_topo_free(t);
}
END_TEST

int main(void) {
  unsetenv("DISTATTN_HWLOC_XML");
  Suite *s = suite_create("place");
  TCase *tc = tcase_create("place");
  tcase_add_test(tc, dgx_discovery);
  tcase_add_test(tc, visible_devices);
  tcase_add_test(tc, dgx_gpu_local_8);
  tcase_add_test(tc, dgx_gpu_local_16);
  tcase_add_test(tc, dgx_gpu_local_per_task_visible);
  tcase_add_test(tc, dgx_numa);
  tcase_add_test(tc, inherit_and_none);
  tcase_add_test(tc, one_socket);
  tcase_add_test(tc, more_ranks_than_cores);
  tcase_add_test(tc, load_errors_and_apply);
  suite_add_tcase(s, tc);
  return tu_run(s);
}
