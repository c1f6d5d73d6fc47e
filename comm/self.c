/* self.c: the `self` transport for a job of one rank: an exchange with oneself is a copy, a
 * collective is the identity. Lets the drivers run unchanged at P = 1 without MPI traffic; it is
 * not a loopback of the mpi transport (no messages, nothing to time out). */
#include <stdlib.h>
#include <string.h>
#include "transport.h"

struct da_xreq {
  int done;
};

static da_status_t self_init(da_xport_t *xp, MPI_Comm comm) {
  int inited = 0, size = 1;
  MPI_Initialized(&inited);
  if (inited && comm != MPI_COMM_NULL) {
    int rc = MPI_Comm_size(comm, &size);
    if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "self transport: communicator size");
  }
  if (size != 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "the self transport runs one rank, the communicator has %d "
                  "(use the mpi transport)", size);
  xp->rank = 0;
  xp->nranks = 1;
  xp->impl = NULL;
  return DA_SUCCESS;
}

static void self_destroy(da_xport_t *xp) { (void)xp; }

static da_status_t self_exchange_start(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                       size_t rbytes, int src, int tag, int step, da_xreq_t **out) {
  *out = NULL;
  if (dst != 0 || src != 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "self transport step %d: peers %d/%d, only rank 0 exists", step, dst, src);
  if (sbytes != rbytes)
    return DA_ERR(DA_ERR_MISMATCH, "self transport step %d: sending %zu bytes to itself but expecting %zu", step,
                  sbytes, rbytes);
  da_xreq_t *q = malloc(sizeof *q);
  if (!q) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "self transport: request");
  if (sbytes && sbuf != rbuf) memmove(rbuf, sbuf, sbytes);
  q->done = 1;
  *out = q;
  return DA_SUCCESS;
}

static da_status_t self_test(da_xport_t *xp, da_xreq_t *q, int *done) {
  *done = 1;
  return DA_SUCCESS;
}

static da_status_t self_wait(da_xport_t *xp, da_xreq_t *q) {
  free(q);
  return DA_SUCCESS;
}

static da_status_t self_allreduce(da_xport_t *xp, void *buf, int count, da_xtype_t type, da_xop_t op) {
  return DA_SUCCESS; /* one rank: the reduction of one value is itself */
}

static da_status_t self_allgather(da_xport_t *xp, const void *sbuf, void *rbuf, size_t bytes) {
  if (bytes && sbuf != rbuf) memmove(rbuf, sbuf, bytes);
  return DA_SUCCESS;
}

/* One rank: the all-to-all is the copy of its own part. */
static da_status_t self_alltoallv(da_xport_t *xp, const void *sbuf, const size_t *sbytes, const size_t *soff,
                                  void *rbuf, const size_t *rbytes, const size_t *roff) {
  if (sbytes[0] != rbytes[0])
    return DA_ERR(DA_ERR_MISMATCH, "self transport: all-to-all sends %zu bytes to itself but expects %zu", sbytes[0],
                  rbytes[0]);
  if (sbytes[0]) memmove((char *)rbuf + roff[0], (const char *)sbuf + soff[0], sbytes[0]);
  return DA_SUCCESS;
}

static void self_abort(da_xport_t *xp, da_xreq_t *q) { free(q); }

const da_transport_t da_transport_self = {
    .name = "self",
    .init = self_init,
    .exchange_start = self_exchange_start,
    .test = self_test,
    .wait = self_wait,
    .allreduce = self_allreduce,
    .allgather = self_allgather,
    .barrier = NULL, /* default: a one-value allreduce, i.e. nothing */
    .abort = self_abort,
    .destroy = self_destroy,
    .alltoallv = self_alltoallv,
};
