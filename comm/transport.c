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

static const da_transport_t *const transports[] = {&da_transport_mpi, &da_transport_self,
#ifdef DA_HAVE_NCCL
                                                    &da_transport_nccl,
#endif
#ifdef DA_HAVE_CUDART
                                                    &da_transport_cuda_ipc,
#endif
#ifdef DA_HAVE_CUDART
                                                    &da_transport_cuda_mpi,
#endif
                                                    &da_transport_host_ipc, &da_transport_host_mpi, NULL};

const da_transport_t *da_transport_find(const char *name) {
  char built[128];
  int len = 0;
  built[0] = '\0';
  for (int i = 0; transports[i]; i++) {
    if (name && !strcmp(transports[i]->name, name)) return transports[i];
    len += snprintf(built + len, sizeof built - (size_t)len, "%s%s", i ? ", " : "", transports[i]->name);
  }
  DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown transport '%s' (built: %s)", name ? name : "(null)", built);
  return NULL;
}

const char *da_transport_resolve(const char *name, int cuda) {
  return cuda && name && !strcmp(name, "mpi") ? "cuda-mpi" : name;
}

const char *da_transport_cuda_default(int single_node) {
  if (single_node) return "cuda-ipc";
#ifdef DA_HAVE_NCCL
  return "nccl";
#else
  return "cuda-mpi";
#endif
}

da_status_t da_transport_check_host(const char *name, const char *who) {
  const da_transport_t *t = da_transport_find(name);
  if (!t) return DA_ERR_INVALID_ARGUMENT;
  if (t->devapi)
    return DA_ERR(DA_ERR_UNSUPPORTED, "%s: the %s transport moves device memory, and the drivers that run here keep "
                  "their buffers in host memory (use mpi, or self at one rank; ring, striped and zigzag plans run on "
                  "device memory)", who, t->name);
  return DA_SUCCESS;
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

/* The inner mpi transport of a wrapping transport (its impl struct's first member), carrying
 * the outer phase and timeout. */
static da_xport_t *inner_of(da_xport_t *xp) {
  da_xport_t *in = xp->impl;
  in->phase = xp->phase;
  in->timeout_s = xp->timeout_s;
  return in;
}

da_status_t da_xport_inner_open(da_xport_t *xp, void *impl, MPI_Comm comm) {
  da_xport_t *in = impl;
  in->timeout_s = xp->timeout_s;
  in->phase = xp->phase;
  DA_CHECK(da_transport_mpi.init(in, comm));
  in->t = &da_transport_mpi;
  xp->rank = in->rank, xp->nranks = in->nranks;
  xp->impl = impl;
  return DA_SUCCESS;
}

da_status_t da_xport_inner_allreduce(da_xport_t *xp, void *buf, int count, da_xtype_t type, da_xop_t op) {
  da_xport_t *in = inner_of(xp);
  return in->t->allreduce(in, buf, count, type, op);
}

da_status_t da_xport_inner_allgather(da_xport_t *xp, const void *sbuf, void *rbuf, size_t bytes) {
  da_xport_t *in = inner_of(xp);
  return in->t->allgather(in, sbuf, rbuf, bytes);
}

da_status_t da_xport_inner_barrier(da_xport_t *xp) {
  da_xport_t *in = inner_of(xp);
  return in->t->barrier(in);
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

da_status_t da_xport_poll(da_xport_t *xp, da_xreq_t *q, da_status_t (*test)(da_xport_t *, da_xreq_t *, int *),
                          da_status_t (*stalled)(da_xport_t *, da_xreq_t *)) {
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    int done = 0;
    DA_CHECK(test(xp, q, &done));
    if (done) return DA_SUCCESS;
    const double waited = da_time_now() - t0;
    if (waited > xp->timeout_s) return stalled(xp, q);
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

da_status_t da_mpi_comm_dup(MPI_Comm parent, double timeout_s, const char *what, MPI_Comm *out) {
  *out = MPI_COMM_NULL;
  int rank = -1;
  MPI_Comm_rank(parent, &rank);
  /* The handle MPI writes at completion lives on the heap: on a timeout it may still be written. */
  MPI_Comm *h = malloc(sizeof *h);
  if (!h) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d %s: communicator handle", rank, what);
  *h = MPI_COMM_NULL;
  int rc, done = 0;
#ifdef SMPI_H
  /* SimGrid SMPI (the sim/ build) has no MPI_Comm_idup; its simulated ranks never go missing. */
  rc = MPI_Comm_dup(parent, h);
  done = 1;
#else
  /* First a barrier, then the duplicate. An MPI_Comm_idup left pending (a rank never came) is
   * not safe to abandon in Open MPI: its half-built communicator holds a reserved slot of the
   * communicator table, and MPI_Finalize then releases it twice (valgrind: invalid reads and
   * writes in ompi_comm_finalize; glibc "free(): corrupted unsorted chunks" in 1 of 8 runs of
   * tests/test_python_deadline.py). A pending MPI_Ibarrier is an ordinary nonblocking collective:
   * abandoned, it only keeps its request. So the idup starts only once every rank has arrived,
   * and completes at once; it keeps the deadline's remainder in case a rank vanishes between. */
  MPI_Request r;
  const double t0 = MPI_Wtime();
  rc = MPI_Ibarrier(parent, &r);
  if (rc == MPI_SUCCESS) rc = da_mpi_poll(&r, timeout_s, &done);
  if (rc == MPI_SUCCESS && done) {
    const double left = timeout_s - (MPI_Wtime() - t0);
    rc = MPI_Comm_idup(parent, h, &r);
    if (rc == MPI_SUCCESS) rc = da_mpi_poll(&r, left > 1.0 ? left : 1.0, &done);
  }
#endif
  if (rc != MPI_SUCCESS) {
    free(h);
    return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: MPI_Comm_idup", rank, what);
  }
  if (!done) /* h is MPI's now (a collective request cannot be cancelled or freed) */
    return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s: MPI_Comm_idup did not complete within %g s (a peer is missing or "
                  "stuck)", rank, what, timeout_s);
  *out = *h;
  free(h);
  return DA_SUCCESS;
}

/* Roll-call words: their values are never read, so every receive may land in the same place. */
static int rollcall_token = 1, rollcall_sink;

da_status_t da_mpi_rollcall(MPI_Comm comm, double grace_s, const char *what) {
  char msg[DA_ERRMSG_MAX];
  snprintf(msg, sizeof msg, "%s", da_error_message());
  int rank = 0, P = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &P);
  MPI_Request *rq = malloc((size_t)2 * P * sizeof *rq);
  if (!rq) return DA_ERR(DA_ERR_TIMEOUT, "%s", msg);
  for (int i = 0; i < 2 * P; i++) rq[i] = MPI_REQUEST_NULL;
  for (int q = 0; q < P; q++) {
    if (q == rank) continue;
    MPI_Irecv(&rollcall_sink, 1, MPI_INT, q, DA_TAG_ROLLCALL, comm, &rq[q]);
    MPI_Isend(&rollcall_token, 1, MPI_INT, q, DA_TAG_ROLLCALL, comm, &rq[P + q]);
  }
  const double t0 = da_time_now();
  int pending = P - 1;
  for (long it = 0; pending > 0 && da_time_now() - t0 <= grace_s; it++) {
    pending = 0;
    for (int q = 0; q < P; q++) {
      int flag = 1;
      if (rq[q] != MPI_REQUEST_NULL && MPI_Test(&rq[q], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) flag = 0;
      pending += !flag;
    }
    if (pending) da_mpi_backoff(it, da_time_now() - t0);
  }
  char list[200];
  int len = 0, n = 0;
  list[0] = '\0';
  for (int q = 0; q < P; q++) {
    if (rq[q] != MPI_REQUEST_NULL) {
      if (n < 16 && len < (int)sizeof list - 16) len += snprintf(list + len, sizeof list - (size_t)len, "%s%d", n ? ", " : "", q);
      n++;
      MPI_Cancel(&rq[q]);
      MPI_Request_free(&rq[q]); /* a late word lands in rollcall_sink, harmlessly */
    }
    if (rq[P + q] != MPI_REQUEST_NULL) MPI_Request_free(&rq[P + q]); /* one int: buffered, never blocks */
  }
  free(rq);
  if (n > 16) snprintf(list + len, sizeof list - (size_t)len, " and %d more", n - 16);
  if (n == 0)
    return DA_ERR(DA_ERR_TIMEOUT, "%s; every rank reached %s (a peer is stuck inside it)", msg, what);
  return DA_ERR(DA_ERR_TIMEOUT, "%s; rank%s %s never reached %s (no word from %s within %g s after the deadline: "
                "stopped, hung, or not calling it)", msg, n == 1 ? "" : "s", list, what, n == 1 ? "it" : "them", grace_s);
}
