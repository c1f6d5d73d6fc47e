/* offload.h: attention offloading to memory-rich ranks (Lamina, Chen et al. 2024). Every rank of
 * the job is a `compute` or a `memory` rank; each compute rank is paired with a group of memory
 * ranks that hold its sequences' KV cache (sharded in proportion to their memory budgets) and run
 * the decode attention for it: per micro-batch the compute rank broadcasts q and the new token's
 * k, v to its group, the memory ranks append, decode their shards and tree-reduce the fp32
 * (o, lse) partials back to it with the merge as MPI_Op. Several micro-batches may be in flight,
 * so the compute rank's other work overlaps the offloaded attention. Not in include/distattn.h
 * yet (docs/offload.md, "Left open"); the launcher and tests/test_offload.c use it. */
#ifndef DA_OFFLOAD_H
#define DA_OFFLOAD_H

#include <mpi.h> /* before distattn.h: declares the distributed section */
#include <stdint.h>
#include "distattn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum da_role { DA_ROLE_NONE = -1, DA_ROLE_COMPUTE = 0, DA_ROLE_MEMORY = 1 } da_role_t;

typedef struct da_offload_config {
  size_t size;        /* sizeof(da_offload_config_t), set by the initializer */
  unsigned version;   /* DA_API_VERSION */
  int64_t page;       /* tokens per KV page; 0 = 256 */
  int layers;         /* KV caches per sequence (one per model layer); >= 1 */
  int microbatches;   /* requests a compute rank may have in flight (1 .. batch) */
  double mem_budget;  /* bytes of KV cache this rank may hold; 0 = discovered (sysinfo: free +
                         buffer memory, shared by the ranks of the node); memory ranks get shards
                         in proportion to it */
  double timeout;     /* seconds a rank waits for a peer; 0 = DISTATTN_TIMEOUT or 300 */
} da_offload_config_t;

#define DA_OFFLOAD_CONFIG_INITIALIZER { sizeof(da_offload_config_t), DA_API_VERSION, 0, 1, 1, 0.0, 0.0 }

typedef struct da_offload da_offload_t;

/* Split `world` by role and pair the ranks: compute ranks (in rank order) c = 0..nc-1 each get the
 * memory ranks m with floor(m * nc / nm) == c (groups differ by at most one rank; nm >= nc >= 1).
 * prob: batch = sequences PER COMPUTE RANK, heads, kv_heads, dim, dtype (the same everywhere).
 * A rank with role DA_ROLE_NONE, a job without compute or with fewer memory than compute ranks,
 * or ranks disagreeing on the problem: the same error on every rank. Collective over world. */
da_status_t da_offload_create(da_context_t *ctx, MPI_Comm world, da_role_t role, const da_problem_t *prob,
                              const da_offload_config_t *cfg, da_offload_t **out);
/* Collective over world; a compute rank must have called da_offload_stop first. */
void da_offload_free(da_offload_t *off);

typedef struct da_offload_info {
  da_role_t role;
  int group, ngroups;          /* this rank's group = index of its compute rank */
  int ncompute, nmemory;       /* in the job */
  int group_memory;            /* memory ranks in this group */
  int index;                   /* memory ranks: index within the group's memory ranks; compute: -1 */
  int compute_world_rank;      /* the world rank of this group's compute rank */
  double budget;               /* this rank's memory budget in bytes */
  double share;                /* memory ranks: budget / sum of the group's budgets */
  int discovered;              /* the budget came from sysinfo, not the config */
} da_offload_info_t;
da_status_t da_offload_get_info(const da_offload_t *off, da_offload_info_t *info);

/* Memory ranks: the group's cache (batch = layers * B, cache sequence l * B + b holds layer l of
 * the compute rank's sequence b), to prefill with da_kvcache_prefill (collective over the group's
 * memory ranks) and da_kvcache_get_page. NULL on compute ranks. */
da_kvcache_t *da_offload_cache(da_offload_t *off);

/* Will the cache fit? final_len[B] (the same on every rank) = the longest each sequence will get.
 * Every memory rank's projected shard (its share of layers * sum(final_len) rows, plus a page per
 * cache sequence) must fit its budget: otherwise DA_ERR_OUT_OF_MEMORY on every rank, naming the
 * rank, the bytes and the budget. *max_shard (may be NULL) = the largest projection. Collective. */
da_status_t da_offload_check_fit(da_offload_t *off, const int64_t *final_len, double *max_shard);

/* KV bytes of B sequences of final_len tokens over `layers` layers: what one rank would hold
 * without offload. */
double da_offload_kv_bytes(const da_problem_t *prob, int layers, const int64_t *final_len);

/* ---- compute ranks ----
 * Start the attention of layer `layer` for sequences first .. first + n - 1 (n <= the largest
 * micro-batch, ceil(B / microbatches)): q is [n][H][D], k and v [n][G][D] (contiguous, prob
 * dtype): the new token of each sequence, at position len (appended before the decode). Returns a
 * slot (< microbatches) to wait on; fails if every slot is in flight. */
da_status_t da_offload_start(da_offload_t *off, int layer, int64_t first, int64_t n, const void *q, const void *k,
                             const void *v, int *slot);
/* Drive progress of the requests in flight (call it between chunks of other work). */
void da_offload_progress(da_offload_t *off);
/* Wait for a slot: out [n][H][D] (prob dtype) and lse [n][H] (fp32, may be NULL). A memory rank
 * that failed poisons the result: DA_ERR_REMOTE; one that does not answer: DA_ERR_TIMEOUT. */
da_status_t da_offload_wait(da_offload_t *off, int slot, void *out, float *lse);
/* Tell the group's memory ranks to leave da_offload_serve (nothing may be in flight). */
da_status_t da_offload_stop(da_offload_t *off);

/* ---- memory ranks ----
 * Serve the group's compute rank until it stops: receive, append, decode, reduce. */
da_status_t da_offload_serve(da_offload_t *off);

/* Figures. Compute ranks: of the last da_offload_wait; memory ranks: totals over serve. Times on
 * the compute rank's clock (memory clocks are offset by a ping-pong at create). */
typedef struct da_offload_stats {
  double send_s;      /* compute: post of the broadcast until the last memory rank holds it */
  double attn_s;      /* compute: from then until the slowest memory rank's partials are ready
                         (append + decode on that rank, plus its wait for the message) */
  double reduce_s;    /* compute: from then until the merged partials are on the compute rank */
  double recv_s;      /* compute: unpacking the merged partials into out and lse */
  double total_s;     /* compute: post .. wait returned */
  uint64_t net_bytes; /* bytes on the network for the request: broadcast (group_memory copies of
                         the message) + the binomial reduction (group_memory partial messages) */
  uint64_t kv_bytes;  /* KV bytes the memory ranks' kernels read for it (summed over the group) */
  uint64_t requests;  /* memory: requests served */
  double kernel_s;    /* memory: time in append + decode, summed */
} da_offload_stats_t;
da_status_t da_offload_get_stats(const da_offload_t *off, da_offload_stats_t *st);

#ifdef __cplusplus
}
#endif
#endif /* DA_OFFLOAD_H */
