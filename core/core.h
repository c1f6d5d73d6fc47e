/* core.h: internal services every layer of distattn uses: error reporting, logging, env
 * parameters, timers, memory accounting, thread counts. Depends on nothing but libc.
 * Not part of the public API (include/distattn.h is). */
#ifndef DA_CORE_H
#define DA_CORE_H

#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>
#include "distattn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ---------------------------------------------------------------------------------
 * The detailed message of a failure is recorded where it is first detected (da_error), logged at
 * WARN, and kept in a thread-local buffer that da_last_error() returns. Callers up the stack
 * propagate the status without overwriting the message. */
#define DA_ERRMSG_MAX 512
da_status_t da_error(da_status_t st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define DA_ERR(st, ...) da_error((st), __FILE__, __LINE__, __VA_ARGS__)
/* Record st again with the current message prefixed by context ("what: earlier message"): for a
 * caller that adds where a lower layer's failure happened. */
da_status_t da_error_wrap(da_status_t st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define DA_ERR_WRAP(st, ...) da_error_wrap((st), __FILE__, __LINE__, __VA_ARGS__)
const char *da_error_message(void); /* thread-local last message */
void da_error_clear(void);
/* How many DA_ERR_TIMEOUT errors (expired deadlines) this process has raised: once a peer has
 * gone silent the job is broken, and the `distattn` program ends it at its next collective. */
long da_error_timeouts(void);

/* ---- the one error-recording path of public entry points ------------------------------------
 * A public call records its failure twice: in the thread-local buffer above (da_last_error(NULL))
 * and in the error buffer of the context the call belongs to (da_last_error(ctx): a context,
 * and every plan, cache or offload made from it, report into the context's buffer). Every public
 * entry that returns a status ends through da_errbuf_finish, so the two never disagree; a call on
 * a handle with no context (NULL) records the thread-local message only. */
typedef struct da_errbuf {
  char msg[DA_ERRMSG_MAX];
} da_errbuf_t;
/* Copy the thread's last message into e on failure, clear e on success; returns st. e may be NULL. */
da_status_t da_errbuf_finish(da_errbuf_t *e, da_status_t st);

/* The argument check at the top of every public entry (include/distattn.h): when cond is false,
 * refuse with DA_ERR_INVALID_ARGUMENT and the message (which names the function and the
 * argument), recorded through da_errbuf_finish(e, ...). Nothing has been touched yet, so nothing
 * needs undoing: the check comes before any allocation or communication. Example:
 *   DA_ARG_CHECK(da_context_errbuf(ctx), q != NULL, "da_attention_fwd: q is NULL"); */
#define DA_ARG_CHECK(e, cond, ...)                                                    \
  do {                                                                                \
    if (!(cond)) return da_errbuf_finish((e), DA_ERR(DA_ERR_INVALID_ARGUMENT, __VA_ARGS__)); \
  } while (0)

/* ---- checked size arithmetic ---------------------------------------------------------------
 * Sizes computed from caller input (shapes, strides, page sizes, counts) go through these: each
 * returns 0 and stores the result, or returns -1 on overflow (nothing stored that could be used
 * as a size). Signed: int64 element counts and offsets; unsigned: byte counts. */
static inline int da_mul_i64(int64_t a, int64_t b, int64_t *out) { return __builtin_mul_overflow(a, b, out) ? -1 : 0; }
static inline int da_add_i64(int64_t a, int64_t b, int64_t *out) { return __builtin_add_overflow(a, b, out) ? -1 : 0; }
static inline int da_mul_size(size_t a, size_t b, size_t *out) { return __builtin_mul_overflow(a, b, out) ? -1 : 0; }
static inline int da_add_size(size_t a, size_t b, size_t *out) { return __builtin_add_overflow(a, b, out) ? -1 : 0; }

/* Propagate a failing status (NCCL's NCCLCHECK). */
#define DA_CHECK(call)                                     \
  do {                                                     \
    da_status_t da_st_ = (call);                           \
    if (da_st_ != DA_SUCCESS) return da_st_;               \
  } while (0)
/* Propagate to a cleanup label (NCCLCHECKGOTO); `st` must be a da_status_t in scope. */
#define DA_CHECK_GOTO(call, st, label)                     \
  do {                                                     \
    (st) = (call);                                         \
    if ((st) != DA_SUCCESS) goto label;                    \
  } while (0)

/* ---- logging (DISTATTN_DEBUG=VERSION|WARN|INFO|TRACE, DISTATTN_DEBUG_SUBSYS=INIT,KERNEL,...,
 * DISTATTN_DEBUG_FILE=path with %h = hostname, %p = pid) --------------------------------------- */
typedef enum { DA_LOG_NONE = 0, DA_LOG_VERSION, DA_LOG_WARN, DA_LOG_INFO, DA_LOG_TRACE } da_log_level_t;
typedef enum {
  DA_SUB_INIT = 1u << 0,
  DA_SUB_KERNEL = 1u << 1,
  DA_SUB_COMM = 1u << 2,
  DA_SUB_PLAN = 1u << 3,
  DA_SUB_ENV = 1u << 4,
  DA_SUB_IO = 1u << 5,
  DA_SUB_ALLOC = 1u << 6,
  DA_SUB_ALL = ~0u
} da_log_sub_t;

extern int da_log_level_cached; /* -1 until initialized */
void da_log_init(void);
void da_log_set_rank(int rank);
/* The file the logger writes to (DISTATTN_DEBUG_FILE with %h and %p expanded) when DISTATTN_DEBUG
 * sends it to a file, else NULL; found without opening it. For callers that must not write that
 * file another way (launcher/paths.c). */
const char *da_log_file_path(void);
void da_log(da_log_level_t lvl, unsigned sub, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static inline int da_log_enabled(da_log_level_t lvl) {
  if (da_log_level_cached < 0) da_log_init();
  return da_log_level_cached >= (int)lvl;
}
#define DA_WARN(sub, ...) \
  do { if (da_log_enabled(DA_LOG_WARN)) da_log(DA_LOG_WARN, (sub), __FILE__, __LINE__, __VA_ARGS__); } while (0)
#define DA_INFO(sub, ...) \
  do { if (da_log_enabled(DA_LOG_INFO)) da_log(DA_LOG_INFO, (sub), __FILE__, __LINE__, __VA_ARGS__); } while (0)
#define DA_TRACE(sub, ...) \
  do { if (da_log_enabled(DA_LOG_TRACE)) da_log(DA_LOG_TRACE, (sub), __FILE__, __LINE__, __VA_ARGS__); } while (0)

/* ---- env parameters (NCCL_PARAM) --------------------------------------------------------------
 * DA_PARAM(Blocking, "DECODE_BLOCKING", 0) defines int64_t da_param_Blocking(void), reading
 * DISTATTN_DECODE_BLOCKING once (thread-safe) through the table of core/env.h and logging it at
 * INFO when set. Declare it in the file that uses it. A value the table refuses is reported by
 * da_env_check_all (da_context_create, the program's start); a read that meets one anyway logs
 * it at WARN and uses the default. */
int64_t da_param_load(const char *env, int64_t deflt, int64_t *cache, int *state);
#define DA_PARAM(name, env, deflt)                                   \
  static int64_t da_param_##name(void) {                             \
    static int64_t cache_;                                           \
    static int state_;                                               \
    return da_param_load("DISTATTN_" env, (deflt), &cache_, &state_); \
  }
/* String parameter: getenv with the INFO log line; returns NULL when unset. */
const char *da_param_string(const char *env_full);

/* ---- timers ------------------------------------------------------------------------------- */
double da_time_now(void); /* seconds, monotonic */

/* ---- memory accounting ----------------------------------------------------------------------
 * Every large buffer distattn allocates goes through da_malloc/da_free so the peak is known. */
void *da_malloc(size_t bytes, size_t align); /* align: power of two, 0 = 64; NULL on failure */
void *da_calloc(size_t bytes, size_t align);
void da_free(void *p);                            /* NULL is fine */
size_t da_mem_current(void);                      /* bytes live through da_malloc */
size_t da_mem_peak(void);                         /* high-water mark of da_mem_current */
void da_mem_reset_peak(void);
size_t da_peak_rss_bytes(void);                   /* process VmHWM, 0 if unknown */

/* ---- threads ------------------------------------------------------------------------------ */
/* Cores this process may run on (sched_getaffinity), so several ranks bound to disjoint cores
 * do not oversubscribe. DISTATTN_NTHREADS overrides. */
int da_default_nthreads(void);
/* The same, with DISTATTN_NTHREADS checked (core/env.h): DA_ERR_INVALID_ARGUMENT naming it. */
da_status_t da_default_nthreads_checked(int *n);

/* ---- misc --------------------------------------------------------------------------------- */
const char *da_dtype_name(da_dtype_t dt);
size_t da_dtype_size(da_dtype_t dt);
/* UTF-8: the length (1..4) of the well-formed sequence at p, or 0 when p starts an ill-formed one
 * (stray continuation byte, overlong form, surrogate, past U+10FFFF, cut short). */
int da_utf8_next(const unsigned char *p);
int da_utf8_valid(const char *s); /* 1 when all of s is well-formed UTF-8 */
/* Parse "4K", "1M", "3" (K = 1024). Returns 0 on success, -1 on malformed input/overflow. */
int da_parse_size(const char *s, int64_t *out);
const char *da_git_version(void);

#ifdef __cplusplus
}
#endif
#endif /* DA_CORE_H */
