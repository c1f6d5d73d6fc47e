/* decode_loop.c: generation with the KV cache spread over the ranks of an MPI job, written
 * against the public API only. A distributed prefill (da_plan_fwd over the prompt, zigzag) leaves
 * each rank its own k/v rows; they go into the paged cache as they are (same layout, no message),
 * then every step appends the new token's k/v (each page lands on one rank, shards stay within a
 * page of each other) and runs one decode step: the split-KV kernel on every rank's shard and one
 * fused reduction of the (o, lse) partials. Each step is checked against float64 attention over
 * the whole sequence, which every rank can regenerate (the "model" here is a seeded hash).
 *
 *   mpirun -np 3 build/examples/example_decode_loop [tree|ring] [steps]
 */
#include <mpi.h> /* before distattn.h: declares the distributed API */
#include <distattn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { B = 2, H = 8, G = 2, D = 64, PROMPT = 300, PAGE = 32 };

/* Seeded values in [-1, 1): a splitmix64 hash of (stream, index). */
static double uniform(uint64_t stream, uint64_t i) {
  uint64_t z = stream * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-52 - 1.0;
}
/* The k (which = 0) or v (which = 1) row of sequence b at global position pos: [G][D]. */
static float kv_value(int which, int b, int64_t pos, int g, int d) {
  return (float)uniform(100 + 2 * (uint64_t)b + (uint64_t)which, ((uint64_t)pos * G + (uint64_t)g) * D + (uint64_t)d);
}

/* float64 reference of one query row q [H][D] (fp32 values) against positions 0 .. len-1. */
static void reference(int b, int64_t len, const float *q, double *out, double *lse) {
  double *s = malloc(sizeof(double) * (size_t)len);
  for (int h = 0; h < H; h++) {
    const int g = h / (H / G);
    double m = -INFINITY, l = 0.0;
    for (int64_t j = 0; j < len; j++) {
      double dot = 0.0;
      for (int d = 0; d < D; d++) dot += (double)q[h * D + d] * kv_value(0, b, j, g, d);
      s[j] = dot / sqrt((double)D), m = fmax(m, s[j]);
    }
    for (int64_t j = 0; j < len; j++) s[j] = exp(s[j] - m), l += s[j];
    for (int d = 0; d < D; d++) {
      double acc = 0.0;
      for (int64_t j = 0; j < len; j++) acc += s[j] * kv_value(1, b, j, g, d);
      out[h * D + d] = acc / l;
    }
    lse[h] = m + log(l);
  }
  free(s);
}

#define CHECK(call)                                                                                          \
  do {                                                                                                       \
    da_status_t st_ = (call);                                                                                \
    if (st_ != DA_SUCCESS) {                                                                                 \
      fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank, #call, da_status_string(st_), da_last_error(ctx)); \
      goto done;                                                                                             \
    }                                                                                                        \
  } while (0)

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, nranks, rc = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  const int ring = argc > 1 && strcmp(argv[1], "ring") == 0;
  const int steps = argc > 2 ? atoi(argv[2]) : 6;
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_plan_t *plan = NULL;
  da_kvcache_t *cache = NULL;
  da_decode_plan_t *dplan = NULL;
  float *pq = NULL, *pk = NULL, *pv = NULL, *po = NULL;
  int64_t *pos = NULL, *cpos = NULL;

  if (da_context_create(NULL, &ctx) != DA_SUCCESS) {
    fprintf(stderr, "rank %d: da_context_create: %s\n", rank, da_last_error(NULL));
    goto done;
  }
  CHECK(da_comm_create(ctx, MPI_COMM_WORLD, &comm));

  /* 1. Prefill: causal attention over the prompts of the B sequences, each rank its zigzag rows. */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.seq = PROMPT, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t pcfg = DA_PLAN_CONFIG_INITIALIZER;
  pcfg.algo = DA_ALGO_ZIGZAG;
  CHECK(da_plan_create(comm, &prob, &pcfg, &plan));
  const int64_t n = da_plan_local_rows(plan);
  pos = malloc(sizeof *pos * (size_t)(n + 1)), cpos = malloc(sizeof *cpos * (size_t)(n + 1));
  CHECK(da_plan_local_positions(plan, pos, n));
  const size_t nq = (size_t)B * (size_t)n * H * D + 1, nk = (size_t)B * (size_t)n * G * D + 1;
  pq = malloc(sizeof(float) * nq), po = malloc(sizeof(float) * nq);
  pk = malloc(sizeof(float) * nk), pv = malloc(sizeof(float) * nk);
  for (int b = 0; b < B; b++)
    for (int64_t i = 0; i < n; i++) {
      for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++)
          pq[(((size_t)b * n + i) * H + h) * D + d] = (float)uniform(7 + b, ((uint64_t)pos[i] * H + h) * D + d);
      for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) {
          pk[(((size_t)b * n + i) * G + g) * D + d] = kv_value(0, b, pos[i], g, d);
          pv[(((size_t)b * n + i) * G + g) * D + d] = kv_value(1, b, pos[i], g, d);
        }
    }
  da_tensor_t tq, tk, tv, to;
  da_tensor_make(&tq, pq, DA_FLOAT32, 4, (int64_t[]){B, n, H, D});
  da_tensor_make(&to, po, DA_FLOAT32, 4, (int64_t[]){B, n, H, D});
  da_tensor_make(&tk, pk, DA_FLOAT32, 4, (int64_t[]){B, n, G, D});
  da_tensor_make(&tv, pv, DA_FLOAT32, 4, (int64_t[]){B, n, G, D});
  CHECK(da_plan_fwd(plan, &tq, &tk, &tv, &to, NULL, NULL));

  /* 2. The cache, with the prefill's layout: each rank's k/v rows go into its own pages as they
   *    are. The view of sequence b is [n][G][D] at offset b * n * G * D. */
  da_kvcache_config_t ccfg = DA_KVCACHE_CONFIG_INITIALIZER;
  ccfg.page = PAGE, ccfg.layout = DA_ALGO_ZIGZAG;
  CHECK(da_kvcache_create(comm, &prob, &ccfg, &cache));
  for (int b = 0; b < B; b++) {
    da_tensor_t kb, vb;
    da_tensor_make(&kb, pk + (size_t)b * n * G * D, DA_FLOAT32, 3, (int64_t[]){n, G, D});
    da_tensor_make(&vb, pv + (size_t)b * n * G * D, DA_FLOAT32, 3, (int64_t[]){n, G, D});
    CHECK(da_kvcache_prefill(cache, b, PROMPT, &kb, &vb));
  }
  CHECK(da_kvcache_local_positions(cache, 0, cpos, n));
  if (memcmp(pos, cpos, sizeof *pos * (size_t)n) != 0) fprintf(stderr, "rank %d: cache rows differ from the plan's\n", rank);

  /* 3. The decode plan: tree (one fused reduction, output on every rank) or the ring baseline. */
  da_decode_config_t dcfg = DA_DECODE_CONFIG_INITIALIZER;
  dcfg.algo = ring ? DA_DECODE_RING : DA_DECODE_TREE;
  CHECK(da_decode_plan_create(comm, &prob, &dcfg, &dplan));

  /* 4. The loop. The new token's query depends on the previous step's output (the replicated
   *    result every rank got), as a model's would; its k and v come from the seeded "model". */
  float q[B][H][D], out[B][H][D], lse[B][H], knew[B][G][D], vnew[B][G][D];
  double ref[H * D], ref_lse[H], worst = 0.0;
  memset(out, 0, sizeof out);
  if (rank == 0)
    printf("# decode_loop: %d ranks, %s, B = %d, H = %d, G = %d, D = %d, prompt %d, page %d\n", nranks,
           ring ? "ring" : "tree", B, H, G, D, PROMPT, PAGE);
  if (rank == 0) printf("%5s %8s %10s %10s %10s %11s\n", "step", "length", "step_ms", "reduce_ms", "bytes", "max_rel_err");
  for (int t = 0; t < steps; t++) {
    int64_t ntok[B];
    for (int b = 0; b < B; b++) {
      const int64_t p = da_kvcache_length(cache, b); /* the new token's position */
      ntok[b] = 1;
      for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++)
          q[b][h][d] = 0.5f * out[b][h][d] + 0.5f * (float)uniform(7 + b, ((uint64_t)p * H + h) * D + d);
      for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) knew[b][g][d] = kv_value(0, b, p, g, d), vnew[b][g][d] = kv_value(1, b, p, g, d);
    }
    da_tensor_t tkn, tvn, tqs, tos, tls;
    da_tensor_make(&tkn, knew, DA_FLOAT32, 3, (int64_t[]){B, G, D}); /* [B][G][D]: one token each */
    da_tensor_make(&tvn, vnew, DA_FLOAT32, 3, (int64_t[]){B, G, D});
    da_tensor_make(&tqs, q, DA_FLOAT32, 3, (int64_t[]){B, H, D});
    da_tensor_make(&tos, out, DA_FLOAT32, 3, (int64_t[]){B, H, D});
    da_tensor_make(&tls, lse, DA_FLOAT32, 2, (int64_t[]){B, H});
    CHECK(da_kvcache_append(cache, ntok, &tkn, &tvn)); /* collective: starts the counts' check, completed by the step */
    CHECK(da_decode_step(dplan, cache, &tqs, &tos, &tls, NULL));

    double err = 0.0;
    for (int b = 0; b < B; b++) {
      reference(b, da_kvcache_length(cache, b), &q[b][0][0], ref, ref_lse);
      double mx = 1e-6, diff = 0.0;
      for (int i = 0; i < H * D; i++) mx = fmax(mx, fabs(ref[i])), diff = fmax(diff, fabs(out[b][i / D][i % D] - ref[i]));
      err = fmax(err, diff / mx);
      for (int h = 0; h < H; h++) err = fmax(err, fabs(lse[b][h] - ref_lse[h]) / fmax(1.0, fabs(ref_lse[h])));
    }
    MPI_Allreduce(MPI_IN_PLACE, &err, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    worst = fmax(worst, err);
    da_decode_stats_t s = DA_DECODE_STATS_INITIALIZER;
    CHECK(da_decode_plan_stats(dplan, &s));
    uint64_t bytes = s.bytes_sent;
    MPI_Allreduce(MPI_IN_PLACE, &bytes, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
      printf("%5d %8lld %10.3f %10.3f %10llu %11.1e\n", t, (long long)da_kvcache_length(cache, 0), s.step_s * 1e3,
             s.reduce_s * 1e3, (unsigned long long)bytes, err);
  }
  size_t rows_bytes = 0;
  da_kvcache_bytes(cache, &rows_bytes);
  if (rank == 0) {
    printf("# rank 0 holds %lld of %lld rows of sequence 0 (%.1f KiB of k/v)\n", (long long)da_kvcache_local_rows(cache, 0),
           (long long)da_kvcache_length(cache, 0), (double)rows_bytes / 1024.0);
    printf("# max relative error %.1e against float64\n# %s\n", worst, worst < 1e-4 ? "PASS" : "FAIL");
  }
  rc = worst < 1e-4 ? 0 : 1;
done:
  da_decode_plan_free(dplan);
  da_kvcache_free(cache);
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  free(pq), free(pk), free(pv), free(po), free(pos), free(cpos);
  MPI_Finalize();
  return rc;
}
