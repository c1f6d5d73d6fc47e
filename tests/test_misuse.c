/* test_misuse.c: every public function of include/distattn.h called with NULL or invalid arguments
 * (issue 19, class 1). Each call must return a status (or its documented -1 / 0 / NULL) with a
 * message that names the function or the argument, never crash, and a call on a handle made from
 * a context must leave the same message in da_last_error(ctx) as in da_last_error(NULL) (one
 * error-recording path). The list of functions is read from the header itself at run time: a
 * function declared there without a case here fails the test, so new functions get covered.
 * MPI test (the distributed half), run at P = 2 so an intercommunicator can be built. */
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"

#ifndef DA_HEADER_PATH
#error "DA_HEADER_PATH (the path of include/distattn.h) must be defined by the build"
#endif

static int rank, nranks, failures;
static da_context_t *ctx;
static da_comm_t *comm;
static da_plan_t *plan;
static da_kvcache_t *cache;
static da_decode_plan_t *dplan;

static void fail(const char *fn, const char *what, const char *detail) {
  failures++;
  fprintf(stderr, "rank %d: FAIL %s: %s%s%s\n", rank, fn, what, detail ? ": " : "", detail ? detail : "");
}

/* st must be a failure (want, or any failure when want < 0) with a message containing needle; with
 * a context, da_last_error(c) must carry the same message. */
static void expect(const char *fn, const char *expr, da_status_t st, int want, const char *needle, da_context_t *c) {
  char detail[700];
  const char *msg = da_last_error(NULL);
  snprintf(detail, sizeof detail, "%s -> %s (%d): '%s'", expr, da_status_string(st), (int)st, msg);
  if (st == DA_SUCCESS || (want >= 0 && (int)st != want)) return fail(fn, "wrong status", detail);
  if (!msg[0] || (needle && !strstr(msg, needle))) return fail(fn, needle ? "message lacks the name" : "no message", detail);
  if (c && strcmp(da_last_error(c), msg))
    fail(fn, "da_last_error(ctx) differs from da_last_error(NULL)", da_last_error(c));
}
#define EXPECT(fn, call, want, needle, c) expect(fn, #call, (call), (want), (needle), (c))
#define INV DA_ERR_INVALID_ARGUMENT

static da_problem_t problem(void) {
  da_problem_t p = DA_PROBLEM_INITIALIZER;
  p.seq = 64, p.heads = 2, p.kv_heads = 1, p.dim = 16;
  return p;
}

/* ---- the cases, one per public function ---- */

static void c_status_string(void) {
  const char *a = da_status_string((da_status_t)-1), *b = da_status_string((da_status_t)9999);
  if (!a || !b || strcmp(a, "unknown status")) fail("da_status_string", "out-of-range code", a);
}

static void c_tensor_make(void) {
  const char *fn = "da_tensor_make";
  float x[4];
  int64_t shape[3] = {2, 2, 1}, neg[3] = {2, -1, 1}, huge[3] = {(int64_t)1 << 40, (int64_t)1 << 40, (int64_t)1 << 40};
  da_tensor_t t;
  EXPECT(fn, da_tensor_make(NULL, x, DA_FLOAT32, 3, shape), INV, "t is NULL", NULL);
  EXPECT(fn, da_tensor_make(&t, x, DA_FLOAT32, 3, NULL), INV, "shape is NULL", NULL);
  EXPECT(fn, da_tensor_make(&t, x, DA_FLOAT32, 5, shape), INV, "ndim 5", NULL);
  EXPECT(fn, da_tensor_make(&t, x, DA_FLOAT32, -1, shape), INV, "ndim -1", NULL);
  EXPECT(fn, da_tensor_make(&t, x, DA_FLOAT32, 3, neg), INV, "shape[1]", NULL);
  EXPECT(fn, da_tensor_make(&t, x, DA_FLOAT32, 3, huge), INV, "overflows", NULL);
  if (da_tensor_make(&t, x, DA_FLOAT32, 3, shape) != DA_SUCCESS || t.strides[0] != 2) fail(fn, "valid call", NULL);
}

static void c_context_create(void) {
  const char *fn = "da_context_create";
  da_context_t *c = (da_context_t *)&c; /* must be set to NULL on failure */
  EXPECT(fn, da_context_create(NULL, NULL), INV, "ctx pointer is NULL", NULL);
  da_config_t cfg = DA_CONFIG_INITIALIZER;
  cfg.nthreads = 100000; /* used to crash inside libgomp */
  EXPECT(fn, da_context_create(&cfg, &c), INV, "nthreads 100000", NULL);
  if (c) fail(fn, "*ctx not NULL after a failure", NULL);
  cfg.nthreads = -1;
  EXPECT(fn, da_context_create(&cfg, &c), INV, "nthreads -1", NULL);
  da_config_t bad = {0};
  EXPECT(fn, da_context_create(&bad, &c), INV, "da_config_t", NULL);
  cfg = (da_config_t)DA_CONFIG_INITIALIZER;
  cfg.device = (da_device_t)7;
  EXPECT(fn, da_context_create(&cfg, &c), -1, "device 7", NULL);
  /* environment: checked by the table of core/env.h at context creation */
  static const char *const env[][2] = {{"DISTATTN_NTHREADS", "100000"}, {"DISTATTN_NTHREADS", "1.5"},
                                       {"DISTATTN_TIMEOUT", "0.5"},     {"DISTATTN_TIMEOUT", "soon"},
                                       {"DISTATTN_DEBUG_SUBSYS", "INIT,BOGUS"}};
  for (size_t i = 0; i < sizeof env / sizeof env[0]; i++) {
    setenv(env[i][0], env[i][1], 1);
    EXPECT(fn, da_context_create(NULL, &c), INV, env[i][0], NULL);
    unsetenv(env[i][0]);
  }
}

static void c_context_free(void) { da_context_free(NULL); }

static void c_last_error(void) {
  if (!da_last_error(NULL)) fail("da_last_error", "NULL for a NULL context", NULL);
}

static void c_version_string(void) {
  if (!da_version_string() || !da_version_string()[0]) fail("da_version_string", "empty", NULL);
}

/* The single-rank calls: NULL context, NULL problem, NULL tensors, a row stride of 2^62. */
static void single(const char *fn, int which) {
  da_problem_t p = problem();
  p.seq = 8;
  float *buf = calloc(8 * 2 * 16 * 4, sizeof *buf), *lbuf = calloc(8 * 2, sizeof *lbuf);
  int64_t sq[3] = {8, 2, 16}, skv[3] = {8, 1, 16}, sl[2] = {8, 2}, sd[3] = {1, 2, 16};
  da_tensor_t q, k, v, o, l, dq, dk, dv;
  da_tensor_make(&q, buf, DA_FLOAT32, 3, which == 2 ? sd : sq);
  da_tensor_make(&k, buf, DA_FLOAT32, 3, skv), da_tensor_make(&v, buf, DA_FLOAT32, 3, skv);
  da_tensor_make(&o, buf, DA_FLOAT32, 3, which == 2 ? sd : sq), da_tensor_make(&l, lbuf, DA_FLOAT32, 2, sl);
  da_tensor_make(&dq, buf, DA_FLOAT32, 3, sq), da_tensor_make(&dk, buf, DA_FLOAT32, 3, skv);
  da_tensor_make(&dv, buf, DA_FLOAT32, 3, skv);
  da_tensor_t far = k;
  far.strides[0] = (int64_t)1 << 62; /* row stride 2^62: the span overflows any address */
#define CALL(C, P, Q, K, O)                                                                                 \
  (which == 0   ? da_attention_fwd((C), (P), (Q), (K), &v, (O), NULL, NULL)                                \
   : which == 1 ? da_attention_bwd((C), (P), (Q), (K), &v, &o, &o, &l, &dq, &dk, &dv, NULL)                \
                : da_attention_decode((C), (P), (Q), (K), &v, (O), NULL, NULL))
  EXPECT(fn, CALL(NULL, &p, &q, &k, &o), INV, "context is NULL", NULL);
  EXPECT(fn, CALL(ctx, NULL, &q, &k, &o), INV, "problem is NULL", ctx);
  EXPECT(fn, CALL(ctx, &p, NULL, &k, &o), INV, "q", ctx);
  EXPECT(fn, CALL(ctx, &p, &q, NULL, &o), INV, "k", ctx);
  EXPECT(fn, CALL(ctx, &p, &q, &far, &o), INV, "reaches past any address", ctx);
  if (which != 1) EXPECT(fn, CALL(ctx, &p, &q, &k, NULL), INV, "out", ctx);
#undef CALL
  free(buf), free(lbuf);
}
static void c_attention_fwd(void) { single("da_attention_fwd", 0); }
static void c_attention_bwd(void) { single("da_attention_bwd", 1); }
static void c_attention_decode(void) { single("da_attention_decode", 2); }

static void c_comm_create(void) {
  const char *fn = "da_comm_create";
  da_comm_t *c = NULL;
  EXPECT(fn, da_comm_create(NULL, MPI_COMM_WORLD, &c), INV, "context is NULL", NULL);
  EXPECT(fn, da_comm_create(ctx, MPI_COMM_WORLD, NULL), INV, "output pointer is NULL", ctx);
  EXPECT(fn, da_comm_create(ctx, MPI_COMM_NULL, &c), INV, "MPI_COMM_NULL", ctx);
  if (nranks >= 2) { /* an intercommunicator between the even and the odd ranks */
    MPI_Comm half, inter;
    MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &half);
    MPI_Intercomm_create(half, 0, MPI_COMM_WORLD, rank % 2 ? 0 : 1, 77, &inter);
    EXPECT(fn, da_comm_create(ctx, inter, &c), DA_ERR_UNSUPPORTED, "intercommunicator", ctx);
    MPI_Comm_free(&inter);
    MPI_Comm_free(&half);
  }
}
static void c_comm_create_config(void) {
  const char *fn = "da_comm_create_config";
  da_comm_t *c = NULL;
  da_comm_config_t cfg = DA_COMM_CONFIG_INITIALIZER;
  EXPECT(fn, da_comm_create_config(NULL, MPI_COMM_WORLD, &cfg, &c), INV, "context is NULL", NULL);
  EXPECT(fn, da_comm_create_config(ctx, MPI_COMM_WORLD, &cfg, NULL), INV, "output pointer is NULL", ctx);
  EXPECT(fn, da_comm_create_config(ctx, MPI_COMM_NULL, &cfg, &c), INV, "MPI_COMM_NULL", ctx);
  cfg.version = 0;
  EXPECT(fn, da_comm_create_config(ctx, MPI_COMM_WORLD, &cfg, &c), INV, "DA_COMM_CONFIG_INITIALIZER", ctx);
  cfg.version = DA_API_VERSION, cfg.timeout = -1;
  EXPECT(fn, da_comm_create_config(ctx, MPI_COMM_WORLD, &cfg, &c), INV, "timeout -1 s", ctx);
  cfg.timeout = NAN;
  EXPECT(fn, da_comm_create_config(ctx, MPI_COMM_WORLD, &cfg, &c), INV, "timeout nan s", ctx);
  /* a valid config works (every rank) */
  cfg.timeout = 30;
  if (da_comm_create_config(ctx, MPI_COMM_WORLD, &cfg, &c) != DA_SUCCESS || !c)
    fail(fn, "a valid config was refused", da_last_error(ctx));
  da_comm_free(c);
}
static void c_comm_free(void) { da_comm_free(NULL); }
static void c_comm_rank(void) {
  if (da_comm_rank(NULL) != -1) fail("da_comm_rank", "NULL communicator does not give -1", NULL);
}
static void c_comm_size(void) {
  if (da_comm_size(NULL) != 0) fail("da_comm_size", "NULL communicator does not give 0", NULL);
}

static void c_plan_create(void) {
  const char *fn = "da_plan_create";
  da_problem_t p = problem();
  da_plan_t *pl = NULL;
  EXPECT(fn, da_plan_create(NULL, &p, NULL, &pl), INV, "communicator is NULL", NULL);
  EXPECT(fn, da_plan_create(comm, &p, NULL, NULL), INV, "output pointer is NULL", ctx);
  /* collective: every rank passes the NULL problem, so every rank gets the refusal (this call used
   * to abort the job in MPI_Comm_free) */
  EXPECT(fn, da_plan_create(comm, NULL, NULL, &pl), INV, "problem is NULL", ctx);
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.block = -5;
  EXPECT(fn, da_plan_create(comm, &p, &cfg, &pl), INV, "block", ctx);
  if (pl) fail(fn, "*out not NULL after a failure", NULL);
}
static void c_plan_free(void) { da_plan_free(NULL); }
static void c_plan_local_rows(void) {
  if (da_plan_local_rows(NULL) != -1) fail("da_plan_local_rows", "NULL plan does not give -1", NULL);
}
static void c_plan_local_positions(void) {
  const char *fn = "da_plan_local_positions";
  int64_t pos[1];
  EXPECT(fn, da_plan_local_positions(NULL, pos, 1), INV, "plan is NULL", NULL);
  EXPECT(fn, da_plan_local_positions(plan, NULL, 1000), INV, "pos is NULL", ctx);
  EXPECT(fn, da_plan_local_positions(plan, pos, 1), INV, "room for 1", ctx);
}
static void plan_call(const char *fn, int bwd) {
  float x[16];
  int64_t shape[3] = {1, 2, 16};
  da_tensor_t t;
  da_tensor_make(&t, x, DA_FLOAT32, 3, shape);
  if (bwd) {
    EXPECT(fn, da_plan_bwd(NULL, &t, &t, &t, &t, &t, &t, &t, &t, &t, NULL), INV, "plan is NULL", NULL);
    EXPECT(fn, da_plan_bwd(plan, NULL, &t, &t, &t, &t, &t, &t, &t, &t, NULL), -1, "q", ctx);
  } else {
    EXPECT(fn, da_plan_fwd(NULL, &t, &t, &t, &t, NULL, NULL), INV, "plan is NULL", NULL);
    EXPECT(fn, da_plan_fwd(plan, NULL, &t, &t, &t, NULL, NULL), -1, "q", ctx);
  }
}
static void c_plan_fwd(void) { plan_call("da_plan_fwd", 0); }
static void c_plan_bwd(void) { plan_call("da_plan_bwd", 1); }
static void c_plan_set_mode(void) {
  EXPECT("da_plan_set_mode", da_plan_set_mode(NULL, DA_PLAN_RUN), INV, "plan is NULL", NULL);
  EXPECT("da_plan_set_mode", da_plan_set_mode(plan, (da_plan_mode_t)7), INV, "mode 7", ctx);
}
static void c_plan_stats(void) {
  const char *fn = "da_plan_stats";
  da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER, z = {0};
  EXPECT(fn, da_plan_stats(NULL, &s), INV, "plan is NULL", NULL);
  EXPECT(fn, da_plan_stats(plan, NULL), INV, "stats is NULL", ctx);
  EXPECT(fn, da_plan_stats(plan, &z), INV, "da_plan_stats_t", ctx);
}

static void c_kvcache_create(void) {
  const char *fn = "da_kvcache_create";
  da_problem_t p = problem();
  da_kvcache_t *c = NULL;
  EXPECT(fn, da_kvcache_create(NULL, &p, NULL, &c), INV, "communicator is NULL", NULL);
  EXPECT(fn, da_kvcache_create(comm, &p, NULL, NULL), INV, "output is NULL", ctx);
  EXPECT(fn, da_kvcache_create(comm, NULL, NULL, &c), INV, "problem is NULL", ctx);
  /* a page of 2^60 tokens: accepted, but its first page's size overflows: refused, not wrapped */
  da_kvcache_config_t cfg = DA_KVCACHE_CONFIG_INITIALIZER;
  cfg.page = (int64_t)1 << 60;
  if (da_kvcache_create(comm, &p, &cfg, &c) == DA_SUCCESS) {
    /* one token with data: the rank that owns the new page would copy a row into an allocation
     * whose size wrapped around to 0 (a heap overflow before the checked multiply) */
    int64_t one = 1, shape[3] = {1, 1, 16};
    float row[16] = {0};
    da_tensor_t k;
    da_tensor_make(&k, row, DA_FLOAT32, 3, shape);
    da_status_t st = da_kvcache_append(c, &one, &k, &k);
    int refused = st != DA_SUCCESS, any = 0;
    if (refused) expect(fn, "da_kvcache_append(page 2^60)", st, -1, "overflows", ctx);
    else if (da_kvcache_local_rows(c, 0) != 0) fail(fn, "a page of 2^60 rows was taken", NULL);
    MPI_Allreduce(&refused, &any, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (!any) fail(fn, "no rank refused the page of 2^60 rows", NULL);
    da_kvcache_free(c);
  }
}
static void c_kvcache_free(void) { da_kvcache_free(NULL); }
static void c_kvcache_prefill(void) {
  EXPECT("da_kvcache_prefill", da_kvcache_prefill(NULL, 0, 4, NULL, NULL), INV, "cache is NULL", NULL);
}
static void c_kvcache_append(void) {
  const char *fn = "da_kvcache_append";
  int64_t one = 1;
  EXPECT(fn, da_kvcache_append(NULL, &one, NULL, NULL), INV, "cache is NULL", NULL);
  EXPECT(fn, da_kvcache_append(cache, NULL, NULL, NULL), INV, "ntok is NULL", ctx);
}
static void c_kvcache_length(void) {
  if (da_kvcache_length(NULL, 0) != -1 || da_kvcache_length(cache, 5) != -1)
    fail("da_kvcache_length", "NULL cache or no sequence does not give -1", NULL);
}
static void c_kvcache_local_rows(void) {
  if (da_kvcache_local_rows(NULL, 0) != -1 || da_kvcache_local_rows(cache, -1) != -1)
    fail("da_kvcache_local_rows", "NULL cache or no sequence does not give -1", NULL);
}
static void c_kvcache_local_positions(void) {
  const char *fn = "da_kvcache_local_positions";
  int64_t pos[1];
  EXPECT(fn, da_kvcache_local_positions(NULL, 0, pos, 1), INV, "cache is NULL", NULL);
  EXPECT(fn, da_kvcache_local_positions(cache, 3, pos, 1), INV, "no sequence 3", ctx);
  EXPECT(fn, da_kvcache_local_positions(cache, 0, NULL, 1000), INV, "pos is NULL", ctx);
}
static void c_kvcache_num_pages(void) {
  if (da_kvcache_num_pages(NULL, 0) != -1) fail("da_kvcache_num_pages", "NULL cache does not give -1", NULL);
}
static void c_kvcache_get_page(void) {
  const char *fn = "da_kvcache_get_page";
  da_kvcache_page_t pg;
  EXPECT(fn, da_kvcache_get_page(NULL, 0, 0, &pg), INV, "cache is NULL", NULL);
  EXPECT(fn, da_kvcache_get_page(cache, 0, 0, NULL), INV, "page is NULL", ctx);
  EXPECT(fn, da_kvcache_get_page(cache, 0, 999, &pg), INV, "no page 999", ctx);
}
static void c_kvcache_bytes(void) {
  size_t r = 7;
  if (da_kvcache_bytes(NULL, &r) != 0) fail("da_kvcache_bytes", "NULL cache does not give 0", NULL);
}

static void c_decode_plan_create(void) {
  const char *fn = "da_decode_plan_create";
  da_problem_t p = problem();
  da_decode_plan_t *d = NULL;
  EXPECT(fn, da_decode_plan_create(NULL, &p, NULL, &d), INV, "communicator is NULL", NULL);
  EXPECT(fn, da_decode_plan_create(comm, &p, NULL, NULL), INV, "output is NULL", ctx);
  EXPECT(fn, da_decode_plan_create(comm, NULL, NULL, &d), INV, "problem is NULL", ctx);
}
static void c_decode_plan_free(void) { da_decode_plan_free(NULL); }
static void c_decode_step(void) {
  float x[64];
  int64_t shape[3] = {1, 2, 16};
  da_tensor_t t;
  da_tensor_make(&t, x, DA_FLOAT32, 3, shape);
  EXPECT("da_decode_step", da_decode_step(NULL, cache, &t, &t, NULL, NULL), INV, "plan is NULL", NULL);
  EXPECT("da_decode_step", da_decode_step(dplan, NULL, &t, &t, NULL, NULL), -1, "cache is NULL", ctx);
}
static void c_decode_plan_stats(void) {
  const char *fn = "da_decode_plan_stats";
  da_decode_stats_t s = DA_DECODE_STATS_INITIALIZER;
  EXPECT(fn, da_decode_plan_stats(NULL, &s), INV, "plan is NULL", NULL);
  EXPECT(fn, da_decode_plan_stats(dplan, NULL), INV, "stats is NULL", ctx);
}

static void c_offload_create(void) {
  const char *fn = "da_offload_create";
  da_problem_t p = problem();
  da_offload_t *o = NULL;
  EXPECT(fn, da_offload_create(NULL, DA_ROLE_COMPUTE, &p, NULL, &o), INV, "communicator is NULL", NULL);
  EXPECT(fn, da_offload_create(comm, DA_ROLE_COMPUTE, &p, NULL, NULL), INV, "output is NULL", ctx);
  /* collective: every rank a compute rank, so no memory rank */
  EXPECT(fn, da_offload_create(comm, DA_ROLE_COMPUTE, &p, NULL, &o), INV, "memory", ctx);
  if (o) fail(fn, "*out not NULL after a failure", NULL);
}
static void c_offload_free(void) { da_offload_free(NULL); }
static void c_offload_get_info(void) {
  da_offload_info_t i;
  EXPECT("da_offload_get_info", da_offload_get_info(NULL, &i), INV, "offload is NULL", NULL);
}
static void c_offload_cache(void) {
  if (da_offload_cache(NULL) != NULL) fail("da_offload_cache", "NULL offload does not give NULL", NULL);
}
static void c_offload_check_fit(void) {
  int64_t len[1] = {4};
  EXPECT("da_offload_check_fit", da_offload_check_fit(NULL, len, NULL), INV, "offload is NULL", NULL);
}
static void c_offload_kv_bytes(void) {
  da_problem_t p = problem();
  int64_t len[1] = {4};
  if (da_offload_kv_bytes(NULL, 1, len) != -1.0 || da_offload_kv_bytes(&p, 1, NULL) != -1.0 ||
      da_offload_kv_bytes(&p, 0, len) != -1.0)
    fail("da_offload_kv_bytes", "NULL problem / final_len or 0 layers does not give -1", NULL);
  else if (!strstr(da_last_error(NULL), "da_offload_kv_bytes"))
    fail("da_offload_kv_bytes", "no message", da_last_error(NULL));
}
static void c_offload_start(void) {
  const char *fn = "da_offload_start";
  int slot;
  EXPECT(fn, da_offload_start(NULL, 0, 0, NULL, NULL, NULL, &slot), INV, "offload is NULL", NULL);
  if (nranks < 2) return;
  /* a real offload (rank 0 computes, the others hold the cache): a row stride of 2^62 in k used
   * to pass its row check, and `first * stride` wrapped around */
  da_problem_t p = problem();
  p.batch = 2;
  da_offload_config_t cfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  cfg.mem_budget = 1e8, cfg.page = 16, cfg.timeout = 30;
  da_offload_t *o = NULL;
  if (da_offload_create(comm, rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &p, &cfg, &o) != DA_SUCCESS) {
    fail(fn, "offload setup", da_last_error(NULL));
    return;
  }
  if (rank == 0) {
    float q[64] = {0}, kv[32] = {0}, out[64];
    const int64_t sq[3] = {2, 2, 16}, sk[3] = {2, 1, 16};
    da_tensor_t tq, tk, to, far;
    da_tensor_make(&tq, q, DA_FLOAT32, 3, sq), da_tensor_make(&tk, kv, DA_FLOAT32, 3, sk);
    da_tensor_make(&to, out, DA_FLOAT32, 3, sq);
    far = tk;
    far.strides[0] = (int64_t)1 << 62;
    EXPECT(fn, da_offload_start(o, 0, 0, &tq, &far, &tk, &slot), INV, "reaches past any address", ctx);
    EXPECT("da_offload_step", da_offload_step(o, 0, &tq, &tk, &far, &to, NULL), INV, "reaches past any address", ctx);
    EXPECT("da_offload_wait", da_offload_wait(o, 0, &to, NULL), INV, "slot 0", ctx);
    if (da_offload_stop(o) != DA_SUCCESS) fail(fn, "stop", da_last_error(NULL));
  } else if (da_offload_serve(o) != DA_SUCCESS) {
    fail(fn, "serve", da_last_error(NULL));
  }
  da_offload_free(o);
}
static void c_offload_progress(void) { da_offload_progress(NULL); }
static void c_offload_wait(void) {
  EXPECT("da_offload_wait", da_offload_wait(NULL, 0, NULL, NULL), INV, "offload is NULL", NULL);
}
static void c_offload_step(void) {
  EXPECT("da_offload_step", da_offload_step(NULL, 0, NULL, NULL, NULL, NULL, NULL), INV, "offload is NULL", NULL);
}
static void c_offload_stop(void) { EXPECT("da_offload_stop", da_offload_stop(NULL), INV, "offload is NULL", NULL); }
static void c_offload_cancel(void) {
  EXPECT("da_offload_cancel", da_offload_cancel(NULL, "x"), INV, "offload is NULL", NULL);
}
static void c_offload_serve(void) { EXPECT("da_offload_serve", da_offload_serve(NULL), INV, "offload is NULL", NULL); }
static void c_offload_get_stats(void) {
  da_offload_stats_t s;
  EXPECT("da_offload_get_stats", da_offload_get_stats(NULL, &s), INV, "offload is NULL", NULL);
}

static const struct {
  const char *fn;
  void (*run)(void);
} cases[] = {
    {"da_status_string", c_status_string}, {"da_tensor_make", c_tensor_make},
    {"da_context_create", c_context_create}, {"da_context_free", c_context_free},
    {"da_last_error", c_last_error}, {"da_attention_fwd", c_attention_fwd},
    {"da_attention_bwd", c_attention_bwd}, {"da_attention_decode", c_attention_decode},
    {"da_version_string", c_version_string}, {"da_comm_create", c_comm_create}, {"da_comm_create_config", c_comm_create_config},
    {"da_comm_free", c_comm_free}, {"da_comm_rank", c_comm_rank}, {"da_comm_size", c_comm_size},
    {"da_plan_create", c_plan_create}, {"da_plan_free", c_plan_free},
    {"da_plan_local_rows", c_plan_local_rows}, {"da_plan_local_positions", c_plan_local_positions},
    {"da_plan_fwd", c_plan_fwd}, {"da_plan_bwd", c_plan_bwd}, {"da_plan_set_mode", c_plan_set_mode},
    {"da_plan_stats", c_plan_stats}, {"da_kvcache_create", c_kvcache_create},
    {"da_kvcache_free", c_kvcache_free}, {"da_kvcache_prefill", c_kvcache_prefill},
    {"da_kvcache_append", c_kvcache_append}, {"da_kvcache_length", c_kvcache_length},
    {"da_kvcache_local_rows", c_kvcache_local_rows}, {"da_kvcache_local_positions", c_kvcache_local_positions},
    {"da_kvcache_num_pages", c_kvcache_num_pages}, {"da_kvcache_get_page", c_kvcache_get_page},
    {"da_kvcache_bytes", c_kvcache_bytes}, {"da_decode_plan_create", c_decode_plan_create},
    {"da_decode_plan_free", c_decode_plan_free}, {"da_decode_step", c_decode_step},
    {"da_decode_plan_stats", c_decode_plan_stats}, {"da_offload_create", c_offload_create},
    {"da_offload_free", c_offload_free}, {"da_offload_get_info", c_offload_get_info},
    {"da_offload_cache", c_offload_cache}, {"da_offload_check_fit", c_offload_check_fit},
    {"da_offload_kv_bytes", c_offload_kv_bytes}, {"da_offload_start", c_offload_start},
    {"da_offload_progress", c_offload_progress}, {"da_offload_wait", c_offload_wait},
    {"da_offload_step", c_offload_step}, {"da_offload_stop", c_offload_stop},
    {"da_offload_cancel", c_offload_cancel}, {"da_offload_serve", c_offload_serve},
    {"da_offload_get_stats", c_offload_get_stats},
};
#define NCASES (sizeof cases / sizeof cases[0])

/* Every function the header declares (a line that starts a declaration: a type at column 0, then
 * `da_name(`) must have a case. Returns the number declared. */
static int check_coverage(void) {
  FILE *f = fopen(DA_HEADER_PATH, "r");
  if (!f) {
    fail("coverage", "cannot open the header", DA_HEADER_PATH);
    return 0;
  }
  char line[512];
  int declared = 0;
  while (fgets(line, sizeof line, f)) {
    if (line[0] < 'a' || line[0] > 'z' || !strncmp(line, "typedef", 7)) continue;
    char *p = strstr(line, "da_");
    for (; p; p = strstr(p + 1, "da_")) {
      size_t n = strspn(p, "abcdefghijklmnopqrstuvwxyz0123456789_");
      if (p[n] != '(') continue;
      char name[128];
      snprintf(name, sizeof name, "%.*s", (int)n, p);
      declared++;
      size_t i = 0;
      while (i < NCASES && strcmp(cases[i].fn, name)) i++;
      if (i == NCASES) fail(name, "declared in distattn.h but has no misuse case in tests/test_misuse.c", NULL);
      break;
    }
  }
  fclose(f);
  return declared;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  const int declared = check_coverage();
  da_problem_t p = problem();
  if (da_context_create(NULL, &ctx) || da_comm_create(ctx, MPI_COMM_WORLD, &comm) ||
      da_plan_create(comm, &p, NULL, &plan) || da_kvcache_create(comm, &p, NULL, &cache) ||
      da_kvcache_prefill(cache, 0, 40, NULL, NULL) || da_decode_plan_create(comm, &p, NULL, &dplan)) {
    fprintf(stderr, "rank %d: setup failed: %s\n", rank, da_last_error(NULL));
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (size_t i = 0; i < NCASES; i++) cases[i].run();
  da_decode_plan_free(dplan);
  da_kvcache_free(cache);
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    printf("# test_misuse: %d functions declared in distattn.h, %zu with cases, %d ranks: %d failures -> %s\n",
           declared, NCASES, nranks, total, total ? "FAIL" : "PASS");
  MPI_Finalize();
  return total ? 1 : 0;
}
