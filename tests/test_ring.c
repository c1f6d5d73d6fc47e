/* test_ring.c: the distributed ring driver (ring, striped, zigzag; forward and backward) against
 * the float64 reference, run under mpirun for P in {1,2,3,4,5,8}. Every rank generates its own
 * rows from the counter RNG and checks its own outputs; the reference for a rank's rows is
 * computed on that rank (dK/dV partials summed with MPI). fp32 results must also equal the
 * same library's 1-rank result to 1e-5. Also: disagreeing ranks, bad arguments, timeouts, the
 * plan's figures, and the test-only slow-link hook.
 * Check in CK_NOFORK mode: every assertion below is on values reduced across ranks, so all ranks
 * pass or fail it together and none is left waiting in a collective. */
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
#include "devapi.h" /* the host seam: device-mode cases */
#include "transport.h" /* da_transport_resolve: mpi in a CUDA context */
#include "test_mpi.h"
#include "test_util.h"

static int g_rank, g_size;
static da_context_t *g_ctx;
/* Device mode's transport (`test_ring device [host-ipc|host-mpi]`): the cuda-ipc protocol or the
 * staged mpi one, both on the host seam. */
static const char *g_dev_transport = "host-ipc";
static da_comm_t *g_comm;

typedef struct {
  da_algo_t algo;
  unsigned mask;
  int64_t window;
  int ndocs;
  int64_t S;
  int B, H, G, D;
  da_dtype_t dt;
  int bwd;
  int64_t block;
  int strided_q; /* q passed with a padded head stride (exercises the packing path) */
  const char *transport; /* NULL: the default (mpi) */
  int ulysses;           /* DA_ALGO_HYBRID: the Ulysses degree (the 1-rank comparison runs degree 1) */
  da_algo_t ring_layout; /* DA_ALGO_HYBRID: the ring's layout across groups */
  int device;            /* device mode: tensors in the host seam's memory, transport g_dev_transport */
  int caller_stream;     /* device mode: pass a stream of the caller's (else the plan's own) */
} tcase_t;

/* Tensors of a case: malloc'ed, or (device mode) allocations of the host seam, which the driver
 * then treats as device memory: its copies and clears go through streams whose delays poison
 * their destinations until they land (set in main). */
static void *talloc(const tcase_t *c, size_t bytes) {
  void *p = NULL;
  if (!c->device) return malloc(bytes);
  return da_dev_alloc(&da_devapi_host, &p, bytes) == DA_SUCCESS ? p : NULL;
}
static void tfree(const tcase_t *c, void *p) {
  if (c->device) da_dev_free(&da_devapi_host, p);
  else free(p);
}

/* P-rank vs 1-rank results (fp32): relative per row, like the reference comparison. */
#define ONE_RANK_TOL 1e-5

static const char *algo_name(da_algo_t a) {
  return a == DA_ALGO_RING ? "ring" : a == DA_ALGO_STRIPED ? "striped" : a == DA_ALGO_ZIGZAG ? "zigzag"
         : a == DA_ALGO_ULYSSES ? "ulysses" : "hybrid";
}

static void describe(const tcase_t *c, char *buf, size_t n) {
  char hy[64] = "";
  if (c->algo == DA_ALGO_HYBRID)
    snprintf(hy, sizeof hy, " %dx%d(%s)", c->ulysses, c->ulysses > 0 ? g_size / c->ulysses : 0, algo_name(c->ring_layout));
  snprintf(buf, n, "%s%s%s%s S=%lld B=%d H=%d G=%d D=%d mask=%s%s%s%s dtype=%s block=%lld%s%s",
           c->device ? g_dev_transport : "", c->device ? " " : "",
           algo_name(c->algo), hy,
           (long long)c->S, c->B, c->H, c->G, c->D, c->mask & DA_MASK_CAUSAL ? "causal" : "",
           c->mask & DA_MASK_WINDOW ? "window" : "", (c->mask & DA_MASK_DOC) && (c->mask & ~DA_MASK_DOC) ? "+" : "",
           c->mask & DA_MASK_DOC ? "doc" : (c->mask ? "" : "none"),
           da_dtype_name(c->dt), (long long)c->block, c->bwd ? " +bwd" : "", c->strided_q ? " strided-q" : "");
}

/* Documents of uneven lengths covering [0, S): a long one, a very short one, the rest split. */
static int make_docs(int64_t S, int want, int64_t *cu) {
  int n = 0;
  cu[0] = 0;
  int64_t cuts[3] = {S / 3, S / 3 + (S > 40 ? 5 : 1), (3 * S) / 4};
  for (int i = 0; i < 3 && n < want - 1; i++)
    if (cuts[i] > cu[n] && cuts[i] < S) cu[++n] = cuts[i];
  cu[++n] = S;
  return n;
}

static uint64_t bseed(uint64_t seed, int b) { return seed + 7919u * (uint64_t)b; }

/* Rows at global positions pos[0..n) of tensor `tensor`: stored in dt into buf ([B][n][heads][hs]
 * with head stride hs >= D) and, rounded identically, as double into ref ([B][n][heads][D]). */
static void gen(uint64_t seed, uint32_t tensor, const int64_t *pos, int64_t n, int B, int heads, int D, int hs,
                da_dtype_t dt, void *buf, double *ref) {
  float row[512];
  for (int b = 0; b < B; b++)
    for (int64_t i = 0; i < n; i++)
      for (int h = 0; h < heads; h++) {
        da_rng_row(bseed(seed, b), tensor, pos[i], h, D, row);
        for (int d = 0; d < D; d++) {
          float x = da_round_to((int)dt, row[d]);
          if (buf) da_store_f32(buf, (int)dt, ((b * n + i) * heads + h) * (int64_t)hs + d, x);
          if (ref) ref[((b * n + i) * heads + h) * (int64_t)D + d] = x;
        }
      }
}

/* Split increasing positions into maximal arithmetic runs (the reference takes spans). */
static int to_spans(const int64_t *pos, int64_t n, da_span_t *sp, int64_t *first, int max) {
  int ns = 0;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1, stride = 1;
    if (j < n) {
      stride = pos[j] - pos[i];
      while (j < n && pos[j] - pos[j - 1] == stride) j++;
    }
    if (ns == max) return -1;
    sp[ns] = da_span(pos[i], stride > 0 ? stride : 1, j - i);
    first[ns++] = i;
    i = j;
  }
  return ns;
}

/* 10% of the largest |x| over n values, the largest taken over every rank. */
static double tensor_floor(const double *x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
  MPI_Allreduce(MPI_IN_PLACE, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return 0.1 * m;
}

/* The same problem run by the same library on ONE rank (rank 0, a plan on MPI_COMM_SELF), its
 * fp32 results broadcast to every rank: out, lse, dq [B][S][H][D] and dk, dv [B][S][G][D] in
 * global position order (rows stored in dtype, converted to float). Returns 0, or -1 on every rank
 * when rank 0 failed. Collective over MPI_COMM_WORLD. */
typedef struct {
  float *out, *lse, *dq, *dk, *dv;
} one_rank_t;

static void one_rank_free(one_rank_t *o) { free(o->out), free(o->lse), free(o->dq), free(o->dk), free(o->dv); }

static int one_rank(const tcase_t *c, const da_problem_t *prob, uint64_t seed, one_rank_t *res) {
  const int B = c->B, H = c->H, G = c->G, D = c->D;
  const int64_t S = c->S;
  const size_t nq = (size_t)B * S * H * D, nk = (size_t)B * S * G * D, nl = (size_t)B * S * H;
  memset(res, 0, sizeof *res);
  res->out = malloc(nq * 4), res->dq = malloc(nq * 4), res->lse = malloc(nl * 4);
  res->dk = malloc(nk * 4), res->dv = malloc(nk * 4);
  int ok = res->out && res->dq && res->lse && res->dk && res->dv;
  if (g_rank == 0 && ok) {
    da_comm_t *self = NULL;
    da_plan_t *plan = NULL;
    da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
    cfg.algo = c->algo, cfg.block = c->block, cfg.timeout = 60;
    if (c->algo == DA_ALGO_HYBRID) cfg.ulysses = 1, cfg.ring_layout = c->ring_layout;
    int64_t *pos = malloc((size_t)S * sizeof *pos);
    char *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nk * 4), *dout = malloc(nq * 4);
    ok = pos && q && k && v && dout && da_comm_create(g_ctx, MPI_COMM_SELF, &self) == DA_SUCCESS &&
         da_plan_create(self, prob, &cfg, &plan) == DA_SUCCESS && da_plan_local_rows(plan) == S;
    if (ok) {
      for (int64_t i = 0; i < S; i++) pos[i] = i;
      gen(seed, DA_RNG_Q, pos, S, B, H, D, D, DA_FLOAT32, q, NULL);
      gen(seed, DA_RNG_K, pos, S, B, G, D, D, DA_FLOAT32, k, NULL);
      gen(seed, DA_RNG_V, pos, S, B, G, D, D, DA_FLOAT32, v, NULL);
      gen(seed, DA_RNG_DOUT, pos, S, B, H, D, D, DA_FLOAT32, dout, NULL);
      da_tensor_t tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
      const int64_t shq[4] = {B, S, H, D}, shk[4] = {B, S, G, D}, shl[3] = {B, S, H};
      da_tensor_make(&tq, q, DA_FLOAT32, 4, shq), da_tensor_make(&tk, k, DA_FLOAT32, 4, shk);
      da_tensor_make(&tv, v, DA_FLOAT32, 4, shk), da_tensor_make(&to, res->out, DA_FLOAT32, 4, shq);
      da_tensor_make(&tl, res->lse, DA_FLOAT32, 3, shl), da_tensor_make(&tdo, dout, DA_FLOAT32, 4, shq);
      da_tensor_make(&tdq, res->dq, DA_FLOAT32, 4, shq), da_tensor_make(&tdk, res->dk, DA_FLOAT32, 4, shk);
      da_tensor_make(&tdv, res->dv, DA_FLOAT32, 4, shk);
      ok = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL) == DA_SUCCESS &&
           (!c->bwd || da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, NULL) == DA_SUCCESS);
    }
    if (!ok) fprintf(stderr, "one-rank run failed: %s\n", da_last_error(g_ctx));
    da_plan_free(plan);
    da_comm_free(self);
    free(pos), free(q), free(k), free(v), free(dout);
  }
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all) return -1;
  /* Chunks below 2^31 elements are plenty for test sizes. */
  MPI_Bcast(res->out, (int)nq, MPI_FLOAT, 0, MPI_COMM_WORLD);
  MPI_Bcast(res->lse, (int)nl, MPI_FLOAT, 0, MPI_COMM_WORLD);
  if (c->bwd) {
    MPI_Bcast(res->dq, (int)nq, MPI_FLOAT, 0, MPI_COMM_WORLD);
    MPI_Bcast(res->dk, (int)nk, MPI_FLOAT, 0, MPI_COMM_WORLD);
    MPI_Bcast(res->dv, (int)nk, MPI_FLOAT, 0, MPI_COMM_WORLD);
  }
  return 0;
}

/* max |x - y| / max(max |y|, floor) over len floats (NaN -> inf), the floor as in row_err. */
static double row_err_f(const float *x, const float *y, int64_t len, double floor) {
  double e = 0, m = 0;
  for (int64_t j = 0; j < len; j++) {
    double d = fabs((double)x[j] - (double)y[j]);
    if (!(d <= e)) e = d;
    if (fabs((double)y[j]) > m) m = fabs((double)y[j]);
  }
  if (floor < 1e-6) floor = 1e-6;
  return isnan(e) ? INFINITY : e / (m > floor ? m : floor);
}

/* 10% of the largest |x| over n floats (a tensor every rank holds whole). */
static double tensor_floor_f(const float *x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fabs((double)x[i]) > m ? fabs((double)x[i]) : m;
  return 0.1 * m;
}

/* Run one case on every rank; returns the max error over ranks (reduced) in units of the
 * tolerance (<= 1 passes), or +inf if any rank failed to run it. fp32 cases at P > 1 are also
 * compared to the 1-rank result (ONE_RANK_TOL); that ratio counts too. Collective. */
static double run_case(const tcase_t *c, int verbose) {
  char name[200];
  describe(c, name, sizeof name);
  const int B = c->B, H = c->H, G = c->G, D = c->D;
  const int64_t S = c->S;
  const da_dtype_t dt = c->dt;
  const size_t es = da_dtype_size(dt);
  const uint64_t seed = 1000 + (uint64_t)S * 31 + (uint64_t)c->mask * 7 + (uint64_t)c->algo;
  int64_t cu[8];
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.seq = S, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = dt;
  prob.mask = c->mask, prob.window = c->window;
  if (c->mask & DA_MASK_DOC) prob.ndocs = make_docs(S, c->ndocs, cu), prob.cu_seqlens = cu;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = c->algo, cfg.block = c->block, cfg.timeout = 60, cfg.transport = c->device ? g_dev_transport : c->transport;
  if (c->algo == DA_ALGO_HYBRID) cfg.ulysses = c->ulysses, cfg.ring_layout = c->ring_layout;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  if (st != DA_SUCCESS) {
    if (g_rank == 0) fprintf(stderr, "FAIL %s: plan: %s: %s\n", name, da_status_string(st), da_last_error(g_ctx));
    return INFINITY; /* agreed: every rank got a failure */
  }
  const int64_t n = da_plan_local_rows(plan);
  int64_t *pos = malloc((size_t)(n + 1) * sizeof *pos), *allpos = malloc((size_t)S * sizeof *allpos);
  da_plan_local_positions(plan, pos, n);
  for (int64_t i = 0; i < S; i++) allpos[i] = i;
  const int qhs = c->strided_q ? D + 8 : D;
  size_t nq = (size_t)(B * n * H), nk = (size_t)(B * n * G);
  char *q = talloc(c, (nq * (size_t)qhs + 1) * es), *k = talloc(c, nk * D * es + 1), *v = talloc(c, nk * D * es + 1);
  char *out = talloc(c, nq * D * es + 1), *dout = talloc(c, nq * D * es + 1), *dq = talloc(c, nq * D * es + 1);
  char *dk = talloc(c, nk * D * es + 1), *dv = talloc(c, nk * D * es + 1);
  float *lse = talloc(c, nq * sizeof(float) + 4);
  ck_assert(q && k && v && out && dout && dq && dk && dv && lse);
  memset(q, 0, (nq * (size_t)qhs + 1) * es);
  /* Outputs poisoned (0xFF: NaN in every float format): a row the driver never writes fails. */
  memset(out, 0xFF, nq * D * es), memset(dq, 0xFF, nq * D * es), memset(lse, 0xFF, nq * sizeof(float));
  memset(dk, 0xFF, nk * D * es), memset(dv, 0xFF, nk * D * es);
  double *rq = malloc(nq * D * 8 + 8), *rdo = malloc(nq * D * 8 + 8);
  double *rk = malloc((size_t)B * S * G * D * 8), *rv = malloc((size_t)B * S * G * D * 8);
  gen(seed, DA_RNG_Q, pos, n, B, H, D, qhs, dt, q, rq);
  gen(seed, DA_RNG_K, pos, n, B, G, D, D, dt, k, NULL);
  gen(seed, DA_RNG_V, pos, n, B, G, D, D, dt, v, NULL);
  gen(seed, DA_RNG_DOUT, pos, n, B, H, D, D, dt, dout, rdo);
  /* Keys and values of the whole sequence, for the reference only (the driver never sees them). */
  gen(seed, DA_RNG_K, allpos, S, B, G, D, D, dt, NULL, rk);
  gen(seed, DA_RNG_V, allpos, S, B, G, D, D, dt, NULL, rv);

  da_tensor_t tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
  const int64_t shq[4] = {B, n, H, D}, shk[4] = {B, n, G, D}, shl[3] = {B, n, H};
  da_tensor_make(&tq, q, dt, 4, shq);
  if (c->strided_q) tq.strides[2] = qhs, tq.strides[1] = (int64_t)H * qhs, tq.strides[0] = n * H * qhs;
  da_tensor_make(&tk, k, dt, 4, shk), da_tensor_make(&tv, v, dt, 4, shk);
  da_tensor_make(&to, out, dt, 4, shq), da_tensor_make(&tl, lse, DA_FLOAT32, 3, shl);
  da_tensor_make(&tdo, dout, dt, 4, shq), da_tensor_make(&tdq, dq, dt, 4, shq);
  da_tensor_make(&tdk, dk, dt, 4, shk), da_tensor_make(&tdv, dv, dt, 4, shk);

  double err = 0;
  int failed = 0;
  da_dstream_t stream = NULL; /* device mode: the caller's stream, drained by the caller */
  if (c->device && c->caller_stream) ck_assert(da_devapi_host.stream_create(&stream) == DA_SUCCESS);
  st = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, stream);
  if (st == DA_SUCCESS && c->bwd) st = da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, stream);
  if (st == DA_SUCCESS && stream) st = da_devapi_host.stream_sync(stream);
  if (stream) da_devapi_host.stream_destroy(stream);
  if (st != DA_SUCCESS) {
    failed = 1;
    fprintf(stderr, "FAIL %s: rank %d: %s: %s\n", name, g_rank, da_status_string(st), da_last_error(g_ctx));
  }

  da_kparams_t kp = {.H = H, .G = G, .D = D, .scale = (float)(1.0 / sqrt((double)D)), .dtype = dt};
  kp.mask.flags = prob.mask, kp.mask.window = prob.window, kp.mask.ndocs = prob.ndocs, kp.mask.cu_seqlens = prob.cu_seqlens;
  da_span_t sp[64];
  int64_t first[64];
  int ns = to_spans(pos, n, sp, first, 64);
  double *ro = malloc(nq * D * 8 + 8), *rl = malloc(nq * 8 + 8), *rdq = malloc(nq * D * 8 + 8);
  double *pdk = calloc((size_t)B * S * G * D, 8), *pdv = calloc((size_t)B * S * G * D, 8);
  double *tdk_ = malloc((size_t)S * G * D * 8), *tdv_ = malloc((size_t)S * G * D * 8);
  ck_assert(ns >= 0);
  for (int b = 0; b < B && !failed; b++)
    for (int s = 0; s < ns; s++) {
      const size_t qo = (size_t)(b * n + first[s]) * H;
      const double *kb = rk + (size_t)b * S * G * D, *vb = rv + (size_t)b * S * G * D;
      da_ref_fwd(&kp, rq + qo * D, sp[s], kb, vb, da_span(0, 1, S), ro + qo * D, rl + qo);
      if (c->bwd) {
        da_ref_bwd(&kp, rq + qo * D, sp[s], kb, vb, da_span(0, 1, S), rdo + qo * D, rdq + qo * D, tdk_, tdv_);
        for (size_t j = 0; j < (size_t)S * G * D; j++)
          pdk[(size_t)b * S * G * D + j] += tdk_[j], pdv[(size_t)b * S * G * D + j] += tdv_[j];
      }
    }
  if (c->bwd) {
    /* dK/dV of a key sum over every rank's queries: add the partials up (reference side only). */
    MPI_Allreduce(MPI_IN_PLACE, pdk, B * (int)S * G * D, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, pdv, B * (int)S * G * D, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  }
  double e_out = 0, e_lse = 0, e_dq = 0, e_dk = 0, e_dv = 0;
  const double f_out = tensor_floor(ro, (size_t)B * n * H * D);
  const double f_dq = c->bwd ? tensor_floor(rdq, (size_t)B * n * H * D) : 0;
  const double f_dk = c->bwd ? tensor_floor(pdk, (size_t)B * S * G * D) : 0;
  const double f_dv = c->bwd ? tensor_floor(pdv, (size_t)B * S * G * D) : 0;
  if (!failed)
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < n; i++) {
        const int64_t r = b * n + i;
        double e = tu_row_err(out, dt, r * H * D, ro + r * H * D, (int64_t)H * D, f_out);
        if (!(e <= e_out)) e_out = e;
        for (int h = 0; h < H; h++) {
          double d = fabs(lse[r * H + h] - rl[r * H + h]) / fmax(1.0, fabs(rl[r * H + h]));
          if (!(d <= e_lse)) e_lse = d;
        }
        if (!c->bwd) continue;
        e = tu_row_err(dq, dt, r * H * D, rdq + r * H * D, (int64_t)H * D, f_dq);
        if (!(e <= e_dq)) e_dq = e;
        const size_t kr = ((size_t)b * S + (size_t)pos[i]) * G * D;
        e = tu_row_err(dk, dt, r * G * D, pdk + kr, (int64_t)G * D, f_dk);
        if (!(e <= e_dk)) e_dk = e;
        e = tu_row_err(dv, dt, r * G * D, pdv + kr, (int64_t)G * D, f_dv);
        if (!(e <= e_dv)) e_dv = e;
      }
  /* The 1-rank result of the same library (fp32 only: rounded dtypes would compare roundings). */
  double e1 = 0;
  int fail_any = 0;
  MPI_Allreduce(&failed, &fail_any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (dt == DA_FLOAT32 && g_size > 1 && !fail_any) {
    one_rank_t one;
    if (one_rank(c, &prob, seed, &one)) {
      e1 = INFINITY;
    } else {
      const float *o = (const float *)out;
      const size_t tq = (size_t)B * S * H * D, tk = (size_t)B * S * G * D;
      const double g_out = tensor_floor_f(one.out, tq), g_dq = c->bwd ? tensor_floor_f(one.dq, tq) : 0;
      const double g_dk = c->bwd ? tensor_floor_f(one.dk, tk) : 0, g_dv = c->bwd ? tensor_floor_f(one.dv, tk) : 0;
      for (int b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++) {
          const int64_t r = b * n + i, g = (int64_t)b * S + pos[i];
          e1 = fmax(e1, row_err_f(o + r * H * D, one.out + g * H * D, (int64_t)H * D, g_out));
          for (int h = 0; h < H; h++) {
            double a = lse[r * H + h], y = one.lse[g * H + h];
            double d = a == y ? 0 : fabs(a - y) / fmax(1.0, fabs(y));
            e1 = fmax(e1, isnan(d) ? INFINITY : d);
          }
          if (!c->bwd) continue;
          e1 = fmax(e1, row_err_f((const float *)dq + r * H * D, one.dq + g * H * D, (int64_t)H * D, g_dq));
          e1 = fmax(e1, row_err_f((const float *)dk + r * G * D, one.dk + g * G * D, (int64_t)G * D, g_dk));
          e1 = fmax(e1, row_err_f((const float *)dv + r * G * D, one.dv + g * G * D, (int64_t)G * D, g_dv));
        }
    }
    one_rank_free(&one);
  }
  double errs[7] = {e_out, e_lse, e_dq, e_dk, e_dv, failed ? 1.0 : 0.0, e1};
  MPI_Allreduce(MPI_IN_PLACE, errs, 7, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2;
  err = 0;
  for (int i = 0; i < 5; i++) err = fmax(err, isnan(errs[i]) ? INFINITY : errs[i] / tol);
  err = fmax(err, isnan(errs[6]) ? INFINITY : errs[6] / ONE_RANK_TOL);
  if (errs[5] > 0) err = INFINITY;
  if (g_rank == 0 && (verbose || err > 1))
    fprintf(stderr, "%s %s: err/tol %.3g (out %.2e lse %.2e dq %.2e dk %.2e dv %.2e; vs 1 rank %.2e)\n",
            err > 1 ? "FAIL" : "ok  ", name, err, errs[0], errs[1], errs[2], errs[3], errs[4], errs[6]);
  da_plan_free(plan);
  free(pos), free(allpos);
  tfree(c, q), tfree(c, k), tfree(c, v), tfree(c, out), tfree(c, dout), tfree(c, dq), tfree(c, dk), tfree(c, dv);
  tfree(c, lse);
  free(rq), free(rdo), free(rk), free(rv), free(ro), free(rl), free(rdq), free(pdk), free(pdv), free(tdk_), free(tdv_);
  return err; /* in units of the tolerance: <= 1 passes */
}

/* Every mask kind and a combination. */
#define NMASKS 5
static const unsigned masks[NMASKS] = {DA_MASK_NONE, DA_MASK_CAUSAL, DA_MASK_WINDOW, DA_MASK_DOC,
                                       DA_MASK_CAUSAL | DA_MASK_DOC};

/* Every algo x mask x GQA ratio (1: G = H, 4: G = H/4) x dtype, forward and backward, on a short
 * odd sequence with tiny sub-blocks (many work items and progress calls per step). */
START_TEST(matrix_small) {
  int fails = 0, cases = 0;
  for (int a = 0; a < 3; a++)
    for (int mi = 0; mi < NMASKS; mi++)
      for (int g = 0; g < 2; g++)
        for (int d = 0; d < 2; d++) {
          tcase_t c = {.algo = (da_algo_t)a, .mask = masks[mi], .window = 7, .ndocs = 4, .S = 37,
                       .B = (mi + d) % 3 == 0 ? 2 : 1, .H = 4, .G = g ? 1 : 4, .D = 16,
                       .dt = d ? DA_BFLOAT16 : DA_FLOAT32, .bwd = 1, .block = 4};
          cases++;
          fails += run_case(&c, 0) > 1;
        }
  /* fp16 at least once per algo. */
  for (int a = 0; a < 3; a++) {
    tcase_t c = {.algo = (da_algo_t)a, .mask = DA_MASK_CAUSAL | DA_MASK_DOC, .ndocs = 3, .S = 37, .B = 1,
                 .H = 4, .G = 2, .D = 16, .dt = DA_FLOAT16, .bwd = 1, .block = 0};
    cases++;
    fails += run_case(&c, 0) > 1;
  }
  ck_assert_msg(fails == 0, "%d of %d small cases failed (details on stderr)", fails, cases);
}
END_TEST

/* The matrix on lengths P does not divide (1000 + P - 1): every layout x every mask x
 * GQA ratios 1 and 4 x fp32 and bf16, forward and backward (the backward's run includes the
 * forward, both checked), the automatic sub-block; fp32 also against the 1-rank result. */
START_TEST(matrix_uneven) {
  int fails = 0, cases = 0;
  for (int a = 0; a < 3; a++)
    for (int mi = 0; mi < NMASKS; mi++)
      for (int g = 0; g < 2; g++)
        for (int d = 0; d < 2; d++) {
          tcase_t c = {.algo = (da_algo_t)a, .mask = masks[mi], .window = 100, .ndocs = 4, .S = 1000 + g_size - 1,
                       .B = 1, .H = 4, .G = g ? 1 : 4, .D = 16, .dt = d ? DA_BFLOAT16 : DA_FLOAT32, .bwd = 1,
                       .block = 0};
          cases++;
          fails += run_case(&c, 1) > 1;
        }
  ck_assert_msg(fails == 0, "%d of %d uneven cases failed (details on stderr)", fails, cases);
}
END_TEST

/* Shapes at the edges: fewer tokens than ranks (some ranks own nothing), one-token sub-blocks,
 * a batch of 3, a head-strided q view, MQA with D = 64. */
START_TEST(edges) {
  int fails = 0;
  tcase_t cs[] = {
      {.algo = DA_ALGO_RING, .mask = DA_MASK_CAUSAL, .S = 3, .B = 1, .H = 2, .G = 1, .D = 16, .dt = DA_FLOAT32, .bwd = 1},
      {.algo = DA_ALGO_ZIGZAG, .mask = DA_MASK_NONE, .S = 5, .B = 2, .H = 2, .G = 2, .D = 16, .dt = DA_FLOAT32, .bwd = 1},
      {.algo = DA_ALGO_STRIPED, .mask = DA_MASK_CAUSAL, .S = 29, .B = 3, .H = 4, .G = 2, .D = 16, .dt = DA_FLOAT32,
       .bwd = 1, .block = 1},
      {.algo = DA_ALGO_ZIGZAG, .mask = DA_MASK_WINDOW, .window = 5, .S = 61, .B = 2, .H = 4, .G = 4, .D = 16,
       .dt = DA_BFLOAT16, .bwd = 1, .block = 3, .strided_q = 1},
      {.algo = DA_ALGO_RING, .mask = DA_MASK_DOC, .ndocs = 4, .S = 90, .B = 1, .H = 8, .G = 1, .D = 64,
       .dt = DA_FLOAT32, .bwd = 1},
  };
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) fails += run_case(&cs[i], 0) > 1;
  ck_assert_msg(fails == 0, "%d edge cases failed (details on stderr)", fails);
}
END_TEST

/* Ranks that pass different problems all get DA_ERR_MISMATCH, promptly. */
START_TEST(mismatch) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = 4, prob.kv_heads = 2, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 30;
  da_plan_t *plan = NULL;
  if (g_size == 1) return; /* one rank always agrees with itself */
  if (g_rank == g_size - 1) prob.seq = 65;
  double t0 = MPI_Wtime();
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  if (st != DA_ERR_MISMATCH) fprintf(stderr, "rank %d: seq mismatch gave %s: %s\n", g_rank, da_status_string(st), da_last_error(g_ctx));
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_MISMATCH), "a seq mismatch must be DA_ERR_MISMATCH on every rank");
  ck_assert(plan == NULL);
  ck_assert_msg(MPI_Wtime() - t0 < 20, "mismatch detection took %.1f s", MPI_Wtime() - t0);
  /* A disagreement hidden in the document boundaries (same count, different cut). */
  prob.seq = 64;
  int64_t cu[3] = {0, g_rank == 0 ? 20 : 21, 64};
  prob.mask = DA_MASK_DOC, prob.ndocs = 2, prob.cu_seqlens = cu;
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_MISMATCH), "a document mismatch must be DA_ERR_MISMATCH everywhere");
  /* Different algorithms. */
  prob.mask = DA_MASK_NONE;
  cfg.algo = g_rank % 2 ? DA_ALGO_ZIGZAG : DA_ALGO_RING;
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_MISMATCH), "an algo mismatch must be DA_ERR_MISMATCH everywhere");
}
END_TEST

/* Bad arguments: a clear status on the rank that passed them, DA_ERR_REMOTE naming it on the
 * others, and the plan still usable after a rejected call. */
START_TEST(bad_args) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 40, prob.heads = 4, prob.kv_heads = 3, prob.dim = 16;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 30;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT), "heads %% kv_heads != 0 everywhere: invalid argument");
  ck_assert_msg(strstr(da_last_error(g_ctx), "kv_heads") != NULL, "message names kv_heads: %s", da_last_error(g_ctx));

  /* Only the last rank is wrong. */
  prob.kv_heads = 2;
  if (g_rank == g_size - 1) prob.dim = 0;
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  da_status_t want = g_rank == g_size - 1 ? DA_ERR_INVALID_ARGUMENT : DA_ERR_REMOTE;
  ck_assert_msg(tu_all_equal_status(st, want), "one bad rank: invalid there, remote elsewhere (got %s: %s)",
                da_status_string(st), da_last_error(g_ctx));
  prob.dim = 16;

  /* Unknown transport / algo / negative block. */
  cfg.transport = "carrier-pigeon";
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  cfg.transport = g_size == 1 ? "self" : NULL;
  cfg.block = -1;
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  cfg.block = 0;
  if (g_size > 1) {
    cfg.transport = "self";
    st = da_plan_create(g_comm, &prob, &cfg, &plan);
    ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT), "self transport with P > 1 is invalid");
    cfg.transport = NULL;
  }
  da_problem_t p2 = prob;
  p2.size = 3;
  st = da_plan_create(g_comm, &p2, &cfg, &plan);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));

  /* A good plan, then a forward where rank 0 passes a wrongly shaped q. */
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert(tu_all_equal_status(st, DA_SUCCESS));
  const int64_t n = da_plan_local_rows(plan);
  float *buf = calloc((size_t)(n + 2) * 4 * 16 * 6, sizeof(float)), *lse = calloc((size_t)(n + 2) * 4, sizeof(float));
  da_tensor_t q, k, v, o, l;
  const int64_t shq[3] = {g_rank == 0 ? n + 1 : n, 4, 16}, shk[3] = {n, 2, 16}, sho[3] = {n, 4, 16}, shl[2] = {n, 4};
  da_tensor_make(&q, buf, DA_FLOAT32, 3, shq), da_tensor_make(&k, buf + (n + 2) * 64, DA_FLOAT32, 3, shk);
  da_tensor_make(&v, buf + (n + 2) * 96, DA_FLOAT32, 3, shk), da_tensor_make(&o, buf + (n + 2) * 128, DA_FLOAT32, 3, sho);
  da_tensor_make(&l, lse, DA_FLOAT32, 2, shl);
  st = da_plan_fwd(plan, &q, &k, &v, &o, &l, NULL);
  want = g_rank == 0 ? DA_ERR_INVALID_ARGUMENT : DA_ERR_REMOTE;
  ck_assert_msg(tu_all_equal_status(st, want), "bad q on rank 0 (got %s: %s)", da_status_string(st), da_last_error(g_ctx));
  if (g_rank != 0) ck_assert_msg(strstr(da_last_error(g_ctx), "rank 0") != NULL, "names rank 0: %s", da_last_error(g_ctx));
  /* Wrong dtype everywhere, then NULL lse in the backward. */
  q.shape[0] = n;
  k.dtype = DA_BFLOAT16;
  st = da_plan_fwd(plan, &q, &k, &v, &o, &l, NULL);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  k.dtype = DA_FLOAT32;
  st = da_plan_bwd(plan, &q, &k, &v, &o, &o, NULL, &o, &k, &v, NULL);
  ck_assert(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT));
  /* The plan is still usable. */
  st = da_plan_fwd(plan, &q, &k, &v, &o, &l, NULL);
  ck_assert_msg(tu_all_equal_status(st, DA_SUCCESS), "plan usable after rejected calls: %s", da_last_error(g_ctx));
  da_plan_stats_t stats = DA_PLAN_STATS_INITIALIZER;
  ck_assert(da_plan_stats(plan, &stats) == DA_SUCCESS);
  ck_assert_int_eq(stats.nranks, g_size);
  ck_assert_int_eq(stats.local_rows, n);
  ck_assert_msg(g_size > 1 ? stats.fwd_bytes_sent > 0 : stats.fwd_bytes_sent == 0, "bytes sent %llu",
                (unsigned long long)stats.fwd_bytes_sent);
  free(buf), free(lse);
  da_plan_free(plan);
}
END_TEST

/* Ranks that call different operations (forward here, backward there) must not hang: every
 * rank's receive times out and the error names the peer and the step. */
START_TEST(timeout) {
  if (g_size == 1) return;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = 2, prob.kv_heads = 1, prob.dim = 16;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 2;
  da_plan_t *plan = NULL;
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  const int64_t n = da_plan_local_rows(plan);
  float *buf = calloc((size_t)(n + 1) * 32 * 8, sizeof(float)), *lse = calloc((size_t)(n + 1) * 2, sizeof(float));
  for (int64_t i = 0; i < (n + 1) * 2; i++) lse[i] = 1.0f;
  da_tensor_t q, k, o;
  const int64_t shq[3] = {n, 2, 16}, shk[3] = {n, 1, 16}, shl[2] = {n, 2};
  da_tensor_t l;
  da_tensor_make(&q, buf, DA_FLOAT32, 3, shq), da_tensor_make(&k, buf + (n + 1) * 32, DA_FLOAT32, 3, shk);
  da_tensor_make(&o, buf + (n + 1) * 64, DA_FLOAT32, 3, shq), da_tensor_make(&l, lse, DA_FLOAT32, 2, shl);
  double t0 = MPI_Wtime();
  da_status_t st = g_rank % 2 ? da_plan_bwd(plan, &q, &k, &k, &o, &o, &l, &o, &k, &k, NULL)
                              : da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL);
  double dt = MPI_Wtime() - t0;
  const char *msg = da_last_error(g_ctx);
  int ok = st == DA_ERR_TIMEOUT && strstr(msg, " step ") && strstr(msg, "from rank");
  if (!ok) fprintf(stderr, "rank %d: %s: %s\n", g_rank, da_status_string(st), msg);
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  ck_assert_msg(all, "mixed fwd/bwd calls must time out on every rank naming the peer and step");
  ck_assert_msg(dt < 15, "timeout took %.1f s", dt);
  /* The plan refuses further use; a new plan works (stale messages cannot reach it). */
  ck_assert(da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL) == DA_ERR_INVALID_ARGUMENT);
  da_plan_free(plan);
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  ck_assert(tu_all_equal_status(da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL), DA_SUCCESS));
  da_plan_free(plan);
  free(buf), free(lse);
}
END_TEST

/* A plan on zero-filled tensors (values do not matter here), forward then backward. */
typedef struct {
  da_plan_t *plan;
  int64_t n;
  float *buf;
  da_tensor_t q, k, v, o, l, dout, dq, dk, dv;
} zplan_t;

static double zplan_timeout = 60; /* seconds; a timeout test lowers it */
static int zplan_ulysses = 1;     /* DA_ALGO_HYBRID's degree (ring layout: zigzag) */

static da_status_t zplan_make(zplan_t *z, const da_problem_t *prob, da_algo_t algo) {
  memset(z, 0, sizeof *z);
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = algo, cfg.timeout = zplan_timeout;
  if (algo == DA_ALGO_HYBRID) cfg.ulysses = zplan_ulysses;
  da_status_t st = da_plan_create(g_comm, prob, &cfg, &z->plan);
  if (st != DA_SUCCESS) return st;
  const int64_t n = z->n = da_plan_local_rows(z->plan), H = prob->heads, G = prob->kv_heads, D = prob->dim;
  const size_t qn = (size_t)(n * H * D), kn = (size_t)(n * G * D);
  float *b = z->buf = calloc(5 * qn + 4 * kn + (size_t)(n * H) + 1, sizeof(float));
  const int64_t shq[3] = {n, H, D}, shk[3] = {n, G, D}, shl[2] = {n, H};
  const da_dtype_t dt = prob->dtype;
  char *c = (char *)b;
  da_tensor_make(&z->q, c, dt, 3, shq), da_tensor_make(&z->o, c + qn * 4, dt, 3, shq);
  da_tensor_make(&z->dout, c + 2 * qn * 4, dt, 3, shq), da_tensor_make(&z->dq, c + 3 * qn * 4, dt, 3, shq);
  da_tensor_make(&z->k, c + 5 * qn * 4, dt, 3, shk), da_tensor_make(&z->v, c + (5 * qn + kn) * 4, dt, 3, shk);
  da_tensor_make(&z->dk, c + (5 * qn + 2 * kn) * 4, dt, 3, shk);
  da_tensor_make(&z->dv, c + (5 * qn + 3 * kn) * 4, dt, 3, shk);
  da_tensor_make(&z->l, b + 5 * qn + 4 * kn, DA_FLOAT32, 2, shl);
  return DA_SUCCESS;
}

static da_status_t zplan_run(zplan_t *z, int bwd) {
  da_status_t st = da_plan_fwd(z->plan, &z->q, &z->k, &z->v, &z->o, &z->l, NULL);
  if (st == DA_SUCCESS && bwd)
    st = da_plan_bwd(z->plan, &z->q, &z->k, &z->v, &z->o, &z->dout, &z->l, &z->dq, &z->dk, &z->dv, NULL);
  return st;
}

static void zplan_free(zplan_t *z) {
  da_plan_free(z->plan);
  free(z->buf);
}

/* Runs the plan forward and backward on every rank, then checks that its stats (left in *s)
 * count exactly the bytes the plan said before the calls that it would send: the same check
 * for every driver's plan_figures test (ring, zigzag, Ulysses, hybrid). */
static void zplan_check_sent(zplan_t *z, da_plan_stats_t *s) {
  ck_assert(tu_all_equal_status(zplan_run(z, 1), DA_SUCCESS));
  ck_assert(da_plan_stats(z->plan, s) == DA_SUCCESS);
  ck_assert_msg(s->fwd_bytes_sent == s->plan_fwd_bytes && s->bwd_bytes_sent == s->plan_bwd_bytes,
                "sent %llu / %llu, planned %llu / %llu", (unsigned long long)s->fwd_bytes_sent,
                (unsigned long long)s->bwd_bytes_sent, (unsigned long long)s->plan_fwd_bytes,
                (unsigned long long)s->plan_bwd_bytes);
}

/* What the plan reports before any call (memory, bytes per call, the schedule's imbalance)
 * matches the ring's exact volume, what the calls then measure, and the ranks' own pair counts:
 * every KV block (G heads, storage dtype) is sent P-1 times per pass, every dK/dV sum (fp32)
 * P-1 times in the backward. */
START_TEST(plan_figures) {
  for (int a = 0; a < 3; a++)
    for (int d = 0; d < 2; d++) {
      da_problem_t prob = DA_PROBLEM_INITIALIZER;
      prob.seq = 301 + g_size, prob.heads = 4, prob.kv_heads = 2, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
      prob.dtype = d ? DA_BFLOAT16 : DA_FLOAT32;
      zplan_t z;
      ck_assert(tu_all_equal_status(zplan_make(&z, &prob, (da_algo_t)a), DA_SUCCESS));
      da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
      ck_assert(da_plan_stats(z.plan, &s) == DA_SUCCESS);
      const double kvb = (double)prob.seq * 2 * prob.kv_heads * prob.dim, P1 = g_size - 1;
      ck_assert_msg(tu_reduce((double)s.plan_fwd_bytes, MPI_SUM) == P1 * kvb * (d ? 2 : 4), "fwd volume %llu",
                    (unsigned long long)s.plan_fwd_bytes);
      ck_assert_msg(tu_reduce((double)s.plan_bwd_bytes, MPI_SUM) == P1 * kvb * ((d ? 2 : 4) + 4), "bwd volume %llu",
                    (unsigned long long)s.plan_bwd_bytes);
      ck_assert(s.mem_fwd_bytes > 0 && s.mem_bwd_bytes > s.mem_fwd_bytes / 2);
      const double pr = (double)s.pairs_rank, mean = tu_reduce(pr, MPI_SUM) / g_size, mx = tu_reduce(pr, MPI_MAX);
      ck_assert_msg(fabs(s.work_imbalance - mx / mean) < 1e-12, "work imbalance %.6f vs %.6f", s.work_imbalance,
                    mx / mean);
      ck_assert_msg(tu_reduce(s.work_imbalance, MPI_MAX) == tu_reduce(s.work_imbalance, MPI_MIN), "every rank has the same figure");
      if (a == DA_ALGO_ZIGZAG) ck_assert_msg(s.work_imbalance < 1.02, "zigzag imbalance %.4f", s.work_imbalance);
      if (a == DA_ALGO_RING && g_size > 1)
        ck_assert_msg(s.work_imbalance > 1.3, "contiguous causal imbalance %.4f", s.work_imbalance);
      zplan_check_sent(&z, &s);
      zplan_free(&z);
    }
}
END_TEST

/* The test-only slow link (DISTATTN_TEST_LINK_GBPS / _US, read when a plan opens its transport):
 * every exchange completes no earlier than the modelled link allows, so a forward over P ranks
 * lasts at least P-1 latencies and, with almost no compute, shows them as exposed time; with a
 * bandwidth, a rank's transfers take at least bytes / bandwidth. Lower bounds only: they hold on
 * a loaded machine. Results stay exact under the hook. Malformed values are an error. */
START_TEST(link_hook) {
  if (g_size == 1) return; /* one rank sends nothing */
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 16 * g_size + 3, prob.heads = 2, prob.kv_heads = 1, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  const double lat = 0.1, P1 = g_size - 1;
  zplan_t z;
  setenv("DISTATTN_TEST_LINK_US", "100000", 1);
  ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_ZIGZAG), DA_SUCCESS));
  ck_assert(tu_all_equal_status(zplan_run(&z, 1), DA_SUCCESS));
  da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
  da_plan_stats(z.plan, &s);
  ck_assert_msg(tu_reduce(s.fwd_s, MPI_MIN) >= P1 * lat, "forward %.3f s < %g latencies", s.fwd_s, P1);
  ck_assert_msg(tu_reduce(s.fwd_exposed_s, MPI_MIN) >= 0.5 * P1 * lat, "forward exposed %.3f s", s.fwd_exposed_s);
  /* Backward: P-1 KV exchanges, then P-1 dK/dV hops that each wait for the previous step. */
  ck_assert_msg(tu_reduce(s.bwd_s, MPI_MIN) >= P1 * lat, "backward %.3f s", s.bwd_s);
  zplan_free(&z);
  unsetenv("DISTATTN_TEST_LINK_US");

  setenv("DISTATTN_TEST_LINK_GBPS", "0.002", 1); /* 2 MB/s */
  prob.seq = 512 * g_size, prob.heads = 2, prob.kv_heads = 2, prob.dim = 32; /* 128 KiB blocks: 64 ms */
  ck_assert(tu_all_equal_status(zplan_make(&z, &prob, DA_ALGO_STRIPED), DA_SUCCESS));
  da_plan_set_mode(z.plan, DA_PLAN_COMM_ONLY);
  ck_assert(tu_all_equal_status(zplan_run(&z, 0), DA_SUCCESS));
  da_plan_stats(z.plan, &s);
  ck_assert_msg(s.fwd_s >= (double)s.fwd_bytes_sent / 2e6, "%llu bytes in %.3f s at 2 MB/s",
                (unsigned long long)s.fwd_bytes_sent, s.fwd_s);
  zplan_free(&z);
  unsetenv("DISTATTN_TEST_LINK_GBPS");

  /* Exact results under a slow link, small sub-blocks (many progress calls per step). */
  setenv("DISTATTN_TEST_LINK_GBPS", "0.05", 1);
  setenv("DISTATTN_TEST_LINK_US", "300", 1);
  tcase_t c = {.algo = DA_ALGO_ZIGZAG, .mask = DA_MASK_CAUSAL, .S = 97, .B = 2, .H = 4, .G = 1, .D = 16,
               .dt = DA_FLOAT32, .bwd = 1, .block = 8};
  ck_assert(run_case(&c, 1) <= 1);
  unsetenv("DISTATTN_TEST_LINK_GBPS");
  unsetenv("DISTATTN_TEST_LINK_US");

  setenv("DISTATTN_TEST_LINK_GBPS", g_rank == 0 ? "-1" : "fast", 1);
  zplan_t bad;
  da_status_t st = zplan_make(&bad, &prob, DA_ALGO_RING);
  unsetenv("DISTATTN_TEST_LINK_GBPS");
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_INVALID_ARGUMENT), "a malformed link setting is rejected: %s",
                da_last_error(g_ctx));
  ck_assert_msg(strstr(da_last_error(g_ctx), "DISTATTN_TEST_LINK_GBPS") != NULL, "names the variable: %s",
                da_last_error(g_ctx));
}
END_TEST

/* ---- device mode (run as `test_ring device [host-ipc|host-mpi]`) -----------------------------
 * The same driver on device memory: the transport is host-ipc (the cuda-ipc protocol over the
 * host seam of devapi.h) or host-mpi (the mpi transport staging every message through pinned host
 * buffers, comm/staged.c), the tensors and every ring buffer are the seam's allocations, and the
 * CPU kernels read them directly (they are host-visible). main sets the seam's delays: every
 * copy between processes and every local copy or clear poisons its destination until it lands,
 * so a read that is not ordered after its write reads NaN. The delays: long enough to outlast a
 * step's compute at these sizes, short enough for the 2-core budget. */
#define DEV_LINK_DELAY_S 0.004
#define DEV_LOCAL_DELAY_S 0.002

/* Every layout x {none, causal, causal + window, causal + documents} x {fp32 MHA batch 2, bf16
 * GQA 4:1} on a length P does not divide, forward and backward, half of them on a stream of the
 * caller's. */
START_TEST(dev_matrix) {
  static const unsigned dmasks[4] = {DA_MASK_NONE, DA_MASK_CAUSAL, DA_MASK_CAUSAL | DA_MASK_WINDOW,
                                     DA_MASK_CAUSAL | DA_MASK_DOC};
  int fails = 0, cases = 0;
  for (int a = 0; a < 3; a++)
    for (int mi = 0; mi < 4; mi++)
      for (int v = 0; v < 2; v++) {
        tcase_t c = {.algo = (da_algo_t)a, .mask = dmasks[mi], .window = 9, .ndocs = 3, .S = 50 + g_size - 1,
                     .B = v == 0 ? 2 : 1, .H = 4, .G = v == 0 ? 4 : 1, .D = 16,
                     .dt = v == 1 ? DA_BFLOAT16 : DA_FLOAT32, .bwd = 1, .block = 8, .device = 1,
                     .caller_stream = (a + mi + v) % 2};
        cases++;
        fails += run_case(&c, 0) > 1;
      }
  ck_assert_msg(fails == 0, "%d of %d device cases failed (details on stderr)", fails, cases);
}
END_TEST

/* The plan's device memory is what da_ring_bwd_bytes says, counted by the seam's accounting, and
 * handed back when the plan is freed. On host-mpi, also its pinned staging: one mirror of each
 * registered buffer (two KV slots, three travelling dK/dV sums: 2 + 3 blocks of 2 * n_max * G * D
 * values), allocated once for the plan whatever the number of steps, freed with it. */
START_TEST(dev_memory) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 40 * g_size + 3, prob.heads = 4, prob.kv_heads = 2, prob.dim = 16, prob.mask = DA_MASK_CAUSAL;
  tcase_t c = {.device = 1};
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 60, cfg.transport = g_dev_transport;
  uint64_t cur0 = 0, cur1 = 0, cur2 = 0, peak = 0, pin0 = 0, pin1 = 0, pin2 = 0;
  da_dev_mem_stats(&cur0, NULL);
  da_dev_pinned_stats(&pin0, NULL);
  da_plan_t *plan = NULL;
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  const int64_t n = da_plan_local_rows(plan), H = 4, G = 2, D = 16;
  const size_t qb = (size_t)n * H * D * 4, kb = (size_t)n * G * D * 4;
  void *q = talloc(&c, qb), *k = talloc(&c, kb), *v = talloc(&c, kb), *o = talloc(&c, qb), *l = talloc(&c, n * H * 4);
  void *dq = talloc(&c, qb), *dk = talloc(&c, kb), *dv = talloc(&c, kb);
  uint64_t tensors = 0;
  da_dev_mem_stats(&tensors, NULL);
  tensors -= cur0;
  da_tensor_t tq, tk, tv, to, tl, tdq, tdk, tdv;
  const int64_t shq[3] = {n, H, D}, shk[3] = {n, G, D}, shl[2] = {n, H};
  da_tensor_make(&tq, q, DA_FLOAT32, 3, shq), da_tensor_make(&tk, k, DA_FLOAT32, 3, shk);
  da_tensor_make(&tv, v, DA_FLOAT32, 3, shk), da_tensor_make(&to, o, DA_FLOAT32, 3, shq);
  da_tensor_make(&tl, l, DA_FLOAT32, 2, shl), da_tensor_make(&tdq, dq, DA_FLOAT32, 3, shq);
  da_tensor_make(&tdk, dk, DA_FLOAT32, 3, shk), da_tensor_make(&tdv, dv, DA_FLOAT32, 3, shk);
  da_status_t rs = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL);
  if (rs) fprintf(stderr, "rank %d: %s\n", g_rank, da_last_error(g_ctx));
  ck_assert(tu_all_equal_status(rs, DA_SUCCESS));
  ck_assert(tu_all_equal_status(da_plan_bwd(plan, &tq, &tk, &tv, &to, &to, &tl, &tdq, &tdk, &tdv, NULL), DA_SUCCESS));
  da_dev_pinned_stats(&pin1, NULL);
  /* A second backward: the staging is reused, not grown. */
  ck_assert(tu_all_equal_status(da_plan_bwd(plan, &tq, &tk, &tv, &to, &to, &tl, &tdq, &tdk, &tdv, NULL), DA_SUCCESS));
  da_dev_pinned_stats(&pin2, NULL);
  ck_assert_msg(pin2 == pin1, "rank %d: pinned staging grew from %llu to %llu bytes on a second call", g_rank,
                (unsigned long long)pin1, (unsigned long long)pin2);
  int64_t nmax = n;
  MPI_Allreduce(MPI_IN_PLACE, &nmax, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  const uint64_t want_pin = !strcmp(g_dev_transport, "host-mpi") ? (uint64_t)(2 + 3) * 2 * nmax * G * D * 4 : 0;
  ck_assert_msg(pin1 - pin0 == want_pin, "rank %d: %s holds %llu pinned bytes, expected %llu", g_rank, g_dev_transport,
                (unsigned long long)(pin1 - pin0), (unsigned long long)want_pin);
  da_plan_stats_t st = DA_PLAN_STATS_INITIALIZER;
  ck_assert(da_plan_stats(plan, &st) == DA_SUCCESS);
  da_dev_mem_stats(&cur1, &peak);
  ck_assert_msg(cur1 - cur0 - tensors == st.mem_bwd_bytes, "rank %d: the plan holds %llu device bytes, its figure "
                "says %zu", g_rank, (unsigned long long)(cur1 - cur0 - tensors), st.mem_bwd_bytes);
  ck_assert(peak >= cur1);
  da_plan_free(plan);
  da_dev_mem_stats(&cur2, NULL);
  ck_assert_msg(cur2 == cur0 + tensors, "rank %d: %llu device bytes left after da_plan_free", g_rank,
                (unsigned long long)(cur2 - cur0 - tensors));
  da_dev_pinned_stats(&pin2, NULL);
  ck_assert_msg(pin2 == pin0, "rank %d: %llu pinned bytes left after da_plan_free", g_rank,
                (unsigned long long)(pin2 - pin0));
  tfree(&c, q), tfree(&c, k), tfree(&c, v), tfree(&c, o), tfree(&c, l), tfree(&c, dq), tfree(&c, dk), tfree(&c, dv);
}
END_TEST

/* Refusals, in words, on every rank: a device tensor whose heads are not adjacent; Ulysses on a
 * device transport. */
START_TEST(dev_refusals) {
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 16 * g_size, prob.heads = 4, prob.kv_heads = 4, prob.dim = 16;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 30, cfg.transport = g_dev_transport, cfg.algo = DA_ALGO_ULYSSES;
  da_plan_t *plan = NULL;
  da_status_t st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_UNSUPPORTED), "ulysses on %s: %s", g_dev_transport, da_last_error(g_ctx));
  ck_assert_msg(strstr(da_last_error(g_ctx), g_dev_transport) != NULL, "names the transport: %s", da_last_error(g_ctx));
  cfg.algo = DA_ALGO_RING;
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  tcase_t c = {.device = 1};
  const int64_t n = da_plan_local_rows(plan), H = 4, D = 16;
  char *q = talloc(&c, (size_t)n * H * (D + 8) * 4 + 4), *k = talloc(&c, (size_t)n * H * D * 4 + 4);
  char *o = talloc(&c, (size_t)n * H * D * 4 + 4);
  da_tensor_t tq, tk, to;
  const int64_t sh[3] = {n, H, D};
  da_tensor_make(&tq, q, DA_FLOAT32, 3, sh), da_tensor_make(&tk, k, DA_FLOAT32, 3, sh);
  da_tensor_make(&to, o, DA_FLOAT32, 3, sh);
  tq.strides[1] = D + 8, tq.strides[0] = H * (D + 8); /* heads D + 8 apart */
  st = da_plan_fwd(plan, &tq, &tk, &tk, &to, NULL, NULL);
  ck_assert_msg(st == DA_ERR_UNSUPPORTED || st == DA_ERR_REMOTE, "rank %d: strided device q: %s", g_rank,
                da_status_string(st));
  int local = st == DA_ERR_UNSUPPORTED, any = 0;
  MPI_Allreduce(&local, &any, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  ck_assert_msg(any, "every rank's own q is strided: each says so itself: %s", da_last_error(g_ctx));
  ck_assert_msg(strstr(da_last_error(g_ctx), "adjacent heads") != NULL, "%s", da_last_error(g_ctx));
  da_plan_free(plan);
  tfree(&c, q), tfree(&c, k), tfree(&c, o);
#ifdef DA_HAVE_CUDART
  /* The CPU kernels cannot read GPU memory: a CPU context with cuda-ipc is refused at plan time. */
  cfg.transport = "cuda-ipc";
  st = da_plan_create(g_comm, &prob, &cfg, &plan);
  ck_assert_msg(tu_all_equal_status(st, DA_ERR_UNSUPPORTED), "cuda-ipc with a CPU context: %s", da_last_error(g_ctx));
  ck_assert_msg(strstr(da_last_error(g_ctx), "DA_DEVICE_CUDA") != NULL, "%s", da_last_error(g_ctx));
  /* A CUDA context (where the CUDA table is built): accepted; its plans refuse a host transport,
   * and without a GPU every rank's plan fails naming CUDA, promptly. */
  da_config_t ccfg = DA_CONFIG_INITIALIZER;
  ccfg.device = DA_DEVICE_CUDA;
  da_context_t *cctx = NULL;
  da_comm_t *ccomm = NULL;
  if (da_context_create(&ccfg, &cctx) == DA_SUCCESS) {
    ck_assert(tu_all_equal_status(da_comm_create(cctx, MPI_COMM_WORLD, &ccomm), DA_SUCCESS));
    prob.dtype = DA_BFLOAT16, prob.dim = 64;
    cfg.transport = "host-mpi"; /* the host seam's memory is not what CUDA kernels read */
    st = da_plan_create(ccomm, &prob, &cfg, &plan);
    ck_assert_msg(tu_all_equal_status(st, DA_ERR_UNSUPPORTED), "CUDA context on host-mpi: %s", da_last_error(cctx));
    ck_assert_msg(strstr(da_last_error(cctx), "nccl, cuda-ipc, or mpi") != NULL, "%s", da_last_error(cctx));
    /* mpi in a CUDA context is cuda-mpi: the staged transport on the CUDA table (without a GPU
     * the context's backend fails before any transport, so the mapping is checked here). */
    ck_assert_str_eq(da_transport_resolve("mpi", 1), "cuda-mpi");
    ck_assert_str_eq(da_transport_resolve("mpi", 0), "mpi");
    ck_assert_str_eq(da_transport_resolve("nccl", 1), "nccl");
    const da_transport_t *cm = da_transport_find("cuda-mpi");
    ck_assert(cm && cm->devapi == &da_devapi_cuda && cm->register_mem && cm->allreduce_dev);
    /* The default, and mpi: on a machine with a GPU a plan; without one every rank's plan fails
     * naming CUDA, promptly. */
    const char *const names[2] = {NULL, "mpi"};
    for (int i = 0; i < 2; i++) {
      cfg.transport = names[i];
      const double t0 = MPI_Wtime();
      st = da_plan_create(ccomm, &prob, &cfg, &plan);
      if (st == DA_SUCCESS) da_plan_free(plan); /* a machine with a GPU */
      else if (g_rank == 0) fprintf(stderr, "CUDA context, no GPU, %s: %s\n", names[i] ? names[i] : "default", da_last_error(cctx));
      if (st != DA_SUCCESS) ck_assert_msg(strstr(da_last_error(cctx), "CUDA") != NULL, "no GPU: %s", da_last_error(cctx));
      ck_assert_msg(MPI_Wtime() - t0 < 20, "the CUDA plan's failure took %.1f s", MPI_Wtime() - t0);
    }
    da_comm_free(ccomm);
    da_context_free(cctx);
  }
#endif
}
END_TEST

/* Deadlines on a device transport: half the ranks run a forward, half a backward, so no message
 * matches; every rank must time out within its deadline naming the peer and the step (for
 * host-mpi also the stage that did not finish), and a new plan must work afterwards. */
START_TEST(dev_timeout) {
  if (g_size == 1) return;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.seq = 64, prob.heads = 2, prob.kv_heads = 1, prob.dim = 16;
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.timeout = 2, cfg.transport = g_dev_transport;
  da_plan_t *plan = NULL;
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  const int64_t n = da_plan_local_rows(plan);
  tcase_t c = {.device = 1};
  float *buf = talloc(&c, (size_t)(n + 1) * 32 * 8 * sizeof(float)), *lse = talloc(&c, (size_t)(n + 1) * 2 * sizeof(float));
  ck_assert(buf && lse);
  memset(buf, 0, (size_t)(n + 1) * 32 * 8 * sizeof(float));
  for (int64_t i = 0; i < (n + 1) * 2; i++) lse[i] = 1.0f;
  da_tensor_t q, k, o, l;
  const int64_t shq[3] = {n, 2, 16}, shk[3] = {n, 1, 16}, shl[2] = {n, 2};
  da_tensor_make(&q, buf, DA_FLOAT32, 3, shq), da_tensor_make(&k, buf + (n + 1) * 32, DA_FLOAT32, 3, shk);
  da_tensor_make(&o, buf + (n + 1) * 64, DA_FLOAT32, 3, shq), da_tensor_make(&l, lse, DA_FLOAT32, 2, shl);
  /* One backward on every rank first: device mode registers its buffers with the transport on
   * first use, collectively, and the mismatch below is meant to meet the exchanges. */
  ck_assert(tu_all_equal_status(da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL), DA_SUCCESS));
  ck_assert(tu_all_equal_status(da_plan_bwd(plan, &q, &k, &k, &o, &o, &l, &o, &k, &k, NULL), DA_SUCCESS));
  double t0 = MPI_Wtime();
  da_status_t st = g_rank % 2 ? da_plan_bwd(plan, &q, &k, &k, &o, &o, &l, &o, &k, &k, NULL)
                              : da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL);
  double dt = MPI_Wtime() - t0;
  const char *msg = da_last_error(g_ctx);
  int ok = st == DA_ERR_TIMEOUT && strstr(msg, " step ") && (strstr(msg, "from rank") || strstr(msg, "to rank")) &&
           (strcmp(g_dev_transport, "host-mpi") || strstr(msg, "no message arrived") || strstr(msg, "did not take it"));
  if (!ok || g_rank == 0) fprintf(stderr, "rank %d: %s: %s\n", g_rank, da_status_string(st), msg);
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  ck_assert_msg(all, "mixed fwd/bwd calls must time out on every rank naming the peer and step");
  ck_assert_msg(dt < 15, "timeout took %.1f s", dt);
  da_plan_free(plan);
  ck_assert(tu_all_equal_status(da_plan_create(g_comm, &prob, &cfg, &plan), DA_SUCCESS));
  ck_assert(tu_all_equal_status(da_plan_fwd(plan, &q, &k, &k, &o, &l, NULL), DA_SUCCESS));
  da_plan_free(plan);
  tfree(&c, buf), tfree(&c, lse);
}
END_TEST

/* Planted mistakes are caught: with one ordering step of the driver left out
 * (DISTATTN_TEST_RING_SKIP), the same case that passes in dev_matrix gives wrong rows. `sync`: the
 * host kernels no longer drain the stream first, so they read the packed block before the
 * delayed local copy landed. `dkv-wait`: the dK/dV running sum is folded before its transfer from
 * the previous rank was waited for (P > 1: the sums travel). */
START_TEST(dev_planted) {
  tcase_t c = {.algo = DA_ALGO_ZIGZAG, .mask = DA_MASK_CAUSAL, .S = 50 + g_size - 1, .B = 1, .H = 4, .G = 2,
               .D = 16, .dt = DA_FLOAT32, .bwd = 1, .block = 8, .device = 1};
  ck_assert_msg(run_case(&c, 1) <= 1, "the case passes without a planted mistake");
  /* Longer delays for the planted runs: a loaded machine may pause a rank for milliseconds
   * between a queued copy and the read it should have waited for, and the mistake must still show. */
  da_devapi_host_set_link_delay(0.05);
  da_devapi_host_set_local_delay(0.05);
  if (g_rank == 0) fprintf(stderr, "planted mistakes: the next cases must FAIL\n");
  setenv("DISTATTN_TEST_RING_SKIP", "sync", 1);
  double e = run_case(&c, 1);
  unsetenv("DISTATTN_TEST_RING_SKIP");
  ck_assert_msg(e > 1, "skipping the stream drain before host compute went unnoticed (err/tol %g)", e);
  if (g_size > 1) {
    setenv("DISTATTN_TEST_RING_SKIP", "dkv-wait", 1);
    e = run_case(&c, 1);
    unsetenv("DISTATTN_TEST_RING_SKIP");
    ck_assert_msg(e > 1, "folding the dK/dV sum before its transfer was waited for went unnoticed (err/tol %g)", e);
  }
  /* host-mpi: a send posted before the copy out of the device landed (d2h: it carries the
   * staging buffer's poison or stale bytes), a receive reported done before the copy into the
   * device landed (h2d: the kernels read poison). */
  static const char *const stage[2] = {"d2h", "h2d"};
  for (int i = 0; i < 2 && g_size > 1 && !strcmp(g_dev_transport, "host-mpi"); i++) {
    setenv("DISTATTN_TEST_STAGE_SKIP", stage[i], 1);
    e = run_case(&c, 1);
    unsetenv("DISTATTN_TEST_STAGE_SKIP");
    ck_assert_msg(e > 1, "DISTATTN_TEST_STAGE_SKIP=%s: the missing wait on the %s copy went unnoticed (err/tol %g)",
                  stage[i], stage[i], e);
  }
  da_devapi_host_set_link_delay(DEV_LINK_DELAY_S);
  da_devapi_host_set_local_delay(DEV_LOCAL_DELAY_S);
}
END_TEST

/* tests/test_ulysses.c includes this file for its case runner and helpers, with its own main. */
#ifndef DA_TEST_RING_HELPERS_ONLY
int main(int argc, char **argv) {
  tu_mpi_setup(&argc, &argv, &g_rank, &g_size, &g_ctx, &g_comm);
  /* `test_ring device`: the device-mode suite; the seam's delays make unordered reads visible. */
  const int device = argc > 1 && !strcmp(argv[1], "device");
  if (device && argc > 2) g_dev_transport = argv[2];
  if (device) {
    da_devapi_host_set_link_delay(DEV_LINK_DELAY_S);
    da_devapi_host_set_local_delay(DEV_LOCAL_DELAY_S);
  }
  const tu_test_t host_tests[] = {
      {"bad_args", bad_args}, {"mismatch", mismatch}, {"timeout", timeout}, {"plan_figures", plan_figures},
      {"link_hook", link_hook}, {"edges", edges}, {"matrix_small", matrix_small}, {"matrix_uneven", matrix_uneven}};
  const tu_test_t dev_tests[] = {
      {"dev_refusals", dev_refusals}, {"dev_memory", dev_memory}, {"dev_planted", dev_planted},
      {"dev_timeout", dev_timeout},   {"dev_matrix", dev_matrix}};
  Suite *s = device ? tu_mpi_suite("ring-device", "correctness", dev_tests, sizeof dev_tests / sizeof dev_tests[0])
                    : tu_mpi_suite("ring", "correctness", host_tests, sizeof host_tests / sizeof host_tests[0]);
  return tu_mpi_finish(s, g_rank, g_ctx, g_comm);
}
#endif
