/* common.h: small helpers the MPI subcommands of `distattn` (run, decode, decode --offload) share:
 * collective exit codes, failure reports, thread counts, the rank -> host/core map, medians.
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

#ifdef MPI_VERSION
#include "distattn.h"
/* Collective over MPI_COMM_WORLD: the largest of every rank's value (exit codes, flags). */
int da_mpi_max_int(int v);

/* Collective: a library failure of subcommand cmd. Every rank got a status (agreed by the plan);
 * the ranks that failed themselves say why and rank 0 always says something. Returns the exit
 * code all ranks agree on: 2 for usage-like failures (invalid argument, mismatch, unsupported,
 * out of memory: a problem over the budget is refused before it runs), else 1. */
int da_report_failure(const char *cmd, int rank, const char *what, da_status_t st, da_context_t *ctx);

/* Collective: kernel threads per rank, the cores this rank may use shared with the ranks of its
 * node that may use the same cores (mpirun --bind-to none gives every rank the whole machine). */
int da_mpi_default_threads(void);

/* Collective: rank 0 prints one "#  rank ..." line per rank (host, pid, threads, cores) and gets
 * the distinct host names, comma-separated, in hosts (for the JSON record; "" elsewhere). */
void da_rank_map(int threads, char *hosts, size_t hn);
#endif

#endif /* DA_LAUNCHER_COMMON_H */
