/* devmem.c: allocation accounting for the device tables of devapi.h: wrappers around
 * d->alloc / d->free (device memory) and d->host_alloc / d->host_free (pinned host memory) that
 * remember each live allocation's size, so the current and peak bytes of this process can be
 * reported, each kind apart. Not a pool and no policy: the table allocates. */
#include <pthread.h>
#include <stdlib.h>
#include "devapi.h"

typedef struct {
  void *ptr;
  size_t bytes;
} live_t;

/* One ledger per kind of memory. */
typedef struct {
  live_t *live;
  size_t nlive, caplive;
  uint64_t cur_bytes, peak_bytes;
} ledger_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static ledger_t dev_ledger, pinned_ledger;

/* Room for one more entry (lock held); 0 when the table cannot grow. */
static int ledger_room(ledger_t *g) {
  if (g->nlive < g->caplive) return 1;
  size_t cap = g->caplive ? 2 * g->caplive : 32;
  live_t *n = realloc(g->live, cap * sizeof *n);
  if (!n) return 0;
  g->live = n, g->caplive = cap;
  return 1;
}

/* alloc / release: the table's pair for this kind. */
static da_status_t ledger_alloc(ledger_t *g, da_status_t (*alloc)(void **, size_t), void (*release)(void *),
                                void **ptr, size_t bytes, const char *what) {
  *ptr = NULL;
  pthread_mutex_lock(&lock);
  int room = ledger_room(g); /* grow first: an allocation we could not record would be lost */
  pthread_mutex_unlock(&lock);
  if (!room) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s allocation table", what);
  DA_CHECK(alloc(ptr, bytes));
  pthread_mutex_lock(&lock);
  if (!ledger_room(g)) { /* another thread took the slot meanwhile and the table cannot grow */
    pthread_mutex_unlock(&lock);
    (release)(*ptr); /* parenthesized: SMPI defines free() as a macro */
    *ptr = NULL;
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s allocation table", what);
  }
  g->live[g->nlive++] = (live_t){*ptr, bytes};
  g->cur_bytes += bytes;
  if (g->cur_bytes > g->peak_bytes) g->peak_bytes = g->cur_bytes;
  pthread_mutex_unlock(&lock);
  return DA_SUCCESS;
}

static void ledger_free(ledger_t *g, void (*release)(void *), void *ptr) {
  if (!ptr) return;
  pthread_mutex_lock(&lock);
  for (size_t i = 0; i < g->nlive; i++)
    if (g->live[i].ptr == ptr) {
      g->cur_bytes -= g->live[i].bytes;
      g->live[i] = g->live[--g->nlive];
      break;
    }
  pthread_mutex_unlock(&lock);
  (release)(ptr);
}

static void ledger_stats(const ledger_t *g, uint64_t *current, uint64_t *peak) {
  pthread_mutex_lock(&lock);
  if (current) *current = g->cur_bytes;
  if (peak) *peak = g->peak_bytes;
  pthread_mutex_unlock(&lock);
}

da_status_t da_dev_alloc(const da_devapi_t *d, void **ptr, size_t bytes) {
  return ledger_alloc(&dev_ledger, d->alloc, d->free, ptr, bytes, "device");
}

void da_dev_free(const da_devapi_t *d, void *ptr) { ledger_free(&dev_ledger, d->free, ptr); }

void da_dev_mem_stats(uint64_t *current, uint64_t *peak) { ledger_stats(&dev_ledger, current, peak); }

da_status_t da_dev_host_alloc(const da_devapi_t *d, void **ptr, size_t bytes) {
  if (!d->host_alloc) {
    *ptr = NULL;
    return DA_ERR(DA_ERR_UNSUPPORTED, "the %s device table has no pinned host memory", d->name);
  }
  return ledger_alloc(&pinned_ledger, d->host_alloc, d->host_free, ptr, bytes, "pinned host");
}

void da_dev_host_free(const da_devapi_t *d, void *ptr) {
  if (ptr) ledger_free(&pinned_ledger, d->host_free, ptr);
}

void da_dev_pinned_stats(uint64_t *current, uint64_t *peak) { ledger_stats(&pinned_ledger, current, peak); }
