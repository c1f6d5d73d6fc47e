/* devmem.c: allocation accounting for the device tables of devapi.h: one wrapper around
 * d->alloc / d->free that remembers each live allocation's size, so the current and peak device
 * bytes of this process can be reported. Not a pool and no policy: the table allocates. */
#include <pthread.h>
#include <stdlib.h>
#include "devapi.h"

typedef struct {
  void *ptr;
  size_t bytes;
} live_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static live_t *live;
static size_t nlive, caplive;
static uint64_t cur_bytes, peak_bytes;

da_status_t da_dev_alloc(const da_devapi_t *d, void **ptr, size_t bytes) {
  *ptr = NULL;
  pthread_mutex_lock(&lock);
  int room = 1;
  if (nlive == caplive) { /* grow first: an allocation we could not record would be lost */
    size_t cap = caplive ? 2 * caplive : 32;
    live_t *n = realloc(live, cap * sizeof *n);
    if (n) live = n, caplive = cap;
    else room = 0;
  }
  pthread_mutex_unlock(&lock);
  if (!room) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "device allocation table");
  DA_CHECK(d->alloc(ptr, bytes));
  pthread_mutex_lock(&lock);
  if (nlive == caplive) { /* another thread took the slot meanwhile */
    size_t cap = 2 * caplive;
    live_t *n = realloc(live, cap * sizeof *n);
    if (!n) {
      pthread_mutex_unlock(&lock);
      (d->free)(*ptr); /* parenthesized: SMPI defines free() as a macro */
      *ptr = NULL;
      return DA_ERR(DA_ERR_OUT_OF_MEMORY, "device allocation table");
    }
    live = n, caplive = cap;
  }
  live[nlive++] = (live_t){*ptr, bytes};
  cur_bytes += bytes;
  if (cur_bytes > peak_bytes) peak_bytes = cur_bytes;
  pthread_mutex_unlock(&lock);
  return DA_SUCCESS;
}

void da_dev_free(const da_devapi_t *d, void *ptr) {
  if (!ptr) return;
  pthread_mutex_lock(&lock);
  for (size_t i = 0; i < nlive; i++)
    if (live[i].ptr == ptr) {
      cur_bytes -= live[i].bytes;
      live[i] = live[--nlive];
      break;
    }
  pthread_mutex_unlock(&lock);
  (d->free)(ptr);
}

void da_dev_mem_stats(uint64_t *current, uint64_t *peak) {
  pthread_mutex_lock(&lock);
  if (current) *current = cur_bytes;
  if (peak) *peak = peak_bytes;
  pthread_mutex_unlock(&lock);
}
