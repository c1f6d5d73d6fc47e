/* agree.h: before anything else, the ranks of an MPI command agree that they run the same command
 * with the same effective options (launcher/agree.c). Options marked per_rank in the table (a
 * rank's own threads, the offload's role and memory budget) may differ; everything else is the
 * job's configuration. Collective over MPI_COMM_WORLD, one fixed-size allgather (the same on
 * every rank whatever its command, so mismatched commands meet in it), then, only on a mismatch of
 * options, a second one of the differing option's values. Bounded: the launcher's collectives
 * poll against the deadline (launcher/fault.c). */
#ifndef DA_LAUNCHER_AGREE_H
#define DA_LAUNCHER_AGREE_H

#include <stddef.h>
#include <stdint.h>
#include "args.h"

enum {
  DA_AGREE_OK,       /* every rank parsed the same configuration */
  DA_AGREE_HELP,     /* every rank was given --help */
  DA_AGREE_USAGE,    /* a rank has a usage error: *bad is the lowest such rank (it explains) */
  DA_AGREE_MISMATCH, /* commands, --help or an option differ: msg says which, with every rank's value */
};

/* The hash of option o's effective value (binary, with its name): equal values hash equal. */
uint64_t da_agree_hash_opt(const da_opt_t *o);

/* Collective: compare every rank's command (spec->name), parse verdict and option hashes, in this
 * order: the command, usage errors, --help, then the options in table order (the first that
 * differs is named). Same return and msg on every rank. */
int da_agree_config(const da_cmdspec_t *spec, int verdict, char *msg, size_t msglen, int *bad);

#ifdef MPI_VERSION
#include "common.h"
/* Test aid (DISTATTN_TEST_AGREE_SWEEP=1, tests/agree.cmake): for every option of cmd's table and
 * for --help, rank 1 parses the common argv plus a different valid value of that option (the first
 * of a few candidates that parses on its own; a string option uses its table's sample), the other
 * ranks the common argv; the real agreement must refuse it naming the option (per-rank options:
 * accept it). In process, so one launch covers a whole table. c is the command's state as made
 * before any parse (csize bytes, restored before every try). 0 when every option behaved. */
int da_agree_sweep(const da_mpi_cmd_t *cmd, void *c, size_t csize, int argc, char **argv);
#endif

#endif /* DA_LAUNCHER_AGREE_H */
