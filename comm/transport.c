/* transport.c: the transport registry and the helpers every driver uses on top of the table:
 * opening by name, the outcome agreement that turns a failure on one rank into an error on every
 * rank, and the one place MPI error codes become messages. No data movement of its own. */
#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "transport.h"

static const da_transport_t *const transports[] = {&da_transport_mpi, &da_transport_self, NULL};

const da_transport_t *da_transport_find(const char *name) {
  for (int i = 0; transports[i]; i++)
    if (!strcmp(transports[i]->name, name)) return transports[i];
  DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown transport '%s' (built: mpi, self)", name ? name : "(null)");
  return NULL;
}

static int parse_nonneg(const char *env, double *out) {
  const char *s = da_param_string(env);
  *out = 0;
  if (!s) return 0;
  char *end = NULL;
  double x = strtod(s, &end);
  if (!end || end == s || *end || !(x >= 0) || !isfinite(x)) {
    DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s=%s: expected a finite number >= 0", env, s);
    return -1;
  }
  *out = x;
  return 1;
}

int da_test_link(double *gbps, double *us) {
  int a = parse_nonneg("DISTATTN_TEST_LINK_GBPS", gbps), b = parse_nonneg("DISTATTN_TEST_LINK_US", us);
  if (a < 0 || b < 0) return -1;
  return a || b;
}

static _Atomic double last_deadline; /* da_xport_deadline: 0 until a transport is opened */

double da_xport_deadline(void) { return last_deadline; }

da_status_t da_xport_open(da_xport_t *xp, const char *name, MPI_Comm comm, double timeout_s) {
  memset(xp, 0, sizeof *xp);
  const da_transport_t *t = da_transport_find(name);
  if (!t) return DA_ERR_INVALID_ARGUMENT;
  xp->t = t;
  xp->timeout_s = timeout_s > 0 ? timeout_s : 300.0;
  last_deadline = xp->timeout_s;
  xp->phase = "plan";
  da_status_t st = t->init(xp, comm);
  if (st != DA_SUCCESS) xp->t = NULL;
  return st;
}

void da_xport_close(da_xport_t *xp) {
  if (xp && xp->t) xp->t->destroy(xp);
  if (xp) xp->t = NULL;
}

da_status_t da_xport_barrier(da_xport_t *xp) {
  if (xp->t->barrier) return xp->t->barrier(xp);
  int64_t one = 1;
  return xp->t->allreduce(xp, &one, 1, DA_XT_INT64, DA_XOP_SUM);
}

/* The message travels in a fixed-size record so the second allgather needs no size exchange;
 * it is only paid on the failure path. */
#define AGREE_MSG 256

da_status_t da_xport_agree(da_xport_t *xp, da_status_t local, const char *what) {
  const int P = xp->nranks;
  int32_t mine = (int32_t)local, stack_all[64];
  int32_t *all = P <= 64 ? stack_all : malloc((size_t)P * sizeof *all);
  if (!all) return local != DA_SUCCESS ? local : DA_ERR(DA_ERR_OUT_OF_MEMORY, "status agreement");
  char saved[DA_ERRMSG_MAX];
  snprintf(saved, sizeof saved, "%s", da_error_message());
  da_status_t st = xp->t->allgather(xp, &mine, all, sizeof mine);
  if (st != DA_SUCCESS) {
    if (all != stack_all) free(all);
    /* Our own failure is the better explanation; keep its message. */
    if (local != DA_SUCCESS) {
      DA_ERR(local, "%s", saved);
      return local;
    }
    return st;
  }
  int first = -1;
  for (int r = 0; r < P && first < 0; r++)
    if (all[r] != DA_SUCCESS) first = r;
  da_status_t remote = first >= 0 ? (da_status_t)all[first] : DA_SUCCESS;
  if (all != stack_all) free(all);
  if (first < 0) return DA_SUCCESS;

  char msg[AGREE_MSG] = {0}, *msgs = malloc((size_t)P * AGREE_MSG);
  if (local != DA_SUCCESS) snprintf(msg, sizeof msg, "%.255s", saved);
  if (msgs && xp->t->allgather(xp, msg, msgs, AGREE_MSG) == DA_SUCCESS) {
    memcpy(msg, msgs + (size_t)first * AGREE_MSG, AGREE_MSG);
    msg[AGREE_MSG - 1] = '\0';
  } else {
    snprintf(msg, sizeof msg, "%s", da_status_string(remote));
  }
  free(msgs);
  if (local != DA_SUCCESS) {
    DA_ERR(local, "%s", saved); /* restore: the second allgather may have overwritten it */
    return local;
  }
  return DA_ERR(DA_ERR_REMOTE, "%s: rank %d failed (%s): %s", what, first, da_status_string(remote), msg);
}

da_status_t da_mpi_error(int rc, const char *file, int line, const char *fmt, ...) {
  char what[256], mpimsg[MPI_MAX_ERROR_STRING] = "";
  int len = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  if (MPI_Error_string(rc, mpimsg, &len) != MPI_SUCCESS) snprintf(mpimsg, sizeof mpimsg, "MPI error %d", rc);
  return da_error(DA_ERR_MPI, file, line, "%s: %s", what, mpimsg);
}

int da_mpi_poll(MPI_Request *r, double timeout_s, int *done) {
  const double t0 = da_time_now();
  *done = 0;
  for (long it = 0;; it++) {
    int rc = MPI_Test(r, done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS || *done) return rc;
    const double waited = da_time_now() - t0;
    if (waited > timeout_s) return MPI_SUCCESS;
    da_mpi_backoff(it, waited);
  }
}

/* Spin, yield for the first millisecond, then sleep for 2 % of the time already waited (20 us ..
 * 1 ms): a short wait stays responsive, a long one (a memory rank decoding 256K keys, a slow peer)
 * stops costing a core. A fixed 20 us sleep cost the offload's compute rank about a third of a
 * core in nanosleep calls while it waited (docs/offload.md, "Bench"); the proportional sleep adds
 * at most 2 % (+ timer slack) to a wait's latency. */
void da_mpi_backoff(long iter, double waited) {
  if (iter < 64) return;
  if (waited < 0.001) {
    sched_yield();
    return;
  }
  double s = waited * 0.02;
  s = s < 20e-6 ? 20e-6 : s > 1e-3 ? 1e-3 : s;
  struct timespec ts = {0, (long)(s * 1e9)};
  nanosleep(&ts, NULL);
}
