/* test_mpi.h: the Check runner every MPI test program ends with. Tests run unforked (an MPI
 * process cannot fork and go on), only rank 0 prints, and the failures are summed over the
 * ranks so that every rank exits with the same verdict. */
#ifndef DA_TEST_MPI_H
#define DA_TEST_MPI_H

#include <check.h>
#include <mpi.h>

static inline int tu_mpi_run(Suite *s, int rank) {
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK);
  srunner_run_all(sr, rank == 0 ? CK_NORMAL : CK_SILENT);
  int failed = srunner_ntests_failed(sr), total = 0;
  srunner_free(sr);
  MPI_Allreduce(&failed, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

#endif
