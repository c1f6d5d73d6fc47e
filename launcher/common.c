/* common.c: helpers shared by the MPI subcommands of `distattn` (see common.h). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "agree.h"
#include "common.h"
#include "core.h"
#include "fault.h"
#include "devapi.h"
#include "report.h"
#include "kvcache.h"   /* da_comm_default_timeout */
#include "transport.h" /* da_xport_deadline: the --timeout of the plan created last */

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

const char *const da_dtype_names[] = {"fp32", "bf16", "fp16", NULL};
const char *const da_device_names[] = {"cpu", "cuda", NULL};

da_opt_t da_opt_heads(int64_t *dest) {
  return (da_opt_t){.name = "heads", .type = DA_OPT_INT, .dest = dest, .help = "query heads H (required)", .min = 1,
                    .max = 65536};
}

da_opt_t da_opt_kv_heads(int64_t *dest) {
  return (da_opt_t){.name = "kv-heads", .type = DA_OPT_INT, .dest = dest, .help = "KV heads G (H % G == 0; 0 = H)",
                    .min = 0, .max = 65536};
}

da_opt_t da_opt_dim(int64_t *dest) {
  return (da_opt_t){.name = "dim", .type = DA_OPT_INT, .dest = dest, .help = "head dim D (required)", .min = 1,
                    .max = 4096};
}

da_opt_t da_opt_dtype(int *dest) {
  return (da_opt_t){.name = "dtype", .type = DA_OPT_ENUM, .dest = dest, .help = "storage dtype of q, k, v, out",
                    .choices = da_dtype_names};
}

da_opt_t da_opt_seed(int64_t *dest) {
  return (da_opt_t){.name = "seed", .type = DA_OPT_INT, .dest = dest, .help = "seed of the counter-based inputs",
                    .min = 0, .max = INT64_MAX};
}

da_opt_t da_opt_device(int *dest) {
  return (da_opt_t){.name = "device", .type = DA_OPT_ENUM, .dest = dest, .help = "kernel backend",
                    .choices = da_device_names};
}

da_opt_t da_opt_threads(int64_t *dest) {
  return (da_opt_t){.name = "threads", .type = DA_OPT_INT, .dest = dest,
                    .help = "kernel threads per rank (0 = this rank's share of its cores)", .min = 0, .max = DA_MAX_NTHREADS,
                    .per_rank = 1 /* a rank's own resources: ranks on unlike nodes may differ */};
}

da_opt_t da_opt_ranks_per_gpu(int64_t *dest) {
  return (da_opt_t){.name = "ranks-per-gpu", .type = DA_OPT_INT, .dest = dest, .metavar = "N",
                    .help = "--device cuda: N consecutive ranks of a node share each GPU (0 = one rank per GPU; "
                            "ranks share anyway when they outnumber the GPUs, and the map says so)",
                    .min = 0, .max = 64};
}

da_opt_t da_opt_json(const char **dest) {
  return (da_opt_t){.name = "json", .type = DA_OPT_STRING, .dest = dest, .metavar = "FILE",
                    .help = "append one JSON object (JSON Lines) to FILE", .sample = "agree-sample.jsonl"};
}

da_opt_t da_opt_transport(const char **dest) {
  /* The names are checked where the plan is made (comm/transport.c lists what this build has). */
  return (da_opt_t){.name = "transport", .type = DA_OPT_STRING, .dest = dest, .metavar = "NAME",
                    .help = "data transport: mpi (with --device cuda: staged through pinned host memory), self (one "
                            "rank), nccl, cuda-ipc; host-ipc, host-mpi: the test device (default DISTATTN_TRANSPORT, "
                            "else mpi, or for --device cuda nccl / cuda-ipc by the GPU map)",
                    .sample = "self"};
}

const char *da_transport_choice(const char *opt) {
  const char *env = getenv("DISTATTN_TRANSPORT");
  return opt ? opt : env && *env ? env : "mpi";
}

da_opt_t da_opt_timeout(double *dest) {
  return (da_opt_t){.name = "timeout", .type = DA_OPT_DOUBLE, .dest = dest,
                    .help = "seconds a rank waits for a peer before failing (0 = DISTATTN_TIMEOUT or 300)", .dmin = 0,
                    .dmax = 1e6, .dfloor = DA_TIMEOUT_MIN_S};
}

void da_cmd_options(da_cmdspec_t *cmd, const char *name, const char *summary, da_opt_t *room, const da_opt_t *opts,
                    size_t n) {
  memcpy(room, opts, n * sizeof *opts);
  *cmd = (da_cmdspec_t){.name = name, .summary = summary, .opts = room};
}

const struct da_devapi *da_devapi_cuda_or_null(void) {
  const da_devapi_t *api = da_devapi_find("cuda"); /* NULL without the CUDA runtime: not an error here */
  if (!api) da_error_clear();
  return api;
}

da_device_t da_device_effective(int device) {
  const char *fake = getenv("DISTATTN_TEST_GPUS");
  return device == DA_DEVICE_CUDA && fake && *fake ? DA_DEVICE_CPU : (da_device_t)device;
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

int da_mpi_agree_step(const char *cmd, int rank, const char *what, da_status_t st, da_context_t *ctx) {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int first = st != DA_SUCCESS ? rank : size;
  MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (first == size) return 0;
  int code = (int)st;
  MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD);
  if (st != DA_SUCCESS)
    fprintf(stderr, "distattn %s: rank %d: %s: %s: %s\n", cmd, rank, what, da_status_string(st), da_last_error(ctx));
  else
    fprintf(stderr, "distattn %s: rank %d: %s: rank %d failed (%s): stopping\n", cmd, rank, what, first,
            da_status_string((da_status_t)code));
  const int rc = (st == DA_ERR_INVALID_ARGUMENT || st == DA_ERR_MISMATCH || st == DA_ERR_UNSUPPORTED ||
                  st == DA_ERR_OUT_OF_MEMORY) ? 2 : st != DA_SUCCESS ? 1 : 0;
  const int all = da_mpi_max_int(rc);
  return all ? all : 1;
}

int da_mpi_default_threads(void) {
  da_fault_point("place");
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

int da_mpi_one_node(void) {
  int size = 1, local = 1;
  MPI_Comm node;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
  }
  return da_mpi_max_int(local != size) == 0;
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

/* ---- the phases of an MPI subcommand ---- */

/* Output of a rank silenced while it parses: stdout and stderr onto /dev/null, and back. */
typedef struct quiet {
  int out, err;
} quiet_t;

static void quiet_begin(quiet_t *q, int on) {
  q->out = q->err = -1;
  if (!on) return;
  fflush(stdout), fflush(stderr);
  int devnull = open("/dev/null", O_WRONLY);
  q->out = dup(1), q->err = dup(2);
  if (devnull >= 0) dup2(devnull, 1), dup2(devnull, 2), close(devnull);
}

static void quiet_end(quiet_t *q) {
  if (q->out < 0 && q->err < 0) return;
  fflush(stdout), fflush(stderr);
  if (q->out >= 0) dup2(q->out, 1), close(q->out);
  if (q->err >= 0) dup2(q->err, 2), close(q->err);
}

int da_mpi_parse_agree(const da_mpi_cmd_t *cmd, void *c, int argc, char **argv) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  quiet_t q;
  quiet_begin(&q, rank != 0);
  const int prc = cmd->parse(c, argc, argv);
  quiet_end(&q);
  char msg[2048];
  int bad = -1;
  switch (da_agree_config(cmd->spec(c), prc, msg, sizeof msg, &bad)) {
    case DA_AGREE_OK: return DA_ARGS_OK;
    case DA_AGREE_HELP: return DA_ARGS_HELP;
    case DA_AGREE_USAGE:
      if (bad == rank && rank != 0) {
        fprintf(stderr, "distattn %s: rank %d was given other arguments than rank 0, and they are wrong:\n",
                cmd->name, rank);
        cmd->parse(c, argc, argv); /* again, to print its message */
      }
      return DA_ARGS_USAGE;
    default:
      fprintf(stderr, "distattn %s: rank %d: %s\n", cmd->name, rank, msg);
      return DA_ARGS_USAGE;
  }
}

int da_mpi_cmd_main(const da_mpi_cmd_t *cmd, da_mpi_job_t *job, void *c, int argc, char **argv) {
  int inited = 0, provided = MPI_THREAD_SINGLE;
  MPI_Initialized(&inited);
  /* MPI_THREAD_MULTIPLE for the watchdog thread of fault.c (the hard deadline of the job) */
  if (!inited) MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided);
  else MPI_Query_thread(&provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &job->rank);
  MPI_Comm_size(MPI_COMM_WORLD, &job->size);
  const int frc = da_mpi_max_int(da_fault_start(argc, argv, provided));
  da_fault_point("setup");
  const char *sweep = getenv("DISTATTN_TEST_AGREE_SWEEP"); /* test aid: agree.h */
  if (!frc && sweep && !strcmp(sweep, "1")) {
    const int src = da_agree_sweep(cmd, c, cmd->size, argc, argv);
    da_fault_stop();
    MPI_Finalize();
    return src;
  }
  const int prc = frc ? DA_ARGS_USAGE : da_mpi_parse_agree(cmd, c, argc, argv);
  int rc = prc == DA_ARGS_OK || prc == DA_ARGS_HELP ? 0 : 2;
  for (const da_phase_fn *phase = cmd->phases; prc == DA_ARGS_OK && !rc && *phase; phase++) rc = (*phase)(c);
  cmd->release(c);
  da_comm_free(job->comm);
  da_context_free(job->ctx);
  job->comm = NULL, job->ctx = NULL;
  da_fault_stop();
  MPI_Finalize();
  return rc;
}

int da_mpi_job_open(da_mpi_job_t *job, const char *cmd, da_device_t device, int threads) {
  da_config_t ccfg = DA_CONFIG_INITIALIZER;
  ccfg.device = device;
  ccfg.nthreads = threads;
  da_status_t st = da_context_create(&ccfg, &job->ctx);
  if (da_mpi_max_int(st != DA_SUCCESS)) /* a rank that succeeded reports the others' failure */
    return da_report_failure(cmd, job->rank, "context", st ? st : DA_ERR_REMOTE, job->ctx);
  if ((st = da_comm_create(job->ctx, MPI_COMM_WORLD, &job->comm)) != DA_SUCCESS)
    return da_report_failure(cmd, job->rank, "communicator", st, job->ctx);
  return 0;
}

void da_report_mpi_header(const da_cmdspec_t *cmd, int threads, int ranks, const char *backend, const char *tail) {
  da_report_header(stdout, cmd, threads);
  char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
  int len = 0;
  MPI_Get_library_version(lib, &len);
  lib[strcspn(lib, ",\n")] = '\0'; /* first clause: "Open MPI v4.1.4" */
  da_report_line(stdout, "ranks: %d  mpi: %s (MPI %d.%d)  backend: %s%s", ranks, lib, MPI_VERSION, MPI_SUBVERSION,
                 backend, tail);
}

void da_json_job(da_json_t *j, const char *hosts, int node_lists) {
  da_json_str(j, "hosts", hosts);
  da_json_str(j, "git", da_git_version());
  const char *job = getenv("SLURM_JOB_ID");
  if (job && *job) da_json_str(j, "SLURM_JOB_ID", job);
  const char *nodes = node_lists ? getenv("SLURM_JOB_NODELIST") : NULL;
  const char *step_nodes = node_lists ? getenv("SLURM_STEP_NODELIST") : NULL;
  if (nodes && *nodes) da_json_str(j, "SLURM_JOB_NODELIST", nodes);
  if (step_nodes && *step_nodes) da_json_str(j, "SLURM_STEP_NODELIST", step_nodes);
  da_json_str(j, "cpu", da_report_cpu_model());
}

void da_json_check(da_json_t *j, int64_t rows, double max_abs, double max_rel, int64_t wrong, int verified) {
  da_json_int(j, "verify_rows", rows);
  da_json_dbl(j, "max_abs_err", verified ? max_abs : NAN);
  da_json_dbl(j, "max_rel_err", verified ? max_rel : NAN);
  da_json_int(j, "wrong", wrong);
}

void da_json_nonfinite(da_json_t *j, int64_t rows, int64_t inputs, int64_t outputs, int64_t wrong) {
  da_json_int(j, "nonfinite_rows", rows);
  da_json_int(j, "nonfinite_inputs", inputs);
  da_json_int(j, "nonfinite_outputs", outputs);
  da_json_int(j, "nonfinite_wrong", wrong);
}

int da_json_finish(da_json_t *j, const char *path) {
  /* The peers wait in the next collective while this rank appends: a lock held elsewhere must be
   * given up on well within the deadline, so the report names the lock, not a missing rank. */
  double deadline = da_xport_deadline();
  if (!(deadline > 0)) deadline = da_comm_default_timeout();
  da_json_set_lock_wait(fmin(10.0, deadline / 4));
  int rc = da_json_append(j, path);
  da_json_free(j);
  return rc;
}

int da_mpi_verdict(int rank, int64_t wrong, int rc) {
  if (rank == 0) {
    if (da_report_footer(stdout, wrong, rc == 0)) rc = rc ? rc : 1;
    fflush(stdout);
  }
  if (wrong > 0 && !rc) rc = 1;
  return da_mpi_max_int(rc);
}
