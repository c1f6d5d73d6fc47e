/* test_ulysses.c: the Ulysses driver (all-to-all of heads for tokens, forward and backward)
 * against the float64 reference, under mpirun for P in {1,2,3,4,6,8}: H = 12 (H = 8 at P = 8).
 * The case runner, reference and 1-rank comparison are test_ring.c's (included below with its
 * main left out, test_ring_helpers.h), so both drivers are held to the same checks and
 * tolerances. Also: the refusals (H or G not splitting over P) on every rank, and the plan's
 * figures (bytes sent, computed here from the shapes; memory holding the whole sequence for H/P
 * heads). */
#include "test_ring_helpers.h"

/* Query heads: divisible by P, with KV head counts that split (G = P) and replicate (1 < G < P
 * where P has such a divisor) at every tested P; small, since each rank holds S x H/P heads. */
#define UH (g_size == 8 ? 8 : 12)

/* KV head counts to test at P ranks: H (MHA, split), P (one KV head per rank, split), a divisor
 * of P strictly between 1 and P (replicated over P/G ranks; 1 when P has none) and 1 (MQA:
 * replicated on every rank). Returns how many (distinct) went into g[]. */
static int kv_choices(int P, int *g) {
  int n = 0, cand[4] = {UH, P, 1, 1};
  if (UH % P) return 0;
  for (int d = 2; d < P; d++)
    if (P % d == 0) {
      cand[2] = d;
      break;
    }
  for (int i = 0; i < 4; i++) {
    int dup = 0;
    for (int j = 0; j < n; j++) dup |= g[j] == cand[i];
    if (!dup && UH % cand[i] == 0) g[n++] = cand[i];
  }
  return n;
}

/* Every mask x every KV split (split, replicated) x fp32 / bf16, forward and backward, on a
 * length P does not divide (300 + P - 1); fp32 also against the 1-rank result. */
START_TEST(u_matrix) {
  int g[4], ng = kv_choices(g_size, g), fails = 0, cases = 0;
  for (int mi = 0; mi < NMASKS; mi++)
    for (int gi = 0; gi < ng; gi++)
      for (int d = 0; d < 2; d++) {
        tcase_t c = {.algo = DA_ALGO_ULYSSES, .mask = masks[mi], .window = 100, .ndocs = 4, .S = 300 + g_size - 1,
                     .B = 1, .H = UH, .G = g[gi], .D = 16, .dt = d ? DA_BFLOAT16 : DA_FLOAT32, .bwd = 1};
        cases++;
        fails += run_case(&c, 1) > 1;
      }
  ck_assert_msg(cases > 0 && fails == 0, "%d of %d uneven cases failed (details on stderr)", fails, cases);
}
END_TEST

/* Edges: fewer tokens than ranks (ranks with no rows still take heads), a batch of 3 with GQA,
 * fp16, a head-strided q view, D = 64 with MQA under a document mask. */
START_TEST(u_edges) {
  const int P = g_size;
  int fails = 0;
  tcase_t cs[] = {
      {.algo = DA_ALGO_ULYSSES, .mask = DA_MASK_CAUSAL, .S = 3, .B = 1, .H = UH, .G = UH, .D = 16, .dt = DA_FLOAT32,
       .bwd = 1},
      {.algo = DA_ALGO_ULYSSES, .mask = DA_MASK_CAUSAL | DA_MASK_DOC, .ndocs = 3, .S = 53, .B = 3, .H = UH,
       .G = P == 1 ? 4 : P, .D = 16, .dt = DA_FLOAT32, .bwd = 1},
      {.algo = DA_ALGO_ULYSSES, .mask = DA_MASK_WINDOW, .window = 5, .S = 61, .B = 2, .H = UH, .G = 1, .D = 16,
       .dt = DA_FLOAT16, .bwd = 1, .strided_q = 1},
      {.algo = DA_ALGO_ULYSSES, .mask = DA_MASK_DOC, .ndocs = 4, .S = 90, .B = 1, .H = UH, .G = 1, .D = 64,
       .dt = DA_BFLOAT16, .bwd = 1},
  };
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) fails += run_case(&cs[i], 1) > 1;
  if (P == 1) {
    /* The self transport's all-to-all (a copy of the rank's own part). */
    tcase_t c = {.algo = DA_ALGO_ULYSSES, .mask = DA_MASK_CAUSAL, .S = 77, .B = 2, .H = UH, .G = 2, .D = 16,
                 .dt = DA_BFLOAT16, .bwd = 1, .transport = "self"};
    fails += run_case(&c, 1) > 1;
  }
  ck_assert_msg(fails == 0, "%d edge cases failed (details on stderr)", fails);
}
END_TEST

/* A plan every rank must refuse with DA_ERR_UNSUPPORTED and a message naming ulysses. */
static void expect_refusal(int H, int G, const char *why) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = H, prob.kv_heads = G, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = DA_ALGO_ULYSSES, cfg.timeout = 30;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  const char *msg = da_last_error(g_ctx);
  int ok = st == DA_ERR_UNSUPPORTED && plan == NULL && msg && strstr(msg, "ulysses") && strstr(msg, why);
  if (!ok) fprintf(stderr, "rank %d: H=%d G=%d P=%d gave %s: %s\n", g_rank, H, G, g_size, da_status_string(st), msg);
  if (g_rank == 0 && ok) fprintf(stderr, "refused as expected: %s\n", msg);
  ck_assert_msg(tu_all_equal_status(ok ? DA_ERR_UNSUPPORTED : DA_SUCCESS, DA_ERR_UNSUPPORTED),
                "H=%d G=%d over %d ranks must be refused on every rank (\"%s\")", H, G, g_size, why);
  da_plan_free(plan);
}

/* H not divisible by P; G neither dividing nor divided by P. Every rank's own message says why
 * (the check runs on every rank, on sizes the ranks agree on). */
START_TEST(u_refusals) {
  const int P = g_size;
  if (P == 1) return; /* one rank takes every head */
  expect_refusal(2 * P + 1, 1, "heads cannot be split");
  int found = 0; /* 24 heads have a KV head count each tested P neither divides nor is divided by */
  for (int G = 2; G <= 24 && !found; G++)
    if (24 % G == 0 && G % P && P % G) {
      expect_refusal(24, G, "KV heads must split evenly");
      found = 1;
    }
  ck_assert_msg(found || P > 8, "no refused KV head count tried at P = %d", P);
}
END_TEST

/* The plan's figures, computed here from the shapes: per call, tokens -> heads sends (P-1)/P of
 * every rank's q (and out, dout in the backward) and each rank's KV heads to each other rank
 * (Gk = G/P heads, or the one replicated head), heads -> tokens sends out and lse (forward), dq
 * and the fp32 dK/dV partials (backward) home; the calls measure exactly that. Memory holds the
 * whole sequence for H/P heads. */
START_TEST(u_plan_figures) {
  const int P = g_size;
  int g[4], ng = kv_choices(P, g);
  for (int gi = 0; gi < ng; gi++)
    for (int d = 0; d < 2; d++) {
      da_problem_t prob = DA_PROBLEM_INITIALIZER;
      prob.seq = 301 + P, prob.heads = UH, prob.kv_heads = g[gi], prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
      prob.dtype = d ? DA_BFLOAT16 : DA_FLOAT32;
      zplan_t z;
      ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_ULYSSES), DA_SUCCESS));
      da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
      ck_assert(da_plan_stats(z.plan, &s) == DA_SUCCESS);
      const double es = d ? 2 : 4, S = (double)prob.seq, D = prob.dim, Hl = UH / P;
      const double Gk = g[gi] >= P ? g[gi] / P : 1, P1 = P - 1;
      const double fwd = P1 * S * ((2 * Hl + 2 * Gk) * D * es + Hl * 4);
      const double bwd = P1 * S * ((3 * Hl + 2 * Gk) * D * es + Hl * 4 + (Hl + 2 * Gk) * D * 4);
      ck_assert_msg(tu_reduce((double)s.plan_fwd_bytes, MPI_SUM) == fwd, "G=%d fwd volume %.0f, expected %.0f", g[gi],
                    tu_reduce((double)s.plan_fwd_bytes, MPI_SUM), fwd);
      ck_assert_msg(tu_reduce((double)s.plan_bwd_bytes, MPI_SUM) == bwd, "G=%d bwd volume %.0f, expected %.0f", g[gi],
                    tu_reduce((double)s.plan_bwd_bytes, MPI_SUM), bwd);
      /* At least the gathered q, k, v, out and the fp32 state for the whole sequence. */
      const double whole = S * ((2 * Hl + 2 * Gk) * D * es + Hl * D * 4);
      ck_assert_msg(tu_reduce((double)s.mem_fwd_bytes, MPI_MIN) >= whole, "forward memory %zu < %.0f", s.mem_fwd_bytes, whole);
      ck_assert(s.mem_bwd_bytes > s.mem_fwd_bytes);
      ck_assert_msg(s.work_imbalance == 1.0, "every rank computes every pair for H/P heads");
      ck_assert_msg(tu_reduce((double)s.pairs_rank, MPI_SUM) == (double)s.pairs_total, "pairs %lld of %lld",
                    (long long)s.pairs_rank, (long long)s.pairs_total);
      zplan_check_sent(&z, &s);
      zplan_free(&z);
    }
}
END_TEST

/* A rank that never joins the forward: every other rank gets DA_ERR_TIMEOUT within the plan's
 * deadline (from the call's argument agreement, which comes first), never a hang; a plan made
 * beside it still works. (The all-to-all's own deadline, coll_wait in comm/mpi.c, is shared with
 * the other collectives; a test that reaches it with every rank in the call needs a fault hook.) */
START_TEST(u_timeout) {
  if (g_size == 1) return;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = 2 * g_size, prob.kv_heads = 1, prob.dim = 16;
  zplan_t z;
  zplan_timeout = 2;
  ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_ULYSSES), DA_SUCCESS));
  zplan_timeout = 60;
  zplan_t z2; /* made first: plan creation is collective */
  ck_assert(tu_all_equal_status(zplan_make(&z2, &prob, DA_ALGO_ULYSSES), DA_SUCCESS));
  const int absent = g_rank == g_size - 1;
  int ok = 1;
  double dt = 0;
  if (!absent) {
    double t0 = MPI_Wtime();
    da_status_t st = da_plan_fwd(z.plan, &z.q, &z.k, &z.v, &z.o, &z.l, NULL);
    dt = MPI_Wtime() - t0;
    const char *msg = da_last_error(g_ctx);
    ok = st == DA_ERR_TIMEOUT && msg && strstr(msg, "did not complete within 2 s");
    if (!ok) fprintf(stderr, "rank %d: %s: %s\n", g_rank, da_status_string(st), msg);
  }
  ck_assert_msg(tu_reduce(ok, MPI_MIN) == 1, "a missing rank must time out the call on every other rank");
  ck_assert_msg(tu_reduce(dt, MPI_MAX) < 15, "timeout took %.1f s", tu_reduce(dt, MPI_MAX));
  ck_assert(tu_all_equal_status(zplan_run(&z2, 1), DA_SUCCESS));
  zplan_free(&z2);
  zplan_free(&z);
}
END_TEST

int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, &g_comm);
  const tu_test_t tests[] = {
      {"refusals", u_refusals}, {"plan_figures", u_plan_figures}, {"timeout", u_timeout}, {"edges", u_edges}, {"matrix_uneven", u_matrix}};
  Suite *s = tu_mpi_suite("ulysses", "correctness", tests, sizeof tests / sizeof tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, g_comm);
}
