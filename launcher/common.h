/* common.h: small helpers the MPI subcommands of `distattn` (run, decode, decode --offload) share:
 * the phase skeleton of a command, collective exit codes, failure reports, thread counts, the
 * rank -> host/core map, medians.
 * MPI is needed by the collective ones only (declared when <mpi.h> came first). */
#ifndef DA_LAUNCHER_COMMON_H
#define DA_LAUNCHER_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Median and nearest-rank p99 of n values (NAN when n <= 0); both sort t in place. */
double da_median(double *t, int64_t n);
double da_p99(double *t, int64_t n);

/* "a,b,c" (sizes with K/M/G suffixes) into exactly n values. 0 on success, -1 if malformed or
 * not n items. */
int da_parse_size_list(const char *s, int64_t *out, int64_t n);

/* The cores this process may run on, as "0-3,8" into buf. */
void da_cpu_list(char *buf, size_t n);

/* ---- options the MPI commands word the same way (one entry of a da_opt_t table each) ---- */
#include "args.h"
extern const char *const da_dtype_names[];  /* "fp32", "bf16", "fp16": --dtype, as da_dtype_t */
extern const char *const da_device_names[]; /* "cpu", "cuda": --device, as da_device_t */
da_opt_t da_opt_heads(int64_t *dest);       /* --heads H (required) */
da_opt_t da_opt_kv_heads(int64_t *dest);    /* --kv-heads G (0 = H) */
da_opt_t da_opt_dim(int64_t *dest);         /* --dim D (required) */
da_opt_t da_opt_dtype(int *dest);           /* --dtype of q, k, v, out */
da_opt_t da_opt_seed(int64_t *dest);        /* --seed of the counter-based inputs */
da_opt_t da_opt_device(int *dest);          /* --device: the kernel backend */
da_opt_t da_opt_threads(int64_t *dest);     /* --threads per rank (0 = its share of its cores) */
da_opt_t da_opt_ranks_per_gpu(int64_t *dest); /* --ranks-per-gpu N with --device cuda (0 = one per GPU) */
da_opt_t da_opt_json(const char **dest);    /* --json FILE */
da_opt_t da_opt_timeout(double *dest);      /* --timeout: seconds a rank waits for a peer */
da_opt_t da_opt_transport(const char **dest); /* --transport: the data transport by name */
/* The transport a command runs on: --transport, else DISTATTN_TRANSPORT, else "mpi". */
const char *da_transport_choice(const char *opt);
/* cmd becomes command name over a copy of opts (n entries, the {0} terminator included) in room,
 * which lives as long as cmd: da_args_parse marks there which options were given. */
void da_cmd_options(da_cmdspec_t *cmd, const char *name, const char *summary, da_opt_t *room, const da_opt_t *opts,
                    size_t n);

#ifdef MPI_VERSION
#include "distattn.h"
struct da_devapi;
/* The CUDA device table when this build has the CUDA runtime, else NULL (the GPU map then says
 * so in words). */
const struct da_devapi *da_devapi_cuda_or_null(void);
/* The backend a --device choice runs: itself, except under the test hook DISTATTN_TEST_GPUS=N
 * (pretend GPUs for the map, gpumap.h), where --device cuda runs the CPU kernels on the host seam
 * and the header says so. */
da_device_t da_device_effective(int device);
/* Collective over MPI_COMM_WORLD: the largest of every rank's value (exit codes, flags). */
int da_mpi_max_int(int v);

/* Collective: a library failure of subcommand cmd. Every rank got a status (agreed by the plan);
 * the ranks that failed themselves say why and rank 0 always says something. Returns the exit
 * code all ranks agree on: 2 for usage-like failures (invalid argument, mismatch, unsupported,
 * out of memory: a problem over the budget is refused before it runs), else 1. */
int da_report_failure(const char *cmd, int rank, const char *what, da_status_t st, da_context_t *ctx);

/* Collective, after a local step that may fail on some ranks only (an allocation, a prefill):
 * 0 when every rank succeeded; else every rank says so (a failing rank its own message, the
 * others which rank failed and how) and all get one exit code (2 for usage-like failures and out
 * of memory, as da_report_failure, else 1). No rank goes silent or on alone. */
int da_mpi_agree_step(const char *cmd, int rank, const char *what, da_status_t st, da_context_t *ctx);

/* Collective: kernel threads per rank, the cores this rank may use shared with the ranks of its
 * node that may use the same cores (mpirun --bind-to none gives every rank the whole machine). */
int da_mpi_default_threads(void);
/* Collective over MPI_COMM_WORLD: 1 on every rank when all ranks share one node (shared memory),
 * else 0 (the choice between cuda-ipc, which stops at the node, and nccl or cuda-mpi). */
int da_mpi_one_node(void);

/* Collective: rank 0 prints one "#  rank ..." line per rank (host, pid, threads, cores) and gets
 * the distinct host names, comma-separated, in hosts (for the JSON record; "" elsewhere). */
void da_rank_map(int threads, char *hosts, size_t hn);

/* ---- the phases of an MPI subcommand ----
 * run and decode (and the next MPI command) keep their state in one context struct and split their
 * work into named phases that da_mpi_cmd_main runs in order:
 *   MPI up -> parse and agree (da_mpi_parse_agree) -> the command's phases (inputs, plan, execute,
 *   verify, report; each returns 0 to go on, else the exit code to stop with) -> its release, the
 *   communicator and context -> MPI down.
 * A new command writes only its own parse, phases and release. */
#include "report.h"

/* What every MPI command holds: its rank, the job's size, the library context and the
 * communicator over MPI_COMM_WORLD (da_mpi_job_open; da_mpi_cmd_main frees both). */
typedef struct da_mpi_job {
  int rank, size;
  da_context_t *ctx;
  da_comm_t *comm;
} da_mpi_job_t;

typedef int (*da_phase_fn)(void *c);

typedef struct da_mpi_cmd {
  const char *name; /* "run": the command in messages */
  /* Parse and check argv into the command's state c: DA_ARGS_OK, DA_ARGS_HELP or DA_ARGS_USAGE
   * (the message printed). It may run twice on one rank (da_mpi_parse_agree), so a second call
   * must release what the first allocated. */
  int (*parse)(void *c, int argc, char **argv);
  const da_phase_fn *phases; /* NULL-terminated, run in order while each returns 0 */
  void (*release)(void *c);  /* always called after parse: frees what parse and the phases made */
  /* The option table in c, as parse filled it: the ranks agree on it (launcher/agree.h). */
  const da_cmdspec_t *(*spec)(void *c);
  size_t size; /* sizeof the state c (the agreement test restores it between tries) */
} da_mpi_cmd_t;

/* The whole command: MPI up, job->rank/size set, parse and agree, the phases, release, job's
 * communicator and context freed, MPI down. Returns the exit code (help: 0, usage: 2). */
int da_mpi_cmd_main(const da_mpi_cmd_t *cmd, da_mpi_job_t *job, void *c, int argc, char **argv);

/* Collective, the first of the command: every rank parses its own argv (mpirun gives all the same
 * one, an MPMD launch may not) with the output of every rank but 0 silenced, then the ranks agree
 * (launcher/agree.h): on the command first, then the verdicts, --help, and every option's
 * effective value. A usage error prints exactly one message: rank 0's, or when rank 0 was fine,
 * the lowest bad rank parses again aloud. A disagreement (another command, --help on some ranks,
 * an option with another value) is one line on every rank naming it and the ranks' values.
 * Returns DA_ARGS_OK, DA_ARGS_HELP (every rank) or DA_ARGS_USAGE (every rank: exit 2). */
int da_mpi_parse_agree(const da_mpi_cmd_t *cmd, void *c, int argc, char **argv);

/* Collective: the library context (device, threads) and the communicator over MPI_COMM_WORLD
 * into job. 0, or the exit code every rank agrees on once the failing ranks said why. */
int da_mpi_job_open(da_mpi_job_t *job, const char *cmd, da_device_t device, int threads);

/* Rank 0: the header every MPI command prints (da_report_header), then the line naming the ranks,
 * the MPI library and the backend, ended by tail ("" or "  transport: ..."). */
void da_report_mpi_header(const da_cmdspec_t *cmd, int threads, int ranks, const char *backend, const char *tail);

/* The job's fields that close an MPI command's record: hosts (every rank's, as gathered), git,
 * SLURM_JOB_ID when set and, with node_lists, SLURM_JOB_NODELIST and SLURM_STEP_NODELIST when set,
 * then cpu. Not da_json_common: an MPI record's peak_rss_bytes is the max over ranks, written by
 * the command beside its other figures, where da_json_common writes this process's. */
void da_json_job(da_json_t *j, const char *hosts, int node_lists);

/* The fields of the records of run and decode that say the same thing in both, in one place:
 * the problem (da_json_problem, report.h), the check (verify_rows, max_abs_err and max_rel_err:
 * null when nothing was verified, wrong) and the non-finite counts (nonfinite_rows, _inputs,
 * _outputs, _wrong). */
void da_json_check(da_json_t *j, int64_t rows, double max_abs, double max_rel, int64_t wrong, int verified);
void da_json_nonfinite(da_json_t *j, int64_t rows, int64_t inputs, int64_t outputs, int64_t wrong);
/* Append the record to path and free it: da_json_append's 0 or -1. */
int da_json_finish(da_json_t *j, const char *path);

/* Collective end of a verified command: rank 0 prints the footer ("# wrong: N", PASS or FAIL);
 * the exit code is rc, else 1 when anything was wrong, the largest over ranks. */
int da_mpi_verdict(int rank, int64_t wrong, int rc);
#endif

#endif /* DA_LAUNCHER_COMMON_H */
