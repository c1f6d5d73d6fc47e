/* status.c: status strings and the thread-local detailed error message. Errors are recorded
 * once, where first detected, and logged at WARN with file:line. */
#include <stdio.h>
#include <string.h>
#include "core.h"

static const char *const status_names[DA_NUM_STATUS] = {
    [DA_SUCCESS] = "success",
    [DA_ERR_INVALID_ARGUMENT] = "invalid argument",
    [DA_ERR_UNSUPPORTED] = "unsupported",
    [DA_ERR_OUT_OF_MEMORY] = "out of memory",
    [DA_ERR_SYSTEM] = "system error",
    [DA_ERR_MPI] = "MPI error",
    [DA_ERR_CUDA] = "CUDA error",
    [DA_ERR_NCCL] = "NCCL error",
    [DA_ERR_TIMEOUT] = "timeout",
    [DA_ERR_MISMATCH] = "ranks disagree",
    [DA_ERR_IO] = "I/O error",
    [DA_ERR_REMOTE] = "remote rank failed",
    [DA_ERR_INTERNAL] = "internal error",
};

const char *da_status_string(da_status_t st) {
  if ((int)st < 0 || st >= DA_NUM_STATUS || !status_names[st]) return "unknown status";
  return status_names[st];
}

static _Thread_local char errmsg[DA_ERRMSG_MAX];
static _Atomic long ntimeouts; /* DA_ERR_TIMEOUT raised in this process, any thread */

long da_error_timeouts(void) { return ntimeouts; }

da_status_t da_error(da_status_t st, const char *file, int line, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errmsg, sizeof errmsg, fmt, ap);
  va_end(ap);
  DA_WARN(DA_SUB_ALL, "%s:%d %s: %s", file, line, da_status_string(st), errmsg);
  if (st == DA_ERR_TIMEOUT) ntimeouts++;
  return st;
}

da_status_t da_error_wrap(da_status_t st, const char *file, int line, const char *fmt, ...) {
  char prior[DA_ERRMSG_MAX], what[256]; /* the message lives in errmsg, which da_error rewrites */
  snprintf(prior, sizeof prior, "%s", errmsg);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  return da_error(st, file, line, "%s: %s", what, prior);
}

const char *da_error_message(void) { return errmsg; }
void da_error_clear(void) { errmsg[0] = '\0'; }

da_status_t da_errbuf_finish(da_errbuf_t *e, da_status_t st) {
  if (e) {
    if (st != DA_SUCCESS) snprintf(e->msg, sizeof e->msg, "%s", errmsg);
    else e->msg[0] = '\0';
  }
  return st;
}
