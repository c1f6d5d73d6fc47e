/* pingpong.c: point-to-point latency and bandwidth between ranks 0 and 1 of a real MPI job, for the
 * calibration of the simulated platform of this machine (sim/calibrate.py, docs/scaling.md).
 * Prints one JSON line from rank 0: half the round-trip of an 8-byte message, and the one-way rate
 * of a large one (median of the repetitions). Not part of the library: built by the script. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Median one-way time of `bytes` between ranks 0 and 1 over `reps` round trips. */
static double one_way(char *buf, int bytes, int reps, int rank) {
  double *t = malloc((size_t)reps * sizeof *t);
  for (int i = -2; i < reps; i++) { /* two warm-up trips */
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    if (rank == 0) {
      MPI_Send(buf, bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
      MPI_Recv(buf, bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      MPI_Recv(buf, bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(buf, bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
    }
    if (i >= 0) t[i] = (MPI_Wtime() - t0) / 2;
  }
  qsort(t, (size_t)reps, sizeof *t, cmp);
  double m = t[reps / 2];
  free(t);
  return m;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int big = argc > 1 ? atoi(argv[1]) : 16 << 20;
  char *buf = calloc((size_t)big, 1);
  double lat = one_way(buf, 8, 200, rank), t = one_way(buf, big, 20, rank);
  if (rank == 0 && size >= 2)
    printf("{\"cmd\":\"pingpong\",\"lat_us\":%.3f,\"bytes\":%d,\"gbps\":%.3f}\n", lat * 1e6, big, big / (t - lat) / 1e9);
  free(buf);
  MPI_Finalize();
  return 0;
}
