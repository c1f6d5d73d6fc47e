/* devapi_host.c: the `host` device table (devapi.h): what a GPU runtime does for the cuda-ipc
 * transport, done by the processes of one node in POSIX shared memory, so the transport's
 * protocol runs under MPI without a GPU.
 *   - Device memory: one shared-memory segment per allocation (shm_open + mmap); its handle is the
 *     segment name. A peer maps it with mem_open, like cudaIpcOpenMemHandle.
 *   - Events: two counters in a small segment of their own. record takes a ticket (recorded + 1)
 *     and queues it; when the stream reaches it, completed = that ticket. query: completed >=
 *     recorded. A stream wait captures `recorded` when it is called (the CUDA semantics).
 *   - Streams: a queue per stream, run by the process that owns it whenever that process calls
 *     any entry of this table. There is no helper thread: progress is the caller's, as with the
 *     transports (transport.h).
 * Ordering mistakes are made visible by the link model of devapi.h (poison, then the bytes a
 * delay later): the delay is the point, a synchronous memcpy would make every protocol look
 * right. Only for tests: single-threaded per process, no device, nothing fast. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "core.h"
#include "devapi.h"

#define POISON 0xFF
#define SYNC_LIMIT_S 60.0 /* a stream_sync that long is a protocol deadlock, not a slow copy */

/* ---- memory ------------------------------------------------------------------------------- */

typedef struct {
  char *base;
  size_t bytes;
  char name[DA_DEV_HANDLE_BYTES];
  int owned;   /* 1: allocated here; 0: a peer's allocation opened here */
  int linked;  /* the name still exists in /dev/shm */
  int exported; /* mem_handle gave its name out: publish_done may drop the name */
} seg_t;

static seg_t *segs;
static int nsegs, capsegs;
static unsigned long name_seq;
static unsigned long long name_nonce; /* this process's: 0 until its first segment */
static long nonce_pid;                /* the process name_nonce belongs to (a fork child makes its own) */
static double link_delay_s, local_delay_s;

void da_devapi_host_set_link_delay(double seconds) { link_delay_s = seconds > 0 ? seconds : 0; }
void da_devapi_host_set_local_delay(double seconds) { local_delay_s = seconds > 0 ? seconds : 0; }

static da_status_t seg_add(const seg_t *s) {
  if (nsegs == capsegs) {
    int cap = capsegs ? 2 * capsegs : 16;
    seg_t *n = realloc(segs, (size_t)cap * sizeof *n);
    if (!n) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: segment table");
    segs = n, capsegs = cap;
  }
  segs[nsegs++] = *s;
  return DA_SUCCESS;
}

static int seg_find(const void *p) {
  for (int i = 0; i < nsegs; i++)
    if ((const char *)p >= segs[i].base && (const char *)p < segs[i].base + segs[i].bytes) return i;
  return -1;
}

/* ---- the leftovers of killed processes -----------------------------------------------------
 * A process that is killed (SIGKILL, a fault test's victim, a job past its time limit) cannot
 * unlink its segments, and nothing else did: 1232 of them were in /dev/shm here by 2026-12-07.
 * So every process that makes segments first makes "/dev/shm/distattn-lock-<pid>-<nonce>" and
 * holds an exclusive flock on it for as long as it lives (the kernel drops the lock however the
 * process ends; the file is made under another name and renamed once locked, so a lock file is
 * never seen unlocked while its process lives). Then it sweeps /dev/shm once: a lock file that it
 * can lock belongs to a process that has ended, and that process's segments
 * ("distattn-<kind>-<pid>-<nonce>-<n>") and lock file are unlinked. Segments without a lock file
 * (names from before 2026-12-07) are left: nothing tells whether their process lives. All of it
 * is best effort: a failure only means that leftovers stay, said at DISTATTN_DEBUG=INFO. */
#define SHM_DIR "/dev/shm"

/* This process's tag "<pid>-<nonce>", which every name it makes carries. */
static void own_tag(char *buf, size_t n) { snprintf(buf, n, "%ld-%llx", (long)getpid(), name_nonce); }

/* Make and lock this process's lock file (once). Its descriptor is never closed: the lock lasts
 * as long as the process. */
static void lock_own(void) {
  char tag[48], tmp[128], path[128];
  own_tag(tag, sizeof tag);
  snprintf(tmp, sizeof tmp, SHM_DIR "/distattn-new-%s", tag);
  snprintf(path, sizeof path, SHM_DIR "/distattn-lock-%s", tag);
  int fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd >= 0 && flock(fd, LOCK_EX) == 0 && rename(tmp, path) == 0) return;
  DA_INFO(DA_SUB_ALLOC, "host devapi: no lock file %s (%s): this process's segments stay if it is killed", path,
          strerror(errno));
  if (fd >= 0) close(fd), unlink(tmp);
}

/* Whether the lock file `name` (in SHM_DIR) belongs to a process that has ended: it can be locked. */
static int lock_is_stale(const char *name) {
  char path[320];
  snprintf(path, sizeof path, SHM_DIR "/%s", name);
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return 0;
  const int stale = flock(fd, LOCK_EX | LOCK_NB) == 0;
  close(fd);
  return stale;
}

/* Whether the entry `name` carries the tag of an ended process: "distattn-<kind>-<tag>-<n>" or
 * "distattn-lock-<tag>", with the tags of ended processes in dead[0..ndead). */
static int name_is_dead(const char *name, char (*dead)[48], int ndead) {
  if (strncmp(name, "distattn-", 9)) return 0;
  const char *t = strchr(name + 9, '-'); /* after the kind */
  if (!t) return 0;
  t++;
  for (int i = 0; i < ndead; i++) {
    const size_t n = strlen(dead[i]);
    if (!strncmp(t, dead[i], n) && (t[n] == '\0' || t[n] == '-')) return 1;
  }
  return 0;
}

/* Unlink the segments and lock files of ended processes (at most 256 of them per sweep). */
static void sweep_ended(void) {
  DIR *d = opendir(SHM_DIR);
  if (!d) {
    DA_INFO(DA_SUB_ALLOC, "host devapi: %s: %s: no sweep of killed processes' segments", SHM_DIR, strerror(errno));
    return;
  }
  static char dead[256][48];
  int ndead = 0, nseg = 0;
  struct dirent *e;
  char own[48];
  own_tag(own, sizeof own);
  while ((e = readdir(d)) && ndead < 256)
    if (!strncmp(e->d_name, "distattn-lock-", 14) && strcmp(e->d_name + 14, own) && strlen(e->d_name + 14) < 48 &&
        lock_is_stale(e->d_name))
      snprintf(dead[ndead++], sizeof dead[0], "%s", e->d_name + 14);
  if (ndead) {
    rewinddir(d);
    while ((e = readdir(d)))
      if (name_is_dead(e->d_name, dead, ndead)) {
        char path[320];
        snprintf(path, sizeof path, SHM_DIR "/%s", e->d_name);
        nseg += unlink(path) == 0 && strncmp(e->d_name, "distattn-lock-", 14);
      }
    DA_INFO(DA_SUB_ALLOC, "host devapi: removed %d segments of %d ended processes from %s", nseg, ndead, SHM_DIR);
  }
  closedir(d);
}

/* A new segment's name: "/distattn-<kind>-<pid>-<nonce>-<n>". The pid alone is not enough: a
 * process that was killed leaves its segments in /dev/shm until a sweep (above), and a later
 * process that gets the same pid (pid_max is 32768 here) then failed to create its first
 * segments (O_EXCL: "File exists"), which the KV cache reported as out of memory (test_tree's
 * device cases, 3 runs in 36 with 3217 such leftovers on the machine). The nonce, the creation
 * time of the process's first segment in ns, differs between two processes that share a pid.
 * The first name also makes the lock file and sweeps the ended processes' leftovers. */
static void seg_name(char *buf, size_t n, const char *kind) {
  if (!name_nonce || nonce_pid != (long)getpid()) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    name_nonce = (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
    nonce_pid = (long)getpid();
    lock_own();
    sweep_ended();
  }
  char tag[48];
  own_tag(tag, sizeof tag);
  snprintf(buf, n, "/distattn-%s-%s-%lu", kind, tag, name_seq++);
}

/* Create (create = 1) or open a segment of `bytes` and map it. */
static da_status_t seg_map(const char *name, size_t bytes, int create, char **out) {
  *out = NULL;
  int fd = shm_open(name, create ? O_RDWR | O_CREAT | O_EXCL : O_RDWR, 0600);
  if (fd < 0)
    return DA_ERR(DA_ERR_SYSTEM, "host devapi: shm_open(%s) for %s: %s", name,
                  create ? "allocation" : "a peer's handle", strerror(errno));
  if (create && ftruncate(fd, (off_t)bytes) != 0) {
    int e = errno;
    close(fd);
    shm_unlink(name);
    return DA_ERR(e == ENOSPC ? DA_ERR_OUT_OF_MEMORY : DA_ERR_SYSTEM, "host devapi: %zu bytes in /dev/shm: %s",
                  bytes, strerror(e));
  }
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    if (create) shm_unlink(name);
    return DA_ERR(DA_ERR_SYSTEM, "host devapi: mmap of %zu bytes (%s): %s", bytes, name, strerror(e));
  }
  *out = p;
  return DA_SUCCESS;
}

static da_status_t host_alloc(void **ptr, size_t bytes) {
  seg_t s = {.bytes = bytes ? bytes : 1, .owned = 1, .linked = 1};
  seg_name(s.name, sizeof s.name, "dev");
  DA_CHECK(seg_map(s.name, s.bytes, 1, &s.base));
  da_status_t st = seg_add(&s);
  if (st != DA_SUCCESS) {
    munmap(s.base, s.bytes);
    shm_unlink(s.name);
    return st;
  }
  *ptr = s.base;
  return DA_SUCCESS;
}

/* Pinned host memory: the host table has no device to pin for, so ordinary page-aligned memory
 * (outside the segments: a copy to or from it is a local copy, delayed and poisoning like the
 * others, devapi.h). */
static da_status_t host_pinned_alloc(void **ptr, size_t bytes) {
  *ptr = NULL;
  if (posix_memalign(ptr, 4096, bytes ? bytes : 1) != 0) {
    *ptr = NULL;
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: %zu bytes of host staging memory", bytes);
  }
  return DA_SUCCESS;
}

static void host_pinned_free(void *ptr) { free(ptr); }

static void seg_drop(int i) {
  munmap(segs[i].base, segs[i].bytes);
  if (segs[i].owned && segs[i].linked) shm_unlink(segs[i].name);
  segs[i] = segs[--nsegs];
}

static void host_free(void *ptr) {
  int i = ptr ? seg_find(ptr) : -1;
  if (i >= 0 && segs[i].owned && segs[i].base == ptr) seg_drop(i);
}

static da_status_t host_mem_handle(void *ptr, size_t bytes, da_dev_mem_handle_t *h) {
  int i = seg_find(ptr);
  if (i < 0 || !segs[i].owned || segs[i].base != ptr || bytes > segs[i].bytes)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "host devapi: %p (%zu bytes) is not an allocation of this process", ptr,
                  bytes);
  memset(h, 0, sizeof *h);
  memcpy(h->opaque, segs[i].name, strlen(segs[i].name) + 1);
  h->bytes = bytes;
  segs[i].exported = 1;
  return DA_SUCCESS;
}

static da_status_t host_mem_open(const da_dev_mem_handle_t *h, void **ptr) {
  seg_t s = {.bytes = h->bytes ? h->bytes : 1};
  memcpy(s.name, h->opaque, sizeof s.name);
  s.name[sizeof s.name - 1] = '\0';
  DA_CHECK(seg_map(s.name, s.bytes, 0, &s.base));
  da_status_t st = seg_add(&s);
  if (st != DA_SUCCESS) {
    munmap(s.base, s.bytes);
    return st;
  }
  *ptr = s.base;
  return DA_SUCCESS;
}

static void host_mem_close(void *ptr) {
  int i = ptr ? seg_find(ptr) : -1;
  if (i >= 0 && !segs[i].owned && segs[i].base == ptr) seg_drop(i);
}

/* ---- events --------------------------------------------------------------------------------- */

typedef struct {
  uint64_t recorded, completed; /* touched with __atomic builtins only: other processes share them */
} shev_t;

typedef struct {
  shev_t *sh;
  char name[DA_DEV_HANDLE_BYTES];
  int owned, linked;
} hevent_t;

static hevent_t **events; /* every event of this process, for publish_done */
static int nevents, capevents;

static da_status_t ev_track(hevent_t *e) {
  if (nevents == capevents) {
    int cap = capevents ? 2 * capevents : 16;
    hevent_t **n = realloc(events, (size_t)cap * sizeof *n);
    if (!n) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: event table");
    events = n, capevents = cap;
  }
  events[nevents++] = e;
  return DA_SUCCESS;
}

static da_status_t host_event_create(da_devent_t *out, int ipc) {
  (void)ipc; /* every host event is shareable */
  *out = NULL;
  hevent_t *e = calloc(1, sizeof *e);
  if (!e) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: event");
  seg_name(e->name, sizeof e->name, "ev");
  char *p = NULL;
  da_status_t st = seg_map(e->name, sizeof(shev_t), 1, &p);
  if (st == DA_SUCCESS) st = ev_track(e);
  if (st != DA_SUCCESS) {
    if (p) munmap(p, sizeof(shev_t)), shm_unlink(e->name);
    free(e);
    return st;
  }
  e->sh = (shev_t *)p; /* ftruncate zero-fills: recorded = completed = 0 */
  e->owned = e->linked = 1;
  *out = e;
  return DA_SUCCESS;
}

static void host_event_destroy(da_devent_t ev) {
  hevent_t *e = ev;
  if (!e) return;
  for (int i = 0; i < nevents; i++)
    if (events[i] == e) events[i] = events[--nevents];
  munmap(e->sh, sizeof(shev_t));
  if (e->owned && e->linked) shm_unlink(e->name);
  free(e);
}

static da_status_t host_event_handle(da_devent_t ev, da_dev_event_handle_t *h) {
  hevent_t *e = ev;
  memset(h, 0, sizeof *h);
  memcpy(h->opaque, e->name, strlen(e->name) + 1);
  return DA_SUCCESS;
}

static da_status_t host_event_open(const da_dev_event_handle_t *h, da_devent_t *out) {
  *out = NULL;
  hevent_t *e = calloc(1, sizeof *e);
  if (!e) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: event");
  memcpy(e->name, h->opaque, sizeof e->name);
  e->name[sizeof e->name - 1] = '\0';
  char *p = NULL;
  da_status_t st = seg_map(e->name, sizeof(shev_t), 0, &p);
  if (st == DA_SUCCESS) st = ev_track(e);
  if (st != DA_SUCCESS) {
    if (p) munmap(p, sizeof(shev_t));
    free(e);
    return st;
  }
  e->sh = (shev_t *)p;
  *out = e;
  return DA_SUCCESS;
}

static void host_publish_done(void) {
  /* Only what was handed out: an allocation registered later still needs its name then. */
  for (int i = 0; i < nsegs; i++)
    if (segs[i].owned && segs[i].linked && segs[i].exported) shm_unlink(segs[i].name), segs[i].linked = 0;
  for (int i = 0; i < nevents; i++)
    if (events[i]->owned && events[i]->linked) shm_unlink(events[i]->name), events[i]->linked = 0;
}

/* ---- streams ------------------------------------------------------------------------------ */

typedef enum { OP_COPY, OP_MEMSET, OP_RECORD, OP_WAIT, OP_STALL } opkind_t;

typedef struct {
  opkind_t kind;
  void *dst;
  const void *src;
  size_t bytes;
  int value;
  shev_t *ev;
  uint64_t ticket;  /* RECORD: the ticket to complete; WAIT: the record to wait for */
  double dur;       /* STALL: seconds; COPY over a link: the delay */
  int started;
  double t_start;
} op_t;

typedef struct {
  op_t *q;
  int head, tail, cap;
} hstream_t;

static hstream_t **streams;
static int nstreams, capstreams;

static void ev_complete(shev_t *e, uint64_t ticket) {
  uint64_t cur = __atomic_load_n(&e->completed, __ATOMIC_ACQUIRE);
  while (cur < ticket &&
         !__atomic_compare_exchange_n(&e->completed, &cur, ticket, 0, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE)) {
  }
}

/* Run the head op of s if it can run now; 1 when it completed (popped). */
static int step_op(hstream_t *s) {
  op_t *o = &s->q[s->head];
  const double now = da_time_now();
  switch (o->kind) {
  case OP_WAIT:
    if (__atomic_load_n(&o->ev->completed, __ATOMIC_ACQUIRE) < o->ticket) return 0;
    break;
  case OP_RECORD:
    ev_complete(o->ev, o->ticket);
    break;
  case OP_STALL:
  case OP_COPY:
  case OP_MEMSET:
    if (!o->started) {
      o->started = 1, o->t_start = now;
      /* A transfer in flight leaves its destination undefined: say so loudly. */
      if (o->kind != OP_STALL && o->dur > 0) memset(o->dst, POISON, o->bytes);
    }
    if (now < o->t_start + o->dur) return 0;
    if (o->kind == OP_COPY) memmove(o->dst, o->src, o->bytes);
    if (o->kind == OP_MEMSET) memset(o->dst, o->value, o->bytes);
    break;
  }
  s->head++;
  return 1;
}

static void progress(void) {
  for (int i = 0; i < nstreams; i++) {
    hstream_t *s = streams[i];
    while (s->head < s->tail && step_op(s)) {
    }
    if (s->head == s->tail) s->head = s->tail = 0;
  }
}

static da_status_t enqueue(hstream_t *s, const op_t *o) {
  if (!s) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "host devapi: NULL stream (the host table has no default stream)");
  if (s->tail == s->cap) {
    if (s->head > 0) { /* slide the live ops down before growing */
      memmove(s->q, s->q + s->head, (size_t)(s->tail - s->head) * sizeof *s->q);
      s->tail -= s->head, s->head = 0;
    } else {
      int cap = s->cap ? 2 * s->cap : 32;
      op_t *n = realloc(s->q, (size_t)cap * sizeof *n);
      if (!n) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: stream queue");
      s->q = n, s->cap = cap;
    }
  }
  s->q[s->tail++] = *o;
  progress();
  return DA_SUCCESS;
}

static da_status_t host_stream_create(da_dstream_t *out) {
  *out = NULL;
  if (nstreams == capstreams) {
    int cap = capstreams ? 2 * capstreams : 8;
    hstream_t **n = realloc(streams, (size_t)cap * sizeof *n);
    if (!n) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: stream table");
    streams = n, capstreams = cap;
  }
  hstream_t *s = calloc(1, sizeof *s);
  if (!s) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "host devapi: stream");
  streams[nstreams++] = s;
  *out = s;
  return DA_SUCCESS;
}

static void host_stream_destroy(da_dstream_t sv) {
  hstream_t *s = sv;
  if (!s) return;
  for (int i = 0; i < nstreams; i++)
    if (streams[i] == s) streams[i] = streams[--nstreams];
  free(s->q);
  free(s);
}

static void pause_a_little(long it) {
  if (it < 64) return;
  struct timespec ts = {0, 50000};
  if (it < 1024) sched_yield();
  else nanosleep(&ts, NULL);
}

static da_status_t host_stream_sync(da_dstream_t sv) {
  hstream_t *s = sv;
  if (!s) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "host devapi: NULL stream");
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    progress();
    if (s->head == s->tail) return DA_SUCCESS;
    if (da_time_now() - t0 > SYNC_LIMIT_S)
      return DA_ERR(DA_ERR_TIMEOUT, "host devapi: stream still blocked after %g s (op %d of %d: %s): an event "
                    "wait that nobody records", SYNC_LIMIT_S, s->head, s->tail,
                    s->q[s->head].kind == OP_WAIT ? "a wait on an event" : "a copy");
    pause_a_little(it);
  }
}

/* A copy through a peer's memory crosses the "link"; local copies do not. */
static int is_link(const void *dst, const void *src, size_t bytes) {
  int a = bytes ? seg_find(dst) : -1, b = bytes ? seg_find(src) : -1;
  return (a >= 0 && !segs[a].owned) || (b >= 0 && !segs[b].owned);
}

static da_status_t host_copy_async(void *dst, const void *src, size_t bytes, da_dstream_t s) {
  op_t o = {.kind = OP_COPY, .dst = dst, .src = src, .bytes = bytes};
  o.dur = is_link(dst, src, bytes) ? link_delay_s : local_delay_s;
  return enqueue(s, &o);
}

static da_status_t host_memset_async(void *dst, int value, size_t bytes, da_dstream_t s) {
  op_t o = {.kind = OP_MEMSET, .dst = dst, .value = value, .bytes = bytes, .dur = local_delay_s};
  return enqueue(s, &o);
}

/* Host <-> device copies block the caller until the bytes are there: no delay to show. */
static da_status_t host_copy_to_host(void *host, const void *dev, size_t bytes, da_dstream_t s) {
  op_t o = {.kind = OP_COPY, .dst = host, .src = dev, .bytes = bytes};
  DA_CHECK(enqueue(s, &o));
  return host_stream_sync(s);
}

static da_status_t host_copy_from_host(void *dev, const void *host, size_t bytes, da_dstream_t s) {
  op_t o = {.kind = OP_COPY, .dst = dev, .src = host, .bytes = bytes};
  DA_CHECK(enqueue(s, &o));
  return host_stream_sync(s);
}

static da_status_t host_event_record(da_devent_t ev, da_dstream_t s) {
  hevent_t *e = ev;
  op_t o = {.kind = OP_RECORD, .ev = e->sh};
  o.ticket = __atomic_add_fetch(&e->sh->recorded, 1, __ATOMIC_ACQ_REL);
  return enqueue(s, &o);
}

static da_status_t host_event_query(da_devent_t ev, int *done) {
  hevent_t *e = ev;
  progress();
  uint64_t rec = __atomic_load_n(&e->sh->recorded, __ATOMIC_ACQUIRE);
  *done = __atomic_load_n(&e->sh->completed, __ATOMIC_ACQUIRE) >= rec;
  return DA_SUCCESS;
}

static da_status_t host_stream_wait_event(da_dstream_t s, da_devent_t ev) {
  hevent_t *e = ev;
  op_t o = {.kind = OP_WAIT, .ev = e->sh, .ticket = __atomic_load_n(&e->sh->recorded, __ATOMIC_ACQUIRE)};
  return enqueue(s, &o);
}

da_status_t da_devapi_host_stall(da_dstream_t s, double seconds) {
  op_t o = {.kind = OP_STALL, .dur = seconds};
  return enqueue(s, &o);
}

static da_status_t host_probe(int *ndev) {
  *ndev = 1; /* the node's shared memory */
  return DA_SUCCESS;
}

const da_devapi_t da_devapi_host = {
    .name = "host",
    .probe = host_probe,
    .alloc = host_alloc,
    .free = host_free,
    .stream_create = host_stream_create,
    .stream_destroy = host_stream_destroy,
    .stream_sync = host_stream_sync,
    .host_alloc = host_pinned_alloc,
    .host_free = host_pinned_free,
    .copy_async = host_copy_async,
    .memset_async = host_memset_async,
    .copy_to_host = host_copy_to_host,
    .copy_from_host = host_copy_from_host,
    .event_create = host_event_create,
    .event_destroy = host_event_destroy,
    .event_record = host_event_record,
    .event_query = host_event_query,
    .stream_wait_event = host_stream_wait_event,
    .mem_handle = host_mem_handle,
    .mem_open = host_mem_open,
    .mem_close = host_mem_close,
    .event_handle = host_event_handle,
    .event_open = host_event_open,
    .publish_done = host_publish_done,
};

const da_devapi_t *da_devapi_find(const char *name) {
  if (name && !strcmp(name, "host")) return &da_devapi_host;
#ifdef DA_HAVE_CUDART
  if (name && !strcmp(name, "cuda")) return &da_devapi_cuda;
  DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown device API '%s' (built: cuda, host)", name ? name : "(null)");
#else
  DA_ERR(DA_ERR_INVALID_ARGUMENT, "unknown device API '%s' (built: host; cuda needs the CUDA toolkit at build time)",
         name ? name : "(null)");
#endif
  return NULL;
}
