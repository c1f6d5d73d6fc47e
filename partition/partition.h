/* partition.h: token layouts (which global positions each rank owns), ring block schedules (which
 * block pairs each rank computes at each step, with empty pairs skipped) and their invariant
 * checker. Pure functions: no MPI, no CUDA, no kernels. */
#ifndef DA_PARTITION_H
#define DA_PARTITION_H

#include <stdint.h>
#include "core.h"
#include "mask.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum da_layout_kind {
  DA_LAYOUT_CONTIGUOUS = 0, /* Ring Attention: rank r owns one run of ~S/P tokens */
  DA_LAYOUT_STRIPED = 1,    /* Striped Attention: token i on rank i mod P */
  DA_LAYOUT_ZIGZAG = 2,     /* 2P chunks; rank r owns chunks r and 2P-1-r */
  DA_LAYOUT_WEIGHTED = 3,   /* one run per rank, length proportional to weights[r] */
} da_layout_kind_t;

#define DA_LAYOUT_MAX_SEGS 2

typedef struct da_layout {
  da_layout_kind_t kind;
  int64_t seq;            /* S >= 1 */
  int nranks;             /* P >= 1 */
  const double *weights;  /* [P] positive, for DA_LAYOUT_WEIGHTED only (copied by init) */
  /* filled by da_layout_init: */
  int64_t *counts;        /* [P] tokens per rank */
  int64_t *starts;        /* [P] weighted/contiguous: first position per rank */
} da_layout_t;

da_status_t da_layout_init(da_layout_t *L, da_layout_kind_t kind, int64_t seq, int nranks,
                           const double *weights);
void da_layout_free(da_layout_t *L);
const char *da_layout_name(da_layout_kind_t kind);
/* Parse "ring"/"contiguous", "striped", "zigzag", "weighted"; -1 if unknown. */
int da_layout_parse(const char *s);

/* Rank r's positions as up to DA_LAYOUT_MAX_SEGS increasing spans; local row order is segment
 * order, then position order. Returns the number of segments (0 when the rank owns nothing). */
int da_layout_segments(const da_layout_t *L, int r, da_span_t segs[DA_LAYOUT_MAX_SEGS]);
int64_t da_layout_count(const da_layout_t *L, int r);
int64_t da_layout_max_count(const da_layout_t *L);
/* Owner rank of global position pos, and its local row there. */
int da_layout_owner(const da_layout_t *L, int64_t pos, int64_t *local_row);
/* Every position owned exactly once, counts consistent, shards balanced. */
da_status_t da_layout_check(const da_layout_t *L);

/* One unit of work: the Q rows of one local segment against a sub-block of the KV rows that
 * travel in step s (KV of rank src = (r - s) mod P). Offsets are local row indices. */
typedef struct da_work_item {
  int qseg, kseg;
  int64_t q_off;          /* first local Q row */
  da_span_t q;            /* its global positions */
  int64_t k_off;          /* first row within the travelling KV block */
  da_span_t k;            /* their global positions */
  int64_t pairs;          /* allowed (q, k) pairs: useful work */
  da_tile_class_t cls;    /* PARTIAL or FULL (EMPTY items are not listed) */
} da_work_item_t;

typedef struct da_schedule {
  int nranks, nsteps;     /* nsteps == P for the ring */
  int64_t block;          /* KV sub-block length in tokens */
  /* items of (rank r, step s): items + first[r * nsteps + s], count n[r * nsteps + s] */
  da_work_item_t *items;
  int64_t *first, *n;
  int64_t *work;          /* [P][nsteps] allowed pairs */
} da_schedule_t;

/* Ring schedule for layout L and mask m; KV blocks split into sub-blocks of `block` tokens
 * (block == 0: whole segments; block < 0 is DA_ERR_INVALID_ARGUMENT). */
da_status_t da_schedule_ring(const da_layout_t *L, const da_mask_t *m, int64_t block,
                             da_schedule_t *S);
void da_schedule_free(da_schedule_t *S);
static inline const da_work_item_t *da_schedule_items(const da_schedule_t *S, int r, int s,
                                                      int64_t *n) {
  int64_t i = (int64_t)r * S->nsteps + s;
  *n = S->n[i];
  return S->items + S->first[i];
}
/* Source rank of the KV block rank r holds at step s. */
static inline int da_ring_src(int r, int s, int P) { return ((r - s) % P + P) % P; }
/* Total work of rank r, and max over ranks / mean over ranks. */
int64_t da_schedule_rank_work(const da_schedule_t *S, int r);
double da_schedule_imbalance(const da_schedule_t *S);

/* The invariant checker every test calls: every item lies inside its ranks' shards, no item is
 * empty, items of one (rank, step) do not overlap, and the pairs over all items equal the allowed
 * pairs of the whole S x S problem, counted independently. */
da_status_t da_schedule_check(const da_schedule_t *S, const da_layout_t *L, const da_mask_t *m);

#ifdef __cplusplus
}
#endif
#endif /* DA_PARTITION_H */
