/* transport.h: the communicator table of design §4, one per backend (mpi: host memory over a
 * dup'ed MPI communicator; self: one rank, copies; the device transports: cuda-ipc / host-ipc,
 * nccl, cuda-mpi / host-mpi), and what the drivers share about it. Progress
 * is driven by test() calls from the caller's thread: no helper thread, so the same code runs
 * under SimGrid SMPI (MPI_THREAD_SINGLE). Not public API: the drivers in comm/ use it. */
#ifndef DA_TRANSPORT_H
#define DA_TRANSPORT_H

#include <mpi.h>
#include <stddef.h>
#include "core.h"
#include "devapi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct da_xport da_xport_t;
/* One nonblocking exchange (or collective) in flight; owned by the transport, released by wait
 * or abort. */
typedef struct da_xreq da_xreq_t;

typedef enum { DA_XT_INT64 = 0, DA_XT_DOUBLE = 1, DA_XT_FLOAT = 2 } da_xtype_t;
typedef enum { DA_XOP_SUM = 0, DA_XOP_MIN = 1, DA_XOP_MAX = 2 } da_xop_t;

/* Message tags of the drivers: one per kind of travelling buffer, so that a forward on one rank
 * and a backward on another cannot match each other's messages (they time out instead). */
enum { DA_TAG_FWD_KV = 11, DA_TAG_BWD_KV = 12, DA_TAG_BWD_DKV = 13, DA_TAG_ROLLCALL = 14 };

typedef struct da_transport {
  const char *name;

  /* Bind xp to the ranks of comm (dup'ed by the caller, never freed by the transport): sets
   * xp->rank, xp->nranks and xp->impl. Required. */
  da_status_t (*init)(da_xport_t *xp, MPI_Comm comm);

  /* Post: send sbytes of sbuf to rank dst and receive exactly rbytes into rbuf from rank src,
   * nonblocking. step and tag label the messages (errors name the peer and the step). Either
   * size may be 0. The buffers must stay untouched until wait or abort. Required. */
  da_status_t (*exchange_start)(da_xport_t *xp, const void *sbuf, size_t sbytes, int dst, void *rbuf,
                                size_t rbytes, int src, int tag, int step, da_xreq_t **req);

  /* Drive progress; *done = 1 when both directions completed (the request stays valid until
   * wait). Required. */
  da_status_t (*test)(da_xport_t *xp, da_xreq_t *req, int *done);

  /* Block until the request completes or xp->timeout_s passes (DA_ERR_TIMEOUT naming the peer
   * that did not answer and the step; the request is then cancelled). Releases req either way.
   * Required. */
  da_status_t (*wait)(da_xport_t *xp, da_xreq_t *req);

  /* In-place allreduce of count values; bounded by xp->timeout_s. Required. */
  da_status_t (*allreduce)(da_xport_t *xp, void *buf, int count, da_xtype_t type, da_xop_t op);

  /* rbuf [nranks][bytes] = every rank's sbuf [bytes], rank order; bounded by the timeout.
   * Required. */
  da_status_t (*allgather)(da_xport_t *xp, const void *sbuf, void *rbuf, size_t bytes);

  /* (optional) NULL: an allreduce of one value stands in. */
  da_status_t (*barrier)(da_xport_t *xp);

  /* Cancel and release a request after a failure (NULL req: nothing). Required. */
  void (*abort)(da_xport_t *xp, da_xreq_t *req);

  /* Release what init acquired (not the communicator). Required. */
  void (*destroy)(da_xport_t *xp);

  /* ---- device transports (cuda-ipc, host-ipc, nccl, cuda-mpi, host-mpi; NULL / unused for mpi
   * and self) ----
   * The device API whose memory exchange_start's buffers are in: allocate the buffers with it.
   * NULL: host memory. */
  const da_devapi_t *devapi;
  /* (optional) Collective, in the same order on every rank: make [ptr, ptr + bytes) (one whole
   * devapi allocation) a place peers may write into. Every rbuf of an exchange must lie inside
   * a registered region (DA_ERR_INVALID_ARGUMENT otherwise); sbuf may be any device memory.
   * Regions stay registered until destroy. NULL: buffers need no registration. */
  da_status_t (*register_mem)(da_xport_t *xp, void *ptr, size_t bytes);
  /* (optional; NULL: the transport has none, and the drivers that need it, ulysses, refuse at
   * plan time naming the transport) All-to-all with per-peer sizes: this rank sends sbytes[q]
   * bytes from sbuf + soff[q] to every rank q and receives rbytes[q] bytes from rank q into
   * rbuf + roff[q] ([nranks] arrays; the rank's own part is a copy). Blocking, bounded by
   * xp->timeout_s: DA_ERR_TIMEOUT when a peer never joins, after which MPI may still write rbuf
   * (the caller keeps it out of use). rbytes[q] must equal what rank q sends here (the plans
   * agreed on the problem before any call). */
  da_status_t (*alltoallv)(da_xport_t *xp, const void *sbuf, const size_t *sbytes, const size_t *soff, void *rbuf,
                           const size_t *rbytes, const size_t *roff);
  /* (optional; device transports. NULL: the transport has none, and the device tree decode refuses
   * it at plan time naming it) In-place allreduce of count fp32 values in device memory of
   * t->devapi, op DA_XOP_SUM or DA_XOP_MAX, after the work queued on xp->stream so far; on return
   * buf holds the result for the host and for work queued on xp->stream later. Bounded by
   * xp->timeout_s. nccl: ncclAllReduce on its comm stream (NCCL has no custom reduction operator:
   * the decode merge is two of these, tree.c). host-ipc / cuda-ipc: staged through host memory and
   * reduced by MPI (the inner mpi transport); the decode's values are B*T*H*(D+1) floats. */
  da_status_t (*allreduce_dev)(da_xport_t *xp, float *buf, int count, da_xop_t op);
} da_transport_t;

struct da_xport {
  const da_transport_t *t;
  int rank, nranks;
  double timeout_s;   /* every blocking call gives up after this long (> 0) */
  const char *phase;  /* "forward", "backward", "plan": prefixes error messages */
  /* Device transports: the caller's compute stream (a da_dstream_t of t->devapi). An exchange
   * starts after the work queued on it so far (which produced sbuf and last read rbuf);
   * completion (test/wait) means the bytes are in rbuf and sbuf is free again. */
  da_dstream_t stream;
  void *impl;
};

extern const da_transport_t da_transport_mpi;
extern const da_transport_t da_transport_self;
/* ipc.c: cuda-ipc on the CUDA runtime (in the table only when built with it), and the same
 * protocol on the host device table (POSIX shared memory) for tests: "host-ipc". */
extern const da_transport_t da_transport_host_ipc;
#ifdef DA_HAVE_CUDART
extern const da_transport_t da_transport_cuda_ipc;
#endif
/* staged.c: the mpi transport on device memory, every message staged through pinned host
 * buffers: "cuda-mpi" on the CUDA runtime (what `mpi` means in a CUDA context, and the automatic
 * choice where nccl and cuda-ipc cannot serve) and "host-mpi" on the host table (tests). */
extern const da_transport_t da_transport_host_mpi;
#ifdef DA_HAVE_CUDART
extern const da_transport_t da_transport_cuda_mpi;
#endif
#ifdef DA_HAVE_NCCL
/* nccl.c: one rank per GPU. */
extern const da_transport_t da_transport_nccl;
/* The bootstrap alone (no GPU needed): rank 0's ncclGetUniqueId on every rank of mpi_xp (an open
 * mpi transport); bytes must be sizeof(ncclUniqueId). Collective, bounded by the deadline. */
da_status_t da_nccl_unique_id(da_xport_t *mpi_xp, void *id, size_t bytes);
#endif

/* The table named `name` ("mpi", "self"); NULL with an error listing the choices. */
const da_transport_t *da_transport_find(const char *name);
/* The name a context on the GPU (cuda = 1) runs `name` as: "mpi" there is the staged cuda-mpi
 * (tensors live in GPU memory; the host transport cannot read them); any other name, or cuda = 0,
 * unchanged. Names only: a build without the CUDA runtime has no cuda-mpi, and find says so. */
const char *da_transport_resolve(const char *name, int cuda);
/* The transport a CUDA context gets when none is named: cuda-ipc when every rank runs on one
 * node (ranks may share a GPU), else nccl where it is built, else cuda-mpi (staged through host
 * memory: what remains for ranks on different nodes without NCCL). */
const char *da_transport_cuda_default(int single_node);
/* The check of a driver whose buffers are host memory: an unknown name is
 * DA_ERR_INVALID_ARGUMENT (listing the choices), a device transport (t->devapi set)
 * DA_ERR_UNSUPPORTED said in words, rather than an exchange that fails later. `who` prefixes
 * the message. */
da_status_t da_transport_check_host(const char *name, const char *who);

/* The test-only link hook: DISTATTN_TEST_LINK_GBPS (GB/s = 1e9 bytes/s, > 0) and
 * DISTATTN_TEST_LINK_US (microseconds, >= 0) make every exchange of the mpi transport complete
 * no earlier than a link of that bandwidth and latency would allow, so overlap and exposed
 * communication can be measured on a machine whose real links are fast (docs/ring.md). Each
 * rank's link is full duplex and serial per direction: an exchange posted at t starts when the
 * previous one has left the link, occupies it for max(sent, received bytes) / bandwidth and
 * completes a latency later. Only exchanges are slowed, not the control collectives.
 * Returns 1 and fills *gbps (0 = unlimited) and *us when either variable is set, 0 when none is,
 * -1 with an error (DA_ERR_INVALID_ARGUMENT) when a value is malformed. */
int da_test_link(double *gbps, double *us);

/* Open a transport on comm: find + init, with the timeout. */
da_status_t da_xport_open(da_xport_t *xp, const char *name, MPI_Comm comm, double timeout_s);
void da_xport_close(da_xport_t *xp);
/* The timeout of the transport opened last in this process (0 before any): the deadline the
 * `distattn` program also applies to its own collectives (launcher/fault.c). */
double da_xport_deadline(void);
da_status_t da_xport_barrier(da_xport_t *xp);

/* The collectives of a device transport that runs them on an inner mpi transport on the same
 * communicator (cuda-ipc, host-ipc, nccl: the drivers' control words are host memory). Its impl
 * struct starts with that da_xport_t (each such transport static-asserts it); these table members
 * forward to it with the outer phase and timeout, so its errors and deadlines read the same. */
/* Opens that inner transport on comm: impl (allocated by the wrapper, the inner da_xport_t first)
 * becomes xp->impl, and xp takes the inner's rank and size. On failure xp is untouched and impl
 * is the caller's to free. */
da_status_t da_xport_inner_open(da_xport_t *xp, void *impl, MPI_Comm comm);
da_status_t da_xport_inner_allreduce(da_xport_t *xp, void *buf, int count, da_xtype_t type, da_xop_t op);
da_status_t da_xport_inner_allgather(da_xport_t *xp, const void *sbuf, void *rbuf, size_t bytes);
da_status_t da_xport_inner_barrier(da_xport_t *xp);

/* The table of a device transport written once over several device tables (host-ipc / cuda-ipc
 * in ipc.c, host-mpi / cuda-mpi in staged.c: one protocol each, on da_devapi_host for the tests
 * and da_devapi_cuda for the GPU): its functions are PREFIX_exchange_start, PREFIX_test,
 * PREFIX_wait, PREFIX_abort, PREFIX_destroy, PREFIX_register and PREFIX_allreduce_dev, its
 * collectives the inner mpi transport's (da_xport_inner_*); the tables differ only in NAME, INIT
 * (which binds DEVAPI) and DEVAPI. */
#define DA_DEVICE_TRANSPORT(PREFIX, NAME, INIT, DEVAPI) \
  {                                                     \
      .name = (NAME),                                   \
      .init = (INIT),                                   \
      .exchange_start = PREFIX##_exchange_start,        \
      .test = PREFIX##_test,                            \
      .wait = PREFIX##_wait,                            \
      .allreduce = da_xport_inner_allreduce,            \
      .allgather = da_xport_inner_allgather,            \
      .barrier = da_xport_inner_barrier,                \
      .abort = PREFIX##_abort,                          \
      .destroy = PREFIX##_destroy,                      \
      .devapi = (DEVAPI),                               \
      .register_mem = PREFIX##_register,                \
      .allreduce_dev = PREFIX##_allreduce_dev,          \
  }

/* Agree on an outcome: every rank passes its local status and gets back DA_SUCCESS only when
 * every rank succeeded. A rank that failed keeps its own status and message; the others get
 * DA_ERR_REMOTE naming the lowest failing rank and its message ("rank 3 failed: ..."). One small
 * allgather on success; bounded by the timeout, so a vanished peer gives DA_ERR_TIMEOUT. */
da_status_t da_xport_agree(da_xport_t *xp, da_status_t local, const char *what);

/* The wait() of a transport whose test() drives all progress (host-ipc / cuda-ipc,
 * host-mpi / cuda-mpi): test(xp, q) until it reports done, pausing between polls as
 * da_mpi_backoff does, for at most xp->timeout_s. Returns DA_SUCCESS when q completed, test's
 * error when it failed, and at the deadline what stalled(xp, q) returns: the transport's
 * DA_ERR_TIMEOUT naming the peer, the step and what did not finish (only the transport knows its
 * request). q is never released here: freeing it, or aborting it after a failure, stays the
 * caller's. */
da_status_t da_xport_poll(da_xport_t *xp, da_xreq_t *q, da_status_t (*test)(da_xport_t *, da_xreq_t *, int *),
                          da_status_t (*stalled)(da_xport_t *, da_xreq_t *));

/* Poll a nonblocking MPI request until it completes or timeout_s seconds pass: spin, then yield
 * (1 ms), then sleeps of 2 % of the time waited (20 us .. 1 ms), so progress needs no helper thread and an idle rank leaves its core to the
 * others. Returns MPI_SUCCESS with *done = 1 (complete) or *done = 0 (timed out), or the MPI
 * error code. The caller words the failure (it knows the rank, the step and the peer). */
int da_mpi_poll(MPI_Request *r, double timeout_s, int *done);
/* The pause of iteration `iter` of such a polling loop, `waited` seconds in (for loops that poll
 * several requests themselves). */
void da_mpi_backoff(long iter, double waited);

/* MPI_Comm_dup with a deadline: MPI_Comm_idup polled for timeout_s (MPI-3 has no nonblocking
 * split, so communicators are only ever split after a bounded agreement has seen every rank).
 * DA_ERR_TIMEOUT when a rank of parent never joins, "rank R <what>: MPI_Comm_idup did not
 * complete within T s"; the pending handle is then left to MPI (a few bytes kept out of use:
 * MPI may complete the duplicate later and write it). */
da_status_t da_mpi_comm_dup(MPI_Comm parent, double timeout_s, const char *what, MPI_Comm *out);

/* After a setup collective on comm (one of distattn's own duplicates) timed out: a roll call.
 * This rank sends a word to every other rank (tag DA_TAG_ROLLCALL) and listens for theirs for
 * grace_s; the ranks not heard from are the ones that never reached this call. Appends
 * "; rank(s) 2, 5 never reached <what> (no word within G s after the deadline: stopped, hung,
 * or not calling it)" to the current error message and returns DA_ERR_TIMEOUT. Ranks that also
 * timed out are heard from, whenever within grace_s they got there. */
da_status_t da_mpi_rollcall(MPI_Comm comm, double grace_s, const char *what);
/* The grace the setup calls give their roll call (at most their own timeout). */
#define DA_ROLLCALL_GRACE_S 5.0

/* Translate an MPI error code once, at the boundary: DA_ERR_MPI with MPI's own string. */
da_status_t da_mpi_error(int rc, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define DA_MPICHECK(call, ...)                                                   \
  do {                                                                           \
    int da_rc_ = (call);                                                         \
    if (da_rc_ != MPI_SUCCESS) return da_mpi_error(da_rc_, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#ifdef __cplusplus
}
#endif
#endif /* DA_TRANSPORT_H */
