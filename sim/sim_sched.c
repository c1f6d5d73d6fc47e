/* sim_sched.c: memoized ring schedules for the SMPI build. Every rank of a plan builds the same
 * schedule of all P ranks (P^2 block pairs: 370 MB and a billion items' work summed over 1024
 * simulated ranks); here the first rank builds it (partition/schedule.c, compiled as
 * da_schedule_*_host) and the others share it read-only, reference-counted. Safe because SMPI
 * runs the ranks one at a time in one process with privatization off (sim/Makefile), and the
 * schedule is a pure function of (layout, mask, block). */
#include <stdlib.h>
#include <string.h>
#include "partition.h"

da_status_t da_schedule_ring_host(const da_layout_t *L, const da_mask_t *m, int64_t block, da_schedule_t *S);
void da_schedule_free_host(da_schedule_t *S);

typedef struct {
  int kind, nranks;
  int64_t seq, block, window, ndocs;
  unsigned flags;
  uint64_t cu_hash;
  da_schedule_t s;
  int refs;
} memo_t;

#define MEMO_MAX 16
static memo_t memo[MEMO_MAX];

static uint64_t cu_hash(const da_mask_t *m) {
  uint64_t h = 1469598103934665603ull;
  if (m->flags & DA_MASK_DOC)
    for (int64_t i = 0; i <= m->ndocs; i++) h = (h ^ (uint64_t)m->cu_seqlens[i]) * 1099511628211ull;
  return h;
}

da_status_t da_schedule_ring(const da_layout_t *L, const da_mask_t *m, int64_t block, da_schedule_t *S) {
  if (!L || !m || !S || L->kind == DA_LAYOUT_WEIGHTED) return da_schedule_ring_host(L, m, block, S);
  memo_t key = {(int)L->kind, L->nranks, L->seq, block, m->window, m->ndocs, m->flags, cu_hash(m), {0}, 0};
  int freeslot = -1;
  for (int i = 0; i < MEMO_MAX; i++) {
    memo_t *e = &memo[i];
    if (!e->refs) {
      if (freeslot < 0) freeslot = i;
      continue;
    }
    if (e->kind == key.kind && e->nranks == key.nranks && e->seq == key.seq && e->block == key.block &&
        e->window == key.window && e->ndocs == key.ndocs && e->flags == key.flags && e->cu_hash == key.cu_hash) {
      e->refs++;
      *S = e->s;
      return DA_SUCCESS;
    }
  }
  DA_CHECK(da_schedule_ring_host(L, m, block, S));
  if (freeslot >= 0) {
    key.s = *S;
    key.refs = 1;
    memo[freeslot] = key;
  }
  return DA_SUCCESS;
}

void da_schedule_free(da_schedule_t *S) {
  if (!S) return;
  for (int i = 0; i < MEMO_MAX; i++)
    if (memo[i].refs && S->items == memo[i].s.items && S->n == memo[i].s.n) {
      if (--memo[i].refs == 0) da_schedule_free_host(&memo[i].s);
      memset(S, 0, sizeof *S);
      return;
    }
  da_schedule_free_host(S);
}
