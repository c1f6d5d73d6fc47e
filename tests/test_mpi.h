/* test_mpi.h: what the MPI test programs share: the setup their main starts with, the choice of
 * tests, the reductions over ranks their checks use, and the Check runner they end with. Tests
 * run unforked (an MPI process cannot fork and go on), only rank 0 prints, and the failures are
 * summed over the ranks so that every rank exits with the same verdict. */
#ifndef DA_TEST_MPI_H
#define DA_TEST_MPI_H

#include <check.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"

/* MPI_Init, this rank and the job's size, a context of one thread (ranks are oversubscribed on
 * the test machines) and, when comm is not NULL, its communicator over MPI_COMM_WORLD. A setup
 * failure aborts the job: the test program may; the library never does. */
static inline void tu_mpi_setup(int *argc, char ***argv, int *rank, int *size, da_context_t **ctx, da_comm_t **comm) {
  MPI_Init(argc, argv);
  MPI_Comm_rank(MPI_COMM_WORLD, rank);
  MPI_Comm_size(MPI_COMM_WORLD, size);
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = 1;
  if (da_context_create(&cfg, ctx) != DA_SUCCESS || (comm && da_comm_create(*ctx, MPI_COMM_WORLD, comm) != DA_SUCCESS)) {
    fprintf(stderr, "rank %d: setup failed: %s\n", *rank, da_last_error(*ctx));
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

/* A program's tests by name: all of them go into tc, or only the one DISTATTN_TEST_ONLY names
 * (to run one test when debugging). */
typedef struct {
  const char *name;
  const TTest *t;
} tu_test_t;
static inline void tu_add_tests(TCase *tc, const tu_test_t *tests, size_t n) {
  const char *only = getenv("DISTATTN_TEST_ONLY");
  for (size_t i = 0; i < n; i++)
    if (!only || !strcmp(only, tests[i].name)) tcase_add_test(tc, tests[i].t);
}

/* The program's one suite: one test case named tcase holding tests (through tu_add_tests). Its
 * Check timeout is off (0): Check cannot time out an unforked test anyway; ctest's TIMEOUT
 * bounds the program. */
static inline Suite *tu_mpi_suite(const char *name, const char *tcase, const tu_test_t *tests, size_t n) {
  Suite *s = suite_create(name);
  TCase *tc = tcase_create(tcase);
  tcase_set_timeout(tc, 0);
  tu_add_tests(tc, tests, n);
  suite_add_tcase(s, tc);
  return s;
}

/* x combined over the ranks with op (MPI_SUM, MPI_MIN, MPI_MAX), on every rank. */
static inline double tu_reduce(double x, MPI_Op op) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, op, MPI_COMM_WORLD);
  return x;
}
/* 1 on every rank when bad is nonzero on any rank. */
static inline int tu_any_rank(int bad) {
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any != 0;
}
/* 1 on every rank when every rank's status is want (a collective error must reach them all). */
static inline int tu_all_equal_status(da_status_t st, da_status_t want) { return !tu_any_rank(st != want); }

static inline int tu_mpi_run(Suite *s, int rank) {
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK);
  srunner_run_all(sr, rank == 0 ? CK_NORMAL : CK_SILENT);
  int failed = srunner_ntests_failed(sr), total = 0;
  srunner_free(sr);
  MPI_Allreduce(&failed, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

/* The end of a main that began with tu_mpi_setup: runs s (tu_mpi_run), frees comm and ctx
 * (either may be NULL), finalizes MPI and returns the program's exit status, 1 on every rank
 * when a test failed on any rank. */
static inline int tu_mpi_finish(Suite *s, int rank, da_context_t *ctx, da_comm_t *comm) {
  int total = tu_mpi_run(s, rank);
  if (rank == 0 && total) printf("%d failures summed over ranks\n", total);
  da_comm_free(comm);
  da_context_free(ctx);
  MPI_Finalize();
  return total ? 1 : 0;
}

#endif
