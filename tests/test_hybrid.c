/* test_hybrid.c: the hybrid Ulysses x ring driver (Ulysses inside groups of U consecutive ranks,
 * the ring across the P/U groups) against the float64 reference, under mpirun for P in
 * {1,2,3,4,6,8}: degrees 1x1, 2x1 and 1x2, 3x1 and 1x3, 2x2, 2x3 and 3x2, 4x2 (U x ring). The case
 * runner, reference and 1-rank comparison are test_ring.c's (included below with its main left
 * out, test_ring_helpers.h), so every driver is held to the same checks and tolerances. Also:
 * the layout (every position once, each group holding its ring shard), the refusals on every
 * rank, and the plan's figures (bytes sent, computed here from the shapes, and what the calls
 * measured). */
#include "test_ring_helpers.h"

/* 12 query heads split over every tested degree (1, 2, 3, 4). */
#define HH 12

/* The Ulysses degrees tested at P ranks (U x P/U). */
static int degrees(int P, int *u) {
  switch (P) {
    case 1: u[0] = 1; return 1;
    case 2: u[0] = 2, u[1] = 1; return 2;
    case 3: u[0] = 3, u[1] = 1; return 2;
    case 4: u[0] = 2; return 1;
    case 6: u[0] = 2, u[1] = 3; return 2;
    case 8: u[0] = 4; return 1;
    default: u[0] = 1; return 1;
  }
}

/* KV heads at degree U: split (G = U, each rank of a group one KV head; 12 when U = 1) or
 * replicated per group (G < U dividing U: 2 when U = 4, else 1; at U = 1 MQA, G = 1). */
static int kv_split(int U) { return U == 1 ? HH : U; }
static int kv_repl(int U) { return U == 4 ? 2 : 1; }

/* Every mask at every degree, on a length neither the groups nor the ranks divide, forward and
 * backward; the KV heads alternate split / replicated, the dtype fp32 / bf16 and the ring's
 * layout zigzag / striped / contiguous, so each degree meets both GQA cases, both dtypes and
 * every layout (fp32 also against the 1-rank result). */
START_TEST(h_matrix) {
  int u[4], nu = degrees(g_size, u), fails = 0, cases = 0;
  static const da_algo_t lays[3] = {DA_ALGO_ZIGZAG, DA_ALGO_STRIPED, DA_ALGO_RING};
  for (int ui = 0; ui < nu; ui++)
    for (int mi = 0; mi < NMASKS; mi++) {
      const int U = u[ui];
      tcase_t c = {.algo = DA_ALGO_HYBRID, .ulysses = U, .ring_layout = lays[(mi + ui) % 3], .mask = masks[mi],
                   .window = 30, .ndocs = 4, .S = 97 + g_size, .B = 1, .H = HH,
                   .G = mi % 2 ? kv_repl(U) : kv_split(U), .D = 16, .dt = (mi / 2) % 2 ? DA_BFLOAT16 : DA_FLOAT32,
                   .bwd = 1};
      cases++;
      fails += run_case(&c, 1) > 1;
    }
  ck_assert_msg(cases > 0 && fails == 0, "%d of %d uneven cases failed (details on stderr)", fails, cases);
}
END_TEST

/* Edges at the largest tested degree: one token (empty groups and ranks; forward only, since
 * with one key dq and dk are exactly 0 and their relative error is noise over noise), three
 * tokens (empty ranks in a group) with the backward, a batch of 3 with a head-strided q and fp16,
 * a window over a striped ring with D = 64 and small KV sub-blocks. */
START_TEST(h_edges) {
  int u[4];
  degrees(g_size, u);
  const int U = u[0];
  int fails = 0;
  tcase_t cs[] = {
      {.algo = DA_ALGO_HYBRID, .ulysses = U, .ring_layout = DA_ALGO_ZIGZAG, .mask = DA_MASK_CAUSAL, .S = 1, .B = 1,
       .H = HH, .G = kv_split(U), .D = 16, .dt = DA_FLOAT32, .bwd = 0},
      {.algo = DA_ALGO_HYBRID, .ulysses = U, .ring_layout = DA_ALGO_STRIPED, .mask = DA_MASK_NONE, .S = 3, .B = 2,
       .H = HH, .G = kv_repl(U), .D = 16, .dt = DA_FLOAT32, .bwd = 1},
      {.algo = DA_ALGO_HYBRID, .ulysses = U, .ring_layout = DA_ALGO_ZIGZAG, .mask = DA_MASK_CAUSAL | DA_MASK_DOC,
       .ndocs = 3, .S = 53, .B = 3, .H = HH, .G = kv_repl(U), .D = 16, .dt = DA_FLOAT16, .bwd = 1, .strided_q = 1},
      {.algo = DA_ALGO_HYBRID, .ulysses = U, .ring_layout = DA_ALGO_STRIPED, .mask = DA_MASK_WINDOW, .window = 7,
       .S = 71, .B = 1, .H = HH, .G = kv_split(U), .D = 64, .dt = DA_FLOAT32, .bwd = 1, .block = 16},
  };
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) fails += run_case(&cs[i], 1) > 1;
  ck_assert_msg(fails == 0, "%d edge cases failed (details on stderr)", fails);
}
END_TEST

/* The layout: every position on exactly one rank, and the U ranks of group g together hold
 * exactly the ring layout's shard of g over P/U groups, each rank a contiguous run of the
 * group's rows in the group's local order (ranks in order). The group's shard is rebuilt here
 * from the same rule as the layout module's zigzag (2R chunks, group g owns g and 2R-1-g). */
START_TEST(h_layout) {
  int u[4];
  degrees(g_size, u);
  const int U = u[0], R = g_size / U;
  const int64_t S = 20 * R; /* 2R chunks of 10 tokens: the zigzag shard is unambiguous */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = S, prob.heads = HH, prob.kv_heads = 1, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  zplan_t z;
  zplan_ulysses = U;
  ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_HYBRID), DA_SUCCESS));
  int64_t pos[64];
  ck_assert(z.n <= 64 && da_plan_local_positions(z.plan, pos, z.n) == DA_SUCCESS);
  /* The group's rows in local order: chunk g, then chunk 2R-1-g. */
  const int g = g_rank / U, j = g_rank % U;
  int64_t grp[64], ng = 0;
  const int64_t chunk = S / (2 * R);
  for (int64_t i = 0; i < chunk; i++) grp[ng++] = g * chunk + i;
  for (int64_t i = 0; i < chunk; i++) grp[ng++] = (2 * R - 1 - g) * chunk + i;
  const int64_t first = j * (ng / U) + (j < ng % U ? j : ng % U), cnt = ng / U + (j < ng % U);
  int ok = z.n == cnt;
  for (int64_t i = 0; ok && i < cnt; i++) ok = pos[i] == grp[first + i];
  if (!ok) fprintf(stderr, "rank %d (group %d, index %d): %lld rows, first %lld\n", g_rank, g, j, (long long)z.n,
                   (long long)(z.n ? pos[0] : -1));
  ck_assert_msg(tu_reduce(ok, MPI_MIN) == 1, "U=%d: each rank a run of its group's zigzag shard", U);
  /* Every position exactly once over the job. */
  int *seen = calloc((size_t)S, sizeof *seen);
  for (int64_t i = 0; i < z.n; i++) seen[pos[i]]++;
  MPI_Allreduce(MPI_IN_PLACE, seen, (int)S, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  for (int64_t i = 0; i < S; i++) ck_assert_msg(seen[i] == 1, "position %lld held %d times", (long long)i, seen[i]);
  free(seen);
  zplan_free(&z);
  zplan_ulysses = 1;
}
END_TEST

/* A plan every rank must refuse with `want` and a message containing `why`. */
static void expect_refusal(int H, int G, int U, da_algo_t algo, da_status_t want, const char *why) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = H, prob.kv_heads = G, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = algo, cfg.timeout = 30, cfg.ulysses = U;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  const char *msg = da_last_error(g_ctx);
  int ok = st == want && plan == NULL && msg && strstr(msg, why);
  if (!ok) fprintf(stderr, "rank %d: H=%d G=%d U=%d P=%d gave %s: %s\n", g_rank, H, G, U, g_size,
                   da_status_string(st), msg);
  if (g_rank == 0 && ok) fprintf(stderr, "refused as expected: %s\n", msg);
  ck_assert_msg(tu_all_equal_status(ok ? want : DA_SUCCESS, want), "H=%d G=%d U=%d over %d ranks must be refused on "
                "every rank (\"%s\")", H, G, U, g_size, why);
  da_plan_free(plan);
}

/* U < 1; U not dividing P; H not divisible by U; G neither dividing nor divided by U; a degree
 * given to another algorithm; an older config asking for the hybrid. */
START_TEST(h_refusals) {
  const int P = g_size;
  expect_refusal(HH, 1, 0, DA_ALGO_HYBRID, DA_ERR_INVALID_ARGUMENT, "must be >= 1");
  expect_refusal(HH, 1, -2, DA_ALGO_HYBRID, DA_ERR_INVALID_ARGUMENT, "must be >= 1");
  expect_refusal(HH, 1, P + 1, DA_ALGO_HYBRID, DA_ERR_UNSUPPORTED, "does not divide");
  expect_refusal(HH, 1, 2, DA_ALGO_ZIGZAG, DA_ERR_INVALID_ARGUMENT, "the hybrid's degree");
  int d = 0; /* the smallest degree > 1 dividing P */
  for (int c = 2; c <= P && !d; c++)
    if (P % c == 0) d = c;
  if (d) {
    expect_refusal(2 * d + 1, 1, d, DA_ALGO_HYBRID, DA_ERR_UNSUPPORTED, "heads cannot be split over ulysses degree");
    /* 6 KV heads of 12 query heads against degree 4 (P = 4, 8): neither divides the other; at
     * degrees 2 and 3, G = 3 and G = 2 respectively. */
    const int G = d == 4 ? 6 : d == 2 ? 3 : d == 3 ? 2 : 0;
    if (G && (G % d) && (d % G)) expect_refusal(HH, G, d, DA_ALGO_HYBRID, DA_ERR_UNSUPPORTED, "KV heads must split");
  }
  /* A version 2 config (no degree) asking for the hybrid. */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = HH, prob.kv_heads = 1, prob.dim = 16;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = DA_ALGO_HYBRID, cfg.version = 2, cfg.size = offsetof(da_plan_config_t, ulysses);
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT) && strstr(da_last_error(g_ctx), "version 3"),
                "a v2 config asking for the hybrid: %s", da_last_error(g_ctx));
  da_plan_free(plan);
}
END_TEST

/* The plan's figures, computed here from the shapes. Per call, summed over ranks, with
 * Hl = H/U, Gk = G/U (split) or 1 (replicated), e the storage size, R = P/U:
 * - the groups' all-to-alls, as Ulysses over U ranks on all S tokens: forward
 *   (U-1) S ((2 Hl + 2 Gk) D e + 4 Hl), backward (U-1) S ((3 Hl + 2 Gk) D e + 4 Hl + 4 (Hl + 2 Gk) D);
 * - the U rings across R groups, each moving every KV block R-1 hops: forward
 *   U S 2 Gk D e; backward that again plus the fp32 dK/dV sums, U S 2 Gk D 4.
 * The calls measure exactly that, and the all-to-alls are exposed time (> 0 when U > 1). */
START_TEST(h_plan_figures) {
  const int P = g_size;
  int u[4], nu = degrees(P, u);
  for (int ui = 0; ui < nu; ui++)
    for (int gi = 0; gi < 2; gi++)
      for (int d = 0; d < 2; d++) {
        const int U = u[ui], R = P / U, G = gi ? kv_repl(U) : kv_split(U);
        da_problem_t prob = DA_PROBLEM_INITIALIZER;
        prob.seq = 301 + P, prob.heads = HH, prob.kv_heads = G, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
        prob.dtype = d ? DA_BFLOAT16 : DA_FLOAT32;
        zplan_t z;
        zplan_ulysses = U;
        ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_HYBRID), DA_SUCCESS));
        da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
        ck_assert(da_plan_stats(z.plan, &s) == DA_SUCCESS);
        const double e = d ? 2 : 4, S = (double)prob.seq, D = prob.dim, Hl = HH / U, Gk = G >= U ? G / U : 1;
        const double fwd = (U - 1) * S * ((2 * Hl + 2 * Gk) * D * e + Hl * 4) + U * (R - 1) * S * 2 * Gk * D * e;
        const double bwd = (U - 1) * S * ((3 * Hl + 2 * Gk) * D * e + Hl * 4 + (Hl + 2 * Gk) * D * 4) +
                           U * (R - 1) * S * 2 * Gk * D * (e + 4);
        ck_assert_msg(tu_reduce((double)s.plan_fwd_bytes, MPI_SUM) == fwd, "U=%d G=%d fwd volume %.0f, expected %.0f", U, G,
                      tu_reduce((double)s.plan_fwd_bytes, MPI_SUM), fwd);
        ck_assert_msg(tu_reduce((double)s.plan_bwd_bytes, MPI_SUM) == bwd, "U=%d G=%d bwd volume %.0f, expected %.0f", U, G,
                      tu_reduce((double)s.plan_bwd_bytes, MPI_SUM), bwd);
        ck_assert_msg(tu_reduce((double)s.pairs_rank, MPI_SUM) == (double)s.pairs_total, "pairs %lld of %lld",
                      (long long)s.pairs_rank, (long long)s.pairs_total);
        ck_assert(s.mem_bwd_bytes > s.mem_fwd_bytes);
        zplan_check_sent(&z, &s);
        if (U > 1) ck_assert_msg(s.fwd_exposed_s > 0 && s.bwd_exposed_s > 0, "the all-to-alls are exposed time");
        zplan_free(&z);
      }
  zplan_ulysses = 1;
}
END_TEST

int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, &g_comm);
  const tu_test_t tests[] = {
      {"refusals", h_refusals}, {"layout", h_layout}, {"plan_figures", h_plan_figures}, {"edges", h_edges},
      {"matrix_uneven", h_matrix}};
  Suite *s = tu_mpi_suite("hybrid", "correctness", tests, sizeof tests / sizeof tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, g_comm);
}
