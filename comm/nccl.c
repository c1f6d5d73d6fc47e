/* nccl.c: the `nccl` transport (one rank per GPU), built only when CMake finds NCCL and the CUDA
 * runtime. Streams and events go through the device seam (devapi.h, `cuda` table); only the
 * communication is NCCL's. nccl.h brings the CUDA runtime header with it: this file and
 * devapi_cuda.c are the only comm/ sources that see a CUDA header.
 *   - Bootstrap: rank 0's ncclGetUniqueId travels over the caller's MPI communicator (an
 *     allgather through an inner `mpi` transport, bounded by the deadline). It needs no GPU.
 *   - The device is probed next, and every rank agrees on the outcome before NCCL is asked for a
 *     communicator: a rank without a device fails, and every rank says why, at once.
 *   - A nonblocking communicator (ncclCommInitRankConfig, blocking = 0), so that it can be
 *     aborted; its creation is polled with ncclCommGetAsyncError against the deadline.
 *   - An exchange: the transport's stream waits for the caller's (xp->stream), then one
 *     ncclGroupStart / ncclSend / ncclRecv / ncclGroupEnd on it, then an event; test queries the
 *     event and ncclCommGetAsyncError. A deadline ends in ncclCommAbort with the peers named.
 *   - Collectives of the drivers' control words (allreduce, allgather) are host memory: MPI.
 * NCCL does not check message sizes: the plan's agreement on the problem (plan.c) is what makes
 * both sides of an exchange agree on them. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nccl.h>
#include "transport.h"

typedef struct {
  da_xport_t inner; /* the mpi transport on the same communicator */
  const da_devapi_t *d;
  ncclComm_t nc;
  da_dstream_t nstream;
  da_devent_t start_ev; /* the caller's stream up to the exchange */
  int broken;           /* aborted after a deadline or an asynchronous error */
} nccl_t;

struct da_xreq {
  da_devent_t done_ev;
  int src, dst, step;
  size_t sbytes, rbytes;
};

/* NCCL's result once into a distattn status, with NCCL's own words (and the communicator's last
 * error, when there is one). */
static da_status_t nccl_status(ncclResult_t r, ncclComm_t comm, const char *file, int line, const char *what) {
  if (r == ncclSuccess || r == ncclInProgress) return DA_SUCCESS;
  const char *last = comm ? ncclGetLastError(comm) : NULL;
  return da_error(DA_ERR_NCCL, file, line, "NCCL %s: %s%s%s", what, ncclGetErrorString(r),
                  last && *last ? ": " : "", last && *last ? last : "");
}
#define NC(call, comm, what) nccl_status((call), (comm), __FILE__, __LINE__, (what))

static nccl_t *impl(da_xport_t *xp) { return xp->impl; }

/* Rank 0's unique id on every rank: the bootstrap, which needs no GPU. */
da_status_t da_nccl_unique_id(da_xport_t *mx, void *id, size_t bytes) {
  if (bytes != sizeof(ncclUniqueId))
    return DA_ERR(DA_ERR_INTERNAL, "nccl: a unique id is %zu bytes, not %zu", sizeof(ncclUniqueId), bytes);
  ncclUniqueId mine;
  memset(&mine, 0, sizeof mine);
  da_status_t st = DA_SUCCESS;
  if (mx->rank == 0) st = NC(ncclGetUniqueId(&mine), NULL, "ncclGetUniqueId");
  st = da_xport_agree(mx, st, "nccl bootstrap");
  if (st != DA_SUCCESS) return st;
  ncclUniqueId *all = malloc((size_t)mx->nranks * sizeof *all);
  if (!all) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "nccl bootstrap");
  st = mx->t->allgather(mx, &mine, all, sizeof mine);
  if (st == DA_SUCCESS) memcpy(id, &all[0], sizeof mine);
  free(all);
  return st;
}

/* The collectives run on the inner mpi transport (transport.h: da_xport_inner_*). */
_Static_assert(offsetof(nccl_t, inner) == 0, "da_xport_inner_* find the inner transport first in the impl");

/* Poll a nonblocking communicator until its pending operation (creation, finalize) finished. */
static da_status_t settle(da_xport_t *xp, nccl_t *m, const char *what) {
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    ncclResult_t a = ncclSuccess;
    DA_CHECK(NC(ncclCommGetAsyncError(m->nc, &a), m->nc, "ncclCommGetAsyncError"));
    if (a != ncclInProgress) return NC(a, m->nc, what);
    const double waited = da_time_now() - t0;
    if (waited > xp->timeout_s) {
      (void)ncclCommAbort(m->nc);
      m->nc = NULL;
      m->broken = 1;
      return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s: NCCL %s did not complete within %g s (aborted)", xp->rank, xp->phase,
                    what, xp->timeout_s);
    }
    da_mpi_backoff(it, waited);
  }
}

static void nccl_destroy(da_xport_t *xp) {
  nccl_t *m = impl(xp);
  if (!m) return;
  if (m->nc) {
    if (m->broken || ncclCommFinalize(m->nc) != ncclSuccess || settle(xp, m, "ncclCommFinalize") != DA_SUCCESS) {
      if (m->nc) (void)ncclCommAbort(m->nc);
    } else {
      (void)ncclCommDestroy(m->nc);
    }
  }
  if (m->start_ev) m->d->event_destroy(m->start_ev);
  if (m->nstream) m->d->stream_destroy(m->nstream);
  if (m->inner.t) m->inner.t->destroy(&m->inner);
  free(m);
  xp->impl = NULL;
}

static da_status_t nccl_init(da_xport_t *xp, MPI_Comm comm) {
  nccl_t *m = calloc(1, sizeof *m);
  if (!m) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "nccl transport");
  m->d = &da_devapi_cuda;
  da_status_t st = da_xport_inner_open(xp, m, comm);
  if (st != DA_SUCCESS) {
    free(m);
    return st;
  }

  ncclUniqueId id;
  st = da_nccl_unique_id(&m->inner, &id, sizeof id);
  if (st == DA_SUCCESS) {
    /* The device, before NCCL: a rank without one fails every rank, in words. */
    int ndev = 0;
    da_status_t local = m->d->probe(&ndev);
    if (local != DA_SUCCESS)
      local = DA_ERR_WRAP(local, "rank %d: the nccl transport needs a CUDA device", xp->rank);
    if (local == DA_SUCCESS) local = m->d->stream_create(&m->nstream);
    if (local == DA_SUCCESS) local = m->d->event_create(&m->start_ev, 0);
    st = da_xport_agree(xp, local, "nccl setup");
  }
  if (st == DA_SUCCESS) {
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0; /* so that a deadline can abort it */
    st = NC(ncclCommInitRankConfig(&m->nc, xp->nranks, id, xp->rank, &cfg), NULL, "ncclCommInitRankConfig");
    if (st == DA_SUCCESS) st = settle(xp, m, "ncclCommInitRankConfig");
    st = da_xport_agree(xp, st, "nccl setup");
  }
  if (st != DA_SUCCESS) nccl_destroy(xp);
  return st;
}

static void nccl_abort_req(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return;
  if (q->done_ev) impl(xp)->d->event_destroy(q->done_ev);
  free(q);
}

static da_status_t nccl_exchange_start(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                       size_t rbytes, int src, int tag, int step, da_xreq_t **out) {
  (void)tag; /* NCCL matches by order on the communicator: the drivers post in the same order */
  nccl_t *m = impl(xp);
  *out = NULL;
  if (m->broken)
    return DA_ERR(DA_ERR_REMOTE, "rank %d %s step %d: the NCCL communicator was aborted earlier", xp->rank, xp->phase,
                  step);
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s step %d: the nccl transport orders exchanges after the caller's "
                  "stream, and none is set (xp->stream)", xp->rank, xp->phase, step);
  da_xreq_t *q = calloc(1, sizeof *q);
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "nccl: request");
  q->src = src, q->dst = dst, q->step = step, q->sbytes = sbytes, q->rbytes = rbytes;
  da_status_t st = m->d->event_create(&q->done_ev, 0);
  if (st == DA_SUCCESS) st = m->d->event_record(m->start_ev, xp->stream);
  if (st == DA_SUCCESS) st = m->d->stream_wait_event(m->nstream, m->start_ev);
  cudaStream_t s = (cudaStream_t)m->nstream;
  if (st == DA_SUCCESS) st = NC(ncclGroupStart(), m->nc, "ncclGroupStart");
  if (st == DA_SUCCESS && sbytes) st = NC(ncclSend(sbuf, sbytes, ncclUint8, dst, m->nc, s), m->nc, "ncclSend");
  if (st == DA_SUCCESS && rbytes) st = NC(ncclRecv(rbuf, rbytes, ncclUint8, src, m->nc, s), m->nc, "ncclRecv");
  if (st == DA_SUCCESS) st = NC(ncclGroupEnd(), m->nc, "ncclGroupEnd"); /* ncclInProgress is fine */
  if (st == DA_SUCCESS) st = m->d->event_record(q->done_ev, m->nstream);
  if (st != DA_SUCCESS) {
    nccl_abort_req(xp, q);
    return DA_ERR_WRAP(st, "rank %d %s step %d: posting the exchange (send to rank %d, receive from "
                  "rank %d)", xp->rank, xp->phase, step, dst, src);
  }
  *out = q;
  return DA_SUCCESS;
}

static da_status_t nccl_test(da_xport_t *xp, da_xreq_t *q, int *done) {
  nccl_t *m = impl(xp);
  *done = 0;
  if (!q) {
    *done = 1;
    return DA_SUCCESS;
  }
  if (m->broken)
    return DA_ERR(DA_ERR_REMOTE, "rank %d %s step %d: the NCCL communicator was aborted earlier", xp->rank, xp->phase,
                  q->step);
  ncclResult_t a = ncclSuccess;
  DA_CHECK(NC(ncclCommGetAsyncError(m->nc, &a), m->nc, "ncclCommGetAsyncError"));
  if (a != ncclSuccess && a != ncclInProgress) {
    da_status_t st = DA_ERR(DA_ERR_NCCL, "rank %d %s step %d: NCCL failed asynchronously (peers %d and %d): %s: %s",
                            xp->rank, xp->phase, q->step, q->src, q->dst, ncclGetErrorString(a), ncclGetLastError(m->nc));
    (void)ncclCommAbort(m->nc);
    m->nc = NULL;
    m->broken = 1;
    return st;
  }
  return m->d->event_query(q->done_ev, done);
}

static da_status_t nccl_wait(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return DA_SUCCESS;
  nccl_t *m = impl(xp);
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    int done = 0;
    da_status_t st = nccl_test(xp, q, &done);
    if (st != DA_SUCCESS || done) {
      nccl_abort_req(xp, q);
      return st;
    }
    const double waited = da_time_now() - t0;
    if (waited > xp->timeout_s) {
      if (q->step < 0) /* nccl_allreduce_dev's request */
        st = DA_ERR(DA_ERR_TIMEOUT, "rank %d %s: NCCL allreduce of %zu bytes timed out after %g s (a peer is missing "
                    "or stuck); communicator aborted", xp->rank, xp->phase, q->sbytes, xp->timeout_s);
      else
        st = DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: NCCL exchange (send %zu bytes to rank %d, receive %zu bytes "
                    "from rank %d) timed out after %g s; communicator aborted", xp->rank, xp->phase, q->step, q->sbytes,
                    q->dst, q->rbytes, q->src, xp->timeout_s);
      (void)ncclCommAbort(m->nc);
      m->nc = NULL;
      m->broken = 1;
      nccl_abort_req(xp, q);
      return st;
    }
    da_mpi_backoff(it, waited);
  }
}

/* The device allreduce of the tree decode (transport.h): ncclAllReduce in place on the comm
 * stream, which first waits for the caller's stream; then the caller's stream waits for the
 * result, and the host polls its event against the deadline (with ncclCommGetAsyncError, as an
 * exchange does): a peer that never joins ends in ncclCommAbort, never in a hang. */
static da_status_t nccl_allreduce_dev(da_xport_t *xp, float *buf, int count, da_xop_t op) {
  nccl_t *m = impl(xp);
  if (m->broken) return DA_ERR(DA_ERR_REMOTE, "rank %d %s: the NCCL communicator was aborted earlier", xp->rank, xp->phase);
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s: the device allreduce orders after the caller's stream, and "
                  "none is set (xp->stream)", xp->rank, xp->phase);
  da_xreq_t *q = calloc(1, sizeof *q);
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "nccl: request");
  q->src = q->dst = -1, q->step = -1, q->sbytes = q->rbytes = (size_t)count * sizeof(float);
  const ncclRedOp_t nop = op == DA_XOP_MAX ? ncclMax : op == DA_XOP_MIN ? ncclMin : ncclSum;
  da_status_t st = m->d->event_create(&q->done_ev, 0);
  if (st == DA_SUCCESS) st = m->d->event_record(m->start_ev, xp->stream);
  if (st == DA_SUCCESS) st = m->d->stream_wait_event(m->nstream, m->start_ev);
  if (st == DA_SUCCESS)
    st = NC(ncclAllReduce(buf, buf, (size_t)count, ncclFloat32, nop, m->nc, (cudaStream_t)m->nstream), m->nc,
            "ncclAllReduce");
  if (st == DA_SUCCESS) st = m->d->event_record(q->done_ev, m->nstream);
  if (st == DA_SUCCESS) st = m->d->stream_wait_event(xp->stream, q->done_ev);
  if (st != DA_SUCCESS) {
    nccl_abort_req(xp, q);
    return DA_ERR_WRAP(st, "rank %d %s: posting the device allreduce of %d floats", xp->rank,
                  xp->phase, count);
  }
  return nccl_wait(xp, q); /* bounded; names the deadline and aborts the communicator on it */
}

const da_transport_t da_transport_nccl = {
    .name = "nccl",
    .init = nccl_init,
    .exchange_start = nccl_exchange_start,
    .test = nccl_test,
    .wait = nccl_wait,
    .allreduce = da_xport_inner_allreduce,
    .allgather = da_xport_inner_allgather,
    .barrier = da_xport_inner_barrier,
    .abort = nccl_abort_req,
    .destroy = nccl_destroy,
    .devapi = &da_devapi_cuda,
    .register_mem = NULL, /* NCCL registers nothing the caller must know of */
    .allreduce_dev = nccl_allreduce_dev,
};
