/* test_tree.c: decode over the distributed paged KV cache (tree: flat / two-level, allreduce /
 * reduce to a root; ring baseline) against the float64 reference, run under mpirun for P in
 * {1,2,3,4,5,8}. Every rank regenerates the whole (small) sequences from the counter RNG for the
 * reference, fills only its own pages, and checks the outputs it holds at every step of an
 * append + decode loop. Also: shard balance and ownership, prefill from local tensors and in
 * place, GQA / MQA, batches of different lengths (one empty), bf16, several tokens per step,
 * disagreeing ranks, a bad tensor on one rank. Check in CK_NOFORK mode: every assertion is on
 * values reduced across ranks, so all ranks pass or fail it together. */
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
static da_comm_t *g_comm;

#define MAXB 4
#define NPLANS 5

/* One combination variant to run side by side on the same cache. */
typedef struct {
  const char *name;
  da_decode_algo_t algo;
  da_decode_topo_t topo;
  int root;      /* -1, or a rank (taken mod P) */
  int node_size; /* two-level groups (0 = shared memory) */
} variant_t;

typedef struct {
  const char *name;
  int B, H, G, D;
  da_dtype_t dt;
  int64_t lens[MAXB]; /* prefill lengths */
  da_algo_t layout;
  int weighted;       /* weights r + 1 */
  int64_t page;
  int steps, T;       /* decode steps, tokens appended and decoded per step */
  int in_place;       /* prefill through da_kvcache_get_page instead of local tensors */
  int nvar;
  variant_t var[NPLANS];
  int64_t window;     /* > 0: sliding window (with causal) */
  const char *transport; /* NULL: mpi (host memory); "host-ipc" / "host-mpi": the device tree on the host seam
                            (pages and partials in the host device table's memory, two device
                            allreduces) for the cache and every plan */
} tcase_t;

static uint64_t bseed(int b) { return 1000u + 7919u * (uint64_t)b; }

/* Row (pos, head) of a tensor rounded to dt, into float storage dst (dt) and/or double ref. */
static void gen_row(int b, uint32_t tensor, int64_t pos, int heads, int D, da_dtype_t dt, void *dst, int64_t off,
                    double *ref) {
  float row[512];
  for (int h = 0; h < heads; h++) {
    da_rng_row(bseed(b), tensor, pos, h, D, row);
    for (int d = 0; d < D; d++) {
      float x = da_round_to((int)dt, row[d]);
      if (dst) da_store_f32(dst, (int)dt, off + (int64_t)h * D + d, x);
      if (ref) ref[h * D + d] = x;
    }
  }
}

/* Ownership and balance of the shards of sequence b: every position held exactly once, counts
 * add up, unweighted shards within one page. Collective. Returns an error count. */
static int check_shards(da_kvcache_t *cache, int b, int64_t page, int weighted, char *why, size_t wn) {
  const int64_t len = da_kvcache_length(cache, b), n = da_kvcache_local_rows(cache, b);
  int *mark = calloc((size_t)(len ? len : 1), sizeof *mark);
  int64_t *pos = malloc((size_t)(n ? n : 1) * sizeof *pos);
  int bad = !mark || !pos || da_kvcache_local_positions(cache, b, pos, n) != DA_SUCCESS;
  for (int64_t i = 0; !bad && i < n; i++) {
    if (pos[i] < 0 || pos[i] >= len) bad = 1;
    else mark[pos[i]]++;
  }
  if (!bad) MPI_Allreduce(MPI_IN_PLACE, mark, (int)(len ? len : 1), MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  else MPI_Allreduce(MPI_IN_PLACE, mark, (int)(len ? len : 1), MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  for (int64_t p = 0; !bad && p < len; p++)
    if (mark[p] != 1) {
      snprintf(why, wn, "seq %d: position %lld held %d times", b, (long long)p, mark[p]);
      bad = 1;
    }
  int64_t mm[2] = {n, -n};
  MPI_Allreduce(MPI_IN_PLACE, mm, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  if (!bad && !weighted && mm[0] + mm[1] > page) {
    snprintf(why, wn, "seq %d: shards %lld..%lld differ by more than a page (%lld)", b, (long long)-mm[1],
             (long long)mm[0], (long long)page);
    bad = 1;
  }
  free(mark), free(pos);
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}

/* Fill sequence b's prefill: from local tensors (the rows da_plan_fwd would hold) or in place. */
static da_status_t prefill(da_kvcache_t *cache, const tcase_t *c, int b) {
  const int G = c->G, D = c->D;
  const size_t es = da_dtype_size(c->dt);
  if (c->in_place || c->weighted) { /* weighted: no ring plan has this layout; fill in place */
    da_status_t st = da_kvcache_prefill(cache, b, c->lens[b], NULL, NULL);
    if (st != DA_SUCCESS) return st;
    for (int64_t i = 0; i < da_kvcache_num_pages(cache, b); i++) {
      da_kvcache_page_t pg;
      if ((st = da_kvcache_get_page(cache, b, i, &pg)) != DA_SUCCESS) return st;
      for (int64_t j = 0; j < pg.count; j++) {
        gen_row(b, DA_RNG_K, pg.start + j * pg.stride, G, D, c->dt, pg.k, j * pg.ldk, NULL);
        gen_row(b, DA_RNG_V, pg.start + j * pg.stride, G, D, c->dt, pg.v, j * pg.ldv, NULL);
      }
    }
    return DA_SUCCESS;
  }
  /* The local rows of the layout, computed here independently of the cache: the plan of the ring
   * driver over seq = len with the same algo owns exactly these positions. */
  int64_t n = 0, *pos = NULL;
  da_plan_t *plan = NULL;
  if (c->lens[b] > 0) {
    da_problem_t prob = DA_PROBLEM_INITIALIZER;
    prob.seq = c->lens[b], prob.heads = c->G, prob.kv_heads = c->G, prob.dim = c->D, prob.dtype = c->dt;
    da_plan_config_t pc = DA_PLAN_CONFIG_INITIALIZER;
    pc.algo = c->layout;
    da_status_t st = da_plan_create(g_comm, &prob, &pc, &plan);
    if (st != DA_SUCCESS) return st;
    n = da_plan_local_rows(plan);
    pos = malloc((size_t)(n + 1) * sizeof *pos);
    da_plan_local_positions(plan, pos, n);
    da_plan_free(plan);
  }
  char *k = malloc((size_t)(n + 1) * G * D * es), *v = malloc((size_t)(n + 1) * G * D * es);
  for (int64_t i = 0; i < n; i++) {
    gen_row(b, DA_RNG_K, pos[i], G, D, c->dt, k, i * G * D, NULL);
    gen_row(b, DA_RNG_V, pos[i], G, D, c->dt, v, i * G * D, NULL);
  }
  da_tensor_t tk, tv;
  const int64_t sh[3] = {n, G, D};
  da_tensor_make(&tk, k, c->dt, 3, sh), da_tensor_make(&tv, v, c->dt, 3, sh);
  da_status_t st = da_kvcache_prefill(cache, b, c->lens[b], &tk, &tv);
  free(k), free(v), free(pos);
  return st;
}

/* Run one case; returns the number of failures (agreed over ranks); messages on rank 0's stderr. */
static int run_case(const tcase_t *c) {
  const int B = c->B, H = c->H, G = c->G, D = c->D, T = c->T;
  const da_dtype_t dt = c->dt;
  const size_t es = da_dtype_size(dt);
  const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2, agree_tol = dt == DA_FLOAT32 ? 2e-5 : 1e-2;
  char why[300] = "";
  int fails = 0;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = dt, prob.mask = DA_MASK_CAUSAL;
  if (c->window > 0) prob.mask |= DA_MASK_WINDOW, prob.window = c->window;
  double w[16];
  for (int r = 0; r < 16; r++) w[r] = r + 1;
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  kc.page = c->page, kc.layout = c->layout, kc.weights = c->weighted ? w : NULL, kc.timeout = 60;
  kc.transport = c->transport;
  da_kvcache_t *cache = NULL;
  da_decode_plan_t *plans[NPLANS] = {0};
  da_status_t st = da_kvcache_create(g_comm, &prob, &kc, &cache);
  if (!tu_all_equal_status(st, DA_SUCCESS)) {
    snprintf(why, sizeof why, "cache: %s", da_last_error(g_ctx));
    fails++;
    goto done;
  }
  for (int i = 0; i < c->nvar; i++) {
    da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
    dc.algo = c->var[i].algo, dc.topo = c->var[i].topo, dc.node_size = c->var[i].node_size, dc.timeout = 60;
    dc.root = c->var[i].root < 0 ? -1 : c->var[i].root % g_size;
    dc.transport = c->transport;
    st = da_decode_plan_create(g_comm, &prob, &dc, &plans[i]);
    if (!tu_all_equal_status(st, DA_SUCCESS)) {
      snprintf(why, sizeof why, "plan %s: %s", c->var[i].name, da_last_error(g_ctx));
      fails++;
      goto done;
    }
  }
  for (int b = 0; b < B; b++) {
    st = prefill(cache, c, b);
    if (!tu_all_equal_status(st, DA_SUCCESS)) {
      snprintf(why, sizeof why, "prefill %d: %s", b, da_last_error(g_ctx));
      fails++;
      goto done;
    }
  }
  for (int b = 0; b < B && !fails; b++) fails += check_shards(cache, b, c->page, c->weighted, why, sizeof why);
  {
    char *q = malloc((size_t)(B * T * H * D) * es), *kn = malloc((size_t)(B * T * G * D) * es);
    char *vn = malloc((size_t)(B * T * G * D) * es), *out[NPLANS];
    float *lse[NPLANS];
    for (int i = 0; i < NPLANS; i++)
      out[i] = malloc((size_t)(B * T * H * D) * es), lse[i] = malloc((size_t)(B * T * H) * sizeof(float));
    int64_t maxlen = 0;
    for (int b = 0; b < B; b++) maxlen = c->lens[b] > maxlen ? c->lens[b] : maxlen;
    maxlen += (int64_t)c->steps * T;
    double *rq = malloc((size_t)(T * H * D) * 8), *rk = malloc((size_t)(maxlen * G * D) * 8);
    double *rv = malloc((size_t)(maxlen * G * D) * 8), *ro = malloc((size_t)(T * H * D) * 8);
    double *rl = malloc((size_t)(T * H) * 8);
    int64_t ntok[MAXB];
    for (int b = 0; b < B; b++) ntok[b] = T;
    da_kparams_t kp;
    memset(&kp, 0, sizeof kp);
    kp.H = H, kp.G = G, kp.D = D, kp.scale = (float)(1.0 / sqrt((double)D)), kp.dtype = dt;
    kp.mask.flags = prob.mask, kp.mask.window = prob.window;
    for (int s = 0; s < c->steps && !fails; s++) {
      for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
          int64_t pos = da_kvcache_length(cache, b) + t;
          gen_row(b, DA_RNG_K, pos, G, D, dt, kn, (int64_t)(b * T + t) * G * D, NULL);
          gen_row(b, DA_RNG_V, pos, G, D, dt, vn, (int64_t)(b * T + t) * G * D, NULL);
          gen_row(b, DA_RNG_Q, pos, H, D, dt, q, (int64_t)(b * T + t) * H * D, NULL);
        }
      da_tensor_t tq, tk, tv, to[NPLANS], tl[NPLANS];
      const int64_t shq[4] = {B, T, H, D}, shk[4] = {B, T, G, D}, shl[3] = {B, T, H};
      da_tensor_make(&tq, q, dt, 4, shq), da_tensor_make(&tk, kn, dt, 4, shk), da_tensor_make(&tv, vn, dt, 4, shk);
      st = da_kvcache_append(cache, ntok, &tk, &tv);
      if (!tu_all_equal_status(st, DA_SUCCESS)) {
        snprintf(why, sizeof why, "append step %d: %s", s, da_last_error(g_ctx));
        fails++;
        break;
      }
      for (int i = 0; i < c->nvar && !fails; i++) {
        /* poisoned outputs (0xFF bytes: NaN in every float format): a row left unwritten fails */
        memset(out[i], 0xFF, (size_t)(B * T * H * D) * es), memset(lse[i], 0xFF, (size_t)(B * T * H) * sizeof(float));
        da_tensor_make(&to[i], out[i], dt, 4, shq), da_tensor_make(&tl[i], lse[i], DA_FLOAT32, 3, shl);
        st = da_decode_step(plans[i], cache, &tq, &to[i], &tl[i], NULL);
        if (!tu_all_equal_status(st, DA_SUCCESS)) {
          snprintf(why, sizeof why, "decode %s step %d: %s", c->var[i].name, s, da_last_error(g_ctx));
          fails++;
        }
      }
      if (fails) break;
      /* the reference: every sequence from scratch in float64 */
      double err[NPLANS] = {0}, agree = 0;
      for (int b = 0; b < B; b++) {
        const int64_t len = da_kvcache_length(cache, b);
        for (int64_t p = 0; p < len; p++) {
          gen_row(b, DA_RNG_K, p, G, D, dt, NULL, 0, rk + p * G * D);
          gen_row(b, DA_RNG_V, p, G, D, dt, NULL, 0, rv + p * G * D);
        }
        for (int t = 0; t < T; t++) gen_row(b, DA_RNG_Q, len - T + t, H, D, dt, NULL, 0, rq + (int64_t)t * H * D);
        da_ref_fwd(&kp, rq, da_span(len - T, 1, T), rk, rv, da_span(0, 1, len), ro, rl);
        for (int i = 0; i < c->nvar; i++) {
          const int root = c->var[i].root < 0 ? -1 : c->var[i].root % g_size;
          if (root >= 0 && root != g_rank) continue;
          for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
              const int64_t row = ((int64_t)b * T + t) * H + h;
              double e = tu_row_err(out[i], dt, row * D, ro + (t * H + h) * D, D, 0);
              double le = fabs(lse[i][row] - rl[t * H + h]) / fmax(1.0, fabs(rl[t * H + h]));
              e = fmax(e, le);
              if (!(e <= err[i])) err[i] = e;
              /* every variant against the first (all output on this rank): same math, other order */
              if (i > 0) {
                double a = 0, m = 0;
                for (int d = 0; d < D; d++) {
                  double x = da_load_f32(out[i], (int)dt, row * D + d), y = da_load_f32(out[0], (int)dt, row * D + d);
                  a = fmax(a, fabs(x - y)), m = fmax(m, fabs(y));
                }
                a /= fmax(m, 1e-6);
                if (!(a <= agree)) agree = a;
              }
            }
        }
      }
      for (int i = 0; i < c->nvar; i++) {
        double e = tu_reduce(err[i], MPI_MAX);
        if (!(e <= tol)) {
          snprintf(why, sizeof why, "%s step %d: error %.3g > %.3g", c->var[i].name, s, e, tol);
          fails++;
        }
      }
      agree = tu_reduce(agree, MPI_MAX);
      if (!(agree <= agree_tol)) {
        snprintf(why, sizeof why, "step %d: variants disagree by %.3g > %.3g", s, agree, agree_tol);
        fails++;
      }
      for (int b = 0; b < B && !fails; b++) fails += check_shards(cache, b, c->page, c->weighted, why, sizeof why);
    }
    /* stats: bytes per step (the ring sends (P-1) partials; P = 1 sends nothing) */
    for (int i = 0; i < c->nvar && !fails; i++) {
      da_decode_stats_t ds = DA_DECODE_STATS_INITIALIZER;
      int bad = da_decode_plan_stats(plans[i], &ds) != DA_SUCCESS || ds.nranks != g_size ||
                ds.partial_bytes != (size_t)(B * T * H) * (size_t)(D + 1) * 4;
      uint64_t total = ds.bytes_sent;
      MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
      /* tree: a binomial reduce sends P - 1 messages, the allreduce twice that; ring: P - 1 hops
       * carrying the query and the partials, then (root = -1) a broadcast of the partials */
      const uint64_t m = ds.partial_bytes, P1 = (uint64_t)(g_size - 1);
      uint64_t want = c->var[i].algo == DA_DECODE_TREE ? P1 * m * (c->var[i].root < 0 ? 2 : 1)
                                                       : P1 * (m + (uint64_t)(B * T * H * D) * es) +
                                                             (c->var[i].root < 0 ? P1 * m : 0);
      /* the device tree: two allreduces (whatever the root), of the partials and of the maxima
       * with the failure flag: B*T*H + 1 floats */
      if (c->transport) want = 2 * P1 * (m + (uint64_t)(B * T * H + 1) * 4);
      bad |= total != want;
      bad = tu_reduce(bad, MPI_MAX);
      if (bad) {
        snprintf(why, sizeof why, "%s: stats (bytes %llu, partial %zu)", c->var[i].name,
                 (unsigned long long)ds.bytes_sent, ds.partial_bytes);
        fails++;
      }
    }
    for (int i = 0; i < NPLANS; i++) free(out[i]), free(lse[i]);
    free(q), free(kn), free(vn), free(rq), free(rk), free(rv), free(ro), free(rl);
  }
done:
  for (int i = 0; i < NPLANS; i++) da_decode_plan_free(plans[i]);
  da_kvcache_free(cache);
  if (fails && g_rank == 0) fprintf(stderr, "FAIL %s (P=%d): %s\n", c->name, g_size, why);
  return fails;
}

/* ---- the cases ---- */
#define V_TREE {"tree", DA_DECODE_TREE, DA_TOPO_FLAT, -1, 0}
#define V_RING {"ring", DA_DECODE_RING, DA_TOPO_FLAT, -1, 0}
#define V_TREE2(ns) {"tree two-level", DA_DECODE_TREE, DA_TOPO_TWO_LEVEL, -1, ns}
#define V_ROOT(r) {"tree root", DA_DECODE_TREE, DA_TOPO_FLAT, r, 0}
#define V_ROOT2(r, ns) {"tree two-level root", DA_DECODE_TREE, DA_TOPO_TWO_LEVEL, r, ns}
#define V_RING_ROOT(r) {"ring root", DA_DECODE_RING, DA_TOPO_FLAT, r, 0}

START_TEST(matrix) {
  static const tcase_t cases[] = {
      {"mha contiguous", 1, 4, 4, 32, DA_FLOAT32, {100}, DA_ALGO_RING, 0, 16, 3, 1, 0, 3,
       {V_TREE, V_RING, V_TREE2(2)}, 0, NULL},
      {"gqa zigzag batch", 3, 8, 2, 64, DA_FLOAT32, {77, 5, 203}, DA_ALGO_ZIGZAG, 0, 8, 4, 1, 0, 4,
       {V_TREE, V_RING, V_TREE2(2), V_ROOT(1)}, 0, NULL},
      {"mqa striped empty seq", 2, 4, 1, 64, DA_FLOAT32, {150, 0}, DA_ALGO_STRIPED, 0, 4, 3, 1, 1, 4,
       {V_TREE, V_RING, V_ROOT(7), V_RING_ROOT(2)}, 0, NULL},
      {"weighted", 2, 4, 2, 32, DA_FLOAT32, {120, 33}, DA_ALGO_RING, 1, 5, 3, 1, 1, 4,
       {V_TREE, V_RING, V_TREE2(3), V_ROOT2(2, 2)}, 0, NULL},
      {"bf16 two tokens per step", 2, 4, 2, 32, DA_BFLOAT16, {64, 100}, DA_ALGO_RING, 0, 16, 2, 2, 0, 4,
       {V_TREE, V_RING, V_TREE2(0), V_RING_ROOT(0)}, 0, NULL},
      {"uneven 1000+P-1", 1, 4, 1, 64, DA_FLOAT32, {0}, DA_ALGO_RING, 0, 32, 2, 1, 1, 3,
       {V_TREE, V_RING, V_ROOT2(3, 3)}, 0, NULL},
      {"tiny: fewer tokens than ranks", 2, 2, 1, 16, DA_FLOAT32, {1, 3}, DA_ALGO_ZIGZAG, 0, 1, 3, 1, 0, 2,
       {V_TREE, V_RING}, 0, NULL},
      {"sliding window 50, two tokens per step", 2, 4, 2, 32, DA_FLOAT32, {300, 40}, DA_ALGO_STRIPED, 0, 8, 2, 2, 0,
       2, {V_TREE, V_RING}, 50, NULL},
  };
  int fails = 0, n = (int)(sizeof cases / sizeof cases[0]);
  for (int i = 0; i < n; i++) {
    tcase_t c = cases[i];
    if (!strcmp(c.name, "uneven 1000+P-1")) c.lens[0] = 1000 + g_size - 1;
    fails += run_case(&c);
  }
  ck_assert_msg(fails == 0, "%d failures over %d cases (details on stderr)", fails, n);
}
END_TEST

/* The device tree on the host seam (host-ipc and host-mpi: pages and partials in the host device table's
 * memory, the merge as a max allreduce then a sum allreduce through the transport's device
 * allreduce), against the float64 reference: GQA, MQA, uneven and empty shards, bf16, several
 * tokens per step, a root; and against the host tree on the same problem (variants must agree). */
START_TEST(device) {
  static const tcase_t cases[] = {
      {"device gqa zigzag batch", 3, 8, 2, 64, DA_FLOAT32, {77, 5, 203}, DA_ALGO_ZIGZAG, 0, 8, 3, 1, 0, 2,
       {V_TREE, V_ROOT(1)}, 0, "host-ipc"},
      {"device mqa striped empty seq, in place", 2, 4, 1, 64, DA_FLOAT32, {150, 0}, DA_ALGO_STRIPED, 0, 4, 3, 1, 1, 1,
       {V_TREE}, 0, "host-ipc"},
      {"device uneven 1000+P-1", 1, 4, 1, 64, DA_FLOAT32, {0}, DA_ALGO_RING, 0, 64, 2, 1, 0, 1, {V_TREE}, 0,
       "host-ipc"},
      {"device bf16 two tokens per step, window", 2, 4, 2, 32, DA_BFLOAT16, {64, 100}, DA_ALGO_RING, 0, 16, 2, 2, 0, 1,
       {V_TREE}, 40, "host-ipc"},
      {"device weighted", 2, 4, 2, 32, DA_FLOAT32, {120, 33}, DA_ALGO_RING, 1, 5, 2, 1, 1, 1, {V_TREE}, 0, "host-ipc"},
  };
  /* Each case on the cuda-ipc protocol and on the staged mpi one (comm/staged.c: the partials
   * copied to pinned host memory, reduced by MPI, copied back). */
  static const char *const transports[2] = {"host-ipc", "host-mpi"};
  int fails = 0, n = (int)(sizeof cases / sizeof cases[0]);
  for (int t = 0; t < 2; t++)
    for (int i = 0; i < n; i++) {
      tcase_t c = cases[i];
      char name[128];
      snprintf(name, sizeof name, "%s (%s)", c.name, transports[t]);
      if (!strcmp(c.name, "device uneven 1000+P-1")) c.lens[0] = 1000 + g_size - 1;
      c.name = name, c.transport = transports[t];
      fails += run_case(&c);
    }
  ck_assert_msg(fails == 0, "%d failures over %d cases (details on stderr)", fails, 2 * n);
}
END_TEST

/* Ranks that disagree, bad arguments, a bad tensor on one rank: errors everywhere, never a hang,
 * and the plan is usable afterwards. */
START_TEST(errors) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = 1, prob.heads = 4, prob.kv_heads = 2, prob.dim = 32;
  double t0 = MPI_Wtime();
  /* a cache whose page differs on the last rank */
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  kc.page = g_rank == g_size - 1 ? 8 : 16;
  kc.timeout = 30;
  da_kvcache_t *cache = NULL;
  da_status_t st = da_kvcache_create(g_comm, &prob, &kc, &cache);
  ck_assert_msg(tu_all_equal_status(st, g_size > 1 ? DA_ERR_MISMATCH : DA_SUCCESS), "page mismatch: %s",
                da_last_error(g_ctx));
  da_kvcache_free(cache);
  cache = NULL;
  /* a decode plan whose heads differ on rank 0 */
  da_problem_t p2 = prob;
  if (g_rank == 0 && g_size > 1) p2.heads = 8;
  da_decode_plan_t *plan = NULL;
  st = da_decode_plan_create(g_comm, &p2, NULL, &plan);
  ck_assert_msg(tu_all_equal_status(st, g_size > 1 ? DA_ERR_MISMATCH : DA_SUCCESS), "heads mismatch: %s",
                da_last_error(g_ctx));
  if (g_size > 1) ck_assert_msg(strstr(da_last_error(g_ctx), "heads") != NULL, "names heads: %s", da_last_error(g_ctx));
  da_decode_plan_free(plan);
  plan = NULL;
  /* invalid configs: everywhere */
  da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
  dc.root = g_size;
  st = da_decode_plan_create(g_comm, &prob, &dc, &plan);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  kc.page = -1;
  st = da_kvcache_create(g_comm, &prob, &kc, &cache);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  double bad_w[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  bad_w[g_size - 1] = 0;
  kc.page = 16, kc.weights = bad_w;
  st = da_kvcache_create(g_comm, &prob, &kc, &cache);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT), "zero weight: %s", da_last_error(g_ctx));
  kc.weights = NULL;
  /* a working cache and plan */
  ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &prob, &kc, &cache), DA_SUCCESS));
  dc.root = -1, dc.timeout = 30;
  ck_assert(tu_all_equal_status(da_decode_plan_create(g_comm, &prob, &dc, &plan), DA_SUCCESS));
  ck_assert(tu_all_equal_status(da_kvcache_prefill(cache, 0, 40, NULL, NULL), DA_SUCCESS));
  /* prefilling twice is refused on every rank */
  st = da_kvcache_prefill(cache, 0, 40, NULL, NULL);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT), "second prefill: %s", da_last_error(g_ctx));
  /* different prefill lengths: mismatch */
  da_problem_t p3 = prob;
  p3.batch = 2;
  da_kvcache_t *c2 = NULL;
  ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &p3, &kc, &c2), DA_SUCCESS));
  st = da_kvcache_prefill(c2, 1, 10 + (g_rank == 0), NULL, NULL);
  ck_assert_msg(tu_all_equal_status(st, g_size > 1 ? DA_ERR_MISMATCH : DA_SUCCESS), "length mismatch: %s",
                da_last_error(g_ctx));
  da_kvcache_free(c2);
  for (int64_t i = 0; i < da_kvcache_num_pages(cache, 0); i++) {
    da_kvcache_page_t pg;
    ck_assert(da_kvcache_get_page(cache, 0, i, &pg) == DA_SUCCESS);
    for (int64_t j = 0; j < pg.count; j++)
      for (int e = 0; e < 2 * 32; e++) ((float *)pg.k)[j * pg.ldk + e] = ((float *)pg.v)[j * pg.ldv + e] = 0.5f;
  }
  float q[4 * 32], out[4 * 32], lse[4];
  for (int i = 0; i < 4 * 32; i++) q[i] = 0.25f;
  da_tensor_t tq, to, tl, tbad;
  da_tensor_make(&tq, q, DA_FLOAT32, 3, (int64_t[]){1, 4, 32});
  da_tensor_make(&to, out, DA_FLOAT32, 3, (int64_t[]){1, 4, 32});
  da_tensor_make(&tl, lse, DA_FLOAT32, 2, (int64_t[]){1, 4});
  da_tensor_make(&tbad, q, DA_FLOAT32, 3, (int64_t[]){1, 4, 16}); /* wrong D */
  /* a bad q on the last rank only: invalid there, remote elsewhere, nobody hangs */
  st = da_decode_step(plan, cache, g_rank == g_size - 1 ? &tbad : &tq, &to, &tl, NULL);
  da_status_t want = g_rank == g_size - 1 ? DA_ERR_INVALID_ARGUMENT : DA_ERR_REMOTE;
  ck_assert_msg(tu_all_equal_status(st, want), "bad q on one rank (got %s: %s)", da_status_string(st), da_last_error(g_ctx));
  if (g_rank != g_size - 1) {
    char r[32];
    snprintf(r, sizeof r, "rank %d", g_size - 1);
    ck_assert_msg(strstr(da_last_error(g_ctx), r) != NULL, "names the failing rank: %s", da_last_error(g_ctx));
  }
  /* usable afterwards: constant keys give out = v = 0.5 and lse = log(40) + scale * 0.25 * 0.5 * 32 */
  st = da_decode_step(plan, cache, &tq, &to, &tl, NULL);
  ck_assert_msg(tu_all_equal_status(st, DA_SUCCESS), "plan usable after a rejected step: %s", da_last_error(g_ctx));
  double e = 0, want_lse = log(40.0) + (1.0 / sqrt(32.0)) * 0.25 * 0.5 * 32;
  for (int i = 0; i < 4 * 32; i++) e = fmax(e, fabs(out[i] - 0.5));
  for (int h = 0; h < 4; h++) e = fmax(e, fabs(lse[h] - want_lse) / want_lse);
  ck_assert_msg(tu_reduce(e, MPI_MAX) < 1e-5, "constant cache: error %g", e);
  /* a query longer than the sequence */
  float q2[2 * 4 * 32];
  da_tensor_t tq2, to2;
  da_tensor_make(&tq2, q2, DA_FLOAT32, 4, (int64_t[]){1, 41, 4, 32});
  da_tensor_make(&to2, q2, DA_FLOAT32, 4, (int64_t[]){1, 41, 4, 32});
  st = da_decode_step(plan, cache, &tq2, &to2, NULL, NULL);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  da_decode_plan_free(plan);
  da_kvcache_free(cache);
  ck_assert_msg(MPI_Wtime() - t0 < 60, "error paths took %.1f s", MPI_Wtime() - t0);
}
END_TEST

/* Ranks that append different token counts to one cache (issue 19, class 4). Every rank replays the
 * shard map from the counts it is given, so a rank given others would silently hold another map.
 * The append sends nothing on the decode path: it starts a nonblocking check that the next decode
 * step or append completes, so the mismatch is DA_ERR_MISMATCH there, on every rank, naming the
 * ranks and their counts; the cache is refused from then on. At P = 1 there is nobody to disagree. */
static da_status_t counts_step(da_decode_plan_t *plan, da_kvcache_t *c) {
  float q[2 * 4 * 32], out[2 * 4 * 32];
  for (int i = 0; i < 2 * 4 * 32; i++) q[i] = 0.25f;
  da_tensor_t tq, to;
  da_tensor_make(&tq, q, DA_FLOAT32, 3, (int64_t[]){2, 4, 32});
  da_tensor_make(&to, out, DA_FLOAT32, 3, (int64_t[]){2, 4, 32});
  return da_decode_step(plan, c, &tq, &to, NULL, NULL);
}

static void counts_expect(da_status_t st, const char *what, const char *const *needles) {
  const int multi = g_size > 1;
  ck_assert_msg(tu_all_equal_status(st, multi ? DA_ERR_MISMATCH : DA_SUCCESS), "%s: got %s: %s", what,
                da_status_string(st), da_last_error(g_ctx));
  for (int i = 0; multi && needles && needles[i]; i++)
    ck_assert_msg(strstr(da_last_error(g_ctx), needles[i]) != NULL, "%s: the message names '%s': %s", what,
                  needles[i], da_last_error(g_ctx));
}

START_TEST(append_counts) {
  const double t0 = MPI_Wtime();
  const int last = g_size - 1;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = 2, prob.heads = 4, prob.kv_heads = 2, prob.dim = 32;
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  kc.page = 4, kc.timeout = 30;
  const int64_t same[2] = {1, 2};
  char lastrank[96], others[96];
  snprintf(lastrank, sizeof lastrank, "rank %d: append 2 of 4 token(s) {1, 3}, 7 appended", last);
  if (last == 1) snprintf(others, sizeof others, "rank 0: append 2 of 3 token(s) {1, 2}, 6 appended");
  else snprintf(others, sizeof others, "ranks 0-%d: append 2 of 3 token(s) {1, 2}, 6 appended", last - 1);
  /* 1. the last rank appends one more token to sequence 1: the decode step after it fails (tree and
   *    ring), then every later call on the cache */
  for (int algo = 0; algo < 2; algo++) {
    da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
    dc.algo = algo ? DA_DECODE_RING : DA_DECODE_TREE, dc.timeout = 30;
    da_kvcache_t *c = NULL;
    da_decode_plan_t *plan = NULL;
    ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &prob, &kc, &c), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_decode_plan_create(g_comm, &prob, &dc, &plan), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_kvcache_prefill(c, 0, 10, NULL, NULL), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_kvcache_prefill(c, 1, 12, NULL, NULL), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_kvcache_append(c, same, NULL, NULL), DA_SUCCESS));
    ck_assert_msg(tu_all_equal_status(counts_step(plan, c), DA_SUCCESS), "agreed append: %s", da_last_error(g_ctx));
    const int64_t odd[2] = {1, 2 + (g_rank == last)};
    ck_assert(tu_all_equal_status(da_kvcache_append(c, odd, NULL, NULL), DA_SUCCESS)); /* deferred: no message */
    const char *const needles[] = {"da_decode_step", "ranks disagree", lastrank, others, NULL};
    counts_expect(counts_step(plan, c), algo ? "ring step after odd counts" : "tree step after odd counts", needles);
    const char *const sticky[] = {"disagreed on the token counts of append 2", NULL};
    counts_expect(da_kvcache_append(c, same, NULL, NULL), "append after the mismatch", sticky);
    counts_expect(counts_step(plan, c), "step after the mismatch", sticky);
    da_decode_plan_free(plan);
    da_kvcache_free(c);
  }
  /* 2. the same total split differently over the sequences, found by the next append (no step) */
  {
    da_kvcache_t *c = NULL;
    ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &prob, &kc, &c), DA_SUCCESS));
    const int64_t split[2] = {1 + (g_rank == 0), 2 - (g_rank == 0)};
    ck_assert(tu_all_equal_status(da_kvcache_append(c, same, NULL, NULL), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_kvcache_append(c, split, NULL, NULL), DA_SUCCESS));
    const char *const needles[] = {"da_kvcache_append", "rank 0: append 2 of 3 token(s) {2, 1}", "{1, 2}", NULL};
    counts_expect(da_kvcache_append(c, same, NULL, NULL), "append after a different split", needles);
    /* nothing was appended by the refused call: 3 + 3 tokens on the agreeing ranks */
    if (g_size > 1 && g_rank != 0) ck_assert(da_kvcache_length(c, 0) == 2 && da_kvcache_length(c, 1) == 4);
    da_kvcache_free(c);
  }
  /* 3. an append refused on rank 0 only (a negative count): refused there at once, accepted
   *    elsewhere; the next call tells every rank */
  {
    da_kvcache_t *c = NULL;
    ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &prob, &kc, &c), DA_SUCCESS));
    const int64_t bad[2] = {g_rank == 0 ? -1 : 1, 2};
    da_status_t st = da_kvcache_append(c, bad, NULL, NULL);
    ck_assert(tu_all_equal_status(st, g_rank == 0 ? DA_ERR_INVALID_ARGUMENT : DA_SUCCESS));
    const char *const needles[] = {"rank 0: append 1 refused or failed there", NULL};
    st = da_kvcache_append(c, same, NULL, NULL);
    if (g_size > 1) counts_expect(st, "append after a refusal on rank 0", needles);
    else ck_assert_msg(st == DA_SUCCESS, "P = 1: the cache is usable after a refused append: %s", da_last_error(g_ctx));
    da_kvcache_free(c);
  }
  /* 4. the last rank stops calling the cache: the others' next call gives up after the cache's
   *    timeout (the check of their last append never completes), naming the append */
  if (g_size > 1) {
    da_kvcache_config_t kt = kc;
    kt.timeout = 1.5;
    da_kvcache_t *c = NULL;
    ck_assert(tu_all_equal_status(da_kvcache_create(g_comm, &prob, &kt, &c), DA_SUCCESS));
    ck_assert(tu_all_equal_status(da_kvcache_append(c, same, NULL, NULL), DA_SUCCESS));
    if (g_rank != last) {
      ck_assert(da_kvcache_append(c, same, NULL, NULL) == DA_SUCCESS);
      const double t1 = MPI_Wtime();
      da_status_t st = da_kvcache_append(c, same, NULL, NULL);
      const double waited = MPI_Wtime() - t1;
      ck_assert_msg(st == DA_ERR_TIMEOUT && strstr(da_last_error(g_ctx), "check of append 2 did not complete within 1.5 s"),
                    "a silent rank: got %s: %s", da_status_string(st), da_last_error(g_ctx));
      ck_assert_msg(waited >= 1.4 && waited < 1.5 + 3, "gave up after %.1f s (timeout 1.5 s)", waited);
      st = da_kvcache_append(c, same, NULL, NULL); /* refused from then on, at once */
      ck_assert_msg(st == DA_ERR_TIMEOUT && strstr(da_last_error(g_ctx), "free it"), "after the timeout: %s",
                    da_last_error(g_ctx));
    }
    MPI_Barrier(MPI_COMM_WORLD);
    da_kvcache_free(c);
  }
  ck_assert_msg(MPI_Wtime() - t0 < 20, "append checks took %.1f s", MPI_Wtime() - t0);
}
END_TEST

int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, &g_comm);
  const tu_test_t tests[] = {{"errors", errors}, {"append_counts", append_counts}, {"matrix", matrix}, {"device", device}};
  Suite *s = tu_mpi_suite("tree", "decode", tests, sizeof tests / sizeof tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, g_comm);
}
