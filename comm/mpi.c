/* mpi.c: the `mpi` transport: host memory, MPI_Isend/MPI_Irecv on the communicator da_comm_create
 * dup'ed (errors returned, never fatal), progress by MPI_Test from the caller's thread, every
 * blocking call bounded by a deadline. GPU buffers would be staged through host memory by the
 * caller; this file never sees device pointers. */
#define _GNU_SOURCE
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "transport.h"

/* MPI counts are int: larger messages go as several chunks of at most 1 GiB with the same tag
 * (MPI's non-overtaking rule keeps them in order). */
#define CHUNK ((size_t)1 << 30)

typedef struct {
  MPI_Comm comm;
  /* The test-only slow link (transport.h, da_test_link): bytes per second (0 = unlimited),
   * latency in seconds, and when the link is next free. Unused when link_on == 0. */
  int link_on;
  double link_bps, link_lat_s, link_free_at;
} mpi_impl_t;

struct da_xreq {
  int nrecv, nsend; /* chunks; requests [0, nrecv) receive, [nrecv, nrecv + nsend) send */
  int src, dst, step, tag;
  size_t rbytes, sbytes;
  double ready_at;  /* the slow link's completion time; 0 without the hook */
  MPI_Request r[];  /* MPI_REQUEST_NULL once complete */
};

static void mpi_abort(da_xport_t *xp, da_xreq_t *q);

static MPI_Comm comm_of(const da_xport_t *xp) { return ((const mpi_impl_t *)xp->impl)->comm; }

static da_status_t mpi_init(da_xport_t *xp, MPI_Comm comm) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "mpi transport: MPI_Init has not been called");
  double gbps = 0, us = 0;
  int link = da_test_link(&gbps, &us);
  if (link < 0) return DA_ERR_INVALID_ARGUMENT;
  mpi_impl_t *m = calloc(1, sizeof *m);
  if (!m) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "mpi transport");
  m->comm = comm;
  m->link_on = link;
  m->link_bps = gbps * 1e9;
  m->link_lat_s = us * 1e-6;
  /* The communicator is ours (a dup): errors come back as codes we translate, never abort. */
  int rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm, &xp->rank);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &xp->nranks);
  if (rc != MPI_SUCCESS) {
    free(m);
    return da_mpi_error(rc, __FILE__, __LINE__, "mpi transport: communicator query");
  }
  xp->impl = m;
  if (link)
    DA_INFO(DA_SUB_COMM, "mpi transport: test link hook on: %g GB/s%s, %g us per exchange", gbps,
            gbps > 0 ? "" : " (unlimited)", us);
  return DA_SUCCESS;
}

static void mpi_destroy(da_xport_t *xp) {
  free(xp->impl);
  xp->impl = NULL;
}

static int nchunks(size_t bytes) { return bytes ? (int)((bytes + CHUNK - 1) / CHUNK) : 0; }

static da_status_t mpi_exchange_start(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                      size_t rbytes, int src, int tag, int step, da_xreq_t **out) {
  *out = NULL;
  int nr = nchunks(rbytes), ns = nchunks(sbytes);
  da_xreq_t *q = malloc(sizeof *q + (size_t)(nr + ns + 1) * sizeof(MPI_Request));
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "mpi transport: request");
  q->nrecv = nr, q->nsend = ns, q->src = src, q->dst = dst, q->step = step, q->tag = tag;
  q->rbytes = rbytes, q->sbytes = sbytes;
  q->ready_at = 0;
  mpi_impl_t *m = xp->impl;
  if (m->link_on) {
    /* The modelled link: this exchange leaves when the previous one has, occupies the link for
     * its larger direction, and lands a latency later. */
    double now = da_time_now(), start = now > m->link_free_at ? now : m->link_free_at;
    size_t big = sbytes > rbytes ? sbytes : rbytes;
    double busy = m->link_bps > 0 ? (double)big / m->link_bps : 0;
    m->link_free_at = start + busy;
    q->ready_at = start + busy + m->link_lat_s;
  }
  for (int i = 0; i < nr + ns; i++) q->r[i] = MPI_REQUEST_NULL;
  MPI_Comm comm = comm_of(xp);
  /* Receives first, so an eager message from src finds its buffer posted. */
  for (int i = 0; i < nr; i++) {
    size_t off = (size_t)i * CHUNK, n = rbytes - off < CHUNK ? rbytes - off : CHUNK;
    int rc = MPI_Irecv((char *)rbuf + off, (int)n, MPI_BYTE, src, tag, comm, &q->r[i]);
    if (rc != MPI_SUCCESS) {
      mpi_abort(xp, q);
      return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: posting the receive from rank %d",
                          xp->rank, xp->phase, step, src);
    }
  }
  for (int i = 0; i < ns; i++) {
    size_t off = (size_t)i * CHUNK, n = sbytes - off < CHUNK ? sbytes - off : CHUNK;
    int rc = MPI_Isend((const char *)sbuf + off, (int)n, MPI_BYTE, dst, tag, comm, &q->r[nr + i]);
    if (rc != MPI_SUCCESS) {
      mpi_abort(xp, q);
      return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: posting the send to rank %d",
                          xp->rank, xp->phase, step, dst);
    }
  }
  *out = q;
  return DA_SUCCESS;
}

/* DISTATTN_WAIT_BLOCKING=1: no deadlines, progress left to MPI: test() reports "not yet" without
 * polling, wait() blocks in MPI_Wait, the collectives are the blocking ones (a missing peer hangs
 * them all). For the SimGrid build (sim/, docs/scaling.md), where peers never die, transfers
 * advance in simulated time without MPI calls, every MPI_Test is a simulator context switch, and
 * SMPI's nonblocking collectives are linear: P^2 small detached messages per call, each of whose
 * completions scans a list of all those in flight (SimGrid 3.32), minutes at 128 ranks. */
DA_PARAM(WaitBlocking, "WAIT_BLOCKING", 0)

/* Request i of q returned rc (and status s, when it completed): the error, or for a completed
 * receive, a size check. */
static da_status_t finished(const da_xport_t *xp, const da_xreq_t *q, int i, int rc, MPI_Status *s) {
  int recv = i < q->nrecv;
  if (rc != MPI_SUCCESS)
    return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: %s rank %d", xp->rank, xp->phase, q->step,
                        recv ? "receive from" : "send to", recv ? q->src : q->dst);
  if (recv && q->r[i] == MPI_REQUEST_NULL) {
    /* A message of the wrong size means the ranks run different plans: say so rather than
     * compute on a half-filled buffer. */
    size_t want = q->rbytes - (size_t)i * CHUNK;
    if (want > CHUNK) want = CHUNK;
    int got = 0;
    MPI_Get_count(s, MPI_BYTE, &got);
    if ((size_t)got != want)
      return DA_ERR(DA_ERR_MISMATCH, "rank %d %s step %d: received %d bytes from rank %d, expected %zu "
                    "(do all ranks run the same plan?)", xp->rank, xp->phase, q->step, got, q->src, want);
  }
  return DA_SUCCESS;
}

static da_status_t mpi_test(da_xport_t *xp, da_xreq_t *q, int *done) {
  *done = 0;
  if (!q) {
    *done = 1;
    return DA_SUCCESS;
  }
  if (da_param_WaitBlocking()) return DA_SUCCESS; /* MPI moves the bytes; wait() collects them */
  int all = 1;
  for (int i = 0; i < q->nrecv + q->nsend; i++) {
    if (q->r[i] == MPI_REQUEST_NULL) continue;
    int flag = 0;
    MPI_Status s;
    DA_CHECK(finished(xp, q, i, MPI_Test(&q->r[i], &flag, &s), &s));
    all &= flag;
  }
  /* The slow link hides a completed transfer until its modelled arrival. */
  if (all && q->ready_at > 0 && da_time_now() < q->ready_at) all = 0;
  *done = all;
  return DA_SUCCESS;
}

/* Busy-poll briefly (transfers between ranks of one node finish in microseconds), then yield
 * the core: tests run more ranks than cores and the peer we wait for needs it. */
static void backoff(long iter, double waited) {
  if (iter < 32) return;
  if (waited < 0.01) {
    sched_yield();
  } else {
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
  }
}

static void mpi_abort(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return;
  for (int i = 0; i < q->nrecv + q->nsend; i++) {
    if (q->r[i] == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&q->r[i]);
    /* A cancelled request still has to complete; give it a moment, then let MPI reclaim it. */
    int flag = 0;
    double t0 = da_time_now();
    for (long it = 0; !flag && da_time_now() - t0 < 0.1; it++) {
      if (MPI_Test(&q->r[i], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      backoff(it, da_time_now() - t0);
    }
    if (!flag && q->r[i] != MPI_REQUEST_NULL) MPI_Request_free(&q->r[i]);
  }
  free(q);
}

static da_status_t mpi_wait(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return DA_SUCCESS;
  if (da_param_WaitBlocking() && q->ready_at == 0) {
    for (int i = 0; i < q->nrecv + q->nsend; i++) {
      if (q->r[i] == MPI_REQUEST_NULL) continue;
      MPI_Status s;
      da_status_t st = finished(xp, q, i, MPI_Wait(&q->r[i], &s), &s);
      if (st != DA_SUCCESS) {
        mpi_abort(xp, q);
        return st;
      }
    }
    free(q);
    return DA_SUCCESS;
  }
  double t0 = da_time_now();
  for (long it = 0;; it++) {
    int done = 0;
    da_status_t st = mpi_test(xp, q, &done);
    if (st != DA_SUCCESS) {
      mpi_abort(xp, q);
      return st;
    }
    if (done) break;
    double waited = da_time_now() - t0;
    if (waited > xp->timeout_s) {
      int recv_pending = 0;
      for (int i = 0; i < q->nrecv; i++) recv_pending |= q->r[i] != MPI_REQUEST_NULL;
      st = recv_pending
               ? DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: receive of %zu bytes from rank %d timed out after %g s",
                        xp->rank, xp->phase, q->step, q->rbytes, q->src, xp->timeout_s)
               : DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: send of %zu bytes to rank %d timed out after %g s",
                        xp->rank, xp->phase, q->step, q->sbytes, q->dst, xp->timeout_s);
      mpi_abort(xp, q);
      return st;
    }
    backoff(it, waited);
  }
  free(q);
  return DA_SUCCESS;
}

/* Wait for one collective request within the timeout. A collective cannot be cancelled: on
 * timeout it is left to MPI (the caller's buffers were copies, see below). */
static da_status_t coll_wait(da_xport_t *xp, MPI_Request *r, const char *what) {
  double t0 = da_time_now();
  for (long it = 0;; it++) {
    int flag = 0;
    int rc = MPI_Test(r, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS)
      return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: %s", xp->rank, xp->phase, what);
    if (flag) return DA_SUCCESS;
    double waited = da_time_now() - t0;
    if (waited > xp->timeout_s)
      return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s: %s did not complete within %g s (a peer is missing or "
                    "stuck)", xp->rank, xp->phase, what, xp->timeout_s);
    backoff(it, waited);
  }
}

/* The end of a nonblocking collective started (MPI return code rc) into the heap copy tmp: wait
 * for it, then copy its bytes into dst and free tmp. After a timeout tmp is kept (the collective may
 * still write into it later). */
static da_status_t coll_copy_out(da_xport_t *xp, int rc, MPI_Request *r, const char *what, void *tmp, void *dst,
                                 size_t bytes) {
  if (rc != MPI_SUCCESS) {
    free(tmp);
    return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: %s", xp->rank, xp->phase, what);
  }
  da_status_t st = coll_wait(xp, r, what);
  if (st == DA_SUCCESS) {
    memcpy(dst, tmp, bytes);
    free(tmp);
  }
  return st;
}

static da_status_t mpi_allreduce(da_xport_t *xp, void *buf, int count, da_xtype_t type, da_xop_t op) {
  MPI_Datatype dt = type == DA_XT_INT64 ? MPI_INT64_T : type == DA_XT_FLOAT ? MPI_FLOAT : MPI_DOUBLE;
  MPI_Op mop = op == DA_XOP_SUM ? MPI_SUM : op == DA_XOP_MIN ? MPI_MIN : MPI_MAX;
  size_t bytes = (size_t)count * (type == DA_XT_FLOAT ? 4 : 8);
  if (da_param_WaitBlocking()) {
    DA_MPICHECK(MPI_Allreduce(MPI_IN_PLACE, buf, count, dt, mop, comm_of(xp)), "rank %d %s: allreduce", xp->rank,
                xp->phase);
    return DA_SUCCESS;
  }
  /* Work on a heap copy: if the collective times out it may still write into it later. */
  void *tmp = malloc(bytes ? bytes : 1);
  if (!tmp) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "allreduce buffer");
  memcpy(tmp, buf, bytes);
  MPI_Request r;
  int rc = MPI_Iallreduce(MPI_IN_PLACE, tmp, count, dt, mop, comm_of(xp), &r);
  return coll_copy_out(xp, rc, &r, "allreduce", tmp, buf, bytes);
}

static da_status_t mpi_allgather(da_xport_t *xp, const void *sbuf, void *rbuf, size_t bytes) {
  if (bytes > INT_MAX) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "allgather of %zu bytes per rank", bytes);
  size_t total = bytes * (size_t)xp->nranks;
  if (da_param_WaitBlocking()) {
    DA_MPICHECK(MPI_Allgather(sbuf, (int)bytes, MPI_BYTE, rbuf, (int)bytes, MPI_BYTE, comm_of(xp)),
                "rank %d %s: allgather", xp->rank, xp->phase);
    return DA_SUCCESS;
  }
  void *tmp = malloc(total ? total : 1);
  if (!tmp) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "allgather buffer");
  MPI_Request r;
  int rc = MPI_Iallgather(sbuf, (int)bytes, MPI_BYTE, tmp, (int)bytes, MPI_BYTE, comm_of(xp), &r);
  return coll_copy_out(xp, rc, &r, "allgather", tmp, rbuf, total);
}

static da_status_t mpi_barrier(da_xport_t *xp) {
  if (da_param_WaitBlocking()) {
    DA_MPICHECK(MPI_Barrier(comm_of(xp)), "rank %d %s: barrier", xp->rank, xp->phase);
    return DA_SUCCESS;
  }
  MPI_Request r;
  DA_MPICHECK(MPI_Ibarrier(comm_of(xp), &r), "rank %d %s: barrier", xp->rank, xp->phase);
  return coll_wait(xp, &r, "barrier");
}

static size_t gcd_size(size_t a, size_t b) {
  while (b) {
    size_t t = a % b;
    a = b, b = t;
  }
  return a;
}

/* MPI_Ialltoallv polled against the deadline. MPI counts and displacements are int: they are
 * given in units of the largest power of two (up to 4 KiB) dividing every size and offset, a
 * contiguous datatype, so per-peer parts well beyond 2 GiB still fit; what still does not is
 * refused (DA_ERR_UNSUPPORTED). On timeout the collective is left to MPI, as in coll_wait. */
static da_status_t mpi_alltoallv(da_xport_t *xp, const void *sbuf, const size_t *sbytes, const size_t *soff,
                                 void *rbuf, const size_t *rbytes, const size_t *roff) {
  const int P = xp->nranks;
  size_t g = 4096;
  for (int q = 0; q < P; q++) g = gcd_size(gcd_size(gcd_size(gcd_size(g, sbytes[q]), soff[q]), rbytes[q]), roff[q]);
  if (g == 0) g = 1;
  int *c = malloc((size_t)4 * P * sizeof *c);
  if (!c) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "alltoallv counts");
  int *sc = c, *sd = c + P, *rc_ = c + 2 * P, *rd = c + 3 * P;
  for (int q = 0; q < P; q++) {
    const size_t v[4] = {sbytes[q] / g, soff[q] / g, rbytes[q] / g, roff[q] / g};
    for (int i = 0; i < 4; i++)
      if (v[i] > INT_MAX) {
        free(c);
        return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d %s: all-to-all part of %zu bytes at offset %zu (peer %d) exceeds "
                      "what one MPI_Ialltoallv can address in units of %zu bytes", xp->rank, xp->phase,
                      i < 2 ? sbytes[q] : rbytes[q], i < 2 ? soff[q] : roff[q], q, g);
      }
    sc[q] = (int)v[0], sd[q] = (int)v[1], rc_[q] = (int)v[2], rd[q] = (int)v[3];
  }
  MPI_Datatype unit;
  int rc = MPI_Type_contiguous((int)g, MPI_BYTE, &unit);
  if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&unit);
  if (rc != MPI_SUCCESS) {
    free(c);
    return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: all-to-all datatype", xp->rank, xp->phase);
  }
  da_status_t st = DA_SUCCESS;
  if (da_param_WaitBlocking()) {
    rc = MPI_Alltoallv(sbuf, sc, sd, unit, rbuf, rc_, rd, unit, comm_of(xp));
    if (rc != MPI_SUCCESS) st = da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: all-to-all", xp->rank, xp->phase);
  } else {
    MPI_Request r;
    rc = MPI_Ialltoallv(sbuf, sc, sd, unit, rbuf, rc_, rd, unit, comm_of(xp), &r);
    st = rc != MPI_SUCCESS ? da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: all-to-all", xp->rank, xp->phase)
                           : coll_wait(xp, &r, "all-to-all");
  }
  MPI_Type_free(&unit); /* MPI keeps it alive for a pending collective */
  free(c);
  return st;
}

const da_transport_t da_transport_mpi = {
    .name = "mpi",
    .init = mpi_init,
    .exchange_start = mpi_exchange_start,
    .test = mpi_test,
    .wait = mpi_wait,
    .allreduce = mpi_allreduce,
    .allgather = mpi_allgather,
    .barrier = mpi_barrier,
    .abort = mpi_abort,
    .destroy = mpi_destroy,
    .alltoallv = mpi_alltoallv,
};
