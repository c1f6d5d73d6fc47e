/* test_offload_api.c: the offload API (da_offload_* of include/distattn.h) through the public
 * header and the shared library only, under mpirun. Each case splits the first nc + nm ranks into
 * compute and memory ranks; every compute rank's outputs are compared, at every step and layer,
 * with a local tree decode (da_kvcache + da_decode_step on MPI_COMM_SELF holding the same rows)
 * and, at the last step, with float64 attention written here. Also: the whole-batch
 * da_offload_step and the per-micro-batch start / wait, cancel (memory ranks get DA_ERR_REMOTE
 * with the reason), a bad tensor (an error, the offload still usable), and the deadline: a memory
 * rank that does not serve gives DA_ERR_TIMEOUT naming it, a compute rank that stops sending gives
 * DA_ERR_TIMEOUT on its memory rank. Not here: the protocol's internals (tests/test_offload.c). */
#include <mpi.h>
#include <distattn.h>
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "test_mpi.h"

static int g_rank, g_size;
static da_context_t *g_ctx;

#define MAXB 4

typedef struct {
  const char *name;
  int nc, nm;
  unsigned cmask; /* bit r: rank r of the case is a compute rank */
  int B, H, G, D, L, M;
  int64_t lens[MAXB];
  int64_t page;
  int steps;
  int use_step;   /* da_offload_step (else start / wait per micro-batch) */
  int cancel;     /* end with da_offload_cancel instead of da_offload_stop */
} acase_t;

/* A value any rank can regenerate: splitmix64 of (seed, tensor, position, head, d) in [-1, 1). */
static float val(uint64_t seed, int t, int64_t pos, int h, int d) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ ((uint64_t)t << 56) ^ ((uint64_t)pos << 20) ^ ((uint64_t)h << 10) ^ (uint64_t)d;
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return (float)((double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
enum { TQ = 0, TK = 1, TV = 2 };
static uint64_t seq_seed(int group, int layer, int b) { return 1000u + (uint64_t)(group * 64 + layer * 8 + b); }

/* Fill every page of sequence s of cache (this rank's pages only) from the generator. */
static void fill(da_kvcache_t *cache, int64_t s, uint64_t seed, int G, int D) {
  for (int64_t i = 0; i < da_kvcache_num_pages(cache, s); i++) {
    da_kvcache_page_t pg;
    if (da_kvcache_get_page(cache, s, i, &pg) != DA_SUCCESS) continue;
    for (int64_t j = 0; j < pg.count; j++)
      for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) {
          ((float *)pg.k)[j * pg.ldk + g * D + d] = val(seed, TK, pg.start + j * pg.stride, g, d);
          ((float *)pg.v)[j * pg.ldv + g * D + d] = val(seed, TV, pg.start + j * pg.stride, g, d);
        }
  }
}

/* float64 attention of the query at position len - 1 over keys 0 .. len - 1, head h. */
static void ref_row(uint64_t seed, int64_t len, int h, int H, int G, int D, double *o, double *lse) {
  const int g = h / (H / G);
  const double scale = 1.0 / sqrt((double)D);
  double m = -INFINITY, l = 0;
  for (int d = 0; d < D; d++) o[d] = 0;
  for (int64_t p = 0; p < len; p++) {
    double sc = 0;
    for (int d = 0; d < D; d++) sc += (double)val(seed, TQ, len - 1, h, d) * val(seed, TK, p, g, d);
    sc *= scale;
    const double mn = sc > m ? sc : m, a = exp(m - mn), e = exp(sc - mn);
    l = l * a + e;
    for (int d = 0; d < D; d++) o[d] = o[d] * a + e * val(seed, TV, p, g, d);
    m = mn;
  }
  for (int d = 0; d < D; d++) o[d] /= l;
  *lse = m + log(l);
}

static double rel(double a, double b) { return fabs(a - b) / (fabs(b) > 1.0 ? fabs(b) : 1.0); }

/* One case on the first nc + nm ranks: the number of failures (the same everywhere), why. */
static int run_case(const acase_t *c, char *why, size_t wn) {
  const int n = c->nc + c->nm, in = g_rank < n;
  const int B = c->B, H = c->H, G = c->G, D = c->D, L = c->L;
  MPI_Comm sub;
  MPI_Comm_split(MPI_COMM_WORLD, in ? 0 : MPI_UNDEFINED, g_rank, &sub);
  da_comm_t *comm = NULL;
  da_offload_t *off = NULL;
  da_status_t st = DA_SUCCESS;
  double err = 0;
  int fails = 0;
  const da_role_t role = (c->cmask >> g_rank) & 1u ? DA_ROLE_COMPUTE : DA_ROLE_MEMORY;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = DA_FLOAT32;
  da_offload_config_t cfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  cfg.page = c->page, cfg.layers = L, cfg.microbatches = c->M, cfg.timeout = 60;
  cfg.mem_budget = (double)(1 + g_rank % 2) * 32.0 * 1048576.0; /* weighted shards */
  if (in) st = da_comm_create(g_ctx, sub, &comm);
  if (in && st == DA_SUCCESS) st = da_offload_create(comm, role, &prob, &cfg, &off);
  da_offload_info_t info;
  memset(&info, 0, sizeof info);
  if (off) da_offload_get_info(off, &info);
  int64_t fin[MAXB];
  for (int b = 0; b < B; b++) fin[b] = c->lens[b] + c->steps;
  if (in && st == DA_SUCCESS) st = da_offload_check_fit(off, fin, NULL);
  if (tu_any_rank(st != DA_SUCCESS)) {
    snprintf(why, wn, "%s: rank %d: setup: %s", c->name, g_rank, st ? da_last_error(g_ctx) : "another rank failed");
    fails++;
    goto done;
  }
  if (in && role == DA_ROLE_MEMORY) {
    da_kvcache_t *cache = da_offload_cache(off);
    for (int l = 0; l < L && st == DA_SUCCESS; l++)
      for (int b = 0; b < B && st == DA_SUCCESS; b++) {
        st = da_kvcache_prefill(cache, (int64_t)l * B + b, c->lens[b], NULL, NULL);
        fill(cache, (int64_t)l * B + b, seq_seed(info.group, l, b), G, D);
      }
    if (st == DA_SUCCESS) {
      st = da_offload_serve(off);
      if (c->cancel) { /* expected: DA_ERR_REMOTE with the compute rank's reason */
        if (st != DA_ERR_REMOTE || !strstr(da_last_error(g_ctx), "cancelled") ||
            !strstr(da_last_error(g_ctx), "test reason"))
          snprintf(why, wn, "%s: memory rank %d: cancel gave %s: %s", c->name, g_rank, da_status_string(st),
                   da_last_error(g_ctx));
        else st = DA_SUCCESS;
      }
    }
    if (st != DA_SUCCESS && !why[0]) snprintf(why, wn, "%s: memory rank %d: %s", c->name, g_rank, da_last_error(g_ctx));
  } else if (in) {
    /* the local reference: one cache per layer on this rank alone, decoded by a tree plan */
    da_comm_t *self = NULL;
    da_decode_plan_t *plan = NULL;
    da_kvcache_t *loc[4] = {NULL};
    da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
    da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
    kc.page = c->page;
    st = da_comm_create(g_ctx, MPI_COMM_SELF, &self);
    if (st == DA_SUCCESS) st = da_decode_plan_create(self, &prob, &dc, &plan);
    for (int l = 0; l < L && st == DA_SUCCESS; l++) {
      st = da_kvcache_create(self, &prob, &kc, &loc[l]);
      for (int b = 0; b < B && st == DA_SUCCESS; b++) {
        st = da_kvcache_prefill(loc[l], b, c->lens[b], NULL, NULL);
        fill(loc[l], b, seq_seed(info.group, l, b), G, D);
      }
    }
    const size_t qn = (size_t)(B * H * D), kn = (size_t)(B * G * D);
    float *q = malloc(qn * 4), *k = malloc(kn * 4), *v = malloc(kn * 4), *o = malloc(qn * 4), *ol = malloc(qn * 4);
    float *lse = malloc((size_t)(B * H) * 4), *lsel = malloc((size_t)(B * H) * 4);
    double *ro = malloc((size_t)D * 8);
    const int64_t shq[3] = {B, H, D}, shk[3] = {B, G, D}, shl[2] = {B, H};
    da_tensor_t tq, tk, tv, to, tol, tl, tll;
    da_tensor_make(&tq, q, DA_FLOAT32, 3, shq), da_tensor_make(&tk, k, DA_FLOAT32, 3, shk);
    da_tensor_make(&tv, v, DA_FLOAT32, 3, shk), da_tensor_make(&to, o, DA_FLOAT32, 3, shq);
    da_tensor_make(&tol, ol, DA_FLOAT32, 3, shq), da_tensor_make(&tl, lse, DA_FLOAT32, 2, shl);
    da_tensor_make(&tll, lsel, DA_FLOAT32, 2, shl);
    const int64_t nmax = (B + c->M - 1) / c->M;
    /* a bad tensor is refused and leaves the offload usable: k with the wrong head count */
    {
      da_tensor_t bad = tk;
      bad.shape[1] = G + 1;
      int slot = -1;
      da_status_t bs = c->use_step ? da_offload_step(off, 0, &tq, &bad, &tv, &to, &tl)
                                   : da_offload_start(off, 0, 0, &tq, &bad, &tv, &slot);
      if (bs != DA_ERR_INVALID_ARGUMENT) {
        snprintf(why, wn, "%s: compute rank %d: a bad k gave %s", c->name, g_rank, da_status_string(bs));
        st = DA_ERR_INTERNAL;
      }
    }
    for (int s = 0; s < c->steps && st == DA_SUCCESS; s++)
      for (int l = 0; l < L && st == DA_SUCCESS; l++) {
        int64_t ntok[MAXB];
        for (int b = 0; b < B; b++) {
          const uint64_t sd = seq_seed(info.group, l, b);
          const int64_t pos = c->lens[b] + s;
          for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) q[(b * H + h) * D + d] = val(sd, TQ, pos, h, d);
          for (int g = 0; g < G; g++)
            for (int d = 0; d < D; d++)
              k[(b * G + g) * D + d] = val(sd, TK, pos, g, d), v[(b * G + g) * D + d] = val(sd, TV, pos, g, d);
          ntok[b] = 1;
        }
        if (c->use_step) {
          st = da_offload_step(off, l, &tq, &tk, &tv, &to, &tl);
        } else { /* every micro-batch in flight, then waited in reverse order */
          int slots[MAXB];
          int64_t nmb = 0;
          for (int64_t f = 0; f < B && st == DA_SUCCESS; f += nmax, nmb++) {
            const int64_t cnt = f + nmax <= B ? nmax : B - f, s3q[3] = {cnt, H, D}, s3k[3] = {cnt, G, D};
            da_tensor_t mq, mk, mv;
            da_tensor_make(&mq, q + f * H * D, DA_FLOAT32, 3, s3q);
            da_tensor_make(&mk, k + f * G * D, DA_FLOAT32, 3, s3k), da_tensor_make(&mv, v + f * G * D, DA_FLOAT32, 3, s3k);
            st = da_offload_start(off, l, f, &mq, &mk, &mv, &slots[nmb]);
          }
          for (int64_t m = nmb - 1; m >= 0 && st == DA_SUCCESS; m--) {
            const int64_t f = m * nmax, cnt = f + nmax <= B ? nmax : B - f, s3[3] = {cnt, H, D}, s2[2] = {cnt, H};
            da_tensor_t mo, ml;
            da_tensor_make(&mo, o + f * H * D, DA_FLOAT32, 3, s3), da_tensor_make(&ml, lse + f * H, DA_FLOAT32, 2, s2);
            st = da_offload_wait(off, slots[m], &mo, &ml);
          }
        }
        if (st != DA_SUCCESS) {
          snprintf(why, wn, "%s: compute rank %d step %d layer %d: %s", c->name, g_rank, s, l, da_last_error(g_ctx));
          break;
        }
        st = da_kvcache_append(loc[l], ntok, &tk, &tv);
        if (st == DA_SUCCESS) st = da_decode_step(plan, loc[l], &tq, &tol, &tll, NULL);
        if (st != DA_SUCCESS) {
          snprintf(why, wn, "%s: local reference: %s", c->name, da_last_error(g_ctx));
          break;
        }
        for (size_t i = 0; i < qn; i++) err = fmax(err, rel(o[i], ol[i]));
        for (int i = 0; i < B * H; i++) err = fmax(err, rel(lse[i], lsel[i]));
        if (s == c->steps - 1) /* float64 at the last step */
          for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
              double rl;
              ref_row(seq_seed(info.group, l, b), c->lens[b] + s + 1, h, H, G, D, ro, &rl);
              for (int d = 0; d < D; d++) err = fmax(err, rel(o[(b * H + h) * D + d], ro[d]));
              err = fmax(err, rel(lse[b * H + h], rl));
            }
      }
    if (st == DA_SUCCESS) {
      st = c->cancel ? da_offload_cancel(off, "test reason") : da_offload_stop(off);
      if (st != DA_SUCCESS) snprintf(why, wn, "%s: stop / cancel: %s", c->name, da_last_error(g_ctx));
    }
    free(q), free(k), free(v), free(o), free(ol), free(lse), free(lsel), free(ro);
    for (int l = 0; l < L; l++) da_kvcache_free(loc[l]);
    da_decode_plan_free(plan);
    da_comm_free(self);
  }
  if (tu_any_rank(st != DA_SUCCESS)) fails++;
  double e = err;
  MPI_Allreduce(&e, &err, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (!fails && !(err <= 1e-5)) {
    snprintf(why, wn, "%s: max relative error %.3g > 1e-5", c->name, err);
    fails++;
  }
  if (g_rank == 0) printf("offload api %-26s ranks %d: max error %.3g %s\n", c->name, n, err, fails ? "FAIL" : "ok");
done:
  da_offload_free(off);
  da_comm_free(comm);
  if (sub != MPI_COMM_NULL) MPI_Comm_free(&sub);
  return fails;
}

/* The lowest rank's message reaches rank 0's assertion. */
static void share_why(char *why, size_t wn) {
  struct { int has, r; } in = {why[0] != 0, why[0] ? -g_rank : -g_size}, best;
  MPI_Allreduce(&in, &best, 1, MPI_2INT, MPI_MAXLOC, MPI_COMM_WORLD);
  int src = best.has ? -best.r : 0;
  MPI_Bcast(why, (int)wn, MPI_CHAR, src < g_size ? src : 0, MPI_COMM_WORLD);
}

START_TEST(splits) {
  /* name, nc, nm, cmask, B, H, G, D, L, M, lens, page, steps, use_step, cancel */
  static const acase_t cases[] = {
      {"1c+1m step", 1, 1, 0x1, 2, 4, 2, 32, 2, 2, {300, 77}, 64, 3, 1, 0},
      {"1c+2m start/wait, cancel", 1, 2, 0x4, 3, 4, 1, 64, 2, 3, {500, 1, 130}, 32, 3, 0, 1},
      {"1c+3m MQA step", 1, 3, 0x1, 2, 8, 1, 32, 1, 1, {700, 260}, 64, 2, 1, 0},
      {"2c+3m interleaved", 2, 3, 0x12, 4, 4, 2, 32, 2, 2, {400, 100, 65, 3}, 64, 2, 0, 0},
  };
  int fails = 0;
  char why[512] = "";
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (cases[i].nc + cases[i].nm > g_size) continue;
    char w[512] = "";
    int f = run_case(&cases[i], w, sizeof w);
    fflush(stdout);
    if (f && !fails) {
      memcpy(why, w, sizeof why);
      share_why(why, sizeof why);
    }
    fails += f;
  }
  ck_assert_msg(fails == 0, "%s", why);
}
END_TEST

/* The deadline, on ranks 0 (compute) and 1 (memory) with a 1 s timeout: the memory rank serves
 * only after 3 s, so the compute rank's step times out naming it; then the compute rank sends no
 * more requests, so the memory rank's serve times out naming the compute rank. */
START_TEST(deadline) {
  if (g_size < 2) return;
  const int in = g_rank < 2;
  MPI_Comm sub;
  MPI_Comm_split(MPI_COMM_WORLD, in ? 0 : MPI_UNDEFINED, g_rank, &sub);
  int bad = 0;
  char why[512] = "";
  if (in) {
    da_comm_t *comm = NULL;
    da_offload_t *off = NULL;
    da_problem_t prob = DA_PROBLEM_INITIALIZER;
    prob.batch = 1, prob.heads = 2, prob.dim = 16;
    da_offload_config_t cfg = DA_OFFLOAD_CONFIG_INITIALIZER;
    cfg.timeout = 1, cfg.mem_budget = 1e8, cfg.page = 16;
    da_status_t st = da_comm_create(g_ctx, sub, &comm);
    if (st == DA_SUCCESS) st = da_offload_create(comm, g_rank ? DA_ROLE_MEMORY : DA_ROLE_COMPUTE, &prob, &cfg, &off);
    const int64_t len = 40;
    if (st == DA_SUCCESS && g_rank == 1) {
      st = da_kvcache_prefill(da_offload_cache(off), 0, len, NULL, NULL);
      fill(da_offload_cache(off), 0, 1, 2, 16);
    }
    if (st != DA_SUCCESS) {
      bad = 1;
      snprintf(why, sizeof why, "rank %d: setup: %s", g_rank, da_last_error(g_ctx));
    } else if (g_rank == 0) {
      float q[32], k[32], v[32], o[32], lse[2];
      for (int i = 0; i < 32; i++) q[i] = k[i] = v[i] = 0.01f * (float)i;
      const int64_t sh[3] = {1, 2, 16}, sl[2] = {1, 2};
      da_tensor_t tq, tk, tv, to, tl;
      da_tensor_make(&tq, q, DA_FLOAT32, 3, sh), da_tensor_make(&tk, k, DA_FLOAT32, 3, sh);
      da_tensor_make(&tv, v, DA_FLOAT32, 3, sh), da_tensor_make(&to, o, DA_FLOAT32, 3, sh);
      da_tensor_make(&tl, lse, DA_FLOAT32, 2, sl);
      const double t0 = MPI_Wtime();
      st = da_offload_step(off, 0, &tq, &tk, &tv, &to, &tl);
      const double el = MPI_Wtime() - t0;
      const char *m = da_last_error(g_ctx);
      if (st != DA_ERR_TIMEOUT || !strstr(m, "rank 1 (memory)") || !strstr(m, "request 1 (layer 0") ||
          !strstr(m, "waited") || !(el < 2.5)) {
        bad = 1;
        snprintf(why, sizeof why, "compute rank: %s after %.2f s: %s", da_status_string(st), el, m);
      }
      if (da_offload_stop(off) != DA_ERR_INVALID_ARGUMENT) { /* broken: refused, not a hang */
        bad = 1;
        snprintf(why, sizeof why, "compute rank: stop after a timeout was not refused");
      }
    } else {
      struct timespec ts = {3, 0};
      nanosleep(&ts, NULL); /* "stopped" for 3 s */
      const double t0 = MPI_Wtime();
      st = da_offload_serve(off);
      const double el = MPI_Wtime() - t0;
      const char *m = da_last_error(g_ctx);
      if (st != DA_ERR_TIMEOUT || !strstr(m, "the next request from compute rank 0") || !strstr(m, "after request 1") ||
          !(el < 3.5)) {
        bad = 1;
        snprintf(why, sizeof why, "memory rank: %s after %.2f s: %s", da_status_string(st), el, m);
      }
    }
    da_offload_free(off);
    da_comm_free(comm);
    MPI_Comm_free(&sub);
  }
  if (tu_any_rank(bad)) share_why(why, sizeof why);
  ck_assert_msg(!tu_any_rank(bad), "%s", why);
  if (g_rank == 0) printf("offload api deadline: DA_ERR_TIMEOUT on both sides, naming the peer: ok\n");
}
END_TEST

int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, NULL);
  /* deadline last: it leaves an unmatched broadcast behind on rank 1 */
  const tu_test_t tests[] = {{"splits", splits}, {"deadline", deadline}};
  Suite *s = tu_mpi_suite("offload_api", "offload_api", tests, sizeof tests / sizeof tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, NULL);
}
