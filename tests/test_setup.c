/* test_setup.c: plan creation through the public API when something is wrong (issue 10).
 *   test_setup mem       the memory check of da_plan_create: the exact budget a plan needs (plan
 *                        only; with the caller's tensors and the backward), one rank over budget
 *                        (DA_ERR_OUT_OF_MEMORY there, DA_ERR_REMOTE naming it elsewhere), the
 *                        default budget (MemAvailable / ranks on the machine), DISTATTN_MEM_BUDGET,
 *                        a version-1 config (label mpi, P = 2, 3).
 *   test_setup deadline  one rank never calls da_comm_create / da_plan_create /
 *                        da_kvcache_create / da_decode_plan_create: the others return
 *                        DA_ERR_TIMEOUT within the deadline plus the roll call, naming it where
 *                        the call owns its communicator (label fault, P = 3).
 * Check in CK_NOFORK mode; assertions on values reduced across ranks where all ranks must agree,
 * per rank where the ranks' outcomes differ on purpose (failures are summed into the exit code). */
#include <mpi.h>
#include <check.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"
#include "core.h"
#include "test_mpi.h"

static int g_rank, g_size;
static da_context_t *g_ctx;

#define TIMEOUT 2.0 /* seconds: the deadline of every call in the deadline suite */

static da_comm_t *new_comm(void) {
  da_comm_t *c = NULL;
  da_status_t st = da_comm_create(g_ctx, MPI_COMM_WORLD, &c);
  ck_assert_msg(st == DA_SUCCESS, "rank %d: da_comm_create: %s", g_rank, da_last_error(g_ctx));
  return c;
}

/* A small problem: every rank holds about seq / P rows. */
static da_problem_t small_problem(int64_t seq) {
  da_problem_t pr = DA_PROBLEM_INITIALIZER;
  pr.seq = seq, pr.heads = 4, pr.kv_heads = 2, pr.dim = 64, pr.batch = 2, pr.mask = DA_MASK_CAUSAL;
  return pr;
}

static int all_equal(int v) {
  int r[2] = {v, -v};
  MPI_Allreduce(MPI_IN_PLACE, r, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return r[0] == -r[1];
}

/* ---- memory ---------------------------------------------------------------------------------- */

/* The bytes da_plan_create counts (include/distattn.h, da_plan_config_t): the ring buffers the
 * stats report, the per-call lse scratch and the position table; with DA_MEM_TENSORS the caller's
 * q, k, v, out (dtype) and lse (fp32), and with DA_MEM_BACKWARD dout, dq, dk, dv too. */
static int64_t expected_need(const da_problem_t *pr, const da_plan_stats_t *ps, unsigned count) {
  const int64_t n = ps->local_rows, B = pr->batch, H = pr->heads, G = pr->kv_heads, D = pr->dim, es = 4;
  const int bwd = (count & DA_MEM_BACKWARD) != 0;
  int64_t need = (int64_t)(bwd ? ps->mem_bwd_bytes : ps->mem_fwd_bytes) + B * n * H * 4 + n * 8;
  if (count & DA_MEM_TENSORS) {
    need += B * n * ((2 * H * D + 2 * G * D) * es + 4 * H);
    if (bwd) need += B * n * (2 * H * D + 2 * G * D) * es;
  }
  return need;
}

START_TEST(mem_exact) {
  unsetenv("DISTATTN_MEM_BUDGET");
  da_comm_t *comm = new_comm();
  const da_problem_t pr = small_problem(1000 + g_size - 1);
  static const unsigned counts[] = {0, DA_MEM_TENSORS, DA_MEM_BACKWARD, DA_MEM_TENSORS | DA_MEM_BACKWARD};
  for (int c = 0; c < 4; c++) {
    da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
    cfg.algo = DA_ALGO_ZIGZAG, cfg.mem_budget = -1, cfg.mem_count = counts[c];
    da_plan_t *plan = NULL;
    ck_assert_int_eq(da_plan_create(comm, &pr, &cfg, &plan), DA_SUCCESS);
    da_plan_stats_t ps = DA_PLAN_STATS_INITIALIZER;
    ck_assert_int_eq(da_plan_stats(plan, &ps), DA_SUCCESS);
    da_plan_free(plan);
    /* exactly enough (each rank its own need: shards differ by a row) */
    const int64_t need = expected_need(&pr, &ps, counts[c]);
    cfg.mem_budget = need;
    da_status_t st = da_plan_create(comm, &pr, &cfg, &plan);
    ck_assert_msg(st == DA_SUCCESS, "rank %d count %u: budget = need %lld: %s", g_rank, counts[c], (long long)need,
                  da_last_error(g_ctx));
    /* the plan runs within it: buffers allocated by the first call are the ones counted */
    if (counts[c] == 0) {
      const int64_t n = da_plan_local_rows(plan), B = pr.batch, H = pr.heads, G = pr.kv_heads, D = pr.dim;
      float *q = calloc((size_t)(B * n * H * D + 1), 4), *k = calloc((size_t)(B * n * G * D + 1), 4);
      float *v = calloc((size_t)(B * n * G * D + 1), 4), *o = calloc((size_t)(B * n * H * D + 1), 4);
      da_tensor_t tq, tk, tv, to;
      da_tensor_make(&tq, q, DA_FLOAT32, 4, (int64_t[]){B, n, H, D});
      da_tensor_make(&tk, k, DA_FLOAT32, 4, (int64_t[]){B, n, G, D});
      da_tensor_make(&tv, v, DA_FLOAT32, 4, (int64_t[]){B, n, G, D});
      da_tensor_make(&to, o, DA_FLOAT32, 4, (int64_t[]){B, n, H, D});
      ck_assert_int_eq(da_plan_fwd(plan, &tq, &tk, &tv, &to, NULL, NULL), DA_SUCCESS);
      ck_assert_int_eq(da_plan_stats(plan, &ps), DA_SUCCESS);
      ck_assert_msg(ps.peak_bytes > 0, "peak accounted");
      free(q), free(k), free(v), free(o);
    }
    da_plan_free(plan);
    /* one byte short: refused on every rank, before allocating, with both figures */
    cfg.mem_budget = need - 1;
    st = da_plan_create(comm, &pr, &cfg, &plan);
    ck_assert_msg(st == DA_ERR_OUT_OF_MEMORY && plan == NULL, "rank %d count %u: budget need - 1 gave %s: %s", g_rank,
                  counts[c], da_status_string(st), da_last_error(g_ctx));
    const char *msg = da_last_error(g_ctx);
    char want[64];
    snprintf(want, sizeof want, "rank %d: the problem needs ", g_rank);
    ck_assert_msg(strstr(msg, want) && strstr(msg, "over its budget of") && strstr(msg, "da_plan_config_t.mem_budget"),
                  "message: %s", msg);
    ck_assert_msg(!(counts[c] & DA_MEM_TENSORS) || strstr(msg, "inputs and outputs"), "message: %s", msg);
  }
  da_comm_free(comm);
}
END_TEST

START_TEST(mem_one_rank) {
  unsetenv("DISTATTN_MEM_BUDGET");
  da_comm_t *comm = new_comm();
  const da_problem_t pr = small_problem(2000);
  const int last = g_size - 1;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.mem_budget = g_rank == last ? 4096 : -1;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(comm, &pr, &cfg, &plan);
  const char *msg = da_last_error(g_ctx);
  char want[96];
  if (g_rank == last) {
    ck_assert_msg(st == DA_ERR_OUT_OF_MEMORY, "rank %d: %s: %s", g_rank, da_status_string(st), msg);
    ck_assert_msg(strstr(msg, "over its budget of 4096 bytes"), "message: %s", msg);
  } else {
    ck_assert_msg(st == (g_size == 1 ? DA_SUCCESS : DA_ERR_REMOTE), "rank %d: %s: %s", g_rank, da_status_string(st), msg);
    snprintf(want, sizeof want, "rank %d failed (out of memory)", last);
    ck_assert_msg(strstr(msg, want), "rank %d message: %s", g_rank, msg);
  }
  ck_assert_ptr_null(plan);
  /* the communicator is still good: the same problem without the check */
  cfg.mem_budget = -1;
  ck_assert_int_eq(da_plan_create(comm, &pr, &cfg, &plan), DA_SUCCESS);
  da_plan_free(plan);
  da_comm_free(comm);
}
END_TEST

START_TEST(mem_default_and_env) {
  unsetenv("DISTATTN_MEM_BUDGET");
  da_comm_t *comm = new_comm();
  /* 16M tokens x 64 heads x 128: q alone is 4 GiB x 16 / P per rank, more than any test machine
   * has; the plan itself allocates nothing large before its first call. */
  da_problem_t big = DA_PROBLEM_INITIALIZER;
  big.seq = 16 << 20, big.heads = 64, big.dim = 128;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.mem_count = DA_MEM_TENSORS;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(comm, &big, &cfg, &plan);
  ck_assert_msg(st == DA_ERR_OUT_OF_MEMORY, "default budget: %s: %s", da_status_string(st), da_last_error(g_ctx));
  char want[64];
  snprintf(want, sizeof want, "/ %d rank%s on this machine", g_size, g_size == 1 ? "" : "s");
  ck_assert_msg(strstr(da_last_error(g_ctx), "MemAvailable") && strstr(da_last_error(g_ctx), want), "message: %s",
                da_last_error(g_ctx));
  /* the environment sets the budget (here: tiny), or turns the check off */
  setenv("DISTATTN_MEM_BUDGET", "64K", 1);
  const da_problem_t pr = small_problem(1000);
  st = da_plan_create(comm, &pr, &cfg, &plan);
  ck_assert_msg(st == DA_ERR_OUT_OF_MEMORY && strstr(da_last_error(g_ctx), "(DISTATTN_MEM_BUDGET=64K)"),
                "env budget: %s: %s", da_status_string(st), da_last_error(g_ctx));
  setenv("DISTATTN_MEM_BUDGET", "off", 1);
  ck_assert_int_eq(da_plan_create(comm, &big, &cfg, &plan), DA_SUCCESS);
  da_plan_free(plan);
  setenv("DISTATTN_MEM_BUDGET", "lots", 1);
  st = da_plan_create(comm, &pr, &cfg, &plan);
  ck_assert_msg(st == DA_ERR_INVALID_ARGUMENT && strstr(da_last_error(g_ctx), "DISTATTN_MEM_BUDGET=lots"),
                "bad env: %s: %s", da_status_string(st), da_last_error(g_ctx));
  /* the config wins over the environment */
  cfg.mem_budget = -1;
  ck_assert_int_eq(da_plan_create(comm, &pr, &cfg, &plan), DA_SUCCESS);
  da_plan_free(plan);
  unsetenv("DISTATTN_MEM_BUDGET");
  /* unknown bits */
  cfg.mem_count = 1u << 7;
  ck_assert_int_eq(da_plan_create(comm, &pr, &cfg, &plan), DA_ERR_INVALID_ARGUMENT);
  /* a version-1 caller's struct (no mem_* fields): they are not read, the default applies */
  cfg.mem_budget = 1, cfg.mem_count = 0;
  cfg.version = 1, cfg.size = offsetof(da_plan_config_t, mem_budget);
  ck_assert_msg(da_plan_create(comm, &pr, &cfg, &plan) == DA_SUCCESS, "version 1: %s", da_last_error(g_ctx));
  da_plan_free(plan);
  ck_assert_int_eq(da_plan_create(comm, &big, &cfg, &plan), DA_ERR_OUT_OF_MEMORY);
  ck_assert(all_equal(1));
  da_comm_free(comm);
}
END_TEST

/* ---- deadline -------------------------------------------------------------------------------- */

/* The last rank skips the call; the others must return DA_ERR_TIMEOUT no earlier than the
 * deadline and no later than deadline + roll call (min(deadline, 5 s)) + 3 s, with `want` in the
 * message. The skipping rank waits for them in MPI_Barrier. A failure is noted, not asserted, so
 * every rank still reaches the barrier; check_noted() asserts after it. */
static char g_fail[1024];

static void expect_timeout(da_status_t st, double t0, const char *call, const char *want) {
  const double el = MPI_Wtime() - t0;
  const char *msg = da_last_error(g_ctx);
  if (st != DA_ERR_TIMEOUT)
    snprintf(g_fail, sizeof g_fail, "rank %d %s: %s (%s) after %.1f s", g_rank, call, da_status_string(st), msg, el);
  else if (!(el >= TIMEOUT - 0.1 && el <= 2 * TIMEOUT + 3))
    snprintf(g_fail, sizeof g_fail, "rank %d %s: returned after %.1f s", g_rank, call, el);
  else if (!strstr(msg, want))
    snprintf(g_fail, sizeof g_fail, "rank %d %s: message lacks '%s': %s", g_rank, call, want, msg);
  if (g_rank == 0) printf("  %s, %.1f s: %s\n", call, el, msg);
}

static void check_noted(void) {
  char f[sizeof g_fail];
  snprintf(f, sizeof f, "%s", g_fail);
  g_fail[0] = '\0';
  ck_assert_msg(!f[0], "%s", f);
}

static int skipper(void) { return g_rank == g_size - 1; }

/* The three creations that own their communicator, so their timeout can name the missing rank. */
enum { SKIP_PLAN, SKIP_KVCACHE, SKIP_DECODE_PLAN };
static const char *const skip_call[] = {"da_plan_create", "da_kvcache_create", "da_decode_plan_create"};

/* Creation `which` with the short TIMEOUT; *made says whether it returned a handle anyway (it
 * must not, after a timeout). */

static da_status_t skip_make(int which, da_comm_t *comm, const da_problem_t *pr, int *made) {
  da_plan_config_t pc = DA_PLAN_CONFIG_INITIALIZER;
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
  pc.timeout = kc.timeout = dc.timeout = TIMEOUT;
  da_plan_t *plan = NULL;
  da_kvcache_t *cache = NULL;
  da_decode_plan_t *dplan = NULL;
  da_status_t st = which == SKIP_PLAN      ? da_plan_create(comm, pr, &pc, &plan)
                   : which == SKIP_KVCACHE ? da_kvcache_create(comm, pr, &kc, &cache)
                                           : da_decode_plan_create(comm, pr, &dc, &dplan);
  *made = plan || cache || dplan;
  return st;
}

/* Every rank but the skipper makes the call `which` on a fresh communicator: each must return
 * DA_ERR_TIMEOUT naming the skipper, within expect_timeout's bounds, and no handle. */
static void skip_create(int which) {
  const char *call = skip_call[which];
  da_comm_t *comm = new_comm();
  const da_problem_t pr = small_problem(999);
  if (!skipper()) {
    int made = 0;
    double t0 = MPI_Wtime();
    da_status_t st = skip_make(which, comm, &pr, &made);
    char want[96];
    snprintf(want, sizeof want, "rank %d never reached %s", g_size - 1, call);
    expect_timeout(st, t0, call, want);
    if (made) snprintf(g_fail, sizeof g_fail, "rank %d: %s made a handle after a timeout", g_rank, call);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  da_comm_free(comm);
  check_noted();
}

START_TEST(skip_plan) { skip_create(SKIP_PLAN); }
END_TEST

START_TEST(skip_kvcache) { skip_create(SKIP_KVCACHE); }
END_TEST

START_TEST(skip_decode_plan) { skip_create(SKIP_DECODE_PLAN); }
END_TEST

/* da_comm_create works on the caller's communicator: bounded, but it does not name the rank. Run
 * on a duplicate of our own so the stuck MPI_Comm_idup never meets another collective. */
START_TEST(skip_comm) {
  MPI_Comm mine;
  MPI_Comm_dup(MPI_COMM_WORLD, &mine);
  if (!skipper()) {
    da_comm_t *comm = NULL;
    double t0 = MPI_Wtime();
    da_status_t st = da_comm_create(g_ctx, mine, &comm);
    expect_timeout(st, t0, "da_comm_create", "MPI_Comm_idup did not complete within 2 s");
    if (comm) snprintf(g_fail, sizeof g_fail, "rank %d: a communicator after a timeout", g_rank);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  MPI_Comm_free(&mine);
  check_noted();
}
END_TEST

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  const char *which = argc > 1 ? argv[1] : "mem";
  /* da_comm_create's deadline is DISTATTN_TIMEOUT (read once, here first) */
  if (!strcmp(which, "deadline")) setenv("DISTATTN_TIMEOUT", "2", 1);
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = 1;
  if (da_context_create(&cfg, &g_ctx) != DA_SUCCESS) {
    fprintf(stderr, "rank %d: setup failed: %s\n", g_rank, da_last_error(NULL));
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  Suite *s = suite_create("setup");
  TCase *tc = tcase_create(which);
  tcase_set_timeout(tc, 0);
  if (!strcmp(which, "deadline")) {
    if (g_size < 2) {
      if (g_rank == 0) printf("skipped: the deadline suite needs 2 or more ranks\n");
      da_context_free(g_ctx);
      MPI_Finalize();
      return 77;
    }
    tcase_add_test(tc, skip_plan);
    tcase_add_test(tc, skip_kvcache);
    tcase_add_test(tc, skip_decode_plan);
    tcase_add_test(tc, skip_comm);
  } else {
    tcase_add_test(tc, mem_exact);
    tcase_add_test(tc, mem_one_rank);
    tcase_add_test(tc, mem_default_and_env);
  }
  suite_add_tcase(s, tc);
  return tu_mpi_finish(s, g_rank, g_ctx, NULL);
}
