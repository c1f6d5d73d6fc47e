/* args.h: the table-driven option parser every `distattn` subcommand uses (`--name value`,
 * `--name=value`, `-h/--help`), and the --mask spec parser. It only reads argv and fills the
 * caller's variables; it never exits: the subcommand turns its return code into the exit code. */
#ifndef DA_ARGS_H
#define DA_ARGS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "mask.h"
#include "env.h" /* DA_MAX_NTHREADS, DA_TIMEOUT_MIN_S: the limits options share with the env table */

#ifdef __cplusplus
extern "C" {
#endif

typedef enum da_opt_type {
  DA_OPT_INT,    /* int64_t *dest; decimal integer in [min, max] */
  DA_OPT_SIZE,   /* int64_t *dest; integer with optional K/M/G suffix (K = 1024), in [min, max] */
  DA_OPT_DOUBLE, /* double *dest; finite number in [dmin, dmax] */
  DA_OPT_STRING, /* const char **dest; the argv string itself (not copied) */
  DA_OPT_FLAG,   /* int *dest; set to 1, takes no value */
  DA_OPT_ENUM,   /* int *dest; index of the value in choices[] */
  DA_OPT_SET,    /* unsigned *dest; comma list of choices[] (or "all") as bit i per choice i */
  DA_OPT_MASK,   /* da_mask_spec_t *dest; see da_mask_parse */
} da_opt_type_t;

/* One option. Tables are arrays ended by an entry with name == NULL. The default shown by
 * --help is the destination's value when parsing starts, so the table needs no second copy. */
typedef struct da_opt {
  const char *name;    /* long name without "--": "seq" */
  da_opt_type_t type;
  void *dest;
  const char *metavar; /* "N", "FILE"; NULL: derived from the type / choices */
  const char *help;
  int64_t min, max;    /* INT / SIZE range, inclusive (min == max == 0: any value >= 0) */
  double dmin, dmax;   /* DOUBLE range, inclusive (dmin == dmax == 0: any finite value) */
  double dfloor;       /* DOUBLE: > 0 refuses values in (0, dfloor): 0 keeps its meaning (a default),
                          anything else must be at least dfloor (--timeout: DA_TIMEOUT_MIN_S) */
  const char *const *choices; /* ENUM / SET: NULL-terminated list of names */
  const char *alias;   /* another accepted long name, or NULL */
  /* MPI commands (launcher/agree.c): every rank of a job must be given the same value, unless
   * per_rank (a rank's own threads, the offload's role). sample: a valid value of a STRING option,
   * for the test that gives one rank another value of every option (tests/agree.cmake). */
  int per_rank;
  const char *sample;
  int given;           /* set by the parser: how many times the option appeared */
} da_opt_t;

/* A parsed --mask. `mask.cu_seqlens` points into `cu` (owned, free with da_mask_spec_free). */
typedef struct da_mask_spec {
  da_mask_t mask;
  int64_t *cu;
} da_mask_spec_t;

/* A subcommand's description for usage and messages. */
typedef struct da_cmdspec {
  const char *name;    /* "kernel" (printed as "distattn kernel") */
  const char *summary; /* one line under the usage line */
  da_opt_t *opts;
} da_cmdspec_t;

enum { DA_ARGS_OK = 0, DA_ARGS_HELP = 1, DA_ARGS_USAGE = 2 };

/* Parse argv[1..argc-1] (argv[0] is the subcommand name). Returns DA_ARGS_OK, DA_ARGS_HELP
 * (usage printed to stdout: exit 0) or DA_ARGS_USAGE (a message naming the option and the usage
 * printed to stderr: exit 2). Unknown flags, positional words, missing values, malformed or
 * out-of-range numbers are all usage errors. A repeated option keeps its last value. */
int da_args_parse(da_cmdspec_t *cmd, int argc, char **argv);

/* Usage: one line per option with its metavar, help and default. */
void da_args_usage(const da_cmdspec_t *cmd, FILE *f);

/* Report a usage error found after parsing (e.g. --heads 6 --kv-heads 4): the message and the
 * usage to stderr. Returns DA_ARGS_USAGE so callers can `return da_args_error(...)`. */
int da_args_error(const da_cmdspec_t *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The option named `name` in a table, or NULL. */
da_opt_t *da_args_find(da_opt_t *opts, const char *name);

/* The option's current value as text ("4096", "causal", "fwd,bwd"), for headers and JSON. */
const char *da_args_format(const da_opt_t *o, char *buf, size_t n);

/* Parse a mask spec: "none" | terms joined by '+' among "causal", "window:W",
 * "doc:L1,L2,..." (W, L with K/M/G suffixes; each term at most once). On success fills *out
 * (freeing what it held) and returns 0; on error writes a message into err and returns -1.
 * That the documents sum to the sequence length is checked later (da_mask_check). */
int da_mask_parse(const char *spec, da_mask_spec_t *out, char *err, size_t errlen);
void da_mask_spec_free(da_mask_spec_t *m);

#ifdef __cplusplus
}
#endif
#endif /* DA_ARGS_H */
