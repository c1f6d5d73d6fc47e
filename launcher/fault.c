/* fault.c: deadlines on the `distattn` program's own collectives and the roll call that ends a
 * job whose peer went silent (fault.h). Not library code: it aborts the job, by design. A rank
 * killed outright (SIGKILL) is noticed by the MPI runtime, which ends the job naming it; a rank
 * that is stopped (SIGSTOP) or hung is visible only as silence, which the deadlines (the
 * library's and these) and the roll call turn into a message and an exit. */
#define _GNU_SOURCE
#include "fault.h"
#include <math.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "core.h"
#include "kvcache.h"   /* da_comm_default_timeout: DISTATTN_TIMEOUT or 300 s */
#include "transport.h" /* da_xport_deadline: the --timeout of the plan created last */
#include "env.h"       /* DA_TIMEOUT_MIN_S: a --timeout below it is the parser's to refuse */

enum { DA_FAULT_TAG = 0x7EAD }; /* point-to-point tag of the roll call on MPI_COMM_WORLD */

static double job_timeout;     /* --timeout as this rank was given it (0: none; da_fault_start) */
static double default_timeout; /* DISTATTN_TIMEOUT or 300 s, read once (the watchdog asks often) */

static double deadline(void) {
  if (job_timeout > 0) return job_timeout;
  double t = da_xport_deadline();
  if (t > 0) return t;
  if (!(default_timeout > 0)) default_timeout = da_comm_default_timeout();
  return default_timeout;
}

/* Spin briefly, then sleep 50 us: tests oversubscribe the cores and the peer needs them. */
static void pause_a_little(long it) {
  if (it < 64) return;
  struct timespec ts = {0, 50000};
  nanosleep(&ts, NULL);
}

static int wait_bounded(MPI_Request *r, const char *what) {
  int me = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  if (da_error_timeouts() > 0) {
    /* This rank already gave up on a peer: agreeing on anything would only wait out a second
     * deadline. Its message may not have been printed yet (the command reduces statuses first);
     * a later successful library call may have cleared it (an offload memory rank's stats call),
     * and then it was printed already: no empty "rank N:" line. */
    const char *msg = da_error_message();
    if (msg && *msg) fprintf(stderr, "distattn: rank %d: %s\n", me, msg);
    da_fault_abort(what);
  }
  const double t0 = da_time_now(), T = deadline();
  for (long it = 0;; it++) {
    int flag = 0, rc = PMPI_Test(r, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return rc;
    if (flag) return MPI_SUCCESS;
    if (da_time_now() - t0 > T) {
      fprintf(stderr, "distattn: rank %d: %s across the job did not complete within %g s (a peer is missing or "
              "stuck)\n", me, what, T);
      da_fault_abort(what);
    }
    pause_a_little(it);
  }
}

/* ---- the watchdog: a hard deadline for the whole job, outside the main thread ----
 * The deadlines above hold only while the main thread waits: a rank that computes a long step
 * (or sits in a blocking MPI-IO call) learns that its peer stopped only when it next looks. The
 * watchdog thread looks all the time: it trades a small heartbeat with its two ring neighbours
 * (world ranks r-1 and r+1) every beat and ends the job when a neighbour has been silent for
 * max(deadline, DA_WATCH_MIN_S) + the roll call's grace (min(deadline, 5 s)) + 1 s. SIGSTOP
 * stops every thread of the victim, its heartbeat included, so its neighbours name it whatever
 * their own main threads are doing. It also bounds
 * the blocking calls the launcher cannot make nonblocking (MPI-IO collectives, communicator
 * splits, collectives on other communicators: the sections of the wrappers below).
 * Needs MPI_THREAD_MULTIPLE; without it (or at P = 1) there is no watchdog and the deadlines of
 * the waits above are all there is (da_fault_start says so once). */

enum { DA_WATCH_TAG = 0x7EAE, DA_WATCH_ALIVE = 1, DA_WATCH_BYE = 2 };
#define DA_WATCH_MIN_S 2.0 /* below this a starved heartbeat thread could be taken for a stop */

/* 0; 1: a roll call is under way in this process (the watchdog still watches: a silent
 * neighbour ends the job at once, naming it, rather than after the roll call's grace); 2: the job
 * is being aborted. */
enum { DA_END_NONE, DA_END_ROLLCALL, DA_END_ABORT };
static _Atomic int aborting;
static _Atomic double sect_t0;     /* start of the main thread's current blocking section, or 0 */
static const char *_Atomic sect_what;
static int sect_depth;             /* main thread only */

typedef struct watch {
  pthread_t th;
  int on, me, nb, nbr[2];
  int in[2], bye[2];
  MPI_Request rr[2], sr[2];
  double heard[2];
  _Atomic int closing, done;
} watch_t;
static watch_t W;

static double wall_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sect_begin(const char *what) {
  if (sect_depth++ == 0) {
    atomic_store(&sect_what, what);
    atomic_store(&sect_t0, da_time_now());
  }
}

static void sect_end(void) {
  if (--sect_depth == 0) atomic_store(&sect_t0, 0.0);
}

static void sleep_s(double s) {
  struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  nanosleep(&ts, NULL);
}

/* One neighbour's message arrived: note it, and listen again unless it said goodbye. */
static void watch_receive(int i, double now) {
  int flag = 0;
  if (W.bye[i] || W.rr[i] == MPI_REQUEST_NULL) return;
  if (PMPI_Test(&W.rr[i], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || !flag) return;
  W.heard[i] = now;
  if (W.in[i] == DA_WATCH_BYE) {
    W.bye[i] = 1;
    return;
  }
  PMPI_Irecv(&W.in[i], 1, MPI_INT, W.nbr[i], DA_WATCH_TAG, MPI_COMM_WORLD, &W.rr[i]);
}

/* A word to every neighbour whose last one has left (a neighbour that does not take them is
 * stopped: nothing piles up). */
static void watch_send(int word) {
  for (int i = 0; i < W.nb; i++) {
    int flag = 1;
    if (W.sr[i] != MPI_REQUEST_NULL) PMPI_Test(&W.sr[i], &flag, MPI_STATUS_IGNORE);
    if (!flag && word == DA_WATCH_ALIVE) continue;
    if (!flag) PMPI_Request_free(&W.sr[i]); /* the goodbye must go: the beat before it is eager */
    /* from constants: a send freed before it completed may still read its buffer */
    static const int words[3] = {0, DA_WATCH_ALIVE, DA_WATCH_BYE};
    PMPI_Isend(&words[word], 1, MPI_INT, W.nbr[i], DA_WATCH_TAG, MPI_COMM_WORLD, &W.sr[i]);
  }
}

static void *watch_main(void *arg) {
  (void)arg;
  double last_beat = -1e300;
  int bye_sent = 0;
  for (;;) {
    /* The waits of the main thread get their deadline and the roll call its grace first (their
     * messages say more: the step, the peer, the seconds waited); the watchdog is the backstop. */
    const double now = da_time_now(), T = deadline();
    const double silence = (T > DA_WATCH_MIN_S ? T : DA_WATCH_MIN_S) + (T < 5 ? T : 5) + 1;
    const double beat = T / 6 < 0.02 ? 0.02 : T / 6 > 1 ? 1 : T / 6;
    int byes = 0;
    for (int i = 0; i < W.nb; i++) watch_receive(i, now), byes += W.bye[i];
    if (atomic_load(&W.closing) && !bye_sent) watch_send(DA_WATCH_BYE), bye_sent = 1;
    if (bye_sent && byes == W.nb) break;
    if (!bye_sent && now - last_beat >= beat) watch_send(DA_WATCH_ALIVE), last_beat = now;
    for (int i = 0; i < W.nb; i++)
      if (!W.bye[i] && now - W.heard[i] > silence &&
          atomic_exchange(&aborting, DA_END_ABORT) != DA_END_ABORT) {
        fprintf(stderr, "distattn: rank %d: rank %d gave no sign of life for %.1f s (stopped or hung; deadline "
                "%g s): ending the job\n", W.me, W.nbr[i], now - W.heard[i], T);
        fflush(stderr);
        PMPI_Abort(MPI_COMM_WORLD, 1);
      }
    const double t0 = atomic_load(&sect_t0);
    if (t0 > 0 && now - t0 > T && atomic_load(&aborting) == DA_END_NONE) {
      const char *what = atomic_load(&sect_what);
      fprintf(stderr, "distattn: rank %d: %s did not complete within %g s (a peer is missing or stuck)\n", W.me, what,
              T);
      da_fault_abort(what);
    }
    sleep_s(beat / 4 < 0.05 ? beat / 4 : 0.05); /* few wake-ups: the ranks' cores are for compute */
  }
  for (int i = 0; i < W.nb; i++) /* goodbyes are small (eager): they leave at once */
    if (W.sr[i] != MPI_REQUEST_NULL) PMPI_Request_free(&W.sr[i]);
  atomic_store(&W.done, 1);
  return NULL;
}

/* The --timeout this rank was given, read from argv before the options are parsed and agreed
 * on, so that the agreement itself is bounded. A malformed value is left to the parser (0). */
static double argv_timeout(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *v = !strcmp(argv[i], "--timeout") && i + 1 < argc ? argv[i + 1]
                    : !strncmp(argv[i], "--timeout=", 10)          ? argv[i] + 10
                                                                   : NULL;
    if (!v) continue;
    char *end = NULL;
    double t = strtod(v, &end);
    return end != v && !*end && isfinite(t) && t >= DA_TIMEOUT_MIN_S && t <= 1e6 ? t : 0; /* else: the parser refuses it */
  }
  return 0;
}

/* ---- test-only fault injection: DISTATTN_TEST_FAULT=RANK:POINT[:stop|kill][:DELAY] ---- */
static struct {
  int set, rank, sig, fired;
  char point[32];
  double delay;
} F;

static int fault_parse(const char *s, int me) {
  char buf[96], *save = NULL;
  if (strlen(s) >= sizeof buf) return -1;
  snprintf(buf, sizeof buf, "%s", s);
  char *rk = strtok_r(buf, ":", &save), *pt = strtok_r(NULL, ":", &save), *sg = strtok_r(NULL, ":", &save);
  char *dl = strtok_r(NULL, ":", &save), *end = NULL;
  if (!rk || !pt || strtok_r(NULL, ":", &save) || strlen(pt) >= sizeof F.point) return -1;
  long r = strtol(rk, &end, 10);
  if (end == rk || *end || r < 0) return -1;
  F.sig = SIGSTOP;
  if (sg && !strcmp(sg, "kill")) F.sig = SIGKILL;
  else if (sg && strcmp(sg, "stop")) return -1;
  F.delay = 0;
  if (dl) {
    F.delay = strtod(dl, &end);
    if (end == dl || *end || !(F.delay >= 0 && F.delay <= 3600)) return -1;
  }
  snprintf(F.point, sizeof F.point, "%s", pt);
  F.rank = (int)r, F.set = F.rank == me;
  return 0;
}

static void fault_fire(void) {
  fprintf(stderr, "distattn: rank %d: DISTATTN_TEST_FAULT: SIG%s at %s (pid %d, wall %.3f)\n", W.me,
          F.sig == SIGKILL ? "KILL" : "STOP", F.point, (int)getpid(), wall_now());
  fflush(stderr);
  raise(F.sig);
}

static void *fault_later(void *arg) {
  (void)arg;
  sleep_s(F.delay);
  fault_fire();
  return NULL;
}

void da_fault_point(const char *point) {
  if (!F.set || F.fired || strcmp(point, F.point)) return;
  F.fired = 1;
  pthread_t th;
  if (F.delay > 0 && pthread_create(&th, NULL, fault_later, NULL) == 0) {
    pthread_detach(th);
    return;
  }
  fault_fire();
}

int da_test_fail_alloc(const char *site) {
  const char *s = getenv("DISTATTN_TEST_FAIL_ALLOC"), *colon = s ? strchr(s, ':') : NULL;
  if (!colon || strcmp(colon + 1, site)) return 0;
  char *end = NULL;
  long r = strtol(s, &end, 10);
  return end == colon && r == W.me;
}

int da_fault_start(int argc, char **argv, int provided) {
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  W.me = me;
  job_timeout = argv_timeout(argc, argv);
  default_timeout = da_comm_default_timeout(); /* before the watchdog thread reads it */
  int rc = 0;
  const char *f = getenv("DISTATTN_TEST_FAULT");
  if (f && *f && fault_parse(f, me)) {
    fprintf(stderr, "distattn: rank %d: DISTATTN_TEST_FAULT=%s: expected RANK:POINT[:stop|kill][:DELAY_S] (test "
            "hook)\n", me, f);
    rc = 2;
  }
  const char *fa = getenv("DISTATTN_TEST_FAIL_ALLOC"), *colon = fa ? strchr(fa, ':') : NULL;
  if (fa && *fa) {
    char *end = NULL;
    long r = strtol(fa, &end, 10);
    if (!colon || end != colon || end == fa || r < 0 || strcmp(colon + 1, "row_stats")) {
      fprintf(stderr, "distattn: rank %d: DISTATTN_TEST_FAIL_ALLOC=%s: expected RANK:row_stats (test hook)\n", me, fa);
      rc = 2;
    }
  }
  if (P < 2) return rc;
  if (provided < MPI_THREAD_MULTIPLE) {
    if (me == 0)
      fprintf(stderr, "distattn: this MPI does not grant MPI_THREAD_MULTIPLE: no watchdog; a rank stopped while "
              "its peers compute is noticed only when they next wait for it\n");
    return rc;
  }
  const int left = (me + P - 1) % P, right = (me + 1) % P;
  W.nb = 0;
  W.nbr[W.nb++] = left;
  if (right != left) W.nbr[W.nb++] = right;
  const double now = da_time_now();
  for (int i = 0; i < W.nb; i++) {
    W.heard[i] = now, W.bye[i] = 0, W.sr[i] = MPI_REQUEST_NULL;
    PMPI_Irecv(&W.in[i], 1, MPI_INT, W.nbr[i], DA_WATCH_TAG, MPI_COMM_WORLD, &W.rr[i]);
  }
  W.on = pthread_create(&W.th, NULL, watch_main, NULL) == 0;
  if (!W.on) {
    for (int i = 0; i < W.nb; i++) PMPI_Cancel(&W.rr[i]), PMPI_Request_free(&W.rr[i]);
    fprintf(stderr, "distattn: rank %d: cannot start the watchdog thread: no watchdog\n", me);
  }
  return rc;
}

void da_fault_stop(void) {
  if (!W.on) return;
  /* Goodbyes both ways: a neighbour stopped now is still caught (its goodbye never comes). */
  atomic_store(&W.closing, 1);
  pthread_join(W.th, NULL);
  W.on = 0;
}

/* ---- the profiling-interface wrappers ----
 * Collectives on MPI_COMM_WORLD become nonblocking ones polled against the deadline. Blocking
 * calls that have no nonblocking form the launcher could poll (communicator splits and
 * duplicates, MPI-IO opens, views, collective reads and writes, closes) and collectives on other
 * communicators run as sections the watchdog bounds: past the deadline it ends the job from its
 * own thread with a roll call (the ranks not heard from are named). */
#define SECTION(what, call)       \
  do {                            \
    sect_begin(what);             \
    int rc_ = call;               \
    sect_end();                   \
    return rc_;                   \
  } while (0)

int MPI_Comm_split_type(MPI_Comm comm, int type, int key, MPI_Info info, MPI_Comm *out) {
  SECTION("MPI_Comm_split_type", PMPI_Comm_split_type(comm, type, key, info, out));
}

int MPI_Comm_split(MPI_Comm comm, int color, int key, MPI_Comm *out) {
  SECTION("MPI_Comm_split", PMPI_Comm_split(comm, color, key, out));
}

int MPI_Comm_dup(MPI_Comm comm, MPI_Comm *out) { SECTION("MPI_Comm_dup", PMPI_Comm_dup(comm, out)); }

int MPI_File_open(MPI_Comm comm, const char *path, int amode, MPI_Info info, MPI_File *fh) {
  SECTION("MPI_File_open (MPI-IO)", PMPI_File_open(comm, path, amode, info, fh));
}

int MPI_File_set_view(MPI_File fh, MPI_Offset disp, MPI_Datatype etype, MPI_Datatype ftype, const char *rep,
                      MPI_Info info) {
  SECTION("MPI_File_set_view (MPI-IO)", PMPI_File_set_view(fh, disp, etype, ftype, rep, info));
}

int MPI_File_read_all(MPI_File fh, void *buf, int count, MPI_Datatype dt, MPI_Status *st) {
  da_fault_point("input");
  SECTION("MPI_File_read_all (MPI-IO)", PMPI_File_read_all(fh, buf, count, dt, st));
}

int MPI_File_write_all(MPI_File fh, const void *buf, int count, MPI_Datatype dt, MPI_Status *st) {
  da_fault_point("output");
  SECTION("MPI_File_write_all (MPI-IO)", PMPI_File_write_all(fh, buf, count, dt, st));
}

int MPI_File_read_at_all(MPI_File fh, MPI_Offset off, void *buf, int count, MPI_Datatype dt, MPI_Status *st) {
  da_fault_point("input");
  SECTION("MPI_File_read_at_all (MPI-IO)", PMPI_File_read_at_all(fh, off, buf, count, dt, st));
}

int MPI_File_write_at_all(MPI_File fh, MPI_Offset off, const void *buf, int count, MPI_Datatype dt, MPI_Status *st) {
  da_fault_point("output");
  SECTION("MPI_File_write_at_all (MPI-IO)", PMPI_File_write_at_all(fh, off, buf, count, dt, st));
}

int MPI_File_set_size(MPI_File fh, MPI_Offset size) {
  SECTION("MPI_File_set_size (MPI-IO)", PMPI_File_set_size(fh, size));
}

int MPI_File_sync(MPI_File fh) { SECTION("MPI_File_sync (MPI-IO)", PMPI_File_sync(fh)); }

int MPI_File_close(MPI_File *fh) { SECTION("MPI_File_close (MPI-IO)", PMPI_File_close(fh)); }


int MPI_Allreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("allreduce on a sub-communicator",
                                      PMPI_Allreduce(sbuf, rbuf, count, dt, op, comm));
  MPI_Request r;
  int rc = PMPI_Iallreduce(sbuf, rbuf, count, dt, op, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "allreduce");
}

int MPI_Reduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, int root, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("reduce on a sub-communicator",
                                      PMPI_Reduce(sbuf, rbuf, count, dt, op, root, comm));
  MPI_Request r;
  int rc = PMPI_Ireduce(sbuf, rbuf, count, dt, op, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "reduce");
}

int MPI_Barrier(MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("barrier on a sub-communicator", PMPI_Barrier(comm));
  MPI_Request r;
  int rc = PMPI_Ibarrier(comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "barrier");
}

int MPI_Bcast(void *buf, int count, MPI_Datatype dt, int root, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("broadcast on a sub-communicator", PMPI_Bcast(buf, count, dt, root, comm));
  MPI_Request r;
  int rc = PMPI_Ibcast(buf, count, dt, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "broadcast");
}

int MPI_Gather(const void *sbuf, int scount, MPI_Datatype sdt, void *rbuf, int rcount, MPI_Datatype rdt, int root,
               MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("gather on a sub-communicator",
                                      PMPI_Gather(sbuf, scount, sdt, rbuf, rcount, rdt, root, comm));
  MPI_Request r;
  int rc = PMPI_Igather(sbuf, scount, sdt, rbuf, rcount, rdt, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "gather");
}

int MPI_Allgather(const void *sbuf, int scount, MPI_Datatype sdt, void *rbuf, int rcount, MPI_Datatype rdt,
                  MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) SECTION("allgather on a sub-communicator",
                                      PMPI_Allgather(sbuf, scount, sdt, rbuf, rcount, rdt, comm));
  MPI_Request r;
  int rc = PMPI_Iallgather(sbuf, scount, sdt, rbuf, rcount, rdt, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "allgather");
}

int da_fault_notice(void) {
  int flag = 0;
  MPI_Status s;
  if (PMPI_Iprobe(MPI_ANY_SOURCE, DA_FAULT_TAG, MPI_COMM_WORLD, &flag, &s) != MPI_SUCCESS || !flag) return -1;
  return s.MPI_SOURCE;
}

/* Roll call: tell every rank "I gave up", listen for the same from every rank for the grace
 * period. Survivors all get here within about one deadline of the stall (each waits on the
 * silent rank directly or on a rank that waits on it), so the ones never heard from are the
 * stopped, killed or hung ones. Sends are never waited for: MPI_Abort reclaims them. */
_Noreturn void da_fault_abort(const char *what) {
  int was = DA_END_NONE;
  if (!atomic_compare_exchange_strong(&aborting, &was, DA_END_ROLLCALL)) /* the other thread is at it */
    for (;;) sleep_s(1);
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  fflush(stdout);
  fflush(stderr);
  int *heard = calloc((size_t)P, sizeof *heard), *in = calloc((size_t)P, sizeof *in);
  MPI_Request *rr = malloc((size_t)P * sizeof *rr), *sr = malloc((size_t)P * sizeof *sr);
  static int me_sent;
  me_sent = me;
  if (P > 1 && heard && in && rr && sr) {
    for (int i = 0; i < P; i++) {
      rr[i] = sr[i] = MPI_REQUEST_NULL;
      if (i == me) continue;
      PMPI_Irecv(&in[i], 1, MPI_INT, i, DA_FAULT_TAG, MPI_COMM_WORLD, &rr[i]);
      PMPI_Isend(&me_sent, 1, MPI_INT, i, DA_FAULT_TAG, MPI_COMM_WORLD, &sr[i]);
    }
    heard[me] = 1;
    const double grace = deadline() < 5 ? deadline() : 5, t0 = da_time_now();
    int nheard = 1;
    for (long it = 0; nheard < P && da_time_now() - t0 < grace; it++) {
      for (int i = 0; i < P; i++) {
        int flag = 0;
        if (heard[i] || rr[i] == MPI_REQUEST_NULL) continue;
        if (PMPI_Test(&rr[i], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) heard[i] = 1, nheard++;
      }
      pause_a_little(it);
    }
    int lowest = me;
    for (int i = 0; i < me; i++)
      if (heard[i]) {
        lowest = i;
        break;
      }
    if (lowest == me && nheard < P) {
      char list[512];
      size_t n = 0;
      int shown = 0;
      list[0] = 0;
      for (int i = 0; i < P && n < sizeof list - 16; i++)
        if (!heard[i]) n += (size_t)snprintf(list + n, sizeof list - n, "%s%d", shown++ ? ", " : "", i);
      if (shown < P - nheard) snprintf(list + n, sizeof list - n, ", ...");
      fprintf(stderr, "distattn: rank %d: rank%s %s did not answer within %g s after the deadline (stopped, killed "
              "or hung); %d of %d ranks gave up waiting: ending the job\n", me, P - nheard > 1 ? "s" : "", list, grace,
              nheard, P);
    } else if (lowest == me) {
      fprintf(stderr, "distattn: rank %d: every rank gave up waiting (%s): ending the job\n", me, what);
    }
    fflush(stderr);
    if (lowest != me) {
      /* Let the lowest survivor print and abort first: its MPI_Abort ends this process too. */
      const double t1 = da_time_now();
      for (long it = 64; da_time_now() - t1 < 3; it++) pause_a_little(it);
    }
  }
  if (atomic_exchange(&aborting, DA_END_ABORT) == DA_END_ABORT) /* the watchdog is aborting already */
    for (;;) sleep_s(1);
  PMPI_Abort(MPI_COMM_WORLD, 1);
  abort(); /* not reached: MPI_Abort does not return */
}
