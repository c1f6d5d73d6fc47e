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
#include <limits.h>
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

/* The arena: address space only (MAP_NORESERVE, never written: payload copies are charged, not
 * done, da_sim_memcpy below). 0 on success. */
static int arena_map(void) {
  void *a = mmap(NULL, ARENA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a == MAP_FAILED) return -1;
  arena = a;
  return 0;
}

static int in_arena(const void *p) { return arena && (const char *)p >= arena && (const char *)p < arena + ARENA; }

void *da_malloc(size_t bytes, size_t align) {
  if (bytes < threshold() || align > 4096) return da_host_malloc(bytes, align);
  if (bytes > ARENA) return NULL;
  if (!arena && arena_map()) return NULL; /* ranks take turns in one thread: no race */
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

/* memcpy in comm/ulysses.c (sim/Makefile: -Dmemcpy=da_sim_memcpy): the driver packs and unpacks
 * its all-to-all buffers row by row on the host. A copy into the arena is charged, not done: read
 * plus write at the device's memory rate (as the ring's packing through da_payload), summed into
 * da_sim_pending_bytes and spent before the next kernel call or clock read (one simulator event
 * for millions of rows). Copies into private memory are done. */
void *da_sim_memcpy(void *dst, const void *src, size_t n) {
  if (!in_arena(dst)) return memcpy(dst, src, n);
  da_sim_pending_bytes += 2.0 * (double)n;
  return dst;
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

/* MPI_Alltoallv in comm/mpi.c (sim/Makefile: -DMPI_Alltoallv=da_sim_alltoallv). The transport
 * counts in units of a contiguous type of up to 4 KiB; SMPI treats every such type as derived and
 * serializes each message through a private copy (malloc + memcpy of the whole part at send, again
 * at receive, and its own part through Datatype::copy): for ulysses at 8 ranks and 1M tokens,
 * 19 GB copied and held at once, 17 GB resident and 4 minutes of host time for one point. This is
 * the algorithm SMPI's ompi selector runs for MPI_Alltoallv (basic linear: every receive and send
 * posted at once, then one wait), in bytes: the same messages at the same instants, no copies. The
 * own part is a local copy (dropped when it lies in the payload arena, as messages are). */
int da_sim_alltoallv(const void *sbuf, const int *sc, const int *sd, MPI_Datatype st, void *rbuf, const int *rc,
                     const int *rd, MPI_Datatype rt, MPI_Comm comm) {
  int P, me, ss, rs;
  MPI_Comm_size(comm, &P);
  MPI_Comm_rank(comm, &me);
  MPI_Type_size(st, &ss);
  MPI_Type_size(rt, &rs);
  MPI_Request *req = malloc((size_t)2 * P * sizeof *req);
  if (!req) return MPI_ERR_NO_MEM;
  int n = 0, rc_ = MPI_SUCCESS;
  for (int i = 1; i <= P && rc_ == MPI_SUCCESS; i++) { /* receives first, from the next rank on */
    const int q = (me + i) % P;
    const double b = (double)rc[q] * rs;
    if (q == me || !b) continue;
    if (b > INT_MAX) rc_ = MPI_ERR_COUNT;
    else rc_ = MPI_Irecv((char *)rbuf + (size_t)rd[q] * rs, (int)b, MPI_BYTE, q, 78, comm, &req[n++]);
  }
  for (int i = 1; i <= P && rc_ == MPI_SUCCESS; i++) {
    const int q = (me + P - i) % P;
    const double b = (double)sc[q] * ss;
    if (q == me || !b) continue;
    if (b > INT_MAX) rc_ = MPI_ERR_COUNT;
    else rc_ = MPI_Isend((const char *)sbuf + (size_t)sd[q] * ss, (int)b, MPI_BYTE, q, 78, comm, &req[n++]);
  }
  if (rc_ == MPI_SUCCESS && sc[me]) {
    char *d = (char *)rbuf + (size_t)rd[me] * rs;
    if (!in_arena(d)) memcpy(d, (const char *)sbuf + (size_t)sd[me] * ss, (size_t)sc[me] * ss);
  }
  if (n) {
    const int w = MPI_Waitall(n, req, MPI_STATUSES_IGNORE);
    if (rc_ == MPI_SUCCESS) rc_ = w;
  }
  free(req);
  return rc_;
}
