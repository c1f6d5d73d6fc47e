/* fault.c: deadlines on the `distattn` program's own collectives and the roll call that ends a
 * job whose peer went silent (fault.h). Not library code: it aborts the job, by design. A rank
 * killed outright (SIGKILL) is noticed by the MPI runtime, which ends the job naming it; a rank
 * that is stopped (SIGSTOP) or hung is visible only as silence, which the deadlines (the
 * library's and these) and the roll call turn into a message and an exit. */
#include "fault.h"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "core.h"
#include "kvcache.h"   /* da_comm_default_timeout: DISTATTN_TIMEOUT or 300 s */
#include "transport.h" /* da_xport_deadline: the --timeout of the plan created last */

enum { DA_FAULT_TAG = 0x7EAD }; /* point-to-point tag of the roll call on MPI_COMM_WORLD */

static double deadline(void) {
  double t = da_xport_deadline();
  return t > 0 ? t : da_comm_default_timeout();
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
     * deadline. Its message may not have been printed yet (the command reduces statuses first). */
    fprintf(stderr, "distattn: rank %d: %s\n", me, da_error_message());
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

/* ---- the profiling-interface wrappers: MPI_COMM_WORLD only ---- */

int MPI_Allreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Allreduce(sbuf, rbuf, count, dt, op, comm);
  MPI_Request r;
  int rc = PMPI_Iallreduce(sbuf, rbuf, count, dt, op, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "allreduce");
}

int MPI_Reduce(const void *sbuf, void *rbuf, int count, MPI_Datatype dt, MPI_Op op, int root, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Reduce(sbuf, rbuf, count, dt, op, root, comm);
  MPI_Request r;
  int rc = PMPI_Ireduce(sbuf, rbuf, count, dt, op, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "reduce");
}

int MPI_Barrier(MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Barrier(comm);
  MPI_Request r;
  int rc = PMPI_Ibarrier(comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "barrier");
}

int MPI_Bcast(void *buf, int count, MPI_Datatype dt, int root, MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Bcast(buf, count, dt, root, comm);
  MPI_Request r;
  int rc = PMPI_Ibcast(buf, count, dt, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "broadcast");
}

int MPI_Gather(const void *sbuf, int scount, MPI_Datatype sdt, void *rbuf, int rcount, MPI_Datatype rdt, int root,
               MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Gather(sbuf, scount, sdt, rbuf, rcount, rdt, root, comm);
  MPI_Request r;
  int rc = PMPI_Igather(sbuf, scount, sdt, rbuf, rcount, rdt, root, comm, &r);
  return rc != MPI_SUCCESS ? rc : wait_bounded(&r, "gather");
}

int MPI_Allgather(const void *sbuf, int scount, MPI_Datatype sdt, void *rbuf, int rcount, MPI_Datatype rdt,
                  MPI_Comm comm) {
  if (comm != MPI_COMM_WORLD) return PMPI_Allgather(sbuf, scount, sdt, rbuf, rcount, rdt, comm);
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
  PMPI_Abort(MPI_COMM_WORLD, 1);
  abort(); /* not reached: MPI_Abort does not return */
}
