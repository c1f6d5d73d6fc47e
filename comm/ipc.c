/* ipc.c: the cuda-ipc transport (ranks sharing a node or one GPU), written against the device
 * table of devapi.h so the same protocol runs on the CUDA runtime ("cuda-ipc") and on POSIX
 * shared memory ("host-ipc", the test seam: no GPU needed).
 *
 * Setup (init, collective): a comm stream and two IPC events per rank, `free` (recorded on the
 * caller's stream when an exchange starts: everything before it, which produced sbuf and last
 * read rbuf, is done once it completes) and `ready` (recorded on the comm stream after this
 * rank's push copy). Event handles are allgathered once and every peer's events opened. The
 * caller registers its receive slots once (register_mem, collective): handles allgathered,
 * every peer's slots mapped.
 *
 * One exchange (sbuf -> dst, rbuf <- src), push model, MPI only for small control words:
 *   receiver: record `free`; send CTS {step, region, offset, bytes} to src; post the READY receive;
 *   sender:   on CTS (in test): comm stream waits for the receiver's `free` (it is done with the
 *             slot: "consumed") and its own `free` (sbuf written); copy sbuf into the mapped
 *             slot; record `ready`; send READY {step, status} to dst;
 *   done:     sender when READY left and its `ready` completed (sbuf no longer read); receiver
 *             when READY arrived and the sender's `ready` completed (the bytes are in rbuf).
 * A stream wait captures an event's latest record at the time of the call, which is why every
 * wait on a peer's event follows that peer's message saying it recorded it. One `free` and one
 * `ready` per rank serve every exchange in flight: a later record of the same stream covers the
 * earlier ones, so sharing can only make a wait longer, never shorter.
 *
 * Test hook (never for production): DISTATTN_TEST_IPC_SKIP=ready makes a receiver trust the
 * READY word without waiting for the copy's event; =consumed makes a sender copy without waiting
 * for the receiver's `free`. Tests set it to show that the host seam catches both. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "transport.h"

/* Control tags: the data tag of the caller plus a kind offset (the caller's tags are < 100). */
enum { TAG_CTS = 1000, TAG_READY = 2000 };

typedef struct {
  void *base;
  size_t bytes;
  void **peer; /* [P]: peer q's region of the same index, mapped here (peer[rank] = base) */
} region_t;

typedef struct {
  da_xport_t inner; /* the mpi transport on the same communicator: collectives and their deadlines */
  MPI_Comm comm;
  const da_devapi_t *d;
  da_dstream_t cstream;
  da_devent_t free_ev, ready_ev;
  da_devent_t *peer_free, *peer_ready; /* [P], opened (own slot: our own events) */
  region_t *regs;
  int nregs;
  int skip_ready, skip_consumed; /* the test hook */
} ipc_t;

struct da_xreq {
  int src, dst, tag, step;
  const void *sbuf;
  size_t sbytes, rbytes;
  int64_t cts_out[4], cts_in[4], rdy_out[2], rdy_in[2];
  MPI_Request cts_s, rdy_r; /* receiver role */
  MPI_Request cts_r, rdy_s; /* sender role */
  int pushed, send_done, recv_done;
};

static ipc_t *impl(da_xport_t *xp) { return xp->impl; }

/* The collectives run on the inner mpi transport (transport.h: da_xport_inner_*). */
_Static_assert(offsetof(ipc_t, inner) == 0, "da_xport_inner_* find the inner transport first in the impl");

/* The device allreduce of the tree decode (transport.h): neither the CUDA runtime nor IPC has a
 * collective, so the values are staged through host memory (after the work on the caller's stream)
 * and reduced by MPI with the inner transport's deadline, then copied back. They are the decode's
 * B*T*H*(D+1) partial floats, small beside the KV shard each rank reads; nccl reduces on the GPU. */
static da_status_t ipc_allreduce_dev(da_xport_t *xp, float *buf, int count, da_xop_t op) {
  ipc_t *m = impl(xp);
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s: the device allreduce orders after the caller's stream, and "
                  "none is set (xp->stream)", xp->rank, xp->phase);
  const size_t bytes = (size_t)(count > 0 ? count : 0) * sizeof(float);
  float *h = malloc(bytes ? bytes : 1);
  if (!h) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d %s: device allreduce staging (%zu bytes)", xp->rank, xp->phase,
                        bytes);
  da_status_t st = m->d->copy_to_host(h, buf, bytes, xp->stream);
  if (st == DA_SUCCESS) st = da_xport_inner_allreduce(xp, h, count, DA_XT_FLOAT, op);
  if (st == DA_SUCCESS) st = m->d->copy_from_host(buf, h, bytes, xp->stream);
  free(h);
  return st;
}

static void ipc_destroy(da_xport_t *xp) {
  ipc_t *m = impl(xp);
  if (!m) return;
  const da_devapi_t *d = m->d;
  if (m->cstream) (void)d->stream_sync(m->cstream); /* nothing of ours may still write a peer's slot */
  for (int i = 0; i < m->nregs; i++) {
    for (int q = 0; m->regs[i].peer && q < xp->nranks; q++)
      if (q != xp->rank && m->regs[i].peer[q]) d->mem_close(m->regs[i].peer[q]);
    free(m->regs[i].peer);
  }
  free(m->regs);
  for (int q = 0; q < xp->nranks; q++) {
    if (q == xp->rank) continue;
    if (m->peer_free && m->peer_free[q]) d->event_destroy(m->peer_free[q]);
    if (m->peer_ready && m->peer_ready[q]) d->event_destroy(m->peer_ready[q]);
  }
  free(m->peer_free);
  free(m->peer_ready);
  if (m->free_ev) d->event_destroy(m->free_ev);
  if (m->ready_ev) d->event_destroy(m->ready_ev);
  if (m->cstream) d->stream_destroy(m->cstream);
  if (m->inner.t) m->inner.t->destroy(&m->inner);
  free(m);
  xp->impl = NULL;
}

/* This rank's part of init: the device, the stream, the events. */
static da_status_t init_local(da_xport_t *xp, ipc_t *m) {
  int ndev = 0;
  da_status_t st = m->d->probe(&ndev);
  if (st != DA_SUCCESS)
    return DA_ERR_WRAP(st, "rank %d: the %s transport needs a device", xp->rank, xp->t->name);
  const char *skip = da_param_string("DISTATTN_TEST_IPC_SKIP");
  if (skip) {
    m->skip_ready = !strcmp(skip, "ready");
    m->skip_consumed = !strcmp(skip, "consumed");
    if (!m->skip_ready && !m->skip_consumed)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "DISTATTN_TEST_IPC_SKIP=%s: expected ready or consumed", skip);
    DA_WARN(DA_SUB_COMM, "%s: test hook on: a %s event wait is left out (results will be wrong)", xp->t->name, skip);
  }
  m->peer_free = calloc((size_t)xp->nranks, sizeof *m->peer_free);
  m->peer_ready = calloc((size_t)xp->nranks, sizeof *m->peer_ready);
  if (!m->peer_free || !m->peer_ready) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: event tables", xp->t->name);
  DA_CHECK(m->d->stream_create(&m->cstream));
  DA_CHECK(m->d->event_create(&m->free_ev, 1));
  DA_CHECK(m->d->event_create(&m->ready_ev, 1));
  return DA_SUCCESS;
}

/* Every rank's two event handles, then every peer's events opened here. */
static da_status_t open_peer_events(da_xport_t *xp, ipc_t *m, da_status_t local) {
  const int P = xp->nranks;
  da_dev_event_handle_t mine[2], *all = calloc((size_t)P * 2, sizeof *all);
  if (!all) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: event handles", xp->t->name);
  memset(mine, 0, sizeof mine);
  da_status_t st = local;
  if (st == DA_SUCCESS) st = m->d->event_handle(m->free_ev, &mine[0]);
  if (st == DA_SUCCESS) st = m->d->event_handle(m->ready_ev, &mine[1]);
  st = da_xport_agree(xp, st, "cuda-ipc setup");
  if (st == DA_SUCCESS) st = da_xport_inner_allgather(xp, mine, all, sizeof mine);
  for (int q = 0; q < P && st == DA_SUCCESS; q++) {
    if (q == xp->rank) {
      m->peer_free[q] = m->free_ev, m->peer_ready[q] = m->ready_ev;
      continue;
    }
    st = m->d->event_open(&all[2 * q], &m->peer_free[q]);
    if (st == DA_SUCCESS) st = m->d->event_open(&all[2 * q + 1], &m->peer_ready[q]);
  }
  free(all);
  return st;
}

static da_status_t ipc_init(da_xport_t *xp, MPI_Comm comm, const da_devapi_t *d) {
  ipc_t *m = calloc(1, sizeof *m);
  if (!m) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s transport", xp->t->name);
  m->d = d;
  m->comm = comm;
  da_status_t st = da_xport_inner_open(xp, m, comm);
  if (st != DA_SUCCESS) {
    free(m);
    return st;
  }
  st = init_local(xp, m);
  st = open_peer_events(xp, m, st); /* agrees first: a rank without a device fails them all */
  st = da_xport_agree(xp, st, "cuda-ipc setup");
  if (st == DA_SUCCESS && d->publish_done) d->publish_done();
  if (st != DA_SUCCESS) {
    /* The peers' events may be half open: unmap them (the stream is idle). */
    ipc_destroy(xp);
  }
  return st;
}

static da_status_t ipc_register(da_xport_t *xp, void *ptr, size_t bytes) {
  ipc_t *m = impl(xp);
  const int P = xp->nranks;
  region_t *r = realloc(m->regs, (size_t)(m->nregs + 1) * sizeof *r);
  if (!r) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: region table", xp->t->name);
  m->regs = r;
  region_t *reg = &m->regs[m->nregs];
  memset(reg, 0, sizeof *reg);
  reg->base = ptr, reg->bytes = bytes;
  reg->peer = calloc((size_t)P, sizeof *reg->peer);
  da_dev_mem_handle_t mine, *all = calloc((size_t)P, sizeof *all);
  memset(&mine, 0, sizeof mine);
  da_status_t st = reg->peer && all ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: handles", xp->t->name);
  if (st == DA_SUCCESS) st = m->d->mem_handle(ptr, bytes, &mine);
  st = da_xport_agree(xp, st, "cuda-ipc register");
  if (st == DA_SUCCESS) st = da_xport_inner_allgather(xp, &mine, all, sizeof mine);
  for (int q = 0; q < P && st == DA_SUCCESS; q++) {
    if (q == xp->rank) {
      reg->peer[q] = ptr;
    } else {
      st = m->d->mem_open(&all[q], &reg->peer[q]);
      if (st != DA_SUCCESS)
        st = DA_ERR_WRAP(st, "rank %d: opening rank %d's region %d", xp->rank, q, m->nregs);
    }
  }
  free(all);
  m->nregs++; /* counted even on failure, so destroy closes what was opened */
  st = da_xport_agree(xp, st, "cuda-ipc register");
  if (st == DA_SUCCESS && m->d->publish_done) m->d->publish_done();
  return st;
}

/* The region holding [p, p + bytes); -1 if none. */
static int region_of(const ipc_t *m, const void *p, size_t bytes) {
  for (int i = 0; i < m->nregs; i++) {
    const char *b = m->regs[i].base;
    if ((const char *)p >= b && (const char *)p + bytes <= b + m->regs[i].bytes) return i;
  }
  return -1;
}

static void ipc_abort(da_xport_t *xp, da_xreq_t *q) {
  (void)xp;
  if (!q) return;
  /* Receives are cancelled; sends (two or four words, eager) are left to complete, so that a
   * READY carrying a failure still reaches the receiver and it fails at once, not at its deadline. */
  MPI_Request *recvs[] = {&q->rdy_r, &q->cts_r}, *sends[] = {&q->cts_s, &q->rdy_s};
  for (int i = 0; i < 2; i++) {
    if (*recvs[i] != MPI_REQUEST_NULL) {
      MPI_Cancel(recvs[i]);
      MPI_Request_free(recvs[i]);
    }
  }
  int pending = 0;
  const double t0 = da_time_now();
  for (long it = 0; da_time_now() - t0 < 0.1; it++) {
    pending = 0;
    for (int i = 0; i < 2; i++) {
      int flag = 1;
      if (*sends[i] != MPI_REQUEST_NULL && MPI_Test(sends[i], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) flag = 1;
      pending += !flag;
    }
    if (!pending) break;
    da_mpi_backoff(it, da_time_now() - t0);
  }
  if (pending) { /* the words live in q: MPI may still read them, so q is left to it (a few bytes) */
    for (int i = 0; i < 2; i++)
      if (*sends[i] != MPI_REQUEST_NULL) MPI_Request_free(sends[i]);
    return;
  }
  free(q);
}

static da_status_t ipc_exchange_start(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                      size_t rbytes, int src, int tag, int step, da_xreq_t **out) {
  ipc_t *m = impl(xp);
  *out = NULL;
  if (!xp->stream)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s step %d: the %s transport orders exchanges after the caller's "
                  "stream, and none is set (xp->stream)", xp->rank, xp->phase, step, xp->t->name);
  int reg = -1;
  if (rbytes && (reg = region_of(m, rbuf, rbytes)) < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d %s step %d: the receive buffer %p (%zu bytes) is not inside a "
                  "registered region (register_mem the slots once, at setup)", xp->rank, xp->phase, step, rbuf, rbytes);
  da_xreq_t *q = calloc(1, sizeof *q);
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: request", xp->t->name);
  q->src = src, q->dst = dst, q->tag = tag, q->step = step;
  q->sbuf = sbuf, q->sbytes = sbytes, q->rbytes = rbytes;
  q->cts_s = q->rdy_r = q->cts_r = q->rdy_s = MPI_REQUEST_NULL;
  da_status_t st = DA_SUCCESS;
  /* Everything the caller queued so far (writing sbuf, reading rbuf) before this exchange. */
  if (sbytes || rbytes) st = m->d->event_record(m->free_ev, xp->stream);
  int rc = MPI_SUCCESS;
  if (st == DA_SUCCESS && rbytes) {
    q->cts_out[0] = step, q->cts_out[1] = reg;
    q->cts_out[2] = (int64_t)((const char *)rbuf - (const char *)m->regs[reg].base);
    q->cts_out[3] = (int64_t)rbytes;
    rc = MPI_Irecv(q->rdy_in, 2, MPI_INT64_T, src, TAG_READY + tag, m->comm, &q->rdy_r);
    if (rc == MPI_SUCCESS) rc = MPI_Isend(q->cts_out, 4, MPI_INT64_T, src, TAG_CTS + tag, m->comm, &q->cts_s);
  }
  if (st == DA_SUCCESS && rc == MPI_SUCCESS && sbytes)
    rc = MPI_Irecv(q->cts_in, 4, MPI_INT64_T, dst, TAG_CTS + tag, m->comm, &q->cts_r);
  if (st == DA_SUCCESS && rc != MPI_SUCCESS)
    st = da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: %s control words", xp->rank, xp->phase, step,
                      xp->t->name);
  if (st != DA_SUCCESS) {
    ipc_abort(xp, q);
    return st;
  }
  q->send_done = !sbytes;
  q->recv_done = !rbytes;
  *out = q;
  return DA_SUCCESS;
}

/* Sender: the receiver's CTS arrived; queue the copy into its slot and tell it. */
static da_status_t push(da_xport_t *xp, da_xreq_t *q) {
  ipc_t *m = impl(xp);
  const da_devapi_t *d = m->d;
  const int64_t reg = q->cts_in[1], off = q->cts_in[2], bytes = q->cts_in[3];
  da_status_t bad = DA_SUCCESS;
  if (q->cts_in[0] != q->step || reg < 0 || reg >= m->nregs || (size_t)bytes != q->sbytes || off < 0 ||
      (size_t)(off + bytes) > m->regs[reg].bytes)
    bad = DA_ERR(DA_ERR_MISMATCH, "rank %d %s step %d: rank %d asks for %lld bytes at step %lld (region %lld), this rank "
                 "sends %zu (do all ranks run the same plan?)", xp->rank, xp->phase, q->step, q->dst, (long long)bytes,
                 (long long)q->cts_in[0], (long long)reg, q->sbytes);
  da_status_t st = bad;
  if (st == DA_SUCCESS && !m->skip_consumed) st = d->stream_wait_event(m->cstream, m->peer_free[q->dst]);
  if (st == DA_SUCCESS) st = d->stream_wait_event(m->cstream, m->free_ev);
  if (st == DA_SUCCESS) st = d->copy_async((char *)m->regs[reg].peer[q->dst] + off, q->sbuf, q->sbytes, m->cstream);
  if (st == DA_SUCCESS) st = d->event_record(m->ready_ev, m->cstream);
  /* The word goes out even on failure, so the receiver fails now rather than at its deadline. */
  q->rdy_out[0] = q->step, q->rdy_out[1] = (int64_t)st;
  int rc = MPI_Isend(q->rdy_out, 2, MPI_INT64_T, q->dst, TAG_READY + q->tag, m->comm, &q->rdy_s);
  if (st == DA_SUCCESS && rc != MPI_SUCCESS)
    st = da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: READY to rank %d", xp->rank, xp->phase, q->step,
                      q->dst);
  q->pushed = 1;
  return st;
}

static da_status_t mpi_done(da_xport_t *xp, da_xreq_t *q, MPI_Request *r, int *flag, const char *what, int peer) {
  *flag = 1;
  if (*r == MPI_REQUEST_NULL) return DA_SUCCESS;
  int rc = MPI_Test(r, flag, MPI_STATUS_IGNORE);
  if (rc != MPI_SUCCESS)
    return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s step %d: %s rank %d", xp->rank, xp->phase, q->step, what,
                        peer);
  return DA_SUCCESS;
}

static da_status_t ipc_test(da_xport_t *xp, da_xreq_t *q, int *done) {
  ipc_t *m = impl(xp);
  *done = 0;
  if (!q) {
    *done = 1;
    return DA_SUCCESS;
  }
  int f = 0;
  if (!q->send_done) {
    if (!q->pushed) {
      DA_CHECK(mpi_done(xp, q, &q->cts_r, &f, "CTS from", q->dst));
      if (f) DA_CHECK(push(xp, q));
    }
    if (q->pushed) {
      int sent = 0, copied = 0;
      DA_CHECK(mpi_done(xp, q, &q->rdy_s, &sent, "READY to", q->dst));
      DA_CHECK(m->d->event_query(m->ready_ev, &copied));
      q->send_done = sent && copied;
    }
  }
  if (!q->recv_done) {
    int cts = 0, rdy = 0;
    DA_CHECK(mpi_done(xp, q, &q->cts_s, &cts, "CTS to", q->src));
    DA_CHECK(mpi_done(xp, q, &q->rdy_r, &rdy, "READY from", q->src));
    if (rdy && q->rdy_in[1] != DA_SUCCESS)
      return DA_ERR(DA_ERR_REMOTE, "rank %d %s step %d: rank %d could not send (%s)", xp->rank, xp->phase, q->step,
                    q->src, da_status_string((da_status_t)q->rdy_in[1]));
    int landed = 0;
    if (cts && rdy) {
      if (m->skip_ready) landed = 1; /* the planted bug: trust the word, not the event */
      else DA_CHECK(m->d->event_query(m->peer_ready[q->src], &landed));
    }
    q->recv_done = landed;
  }
  if (q->send_done && q->recv_done) *done = 1;
  else (void)m->d->event_query(m->free_ev, &f); /* drives the host table's own streams */
  return DA_SUCCESS;
}

/* The timeout error of ipc_wait (da_xport_poll): the direction that did not finish. */
static da_status_t ipc_stalled(da_xport_t *xp, da_xreq_t *q) {
  if (!q->recv_done)
    return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: receive of %zu bytes from rank %d (%s) timed out after %g s",
                  xp->rank, xp->phase, q->step, q->rbytes, q->src, xp->t->name, xp->timeout_s);
  return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s step %d: send of %zu bytes to rank %d (%s) timed out after %g s%s",
                xp->rank, xp->phase, q->step, q->sbytes, q->dst, xp->t->name, xp->timeout_s,
                q->pushed ? "" : " (no CTS: the receiver never posted its slot)");
}

static da_status_t ipc_wait(da_xport_t *xp, da_xreq_t *q) {
  if (!q) return DA_SUCCESS;
  const da_status_t st = da_xport_poll(xp, q, ipc_test, ipc_stalled);
  if (st != DA_SUCCESS) ipc_abort(xp, q);
  else free(q);
  return st;
}

/* host-ipc and cuda-ipc: one protocol over two device tables (transport.h, DA_DEVICE_TRANSPORT: the
 * ipc_* functions above). */
static da_status_t host_ipc_init_table(da_xport_t *xp, MPI_Comm comm) {
  return ipc_init(xp, comm, &da_devapi_host);
}

const da_transport_t da_transport_host_ipc = DA_DEVICE_TRANSPORT(ipc, "host-ipc", host_ipc_init_table, &da_devapi_host);

#ifdef DA_HAVE_CUDART
static da_status_t cuda_ipc_init_table(da_xport_t *xp, MPI_Comm comm) {
  return ipc_init(xp, comm, &da_devapi_cuda);
}

const da_transport_t da_transport_cuda_ipc = DA_DEVICE_TRANSPORT(ipc, "cuda-ipc", cuda_ipc_init_table, &da_devapi_cuda);
#endif
