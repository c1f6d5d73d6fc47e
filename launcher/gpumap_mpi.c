/* gpumap_mpi.c: the rank -> GPU map of `--device cuda` over MPI_COMM_WORLD (the decision itself is
 * gpumap.c's pure function). Every collective here is bounded by the job's deadline: the
 * node-local ranks come from MPI_Comm_split_type(SHARED) taken only on a duplicate whose bounded
 * creation (MPI_Comm_idup polled) has seen every rank, and the exchanges are nonblocking calls
 * polled against the deadline. A rank without a usable device (no CUDA in this build, no driver,
 * no GPU) makes every rank stop with exit 2, and exactly one rank says why. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "common.h"
#include "devapi.h"
#include "gpumap.h"
#include "report.h"
#include "transport.h"
#include "kvcache.h" /* da_comm_default_timeout: DISTATTN_TIMEOUT or 300 s */

#define VIS_MAX 120

typedef struct rec {
  int ndev, ok;
  char visible[VIS_MAX]; /* CUDA_VISIBLE_DEVICES, "" when unset */
} rec_t;

/* The devices this rank sees: DISTATTN_TEST_GPUS=N (a test hook: N pretend GPUs on the host
 * seam, so the map and the header are tested without a GPU), else the CUDA table's probe. */
static int probe(const da_devapi_t *api, int *ndev, char *err, size_t en) {
  const char *fake = getenv("DISTATTN_TEST_GPUS");
  if (fake && *fake) {
    char *end = NULL;
    long n = strtol(fake, &end, 10);
    if (*end || n < 0 || n > 1024) {
      snprintf(err, en, "DISTATTN_TEST_GPUS=%s: expected a count 0..1024", fake);
      return -1;
    }
    *ndev = (int)n;
    if (n == 0) snprintf(err, en, "CUDA: no device (DISTATTN_TEST_GPUS=0)");
    return n ? 0 : -1;
  }
  if (!api) {
    snprintf(err, en, "CUDA: this build has no CUDA runtime (configured without the CUDA toolkit, or "
             "-DDISTATTN_CUDA=OFF): rebuild with nvcc present, or run --device cpu");
    return -1;
  }
  if (api->probe(ndev) != DA_SUCCESS) {
    snprintf(err, en, "%s", da_error_message());
    return -1;
  }
  return 0;
}

/* Poll a nonblocking collective against the deadline; 0, or -1 with the reason. */
static int bounded(int rc, MPI_Request *r, double timeout, const char *what, char *err, size_t en) {
  int done = 0;
  if (rc == MPI_SUCCESS) rc = da_mpi_poll(r, timeout, &done);
  if (rc != MPI_SUCCESS) {
    snprintf(err, en, "GPU map: %s failed (MPI error %d)", what, rc);
    return -1;
  }
  if (!done) {
    snprintf(err, en, "GPU map: %s did not complete within %g s (a peer is missing or stuck)", what, timeout);
    return -1;
  }
  return 0;
}

int da_gpumap_world(const da_devapi_t *api, int ranks_per_gpu, const char *transport, double timeout,
                    const char *cmd, da_gpumap_t *me) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (!(timeout > 0)) timeout = da_comm_default_timeout();
  char err[512] = "";
  rec_t mine = {0};
  const char *vis = getenv("CUDA_VISIBLE_DEVICES");
  snprintf(mine.visible, sizeof mine.visible, "%s", vis ? vis : "");
  mine.ok = probe(api, &mine.ndev, err, sizeof err) == 0;
  const int nccl = transport && !strcmp(transport, "nccl");

  /* Everyone learns at once whether any rank lacks a device: the lowest such rank speaks. */
  MPI_Comm dup = MPI_COMM_NULL, node = MPI_COMM_NULL;
  if (da_mpi_comm_dup(MPI_COMM_WORLD, timeout, "GPU map", &dup) != DA_SUCCESS) {
    da_mpi_rollcall(MPI_COMM_WORLD, DA_ROLLCALL_GRACE_S < timeout ? DA_ROLLCALL_GRACE_S : timeout, "the GPU map");
    fprintf(stderr, "distattn %s: rank %d: --device cuda: %s\n", cmd, rank, da_error_message());
    return 1;
  }
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  /* Static: a collective that timed out may still complete into its buffer later (MPI cannot
   * cancel it), and these outlive the call; `all` is leaked then for the same reason. */
  static int first_bad, agreed;
  first_bad = mine.ok ? size : rank;
  int rc = 0;
  MPI_Request r;
  if (bounded(MPI_Iallreduce(MPI_IN_PLACE, &first_bad, 1, MPI_INT, MPI_MIN, dup, &r), &r, timeout,
              "the device agreement", err, sizeof err))
    rc = 1;
  else if (first_bad < size) {
    if (first_bad == rank)
      fprintf(stderr, "distattn %s: --device cuda: rank %d (host %s): %s%s; every rank stops (exit 2)\n", cmd, rank,
              da_report_hostname(), err, nccl ? " (the nccl transport needs a CUDA device on every rank too)" : "");
    rc = 2;
  }
  /* The node's ranks (every rank is known to be here: the bounded duplicate saw them all). */
  rec_t *all = NULL;
  const char **visible = NULL;
  int nlocal = 1, local = 0;
  if (!rc && MPI_Comm_split_type(dup, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    rc = 1, snprintf(err, sizeof err, "GPU map: MPI_Comm_split_type(SHARED) failed");
  if (!rc) {
    MPI_Comm_rank(node, &local);
    MPI_Comm_size(node, &nlocal);
    all = calloc((size_t)nlocal, sizeof *all);
    visible = calloc((size_t)nlocal, sizeof *visible);
    if (!all || !visible) rc = 1, snprintf(err, sizeof err, "GPU map: out of memory");
  }
  if (!rc && bounded(MPI_Iallgather(&mine, sizeof mine, MPI_BYTE, all, sizeof mine, MPI_BYTE, node, &r), &r, timeout,
                     "the node's device exchange", err, sizeof err))
    rc = 1;
  int local_bad = 0;
  if (!rc) {
    for (int i = 0; i < nlocal; i++) visible[i] = all[i].visible;
    int grank, gsize;
    da_gpumap_group(visible, nlocal, local, &grank, &gsize);
    if (da_gpumap_decide(grank, gsize, mine.ndev, ranks_per_gpu, me, err, sizeof err) ||
        da_gpumap_check_transport(me, transport, err, sizeof err))
      local_bad = 1;
  }
  /* The decision may fail on some ranks only (too few GPUs on one node): agree, lowest speaks. */
  if (!rc) {
    first_bad = local_bad ? rank : size;
    if (bounded(MPI_Iallreduce(MPI_IN_PLACE, &first_bad, 1, MPI_INT, MPI_MIN, dup, &r), &r, timeout,
                "the map agreement", err, sizeof err))
      rc = 1;
    else if (first_bad < size) {
      if (first_bad == rank)
        fprintf(stderr, "distattn %s: --device cuda: rank %d (host %s): %s; every rank stops (exit 2)\n", cmd, rank,
                da_report_hostname(), err);
      rc = 2;
    }
  }
  if (!rc && api && api->set_device && !getenv("DISTATTN_TEST_GPUS") && api->set_device(me->device) != DA_SUCCESS) {
    snprintf(err, sizeof err, "%s", da_error_message());
    rc = 2;
  }
  if (rc == 1 || (rc == 2 && local_bad == 0 && first_bad == size)) /* a failure only this rank knows of */
    fprintf(stderr, "distattn %s: rank %d: --device cuda: %s\n", cmd, rank, err);
  if (rc != 1) free(all);
  free(visible);
  if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
  /* The exit code every rank agrees on, bounded too: a rank that vanished makes it 1. */
  agreed = rc;
  static int mine_rc;
  mine_rc = rc;
  if (bounded(MPI_Iallreduce(&mine_rc, &agreed, 1, MPI_INT, MPI_MAX, dup, &r), &r, timeout, "the exit agreement", err,
              sizeof err)) {
    fprintf(stderr, "distattn %s: rank %d: --device cuda: %s\n", cmd, rank, err);
    agreed = 1;
  }
  MPI_Comm_free(&dup);
  return agreed;
}

typedef struct line {
  da_gpumap_t m;
  char host[64], name[64], busid[32];
  int pid;
} line_t;

void da_gpumap_print(const da_gpumap_t *me, const da_devapi_t *api, char *json, size_t jn) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  line_t l;
  memset(&l, 0, sizeof l);
  l.m = *me;
  l.pid = (int)getpid();
  snprintf(l.host, sizeof l.host, "%s", da_report_hostname());
  if (getenv("DISTATTN_TEST_GPUS"))
    snprintf(l.name, sizeof l.name, "pretend GPU (DISTATTN_TEST_GPUS)"), snprintf(l.busid, sizeof l.busid, "-");
  else if (!api || !api->device_name || api->device_name(me->device, l.name, sizeof l.name, l.busid, sizeof l.busid))
    snprintf(l.name, sizeof l.name, "?"), snprintf(l.busid, sizeof l.busid, "?");
  line_t *all = rank == 0 ? calloc((size_t)size, sizeof *all) : NULL;
  MPI_Gather(&l, sizeof l, MPI_BYTE, all, sizeof l, MPI_BYTE, 0, MPI_COMM_WORLD);
  if (json && jn) json[0] = '\0';
  if (rank != 0 || !all) return;
  /* nccl-tests' map: "#  Rank  0 Group  0 Pid 1234 on host device  0 [0x1b] NVIDIA H100 ..." */
  printf("# GPU map: %s\n", me->note[0] ? me->note : "one rank per GPU");
  size_t off = 0;
  if (json && jn) off += (size_t)snprintf(json, jn, "[");
  for (int r = 0; r < size; r++) {
    const da_gpumap_t *m = &all[r].m;
    printf("#  Rank %2d Group  0 Pid %6d on %10s device %2d [%s] %s  (local %d/%d, %d on this GPU)\n", r, all[r].pid,
           all[r].host, m->device, all[r].busid, all[r].name, m->local_rank, m->local_size, m->per_gpu);
    if (json && off + 160 < jn)
      off += (size_t)snprintf(json + off, jn - off, "%s{\"rank\":%d,\"host\":\"%s\",\"device\":%d,\"busid\":\"%s\","
                              "\"name\":\"%s\",\"per_gpu\":%d}", r ? "," : "", r, all[r].host, m->device,
                              all[r].busid, all[r].name, m->per_gpu);
  }
  if (json && off + 2 < jn) snprintf(json + off, jn - off, "]");
  free(all);
}
