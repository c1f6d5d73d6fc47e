/* kvcache.h: the distributed paged KV cache as the decode drivers of comm/ (tree.c) see it: the
 * sequences, their page lists on this rank (in the kernel's da_kvpage_t form) and the shard map
 * every rank replays identically. Also the small helpers the cache and the decode plan share
 * (agreement on a problem, the da_comm_t accessors). Internal to comm/; the public calls are the
 * da_kvcache_* functions of include/distattn.h. */
#ifndef DA_KVCACHE_H
#define DA_KVCACHE_H

#include "transport.h" /* first: mpi.h before distattn.h declares the distributed API */
#include "kernels.h"
#include "kvmap.h"
#include "dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One sequence. Every rank tracks the length and the per-rank token counts (the shard map needs
 * them); only the owner of a page holds its rows. */
typedef struct da_kvseq {
  int64_t len;        /* tokens in the sequence */
  int64_t prefill;    /* L0: tokens placed by the prefill layout */
  int64_t *tokens;    /* [P] tokens held by each rank */
  int owner;          /* rank filling the current append page; -1 before the first one */
  /* this rank's pages, in local row order: */
  int64_t npages, cap;
  da_kvpage_t *pages; /* positions and row pointers, as the kernel's decode takes them */
  char **mem;         /* [npages] allocation of each page: cap rows of k, then cap rows of v */
  int64_t *pcap;      /* [npages] rows each page can hold */
  int64_t cur;        /* local page receiving this rank's appended rows, -1 when none */
  int64_t rows;       /* rows held here */
} da_kvseq_t;

struct da_kvcache {
  da_context_t *ctx;
  MPI_Comm mcomm; /* the cache's own duplicate of the caller's communicator */
  da_xport_t xp;  /* control collectives (agreement) */
  int rank, P;
  int64_t B;
  int G, D;
  da_dtype_t dtype;
  size_t esz;        /* bytes per element */
  size_t row_bytes;  /* one k (or v) row: G * D * esz */
  int64_t page;
  da_algo_t layout;
  da_kvmap_t map;
  da_kvseq_t *seq;   /* [B] */
  size_t alloc_bytes; /* page memory allocated on this rank */
  int broken;        /* an append failed half-way: the shards no longer agree across ranks */
  /* Pages in device memory (the config's device transport): its table and a stream that orders
   * the copies of rows into them; NULL: host memory (da_malloc). */
  const da_devapi_t *dev;
  da_dstream_t dstream;
  char *rowbuf;      /* dev: one row staged in host memory before its copy */
  char transport[16];
  /* The deferred check of the appended counts (issue 19, class 4): every rank replays the shard map
   * from the counts it was given, so ranks given different counts would hold maps that silently
   * disagree. Each append starts a nonblocking allreduce of this rank's running state (appends, a
   * hash of every count, tokens, a failure flag) on ccomm; the next append or decode step completes
   * it (bounded by the cache's timeout) after its own work, so the check costs no collective latency
   * on the decode path. A disagreement is then DA_ERR_MISMATCH on every rank, naming the ranks and
   * their counts, one call late; the cache stays refused after that (chk_st). */
  MPI_Comm ccomm;       /* private duplicate: the check's collectives never meet the agreement's */
  MPI_Request creq;     /* the check in flight, MPI_REQUEST_NULL when none */
  int64_t *cbuf;        /* [2 * DA_KVCHECK_WORDS] sent, then received; heap: a timed-out check leaves it to MPI */
  int64_t nappend;      /* appends so far (each started one check) */
  uint64_t chash;       /* running FNV-1a hash of every append's counts, in order */
  int64_t ctotal;       /* tokens appended so far, all sequences */
  int64_t clast[1 + 4]; /* the last append: its tokens, then its first counts (for the message) */
  int cfailed;          /* the last append failed on this rank (its counts did not all go in) */
  da_status_t chk_st;   /* sticky: DA_ERR_MISMATCH (ranks disagreed), DA_ERR_TIMEOUT (a check never came back) */
  int64_t chk_at;       /* the append whose check failed */
};

/* Words of one rank's contribution to the count check (each sent as v and -v under MPI_MAX). */
#define DA_KVCHECK_WORDS 4

/* Complete the count check of the last append, if one is in flight (local wait, bounded by the
 * cache's timeout; every rank reaches it at the same point of its calls). DA_SUCCESS when the ranks
 * agreed; DA_ERR_MISMATCH on every rank naming the ranks and their counts when not (one small
 * allgather, on that path only); DA_ERR_TIMEOUT when the check did not come back. A failure is
 * sticky: later calls on the cache return it again. fn names the calling function. */
da_status_t da_kvcache_check_finish(da_kvcache_t *c, const char *fn);

/* Accessors of da_comm_t (defined in plan.c, which owns the struct). */
da_context_t *da_comm_context(const da_comm_t *c);
MPI_Comm da_comm_mpi(const da_comm_t *c);

/* Every rank passes n int64 fields; DA_ERR_MISMATCH on every rank (naming the fields, their value
 * here and the range over ranks) when any differs. One allreduce of 2n values. names[i] labels
 * field i; a name starting with '#' is a hash (printed as "differ"). */
da_status_t da_agree_fields(da_xport_t *xp, const int64_t *f, int n, const char *const *names, const char *what);
/* The comparison behind da_agree_fields, for a caller that words its own error: the same allreduce;
 * *bad = 1 and msg (cap bytes) lists the differing fields when any differs. Fails only when the
 * allreduce (or its buffer) does; what names the agreement in that message. */
da_status_t da_fields_compare(da_xport_t *xp, const int64_t *f, int n, const char *const *names, const char *what,
                              char *msg, size_t cap, int *bad);

/* FNV-1a, for hashing arrays into one agreed field. */
uint64_t da_fnv1a(uint64_t h, const void *p, size_t n);
#define DA_FNV_INIT 14695981039346656037ull

/* Tokens per KV page when a config says 0. */
#define DA_KVCACHE_DEFAULT_PAGE 256

/* The timeout every comm/ object uses when its config says 0: DISTATTN_TIMEOUT or 300 s. */
double da_comm_default_timeout(void);

/* The opening every create call on a communicator shares (kv cache, decode plan, offload):
 * comm and out must be given (the errors name the call fn), *out is cleared, and a zeroed object
 * of `bytes` is allocated (`what` names it if memory runs out). Returns the object and its
 * context in *ctx, or NULL with the failure in *st (recorded as the context's last error). */
/* The bounded duplicate such an object takes of comm: the timeout it asked for (> 0 and finite,
 * else da_comm_default_timeout) into *timeout, MPI_Comm_dup within it, and on a timeout the roll
 * call that names the ranks that never came (errors name the call fn). */
da_status_t da_comm_dup_bounded(const da_comm_t *comm, double requested, const char *fn, MPI_Comm *out,
                                double *timeout);
void *da_comm_create_begin(da_comm_t *comm, void **out, const char *fn, size_t bytes, const char *what,
                           da_context_t **ctx, da_status_t *st);

/* ---- the (o, lse) merge as an MPI operator (tree.c; used by the tree decode and the offload) -----
 * A row is D values of o and its lse: D + 1 floats; the datatype's size gives D. Two lse payloads
 * carry meaning: DA_LSE_POISON marks the rows of a rank that failed before the reduction (it still
 * takes part, so nobody waits for it; the operator keeps it sticky, so every rank that receives
 * the result knows a partial was missing; an ordinary NaN from NaN inputs is data, not failure);
 * DA_LSE_TRAILER marks a trailer row of counters (offload timings, DA_TRAILER_*), merged by max,
 * except DA_TRAILER_KV_BYTES, which is summed. */
#define DA_LSE_POISON 0x7fc0d1e5u
#define DA_LSE_TRAILER 0x7fc07a11u
/* The trailer row's o values: seconds after the request was posted (compute rank's clock) at which
 * the request reached a memory rank and its partials were ready (the latest over memory ranks), and
 * the KV bytes the memory ranks read (their sum). Values past these are -inf. */
enum { DA_TRAILER_ARRIVED = 0, DA_TRAILER_READY = 1, DA_TRAILER_KV_BYTES = 2 };
static inline int da_lse_is(float x, uint32_t bits) { return da_f32_to_bits(x) == bits; }
void da_partial_merge_op(void *in, void *inout, int *len, MPI_Datatype *dt);

#ifdef __cplusplus
}
#endif
#endif /* DA_KVCACHE_H */
