/* report.h: what every `distattn` subcommand prints, in the shape nccl-tests users already read:
 * `#` header lines, a fixed-width table, a `# wrong: N` / `# PASS|FAIL` footer on stdout; and
 * one JSON Lines record per configuration appended whole to --json FILE. Nothing here decides
 * what a figure means (design §6 does); it only lays results out. */
#ifndef DA_REPORT_H
#define DA_REPORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "args.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- machine facts ---- */
const char *da_report_hostname(void);   /* short host name, cached */
const char *da_report_cpu_model(void);  /* "model name" of /proc/cpuinfo, or "unknown" */
int da_report_online_cores(void);       /* sysconf(_SC_NPROCESSORS_ONLN) */

/* ---- header ----
 * "# distattn <cmd> <version>", "# host: ..., pid, threads T of C cores (N allowed), cpu: ...",
 * "# settings: --seq 4096 --heads 4 ..." (every option of the table with its value in effect).
 * Extra lines (backend, BLAS, ...) go through da_report_line. */
void da_report_header(FILE *f, const da_cmdspec_t *cmd, int threads);
void da_report_line(FILE *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- table ----
 * Columns are right-aligned at fixed widths; the header row starts with '#' like nccl-tests so
 * `grep -v '^#'` leaves only numbers. Cells are added left to right, then da_table_end_row. */
#define DA_TABLE_MAX_COLS 24
typedef struct da_table {
  FILE *f;
  int ncols, col;
  const char *names[DA_TABLE_MAX_COLS];
  int widths[DA_TABLE_MAX_COLS];
} da_table_t;

/* names/widths: ncols entries; a width below the name's length grows to fit it. */
void da_table_init(da_table_t *t, FILE *f, int ncols, const char *const *names, const int *widths);
void da_table_print_header(da_table_t *t);
void da_table_str(da_table_t *t, const char *s);
void da_table_int(da_table_t *t, int64_t v);
/* %.*f with `prec` decimals, or %.*e when `sci`; NaN/Inf print "-" (value not measured). */
void da_table_dbl(da_table_t *t, double v, int prec, int sci);
void da_table_end_row(da_table_t *t);

/* Non-finite values (counts summed over ranks): one "# warning:" line naming every tensor with a
 * NaN or an infinity and how many; the verified rows whose float64 reference is itself
 * non-finite (counted apart from the wrong ones); and the wrong rows that are non-finite where the
 * reference is finite, explained when the inputs held non-finite values (poisoned). Nothing when
 * all counts are 0. */
void da_report_nonfinite(FILE *f, int n, const char *const *names, const int64_t *counts, int64_t rows,
                         int64_t wrong_rows, int inputs_poisoned);

/* "# wrong: N" then "# PASS" (wrong == 0 and ok) or "# FAIL". Returns 0 on PASS, 1 on FAIL. */
int da_report_footer(FILE *f, int64_t wrong, int ok);

/* ---- JSON Lines ----
 * Build one object in memory, then append it with a single write() on an O_APPEND descriptor:
 * concurrent writers (ranks, jobs) on one file each land whole records, never interleaved
 * halves. Strings are escaped; NaN and Inf become null (JSON has neither). */
typedef struct da_json {
  char *buf;
  size_t len, cap;
  int nfields;
  int oom; /* an allocation failed: da_json_append reports it */
} da_json_t;

void da_json_begin(da_json_t *j);
void da_json_str(da_json_t *j, const char *key, const char *val); /* NULL -> null */
void da_json_int(da_json_t *j, const char *key, int64_t val);
void da_json_dbl(da_json_t *j, const char *key, double val);
void da_json_bool(da_json_t *j, const char *key, int val);
void da_json_null(da_json_t *j, const char *key);
/* A value that is already JSON (an array or object the caller built; not checked). */
void da_json_raw(da_json_t *j, const char *key, const char *json);
/* The problem and where it ran, as every record words it (kernel, run, decode): batch, heads,
 * kv_heads, dim, mask, dtype, device, threads, in this order. */
void da_json_problem(da_json_t *j, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, const char *mask,
                     const char *dtype, const char *device, int threads);
/* The fields every record carries: git, hosts (NULL: this host), SLURM_JOB_ID when set, cpu,
 * peak_rss_bytes (read now, so call it last). */
void da_json_common(da_json_t *j, const char *hosts);
/* Close the object (adding "key": $DISTATTN_JSON_KEY last when that is set: a sweep's name for the
 * configuration, so a resumed sweep can skip what is recorded) and append it as one line to path,
 * under the file's flock, with one write() on O_APPEND; a line left unterminated by an earlier
 * writer is closed first. 0 on success; -1 with a message on stderr (a short write is truncated
 * back: the record is then absent from the file, never cut inside it). */
/* The longest da_json_append waits for another process's flock on the file (default 10 s). */
void da_json_set_lock_wait(double seconds);
int da_json_append(da_json_t *j, const char *path);
void da_json_free(da_json_t *j);
/* Check before a long run that path can be opened for appending (creates it empty if absent).
 * 0 if so; -1 with a message on stderr. */
int da_json_check_path(const char *path);

#ifdef __cplusplus
}
#endif
#endif /* DA_REPORT_H */
