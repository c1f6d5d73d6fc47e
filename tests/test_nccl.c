/* test_nccl.c: the nccl and cuda-ipc transports where CUDA and NCCL are built (label mpi; with a
 * GPU, label gpu too). Without a GPU:
 *   - bootstrap: rank 0's ncclGetUniqueId reaches every rank over MPI (needs no device), and the
 *     id is not all zeros;
 *   - opening `nccl` and `cuda-ipc` fails on every rank within seconds (no hang), with
 *     DA_ERR_CUDA on a rank that has no device and a message naming CUDA, or DA_ERR_REMOTE
 *     naming the failing rank.
 * With a GPU (every rank sees one): a ring exchange over `nccl` (needs one GPU per rank) and
 * over `cuda-ipc`, bytes checked on the host; exit 77 (skipped) when NCCL cannot run the job's
 * shape on this machine (more ranks than GPUs). */
#include <mpi.h>
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "devapi.h"
#include "transport.h"
#include "test_mpi.h"

static int g_rank, g_size, g_ndev;

START_TEST(bootstrap) {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  da_xport_t mx;
  ck_assert_int_eq(da_xport_open(&mx, "mpi", comm, 20.0), DA_SUCCESS);
  unsigned char id[128], zero[128] = {0};
  memset(id, 0, sizeof id);
  da_status_t st = da_nccl_unique_id(&mx, id, sizeof id);
  ck_assert_msg(st == DA_SUCCESS, "ncclGetUniqueId bootstrap: %s", da_error_message());
  ck_assert_int_ne(memcmp(id, zero, sizeof id), 0);
  /* Every rank holds rank 0's id: compare against rank 0's copy. */
  unsigned char root[128];
  memcpy(root, id, sizeof id);
  MPI_Bcast(root, sizeof root, MPI_BYTE, 0, MPI_COMM_WORLD);
  ck_assert_int_eq(memcmp(id, root, sizeof id), 0);
  /* A wrong size is refused, not overrun. */
  ck_assert_int_eq(da_nccl_unique_id(&mx, id, 64), DA_ERR_INTERNAL);
  da_xport_close(&mx);
  MPI_Comm_free(&comm);
}
END_TEST

/* Opening a device transport without a device: every rank fails, fast, in words. */
static void open_fails(const char *name) {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  da_xport_t xp;
  const double t0 = da_time_now();
  da_status_t st = da_xport_open(&xp, name, comm, 30.0);
  const double took = da_time_now() - t0;
  const char *msg = da_error_message();
  if (g_rank == 0) printf("%s without a GPU: %s (%.2f s)\n", name, msg, took);
  ck_assert_msg(st == DA_ERR_CUDA || st == DA_ERR_REMOTE, "%s: status %d: %s", name, (int)st, msg);
  ck_assert_ptr_nonnull(strstr(msg, "CUDA"));
  ck_assert_ptr_nonnull(strstr(msg, name));
  /* Fast by construction: the agreement runs before any wait on NCCL, so a hang would be a
   * DA_ERR_TIMEOUT from the 30 s deadline, which the status check above already refuses. */
  ck_assert_ptr_null(xp.t);
  MPI_Comm_free(&comm);
}

START_TEST(no_device_nccl) { open_fails("nccl"); }
END_TEST

START_TEST(no_device_ipc) { open_fails("cuda-ipc"); }
END_TEST

/* With a GPU: one ring exchange of 1 MiB + rank bytes per rank, checked on the host. */
static void ring_once(const char *name) {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  da_xport_t xp;
  da_status_t st = da_xport_open(&xp, name, comm, 60.0);
  ck_assert_msg(st == DA_SUCCESS, "%s: %s", name, da_error_message());
  const da_devapi_t *d = xp.t->devapi;
  const int P = xp.nranks, next = (g_rank + 1) % P, prev = (g_rank + P - 1) % P;
  const size_t cap = (1u << 20) + 64;
  const size_t sb = (1u << 20) + (size_t)g_rank, rb = (1u << 20) + (size_t)prev;
  void *sbuf, *rbuf;
  da_dstream_t cs;
  ck_assert_int_eq(d->stream_create(&cs), DA_SUCCESS);
  xp.stream = cs;
  ck_assert_int_eq(d->alloc(&sbuf, cap), DA_SUCCESS);
  ck_assert_int_eq(d->alloc(&rbuf, cap), DA_SUCCESS);
  if (xp.t->register_mem) ck_assert_int_eq(xp.t->register_mem(&xp, rbuf, cap), DA_SUCCESS);
  unsigned char *h = malloc(cap);
  for (size_t i = 0; i < sb; i++) h[i] = (unsigned char)(i * 131 + (size_t)g_rank * 7 + 1);
  ck_assert_int_eq(d->copy_from_host(sbuf, h, sb, cs), DA_SUCCESS);
  ck_assert_int_eq(d->memset_async(rbuf, 0xFF, cap, cs), DA_SUCCESS);
  da_xreq_t *req = NULL;
  ck_assert_int_eq(xp.t->exchange_start(&xp, sbuf, sb, next, rbuf, rb, prev, DA_TAG_FWD_KV, 0, &req), DA_SUCCESS);
  st = xp.t->wait(&xp, req);
  ck_assert_msg(st == DA_SUCCESS, "%s: %s", name, da_error_message());
  ck_assert_int_eq(d->copy_to_host(h, rbuf, rb, cs), DA_SUCCESS);
  size_t bad = 0;
  for (size_t i = 0; i < rb; i++) bad += h[i] != (unsigned char)(i * 131 + (size_t)prev * 7 + 1);
  ck_assert_int_eq(bad, 0);
  ck_assert_int_eq(da_xport_barrier(&xp), DA_SUCCESS);
  da_xport_close(&xp);
  d->free(sbuf);
  d->free(rbuf);
  d->stream_destroy(cs);
  free(h);
  MPI_Comm_free(&comm);
}

START_TEST(gpu_ring_ipc) { ring_once("cuda-ipc"); }
END_TEST

START_TEST(gpu_ring_nccl) { ring_once("nccl"); }
END_TEST

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  int ndev = 0;
  if (da_devapi_cuda.probe(&ndev) != DA_SUCCESS) ndev = 0;
  /* The job's view: the fewest devices any rank sees. */
  MPI_Allreduce(&ndev, &g_ndev, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (g_rank == 0) printf("test_nccl: %d ranks, %d CUDA device(s)\n", g_size, g_ndev);
  Suite *s = suite_create("nccl");
  TCase *tc = tcase_create("device transports");
  tcase_set_timeout(tc, 0);
  tcase_add_test(tc, bootstrap);
  if (g_ndev == 0) {
    tcase_add_test(tc, no_device_nccl);
    tcase_add_test(tc, no_device_ipc);
  } else {
    tcase_add_test(tc, gpu_ring_ipc);
    if (g_ndev >= g_size) tcase_add_test(tc, gpu_ring_nccl); /* NCCL refuses two ranks on one GPU */
  }
  suite_add_tcase(s, tc);
  return tu_mpi_finish(s, g_rank, NULL, NULL);
}
