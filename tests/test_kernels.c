/* test_kernels.c: Check suite of a backend table (the CPU's, da_kernels_get(DA_DEVICE_CPU), unless a
 * backend hook is compiled in: see "backend hook" below) against
 * the float64 reference, through the block contract only (fwd_block + fwd_finish, merge,
 * bwd_prep + bwd_block, decode): the internal units of the running state (m, l) are never read.
 * Shapes that are multiples of nothing, every mask, GQA 1/4/8, every dtype (the reference sees
 * the same rounded inputs), head dims 16..256 and odd ones; results independent of tile sizes,
 * thread counts and of how the keys are split into blocks. Outputs are poisoned with NaN before
 * every call, and so is the padding of every input row, so a kernel that forgets to write or
 * reads past a row fails. Fork mode. Seeds: every failure prints its seed; set
 * DISTATTN_TEST_SEED to try other inputs. Speed is not measured here (bench/). */
#define _GNU_SOURCE
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "kernels.h"
#include "ref.h"
#include "test_util.h"

/* ---- backend hook ---------------------------------------------------------------------------
 * The same cases run on another backend table when DA_TEST_KERNELS_HOOK names a header that
 * defines (tests/kernels_hook_simt.h: the CUDA kernels on the SIMT runner; kernels_hook_gpu.h: on
 * a GPU):
 *   TB_NAME, tb_kernels()   the table under test
 *   tb_alloc(n), tb_free(p) memory the table's kernels can use (tb_free also takes malloc'd memory)
 *   tb_sync()               wait for the kernels queued so far (a status)
 *   tb_init()               0, or the exit code when the backend cannot run here (77: skipped)
 *   TB_DTYPES, TB_DS        the dtypes and head dims the sweeps draw from (the backend's own)
 *   TB_SWEEP_SCALE          factor on the sweeps' size budgets (an emulator is slower)
 *   TB_SELF_1000_FROM, _TO  the loop range of the self-attention cases of 1000 tokens
 *   TB_N_BLOCK_SIZES, TB_N_THREADS, TB_N_MASKED_ROWS, TB_N_NAN  loop counts
 *                           (a backend that ignores block_q / block_k / nthreads needs fewer; an
 *                           emulator runs fewer dtypes there)
 *   TB_BLOCK_SPLITS_FROM, _TO, TB_SPLIT_S_LO, _HI  loop range and sequence lengths of the
 *                           block-split cases
 * Without it the CPU backend runs, with exactly the cases and assertions it always had. */
#ifdef DA_TEST_KERNELS_HOOK
#include DA_TEST_KERNELS_HOOK
#else
#define TB_NAME "cpu"
#define TB_CPU 1
static const da_kernels_t *tb_kernels(void) { return da_kernels_get(DA_DEVICE_CPU); }
static void *tb_alloc(size_t n) { return tu_xmalloc(n); }
static void tb_free(void *p) { free(p); }
static da_status_t tb_sync(void) { return DA_SUCCESS; }
static int tb_init(void) { return 0; }
#define TB_DTYPES {DA_FLOAT32, DA_BFLOAT16, DA_FLOAT16}
#define TB_DS {16, 64, 128, 256, 80, 72}
#define TB_SWEEP_SCALE 1.0
#define TB_SELF_1000_FROM 0
#define TB_SELF_1000_TO (2 * TU_NMASKS)
#define TB_N_BLOCK_SIZES 4
#define TB_N_THREADS 3
#define TB_BLOCK_SPLITS_FROM 0
#define TB_BLOCK_SPLITS_TO (2 * TU_NMASKS)
#define TB_N_MASKED_ROWS 3
#define TB_N_NAN 12
#define TB_SPLIT_S_LO 150
#define TB_SPLIT_S_HI 420
#endif

static const int ratios[3] = {1, 4, 8};
static const int Ds[6] = TB_DS;
static const da_dtype_t dtypes[3] = TB_DTYPES;

/* lse is fp32 whatever the storage dtype; its error is relative to 1 + |lse| (test_util.h).
 * With 16-bit inputs a kernel may round probabilities to the storage type before P.V (not the
 * row sums), so the budget follows the dtype loosely. */
static double lse_tol(da_dtype_t dt) { return dt == DA_FLOAT32 ? 2e-5 : 2e-3; }

/* The CPU table while a hooked build compares its backend with it (cross_check_cpu). */
static const da_kernels_t *tb_override;

static const da_kernels_t *backend(void) {
  const da_kernels_t *kt = tb_override ? tb_override : tb_kernels();
  ck_assert_msg(kt != NULL, "no %s backend: %s", TB_NAME, da_error_message());
  return kt;
}

static size_t esize(da_dtype_t dt) { return dt == DA_FLOAT32 ? 4 : 2; }
static double *dalloc(int64_t n) { return tu_xmalloc((size_t)(n > 0 ? n : 1) * sizeof(double)); }
static float *falloc(int64_t n) { /* kernel-visible */
  float *p = tb_alloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  ck_assert_msg(p != NULL, "out of memory (%lld floats)", (long long)n);
  return p;
}
static void fpoison(float *x, int64_t n) { tu_poison(x, DA_FLOAT32, n); }

/* A kernel call that must succeed; the results are waited for (tb_sync) before the host reads. */
#define KOK(call, c)                                                                                  \
  do {                                                                                                \
    da_status_t st_ = (call);                                                                         \
    if (st_ == DA_SUCCESS) st_ = tb_sync();                                                           \
    ck_assert_msg(st_ == DA_SUCCESS, "%s: %s returned %s: %s", (c)->desc, #call, da_status_string(st_), \
                  da_error_message());                                                                \
  } while (0)

/* ---- a kernel problem: spans, seeded inputs in storage dtype with padded rows, reference ------ */

typedef struct {
  da_kparams_t p;
  da_span_t qs, ks;
  int64_t S;
  int64_t ldq, ldk, ldv, lddo, ldo; /* row strides in elements (>= heads * D) */
  void *q, *k, *v, *dout;           /* storage dtype, poisoned padding */
  double *rq, *rk, *rv, *rdo;       /* the same rounded values, packed */
  double *ro, *rl;                  /* reference forward (kc_ref_fwd) */
  int64_t cu[16];
  uint64_t seed;
  char desc[400];
} kc_t;

static void kc_describe(kc_t *c) {
  char m[128];
  snprintf(c->desc, sizeof c->desc,
           "seed %llu (DISTATTN_TEST_SEED %s) %s H %d G %d D %d mask %s q %lld+%lld*i (n %lld) k %lld+%lld*j (n %lld) "
           "bq %d bk %d thr %d",
           (unsigned long long)c->seed, getenv("DISTATTN_TEST_SEED") ? getenv("DISTATTN_TEST_SEED") : "unset",
           tu_dtype_name(c->p.dtype), c->p.H,
           c->p.G, c->p.D, da_mask_describe(&c->p.mask, m, sizeof m), (long long)c->qs.start, (long long)c->qs.stride,
           (long long)c->qs.count, (long long)c->ks.start, (long long)c->ks.stride, (long long)c->ks.count, c->p.block_q,
           c->p.block_k, c->p.nthreads);
}

static void *alloc_rows(int64_t n, int64_t ld, da_dtype_t dt) {
  void *b = tb_alloc((size_t)(n * ld) * esize(dt) + 64);
  ck_assert_msg(b != NULL, "out of memory (%lld rows)", (long long)n);
  tu_poison(b, dt, n * ld);
  return b;
}

/* Inputs seeded by global position (tu_fill), q with a larger amplitude so scores spread over a
 * few units: q/k/v values uniform in [-3, 3) / [-1, 1) / [-1, 1). seed enters every tensor. */
static void kc_init(kc_t *c, int H, int G, int D, da_dtype_t dt, da_span_t qs, da_span_t ks, int64_t S, int mkind,
                    uint64_t *rs, uint64_t seed) {
  memset(c, 0, sizeof *c);
  c->p.H = H, c->p.G = G, c->p.D = D;
  c->p.scale = (float)(1.0 / sqrt((double)D));
  c->p.dtype = dt;
  c->p.mask = tu_mask(mkind, S, rs, c->cu, 6);
  c->qs = qs, c->ks = ks, c->S = S;
  c->ldq = (int64_t)H * D + tu_rand(rs, 0, 9);
  c->lddo = (int64_t)H * D + tu_rand(rs, 0, 9);
  c->ldo = (int64_t)H * D + tu_rand(rs, 0, 9);
  c->ldk = (int64_t)G * D + tu_rand(rs, 0, 9);
  c->ldv = (int64_t)G * D + tu_rand(rs, 0, 9);
  c->q = alloc_rows(qs.count, c->ldq, dt);
  c->dout = alloc_rows(qs.count, c->lddo, dt);
  c->k = alloc_rows(ks.count, c->ldk, dt);
  c->v = alloc_rows(ks.count, c->ldv, dt);
  c->rq = dalloc(qs.count * H * D);
  c->rdo = dalloc(qs.count * H * D);
  c->rk = dalloc(ks.count * G * D);
  c->rv = dalloc(ks.count * G * D);
  tu_fill(seed, DA_RNG_Q, qs, H, D, dt, c->q, c->ldq, c->rq, 3.0f);
  tu_fill(seed, DA_RNG_DOUT, qs, H, D, dt, c->dout, c->lddo, c->rdo, 1.0f);
  tu_fill(seed, DA_RNG_K, ks, G, D, dt, c->k, c->ldk, c->rk, 1.0f);
  tu_fill(seed, DA_RNG_V, ks, G, D, dt, c->v, c->ldv, c->rv, 1.0f);
  c->seed = seed;
  kc_describe(c);
}

static void kc_free(kc_t *c) {
  tb_free(c->q), tb_free(c->k), tb_free(c->v), tb_free(c->dout);
  tb_free(c->rq), tb_free(c->rk), tb_free(c->rv), tb_free(c->rdo), tb_free(c->ro), tb_free(c->rl);
}

static void kc_ref_fwd(kc_t *c) {
  if (c->ro) return;
  c->ro = dalloc(c->qs.count * c->p.H * c->p.D);
  c->rl = dalloc(c->qs.count * c->p.H);
  ck_assert_int_eq(da_ref_fwd(&c->p, c->rq, c->qs, c->rk, c->rv, c->ks, c->ro, c->rl), DA_SUCCESS);
}

/* ---- block splits ------------------------------------------------------------------------- */

/* Local rows start + i * stride, i < count, of a tensor whose rows sit at positions span. */
typedef struct { int64_t start, stride, count; } piece_t;

static da_span_t piece_span(da_span_t s, piece_t pc) {
  return da_span(s.start + pc.start * s.stride, s.stride * pc.stride, pc.count);
}

static void shuffle(piece_t *pc, int n, uint64_t *rs) {
  for (int i = n - 1; i > 0; i--) {
    int j = (int)tu_rand(rs, 0, i);
    piece_t t = pc[i];
    pc[i] = pc[j];
    pc[j] = t;
  }
}

enum { SPLIT_WHOLE, SPLIT_CHUNKS, SPLIT_STRIPED };
/* n rows split as one piece, random contiguous chunks, or the stride-P interleave of a striped
 * layout (2 <= P <= 5); pieces shuffled (order must not matter). Returns the count. */
static int split(int64_t n, int mode, uint64_t *rs, piece_t *pc, int maxp) {
  int np = 0;
  if (mode == SPLIT_WHOLE || n == 1) {
    pc[np++] = (piece_t){0, 1, n};
  } else if (mode == SPLIT_CHUNKS) {
    for (int64_t j = 0; j < n;) {
      int64_t c = np == maxp - 1 ? n - j : tu_rand(rs, 1, (n - j + 1) / 2 > 1 ? (n - j + 1) / 2 : 1);
      pc[np++] = (piece_t){j, 1, c};
      j += c;
    }
  } else {
    int64_t P = tu_rand(rs, 2, 5);
    for (int64_t r = 0; r < P && r < n; r++) pc[np++] = (piece_t){r, P, (n - r + P - 1) / P};
  }
  shuffle(pc, np, rs);
  return np;
}

/* ---- runners: the kernel through the contract, results as packed double ------------------- */

/* Forward of q pieces x k pieces: one fp32 state per q piece, every k piece folded into it (in
 * the order given), finished into the poisoned output in storage dtype (row stride ldo times the
 * piece stride: a strided piece writes its rows in place). */
static void run_fwd(const kc_t *c, const da_kparams_t *p, const piece_t *qp, int nqp, const piece_t *kp, int nkp,
                    double *out, double *lse) {
  const da_kernels_t *kt = backend();
  const int H = p->H, D = p->D;
  const da_dtype_t dt = p->dtype;
  const size_t es = esize(dt);
  const int64_t nq = c->qs.count;
  void *ob = alloc_rows(nq, c->ldo, dt);
  float *lsef = falloc(nq * H);
  fpoison(lsef, nq * H);
  for (int a = 0; a < nqp; a++) {
    const int64_t n = qp[a].count;
    float *o = falloc(n * H * D), *m = falloc(n * H), *l = falloc(n * H), *lp = falloc(n * H);
    fpoison(o, n * H * D), fpoison(m, n * H), fpoison(l, n * H), fpoison(lp, n * H);
    da_fwd_state_t st = {o, m, l, n};
    KOK(da_fwd_state_init(kt, p, &st, NULL), c);
    const char *qb = (const char *)c->q + (size_t)(qp[a].start * c->ldq) * es;
    for (int b = 0; b < nkp; b++) {
      const char *kb = (const char *)c->k + (size_t)(kp[b].start * c->ldk) * es;
      const char *vb = (const char *)c->v + (size_t)(kp[b].start * c->ldv) * es;
      KOK(kt->fwd_block(p, qb, c->ldq * qp[a].stride, piece_span(c->qs, qp[a]), kb, c->ldk * kp[b].stride, vb,
                        c->ldv * kp[b].stride, piece_span(c->ks, kp[b]), &st, NULL),
          c);
    }
    KOK(kt->fwd_finish(p, &st, (char *)ob + (size_t)(qp[a].start * c->ldo) * es, dt, c->ldo * qp[a].stride, lp, NULL),
        c);
    for (int64_t i = 0; i < n; i++)
      for (int h = 0; h < H; h++) lsef[(qp[a].start + i * qp[a].stride) * H + h] = lp[i * H + h];
    tb_free(o), tb_free(m), tb_free(l), tb_free(lp);
  }
  tu_load(ob, dt, nq, H, D, c->ldo, out);
  for (int64_t i = 0; i < nq * H; i++) lse[i] = lsef[i];
  tb_free(ob), tb_free(lsef);
}

static void run_fwd_whole(const kc_t *c, const da_kparams_t *p, double *out, double *lse) {
  piece_t w1 = {0, 1, c->qs.count}, w2 = {0, 1, c->ks.count};
  run_fwd(c, p, &w1, 1, &w2, 1, out, lse);
}

/* Backward of q pieces x k pieces, pairs in shuffled order: the inputs out (the reference's,
 * stored in the storage dtype, as a correct forward leaves it) and lse (the reference's, fp32);
 * delta from bwd_prep (checked against float64 on the same stored values); each q piece
 * accumulates its own packed dq and each k piece its own packed dk, dv over all pairs (+=,
 * starting from 0), scattered back at the end. */
static void run_bwd(kc_t *c, const da_kparams_t *p, const piece_t *qp, int nqp, const piece_t *kp, int nkp,
                    uint64_t *rs, double *dq, double *dk, double *dv) {
  const da_kernels_t *kt = backend();
  const int H = p->H, G = p->G, D = p->D;
  const da_dtype_t dt = p->dtype;
  const size_t es = esize(dt);
  const int64_t nq = c->qs.count, nk = c->ks.count;
  kc_ref_fwd(c);
  void *ob = alloc_rows(nq, c->ldo, dt);
  for (int64_t i = 0; i < nq; i++)
    for (int64_t e = 0; e < (int64_t)H * D; e++) da_store_f32(ob, (int)dt, i * c->ldo + e, (float)c->ro[i * H * D + e]);
  float *lse = falloc(nq * H), *delta = falloc(nq * H);
  for (int64_t i = 0; i < nq * H; i++) lse[i] = (float)c->rl[i];
  fpoison(delta, nq * H);
  KOK(kt->bwd_prep(p, nq, ob, c->ldo, c->dout, c->lddo, delta, NULL), c);
  for (int64_t r = 0; r < nq * H; r++) { /* delta = dout . out on the stored values */
    double x = 0, mag = 0;
    for (int d = 0; d < D; d++) {
      double o = da_load_f32(ob, (int)dt, (r / H) * c->ldo + (r % H) * D + d);
      x += c->rdo[r * D + d] * o;
      mag += fabs(c->rdo[r * D + d] * o);
    }
    ck_assert_msg(fabs(delta[r] - x) <= 1e-5 * mag + 1e-30, "%s: delta[%lld][%lld] = %.9g, expected %.9g", c->desc,
                  (long long)(r / H), (long long)(r % H), (double)delta[r], x);
  }
  float **aq = tu_xmalloc(sizeof(float *) * (size_t)nqp), **ak = tu_xmalloc(sizeof(float *) * (size_t)nkp);
  float **av = tu_xmalloc(sizeof(float *) * (size_t)nkp), **al = tu_xmalloc(sizeof(float *) * (size_t)nqp);
  float **ad = tu_xmalloc(sizeof(float *) * (size_t)nqp);
  for (int a = 0; a < nqp; a++) {
    const int64_t n = qp[a].count;
    aq[a] = falloc(n * H * D), al[a] = falloc(n * H), ad[a] = falloc(n * H);
    memset(aq[a], 0, (size_t)(n * H * D) * 4);
    for (int64_t i = 0; i < n; i++)
      for (int h = 0; h < H; h++) {
        al[a][i * H + h] = lse[(qp[a].start + i * qp[a].stride) * H + h];
        ad[a][i * H + h] = delta[(qp[a].start + i * qp[a].stride) * H + h];
      }
  }
  for (int b = 0; b < nkp; b++) {
    ak[b] = falloc(kp[b].count * G * D), av[b] = falloc(kp[b].count * G * D);
    memset(ak[b], 0, (size_t)(kp[b].count * G * D) * 4);
    memset(av[b], 0, (size_t)(kp[b].count * G * D) * 4);
  }
  int npairs = nqp * nkp;
  int *order = tu_xmalloc(sizeof(int) * (size_t)npairs);
  for (int i = 0; i < npairs; i++) order[i] = i;
  for (int i = npairs - 1; i > 0; i--) {
    int j = (int)tu_rand(rs, 0, i), t = order[i];
    order[i] = order[j], order[j] = t;
  }
  for (int x = 0; x < npairs; x++) {
    const int a = order[x] / nkp, b = order[x] % nkp;
    const char *qb = (const char *)c->q + (size_t)(qp[a].start * c->ldq) * es;
    const char *dob = (const char *)c->dout + (size_t)(qp[a].start * c->lddo) * es;
    const char *kb = (const char *)c->k + (size_t)(kp[b].start * c->ldk) * es;
    const char *vb = (const char *)c->v + (size_t)(kp[b].start * c->ldv) * es;
    KOK(kt->bwd_block(p, qb, c->ldq * qp[a].stride, dob, c->lddo * qp[a].stride, al[a], ad[a], piece_span(c->qs, qp[a]),
                      kb, c->ldk * kp[b].stride, vb, c->ldv * kp[b].stride, piece_span(c->ks, kp[b]), aq[a], ak[b],
                      av[b], NULL),
        c);
  }
  for (int a = 0; a < nqp; a++) {
    for (int64_t i = 0; i < qp[a].count; i++)
      for (int64_t e = 0; e < (int64_t)H * D; e++) dq[(qp[a].start + i * qp[a].stride) * H * D + e] = aq[a][i * H * D + e];
    tb_free(aq[a]), tb_free(al[a]), tb_free(ad[a]);
  }
  for (int b = 0; b < nkp; b++) {
    for (int64_t i = 0; i < kp[b].count; i++)
      for (int64_t e = 0; e < (int64_t)G * D; e++) {
        dk[(kp[b].start + i * kp[b].stride) * G * D + e] = ak[b][i * G * D + e];
        dv[(kp[b].start + i * kp[b].stride) * G * D + e] = av[b][i * G * D + e];
      }
    tb_free(ak[b]), tb_free(av[b]);
  }
  (void)nk;
  tb_free(aq), tb_free(ak), tb_free(av), tb_free(al), tb_free(ad), tb_free(order), tb_free(ob), tb_free(lse), tb_free(delta);
}

/* Reference gradients (float64 on the rounded inputs). */
static void ref_bwd(const kc_t *c, double **dq, double **dk, double **dv) {
  const int64_t nq = c->qs.count, nk = c->ks.count;
  *dq = dalloc(nq * c->p.H * c->p.D), *dk = dalloc(nk * c->p.G * c->p.D), *dv = dalloc(nk * c->p.G * c->p.D);
  ck_assert_int_eq(da_ref_bwd(&c->p, c->rq, c->qs, c->rk, c->rv, c->ks, c->rdo, *dq, *dk, *dv), DA_SUCCESS);
}

/* Decode of the queries against the keys given as pages: mode SPLIT_CHUNKS copies contiguous
 * pages into their own buffers with their own padded row strides; SPLIT_STRIPED reads the
 * stride-P pages of a striped shard in place (row stride P * ldk). Pages in shuffled order. */
static void run_decode(const kc_t *c, const da_kparams_t *p, int mode, uint64_t *rs, double *out, double *lse) {
  const da_kernels_t *kt = backend();
  const int H = p->H, G = p->G, D = p->D;
  const da_dtype_t dt = p->dtype;
  const size_t es = esize(dt);
  const int64_t T = c->qs.count;
  piece_t pc[16];
  int np = split(c->ks.count, mode, rs, pc, 6);
  da_kvpage_t pages[16];
  void *bufs[32] = {0};
  for (int i = 0; i < np; i++) {
    if (mode == SPLIT_STRIPED || np == 1) {
      pages[i].k = (const char *)c->k + (size_t)(pc[i].start * c->ldk) * es;
      pages[i].v = (const char *)c->v + (size_t)(pc[i].start * c->ldv) * es;
      pages[i].ldk = c->ldk * pc[i].stride;
      pages[i].ldv = c->ldv * pc[i].stride;
    } else {
      int64_t ldk = (int64_t)G * D + tu_rand(rs, 0, 7), ldv = (int64_t)G * D + tu_rand(rs, 0, 7);
      char *kb = alloc_rows(pc[i].count, ldk, dt), *vb = alloc_rows(pc[i].count, ldv, dt);
      for (int64_t j = 0; j < pc[i].count; j++) {
        memcpy(kb + (size_t)(j * ldk) * es, (const char *)c->k + (size_t)((pc[i].start + j) * c->ldk) * es, (size_t)(G * D) * es);
        memcpy(vb + (size_t)(j * ldv) * es, (const char *)c->v + (size_t)((pc[i].start + j) * c->ldv) * es, (size_t)(G * D) * es);
      }
      bufs[2 * i] = kb, bufs[2 * i + 1] = vb;
      pages[i].k = kb, pages[i].v = vb, pages[i].ldk = ldk, pages[i].ldv = ldv;
    }
    pages[i].pos = piece_span(c->ks, pc[i]);
  }
  float *o = falloc(T * H * D), *l = falloc(T * H);
  fpoison(o, T * H * D), fpoison(l, T * H);
  KOK(kt->decode(p, c->q, c->ldq, c->qs, pages, np, o, l, NULL), c);
  for (int64_t i = 0; i < T * H * D; i++) out[i] = o[i];
  for (int64_t i = 0; i < T * H; i++) lse[i] = l[i];
  for (int i = 0; i < 32; i++) tb_free(bufs[i]);
  tb_free(o), tb_free(l);
}

#define CHECK_FWD(c, out, lse, tol_out, what)                                                                      \
  do {                                                                                                             \
    char cw_[480];                                                                                                  \
    snprintf(cw_, sizeof cw_, "%s [%s]", (c)->desc, (what));                                                         \
    TU_CHECK_CLOSE("out", (c)->ro, (out), (c)->qs.count * (c)->p.H * (c)->p.D, (c)->p.H, (c)->p.D, (c)->p.D,       \
                   (tol_out), cw_);                                                                               \
    TU_CHECK_LSE("lse", (c)->rl, (lse), (c)->qs.count * (c)->p.H, (c)->p.H, lse_tol((c)->p.dtype), cw_);          \
  } while (0)


/* Gradients per tensor; dq and dk with the scale floored at the size of one term scale * delta *
 * |k| (resp. |q|): where every row sees a single key they vanish in exact arithmetic
 * (dS = P (dP - delta) = 0) and only the rounding of the cancelling terms is left. */
static void check_bwd(const kc_t *c, const double *eq, const double *ek, const double *ev, const double *dq,
                      const double *dk, const double *dv, const char *what) {
  char w[480];
  snprintf(w, sizeof w, "%s [%s]", c->desc, what);
  const int H = c->p.H, G = c->p.G, D = c->p.D;
  const int64_t nq = c->qs.count, nk = c->ks.count;
  const double tol = tu_tol(c->p.dtype);
  double dmax = 0, qmax = 0, kmax = 0;
  for (int64_t r = 0; r < nq * H; r++) {
    double x = 0;
    for (int d = 0; d < D; d++) x += c->rdo[r * D + d] * c->ro[r * D + d];
    if (fabs(x) > dmax) dmax = fabs(x);
  }
  for (int64_t i = 0; i < nq * H * D; i++)
    if (fabs(c->rq[i]) > qmax) qmax = fabs(c->rq[i]);
  for (int64_t i = 0; i < nk * G * D; i++)
    if (fabs(c->rk[i]) > kmax) kmax = fabs(c->rk[i]);
  TU_CHECK_CLOSE_FLOOR("dq", eq, dq, nq * H * D, H, D, nq * H * D, c->p.scale * dmax * kmax, tol, w);
  TU_CHECK_CLOSE_FLOOR("dk", ek, dk, nk * G * D, G, D, nk * G * D, c->p.scale * dmax * qmax, tol, w);
  TU_CHECK_CLOSE_FLOOR("dv", ev, dv, nk * G * D, G, D, nk * G * D, 0.0, tol, w);
}

/* Two kernel results agree to rounding (same tolerance as against the reference). */
static void check_same(const kc_t *c, const double *a, const double *b, int64_t n, int64_t row_len, const char *what) {
  int64_t w;
  double e = tu_err(a, b, n, row_len, &w);
  ck_assert_msg(e <= tu_tol(c->p.dtype), "%s: %s differ by %.3g at %lld: %.9g vs %.9g", c->desc, what, e, (long long)w,
                b[w], a[w]);
}

/* Is this head dim run by the backend? Unsupported must say so with DA_ERR_UNSUPPORTED. */
static int supported(const da_kparams_t *p) {
  da_status_t st = backend()->supports(p);
  ck_assert_msg(st == DA_SUCCESS || st == DA_ERR_UNSUPPORTED, "supports(D %d) returned %s: %s", p->D,
                da_status_string(st), da_error_message());
  if (st != DA_SUCCESS) printf("# %s: D = %d %s not supported: %s\n", TB_NAME, p->D, tu_dtype_name(p->dtype), da_error_message());
  return st == DA_SUCCESS;
}

/* ---- capability query ------------------------------------------------------------------------- */

START_TEST(test_supports) {
  const da_kernels_t *kt = backend();
  ck_assert_ptr_nonnull(kt->supports);
  ck_assert_ptr_nonnull(kt->fwd_block);
  ck_assert_ptr_nonnull(kt->fwd_finish);
  ck_assert_ptr_nonnull(kt->merge);
  ck_assert_ptr_nonnull(kt->bwd_prep);
  ck_assert_ptr_nonnull(kt->bwd_block);
  ck_assert_ptr_nonnull(kt->decode);
  ck_assert_ptr_nonnull(kt->name);
  da_kparams_t p = {.H = 8, .G = 2, .D = 64, .scale = 0.125f, .dtype = DA_FLOAT32};
#ifdef TB_CPU
  /* the head dims the README promises (16..256; the 64/128 fast paths) in every dtype */
  static const int must[] = {16, 32, 64, 128, 256};
#else
  /* the CUDA kernels: head dims 64 and 128 in bf16 and fp16; fp32 storage refused, saying so */
  static const int must[] = {64, 128};
  p.dtype = DA_FLOAT32;
  da_error_clear();
  ck_assert_int_eq(kt->supports(&p), DA_ERR_UNSUPPORTED);
  ck_assert_msg(strstr(da_error_message(), "fp32") != NULL, "fp32 refused without saying so: %s", da_error_message());
#endif
  for (int t = 0; t < 3; t++)
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++) {
      p.dtype = dtypes[t], p.D = must[i];
      da_error_clear();
      da_status_t st = kt->supports(&p);
      ck_assert_msg(st == DA_SUCCESS, "D %d %s: %s (%s)", p.D, tu_dtype_name(p.dtype), da_status_string(st),
                    da_error_message());
    }
  /* every head dim: supported or DA_ERR_UNSUPPORTED with a message, never anything else */
  char list[2048] = "";
  size_t off = 0;
  int run0 = 0; /* first D of the current run of supported dims, 0 = none */
  for (int D = 1; D <= 1101; D += D < 300 ? 1 : 100) {
    p.dtype = DA_BFLOAT16, p.D = D;
    da_error_clear();
    da_status_t st = kt->supports(&p);
    ck_assert_msg(st == DA_SUCCESS || st == DA_ERR_UNSUPPORTED, "D %d: %s", D, da_status_string(st));
    if (st == DA_ERR_UNSUPPORTED) ck_assert_msg(da_error_message()[0] != '\0', "D %d unsupported without a message", D);
    if (st == DA_SUCCESS && !run0) run0 = D;
    if (st != DA_SUCCESS && run0 && off < sizeof list - 32) {
      off += (size_t)snprintf(list + off, sizeof list - off, " %d..%d", run0, D - 1);
      run0 = 0;
    }
  }
  p.D = 1000;
  ck_assert_int_eq(kt->supports(&p), DA_ERR_UNSUPPORTED);
  ck_assert_msg(strstr(da_error_message(), "1000") != NULL, "message does not name the dim: %s", da_error_message());
  printf("# %s backend %s supports D:%s\n", TB_NAME, kt->name, list);
  /* malformed parameters are invalid arguments, not unsupported */
  struct { da_kparams_t p; const char *needle; } bad[] = {
      {{.H = 6, .G = 4, .D = 64, .scale = 0.1f}, "multiple"},
      {{.H = 4, .G = 0, .D = 64, .scale = 0.1f}, "kv_heads"},
      {{.H = 4, .G = 4, .D = 0, .scale = 0.1f}, "dim"},
      {{.H = 4, .G = 4, .D = -3, .scale = 0.1f}, "dim"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.0f}, "scale"},
      {{.H = 4, .G = 4, .D = 64, .scale = NAN}, "scale"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.1f, .dtype = (da_dtype_t)7}, "dtype"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.1f, .block_q = -1}, "block"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.1f, .nthreads = -2}, "nthreads"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.1f, .mask = {DA_MASK_WINDOW, 0, 0, NULL}}, "window"},
      {{.H = 4, .G = 4, .D = 64, .scale = 0.1f, .mask = {DA_MASK_DOC, 0, 0, NULL}}, "doc"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    da_error_clear();
    da_status_t st = kt->supports(&bad[i].p);
    ck_assert_msg(st == DA_ERR_INVALID_ARGUMENT, "bad params %zu: %s", i, da_status_string(st));
    ck_assert_msg(strstr(da_error_message(), bad[i].needle) != NULL, "bad params %zu: message '%s' lacks '%s'", i,
                  da_error_message(), bad[i].needle);
  }
}
END_TEST

/* ---- forward / backward sweeps ---------------------------------------------------------------- */

/* The sweep: loop index i -> dtype i % 3, mask (i / 3) % 6, GQA ratio (i / 18) % 3 (every
 * (dtype, mask, ratio) triple once), head dim (i / 3 + i / 18) % 6 of {16, 64, 128, 256, 80, 72}
 * (every (dtype, D) pair), query/key counts from {1, 7, 129, 1000} (capped so the float64
 * reference stays within the time budget), blocks at random offsets of a longer sequence. */
typedef struct { int H, G, D; da_dtype_t dt; int mkind; int64_t nq, nk, S; da_span_t qs, ks; } sweep_t;

static sweep_t sweep_case(int i, uint64_t *rs, double budget) {
  static const int64_t sizes[4] = {1, 7, 129, 1000};
  sweep_t s;
  s.dt = dtypes[i % 3];
  s.mkind = (i / 3) % TU_NMASKS;
  const int ratio = ratios[(i / 18) % 3];
  s.D = Ds[(i / 3 + i / 18) % 6];
  s.G = ratio == 8 ? 1 : (int)tu_rand(rs, 1, 2);
  if (ratio == 1) s.G *= 2;
  s.H = s.G * ratio;
  s.nq = sizes[i % 4];
  s.nk = sizes[(i / 4 + i) % 4];
  while ((double)s.nq * (double)s.nk * s.H * s.D > budget) {
    if (s.nq >= s.nk) s.nq = s.nq > 129 ? 129 : 7;
    else s.nk = s.nk > 129 ? 129 : 7;
  }
  s.S = (s.nq > s.nk ? s.nq : s.nk) + tu_rand(rs, 0, 300);
  /* half the cases: queries at the end, keys from the start (a causal mask sees keys); else
   * both blocks anywhere (query blocks that see nothing of the keys happen) */
  if (tu_rand(rs, 0, 1)) {
    s.qs = da_span(s.S - s.nq, 1, s.nq);
    s.ks = da_span(0, 1, s.nk);
  } else {
    s.qs = da_span(tu_rand(rs, 0, s.S - s.nq), 1, s.nq);
    s.ks = da_span(tu_rand(rs, 0, s.S - s.nk), 1, s.nk);
  }
  return s;
}

START_TEST(test_fwd_sweep) {
  uint64_t rs = tu_seed(1000 + (uint64_t)_i);
  sweep_t s = sweep_case(_i, &rs, TB_SWEEP_SCALE * 1000.0 * 1000 * 4 * 64);
  kc_t c;
  kc_init(&c, s.H, s.G, s.D, s.dt, s.qs, s.ks, s.S, s.mkind, &rs, tu_seed(rs));
  if (!supported(&c.p)) goto out;
  kc_ref_fwd(&c);
  double *o = dalloc(s.nq * s.H * s.D), *l = dalloc(s.nq * s.H);
  run_fwd_whole(&c, &c.p, o, l);
  CHECK_FWD(&c, o, l, tu_tol(s.dt), "fwd");
#ifndef TB_CPU
  { /* and against the CPU backend on the same inputs */
    double *o2 = dalloc(s.nq * s.H * s.D), *l2 = dalloc(s.nq * s.H);
    tb_override = da_kernels_get(DA_DEVICE_CPU);
    run_fwd_whole(&c, &c.p, o2, l2);
    tb_override = NULL;
    check_same(&c, o2, o, s.nq * s.H * s.D, s.D, "out vs the cpu backend");
    tb_free(o2), tb_free(l2);
  }
#endif
  tb_free(o), tb_free(l);
out:
  kc_free(&c);
}
END_TEST

START_TEST(test_bwd_sweep) {
  uint64_t rs = tu_seed(2000 + (uint64_t)_i);
  sweep_t s = sweep_case(_i, &rs, TB_SWEEP_SCALE * 1000.0 * 129 * 4 * 64);
  kc_t c;
  kc_init(&c, s.H, s.G, s.D, s.dt, s.qs, s.ks, s.S, s.mkind, &rs, tu_seed(rs));
  if (!supported(&c.p)) goto out;
  double *eq, *ek, *ev;
  ref_bwd(&c, &eq, &ek, &ev);
  double *dq = dalloc(s.nq * s.H * s.D), *dk = dalloc(s.nk * s.G * s.D), *dv = dalloc(s.nk * s.G * s.D);
  piece_t w1 = {0, 1, s.nq}, w2 = {0, 1, s.nk};
  run_bwd(&c, &c.p, &w1, 1, &w2, 1, &rs, dq, dk, dv);
  check_bwd(&c, eq, ek, ev, dq, dk, dv, "bwd");
  tb_free(eq), tb_free(ek), tb_free(ev), tb_free(dq), tb_free(dk), tb_free(dv);
out:
  kc_free(&c);
}
END_TEST

/* Self-attention on a whole sequence of 1000 tokens (4 heads, D 64), forward and backward, every
 * mask (loop index) in bf16 and fp32: the shape the drivers run most. */
START_TEST(test_self_1000) {
  uint64_t rs = tu_seed(2500 + (uint64_t)_i);
  const int64_t S = 1000;
  const da_dtype_t dt = _i < TU_NMASKS ? dtypes[0] : DA_BFLOAT16;
  kc_t c;
  kc_init(&c, 4, _i % 2 ? 1 : 4, 64, dt, da_span(0, 1, S), da_span(0, 1, S), S, _i % TU_NMASKS, &rs, tu_seed(rs));
  if (!supported(&c.p)) {
    kc_free(&c);
    return;
  }
  kc_ref_fwd(&c);
  double *o = dalloc(S * 4 * 64), *l = dalloc(S * 4);
  run_fwd_whole(&c, &c.p, o, l);
  CHECK_FWD(&c, o, l, tu_tol(dt), "fwd");
  if (_i % 3 == 0) { /* the float64 backward is the expensive part: a third of the masks */
    double *eq, *ek, *ev, *dq = dalloc(S * 4 * 64), *dk = dalloc(S * c.p.G * 64), *dv = dalloc(S * c.p.G * 64);
    ref_bwd(&c, &eq, &ek, &ev);
    piece_t w = {0, 1, S};
    run_bwd(&c, &c.p, &w, 1, &w, 1, &rs, dq, dk, dv);
    check_bwd(&c, eq, ek, ev, dq, dk, dv, "bwd");
    tb_free(eq), tb_free(ek), tb_free(ev), tb_free(dq), tb_free(dk), tb_free(dv);
  }
  tb_free(o), tb_free(l);
  kc_free(&c);
}
END_TEST

/* ---- decode ---------------------------------------------------------------------------------- */

/* T <= 4 new queries at positions S - T .. S - 1 against a cache of S keys given as several pages
 * (own buffers with padded strides, or the stride-P pages of a striped shard read in place).
 * Loop index: dtype i % 3, mask (i / 3) % 6, ratio and D varying. */
START_TEST(test_decode_sweep) {
  uint64_t rs = tu_seed(3000 + (uint64_t)_i);
  static const int64_t Ss[] = {1, 7, 129, 1000, 1537};
  const da_dtype_t dt = dtypes[_i % 3];
  const int mkind = (_i / 3) % TU_NMASKS, ratio = ratios[_i % 3 == 0 ? (_i / 3) % 3 : (_i / 2) % 3];
  const int D = Ds[(_i + _i / 6) % 6], G = ratio == 8 ? 1 : 2, H = G * ratio;
  const int64_t S = Ss[(_i / 2) % 5], T = tu_rand(&rs, 1, S < 4 ? S : 4);
  kc_t c;
  kc_init(&c, H, G, D, dt, da_span(S - T, 1, T), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
  if (!supported(&c.p)) goto out;
  kc_ref_fwd(&c);
  double *o = dalloc(T * H * D), *l = dalloc(T * H);
  for (int mode = SPLIT_WHOLE; mode <= SPLIT_STRIPED; mode++) {
    run_decode(&c, &c.p, mode, &rs, o, l);
    /* decode partials are fp32, but a kernel may round probabilities to the input dtype before
     * P.V: the input dtype's budget applies */
    CHECK_FWD(&c, o, l, tu_tol(dt), mode == SPLIT_WHOLE ? "decode one page" : mode == SPLIT_CHUNKS ? "decode pages" : "decode striped pages");
#ifndef TB_CPU
    if (mode == SPLIT_WHOLE) { /* and against the CPU backend */
      double *o2 = dalloc(T * H * D), *l2 = dalloc(T * H);
      uint64_t rs2 = rs;
      tb_override = da_kernels_get(DA_DEVICE_CPU);
      run_decode(&c, &c.p, mode, &rs2, o2, l2);
      tb_override = NULL;
      check_same(&c, o2, o, T * H * D, D, "decode vs the cpu backend");
      tb_free(o2), tb_free(l2);
    }
#endif
  }
  tb_free(o), tb_free(l);
out:
  kc_free(&c);
}
END_TEST

/* ---- invariance: tile sizes, threads, block splits ---------------------------------------- */

/* One problem per dtype and mask family, ten (block_q, block_k) pairs drawn from {0, 16, 64, 1000}
 * (0 = default), forward and backward: each within tolerance of the reference and of the default. */
START_TEST(test_block_sizes) {
  uint64_t rs = tu_seed(4000 + (uint64_t)_i);
  const da_dtype_t dt = dtypes[_i % 3];
  static const int mk[4] = {TU_MASK_CAUSAL_DOC, TU_MASK_WINDOW, TU_MASK_NONE, TU_MASK_WINDOW_DOC};
  const int64_t S = 333;
  kc_t c;
  kc_init(&c, 4, 1, _i % 2 ? 80 : 64, dt, da_span(0, 1, S), da_span(0, 1, S), S, mk[_i % 4], &rs, tu_seed(rs));
  if (!supported(&c.p)) goto out;
  kc_ref_fwd(&c);
  double *eq, *ek, *ev;
  ref_bwd(&c, &eq, &ek, &ev);
  const int64_t no = S * 4 * c.p.D, nl = S * 4, ng = S * 1 * c.p.D;
  double *o0 = dalloc(no), *l0 = dalloc(nl), *q0 = dalloc(no), *k0 = dalloc(ng), *v0 = dalloc(ng);
  double *o = dalloc(no), *l = dalloc(nl), *dq = dalloc(no), *dk = dalloc(ng), *dv = dalloc(ng);
  static const int bs[][2] = {{0, 0}, {16, 16}, {64, 64}, {1000, 1000}, {16, 1000}, {1000, 16}, {64, 16}, {16, 64}, {0, 16}, {64, 0}};
  for (size_t t = 0; t < sizeof bs / sizeof bs[0]; t++) {
    da_kparams_t p = c.p;
    p.block_q = bs[t][0], p.block_k = bs[t][1];
    c.p.block_q = p.block_q, c.p.block_k = p.block_k;
    kc_describe(&c);
    piece_t w = {0, 1, S};
    run_fwd_whole(&c, &p, t ? o : o0, t ? l : l0);
    run_bwd(&c, &p, &w, 1, &w, 1, &rs, t ? dq : q0, t ? dk : k0, t ? dv : v0);
    CHECK_FWD(&c, t ? o : o0, t ? l : l0, tu_tol(dt), "tiles");
    check_bwd(&c, eq, ek, ev, t ? dq : q0, t ? dk : k0, t ? dv : v0, "tiles");
    if (t) {
      check_same(&c, o0, o, no, c.p.D, "out vs default tiles");
      check_same(&c, q0, dq, no, no, "dq vs default tiles");
      check_same(&c, k0, dk, ng, ng, "dk vs default tiles");
      check_same(&c, v0, dv, ng, ng, "dv vs default tiles");
    }
  }
  tb_free(eq), tb_free(ek), tb_free(ev), tb_free(o0), tb_free(l0), tb_free(q0), tb_free(k0), tb_free(v0), tb_free(o), tb_free(l), tb_free(dq), tb_free(dk), tb_free(dv);
out:
  kc_free(&c);
}
END_TEST

/* nthreads 1 and 2 (and the default 0): forward, backward and decode agree with each other and
 * with the reference. */
START_TEST(test_threads) {
  uint64_t rs = tu_seed(5000 + (uint64_t)_i);
  const da_dtype_t dt = dtypes[_i % 3];
  const int64_t S = 517;
  kc_t c;
  kc_init(&c, 8, _i == 1 ? 8 : 2, 64, dt, da_span(0, 1, S), da_span(0, 1, S), S, (_i * 2 + 1) % TU_NMASKS, &rs, tu_seed(rs));
  if (!supported(&c.p)) {
    kc_free(&c);
    return;
  }
  kc_ref_fwd(&c);
  const int64_t no = S * 8 * 64, ng = S * c.p.G * 64;
  double *r[3][5];
  for (int t = 0; t < 3; t++) {
    da_kparams_t p = c.p;
    p.nthreads = t == 2 ? 0 : t + 1;
    c.p.nthreads = p.nthreads;
    kc_describe(&c);
    r[t][0] = dalloc(no), r[t][1] = dalloc(S * 8), r[t][2] = dalloc(no), r[t][3] = dalloc(ng), r[t][4] = dalloc(ng);
    piece_t w = {0, 1, S};
    run_fwd_whole(&c, &p, r[t][0], r[t][1]);
    CHECK_FWD(&c, r[t][0], r[t][1], tu_tol(dt), "threads");
    run_bwd(&c, &p, &w, 1, &w, 1, &rs, r[t][2], r[t][3], r[t][4]);
    if (t) {
      check_same(&c, r[0][0], r[t][0], no, 64, "out, 1 thread vs more");
      check_same(&c, r[0][2], r[t][2], no, no, "dq, 1 thread vs more");
      check_same(&c, r[0][3], r[t][3], ng, ng, "dk, 1 thread vs more");
      check_same(&c, r[0][4], r[t][4], ng, ng, "dv, 1 thread vs more");
    }
  }
  double *eq, *ek, *ev;
  ref_bwd(&c, &eq, &ek, &ev);
  check_bwd(&c, eq, ek, ev, r[0][2], r[0][3], r[0][4], "1 thread");
  /* decode: the threads split the KV */
  kc_t d;
  kc_init(&d, 8, 2, 64, dt, da_span(1999, 1, 2), da_span(0, 1, 2001), 2001, _i % TU_NMASKS, &rs, tu_seed(rs));
  kc_ref_fwd(&d);
  double *o1 = dalloc(2 * 8 * 64), *l1 = dalloc(16), *o2 = dalloc(2 * 8 * 64), *l2 = dalloc(16);
  d.p.nthreads = 1;
  run_decode(&d, &d.p, SPLIT_CHUNKS, &rs, o1, l1);
  d.p.nthreads = 2;
  run_decode(&d, &d.p, SPLIT_CHUNKS, &rs, o2, l2);
  CHECK_FWD(&d, o1, l1, tu_tol(dt), "decode 1 thread");
  CHECK_FWD(&d, o2, l2, tu_tol(dt), "decode 2 threads");
  tb_free(o1), tb_free(l1), tb_free(o2), tb_free(l2), tb_free(eq), tb_free(ek), tb_free(ev);
  for (int t = 0; t < 3; t++)
    for (int j = 0; j < 5; j++) tb_free(r[t][j]);
  kc_free(&d);
  kc_free(&c);
}
END_TEST

/* Folding the keys in several fwd_block calls (random contiguous chunks in any order, or the
 * stride-P pieces of a striped layout passed in place with row stride P * ldk), for queries split
 * the same ways, equals one call and the reference; the same splits for the backward, each pair
 * accumulating (+=) into its pieces' dq / dk / dv. Loop index: mask (6) x dtype pairs. */
START_TEST(test_block_splits) {
  uint64_t rs = tu_seed(6000 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS;
  const da_dtype_t dt = dtypes[(_i / TU_NMASKS) % 3];
  for (int rep = 0; rep < 3; rep++) {
    const int ratio = ratios[(rep + _i) % 3], G = ratio == 8 ? 1 : 2, H = G * ratio;
    const int D = rep == 1 ? 128 : 64;
    const int64_t S = tu_rand(&rs, TB_SPLIT_S_LO, TB_SPLIT_S_HI);
    da_span_t qs = da_span(0, 1, S), ks = qs;
    if (rep == 2) { /* a zigzag-like pair: late queries, early keys */
      qs = da_span(S / 2, 1, S - S / 2);
      ks = da_span(0, 1, S / 2 + tu_rand(&rs, 0, S / 4));
    }
    kc_t c;
    kc_init(&c, H, G, D, dt, qs, ks, S, mkind, &rs, tu_seed(rs));
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    c.p.block_q = c.p.block_k = rep == 0 ? 32 : 0;
    kc_describe(&c);
    kc_ref_fwd(&c);
    const int64_t nq = qs.count, nk = ks.count;
    double *o1 = dalloc(nq * H * D), *l1 = dalloc(nq * H), *o2 = dalloc(nq * H * D), *l2 = dalloc(nq * H);
    run_fwd_whole(&c, &c.p, o1, l1);
    CHECK_FWD(&c, o1, l1, tu_tol(dt), "one call");
    double *eq, *ek, *ev;
    ref_bwd(&c, &eq, &ek, &ev);
    double *dq = dalloc(nq * H * D), *dk = dalloc(nk * G * D), *dv = dalloc(nk * G * D);
    for (int qm = SPLIT_WHOLE; qm <= SPLIT_STRIPED; qm++)
      for (int km = SPLIT_CHUNKS; km <= SPLIT_STRIPED; km++) {
        piece_t qp[64], kp[64];
        int nqp = split(nq, qm, &rs, qp, 8), nkp = split(nk, km, &rs, kp, 8);
        char what[64];
        snprintf(what, sizeof what, "q split %d (%d pieces), k split %d (%d pieces)", qm, nqp, km, nkp);
        run_fwd(&c, &c.p, qp, nqp, kp, nkp, o2, l2);
        CHECK_FWD(&c, o2, l2, tu_tol(dt), what);
        check_same(&c, o1, o2, nq * H * D, D, what);
        run_bwd(&c, &c.p, qp, nqp, kp, nkp, &rs, dq, dk, dv);
        check_bwd(&c, eq, ek, ev, dq, dk, dv, what);
      }
    tb_free(o1), tb_free(l1), tb_free(o2), tb_free(l2), tb_free(eq), tb_free(ek), tb_free(ev), tb_free(dq), tb_free(dk), tb_free(dv);
    kc_free(&c);
  }
}
END_TEST

/* ---- merge ----------------------------------------------------------------------------------- */

/* Partials of three striped key shards (fwd_finish into fp32) merged in several orders equal the
 * reference over all keys and each other: associative and commutative up to rounding. Small
 * windows make shards that some rows cannot see (lse = -inf partials, which must count as empty).
 * b is never written. */
START_TEST(test_merge_orders) {
  uint64_t rs = tu_seed(7000 + (uint64_t)_i);
  const int mkind = _i % TU_NMASKS;
  const da_dtype_t dt = dtypes[_i % 3];
  const int64_t S = 240;
  kc_t c;
  kc_init(&c, 4, 2, 64, dt, da_span(S - 100, 1, 100), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
  if (!supported(&c.p)) {
    kc_free(&c);
    return;
  }
  if (mkind == TU_MASK_WINDOW) c.p.mask.window = 2; /* shard r = 2 sees nothing of a row at 3i */
  kc_describe(&c);
  kc_ref_fwd(&c);
  const da_kernels_t *kt = backend();
  const int H = 4, D = 64;
  const int64_t nq = 100, no = nq * H * D, nl = nq * H;
  float *po[3], *pl[3];
  for (int r = 0; r < 3; r++) {
    piece_t kp = {r, 3, (S - r + 2) / 3};
    float *o = falloc(no), *m = falloc(nl), *l = falloc(nl);
    da_fwd_state_t st = {o, m, l, nq};
    KOK(da_fwd_state_init(kt, &c.p, &st, NULL), &c);
    const char *kb = (const char *)c.k + (size_t)(r * c.ldk) * esize(dt), *vb = (const char *)c.v + (size_t)(r * c.ldv) * esize(dt);
    KOK(kt->fwd_block(&c.p, c.q, c.ldq, c.qs, kb, 3 * c.ldk, vb, 3 * c.ldv, piece_span(c.ks, kp), &st, NULL), &c);
    po[r] = falloc(no), pl[r] = falloc(nl);
    fpoison(po[r], no), fpoison(pl[r], nl);
    KOK(kt->fwd_finish(&c.p, &st, po[r], DA_FLOAT32, H * D, pl[r], NULL), &c);
    tb_free(o), tb_free(m), tb_free(l);
  }
  /* orders: ((A B) C), (A (B C)), ((C A) B), (B (C A)) */
  static const int ord[4][3] = {{0, 1, 2}, {1, 2, 0}, {2, 0, 1}, {2, 0, 1}};
  static const int nested[4] = {0, 1, 0, 1}; /* 1: x <- merge(y, z) first, then merge(first, x) */
  double *res[4][2];
  float *ta = falloc(no), *tl = falloc(nl), *ua = falloc(no), *ul = falloc(nl), *bo = falloc(no), *bl = falloc(nl);
  for (int t = 0; t < 4; t++) {
    const int *o = ord[t];
    if (!nested[t]) {
      memcpy(ta, po[o[0]], (size_t)no * 4), memcpy(tl, pl[o[0]], (size_t)nl * 4);
      for (int j = 1; j < 3; j++) {
        memcpy(bo, po[o[j]], (size_t)no * 4), memcpy(bl, pl[o[j]], (size_t)nl * 4);
        KOK(kt->merge(&c.p, nq, ta, tl, po[o[j]], pl[o[j]], NULL), &c);
        ck_assert_msg(!memcmp(bo, po[o[j]], (size_t)no * 4) && !memcmp(bl, pl[o[j]], (size_t)nl * 4), "%s: merge wrote b", c.desc);
      }
    } else { /* first (A) merged with (B C) computed apart; for t = 3: B (C A) */
      int first = t == 1 ? 0 : 1, y = t == 1 ? 1 : 2, z = t == 1 ? 2 : 0;
      memcpy(ua, po[y], (size_t)no * 4), memcpy(ul, pl[y], (size_t)nl * 4);
      KOK(kt->merge(&c.p, nq, ua, ul, po[z], pl[z], NULL), &c);
      memcpy(ta, po[first], (size_t)no * 4), memcpy(tl, pl[first], (size_t)nl * 4);
      KOK(kt->merge(&c.p, nq, ta, tl, ua, ul, NULL), &c);
    }
    res[t][0] = dalloc(no), res[t][1] = dalloc(nl);
    for (int64_t i = 0; i < no; i++) res[t][0][i] = ta[i];
    for (int64_t i = 0; i < nl; i++) res[t][1][i] = tl[i];
    char what[32];
    snprintf(what, sizeof what, "merge order %d", t);
    CHECK_FWD(&c, res[t][0], res[t][1], tu_tol(dt), what);
    if (t) {
      TU_CHECK_CLOSE("out vs order 0", res[0][0], res[t][0], no, H, D, D, 1e-5, c.desc);
      TU_CHECK_LSE("lse vs order 0", res[0][1], res[t][1], nl, H, 1e-6, c.desc);
    }
  }
  for (int t = 0; t < 4; t++) tb_free(res[t][0]), tb_free(res[t][1]);
  for (int r = 0; r < 3; r++) tb_free(po[r]), tb_free(pl[r]);
  tb_free(ta), tb_free(tl), tb_free(ua), tb_free(ul), tb_free(bo), tb_free(bl);
  kc_free(&c);
}
END_TEST

/* -inf partials by hand, mixed in one call: (-inf, x) -> x, (x, -inf) -> x, (-inf, -inf) ->
 * (0, -inf) with no NaN; finite pairs by the log-sum-exp formula in double. */
START_TEST(test_merge_empty) {
  const da_kernels_t *kt = backend();
  const int H = 3, D = 16;
  const int64_t n = 7, no = n * H * D, nl = n * H;
  da_kparams_t p = {.H = H, .G = 1, .D = D, .scale = 0.25f, .dtype = DA_FLOAT32, .nthreads = 2};
  float *oa = falloc(no), *la = falloc(nl), *ob = falloc(no), *lb = falloc(nl), *oa0 = falloc(no), *la0 = falloc(nl);
  uint64_t rs = tu_seed(7100);
  for (int64_t r = 0; r < nl; r++) {
    const int kind = (int)(r % 4); /* 0: a empty, 1: b empty, 2: both, 3: neither */
    la[r] = kind == 0 || kind == 2 ? -INFINITY : (float)(tu_rand01(&rs) * 20 - 10);
    lb[r] = kind == 1 || kind == 2 ? -INFINITY : (float)(tu_rand01(&rs) * 20 - 10);
    for (int d = 0; d < D; d++) {
      oa[r * D + d] = la[r] == -INFINITY ? 0.0f : (float)(tu_rand01(&rs) * 2 - 1);
      ob[r * D + d] = lb[r] == -INFINITY ? 0.0f : (float)(tu_rand01(&rs) * 2 - 1);
    }
  }
  memcpy(oa0, oa, (size_t)no * 4), memcpy(la0, la, (size_t)nl * 4);
  ck_assert_int_eq(kt->merge(&p, n, oa, la, ob, lb, NULL), DA_SUCCESS);
  ck_assert_int_eq(tb_sync(), DA_SUCCESS);
  for (int64_t r = 0; r < nl; r++) {
    double a = la0[r], b = lb[r];
    double L = a == -INFINITY ? b : b == -INFINITY ? a : fmax(a, b) + log(exp(a - fmax(a, b)) + exp(b - fmax(a, b)));
    if (L == -INFINITY) ck_assert_msg(la[r] == -INFINITY, "row %lld: both empty, lse %g", (long long)r, (double)la[r]);
    else ck_assert_msg(fabs(la[r] - L) <= 1e-6 * (1 + fabs(L)), "row %lld: lse %.9g expected %.9g", (long long)r, (double)la[r], L);
    for (int d = 0; d < D; d++) {
      double wa = a == -INFINITY ? 0 : exp(a - L), wb = b == -INFINITY ? 0 : exp(b - L);
      double x = L == -INFINITY ? 0 : wa * oa0[r * D + d] + wb * ob[r * D + d];
      ck_assert_msg(fabs(oa[r * D + d] - x) <= 1e-6, "row %lld d %d (lse a %g, b %g): o %.9g expected %.9g", (long long)r, d,
                    a, b, (double)oa[r * D + d], x);
    }
  }
  tb_free(oa), tb_free(la), tb_free(ob), tb_free(lb), tb_free(oa0), tb_free(la0);
}
END_TEST

/* ---- masked rows and NaN --------------------------------------------------------------------- */

/* Rows whose mask allows no key (window / doc / causal with a query block past or before the
 * keys, and tiles of 16 so that query tiles see none of some KV tiles): out = 0 exactly, lse =
 * -inf, no NaN, through fwd_block + fwd_finish and decode; their dq stays 0, and a KV block no
 * query sees gets dk = dv = 0. Every dtype. */
START_TEST(test_masked_rows) {
  const da_dtype_t dt = dtypes[_i % 3];
  int64_t cu[4] = {0, 100, 130, 300};
  struct { unsigned flags; int64_t window; da_span_t qs, ks; int all; } cases[] = {
      {DA_MASK_CAUSAL, 0, {0, 1, 50}, {50, 1, 70}, 1},
      {DA_MASK_WINDOW, 10, {200, 1, 60}, {0, 1, 150}, 1},
      {DA_MASK_DOC, 0, {0, 1, 100}, {100, 1, 200}, 1},
      {DA_MASK_CAUSAL | DA_MASK_DOC, 0, {0, 3, 100}, {130, 1, 170}, 0},
      {DA_MASK_WINDOW | DA_MASK_DOC, 5, {0, 1, 300}, {0, 7, 43}, 0},
      {DA_MASK_WINDOW, 3, {0, 1, 300}, {0, 1, 300}, 0}, /* all rows see keys; most tile pairs empty */
      {DA_MASK_DOC, 0, {95, 1, 40}, {0, 2, 50}, 0}, /* rows 100.. see no key */
  };
  for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
    uint64_t rs = tu_seed(8000 + t * 10 + (uint64_t)_i);
    kc_t c;
    kc_init(&c, 4, 2, 64, dt, cases[t].qs, cases[t].ks, 300, TU_MASK_NONE, &rs, tu_seed(rs));
    c.p.mask = (da_mask_t){cases[t].flags, cases[t].window, 3, cu};
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    c.p.block_q = c.p.block_k = 16;
    kc_describe(&c);
    kc_ref_fwd(&c);
    const int H = 4, D = 64;
    const int64_t nq = c.qs.count, nk = c.ks.count;
    double *o = dalloc(nq * H * D), *l = dalloc(nq * H);
    piece_t qp[16], kp[16];
    int nqp = split(nq, SPLIT_CHUNKS, &rs, qp, 8), nkp = split(nk, SPLIT_CHUNKS, &rs, kp, 8);
    run_fwd(&c, &c.p, qp, nqp, kp, nkp, o, l);
    int64_t masked = 0;
    for (int64_t i = 0; i < nq; i++) {
      if (c.rl[i * H] != -INFINITY) continue;
      masked++;
      for (int h = 0; h < H; h++) {
        ck_assert_msg(l[i * H + h] == -INFINITY, "%s: masked row %lld head %d: lse %g", c.desc, (long long)i, h, l[i * H + h]);
        for (int d = 0; d < D; d++)
          ck_assert_msg(o[(i * H + h) * D + d] == 0.0, "%s: masked row %lld head %d: out %g", c.desc, (long long)i, h,
                        o[(i * H + h) * D + d]);
      }
    }
    if (cases[t].flags != DA_MASK_WINDOW || cases[t].window != 3) ck_assert_msg(masked > 0, "case %zu has no masked row", t);
    if (cases[t].all) ck_assert_int_eq(masked, nq);
    CHECK_FWD(&c, o, l, tu_tol(dt), "masked rows");
    double *eq, *ek, *ev, *dq = dalloc(nq * H * D), *dk = dalloc(nk * 2 * D), *dv = dalloc(nk * 2 * D);
    ref_bwd(&c, &eq, &ek, &ev);
    run_bwd(&c, &c.p, qp, nqp, kp, nkp, &rs, dq, dk, dv);
    check_bwd(&c, eq, ek, ev, dq, dk, dv, "masked rows");
    for (int64_t i = 0; i < nq; i++)
      if (c.rl[i * H] == -INFINITY)
        for (int64_t e = 0; e < H * D; e++) ck_assert_msg(dq[i * H * D + e] == 0.0, "%s: masked row %lld dq %g", c.desc, (long long)i, dq[i * H * D + e]);
    if (cases[t].all)
      for (int64_t e = 0; e < nk * 2 * D; e++) ck_assert_msg(dk[e] == 0.0 && dv[e] == 0.0, "%s: unseen keys get dk %g dv %g", c.desc, dk[e], dv[e]);
    tb_free(o), tb_free(l), tb_free(eq), tb_free(ek), tb_free(ev), tb_free(dq), tb_free(dk), tb_free(dv);
    kc_free(&c);
  }
  /* decode of queries that see nothing of the shard (window past it): o = 0, lse = -inf */
  uint64_t rs = tu_seed(8100 + (uint64_t)_i);
  kc_t c;
  kc_init(&c, 4, 1, 64, dt, da_span(500, 1, 3), da_span(0, 2, 200), 503, TU_MASK_NONE, &rs, tu_seed(rs));
  c.p.mask = (da_mask_t){DA_MASK_WINDOW, 50, 0, NULL};
  kc_describe(&c);
  double *o = dalloc(3 * 4 * 64), *l = dalloc(12);
  run_decode(&c, &c.p, SPLIT_CHUNKS, &rs, o, l);
  for (int r = 0; r < 12; r++) {
    ck_assert_msg(l[r] == -INFINITY, "%s: decode lse %g", c.desc, l[r]);
    for (int d = 0; d < 64; d++) ck_assert_msg(o[r * 64 + d] == 0.0, "%s: decode o %g", c.desc, o[r * 64 + d]);
  }
  tb_free(o), tb_free(l);
  kc_free(&c);
}
END_TEST

/* NaN propagation (docs/decisions.md, "NaN and Inf inputs": as in a dense softmax(QK^T + M) V).
 * One NaN put in q (row i0, head h0, element d0), k or v (key j0, KV head g0, element d0).
 * Asserted, through fwd_block + fwd_finish and through decode:
 *   NaN in q: row (i0, h0) is NaN in every element of out and in lse; every other row is exact;
 *   NaN in k: every row of a head of g0 that sees key j0 is NaN in every element and in lse;
 *   NaN in v: those rows are NaN in element d0; their lse and other elements are exact;
 *   rows of the heads of g0 that the mask hides from j0 may also be NaN (0 * NaN inside a kernel
 *   tile, allowed by the decision; for v only in element d0, and their lse stays exact); rows of
 *   the other KV heads and everything else match the reference. */
START_TEST(test_nan_propagation) {
  const int which = _i % 3;
  const da_dtype_t dt = _i / 3 % 2 ? DA_BFLOAT16 : dtypes[0];
  for (int mkind = 0; mkind < TU_NMASKS; mkind++) {
    uint64_t rs = tu_seed(9000 + (uint64_t)(_i * 10 + mkind));
    /* GQA 2, and 8 (the decode's heads-in-lanes path at W 8, its AMX tiles for bf16) */
    const int H = _i < 6 ? 4 : 8, G = _i < 6 ? 2 : 1, D = 64, rep = H / G;
    const int64_t S = 150;
    kc_t c;
    kc_init(&c, H, G, D, dt, da_span(0, 1, S), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    c.p.block_q = c.p.block_k = 16;
    kc_describe(&c);
    const int64_t i0 = tu_rand(&rs, 0, S - 1), j0 = tu_rand(&rs, 0, S - 1);
    const int h0 = (int)tu_rand(&rs, 0, H - 1), g0 = (int)tu_rand(&rs, 0, G - 1), d0 = (int)tu_rand(&rs, 0, D - 1);
    if (which == 0) da_store_f32(c.q, (int)dt, i0 * c.ldq + h0 * D + d0, NAN), c.rq[(i0 * H + h0) * D + d0] = NAN;
    if (which == 1) da_store_f32(c.k, (int)dt, j0 * c.ldk + g0 * D + d0, NAN), c.rk[(j0 * G + g0) * D + d0] = NAN;
    if (which == 2) da_store_f32(c.v, (int)dt, j0 * c.ldv + g0 * D + d0, NAN), c.rv[(j0 * G + g0) * D + d0] = NAN;
    kc_ref_fwd(&c);
    double *o = dalloc(S * H * D), *l = dalloc(S * H);
    for (int path = 0; path < 2; path++) {
      if (path == 0) run_fwd_whole(&c, &c.p, o, l);
      else { /* decode of the last 3 rows */
        kc_t d = c;
        d.qs = da_span(S - 3, 1, 3);
        d.q = (char *)c.q + (size_t)((S - 3) * c.ldq) * esize(dt);
        run_decode(&d, &d.p, SPLIT_CHUNKS, &rs, o + (S - 3) * H * D, l + (S - 3) * H);
      }
      for (int64_t i = path ? S - 3 : 0; i < S; i++)
        for (int h = 0; h < H; h++) {
          int64_t lo, hi;
          da_mask_row_range(&c.p.mask, i, 0, S - 1, &lo, &hi);
          const int in_g0 = h / rep == g0, sees_any = lo <= hi, sees_j0 = lo <= j0 && j0 <= hi && in_g0;
          const int row_nan = (which == 0 && i == i0 && h == h0 && sees_any) || (which == 1 && sees_j0);
          const int may_leak = which && in_g0 && !sees_j0; /* hidden from j0, maybe in its tile */
          const double *orow = o + (i * H + h) * D, *rrow = c.ro + (i * H + h) * D;
          double scale = 1e-6;
          for (int d = 0; d < D; d++)
            if (!isnan(rrow[d]) && fabs(rrow[d]) > scale) scale = fabs(rrow[d]);
          for (int d = 0; d < D; d++) {
            const int want_nan = row_nan || (which == 2 && sees_j0 && d == d0);
            const int may_nan = want_nan || (may_leak && (which == 1 || d == d0));
            ck_assert_msg(isnan(rrow[d]) == want_nan, "reference breaks the stated rule (%s)", c.desc);
            if (want_nan)
              ck_assert_msg(isnan(orow[d]), "%s [%s]: NaN in %c at (%lld, %d, %d): out[%lld][%d][%d] = %g, expected NaN",
                            c.desc, path ? "decode" : "fwd", "qkv"[which], (long long)(which ? j0 : i0), which ? g0 : h0,
                            d0, (long long)i, h, d, orow[d]);
            else if (!(may_nan && isnan(orow[d])))
              ck_assert_msg(fabs(orow[d] - rrow[d]) <= tu_tol(dt) * scale,
                            "%s [%s]: NaN in %c at (%lld, %d, %d): out[%lld][%d][%d] = %g, expected %g", c.desc,
                            path ? "decode" : "fwd", "qkv"[which], (long long)(which ? j0 : i0), which ? g0 : h0, d0,
                            (long long)i, h, d, orow[d], rrow[d]);
          }
          const double L = l[i * H + h], RL = c.rl[i * H + h];
          if (row_nan)
            ck_assert_msg(isnan(L), "%s [%s]: NaN in %c: lse[%lld][%d] = %g, expected NaN", c.desc, path ? "decode" : "fwd",
                          "qkv"[which], (long long)i, h, L);
          else if (may_leak && which == 1 && isnan(L))
            continue;
          else if (RL == -INFINITY)
            ck_assert_msg(L == -INFINITY, "%s: masked row lse %g", c.desc, L);
          else
            ck_assert_msg(fabs(L - RL) <= lse_tol(dt) * (1 + fabs(RL)), "%s [%s]: NaN in %c: lse[%lld][%d] = %g, expected %g",
                          c.desc, path ? "decode" : "fwd", "qkv"[which], (long long)i, h, L, RL);
        }
    }
    tb_free(o), tb_free(l);
    kc_free(&c);
  }
}
END_TEST
#ifdef TB_CPU /* the ISA levels are the CPU backend's */

/* Run this process's CPU kernels at ISA level `isa` (DISTATTN_CPU_ISA is read once per process:
 * fork mode gives each test a fresh one). Returns 0, saying so, when the CPU lacks the level for
 * dtype dt (the test then has nothing to check here). */
static int use_isa(const char *isa, da_dtype_t dt) {
  setenv("DISTATTN_CPU_ISA", isa, 1);
  da_kparams_t probe = {.H = 1, .G = 1, .D = 64, .scale = 0.125f, .dtype = dt};
  if (backend()->supports(&probe) == DA_SUCCESS) return 1;
  printf("# cpu: ISA level %s not available here: %s\n", isa, da_error_message());
  return 0;
}

/* " isa <level>" after the problem's description, so that a failure names the level. */
static void kc_name_isa(kc_t *c, const char *isa) {
  strncat(c->desc, " isa ", sizeof c->desc - strlen(c->desc) - 1);
  strncat(c->desc, isa, sizeof c->desc - strlen(c->desc) - 1);
}

/* ---- every ISA level the CPU has (use_isa) ------------------------------------------------- */
START_TEST(test_isa_levels) {
  static const char *isa[6] = {"generic", "avx2", "avx512", "avx512bf16", "amx", "avx2bf16emu"};
  if (!use_isa(isa[_i], DA_FLOAT32)) return;
  for (int t = 0; t < 6; t++) {
    uint64_t rs = tu_seed(9500 + (uint64_t)(_i * 10 + t));
    const da_dtype_t dt = dtypes[t % 3];
    const int D = (int[]){64, 128, 80, 16, 256, 72}[t];
    const int64_t S = (int64_t[]){301, 129, 200, 77, 150, 222}[t];
    kc_t c;
    kc_init(&c, 8, t % 2 ? 1 : 2, D, dt, da_span(0, 1, S), da_span(0, 1, S), S, t, &rs, tu_seed(rs));
    kc_name_isa(&c, isa[_i]);
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    kc_ref_fwd(&c);
    double *o = dalloc(S * 8 * D), *l = dalloc(S * 8);
    piece_t qp[16], kp[16];
    int nqp = split(S, SPLIT_STRIPED, &rs, qp, 8), nkp = split(S, SPLIT_CHUNKS, &rs, kp, 8);
    run_fwd(&c, &c.p, qp, nqp, kp, nkp, o, l);
    CHECK_FWD(&c, o, l, tu_tol(dt), "fwd");
    double *eq, *ek, *ev, *dq = dalloc(S * 8 * D), *dk = dalloc(S * c.p.G * D), *dv = dalloc(S * c.p.G * D);
    ref_bwd(&c, &eq, &ek, &ev);
    run_bwd(&c, &c.p, qp, nqp, kp, nkp, &rs, dq, dk, dv);
    check_bwd(&c, eq, ek, ev, dq, dk, dv, "bwd");
    kc_t d = c;
    d.qs = da_span(S - 2, 1, 2);
    d.q = (char *)c.q + (size_t)((S - 2) * c.ldq) * esize(dt);
    d.ro = c.ro + (S - 2) * 8 * D, d.rl = c.rl + (S - 2) * 8;
    run_decode(&d, &d.p, SPLIT_STRIPED, &rs, o, l);
    CHECK_FWD(&d, o, l, tu_tol(dt), "decode");
    tb_free(o), tb_free(l), tb_free(eq), tb_free(ek), tb_free(ev), tb_free(dq), tb_free(dk), tb_free(dv);
    kc_free(&c);
  }
}
END_TEST

/* ---- the bf16 pair-product path (vdpbf16ps, and the same tiling with emulated products) -----
 * In bf16 the levels avx512bf16 and avx2bf16emu run QK^T, PV and the backward's products over
 * bf16 pairs with P and dS rounded to bf16; avx2 widens to fp32 (the "before"). Loop index:
 * level (avx512bf16, avx2bf16emu, avx2, generic) x mask. Each: three problems (GQA 1, 4, 8; head dims
 * even, odd and past one vector; odd lengths; small or odd tiles), forward and backward over
 * key/query splits, and decode, all within the bf16 tolerance of float64. The worst errors are
 * printed ("# bf16 err ...") so the two paths can be compared (ctest -V). */
START_TEST(test_bf16_levels) {
  static const char *isa[5] = {"amx", "avx512bf16", "avx2bf16emu", "avx2", "generic"};
  const int lv = _i / TU_NMASKS, mkind = _i % TU_NMASKS;
  if (!use_isa(isa[lv], DA_BFLOAT16)) return;
  for (int rep = 0; rep < 3; rep++) {
    uint64_t rs = tu_seed(9700 + (uint64_t)(mkind * 3 + rep)); /* same problems for every level */
    const int ratio = ratios[(rep + mkind) % 3], G = ratio == 8 ? 1 : 2, H = G * ratio;
    const int D = (int[]){64, 128, 33, 72, 16, 256}[(rep + 2 * mkind) % 6];
    const int64_t S = tu_rand(&rs, 100, 300) | 1;
    const da_span_t qs = rep == 2 ? da_span(S / 2, 1, S - S / 2) : da_span(0, 1, S);
    kc_t c;
    kc_init(&c, H, G, D, DA_BFLOAT16, qs, da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
    c.p.block_q = (int)(int[]){0, 16, 40}[rep];
    c.p.block_k = (int)(int[]){0, 13, 24}[rep]; /* 13: not a multiple of the register tile */
    kc_describe(&c);
    kc_name_isa(&c, isa[lv]);
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    kc_ref_fwd(&c);
    const int64_t nq = qs.count;
    double *o = dalloc(nq * H * D), *l = dalloc(nq * H);
    double *eq, *ek, *ev, *dq = dalloc(nq * H * D), *dk = dalloc(S * G * D), *dv = dalloc(S * G * D);
    ref_bwd(&c, &eq, &ek, &ev);
    double worst[5] = {0};
    for (int mode = SPLIT_WHOLE; mode <= SPLIT_STRIPED; mode++) {
      piece_t qp[64], kp[64];
      int nqp = split(nq, mode, &rs, qp, 8), nkp = split(S, (mode + 1) % 3, &rs, kp, 8);
      run_fwd(&c, &c.p, qp, nqp, kp, nkp, o, l);
      CHECK_FWD(&c, o, l, tu_tol(DA_BFLOAT16), "fwd");
      int64_t w;
      worst[0] = fmax(worst[0], tu_err(c.ro, o, nq * H * D, D, &w));
      worst[1] = fmax(worst[1], tu_lse_err(c.rl, l, nq * H, &w));
      run_bwd(&c, &c.p, qp, nqp, kp, nkp, &rs, dq, dk, dv);
      check_bwd(&c, eq, ek, ev, dq, dk, dv, "bwd");
      worst[2] = fmax(worst[2], tu_err(eq, dq, nq * H * D, nq * H * D, &w));
      worst[3] = fmax(worst[3], tu_err(ek, dk, S * G * D, S * G * D, &w));
      worst[4] = fmax(worst[4], tu_err(ev, dv, S * G * D, S * G * D, &w));
    }
    printf("# bf16 err %-11s mask %d H %d G %d D %3d S %3lld: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", isa[lv],
           mkind, H, G, D, (long long)S, worst[0], worst[1], worst[2], worst[3], worst[4]);
    kc_t d = c; /* decode: the last two rows against the whole cache, in pages */
    d.qs = da_span(da_span_last(qs) - 1, 1, 2);
    d.q = (char *)c.q + (size_t)((nq - 2) * c.ldq) * esize(DA_BFLOAT16);
    d.ro = c.ro + (nq - 2) * H * D, d.rl = c.rl + (nq - 2) * H;
    run_decode(&d, &d.p, SPLIT_STRIPED, &rs, o, l);
    CHECK_FWD(&d, o, l, tu_tol(DA_BFLOAT16), "decode");
    free(o), free(l), free(eq), free(ek), free(ev), free(dq), free(dk), free(dv);
    kc_free(&c);
  }
}
END_TEST

/* ---- fwd_finish's 16-bit outputs, bit for bit, at every ISA level -----------------------------
 * A hand-made state (o, m, l) is finished into bf16 and fp16: every output must be the scalar
 * conversion of the same fp32 product o * (1 / l) (core/dtype.h: round to nearest even, a NaN
 * stays a quiet NaN), including ties, NaN, inf and values far below one. D 40: whole vectors and
 * a partial one at every level. */
START_TEST(test_finish_rounding) {
  static const char *isa[6] = {"generic", "avx2", "avx512", "avx512bf16", "amx", "avx2bf16emu"};
  if (!use_isa(isa[_i], DA_FLOAT32)) return;
  const int H = 3, D = 40, nq = 37;
  uint64_t rs = tu_seed(9900 + (uint64_t)_i);
  da_kparams_t p = {.H = H, .G = H, .D = D, .scale = 0.125f, .dtype = DA_BFLOAT16};
  da_fwd_state_t st = {.o = malloc(sizeof(float) * nq * H * D), .m = malloc(sizeof(float) * nq * H),
                       .l = malloc(sizeof(float) * nq * H), .nq = nq};
  uint16_t *out = malloc(2 * (size_t)nq * H * D);
  float *lse = malloc(sizeof(float) * nq * H);
  ck_assert(st.o && st.m && st.l && out && lse);
  for (int64_t r = 0; r < nq * H; r++) {
    st.m[r] = 0.5f, st.l[r] = r % 7 == 0 ? 1.0f : (float)tu_rand(&rs, 1, 1000) / 64.0f;
    for (int d = 0; d < D; d++) {
      uint32_t u = (uint32_t)tu_rand(&rs, 0, 0x7fffffff) ^ (uint32_t)(d & 1) << 31;
      if (d % 5 == 0) u = (u & 0xffff0000u) | 0x8000u; /* a tie: the even neighbour wins */
      if (d == 7) u = 0x7fc00001u ^ (uint32_t)(r & 1) << 31; /* NaN */
      if (d == 9) u = 0x7f800000u;                          /* inf */
      float x;
      memcpy(&x, &u, 4);
      st.o[r * D + d] = isfinite(x) && fabsf(x) > 1e30f ? x * 1e-20f : x;
    }
  }
  for (int dt = 1; dt <= 2; dt++) {
    ck_assert_int_eq(backend()->fwd_finish(&p, &st, out, (da_dtype_t)dt, (int64_t)H * D, lse, NULL), DA_SUCCESS);
    for (int64_t r = 0; r < nq * H; r++)
      for (int d = 0; d < D; d++) {
        const float y = st.o[r * D + d] * (1.0f / st.l[r]);
        const uint16_t want = dt == 1 ? da_f32_to_bf16(y) : da_f32_to_f16(y), got = out[r * D + d];
        ck_assert_msg(got == want, "isa %s %s row %lld d %d: %#06x, the scalar conversion of %a gives %#06x", isa[_i],
                      dt == 1 ? "bf16" : "fp16", (long long)r, d, got, (double)y, want);
      }
  }
  free(st.o), free(st.m), free(st.l), free(out), free(lse);
}
END_TEST

/* ---- the forward's lazy rescale: scores that grow along the keys ----------------------------
 * The CPU forward moves a row's reference max only when a tile's max passes it by more than 8
 * (log2 units) and rescales the output only then (cpu_impl.c softmax_tile). Random inputs
 * almost never make a later tile pass an earlier one by that much, so here key row j is scaled
 * by 2^min(floor(j / step), 4): the scores (about 1.5 units) double at each step up to 16x, so
 * later tiles pass the earlier ones by less than the threshold and by more (scores stay below
 * about 100 units: larger ones would lose the fp32 tolerance to the rounding of the scores
 * themselves, whatever the rescale), over key splits so the reference also moves between calls
 * and with small KV tiles (many moves). fp32 at every level the CPU has, and bf16 at the pair and
 * AMX levels (whose PV product may run over a whole KV tile after a move inside it: cpu_impl.c
 * fwd_micro_amx), against float64 of the same scaled inputs. A reference that never moved would
 * overflow exp2; a move without the rescale would leave the earlier keys' weights wrong by the
 * factor skipped. */
START_TEST(test_growing_scores) {
  static const char *isa[6] = {"generic", "avx2", "avx512", "amx", "avx512bf16", "avx2bf16emu"};
  const da_dtype_t dt = _i < 3 ? DA_FLOAT32 : DA_BFLOAT16;
  if (!use_isa(isa[_i], dt)) return;
  for (int t = 0; t < 4; t++) {
    uint64_t rs = tu_seed(9700 + (uint64_t)(_i * 10 + t));
    const int D = (int[]){64, 128, 40, 64}[t];
    const int64_t S = (int64_t[]){400, 257, 333, 300}[t];
    const int step = (int[]){32, 16, 48, 24}[t];
    kc_t c;
    kc_init(&c, 4, t % 2 ? 1 : 2, D, dt, da_span(0, 1, S), da_span(0, 1, S), S, t, &rs, tu_seed(rs));
    c.p.block_k = (int[]){0, 16, 40, 8}[t];
    for (int64_t j = 0; j < S; j++) /* powers of two: the scaled value is exact, rk stays its copy */
      for (int g = 0; g < c.p.G; g++)
        for (int d = 0; d < D; d++) {
          char *kr = (char *)c.k + (size_t)(j * c.ldk + (int64_t)g * D) * esize(dt);
          const float x = ldexpf(da_load_f32(kr, dt, d), (int)(j / step < 4 ? j / step : 4));
          da_store_f32(kr, dt, d, x);
          c.rk[(j * c.p.G + g) * D + d] = x;
        }
    kc_describe(&c);
    snprintf(c.desc + strlen(c.desc), sizeof c.desc - strlen(c.desc), " k rows x 2^min(j/%d,4) isa %s", step, isa[_i]);
    kc_ref_fwd(&c);
    double *o = dalloc(S * 4 * D), *l = dalloc(S * 4);
    piece_t qp[16], kp[16];
    int nqp = split(S, SPLIT_STRIPED, &rs, qp, 8), nkp = split(S, SPLIT_CHUNKS, &rs, kp, 8);
    run_fwd(&c, &c.p, qp, nqp, kp, nkp, o, l);
    CHECK_FWD(&c, o, l, tu_tol(dt), "fwd split");
    run_fwd_whole(&c, &c.p, o, l);
    CHECK_FWD(&c, o, l, tu_tol(dt), "fwd whole");
    tb_free(o), tb_free(l);
    kc_free(&c);
  }
}
END_TEST

/* ---- decode: GQA group sizes through the grouped kernels --------------------------------------
 * The CPU decode runs the query heads of a group in register blocks of 1 to 4 heads (a group of
 * 5 is a block of 4 and one of 1, 12 is three of 4), reads rows of whole vectors in place in
 * their dtype and converts the others (D 33 at every width, 72 at W 16; 96 is whole vectors and,
 * a multiple of 32, also takes the tiles below); fp32 groups of a
 * multiple of W heads (8 and 16 at W 8; 16 and 32 at W 16; 4, 8, 12 and 16 at the generic
 * level's W 4) run heads-in-lanes instead, two KV heads of 8 for the chunks' offsets; at the amx
 * level, bf16 groups of 8 to 16 heads or a multiple of 16 with a head dim of a multiple of 32
 * (128, 256, 96) run on the tiles (32: two chunks of 16). Loop index: level (amx, avx512, avx2,
 * generic) x group size (1, 2, 3, 4, 5, 8, 12, 16, 32) x dtype; two problems each (D 128, and
 * one of 33, 256, 72, 8, 96), odd cache lengths in pages of random sizes (own buffers, or the
 * striped pages read in place), 1 to 3 query rows, every mask; within the dtype's tolerance of
 * float64, outputs poisoned before the call. */
START_TEST(test_decode_groups) {
  static const char *isa[4] = {"amx", "avx512", "avx2", "generic"};
  static const int reps[9] = {1, 2, 3, 4, 5, 8, 12, 16, 32};
  const int lv = _i / 27, rep = reps[(_i % 27) / 3];
  const da_dtype_t dt = dtypes[_i % 3];
  if (!use_isa(isa[lv], DA_FLOAT32)) return;
  for (int t = 0; t < 2; t++) {
    uint64_t rs = tu_seed(9900 + (uint64_t)(_i * 2 + t));
    const int D = t == 0 ? 128 : (int[]){33, 256, 72, 8, 96}[(_i / 3 + lv) % 5];
    const int G = rep > 8 ? 1 : 2, H = G * rep, mkind = (_i + t) % TU_NMASKS;
    const int64_t S = tu_rand(&rs, 200, 700) | 1, T = tu_rand(&rs, 1, 3);
    kc_t c;
    kc_init(&c, H, G, D, dt, da_span(S - T, 1, T), da_span(0, 1, S), S, mkind, &rs, tu_seed(rs));
    kc_name_isa(&c, isa[lv]);
    if (!supported(&c.p)) {
      kc_free(&c);
      continue;
    }
    kc_ref_fwd(&c);
    double *o = dalloc(T * H * D), *l = dalloc(T * H);
    for (int mode = SPLIT_WHOLE; mode <= SPLIT_STRIPED; mode++) {
      run_decode(&c, &c.p, mode, &rs, o, l);
      CHECK_FWD(&c, o, l, tu_tol(dt), mode == SPLIT_WHOLE ? "decode one page" : mode == SPLIT_CHUNKS ? "decode pages" : "decode striped pages");
    }
    tb_free(o), tb_free(l);
    kc_free(&c);
  }
}
END_TEST
#endif /* TB_CPU */

/* acc_store (the device ring's dK/dV folds and gradient stores): dst = x + y and dst = x, in each
 * storage dtype, rows with a padded stride (the padding must stay untouched), and in place
 * (dst == x, fp32), against x + y summed in double here and rounded once: fp32 exact, bf16 and
 * fp16 within half an ulp of their mantissas. */
START_TEST(test_acc_store) {
  const da_kernels_t *kt = tb_kernels();
  ck_assert_msg(kt->acc_store != NULL, "%s: no acc_store (the device ring needs it)", kt->name);
  const int64_t rows = 5, len = 37, ldd = 41;
  const size_t n = (size_t)(rows * len);
  float *x = tb_alloc(n * sizeof(float)), *y = tb_alloc(n * sizeof(float));
  char *dst = tb_alloc((size_t)(rows * ldd) * sizeof(float));
  uint64_t rs = 4242 + (uint64_t)_i;
  for (size_t i = 0; i < n; i++) x[i] = (float)(4 * tu_rand01(&rs) - 2), y[i] = (float)(4 * tu_rand01(&rs) - 2);
  static const da_dtype_t dts[3] = {DA_FLOAT32, DA_BFLOAT16, DA_FLOAT16};
  for (int t = 0; t < 3; t++)
    for (int add = 0; add < 2; add++) {
      const da_dtype_t dt = dts[t];
      /* half an ulp, a hair more for the fp32 rounding of the sum first; fp16's subnormals absolutely */
      const double ulp = dt == DA_FLOAT32 ? 0 : dt == DA_BFLOAT16 ? 0x1.01p-8 : 0x1.01p-11;
      const double tiny = dt == DA_FLOAT16 ? 0x1.0p-25 : 1e-30;
      memset(dst, 0xFF, (size_t)(rows * ldd) * sizeof(float));
      ck_assert(kt->acc_store(rows, len, x, add ? y : NULL, dst, dt, ldd, NULL) == DA_SUCCESS);
      ck_assert(tb_sync() == DA_SUCCESS);
      for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < ldd; j++) {
          const int64_t e = i * ldd + j;
          if (j >= len) { /* padding: the poison bytes are still there */
            const size_t es = dt == DA_FLOAT32 ? 4 : 2;
            for (size_t b = 0; b < es; b++) ck_assert_int_eq((unsigned char)dst[(size_t)e * es + b], 0xFF);
            continue;
          }
          const double want = (double)x[i * len + j] + (add ? (double)y[i * len + j] : 0.0);
          const double got = da_load_f32(dst, (int)dt, e);
          const double tol = dt == DA_FLOAT32 ? fabs(want - (double)(float)want) : fabs(want) * ulp + tiny;
          ck_assert_msg(fabs(got - want) <= tol, "%s acc_store %s%s row %lld col %lld: %.9g, want %.9g", kt->name,
                        dt == DA_FLOAT32 ? "fp32" : dt == DA_BFLOAT16 ? "bf16" : "fp16", add ? " x + y" : " x",
                        (long long)i, (long long)j, got, want);
        }
    }
  /* in place: x += y */
  float *want = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) want[i] = (float)((double)x[i] + (double)y[i]);
  ck_assert(kt->acc_store(1, (int64_t)n, x, y, x, DA_FLOAT32, (int64_t)n, NULL) == DA_SUCCESS);
  ck_assert(tb_sync() == DA_SUCCESS);
  for (size_t i = 0; i < n; i++) ck_assert_msg(x[i] == want[i], "in place x += y at %zu: %.9g, want %.9g", i, x[i], want[i]);
  free(want);
  tb_free(x), tb_free(y), tb_free(dst);
}
END_TEST

static Suite *kernels_suite(void) {
  Suite *s = suite_create("kernels");
  TCase *tc = tcase_create("contract");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_test(tc, test_supports);
  tcase_add_test(tc, test_acc_store);
  tcase_add_loop_test(tc, test_merge_empty, 0, 1);
  tcase_add_loop_test(tc, test_merge_orders, 0, TU_NMASKS);
  tcase_add_loop_test(tc, test_masked_rows, 0, TB_N_MASKED_ROWS);
  tcase_add_loop_test(tc, test_nan_propagation, 0, TB_N_NAN);
  suite_add_tcase(s, tc);

  tc = tcase_create("sweep");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_fwd_sweep, 0, 54);
  tcase_add_loop_test(tc, test_bwd_sweep, 0, 54);
  tcase_add_loop_test(tc, test_self_1000, TB_SELF_1000_FROM, TB_SELF_1000_TO);
  tcase_add_loop_test(tc, test_decode_sweep, 0, 36);
  suite_add_tcase(s, tc);

  tc = tcase_create("invariance");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_loop_test(tc, test_block_sizes, 0, TB_N_BLOCK_SIZES);
  tcase_add_loop_test(tc, test_threads, 0, TB_N_THREADS);
  tcase_add_loop_test(tc, test_block_splits, TB_BLOCK_SPLITS_FROM, TB_BLOCK_SPLITS_TO);
#ifdef TB_CPU
  tcase_add_loop_test(tc, test_isa_levels, 0, 6);
  tcase_add_loop_test(tc, test_bf16_levels, 0, 5 * TU_NMASKS);
  tcase_add_loop_test(tc, test_decode_groups, 0, 4 * 27);
  tcase_add_loop_test(tc, test_growing_scores, 0, 6);
  tcase_add_loop_test(tc, test_finish_rounding, 0, 6);
#endif
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  const int skip = tb_init();
  if (skip) return skip;
#ifndef TB_CPU
  /* fresh inputs every run: a seed from the clock unless DISTATTN_TEST_SEED is given (every
   * failure message prints the seed, so a failing run can be repeated) */
  if (!getenv("DISTATTN_TEST_SEED")) {
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)time(NULL) * 1000003ull + (unsigned long long)getpid());
    setenv("DISTATTN_TEST_SEED", seed, 1);
  }
  printf("# backend %s, DISTATTN_TEST_SEED=%s\n", TB_NAME, getenv("DISTATTN_TEST_SEED"));
#endif
  SRunner *sr = srunner_create(kernels_suite());
#ifdef TB_NOFORK
  srunner_set_fork_status(sr, CK_NOFORK); /* a CUDA context does not survive fork */
#endif
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
