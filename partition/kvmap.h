/* kvmap.h: the shard map of the distributed paged KV cache (comm/kvcache.c): which rank stores
 * which positions of a sequence. A prefix of L0 tokens (the prefill) is laid out by a partition
 * layout; tokens appended afterwards go in pages of `page` consecutive positions, each page to one
 * rank chosen from the per-rank token counts, so shards stay balanced (equal weights: sizes never
 * differ by more than one page) or proportional to capacity weights. Pure functions: no MPI, no
 * memory of its own beyond the copied weights; every rank computes the same answer. */
#ifndef DA_KVMAP_H
#define DA_KVMAP_H

#include <stdint.h>
#include "partition.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct da_kvmap {
  int nranks;            /* P >= 1 */
  int64_t page;          /* tokens per page >= 1 */
  da_layout_kind_t kind; /* prefill layout; DA_LAYOUT_WEIGHTED when weights were given */
  int weighted;          /* 0: equal shares */
  double *share;         /* [P] w_r / sum(w), summing to 1 (copied; equal shares 1/P) */
  double *weights;       /* [P] the caller's weights (copied), NULL when equal */
} da_kvmap_t;

/* kind: the prefill layout (contiguous, striped, zigzag); ignored when weights != NULL (then
 * the prefill is DA_LAYOUT_WEIGHTED and appended pages follow the weights). Weights must be
 * positive and finite. */
da_status_t da_kvmap_init(da_kvmap_t *m, int nranks, int64_t page, da_layout_kind_t kind, const double *weights);
void da_kvmap_free(da_kvmap_t *m);

/* The prefill layout of L0 >= 1 tokens (the caller frees it with da_layout_free). */
da_status_t da_kvmap_prefill_layout(const da_kvmap_t *m, int64_t L0, da_layout_t *L);

/* Owner of the append page that starts when the sequence holds len tokens, tokens[r] of them on
 * rank r (sum = len). Equal weights: the rank holding the fewest tokens (ties: lowest rank), so
 * shards never differ by more than one page. Weighted: earliest-deadline-first on the deficits
 * d_r = share_r * len - tokens_r, i.e. among the ranks that would not run ahead of their quota by
 * a page or more, the one that would fall a page behind first; this keeps every rank within one
 * page of its quota (the Pfair argument: unit jobs with windows [floor((k-1)/s), ceil(k/s)) and
 * total density 1 are all met by EDF on one processor). */
int da_kvmap_next_owner(const da_kvmap_t *m, const int64_t *tokens, int64_t len);

/* Replay a sequence of prefill L0 grown to len tokens: tokens[P] held per rank at the end and, when
 * owners != NULL, the owner of each of the ceil((len - L0) / page) append pages. O(pages * P). */
da_status_t da_kvmap_replay(const da_kvmap_t *m, int64_t L0, int64_t len, int64_t *tokens, int *owners);

/* Owner rank of position pos (0 <= pos < len) of a sequence (L0, len), given the append-page owners
 * from da_kvmap_replay. */
int da_kvmap_owner(const da_kvmap_t *m, const da_layout_t *prefill, int64_t L0, const int *owners, int64_t pos);

/* The balance invariant for token counts of a sequence (L0, len): counts sum to len; equal weights:
 * max - min <= page (the prefill layouts differ by at most one token); weighted:
 * |tokens_r - share_r * len| <= page + 1 for every rank (one page from the appends, one token from
 * the prefill's rounding). DA_ERR_INTERNAL with the offending rank otherwise. */
da_status_t da_kvmap_check(const da_kvmap_t *m, int64_t L0, int64_t len, const int64_t *tokens);

#ifdef __cplusplus
}
#endif
#endif /* DA_KVMAP_H */
