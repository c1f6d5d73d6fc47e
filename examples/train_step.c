/* train_step.c: one training step of a causal attention layer whose sequence is split over the
 * ranks of an MPI job, written against the public API only (include/distattn.h, libdistattn).
 * It runs the forward, a loss, the backward, checks the gradients against central finite
 * differences of the same layer computed in float64 on one process, takes an SGD step and shows
 * the loss going down. Not a benchmark: the sizes are small so the float64 check is cheap.
 *
 *   mpirun -np 3 build/examples/example_train_step        (or any -np; exits non-zero on failure)
 *
 * The layer, for x [S][E] (S tokens of width E), H query heads sharing G KV heads of dim D:
 *   q = x Wq, k = x Wk, v = x Wv        Wq [E][H*D], Wk and Wv [E][G*D]
 *   o = softmax(q k^T / sqrt(D), causal) v     (distattn, each rank its own rows)
 *   y = o Wo,  loss = 1/(2S) sum (y - t)^2     Wo [H*D][E], t the target
 * Each rank holds the rows the plan gives it (zigzag: balanced work under the causal mask); the
 * weights are replicated, so their gradients are summed over the ranks (MPI_Allreduce), exactly
 * as in data-parallel training. */
#include <mpi.h> /* before distattn.h: declares the distributed API */
#include <distattn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { S = 203, E = 32, H = 4, G = 2, D = 16, HD = H * D, GD = G * D };
enum { WQ, WK, WV, WO, NW };
static const int w_rows[NW] = {E, E, E, HD}, w_cols[NW] = {HD, GD, GD, E};
static const char *const w_name[NW] = {"Wq", "Wk", "Wv", "Wo"};

/* Seeded values any rank can regenerate: a splitmix64 hash of (stream, index) mapped to [-1, 1). */
static double uniform(uint64_t stream, uint64_t i) {
  uint64_t z = stream * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-52 - 1.0;
}

/* c[m][n] (+)= a[m][k] b[k][n], or with a transposed (a is [k][m]) or b transposed (b is [n][k]). */
static void matmul(double *c, const double *a, const double *b, int m, int k, int n, int ta, int tb, int acc) {
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double s = acc ? c[(size_t)i * n + j] : 0.0;
      for (int l = 0; l < k; l++)
        s += (ta ? a[(size_t)l * m + i] : a[(size_t)i * k + l]) * (tb ? b[(size_t)j * k + l] : b[(size_t)l * n + j]);
      c[(size_t)i * n + j] = s;
    }
}

/* The whole layer's loss in float64 on one process (all S rows): the oracle of the check. */
static double loss_f64(double *const w[NW], const double *x, const double *t) {
  double *q = malloc(sizeof(double) * S * HD), *k = malloc(sizeof(double) * S * GD);
  double *v = malloc(sizeof(double) * S * GD), *o = malloc(sizeof(double) * S * HD);
  double *y = malloc(sizeof(double) * S * E), p[S];
  matmul(q, x, w[WQ], S, E, HD, 0, 0, 0), matmul(k, x, w[WK], S, E, GD, 0, 0, 0), matmul(v, x, w[WV], S, E, GD, 0, 0, 0);
  const double scale = 1.0 / sqrt((double)D);
  for (int i = 0; i < S; i++)
    for (int h = 0; h < H; h++) {
      const int g = h / (H / G);
      double m = -INFINITY, l = 0.0;
      for (int j = 0; j <= i; j++) { /* causal */
        double s = 0.0;
        for (int d = 0; d < D; d++) s += q[((size_t)i * H + h) * D + d] * k[((size_t)j * G + g) * D + d];
        p[j] = s * scale, m = fmax(m, p[j]);
      }
      for (int j = 0; j <= i; j++) p[j] = exp(p[j] - m), l += p[j];
      for (int d = 0; d < D; d++) {
        double s = 0.0;
        for (int j = 0; j <= i; j++) s += p[j] * v[((size_t)j * G + g) * D + d];
        o[((size_t)i * H + h) * D + d] = s / l;
      }
    }
  matmul(y, o, w[WO], S, HD, E, 0, 0, 0);
  double loss = 0.0;
  for (int i = 0; i < S * E; i++) loss += 0.5 * (y[i] - t[i]) * (y[i] - t[i]) / S;
  free(q), free(k), free(v), free(o), free(y);
  return loss;
}

#define CHECK(call)                                                                                          \
  do {                                                                                                       \
    da_status_t st_ = (call);                                                                                \
    if (st_ != DA_SUCCESS) {                                                                                 \
      fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank, #call, da_status_string(st_), da_last_error(ctx)); \
      goto done; /* the other ranks get an error status from the same call: nobody is left waiting */       \
    }                                                                                                        \
  } while (0)

/* The state of one step on this rank: local rows of everything the backward needs. */
typedef struct {
  int64_t n;                    /* local rows */
  double *x, *t;                /* [n][E] this rank's inputs and targets */
  float *q, *k, *v, *o, *lse;   /* what the library reads and writes: [n][H][D], [n][G][D], [n][H] */
  float *dq, *dk, *dv, *dout;
  double *od, *y;               /* o in double, y = o Wo [n][E] */
} local_t;

/* Forward on the local rows: projections (double, then rounded to the fp32 the kernel takes),
 * distributed attention, output projection; returns the global loss (every rank). */
static da_status_t forward(da_plan_t *plan, local_t *L, double *const w[NW], double *loss) {
  const int64_t n = L->n;
  double *tmp = malloc(sizeof(double) * (size_t)(n ? n : 1) * HD);
  matmul(tmp, L->x, w[WQ], (int)n, E, HD, 0, 0, 0);
  for (int64_t i = 0; i < n * HD; i++) L->q[i] = (float)tmp[i];
  matmul(tmp, L->x, w[WK], (int)n, E, GD, 0, 0, 0);
  for (int64_t i = 0; i < n * GD; i++) L->k[i] = (float)tmp[i];
  matmul(tmp, L->x, w[WV], (int)n, E, GD, 0, 0, 0);
  for (int64_t i = 0; i < n * GD; i++) L->v[i] = (float)tmp[i];
  free(tmp);

  da_tensor_t tq, tk, tv, to, tl;
  da_tensor_make(&tq, L->q, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tk, L->k, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&tv, L->v, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&to, L->o, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tl, L->lse, DA_FLOAT32, 2, (int64_t[]){n, H});
  da_status_t st = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL); /* collective */
  if (st != DA_SUCCESS) return st;

  for (int64_t i = 0; i < n * HD; i++) L->od[i] = L->o[i];
  matmul(L->y, L->od, w[WO], (int)n, HD, E, 0, 0, 0);
  double part = 0.0;
  for (int64_t i = 0; i < n * E; i++) part += 0.5 * (L->y[i] - L->t[i]) * (L->y[i] - L->t[i]) / S;
  MPI_Allreduce(&part, loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return DA_SUCCESS;
}

/* Backward: dL/dy = (y - t)/S, through Wo, through the distributed attention (dq for the local
 * queries; dk, dv for the local keys, gathered from every rank whose queries saw them), through
 * the projections; weight gradients summed over the ranks. grad[w] has the shape of w. */
static da_status_t backward(da_plan_t *plan, local_t *L, double *const w[NW], double *const grad[NW]) {
  const int64_t n = L->n;
  double *dy = malloc(sizeof(double) * (size_t)(n ? n : 1) * E);
  double *dod = malloc(sizeof(double) * (size_t)(n ? n : 1) * HD);
  double *tmp = malloc(sizeof(double) * (size_t)(n ? n : 1) * HD);
  for (int64_t i = 0; i < n * E; i++) dy[i] = (L->y[i] - L->t[i]) / S;
  matmul(grad[WO], L->od, dy, HD, (int)n, E, 1, 0, 0); /* o^T dy */
  matmul(dod, dy, w[WO], (int)n, E, HD, 0, 1, 0);      /* dy Wo^T */
  for (int64_t i = 0; i < n * HD; i++) L->dout[i] = (float)dod[i];

  da_tensor_t tq, tk, tv, to, tdo, tl, tdq, tdk, tdv;
  da_tensor_make(&tq, L->q, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tk, L->k, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&tv, L->v, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&to, L->o, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tdo, L->dout, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tl, L->lse, DA_FLOAT32, 2, (int64_t[]){n, H});
  da_tensor_make(&tdq, L->dq, DA_FLOAT32, 3, (int64_t[]){n, H, D});
  da_tensor_make(&tdk, L->dk, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_tensor_make(&tdv, L->dv, DA_FLOAT32, 3, (int64_t[]){n, G, D});
  da_status_t st = da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, NULL); /* collective */
  if (st == DA_SUCCESS) {
    for (int64_t i = 0; i < n * HD; i++) tmp[i] = L->dq[i];
    matmul(grad[WQ], L->x, tmp, E, (int)n, HD, 1, 0, 0); /* x^T dq */
    for (int64_t i = 0; i < n * GD; i++) tmp[i] = L->dk[i];
    matmul(grad[WK], L->x, tmp, E, (int)n, GD, 1, 0, 0);
    for (int64_t i = 0; i < n * GD; i++) tmp[i] = L->dv[i];
    matmul(grad[WV], L->x, tmp, E, (int)n, GD, 1, 0, 0);
    for (int m = 0; m < NW; m++)
      MPI_Allreduce(MPI_IN_PLACE, grad[m], w_rows[m] * w_cols[m], MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  }
  free(dy), free(dod), free(tmp);
  return st;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, nranks, rc = 1, ok = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_plan_t *plan = NULL;
  int64_t *pos = NULL;
  local_t L = {0};
  double *w[NW] = {0}, *grad[NW] = {0}, *xg = malloc(sizeof(double) * S * E), *tg = malloc(sizeof(double) * S * E);

  /* The model: weights replicated on every rank (same seed), inputs and targets of all S tokens
   * generated everywhere only because the float64 check needs them; a rank uses its own rows. */
  for (int m = 0; m < NW; m++) {
    w[m] = malloc(sizeof(double) * (size_t)(w_rows[m] * w_cols[m]));
    grad[m] = malloc(sizeof(double) * (size_t)(w_rows[m] * w_cols[m]));
    for (int i = 0; i < w_rows[m] * w_cols[m]; i++) w[m][i] = uniform(10 + m, i) * sqrt(3.0 / w_rows[m]);
  }
  for (int i = 0; i < S * E; i++) xg[i] = uniform(1, i), tg[i] = 0.5 * uniform(2, i);

  /* 1. Once per model: context (backend, threads) and communicator (a private MPI_Comm dup). */
  if (da_context_create(NULL, &ctx) != DA_SUCCESS) {
    fprintf(stderr, "rank %d: da_context_create: %s\n", rank, da_last_error(NULL));
    goto done;
  }
  CHECK(da_comm_create(ctx, MPI_COMM_WORLD, &comm));

  /* 2. Once per shape: the plan, the same problem on every rank (a mismatch is DA_ERR_MISMATCH
   *    everywhere). S = 203 does not divide by P: shards differ by at most one row per chunk. */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = S, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = DA_ALGO_ZIGZAG;
  CHECK(da_plan_create(comm, &prob, &cfg, &plan));

  /* 3. This rank's rows and their global positions (what a model needs for position embeddings
   *    and to pick its inputs and targets). */
  const int64_t n = L.n = da_plan_local_rows(plan);
  pos = malloc(sizeof *pos * (size_t)(n + 1));
  CHECK(da_plan_local_positions(plan, pos, n));
  const size_t nn = (size_t)(n ? n : 1);
  L.x = malloc(sizeof(double) * nn * E), L.t = malloc(sizeof(double) * nn * E);
  for (int64_t i = 0; i < n; i++)
    for (int e = 0; e < E; e++) L.x[i * E + e] = xg[pos[i] * E + e], L.t[i * E + e] = tg[pos[i] * E + e];
  L.q = malloc(sizeof(float) * nn * HD), L.o = malloc(sizeof(float) * nn * HD);
  L.dq = malloc(sizeof(float) * nn * HD), L.dout = malloc(sizeof(float) * nn * HD);
  L.k = malloc(sizeof(float) * nn * GD), L.v = malloc(sizeof(float) * nn * GD);
  L.dk = malloc(sizeof(float) * nn * GD), L.dv = malloc(sizeof(float) * nn * GD);
  L.lse = malloc(sizeof(float) * nn * H);
  L.od = malloc(sizeof(double) * nn * HD), L.y = malloc(sizeof(double) * nn * E);

  /* 4. The step: forward, loss, backward. */
  double loss0, loss1;
  CHECK(forward(plan, &L, w, &loss0));
  CHECK(backward(plan, &L, w, grad));

  /* 5. The check. The loss against float64 (rank 0), then 4 entries of each weight matrix:
   *    central differences of the float64 loss, spread over the ranks (entry c on rank c mod P),
   *    gathered on rank 0 to print in order. The library accumulates in fp32 and q, k, v were
   *    rounded to fp32, so the gradients agree to about 1e-7 of the matrix's largest gradient;
   *    the bound is the project's fp32 verification threshold, 1e-4. */
  enum { PER = 4, NCHK = NW * PER };
  double chk[3 * NCHK + 1] = {0}; /* analytic, finite difference, error; then the loss error */
  if (rank == 0) chk[3 * NCHK] = fabs(loss0 - loss_f64(w, xg, tg)) / fabs(loss_f64(w, xg, tg));
  for (int c = rank; c < NCHK; c += nranks) {
    const int m = c / PER, size = w_rows[m] * w_cols[m];
    const int i = (c % PER) * (size / PER) + (7 * c + 3) % (size / PER); /* one in each quarter */
    double gmax = 0.0;
    for (int j = 0; j < size; j++) gmax = fmax(gmax, fabs(grad[m][j]));
    const double h = 1e-5, w0 = w[m][i];
    w[m][i] = w0 + h;
    const double lp = loss_f64(w, xg, tg);
    w[m][i] = w0 - h;
    const double lm = loss_f64(w, xg, tg);
    w[m][i] = w0;
    chk[3 * c] = grad[m][i], chk[3 * c + 1] = (lp - lm) / (2 * h);
    chk[3 * c + 2] = fabs(chk[3 * c] - chk[3 * c + 1]) / gmax;
  }
  MPI_Allreduce(MPI_IN_PLACE, chk, 3 * NCHK + 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  double err_grad = 0.0;
  for (int c = 0; c < NCHK; c++) {
    const int m = c / PER, size = w_rows[m] * w_cols[m];
    const int i = (c % PER) * (size / PER) + (7 * c + 3) % (size / PER);
    err_grad = fmax(err_grad, chk[3 * c + 2]);
    if (rank == 0)
      printf("d loss / d %s[%4d] = %+.8e   finite difference %+.8e   error %.1e (checked on rank %d)\n", w_name[m], i,
             chk[3 * c], chk[3 * c + 1], chk[3 * c + 2], c % nranks);
  }
  const double errs[2] = {chk[3 * NCHK], err_grad};

  /* 6. An SGD step and the loss again: it must go down. */
  const double lr = 0.5;
  for (int m = 0; m < NW; m++)
    for (int j = 0; j < w_rows[m] * w_cols[m]; j++) w[m][j] -= lr * grad[m][j];
  CHECK(forward(plan, &L, w, &loss1));

  da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
  CHECK(da_plan_stats(plan, &s));
  ok = errs[0] < 1e-5 && errs[1] < 1e-4 && loss1 < loss0;
  if (rank == 0) {
    printf("# train_step: %d ranks, S = %d tokens (zigzag, causal), H = %d, G = %d, D = %d, E = %d\n", nranks, S, H,
           G, D, E);
    printf("# loss %.8f (float64 reference: relative error %.1e)\n", loss0, errs[0]);
    printf("# gradients: %d entries against float64 finite differences, max error %.1e of max |grad|\n", NCHK, errs[1]);
    printf("# after one SGD step (lr %.2f): loss %.8f (%s)\n", lr, loss1, loss1 < loss0 ? "down" : "NOT down");
    printf("# rank 0: %lld rows, backward sent %.1f KiB\n", (long long)n, (double)s.bwd_bytes_sent / 1024.0);
    printf("# %s\n", ok ? "PASS" : "FAIL");
  }
  rc = ok ? 0 : 1;
done:
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  free(pos), free(xg), free(tg);
  free(L.x), free(L.t), free(L.q), free(L.k), free(L.v), free(L.o), free(L.lse), free(L.dq), free(L.dk);
  free(L.dv), free(L.dout), free(L.od), free(L.y);
  for (int m = 0; m < NW; m++) free(w[m]), free(grad[m]);
  MPI_Finalize();
  return rc;
}
