/* staged.c: the mpi transport on device memory, staged through pinned host buffers: the fallback
 * where neither nccl nor cuda-ipc can serve (ranks on different nodes without NCCL, ranks sharing
 * GPUs across nodes) and what a CPU-only peer needs. One protocol over the device table of
 * devapi.h: "cuda-mpi" on the CUDA runtime (what `mpi` means in a CUDA context) and "host-mpi" on
 * the host seam (the test transport: no GPU needed). No CUDA header here.
 *
 * Staging buffers: every region the driver registers (register_mem, collective, once per plan:
 * the ring's two KV slots and three travelling dK/dV sums) gets a pinned host mirror of the same
 * size, allocated then, reused by every step, freed at destroy (the plan's), counted as pinned
 * bytes (da_dev_pinned_stats). A receive lands in the mirror of its receive buffer at the same
 * offset; a send is copied into the mirror of its send buffer (a send buffer outside every
 * registered region borrows a pinned scratch buffer, kept for reuse). Disjoint device ranges
 * have disjoint mirror ranges, so the exchanges in flight never share staging bytes.
 *
 * One exchange (sbuf -> dst, rbuf <- src), with two comm streams of the transport's, `ds` for the
 * copies out of the device and `hs` for the copies into it:
 *   start:   record the exchange's event `start` on the caller's stream (xp->stream: the work that
 *            wrote sbuf and last read rbuf); MPI_Irecv into the receive mirror; ds waits for
 *            `start`, copies sbuf -> send mirror and records the event `d2h`.
 *   send:    once `d2h` completed (test), MPI_Isend from the mirror; done when MPI is. Sends are
 *            posted in the order their exchanges started, so messages between two ranks with
 *            one tag keep the order of the host transport.
 *   receive: once MPI completed, hs waits for the exchange's own `start` (recorded once, so the
 *            wait sees that record however late it is queued), copies receive mirror -> rbuf and
 *            records `h2d`; done when `h2d` completed: the bytes are in rbuf for the caller's
 *            later work.
 * Two streams, and an event per exchange rather than one shared, so that the copy of a block that
 * arrived never queues behind a later exchange's wait for the compute queued since (the backward
 * starts its dK/dV exchange after a step's kernels; the next KV block must not wait for them).
 * test() drives every exchange in flight (events queried, MPI polled), never blocks; wait() is
 * test() against xp->timeout_s, and its error names the peer, the step and the stage that did not
 * finish. The messages and collectives go through an inner mpi transport on the same
 * communicator (chunking, size check, deadlines).
 *
 * Test hook (never for production): DISTATTN_TEST_STAGE_SKIP=d2h posts the MPI_Isend without
 * waiting for the copy out of the device; =h2d reports a receive done when MPI completes, before
 * the copy into rbuf. tests/test_ring.c (`device host-mpi`) shows the host seam catches both. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "transport.h"

typedef struct {
  char *dev; /* a registered device region ... */
  size_t bytes;
  char *host; /* ... and its pinned mirror */
} mirror_t;

typedef struct {
  char *host;
  size_t bytes;
  int busy;
} scratch_t;

/* Where an exchange is. Send: copying out of the device, then in MPI, then done. Receive: in
 * MPI, then copying into the device, then done. */
enum { S_COPY = 0, S_MPI = 1, S_DONE = 2 };
enum { R_MPI = 0, R_COPY = 1, R_DONE = 2 };

struct da_xreq {
  da_xreq_t *prev, *next; /* the exchanges in flight, in start order */
  int src, dst, tag, step;
  size_t sbytes, rbytes;
  char *shost, *rhost; /* staging of the send and of the receive */
  void *rdev;
  int scratch;         /* the scratch buffer shost borrows, or -1 */
  da_devent_t start, d2h, h2d; /* from the pool; start: on the caller's stream at exchange_start */
  da_xreq_t *smpi, *rmpi; /* the inner mpi transport's requests */
  int sstate, rstate;
};

typedef struct {
  da_xport_t inner; /* the mpi transport on the same communicator: messages and collectives */
  const da_devapi_t *d;
  da_dstream_t ds, hs; /* the comm streams: copies out of the device (sends), into it (receives) */
  mirror_t *mir;
  int nmir;
  scratch_t *scr;
  int nscr;
  float *red; /* allreduce_dev staging, grown to the largest call */
  size_t red_bytes;
  da_devent_t *evfree; /* events not in use */
  int nevfree, capevfree;
  da_xreq_t *head, *tail;
  int skip_d2h, skip_h2d; /* the test hook */
} staged_t;

_Static_assert(offsetof(staged_t, inner) == 0, "da_xport_inner_* find the inner transport first in the impl");

static staged_t *impl(da_xport_t *xp) { return xp->impl; }

/* The inner transport, carrying the outer phase and timeout (its messages name them). */
static da_xport_t *inner(da_xport_t *xp) {
  staged_t *m = impl(xp);
  m->inner.phase = xp->phase;
  m->inner.timeout_s = xp->timeout_s;
  return &m->inner;
}

/* ---- events: a small pool, one pair per exchange in flight ---------------------------------- */

static da_status_t ev_get(staged_t *m, da_devent_t *e) {
  if (m->nevfree > 0) {
    *e = m->evfree[--m->nevfree];
    return DA_SUCCESS;
  }
  return m->d->event_create(e, 0);
}

static void ev_put(staged_t *m, da_devent_t e) {
  if (!e) return;
  if (m->nevfree == m->capevfree) {
    int cap = m->capevfree ? 2 * m->capevfree : 8;
    da_devent_t *n = realloc(m->evfree, (size_t)cap * sizeof *n);
    if (!n) {
      m->d->event_destroy(e);
      return;
    }
    m->evfree = n, m->capevfree = cap;
  }
  m->evfree[m->nevfree++] = e;
}

/* ---- staging memory ------------------------------------------------------------------------- */

/* The mirror bytes of [p, p + bytes) when it lies in a registered region; NULL otherwise. */
static char *mirror_of(const staged_t *m, const void *p, size_t bytes) {
  for (int i = 0; i < m->nmir; i++) {
    const mirror_t *r = &m->mir[i];
    if ((const char *)p >= r->dev && (const char *)p + bytes <= r->dev + r->bytes)
      return r->host + ((const char *)p - r->dev);
  }
  return NULL;
}

/* A free scratch buffer of at least `bytes` for a send from unregistered memory: reused, or a new
 * one kept until destroy. */
static da_status_t scratch_get(da_xport_t *xp, size_t bytes, int *idx) {
  staged_t *m = impl(xp);
  for (int i = 0; i < m->nscr; i++)
    if (!m->scr[i].busy && m->scr[i].bytes >= bytes) {
      m->scr[i].busy = 1, *idx = i;
      return DA_SUCCESS;
    }
  scratch_t *n = realloc(m->scr, (size_t)(m->nscr + 1) * sizeof *n);
  if (!n) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: scratch table", xp->t->name);
  m->scr = n;
  void *h = NULL;
  da_status_t st = da_dev_host_alloc(m->d, &h, bytes);
  if (st != DA_SUCCESS)
    return DA_ERR_WRAP(st, "rank %d %s: %zu bytes of pinned staging for a send", xp->rank, xp->phase, bytes);
  m->scr[m->nscr] = (scratch_t){h, bytes, 1};
  *idx = m->nscr++;
  return DA_SUCCESS;
}

/* ---- setup and teardown --------------------------------------------------------------------- */

static void staged_destroy(da_xport_t *xp) {
  staged_t *m = impl(xp);
  if (!m) return;
  const da_devapi_t *d = m->d;
  /* No copy of ours may still read or write a staging buffer (or the caller's memory). */
  if (m->ds) (void)d->stream_sync(m->ds);
  if (m->hs) (void)d->stream_sync(m->hs);
  for (int i = 0; i < m->nmir; i++) da_dev_host_free(d, m->mir[i].host);
  for (int i = 0; i < m->nscr; i++) da_dev_host_free(d, m->scr[i].host);
  da_dev_host_free(d, m->red);
  free(m->mir);
  free(m->scr);
  for (int i = 0; i < m->nevfree; i++) d->event_destroy(m->evfree[i]);
  free(m->evfree);
  if (m->ds) d->stream_destroy(m->ds);
  if (m->hs) d->stream_destroy(m->hs);
  if (m->inner.t) m->inner.t->destroy(&m->inner);
  free(m);
  xp->impl = NULL;
}

/* DISTATTN_WAIT_BLOCKING leaves progress to blocking MPI calls (the SimGrid build); staging needs
 * test() to move the copies, so it is refused here rather than left to time out. */
DA_PARAM(WaitBlocking, "WAIT_BLOCKING", 0)

/* This rank's part of init: the device, the streams, the test hook. */
static da_status_t init_local(da_xport_t *xp, staged_t *m) {
  int ndev = 0;
  da_status_t st = m->d->probe(&ndev);
  if (st != DA_SUCCESS) return DA_ERR_WRAP(st, "rank %d: the %s transport needs a device", xp->rank, xp->t->name);
  if (da_param_WaitBlocking())
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: DISTATTN_WAIT_BLOCKING=1 is for the host mpi transport; %s stages "
                  "device buffers and needs test() to drive its copies", xp->rank, xp->t->name);
  const char *skip = da_param_string("DISTATTN_TEST_STAGE_SKIP");
  if (skip) {
    m->skip_d2h = !strcmp(skip, "d2h");
    m->skip_h2d = !strcmp(skip, "h2d");
    if (!m->skip_d2h && !m->skip_h2d)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "DISTATTN_TEST_STAGE_SKIP=%s: expected d2h or h2d", skip);
    DA_WARN(DA_SUB_COMM, "%s: test hook on: the %s copy is not waited for (results will be wrong)", xp->t->name, skip);
  }
  DA_CHECK(m->d->stream_create(&m->ds));
  return m->d->stream_create(&m->hs);
}

static da_status_t staged_init(da_xport_t *xp, MPI_Comm comm, const da_devapi_t *d) {
  staged_t *m = calloc(1, sizeof *m);
  if (!m) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s transport", xp->t->name);
  m->d = d;
  da_status_t st = da_xport_inner_open(xp, m, comm);
  if (st != DA_SUCCESS) {
    free(m);
    return st;
  }
  /* Agreed: a rank without a device fails every rank at once, not at a later deadline. */
  st = da_xport_agree(xp, init_local(xp, m), "staged mpi setup");
  if (st != DA_SUCCESS) staged_destroy(xp);
  return st;
}

/* A pinned mirror for the region; collective (agreed), like the other transports' registration,
 * so a rank whose slot or mirror allocation failed fails them all at the same call. */
static da_status_t staged_register(da_xport_t *xp, void *ptr, size_t bytes) {
  staged_t *m = impl(xp);
  da_status_t st = DA_SUCCESS;
  void *h = NULL;
  if (!ptr) st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: registering a NULL region", xp->rank, xp->t->name);
  mirror_t *n = st == DA_SUCCESS ? realloc(m->mir, (size_t)(m->nmir + 1) * sizeof *n) : NULL;
  if (st == DA_SUCCESS && !n) st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: region table", xp->t->name);
  if (n) m->mir = n;
  if (st == DA_SUCCESS) {
    st = da_dev_host_alloc(m->d, &h, bytes);
    if (st != DA_SUCCESS)
      st = DA_ERR_WRAP(st, "rank %d: %zu bytes of pinned staging for a registered region", xp->rank, bytes);
  }
  if (st == DA_SUCCESS) m->mir[m->nmir++] = (mirror_t){ptr, bytes, h};
  return da_xport_agree(xp, st, "staged mpi register");
}

/* ---- exchanges ------------------------------------------------------------------------------ */

static void unlink_req(staged_t *m, da_xreq_t *q) {
  if (q->prev) q->prev->next = q->next;
  else if (m->head == q) m->head = q->next;
  if (q->next) q->next->prev = q->prev;
  else if (m->tail == q) m->tail = q->prev;
  q->prev = q->next = NULL;
}

/* Release q: MPI requests cancelled (after a failure) or already finished, events back to the
 * pool, scratch handed back. A copy still queued finishes later into our own staging (or
 * into rbuf, which the caller keeps out of use after a failure: the ring leaks its buffers). */
static void release(da_xport_t *xp, da_xreq_t *q) {
  staged_t *m = impl(xp);
  unlink_req(m, q);
  da_xport_t *in = inner(xp);
  if (q->smpi) in->t->abort(in, q->smpi);
  if (q->rmpi) in->t->abort(in, q->rmpi);
  ev_put(m, q->start), ev_put(m, q->d2h), ev_put(m, q->h2d);
  if (q->scratch >= 0) {
    if (q->sstate == S_COPY || m->skip_d2h) (void)m->d->stream_sync(m->ds); /* its copy must not land in the next user's */
    m->scr[q->scratch].busy = 0;
  }
  free(q);
}

static void staged_abort(da_xport_t *xp, da_xreq_t *q) {
  if (q) release(xp, q);
}

static da_status_t staged_exchange_start(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                         size_t rbytes, int src, int tag, int step, da_xreq_t **out) {
  staged_t *m = impl(xp);
  const da_devapi_t *d = m->d;
  *out = NULL;
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s step %d: the %s transport orders exchanges after the caller's "
                  "stream, and none is set (xp->stream)", xp->rank, xp->phase, step, xp->t->name);
  char *rhost = rbytes ? mirror_of(m, rbuf, rbytes) : NULL;
  if (rbytes && !rhost)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s step %d: the receive buffer %p (%zu bytes) is not inside a "
                  "registered region (register_mem the slots once, at setup)", xp->rank, xp->phase, step, rbuf, rbytes);
  da_xreq_t *q = calloc(1, sizeof *q);
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: request", xp->t->name);
  q->src = src, q->dst = dst, q->tag = tag, q->step = step;
  q->sbytes = sbytes, q->rbytes = rbytes, q->rhost = rhost, q->rdev = rbuf, q->scratch = -1;
  q->sstate = sbytes ? S_COPY : S_DONE;
  q->rstate = rbytes ? R_MPI : R_DONE;
  /* In the list first: release() unlinks whatever happens below. */
  q->prev = m->tail;
  if (m->tail) m->tail->next = q;
  else m->head = q;
  m->tail = q;
  da_status_t st = DA_SUCCESS;
  if (sbytes) {
    q->shost = mirror_of(m, sbuf, sbytes);
    if (!q->shost && (st = scratch_get(xp, sbytes, &q->scratch)) == DA_SUCCESS) q->shost = m->scr[q->scratch].host;
  }
  /* The copies come after the caller's work on sbuf and rbuf so far. */
  if (st == DA_SUCCESS && (sbytes || rbytes)) st = ev_get(m, &q->start);
  if (st == DA_SUCCESS && (sbytes || rbytes)) st = d->event_record(q->start, xp->stream);
  /* The receive first, so an eager message from src finds its buffer posted. */
  if (st == DA_SUCCESS && rbytes) st = da_transport_mpi.exchange_start(inner(xp), NULL, 0, dst, rhost, rbytes, src, tag,
                                                                        step, &q->rmpi);
  if (st == DA_SUCCESS && sbytes) {
    st = ev_get(m, &q->d2h);
    if (st == DA_SUCCESS) st = d->stream_wait_event(m->ds, q->start);
    if (st == DA_SUCCESS) st = d->copy_async(q->shost, sbuf, sbytes, m->ds);
    if (st == DA_SUCCESS) st = d->event_record(q->d2h, m->ds);
    if (st != DA_SUCCESS)
      st = DA_ERR_WRAP(st, "rank %d %s step %d: the message to rank %d out of device memory", xp->rank, xp->phase, step,
                       dst);
  }
  if (st != DA_SUCCESS) {
    release(xp, q);
    return st;
  }
  *out = q;
  return DA_SUCCESS;
}

/* Post the sends whose copy out of the device completed, in start order: a send waits for every
 * send started before it (the copies complete in that order anyway, on one stream, ds). */
static da_status_t post_sends(da_xport_t *xp) {
  staged_t *m = impl(xp);
  for (da_xreq_t *q = m->head; q; q = q->next) {
    if (q->sstate != S_COPY) continue;
    int copied = 1;
    da_status_t st = m->skip_d2h ? DA_SUCCESS : m->d->event_query(q->d2h, &copied); /* the hook: post at once */
    if (st != DA_SUCCESS)
      return DA_ERR_WRAP(st, "rank %d %s step %d: the message to rank %d out of device memory", xp->rank, xp->phase,
                         q->step, q->dst);
    if (!copied) return DA_SUCCESS;
    DA_CHECK(da_transport_mpi.exchange_start(inner(xp), q->shost, q->sbytes, q->dst, NULL, 0, q->src, q->tag, q->step,
                                             &q->smpi));
    q->sstate = S_MPI;
  }
  return DA_SUCCESS;
}

/* One inner request: *done when it completed (then released). */
static da_status_t inner_done(da_xport_t *xp, da_xreq_t **r, int *done) {
  da_xport_t *in = inner(xp);
  DA_CHECK(in->t->test(in, *r, done));
  if (!*done) return DA_SUCCESS;
  da_status_t st = in->t->wait(in, *r); /* complete: releases it at once */
  *r = NULL;
  return st;
}

/* Advance q's stages as far as they go now. */
static da_status_t advance(da_xport_t *xp, da_xreq_t *q) {
  staged_t *m = impl(xp);
  int f = 0;
  if (q->sstate == S_MPI) {
    DA_CHECK(inner_done(xp, &q->smpi, &f));
    if (f) q->sstate = S_DONE;
  }
  if (q->rstate == R_MPI) {
    DA_CHECK(inner_done(xp, &q->rmpi, &f));
    if (f) {
      da_status_t st = ev_get(m, &q->h2d);
      if (st == DA_SUCCESS) st = m->d->stream_wait_event(m->hs, q->start); /* rbuf's last readers */
      if (st == DA_SUCCESS) st = m->d->copy_async(q->rdev, q->rhost, q->rbytes, m->hs);
      if (st == DA_SUCCESS) st = m->d->event_record(q->h2d, m->hs);
      if (st != DA_SUCCESS)
        return DA_ERR_WRAP(st, "rank %d %s step %d: the message from rank %d into device memory", xp->rank, xp->phase,
                           q->step, q->src);
      q->rstate = m->skip_h2d ? R_DONE : R_COPY; /* the hook: done before the bytes are in rbuf */
    }
  }
  if (q->rstate == R_COPY) {
    da_status_t st = m->d->event_query(q->h2d, &f);
    if (st != DA_SUCCESS)
      return DA_ERR_WRAP(st, "rank %d %s step %d: the message from rank %d into device memory", xp->rank, xp->phase,
                         q->step, q->src);
    if (f) q->rstate = R_DONE;
  }
  return DA_SUCCESS;
}

/* Drive every exchange in flight: a test of one is progress for all. */
static da_status_t progress(da_xport_t *xp) {
  staged_t *m = impl(xp);
  DA_CHECK(post_sends(xp));
  for (da_xreq_t *q = m->head; q; q = q->next) DA_CHECK(advance(xp, q));
  return DA_SUCCESS;
}

static da_status_t staged_test(da_xport_t *xp, da_xreq_t *q, int *done) {
  *done = 0;
  if (!q) {
    *done = 1;
    return DA_SUCCESS;
  }
  DA_CHECK(progress(xp));
  *done = q->sstate == S_DONE && q->rstate == R_DONE;
  return DA_SUCCESS;
}

/* What q still waits for, for the timeout message. */
static const char *stage_of(const da_xreq_t *q, int recv) {
  if (recv) return q->rstate == R_MPI ? "no message arrived" : "the message arrived; its copy into device memory did not finish";
  return q->sstate == S_COPY ? "its copy out of device memory did not finish (is the caller's stream stuck?)"
                             : "the message was posted; the peer did not take it";
}

/* The timeout error of staged_wait (da_xport_poll): the direction and the stage that did not
 * finish. */
static da_status_t staged_stalled(da_xport_t *xp, da_xreq_t *q) {
  if (q->rstate != R_DONE)
    return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: receive of %zu bytes from rank %d (%s) timed out after %g s: %s",
                  xp->rank, xp->phase, q->step, q->rbytes, q->src, xp->t->name, xp->timeout_s, stage_of(q, 1));
  return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: send of %zu bytes to rank %d (%s) timed out after %g s: %s",
                xp->rank, xp->phase, q->step, q->sbytes, q->dst, xp->t->name, xp->timeout_s, stage_of(q, 0));
}

static da_status_t staged_wait(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return DA_SUCCESS;
  const da_status_t st = da_xport_poll(xp, q, staged_test, staged_stalled);
  release(xp, q); /* done, failed or timed out: the exchange leaves the list either way */
  return st;
}

/* The device allreduce of the tree decode: the values copied to pinned staging after the work
 * on the caller's stream, reduced by MPI with the deadline, copied back. The staging buffer grows
 * to the largest call and is kept (the decode calls it every step with the same sizes). */
static da_status_t staged_allreduce_dev(da_xport_t *xp, float *buf, int count, da_xop_t op) {
  staged_t *m = impl(xp);
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s: the device allreduce orders after the caller's stream, and "
                  "none is set (xp->stream)", xp->rank, xp->phase);
  const size_t bytes = (size_t)(count > 0 ? count : 0) * sizeof(float);
  if (bytes > m->red_bytes) {
    da_dev_host_free(m->d, m->red);
    m->red = NULL, m->red_bytes = 0;
    void *h = NULL;
    da_status_t st = da_dev_host_alloc(m->d, &h, bytes);
    if (st != DA_SUCCESS)
      return DA_ERR_WRAP(st, "rank %d %s: device allreduce staging (%zu bytes)", xp->rank, xp->phase, bytes);
    m->red = h, m->red_bytes = bytes;
  }
  if (!bytes) return da_xport_inner_allreduce(xp, m->red, 0, DA_XT_FLOAT, op);
  DA_CHECK(m->d->copy_to_host(m->red, buf, bytes, xp->stream));
  DA_CHECK(da_xport_inner_allreduce(xp, m->red, count, DA_XT_FLOAT, op));
  return m->d->copy_from_host(buf, m->red, bytes, xp->stream);
}

/* host-mpi and cuda-mpi: one protocol over two device tables (transport.h, DA_DEVICE_TRANSPORT: the
 * staged_* functions above). */
static da_status_t host_mpi_init(da_xport_t *xp, MPI_Comm comm) { return staged_init(xp, comm, &da_devapi_host); }

const da_transport_t da_transport_host_mpi = DA_DEVICE_TRANSPORT(staged, "host-mpi", host_mpi_init, &da_devapi_host);

#ifdef DA_HAVE_CUDART
static da_status_t cuda_mpi_init(da_xport_t *xp, MPI_Comm comm) { return staged_init(xp, comm, &da_devapi_cuda); }

const da_transport_t da_transport_cuda_mpi = DA_DEVICE_TRANSPORT(staged, "cuda-mpi", cuda_mpi_init, &da_devapi_cuda);
#endif
