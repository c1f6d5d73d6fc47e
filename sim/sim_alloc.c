/* sim_alloc.c: da_malloc / da_calloc / da_free of the SMPI build, and the message copy hook.
 * Payload-sized blocks (at least DISTATTN_SIM_SHARED_BYTES, default 256 KiB) all alias the start
 * of one arena of address space that nothing ever touches: the sim kernels read no payload, the
 * drivers' host payload work is charged, not done (da_payload, sim.h), and the copy hook below
 * drops messages whose buffer is in the arena. So 1024 simulated ranks of a GB each cost no
 * memory, no page faults and no copies. (SMPI_SHARED_MALLOC, used before, maps its blocks with
 * MAP_POPULATE from a file in /tmp: page tables for every GB of every rank, and every write a
 * file-backed fault; that was most of the host time of a point.) Smaller blocks (metadata, tree
 * decode's partials, agreement messages) are ordinary private memory (core/util.c, renamed
 * da_host_* in this build) and their messages are copied as usual. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <smpi/smpi.h>
#include "core.h"
#include "sim.h"

void *da_host_malloc(size_t bytes, size_t align);
void *da_host_calloc(size_t bytes, size_t align);
void da_host_free(void *p);

/* Address space only (MAP_NORESERVE, never written): the largest payload block any point asks
 * for, with room to spare. */
#define ARENA ((size_t)1 << 40)
static char *arena;

static size_t threshold(void) {
  static size_t t;
  if (!t) {
    const char *s = getenv("DISTATTN_SIM_SHARED_BYTES");
    t = s && *s ? (size_t)strtoull(s, NULL, 0) : (size_t)256 << 10;
    if (!t) t = 1;
  }
  return t;
}

static int in_arena(const void *p) { return arena && (const char *)p >= arena && (const char *)p < arena + ARENA; }

void *da_malloc(size_t bytes, size_t align) {
  if (bytes < threshold() || align > 4096) return da_host_malloc(bytes, align);
  if (bytes > ARENA) return NULL;
  if (!arena) { /* ranks take turns in one thread: no race */
    void *a = mmap(NULL, ARENA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) return NULL;
    arena = a;
  }
  return arena;
}

void *da_calloc(size_t bytes, size_t align) {
  /* Arena payload is not cleared: its contents mean nothing and nothing reads them. */
  if (bytes < threshold() || align > 4096) return da_host_calloc(bytes, align);
  return da_malloc(bytes, align);
}

void da_free(void *p) {
  if (p && !in_arena(p)) da_host_free(p);
}

/* SMPI's copy of a message's bytes at delivery, replaced: a message sent from the arena carries
 * no data and is dropped (its simulated transfer time is unchanged: that is the network model's);
 * any other message is copied by SMPI's own callback. `buff` is the sender's buffer, or SMPI's
 * detached copy of a small send. smpi_comm_copy_data_callback is SMPI's current callback (a C++
 * global, so unmangled; smpi.h declares only its setter). */
extern void (*smpi_comm_copy_data_callback)(smx_activity_t, void *, size_t);
static void (*smpi_copy)(smx_activity_t, void *, size_t);

static void copy_hook(smx_activity_t comm, void *buff, size_t bytes) {
  if (in_arena(buff)) return;
  smpi_copy(comm, buff, bytes);
}

void da_sim_copy_hook_install(void) {
  if (smpi_copy) return;
  smpi_copy = smpi_comm_copy_data_callback;
  smpi_comm_set_copy_data_callback(copy_hook);
}

/* core/log.c's lock in this build (sim/Makefile): a no-op, ranks take turns in one thread. */
int da_sim_mutex_noop(pthread_mutex_t *m) {
  (void)m;
  return 0;
}
