/* consumer.c: a program outside the source tree that uses the INSTALLED distattn (header,
 * library, pkg-config or CMake package) the way a user does; built and run by check.sh.
 * It runs a distributed causal forward (zigzag) on every rank's rows and checks them against the
 * single-rank call on the whole sequence, which every rank computes (small sizes). */
#include <mpi.h>
#include <distattn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { S = 97, H = 4, G = 2, D = 32 };

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, nranks, bad = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_plan_t *plan = NULL;
  static float q[S * H * D], k[S * G * D], v[S * G * D], out[S * H * D], ql[S * H * D], kl[S * G * D], vl[S * G * D],
      ol[S * H * D];
  int64_t pos[S];
  for (int i = 0; i < S * H * D; i++) q[i] = sinf(0.37f * (float)i);
  for (int i = 0; i < S * G * D; i++) k[i] = cosf(0.11f * (float)i), v[i] = sinf(0.05f * (float)i + 1.0f);

  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = S, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = DA_ALGO_ZIGZAG;
  da_tensor_t tq, tk, tv, to;
  if (da_context_create(NULL, &ctx) != DA_SUCCESS) goto done;
  da_tensor_make(&tq, q, DA_FLOAT32, 3, (int64_t[]){S, H, D});
  da_tensor_make(&tk, k, DA_FLOAT32, 3, (int64_t[]){S, G, D});
  da_tensor_make(&tv, v, DA_FLOAT32, 3, (int64_t[]){S, G, D});
  da_tensor_make(&to, out, DA_FLOAT32, 3, (int64_t[]){S, H, D});
  if (da_attention_fwd(ctx, &prob, &tq, &tk, &tv, &to, NULL, NULL) != DA_SUCCESS) goto done;

  if (da_comm_create(ctx, MPI_COMM_WORLD, &comm) != DA_SUCCESS || da_plan_create(comm, &prob, &cfg, &plan) != DA_SUCCESS)
    goto done;
  const int64_t n = da_plan_local_rows(plan);
  if (da_plan_local_positions(plan, pos, n) != DA_SUCCESS) goto done;
  for (int64_t i = 0; i < n; i++) {
    for (int j = 0; j < H * D; j++) ql[i * H * D + j] = q[pos[i] * H * D + j];
    for (int j = 0; j < G * D; j++) kl[i * G * D + j] = k[pos[i] * G * D + j], vl[i * G * D + j] = v[pos[i] * G * D + j];
  }
  da_tensor_make(&tq, ql, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tk, kl, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&tv, vl, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&to, ol, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  if (da_plan_fwd(plan, &tq, &tk, &tv, &to, NULL, NULL) != DA_SUCCESS) goto done;
  double err = 0.0;
  for (int64_t i = 0; i < n; i++)
    for (int j = 0; j < H * D; j++) err = fmax(err, fabs((double)ol[i * H * D + j] - out[pos[i] * H * D + j]));
  bad = err > 1e-5;
  if (bad) fprintf(stderr, "rank %d: distributed rows differ from the single-rank result by %.2e\n", rank, err);
done:
  if (bad && ctx) fprintf(stderr, "rank %d: %s\n", rank, da_last_error(ctx));
  MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) printf("consumer: distattn %s, %d ranks: %s\n", da_version_string(), nranks, bad ? "FAIL" : "ok");
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  MPI_Finalize();
  return bad;
}
