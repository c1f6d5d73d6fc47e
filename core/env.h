/* env.h: the one table of the DISTATTN_* environment variables the library and the `distattn`
 * program read, and the strict parser that goes with it (issue 19, class 5). Every variable is
 * read through here: a value that is not of its type or not in its range is an error naming the
 * variable (library: DA_ERR_INVALID_ARGUMENT; program: exit 2), never a silent default.
 * Not here: variables of the test harness, scripts and the Python package (docs/reliability.md). */
#ifndef DA_ENV_H
#define DA_ENV_H

#include <stddef.h>
#include <stdint.h>
#include "distattn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  DA_ENV_INT,      /* a decimal integer in [min, max]: no sign other than '-', no fraction, no suffix */
  DA_ENV_BOOL,     /* 0 or 1 */
  DA_ENV_SECONDS,  /* a finite real number of seconds in [min, max] (0.5 is half a second) */
  DA_ENV_NUMBER,   /* a finite real number in [min, max] */
  DA_ENV_SIZE,     /* a size (4K, 1M, 3G, 123) in [min, max] */
  DA_ENV_SIZE_OFF, /* a size >= 1, or off / -1 (no limit) */
  DA_ENV_WORD,     /* one of `choices` ("a|b|c"), case-insensitive when `nocase` */
  DA_ENV_WORDS,    /* comma-separated words of `choices`, optionally led by ^ (all but these) */
  DA_ENV_TEXT,     /* any non-empty UTF-8 text (written into JSON records, file names) */
  DA_ENV_FILE,     /* a readable regular file */
  DA_ENV_POISON,   /* DISTATTN_TEST_NONFINITE's TENSOR:POS[:nan|inf|-inf][,...] (launcher/verify.c) */
  DA_ENV_INTERNAL, /* set by distattn itself for a child process; any value */
} da_env_type_t;

typedef struct da_env_var {
  const char *name;    /* DISTATTN_... */
  da_env_type_t type;
  double min, max;     /* INT, SECONDS, NUMBER, SIZE: the range */
  const char *choices; /* WORD, WORDS: "a|b|c" */
  int nocase;          /* WORD, WORDS: case-insensitive */
  int test_only;       /* a test hook: makes results wrong or slow on purpose; never set in production */
  const char *reader;  /* who reads it (library, program, sim) */
  const char *meaning;
  const char *garbage; /* a value the parser must refuse (the generated test feeds it) */
} da_env_var_t;

/* The table, ended by an entry with name NULL. */
extern const da_env_var_t da_env_vars[];
const da_env_var_t *da_env_find(const char *name);

/* Check one value against its entry; on failure DA_ERR_INVALID_ARGUMENT with a message naming the
 * variable, the value and what is expected. */
da_status_t da_env_check_value(const da_env_var_t *v, const char *value);
/* Check every variable of the table that is set (empty counts as unset). The library calls it in
 * da_context_create, the program before anything else. */
da_status_t da_env_check_all(void);

/* Typed reads (the value checked as above). *set = 0 and *out untouched when unset or empty. */
da_status_t da_env_int(const char *name, int64_t *out, int *set);
da_status_t da_env_double(const char *name, double *out, int *set); /* SECONDS, NUMBER */

/* A DA_ENV_POISON variable (DISTATTN_TEST_NONFINITE) parsed into its items: *n of them (0 when
 * unset), each the tensor (index into q, k, v, dout), the global position and the value (NaN,
 * +inf or -inf). The check and this read share one parser. */
#define DA_ENV_POISON_MAX 16
typedef struct da_env_poison {
  int tensor;
  int64_t pos;
  float value;
} da_env_poison_t;
da_status_t da_env_poison(const char *name, da_env_poison_t items[DA_ENV_POISON_MAX], int *n);

/* Above this many kernel threads per process (DISTATTN_NTHREADS, da_config_t.nthreads, --threads)
 * a thread count is refused: 1024 covers the largest single machines (2 sockets x 192 cores x 2
 * hardware threads = 768), so a larger count can only oversubscribe, and past a few thousand
 * libgomp cannot create its team and ends the process from inside the parallel region (a crash,
 * no error return). */
#define DA_MAX_NTHREADS 1024
/* The shortest deadline the program and DISTATTN_TIMEOUT accept: below it the roll call that
 * names a silent rank (min(deadline, 5 s)) cannot tell a stopped rank from a slow start, and every
 * setup collective reports ranks as missing that are only late. */
#define DA_TIMEOUT_MIN_S 1.0

#ifdef __cplusplus
}
#endif
#endif /* DA_ENV_H */
