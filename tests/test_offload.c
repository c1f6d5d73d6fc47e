/* test_offload.c: attention offloading to memory ranks (comm/offload.c) against the float64
 * reference, under mpirun. Each case runs on the first n ranks of the world with its own role
 * split (1 compute + 1..4 memory, 2 compute + 3 memory, compute ranks placed last or interleaved),
 * memory budgets that differ (weighted shards), several layers, micro-batches in flight, GQA, bf16,
 * sequences of different lengths, and checks every output row of every layer at every step. Also:
 * missing, unbalanced and disagreeing roles (the same error on every rank) and the budget refusal.
 * CK_NOFORK: every assertion is on values reduced over the world. */
#include <mpi.h>
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"
#include "core.h"
#include "dtype.h"
#include "ref.h"
#include "rng.h"
#include "test_mpi.h"
#include "test_util.h"

static int g_rank, g_size;
static da_context_t *g_ctx;

#define MAXB 4

typedef struct {
  const char *name;
  int nc, nm;         /* compute and memory ranks (the first nc + nm ranks of the world) */
  unsigned cmask;     /* bit r: rank r of the case is a compute rank */
  int B, H, G, D, L, M;
  da_dtype_t dt;
  int64_t lens[MAXB];
  int64_t page;
  int steps;
} ocase_t;

static uint64_t seq_seed(int group, int layer, int b) { return 5000u + 7919u * (uint64_t)(group * 64 + layer * 8 + b); }

static void gen_row(uint64_t seed, uint32_t tensor, int64_t pos, int heads, int D, da_dtype_t dt, void *dst, int64_t off,
                    double *ref) {
  float row[512];
  for (int h = 0; h < heads; h++) {
    da_rng_row(seed, tensor, pos, h, D, row);
    for (int d = 0; d < D; d++) {
      float x = da_round_to((int)dt, row[d]);
      if (dst) da_store_f32(dst, (int)dt, off + (int64_t)h * D + d, x);
      if (ref) ref[h * D + d] = x;
    }
  }
}

/* Fill this memory rank's pages of cache sequence s = l * B + b from the RNG. */
static void fill(da_kvcache_t *cache, int64_t s, uint64_t seed, int G, int D, da_dtype_t dt) {
  for (int64_t i = 0; i < da_kvcache_num_pages(cache, s); i++) {
    da_kvcache_page_t pg;
    if (da_kvcache_get_page(cache, s, i, &pg) != DA_SUCCESS) continue;
    for (int64_t j = 0; j < pg.count; j++) {
      gen_row(seed, DA_RNG_K, pg.start + j * pg.stride, G, D, dt, pg.k, j * pg.ldk, NULL);
      gen_row(seed, DA_RNG_V, pg.start + j * pg.stride, G, D, dt, pg.v, j * pg.ldv, NULL);
    }
  }
}

/* One case; returns the number of failures (the same on every rank), message in why. */
static int run_case(const ocase_t *c, char *why, size_t wn, double *max_err) {
  const int n = c->nc + c->nm, in = g_rank < n;
  const int B = c->B, H = c->H, G = c->G, D = c->D, L = c->L;
  const da_dtype_t dt = c->dt;
  const size_t es = da_dtype_size(dt);
  const double tol = dt == DA_FLOAT32 ? 1e-5 : 2e-2;
  int fails = 0;
  *max_err = 0;
  MPI_Comm sub;
  MPI_Comm_split(MPI_COMM_WORLD, in ? 0 : MPI_UNDEFINED, g_rank, &sub);
  da_offload_t *off = NULL;
  da_comm_t *comm = NULL;
  da_status_t st = DA_SUCCESS;
  const da_role_t role = (c->cmask >> g_rank) & 1u ? DA_ROLE_COMPUTE : DA_ROLE_MEMORY;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = dt, prob.mask = DA_MASK_CAUSAL;
  da_offload_config_t cfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  cfg.page = c->page, cfg.layers = L, cfg.microbatches = c->M, cfg.timeout = 60;
  cfg.mem_budget = (double)(1 + g_rank % 3) * 64.0 * 1048576.0; /* unequal budgets: weighted shards */
  if (in) st = da_comm_create(g_ctx, sub, &comm);
  if (in && st == DA_SUCCESS) st = da_offload_create(comm, role, &prob, &cfg, &off);
  if (tu_any_rank(st != DA_SUCCESS)) {
    snprintf(why, wn, "%s: create: %s", c->name, st ? da_last_error(g_ctx) : "another rank failed");
    fails++;
    goto done;
  }
  da_offload_info_t info = {0};
  int group = 0;
  if (in) {
    da_offload_get_info(off, &info);
    group = info.group;
    int64_t fin[MAXB];
    for (int b = 0; b < B; b++) fin[b] = c->lens[b] + c->steps;
    st = da_offload_check_fit(off, fin, NULL);
  }
  if (tu_any_rank(st != DA_SUCCESS)) {
    snprintf(why, wn, "%s: fit: %s", c->name, da_last_error(g_ctx));
    fails++;
    goto done;
  }
  if (in && role == DA_ROLE_MEMORY) {
    da_kvcache_t *cache = da_offload_cache(off);
    for (int l = 0; l < L && st == DA_SUCCESS; l++)
      for (int b = 0; b < B && st == DA_SUCCESS; b++) {
        st = da_kvcache_prefill(cache, (int64_t)l * B + b, c->lens[b], NULL, NULL);
        if (st == DA_SUCCESS) fill(cache, (int64_t)l * B + b, seq_seed(group, l, b), G, D, dt);
      }
    if (st == DA_SUCCESS) st = da_offload_serve(off);
    if (st != DA_SUCCESS) snprintf(why, wn, "%s: memory rank %d: %s", c->name, g_rank, da_last_error(g_ctx));
  } else if (in) {
    const int64_t nmax = (B + c->M - 1) / c->M;
    char *q = malloc((size_t)(B * H * D) * es), *k = malloc((size_t)(B * G * D) * es);
    char *v = malloc((size_t)(B * G * D) * es), *out = malloc((size_t)(B * H * D) * es);
    float *lse = malloc((size_t)(B * H) * sizeof(float));
    int64_t maxlen = 0;
    for (int b = 0; b < B; b++) maxlen = c->lens[b] > maxlen ? c->lens[b] : maxlen;
    maxlen += c->steps;
    double *rq = malloc((size_t)(H * D) * 8), *rk = malloc((size_t)(maxlen * G * D) * 8);
    double *rv = malloc((size_t)(maxlen * G * D) * 8), *ro = malloc((size_t)(H * D) * 8), *rl = malloc((size_t)H * 8);
    da_kparams_t kp;
    memset(&kp, 0, sizeof kp);
    kp.H = H, kp.G = G, kp.D = D, kp.scale = (float)(1.0 / sqrt((double)D)), kp.dtype = dt;
    kp.mask.flags = DA_MASK_CAUSAL;
    for (int s = 0; s < c->steps && st == DA_SUCCESS; s++)
      for (int l = 0; l < L && st == DA_SUCCESS; l++) {
        /* the new token of every sequence of this layer */
        for (int b = 0; b < B; b++) {
          const int64_t pos = c->lens[b] + s;
          gen_row(seq_seed(group, l, b), DA_RNG_Q, pos, H, D, dt, q, (int64_t)b * H * D, NULL);
          gen_row(seq_seed(group, l, b), DA_RNG_K, pos, G, D, dt, k, (int64_t)b * G * D, NULL);
          gen_row(seq_seed(group, l, b), DA_RNG_V, pos, G, D, dt, v, (int64_t)b * G * D, NULL);
        }
        /* every micro-batch in flight at once, then waited in order */
        int slots[MAXB];
        for (int64_t f = 0, m = 0; f < B && st == DA_SUCCESS; f += nmax, m++) {
          const int64_t cnt = f + nmax <= B ? nmax : B - f;
          const int64_t shq[3] = {cnt, H, D}, shk[3] = {cnt, G, D};
          da_tensor_t tq, tk, tv;
          da_tensor_make(&tq, q + (size_t)(f * H * D) * es, dt, 3, shq);
          da_tensor_make(&tk, k + (size_t)(f * G * D) * es, dt, 3, shk);
          da_tensor_make(&tv, v + (size_t)(f * G * D) * es, dt, 3, shk);
          st = da_offload_start(off, l, f, &tq, &tk, &tv, &slots[m]);
        }
        for (int64_t f = 0, m = 0; f < B && st == DA_SUCCESS; f += nmax, m++) {
          const int64_t cnt = f + nmax <= B ? nmax : B - f, sho[3] = {cnt, H, D}, shl[2] = {cnt, H};
          da_tensor_t to, tl;
          da_tensor_make(&to, out + (size_t)(f * H * D) * es, dt, 3, sho);
          da_tensor_make(&tl, lse + f * H, DA_FLOAT32, 2, shl);
          st = da_offload_wait(off, slots[m], &to, &tl);
        }
        if (st != DA_SUCCESS) {
          snprintf(why, wn, "%s: compute rank %d step %d layer %d: %s", c->name, g_rank, s, l, da_last_error(g_ctx));
          break;
        }
        for (int b = 0; b < B; b++) {
          const int64_t len = c->lens[b] + s + 1;
          for (int64_t p = 0; p < len; p++) {
            gen_row(seq_seed(group, l, b), DA_RNG_K, p, G, D, dt, NULL, 0, rk + p * G * D);
            gen_row(seq_seed(group, l, b), DA_RNG_V, p, G, D, dt, NULL, 0, rv + p * G * D);
          }
          gen_row(seq_seed(group, l, b), DA_RNG_Q, len - 1, H, D, dt, NULL, 0, rq);
          da_ref_fwd(&kp, rq, da_span(len - 1, 1, 1), rk, rv, da_span(0, 1, len), ro, rl);
          for (int h = 0; h < H; h++) {
            double e = tu_row_err(out, dt, ((int64_t)b * H + h) * D, ro + h * D, D, 0);
            e = fmax(e, fabs(lse[b * H + h] - rl[h]) / fmax(1.0, fabs(rl[h])));
            if (!(e <= *max_err)) *max_err = e;
          }
        }
      }
    da_status_t sst = st == DA_SUCCESS ? da_offload_stop(off) : DA_SUCCESS;
    if (st == DA_SUCCESS && sst != DA_SUCCESS) {
      st = sst;
      snprintf(why, wn, "%s: stop: %s", c->name, da_last_error(g_ctx));
    }
    free(q), free(k), free(v), free(out), free(lse), free(rq), free(rk), free(rv), free(ro), free(rl);
  }
  if (tu_any_rank(st != DA_SUCCESS)) fails++;
  *max_err = tu_reduce(*max_err, MPI_MAX);
  if (!fails && !(*max_err <= tol)) {
    snprintf(why, wn, "%s: error %.3g > %.3g", c->name, *max_err, tol);
    fails++;
  }
done:
  da_offload_free(off);
  da_comm_free(comm);
  if (sub != MPI_COMM_NULL) MPI_Comm_free(&sub);
  return fails;
}

START_TEST(splits) {
  /* name, nc, nm, cmask, B, H, G, D, L, M, dt, lens, page, steps */
  static const ocase_t cases[] = {
      {"1c+1m", 1, 1, 0x1, 2, 4, 2, 32, 2, 2, DA_FLOAT32, {300, 77}, 64, 3},
      {"1c+2m (compute last)", 1, 2, 0x4, 3, 4, 1, 64, 2, 2, DA_FLOAT32, {500, 1, 130}, 32, 3},
      {"1c+3m", 1, 3, 0x1, 3, 8, 2, 32, 1, 3, DA_FLOAT32, {700, 260, 40}, 64, 4},
      {"1c+4m bf16", 1, 4, 0x2, 2, 4, 4, 64, 2, 1, DA_BFLOAT16, {600, 333}, 64, 2},
      {"2c+3m (interleaved)", 2, 3, 0x12, 4, 4, 2, 32, 2, 2, DA_FLOAT32, {400, 100, 65, 3}, 64, 3},
  };
  int fails = 0;
  char why[512] = "";
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (cases[i].nc + cases[i].nm > g_size) continue;
    double err = 0;
    char w[512] = "";
    int f = run_case(&cases[i], w, sizeof w, &err);
    if (g_rank == 0) printf("offload %-22s ranks %d: max error %.3g %s\n", cases[i].name, cases[i].nc + cases[i].nm, err,
                            f ? "FAIL" : "ok");
    fflush(stdout);
    if (f && !fails) {
      /* the message of the lowest rank that has one */
      struct { int has, r; } in = {w[0] != 0, w[0] ? -g_rank : -g_size}, best;
      MPI_Allreduce(&in, &best, 1, MPI_2INT, MPI_MAXLOC, MPI_COMM_WORLD);
      int src = best.has ? -best.r : 0;
      if (src >= g_size) src = 0;
      memcpy(why, w, sizeof why);
      MPI_Bcast(why, sizeof why, MPI_CHAR, src, MPI_COMM_WORLD);
    }
    fails += f;
  }
  ck_assert_msg(fails == 0, "%s", why);
}
END_TEST

/* The same status on every rank, and a message containing `want` on every rank. */
static void expect_all(da_status_t st, da_status_t want, const char *want_msg, const char *what) {
  int bad = st != want || !strstr(da_last_error(g_ctx), want_msg);
  if (bad) fprintf(stderr, "rank %d %s: got %s: %s\n", g_rank, what, da_status_string(st), da_last_error(g_ctx));
  ck_assert_msg(!tu_any_rank(bad), "%s: not the expected '%s' on every rank", what, want_msg);
}

START_TEST(errors) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = 2, prob.heads = 4, prob.kv_heads = 2, prob.dim = 32, prob.dtype = DA_FLOAT32;
  da_offload_config_t cfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  cfg.layers = 2, cfg.timeout = 30, cfg.mem_budget = 1e9;
  da_offload_t *off = NULL;
  da_comm_t *comm = NULL;
  ck_assert_msg(da_comm_create(g_ctx, MPI_COMM_WORLD, &comm) == DA_SUCCESS, "comm: %s", da_last_error(g_ctx));
  /* a rank without a role */
  da_status_t st = da_offload_create(comm, g_rank == g_size - 1 ? DA_ROLE_NONE : (g_rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE),
                                     &prob, &cfg, &off);
  expect_all(st, DA_ERR_INVALID_ARGUMENT, g_size == 1 ? "rank 0 has no role" : "has no role", "missing role");
  da_offload_free(off), off = NULL;
  /* every rank a memory rank */
  st = da_offload_create(comm, DA_ROLE_MEMORY, &prob, &cfg, &off);
  expect_all(st, DA_ERR_INVALID_ARGUMENT, "at least one needs --role compute", "no compute rank");
  da_offload_free(off), off = NULL;
  /* more compute than memory ranks */
  st = da_offload_create(comm, g_rank == 0 && g_size > 2 ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &prob,
                         &cfg, &off);
  expect_all(st, DA_ERR_INVALID_ARGUMENT, "needs at least one memory rank", "too few memory ranks");
  da_offload_free(off), off = NULL;
  if (g_size < 2) {
    da_comm_free(comm);
    return;
  }
  /* ranks that disagree on the problem */
  da_offload_config_t c2 = cfg;
  if (g_rank == 1) c2.layers = 3;
  st = da_offload_create(comm, g_rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &prob, &c2, &off);
  expect_all(st, DA_ERR_MISMATCH, "ranks disagree on layers", "mismatch");
  da_offload_free(off), off = NULL;
  /* an invalid config on one rank: its own message there, naming it elsewhere */
  c2 = cfg;
  if (g_rank == 1) c2.microbatches = 5;
  st = da_offload_create(comm, g_rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &prob, &c2, &off);
  expect_all(st, DA_ERR_INVALID_ARGUMENT, g_rank == 1 ? "microbatches 5 is not in 1 .. batch" : "rank 1 was given an invalid",
             "bad config on one rank");
  da_offload_free(off), off = NULL;
  /* the budget: 2 x 2 x 100K tokens x 2 x 2 x 32 x 4 bytes = 200 MiB over a 64 MiB memory rank budget */
  c2 = cfg;
  c2.mem_budget = 64.0 * 1048576.0;
  st = da_offload_create(comm, g_rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &prob, &c2, &off);
  ck_assert_msg(!tu_any_rank(st != DA_SUCCESS), "create for the budget check failed");
  const int64_t fin[2] = {100 * 1024, 100 * 1024};
  double need = 0;
  st = da_offload_check_fit(off, fin, &need);
  if (g_size == 2) expect_all(st, DA_ERR_OUT_OF_MEMORY, "over its budget of 64.0 MiB", "budget");
  else { /* more memory ranks: the shard shrinks in proportion */
    const int want = need > c2.mem_budget;
    ck_assert_msg(!tu_any_rank(want != (st == DA_ERR_OUT_OF_MEMORY)), "budget verdict with %d memory ranks", g_size - 1);
  }
  const double total = da_offload_kv_bytes(&prob, 2, fin);
  ck_assert_msg(fabs(total - 2.0 * 2 * 100 * 1024 * 2 * 2 * 32 * 4) < 1, "kv bytes %g", total);
  /* a fitting context passes, and stop/serve end cleanly without requests */
  const int64_t small[2] = {1000, 10};
  st = da_offload_check_fit(off, small, NULL);
  ck_assert_msg(!tu_any_rank(st != DA_SUCCESS), "small context refused: %s", da_last_error(g_ctx));
  st = g_rank ? da_offload_serve(off) : da_offload_stop(off);
  ck_assert_msg(!tu_any_rank(st != DA_SUCCESS), "stop without requests: %s", da_last_error(g_ctx));
  da_offload_free(off);
  da_comm_free(comm);
}
END_TEST

int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, NULL);
  const tu_test_t tests[] = {{"errors", errors}, {"splits", splits}};
  Suite *s = tu_mpi_suite("offload", "offload", tests, sizeof tests / sizeof tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, NULL);
}
