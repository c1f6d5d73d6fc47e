/* common.c: helpers shared by the MPI subcommands of `distattn` (see common.h). */
#define _GNU_SOURCE
#include <math.h>
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "common.h"
#include "core.h"
#include "report.h"

static int cmp_dbl(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double da_median(double *t, int64_t n) {
  if (n <= 0) return NAN;
  qsort(t, (size_t)n, sizeof *t, cmp_dbl);
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

double da_p99(double *t, int64_t n) {
  if (n <= 0) return NAN;
  qsort(t, (size_t)n, sizeof *t, cmp_dbl);
  int64_t k = (int64_t)ceil(0.99 * (double)n) - 1;
  return t[k < 0 ? 0 : k];
}

int da_parse_size_list(const char *s, int64_t *out, int64_t n) {
  int64_t i = 0;
  const char *p = s;
  while (*p && i < n) {
    char buf[64];
    size_t len = strcspn(p, ",");
    if (len == 0 || len >= sizeof buf) return -1;
    memcpy(buf, p, len);
    buf[len] = '\0';
    if (da_parse_size(buf, &out[i])) return -1;
    i++;
    p += len;
    if (*p == ',') p++;
  }
  return i == n && !*p ? 0 : -1;
}

void da_cpu_list(char *buf, size_t n) {
  cpu_set_t set;
  CPU_ZERO(&set);
  buf[0] = '\0';
  if (sched_getaffinity(0, sizeof set, &set)) return;
  size_t off = 0;
  for (int c = 0; c < CPU_SETSIZE && off + 16 < n; c++) {
    if (!CPU_ISSET(c, &set)) continue;
    int e = c;
    while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, &set)) e++;
    off += (size_t)snprintf(buf + off, n - off, "%s%d", off ? "," : "", c);
    if (e > c) off += (size_t)snprintf(buf + off, n - off, "-%d", e);
    c = e;
  }
}

int da_mpi_max_int(int v) {
  int r = v;
  MPI_Allreduce(&v, &r, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return r;
}

int da_report_failure(const char *cmd, int rank, const char *what, da_status_t st, da_context_t *ctx) {
  if (rank == 0 || st != DA_ERR_REMOTE)
    fprintf(stderr, "distattn %s: rank %d: %s: %s: %s\n", cmd, rank, what, da_status_string(st), da_last_error(ctx));
  /* Out of memory counts with the usage errors: the plan refuses a problem over its budget before
   * anything runs, like any other problem this job cannot run. */
  int rc = (st == DA_ERR_INVALID_ARGUMENT || st == DA_ERR_MISMATCH || st == DA_ERR_UNSUPPORTED ||
            st == DA_ERR_OUT_OF_MEMORY) ? 2 : 1;
  return da_mpi_max_int(rc);
}

int da_mpi_default_threads(void) {
  MPI_Comm node;
  int local = 1;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
  }
  int cores = da_default_nthreads(), online = (int)sysconf(_SC_NPROCESSORS_ONLN);
  int t = cores >= online && local > 1 ? cores / local : cores;
  return t > 0 ? t : 1;
}

typedef struct rankinfo {
  char host[64];
  char cores[88];
  int pid, threads;
} rankinfo_t;

void da_rank_map(int threads, char *hosts, size_t hn) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  rankinfo_t me, *all = rank == 0 ? calloc((size_t)size, sizeof *all) : NULL;
  memset(&me, 0, sizeof me);
  snprintf(me.host, sizeof me.host, "%s", da_report_hostname());
  da_cpu_list(me.cores, sizeof me.cores);
  me.pid = (int)getpid();
  me.threads = threads;
  MPI_Gather(&me, sizeof me, MPI_BYTE, all, sizeof me, MPI_BYTE, 0, MPI_COMM_WORLD);
  hosts[0] = '\0';
  if (rank != 0 || !all) return;
  size_t off = 0;
  for (int r = 0; r < size; r++) {
    printf("#  rank %3d  host %-16s  pid %7d  threads %2d  cores %s\n", r, all[r].host, all[r].pid, all[r].threads,
           all[r].cores);
    int seen = 0;
    for (int q = 0; q < r; q++) seen |= !strcmp(all[q].host, all[r].host);
    if (!seen && off + strlen(all[r].host) + 2 < hn)
      off += (size_t)snprintf(hosts + off, hn - off, "%s%s", off ? "," : "", all[r].host);
  }
  free(all);
}
