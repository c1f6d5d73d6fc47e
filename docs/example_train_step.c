/* example_train_step.c: one training step of an attention layer with the sequence split over
 * the ranks of an MPI job (zigzag layout), written against the public API only. Each rank holds
 * its own rows; here they are filled with toy values, in a model they come from the projections.
 * Build: part of the CMake build (target example_train_step); run: mpirun -np 4 ./example_train_step */
#include <mpi.h> /* before distattn.h: declares the distributed API */
#include <distattn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                     \
  do {                                                                                  \
    da_status_t st_ = (call);                                                           \
    if (st_ != DA_SUCCESS) {                                                            \
      fprintf(stderr, "%s failed: %s: %s\n", #call, da_status_string(st_), da_last_error(ctx)); \
      goto done; /* every rank gets an error status too: no rank is left waiting */    \
    }                                                                                   \
  } while (0)

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, rc = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_plan_t *plan = NULL;
  float *buf = NULL;

  /* 1. Once per model: context (backend, threads) and communicator (a private MPI_Comm dup). */
  if (da_context_create(NULL, &ctx) != DA_SUCCESS) goto done;
  CHECK(da_comm_create(ctx, MPI_COMM_WORLD, &comm));

  /* 2. Once per shape: the plan. All ranks pass the same problem (checked: a mismatch is
   *    DA_ERR_MISMATCH everywhere). 8K tokens, 8 query heads sharing 2 KV heads, causal. */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 8192, prob.heads = 8, prob.kv_heads = 2, prob.dim = 64, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = DA_ALGO_ZIGZAG; /* balanced work under a causal mask */
  CHECK(da_plan_create(comm, &prob, &cfg, &plan));

  /* 3. This rank's rows and where they sit in the sequence (the model's position embeddings and
   *    the loss need the global positions). */
  const int64_t n = da_plan_local_rows(plan), H = 8, G = 2, D = 64;
  int64_t *pos = malloc((size_t)(n + 1) * sizeof *pos);
  CHECK(da_plan_local_positions(plan, pos, n));
  size_t qn = (size_t)(n * H * D), kn = (size_t)(n * G * D);
  buf = calloc(6 * qn + 4 * kn + (size_t)(n * H) + 1, sizeof(float));
  float *q = buf, *out = q + qn, *dout = out + qn, *dq = dout + qn, *k = dq + qn, *v = k + kn;
  float *dk = v + kn, *dv = dk + kn, *lse = dv + kn;
  for (size_t i = 0; i < qn; i++) q[i] = sinf(0.001f * (float)(i + pos[0])), dout[i] = 1e-3f;
  for (size_t i = 0; i < kn; i++) k[i] = cosf(0.002f * (float)i), v[i] = 0.5f;

  da_tensor_t tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
  const int64_t sq[3] = {n, H, D}, sk[3] = {n, G, D}, sl[2] = {n, H};
  da_tensor_make(&tq, q, DA_FLOAT32, 3, sq), da_tensor_make(&to, out, DA_FLOAT32, 3, sq);
  da_tensor_make(&tdo, dout, DA_FLOAT32, 3, sq), da_tensor_make(&tdq, dq, DA_FLOAT32, 3, sq);
  da_tensor_make(&tk, k, DA_FLOAT32, 3, sk), da_tensor_make(&tv, v, DA_FLOAT32, 3, sk);
  da_tensor_make(&tdk, dk, DA_FLOAT32, 3, sk), da_tensor_make(&tdv, dv, DA_FLOAT32, 3, sk);
  da_tensor_make(&tl, lse, DA_FLOAT32, 2, sl);

  /* 4. Every step: forward (keep lse for the backward), the rest of the model, backward. dk and
   *    dv come back for this rank's OWN key rows: they travelled the ring and returned home. */
  CHECK(da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL));
  /* ... loss, dout = dLoss/dout ... */
  CHECK(da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, NULL));

  da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
  CHECK(da_plan_stats(plan, &s));
  if (rank == 0)
    printf("rank 0: %lld rows, fwd %.3f s (exposed comm %.3f s), bwd %.3f s, sent %.1f MiB\n", (long long)n, s.fwd_s,
           s.fwd_exposed_s, s.bwd_s, (double)(s.fwd_bytes_sent + s.bwd_bytes_sent) / 1048576.0);
  free(pos);
  rc = 0;
done:
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  free(buf);
  MPI_Finalize();
  return rc;
}
