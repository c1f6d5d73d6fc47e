/* sim_alloc.c: da_malloc / da_calloc / da_free of the SMPI build. Payload-sized blocks (at least
 * DISTATTN_SIM_SHARED_BYTES, default 256 KiB) come from SMPI_PARTIAL_SHARED_MALLOC: every rank's
 * buffers alias the same physical pages, so 1024 simulated ranks of 100 MB each fit in a few
 * hundred MB; their contents are garbage, which the sim kernels never read. The first page of
 * each block stays private and holds the header da_free needs. Smaller blocks (metadata) are
 * ordinary private memory (core/util.c, renamed da_host_* in this build). The layers that build
 * metadata large enough to cross the threshold (partition/) are compiled against da_host_*. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <smpi/smpi.h>
#include "core.h"

void *da_host_malloc(size_t bytes, size_t align);
void *da_host_calloc(size_t bytes, size_t align);
void da_host_free(void *p);

#define PAGE ((size_t)4096)
#define MAGIC 0x5349u

typedef struct {
  void *base;
  size_t bytes;
  unsigned magic;
} sim_hdr_t;

static size_t threshold(void) {
  static size_t t;
  if (!t) {
    const char *s = getenv("DISTATTN_SIM_SHARED_BYTES");
    t = s && *s ? (size_t)strtoull(s, NULL, 0) : (size_t)256 << 10;
    if (!t) t = 1;
  }
  return t;
}

void *da_malloc(size_t bytes, size_t align) {
  if (bytes < threshold() || align > PAGE) return da_host_malloc(bytes, align);
  size_t total = PAGE + (bytes + PAGE - 1) / PAGE * PAGE;
  size_t off[2] = {PAGE, total};
  char *base = smpi_shared_malloc_partial(total, off, 1);
  if (!base) return NULL;
  sim_hdr_t *h = (sim_hdr_t *)(base + PAGE - sizeof(sim_hdr_t));
  h->base = base, h->bytes = bytes, h->magic = MAGIC;
  return base + PAGE;
}

void *da_calloc(size_t bytes, size_t align) {
  /* Shared payload is not cleared: its contents mean nothing and clearing 1024 ranks' buffers
   * would cost the host minutes. */
  if (bytes < threshold() || align > PAGE) return da_host_calloc(bytes, align);
  return da_malloc(bytes, align);
}

void da_free(void *p) {
  if (!p) return;
  if (((uintptr_t)p & (PAGE - 1)) == 0) {
    sim_hdr_t *h = (sim_hdr_t *)((char *)p - sizeof(sim_hdr_t));
    if (h->magic == MAGIC && (char *)h->base + PAGE == (char *)p) {
      h->magic = 0;
      smpi_shared_free(h->base);
      return;
    }
  }
  da_host_free(p);
}

/* core/log.c's lock in this build (sim/Makefile): a no-op, ranks take turns in one thread. */
int da_sim_mutex_noop(pthread_mutex_t *m) {
  (void)m;
  return 0;
}
