/* fault.h: how the `distattn` program ends a job whose peer stopped answering. The library only
 * returns DA_ERR_TIMEOUT; the program turns silence into a message and an exit (fault.c):
 *  - its blocking collectives on MPI_COMM_WORLD (MPI_Allreduce, MPI_Barrier, MPI_Bcast,
 *    MPI_Gather, MPI_Allgather, MPI_Reduce, wherever the launcher calls them) are replaced through
 *    MPI's profiling interface by nonblocking ones polled against the deadline (the --timeout of
 *    the plan created last, else DISTATTN_TIMEOUT or 300 s);
 *  - once a deadline has expired in this process (the library raised DA_ERR_TIMEOUT), the next
 *    such collective does not wait at all: the peers are in unknown states;
 *  - either way the rank joins a roll call and the job is aborted (da_fault_abort).
 * Collectives on other communicators (the library's own, dup'ed) pass straight through. */
#ifndef DA_FAULT_H
#define DA_FAULT_H

#ifdef __cplusplus
extern "C" {
#endif

/* After MPI_Init_thread (provided: the thread level granted): the deadline (this rank's
 * --timeout, read from argv before the options are agreed on, else the plan's, else
 * DISTATTN_TIMEOUT or 300 s), the test hook DISTATTN_TEST_FAULT, and, at P > 1 with
 * MPI_THREAD_MULTIPLE, the watchdog thread (fault.c): heartbeats with the two ring neighbours,
 * so a rank stopped anywhere (inside a long compute step included) is named by its neighbours
 * within max(deadline, 2 s) + min(deadline, 5 s) + 1 s (the waits' own deadlines and the roll
 * call come first: their messages say more), and a bound on the blocking calls the wrappers mark
 * (MPI-IO, communicator splits, collectives on sub-communicators). Returns 0, or 2 when the test
 * hook is malformed (message printed). */
int da_fault_start(int argc, char **argv, int provided);
/* Before MPI_Finalize: goodbyes with the neighbours (a neighbour stopped now is still caught),
 * then the watchdog ends. */
void da_fault_stop(void);

/* Test only: DISTATTN_TEST_FAULT=RANK:POINT[:stop|kill][:DELAY_S] makes world rank RANK send
 * itself SIGSTOP (default) or SIGKILL the first time it reaches POINT (after DELAY_S seconds,
 * from a helper thread, when given: to land inside a long compute step). It first prints
 * "DISTATTN_TEST_FAULT: SIG... at POINT (wall T)" (T: CLOCK_REALTIME) so a test can time the
 * job's end. Points: setup (before the options are agreed on), place (placement), plan (before
 * the plan / cache / offload is created), forward (the first forward or decode step), backward
 * (the first backward), verify, input / output (the first collective MPI-IO read / write). */
void da_fault_point(const char *point);

/* Test only: DISTATTN_TEST_FAIL_ALLOC=RANK:SITE makes the allocation at SITE (row_stats: the
 * backward check's row tables in `run --verify`) fail on world rank RANK, as if malloc had
 * returned NULL. 1 there, else 0. */
int da_test_fail_alloc(const char *site);

/* A rank gave up waiting (what: where). Roll call on MPI_COMM_WORLD: every rank that reaches
 * here tells every other one; after a grace period (min(deadline, 5 s)) the lowest surviving
 * rank prints which ranks never answered ("stopped, killed or hung"); MPI_Abort then ends the
 * job with exit code 1. */
_Noreturn void da_fault_abort(const char *what);

/* Has some rank already given up (entered da_fault_abort)? Its world rank, or -1. A probe only:
 * the notice stays queued for this rank's own roll call. For loops that wait on nobody (e.g. the
 * compute rank of an offload group that is still healthy) and would otherwise only learn of the
 * failure when MPI_Abort ends them. */
int da_fault_notice(void);

#ifdef __cplusplus
}
#endif
#endif /* DA_FAULT_H */
