/* test_run.h: how the main of a forked unit suite ends. Only this: it needs nothing but Check, so
 * the launcher suites (test_place, test_gpumap), which are not built against core/, share it with
 * the rest. MPI programs end with tu_mpi_finish (test_mpi.h) instead, unforked. */
#ifndef DA_TEST_RUN_H
#define DA_TEST_RUN_H

#include <check.h>
#include <stdlib.h>

/* Runs s with Check's default fork mode (each test in its own process, so a crash fails one test;
 * CK_FORK=no in the environment runs them in-process for a debugger) and returns the program's
 * exit status: EXIT_FAILURE when any test failed. */
static inline int tu_run(Suite *s) {
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif /* DA_TEST_RUN_H */
