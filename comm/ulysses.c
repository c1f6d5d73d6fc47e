/* ulysses.c: Ulysses attention (DeepSpeed-Ulysses), forward and backward, on any transport with
 * an all-to-all. Rank r owns a contiguous run of tokens with every head. An all-to-all turns that
 * into every token for H/P query heads (and the KV heads they read); the rank then runs the
 * ordinary kernels (da_kernels_t) on the whole sequence for its heads, on global positions, so
 * every mask works unchanged; a second all-to-all sends the results home.
 *
 * Layout of the gathered buffers: the all-to-all delivers the part of rank src as one piece, so
 * the gathered rows are kept in source order, not re-packed: row (src, t, b, i) of nt tensors of
 * the same width sits at nt*B*start[src] + (t*B + b)*count[src] + i (row_at). Each source's rows
 * of one tensor and batch element are contiguous positions [start[src], start[src] + count[src]),
 * so the kernels take them as one span and a Q block meets every KV block in P*P calls.
 *
 * GQA: query head h reads KV head h / (H/G). With G % P == 0 rank r takes KV heads
 * [r*G/P, (r+1)*G/P), exactly those its query heads read. With P % G == 0 (G < P) each rank's
 * H/P query heads read a single KV head, h0 / (H/G): that head is sent to the P/G ranks that need
 * it (replicated: its bytes are sent P/G times and counted so), and the dK/dV partials of those
 * ranks are summed at home in fp32. Other (H, G, P) are refused at plan time.
 *
 * The gradients travel home in fp32 (dq, and dk/dv whose replicated partials are summed there) and
 * are rounded to the storage dtype once, as the ring driver does. Buffers live for one call. The
 * all-to-alls are blocking (bounded by the transport's deadline): their time is exposed
 * communication, nothing overlaps it yet. */
#include <stdlib.h>
#include <string.h>
#include "dtype.h"
#include "ulysses.h"

/* Heads of this problem as Ulysses splits them. */
typedef struct {
  int Hl;        /* query heads per rank: H / P */
  int Gk;        /* KV heads each rank holds after the all-to-all: G / P, or 1 when replicated */
  int64_t S;     /* the whole sequence */
  da_kparams_t kp; /* the kernels' params on a rank's heads: H = Hl, G = Gk */
} uheads_t;

static uheads_t heads_of(const da_ring_t *R) {
  uheads_t u;
  const int P = R->P, G = R->kp.G;
  u.Hl = R->kp.H / P;
  u.Gk = G >= P ? G / P : 1;
  u.S = R->layout.seq;
  u.kp = R->kp;
  u.kp.H = u.Hl, u.kp.G = u.Gk;
  return u;
}

/* The first KV head rank dst takes. */
static int kv_first(const da_ring_t *R, int dst) {
  const int P = R->P, G = R->kp.G;
  return G >= P ? dst * (G / P) : dst / (P / G);
}

da_status_t da_ulysses_check(const da_kparams_t *kp, int P, const da_transport_t *t) {
  if (kp->H % P)
    return DA_ERR(DA_ERR_UNSUPPORTED, "ulysses: %d heads cannot be split over %d ranks (each rank takes heads / "
                  "ranks query heads: use a rank count that divides %d, or a ring algorithm)", kp->H, P, kp->H);
  if (kp->G % P && P % kp->G)
    return DA_ERR(DA_ERR_UNSUPPORTED, "ulysses: %d KV heads over %d ranks: KV heads must split evenly (kv_heads %% "
                  "ranks == 0) or be replicated per group (ranks %% kv_heads == 0)", kp->G, P);
  if (!t->alltoallv)
    return DA_ERR(DA_ERR_UNSUPPORTED, "ulysses: the %s transport has no all-to-all", t->name);
  return DA_SUCCESS;
}

static size_t esize(const da_ring_t *R) { return da_dtype_size(R->kp.dtype); }

/* Row (src, t, b, i) of nt gathered tensors (see the top of the file). */
static int64_t row_at(const da_ring_t *R, int nt, int src, int t, int64_t b, int64_t i) {
  const int64_t n = R->layout.counts[src];
  return nt * R->B * R->layout.starts[src] + (t * R->B + b) * n + i;
}

/* Sizes and offsets in bytes ([4][P]: send sizes, send offsets, receive sizes, receive offsets)
 * of an all-to-all of nt tensors whose per-rank part has w bytes per row. to_heads: from this
 * rank's tokens to its heads (send [dst][nt][B][nloc] rows, receive in source order as row_at);
 * else the reverse, results home. */
static void a2a_sizes(const da_ring_t *R, int nt, size_t w, int to_heads, size_t *c) {
  const int P = R->P;
  const size_t mine = (size_t)(nt * R->B * R->nloc) * w;
  for (int q = 0; q < P; q++) {
    const size_t theirs = (size_t)(nt * R->B * R->layout.counts[q]) * w;
    const size_t at = (size_t)(nt * R->B * R->layout.starts[q]) * w;
    const int s = to_heads ? 0 : 2, g = to_heads ? 2 : 0; /* which half is the scattered side */
    c[s * P + q] = mine, c[(s + 1) * P + q] = (size_t)q * mine;
    c[g * P + q] = theirs, c[(g + 1) * P + q] = at;
  }
}

/* Bytes sent to other ranks by that all-to-all. */
static uint64_t a2a_sent(const da_ring_t *R, int nt, size_t w, int to_heads) {
  uint64_t b = 0;
  for (int q = 0; q < R->P; q++)
    if (q != R->rank) b += to_heads ? (uint64_t)(nt * R->B * R->nloc) * w : (uint64_t)(nt * R->B * R->layout.counts[q]) * w;
  return b;
}

uint64_t da_ulysses_fwd_comm_bytes(const da_ring_t *R) {
  const uheads_t u = heads_of(R);
  const size_t es = esize(R), D = (size_t)R->kp.D;
  return a2a_sent(R, 1, u.Hl * D * es, 1) + a2a_sent(R, 2, u.Gk * D * es, 1) /* q; k, v */
         + a2a_sent(R, 1, u.Hl * D * es, 0) + a2a_sent(R, 1, u.Hl * sizeof(float), 0); /* out, lse */
}

uint64_t da_ulysses_bwd_comm_bytes(const da_ring_t *R) {
  const uheads_t u = heads_of(R);
  const size_t es = esize(R), D = (size_t)R->kp.D;
  return a2a_sent(R, 3, u.Hl * D * es, 1) + a2a_sent(R, 2, u.Gk * D * es, 1) /* q, out, dout; k, v */
         + a2a_sent(R, 1, u.Hl * sizeof(float), 1)                               /* lse */
         + a2a_sent(R, 1, u.Hl * D * sizeof(float), 0) + a2a_sent(R, 2, u.Gk * D * sizeof(float), 0); /* dq; dk dv */
}

/* One call's buffers, carved from one allocation (so its size is the memory figure exactly). */
typedef struct {
  size_t sz[16];
  int n;
  char *base;
} arena_t;

static void arena_add(arena_t *a, size_t bytes) { a->sz[a->n++] = (bytes + 63) / 64 * 64; }
static size_t arena_total(const arena_t *a) {
  size_t t = 0;
  for (int i = 0; i < a->n; i++) t += a->sz[i];
  return t;
}
/* Buffer i of the allocated arena. */
static void *arena_at(const arena_t *a, int i) {
  size_t off = 0;
  for (int j = 0; j < i; j++) off += a->sz[j];
  return a->base + off;
}

/* The buffers of one call. local: the rank computes on the gathered rows itself (pure Ulysses),
 * which needs the fp32 state (forward) or delta (backward) for the whole sequence; the hybrid's
 * compute phase (a ring) keeps its own. */
enum { F_SQ, F_SKV, F_AQ, F_AKV, F_AO, F_O, F_ML, F_AL, F_RO, F_RL, F_N };
static void fwd_layout(const da_ring_t *R, int local, arena_t *a) {
  const uheads_t u = heads_of(R);
  const size_t es = esize(R), D = (size_t)R->kp.D, B = (size_t)R->B, n = (size_t)R->nloc, S = (size_t)u.S;
  const size_t P = (size_t)R->P, H = (size_t)R->kp.H;
  memset(a, 0, sizeof *a);
  arena_add(a, B * n * H * D * es);            /* F_SQ: q to send, [P][B][n][Hl][D] */
  arena_add(a, 2 * B * n * P * u.Gk * D * es); /* F_SKV: k, v to send, [P][2][B][n][Gk][D] */
  arena_add(a, B * S * u.Hl * D * es);         /* F_AQ: every token's q for my heads */
  arena_add(a, 2 * B * S * u.Gk * D * es);     /* F_AKV: every token's k, v for my KV heads */
  arena_add(a, B * S * u.Hl * D * es);         /* F_AO: out for my heads */
  arena_add(a, local ? B * S * u.Hl * D * 4 : 0); /* F_O: fp32 state o */
  arena_add(a, local ? 2 * B * S * u.Hl * 4 : 0);  /* F_ML: m then l */
  arena_add(a, B * S * u.Hl * 4);              /* F_AL: lse for my heads */
  arena_add(a, B * n * H * D * es);            /* F_RO: out received home, [P][B][n][Hl][D] */
  arena_add(a, B * n * H * 4);                 /* F_RL: lse received home */
}

enum { B_SQOD, B_SKV, B_SL, B_AQOD, B_AKV, B_AL, B_DELTA, B_DQ, B_DKV, B_RDQ, B_RDKV, B_ACC, B_N };
static void bwd_layout(const da_ring_t *R, int local, arena_t *a) {
  const uheads_t u = heads_of(R);
  const size_t es = esize(R), D = (size_t)R->kp.D, B = (size_t)R->B, n = (size_t)R->nloc, S = (size_t)u.S;
  const size_t P = (size_t)R->P, H = (size_t)R->kp.H, G = (size_t)R->kp.G;
  memset(a, 0, sizeof *a);
  arena_add(a, 3 * B * n * H * D * es);        /* B_SQOD: q, out, dout to send */
  arena_add(a, 2 * B * n * P * u.Gk * D * es); /* B_SKV: k, v to send */
  arena_add(a, B * n * H * 4);                 /* B_SL: lse to send */
  arena_add(a, 3 * B * S * u.Hl * D * es);     /* B_AQOD: q, out, dout for my heads */
  arena_add(a, 2 * B * S * u.Gk * D * es);     /* B_AKV */
  arena_add(a, B * S * u.Hl * 4);              /* B_AL: lse */
  arena_add(a, local ? B * S * u.Hl * 4 : 0);  /* B_DELTA */
  arena_add(a, B * S * u.Hl * D * 4);          /* B_DQ: fp32 */
  arena_add(a, 2 * B * S * u.Gk * D * 4);      /* B_DKV: fp32 dk then dv */
  arena_add(a, B * n * H * D * 4);             /* B_RDQ: dq received home */
  arena_add(a, 2 * B * n * P * u.Gk * D * 4);  /* B_RDKV: dk, dv partials received home */
  arena_add(a, 2 * B * n * G * D * 4);         /* B_ACC: dk, dv summed over the partials */
}

size_t da_ulysses_fwd_bytes(const da_ring_t *R) {
  arena_t a;
  fwd_layout(R, 1, &a);
  return arena_total(&a);
}

size_t da_ulysses_bwd_bytes(const da_ring_t *R) {
  arena_t a;
  bwd_layout(R, 1, &a);
  return arena_total(&a);
}

size_t da_ulysses_xchg_fwd_bytes(const da_ring_t *R) {
  arena_t a;
  fwd_layout(R, 0, &a);
  return arena_total(&a);
}

size_t da_ulysses_xchg_bwd_bytes(const da_ring_t *R) {
  arena_t a;
  bwd_layout(R, 0, &a);
  return arena_total(&a);
}

int64_t da_ulysses_row(const da_ring_t *R, int nt, int src, int t, int64_t b, int64_t i) {
  return row_at(R, nt, src, t, b, i);
}

static da_status_t arena_alloc(da_ring_t *R, arena_t *a, const char *what) {
  const size_t total = arena_total(a);
  a->base = da_calloc(total ? total : 1, 64); /* zeroed: compute-only mode computes on them unfilled */
  if (!a->base) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d %s: %zu bytes of ulysses buffers", R->rank, what, total);
  return DA_SUCCESS;
}

static void arena_release(da_ring_t *R, arena_t *a) {
  /* After a timeout MPI may still write into the buffers: keep them out of use. */
  if (R->broken) DA_WARN(DA_SUB_COMM, "an all-to-all timed out; %zu bytes of ulysses buffers are kept out of use",
                         arena_total(a));
  else da_free(a->base);
  a->base = NULL;
}

/* Copy nt per-rank tensors (views v, heads of D elements of es bytes) into the send buffer of an
 * all-to-all: for every destination, the nh heads starting at first[dst] of every row. */
static void pack_send(const da_ring_t *R, const da_rview_t *v, int nt, const int *first, int nh, int64_t D,
                      size_t es, char *sbuf) {
  const int64_t B = R->B, n = R->nloc;
  const size_t w = (size_t)(nh * D) * es;
  for (int dst = 0; dst < R->P; dst++)
    for (int t = 0; t < nt; t++)
      for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++)
          memcpy(sbuf + (size_t)(((dst * nt + t) * B + b) * n + i) * w,
                 v[t].p + (size_t)(b * v[t].bs + i * v[t].ld + (int64_t)first[dst] * D) * es, w);
}

/* One all-to-all, its time counted as exposed communication and its bytes as sent. Skipped in
 * compute-only mode. A timeout breaks the plan (MPI may still write the buffers). */
static da_status_t a2a(da_ring_t *R, da_ring_stats_t *S, int nt, size_t w, int to_heads, const void *sbuf,
                       void *rbuf) {
  if (R->mode == DA_RING_COMPUTE_ONLY) return DA_SUCCESS;
  size_t c[4 * 64], *cc = R->P <= 64 ? c : malloc((size_t)4 * R->P * sizeof *cc);
  if (!cc) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "all-to-all sizes");
  a2a_sizes(R, nt, w, to_heads, cc);
  const double t0 = da_time_now();
  const int P = R->P;
  da_status_t st = R->xp->t->alltoallv(R->xp, sbuf, cc, cc + P, rbuf, cc + 2 * P, cc + 3 * P);
  S->step_wait_s[0] += da_time_now() - t0;
  if (cc != c) free(cc);
  if (st == DA_ERR_TIMEOUT) R->broken = 1;
  if (st == DA_SUCCESS) S->step_bytes[0] += a2a_sent(R, nt, w, to_heads);
  return st;
}

static void stats_begin(const da_ring_t *R, da_ring_stats_t *S) {
  S->wall_s = S->compute_s = S->exposed_s = 0;
  S->bytes_sent = 0;
  for (int s = 0; s < R->P; s++) S->step_compute_s[s] = S->step_wait_s[s] = 0, S->step_bytes[s] = 0;
}

/* Ulysses has no steps: everything is step 0's (compute, all-to-all time, bytes). */
static void stats_end(da_ring_stats_t *S, double t_start) {
  S->compute_s = S->step_compute_s[0];
  S->exposed_s = S->step_wait_s[0];
  S->bytes_sent = S->step_bytes[0];
  S->wall_s = da_time_now() - t_start;
}

/* The rank's query heads and KV heads, per destination. */
static void firsts(const da_ring_t *R, int Hl, int *fq, int *fk) {
  for (int q = 0; q < R->P; q++) fq[q] = q * Hl, fk[q] = kv_first(R, q);
}

/* Scatter gathered rows [P][nt=1][B][nloc][nh][D] (received home) into a per-rank tensor dst at
 * heads q*nh (dtype, from dtype or fp32 rows). */
static void unpack_home(const da_ring_t *R, const char *rbuf, int nh, int64_t D, int from_f32, da_rview_t dst) {
  const int64_t B = R->B, n = R->nloc;
  const size_t es = esize(R), rs = from_f32 ? sizeof(float) : es;
  const int dt = (int)R->kp.dtype;
  for (int q = 0; q < R->P; q++)
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < n; i++) {
        const char *s = rbuf + (size_t)(((q * B + b) * n + i) * nh * D) * rs;
        char *d = dst.p + (size_t)(b * dst.bs + i * dst.ld + (int64_t)q * nh * D) * es;
        if (!from_f32 || dt == DA_FLOAT32) memcpy(d, s, (size_t)(nh * D) * es);
        else
          for (int64_t j = 0; j < nh * D; j++) da_store_f32(d, dt, j, ((const float *)s)[j]);
      }
}

/* The forward's kernels (pure Ulysses' compute phase): every (Q block, KV block) of my heads,
 * then out and lse. */
static da_status_t fwd_compute(da_ring_t *R, const da_uly_io_t *io, void *ctx, void *stream) {
  (void)ctx;
  const uheads_t uh = heads_of(R), *u = &uh;
  const int P = R->P;
  const size_t es = esize(R);
  const int64_t D = R->kp.D, wq = u->Hl * D, wk = u->Gk * D, B = R->B;
  const char *aq = io->q, *akv = io->kv;
  float *o = io->o, *m = io->ml, *l = m + B * u->S * u->Hl;
  da_fwd_state_t all = {o, m, l, B * u->S};
  da_status_t st = B * u->S > 0 ? da_fwd_state_init(R->kt, &u->kp, &all, stream) : DA_SUCCESS;
  for (int qs = 0; qs < P && st == DA_SUCCESS; qs++) {
    const int64_t nq = R->layout.counts[qs];
    if (!nq) continue;
    const da_span_t qpos = da_span(R->layout.starts[qs], 1, nq);
    for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
      const int64_t qr = row_at(R, 1, qs, 0, b, 0);
      da_fwd_state_t sub = {o + qr * wq, m + qr * u->Hl, l + qr * u->Hl, nq};
      for (int ks = 0; ks < P && st == DA_SUCCESS; ks++) {
        const int64_t nk = R->layout.counts[ks];
        if (!nk) continue;
        st = R->kt->fwd_block(&u->kp, aq + (size_t)(qr * wq) * es, wq, qpos,
                              akv + (size_t)(row_at(R, 2, ks, 0, b, 0) * wk) * es, wk,
                              akv + (size_t)(row_at(R, 2, ks, 1, b, 0) * wk) * es, wk,
                              da_span(R->layout.starts[ks], 1, nk), &sub, stream);
      }
      if (st == DA_SUCCESS)
        st = R->kt->fwd_finish(&u->kp, &sub, io->out + (size_t)(qr * wq) * es, R->kp.dtype, wq,
                               io->lse_out + qr * u->Hl, stream);
    }
  }
  return st;
}

da_status_t da_ulysses_fwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                           void *stream) {
  return da_ulysses_fwd_with(R, q, k, v, out, lse, fwd_compute, NULL, stream);
}

da_status_t da_ulysses_fwd_with(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out, float *lse,
                                da_uly_compute_fn compute, void *ctx, void *stream) {
  const int local = compute == fwd_compute;
  const double t_start = da_time_now();
  da_ring_stats_t *S = &R->fwd;
  stats_begin(R, S);
  R->xp->phase = "forward";
  const uheads_t u = heads_of(R);
  const size_t es = esize(R);
  const int64_t D = R->kp.D;
  int fq[R->P], fk[R->P];
  firsts(R, u.Hl, fq, fk);
  arena_t a;
  fwd_layout(R, local, &a);
  da_status_t st = DA_SUCCESS, st_comm = arena_alloc(R, &a, "forward");
  if (st_comm) goto done;
  /* Tokens -> heads: q, then k and v together. */
  pack_send(R, &q, 1, fq, u.Hl, D, es, arena_at(&a, F_SQ));
  const da_rview_t kv[2] = {k, v};
  pack_send(R, kv, 2, fk, u.Gk, D, es, arena_at(&a, F_SKV));
  if ((st_comm = a2a(R, S, 1, (size_t)(u.Hl * D) * es, 1, arena_at(&a, F_SQ), arena_at(&a, F_AQ)))) goto done;
  if ((st_comm = a2a(R, S, 2, (size_t)(u.Gk * D) * es, 1, arena_at(&a, F_SKV), arena_at(&a, F_AKV)))) goto done;
  const double t0 = da_time_now();
  /* A kernel failure still sends the results home, so the peers finish and the plan agrees. */
  const da_uly_io_t io = {.q = arena_at(&a, F_AQ), .kv = arena_at(&a, F_AKV), .out = arena_at(&a, F_AO),
                         .lse_out = arena_at(&a, F_AL), .o = arena_at(&a, F_O), .ml = arena_at(&a, F_ML)};
  /* Comm-only skips the local kernels; a hybrid's compute phase is a ring, whose transfers run. */
  if (R->mode != DA_RING_COMM_ONLY || !local) st = compute(R, &io, ctx, stream);
  S->step_compute_s[0] += da_time_now() - t0;
  /* Heads -> tokens: out and lse home. */
  if ((st_comm = a2a(R, S, 1, (size_t)(u.Hl * D) * es, 0, arena_at(&a, F_AO), arena_at(&a, F_RO)))) goto done;
  if ((st_comm = a2a(R, S, 1, u.Hl * sizeof(float), 0, arena_at(&a, F_AL), arena_at(&a, F_RL)))) goto done;
  if (st == DA_SUCCESS && R->mode == DA_RING_RUN) {
    unpack_home(R, arena_at(&a, F_RO), u.Hl, D, 0, out);
    if (lse) {
      /* lse [B][n][H] packed: the same scatter with one-float "heads". */
      const float *rl = arena_at(&a, F_RL);
      for (int p = 0; p < R->P; p++)
        for (int64_t b = 0; b < R->B; b++)
          for (int64_t i = 0; i < R->nloc; i++)
            memcpy(lse + (b * R->nloc + i) * R->kp.H + p * u.Hl, rl + ((p * R->B + b) * R->nloc + i) * u.Hl,
                   (size_t)u.Hl * sizeof(float));
    }
  }
done:
  if (a.base) arena_release(R, &a);
  stats_end(S, t_start);
  return st_comm ? st_comm : st;
}

/* The backward's kernels (pure Ulysses' compute phase): delta, then every (Q block, KV block)
 * into fp32 dq, dk, dv. */
static da_status_t bwd_compute(da_ring_t *R, const da_uly_io_t *io, void *ctx, void *stream) {
  (void)ctx;
  const uheads_t uh = heads_of(R), *u = &uh;
  const int P = R->P;
  const size_t es = esize(R);
  const int64_t D = R->kp.D, wq = u->Hl * D, wk = u->Gk * D, B = R->B;
  const char *aqod = io->q, *akv = io->kv;
  const float *al = io->lse;
  float *delta = io->delta, *dq = io->dq, *dkv = io->dkv;
  da_status_t st = DA_SUCCESS;
  for (int qs = 0; qs < P && st == DA_SUCCESS; qs++) {
    const int64_t nq = R->layout.counts[qs];
    if (!nq) continue;
    const da_span_t qpos = da_span(R->layout.starts[qs], 1, nq);
    for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
      const int64_t qr = row_at(R, 1, qs, 0, b, 0); /* lse, delta, dq rows */
      const char *qp = aqod + (size_t)(row_at(R, 3, qs, 0, b, 0) * wq) * es;
      const char *op = aqod + (size_t)(row_at(R, 3, qs, 1, b, 0) * wq) * es;
      const char *dop = aqod + (size_t)(row_at(R, 3, qs, 2, b, 0) * wq) * es;
      st = R->kt->bwd_prep(&u->kp, nq, op, wq, dop, wq, delta + qr * u->Hl, stream);
      for (int ks = 0; ks < P && st == DA_SUCCESS; ks++) {
        const int64_t nk = R->layout.counts[ks];
        if (!nk) continue;
        const int64_t kr = row_at(R, 2, ks, 0, b, 0), vr = row_at(R, 2, ks, 1, b, 0);
        st = R->kt->bwd_block(&u->kp, qp, wq, dop, wq, al + qr * u->Hl, delta + qr * u->Hl, qpos,
                              akv + (size_t)(kr * wk) * es, wk, akv + (size_t)(vr * wk) * es, wk,
                              da_span(R->layout.starts[ks], 1, nk), dq + qr * wq, dkv + kr * wk, dkv + vr * wk,
                              stream);
      }
    }
  }
  return st;
}

/* dk, dv home: the partials of every rank [P][2][B][n][Gk][D] fp32 summed into acc
 * [2][B][n][G][D] at their KV heads (several ranks share a head when it was replicated), then
 * stored in the storage dtype. */
static void dkv_home(const da_ring_t *R, const uheads_t *u, const float *rdkv, float *acc, da_rview_t dk,
                     da_rview_t dv) {
  const int64_t B = R->B, n = R->nloc, D = R->kp.D, G = R->kp.G, wk = u->Gk * D;
  for (int q = 0; q < R->P; q++)
    for (int t = 0; t < 2; t++)
      for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++) {
          const float *s = rdkv + (((q * 2 + t) * B + b) * n + i) * wk;
          float *d = acc + ((t * B + b) * n + i) * G * D + (int64_t)kv_first(R, q) * D;
          for (int64_t j = 0; j < wk; j++) d[j] += s[j];
        }
  const size_t es = esize(R);
  const int dt = (int)R->kp.dtype;
  for (int t = 0; t < 2; t++) {
    const da_rview_t o = t ? dv : dk;
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < n; i++) {
        const float *s = acc + ((t * B + b) * n + i) * G * D;
        char *d = o.p + (size_t)(b * o.bs + i * o.ld) * es;
        if (dt == DA_FLOAT32) memcpy(d, s, (size_t)(G * D) * sizeof(float));
        else
          for (int64_t j = 0; j < G * D; j++) da_store_f32(d, dt, j, s[j]);
      }
  }
}

da_status_t da_ulysses_bwd(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                           da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                           void *stream) {
  return da_ulysses_bwd_with(R, q, k, v, out, dout, lse, dq, dk, dv, bwd_compute, NULL, stream);
}

da_status_t da_ulysses_bwd_with(da_ring_t *R, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                                da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv,
                                da_uly_compute_fn compute, void *ctx, void *stream) {
  const int local = compute == bwd_compute;
  const double t_start = da_time_now();
  da_ring_stats_t *S = &R->bwd;
  stats_begin(R, S);
  R->xp->phase = "backward";
  const uheads_t u = heads_of(R);
  const size_t es = esize(R);
  const int64_t D = R->kp.D, H = R->kp.H;
  int fq[R->P], fk[R->P];
  firsts(R, u.Hl, fq, fk);
  arena_t a;
  bwd_layout(R, local, &a);
  da_status_t st = DA_SUCCESS, st_comm = arena_alloc(R, &a, "backward");
  if (st_comm) goto done;
  /* Tokens -> heads: q, out, dout together; k, v together; lse (fp32, one float per head). */
  const da_rview_t qod[3] = {q, out, dout}, kv[2] = {k, v};
  pack_send(R, qod, 3, fq, u.Hl, D, es, arena_at(&a, B_SQOD));
  pack_send(R, kv, 2, fk, u.Gk, D, es, arena_at(&a, B_SKV));
  const da_rview_t lv = {(char *)lse, R->nloc * H, H};
  pack_send(R, &lv, 1, fq, u.Hl, 1, sizeof(float), arena_at(&a, B_SL));
  if ((st_comm = a2a(R, S, 3, (size_t)(u.Hl * D) * es, 1, arena_at(&a, B_SQOD), arena_at(&a, B_AQOD)))) goto done;
  if ((st_comm = a2a(R, S, 2, (size_t)(u.Gk * D) * es, 1, arena_at(&a, B_SKV), arena_at(&a, B_AKV)))) goto done;
  if ((st_comm = a2a(R, S, 1, u.Hl * sizeof(float), 1, arena_at(&a, B_SL), arena_at(&a, B_AL)))) goto done;
  const double t0 = da_time_now();
  const da_uly_io_t io = {.q = arena_at(&a, B_AQOD), .kv = arena_at(&a, B_AKV), .lse = arena_at(&a, B_AL),
                         .dq = arena_at(&a, B_DQ), .dkv = arena_at(&a, B_DKV), .delta = arena_at(&a, B_DELTA)};
  /* Comm-only skips the local kernels; a hybrid's compute phase is a ring, whose transfers run. */
  if (R->mode != DA_RING_COMM_ONLY || !local) st = compute(R, &io, ctx, stream);
  S->step_compute_s[0] += da_time_now() - t0;
  /* Heads -> tokens: dq; dk and dv partials (fp32). */
  if ((st_comm = a2a(R, S, 1, (size_t)(u.Hl * D) * sizeof(float), 0, arena_at(&a, B_DQ), arena_at(&a, B_RDQ))))
    goto done;
  if ((st_comm = a2a(R, S, 2, (size_t)(u.Gk * D) * sizeof(float), 0, arena_at(&a, B_DKV), arena_at(&a, B_RDKV))))
    goto done;
  if (st == DA_SUCCESS && R->mode == DA_RING_RUN) {
    unpack_home(R, arena_at(&a, B_RDQ), u.Hl, D, 1, dq);
    dkv_home(R, &u, arena_at(&a, B_RDKV), arena_at(&a, B_ACC), dk, dv);
  }
done:
  if (a.base) arena_release(R, &a);
  stats_end(S, t_start);
  return st_comm ? st_comm : st;
}

/* ---- hybrid: Ulysses inside groups of U ranks, the ring across the groups -------------------
 * The group's all-to-all (the exchanges above, on the group's communicator) gives each of its U
 * ranks the group's rows for H/U query heads (and their KV heads); those rows are re-packed
 * batch-major ([B][n_g][heads][D]) and handed to the unchanged ring driver, which runs across the
 * P/U groups among the ranks with the same index j (same heads) on the ring layout over groups;
 * its out / lse (dq, dk, dv) go back through the regroup and the all-to-all home. Positions are
 * global all the way down, so every mask works; the ring layout's own balance (striped, zigzag)
 * is kept because the ring sees exactly that layout over P/U "ranks". */

da_status_t da_hybrid_check(const da_kparams_t *kp, int P, int U, const da_transport_t *t) {
  if (U < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "hybrid: ulysses degree %d (--ulysses, da_plan_config_t.ulysses): it must be >= 1 (ranks per group; "
                  "the ring runs across ranks / degree groups)", U);
  if (P % U)
    return DA_ERR(DA_ERR_UNSUPPORTED, "hybrid: ulysses degree %d does not divide %d ranks (groups of %d consecutive "
                  "ranks, the ring across them: use a degree that divides the rank count)", U, P, U);
  if (kp->H % U)
    return DA_ERR(DA_ERR_UNSUPPORTED, "hybrid: %d heads cannot be split over ulysses degree %d (each rank of a group "
                  "takes heads / degree query heads: use a degree that divides %d)", kp->H, U, kp->H);
  if (kp->G % U && U % kp->G)
    return DA_ERR(DA_ERR_UNSUPPORTED, "hybrid: %d KV heads over ulysses degree %d: KV heads must split evenly "
                  "(kv_heads %% degree == 0) or be replicated per group (degree %% kv_heads == 0)", kp->G, U);
  if (!t->alltoallv) return DA_ERR(DA_ERR_UNSUPPORTED, "hybrid: the %s transport has no all-to-all", t->name);
  return DA_SUCCESS;
}

da_status_t da_hybrid_init(da_hybrid_t *h, da_ring_t *top, MPI_Comm comm, const char *transport, double timeout,
                           da_layout_kind_t kind, int U, int64_t seq) {
  memset(h, 0, sizeof *h);
  h->gcomm = h->rcomm = MPI_COMM_NULL;
  const int P = top->P, r = top->rank, g = r / U, j = r % U;
  h->U = U, h->groups = P / U;
  /* Group: key j keeps rank order; ring: ranks with index j ordered by group. */
  DA_MPICHECK(MPI_Comm_split(comm, g, j, &h->gcomm), "rank %d: the hybrid's group communicator", r);
  DA_MPICHECK(MPI_Comm_split(comm, j, g, &h->rcomm), "rank %d: the hybrid's ring communicator", r);
  DA_CHECK(da_xport_open(&h->gxp, transport, h->gcomm, timeout));
  DA_CHECK(da_xport_open(&h->rxp, transport, h->rcomm, timeout));
  /* The ring across groups: H/U query heads and the KV heads they read (G/U, or 1 replicated). */
  da_ring_t *X = &h->ring;
  X->kt = top->kt, X->kp = top->kp;
  X->kp.H = top->kp.H / U;
  X->kp.G = top->kp.G >= U ? top->kp.G / U : 1;
  DA_CHECK(da_layout_init(&X->layout, kind, seq, h->groups, NULL));
  X->xp = &h->rxp, X->rank = g, X->P = h->groups, X->B = top->B;
  X->nloc = da_layout_count(&X->layout, g);
  X->nmax = da_layout_max_count(&X->layout);
  /* Ulysses over the group: its "sequence" is the group's n_g local rows, in U contiguous runs
   * (the contiguous split, so any n_g works, 0 included). */
  da_ring_t *Y = &h->uly;
  Y->kt = top->kt, Y->kp = top->kp, Y->xp = &h->gxp, Y->rank = j, Y->P = U, Y->B = top->B;
  Y->layout.kind = DA_LAYOUT_CONTIGUOUS, Y->layout.seq = X->nloc, Y->layout.nranks = U;
  Y->layout.counts = da_calloc((size_t)U * sizeof(int64_t), 64);
  Y->layout.starts = da_calloc((size_t)U * sizeof(int64_t), 64);
  h->steps = calloc((size_t)4 * U, sizeof *h->steps);
  h->bytes = calloc((size_t)2 * U, sizeof *h->bytes);
  if (!Y->layout.counts || !Y->layout.starts || !h->steps || !h->bytes)
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "hybrid tables");
  for (int q = 0, at = 0; q < U; q++) {
    Y->layout.counts[q] = X->nloc / U + (q < X->nloc % U);
    Y->layout.starts[q] = at;
    at += (int)Y->layout.counts[q];
  }
  Y->nloc = Y->layout.counts[j];
  Y->nmax = X->nmax / U + (X->nmax % U != 0);
  Y->fwd.step_compute_s = h->steps, Y->fwd.step_wait_s = h->steps + U;
  Y->bwd.step_compute_s = h->steps + 2 * U, Y->bwd.step_wait_s = h->steps + 3 * U;
  Y->fwd.step_bytes = h->bytes, Y->bwd.step_bytes = h->bytes + U;
  top->nloc = Y->nloc, top->nmax = Y->nmax;
  return DA_SUCCESS;
}

da_status_t da_hybrid_schedule(da_hybrid_t *h, int64_t block) {
  return da_schedule_ring(&h->ring.layout, &h->ring.kp.mask, block, &h->ring.sched);
}

void da_hybrid_free(da_hybrid_t *h) {
  da_ring_release(&h->ring);
  da_schedule_free(&h->ring.sched);
  da_layout_free(&h->ring.layout);
  da_layout_free(&h->uly.layout);
  da_xport_close(&h->gxp);
  da_xport_close(&h->rxp);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    if (h->gcomm != MPI_COMM_NULL) MPI_Comm_free(&h->gcomm);
    if (h->rcomm != MPI_COMM_NULL) MPI_Comm_free(&h->rcomm);
  }
  free(h->steps), free(h->bytes);
  memset(h, 0, sizeof *h);
  h->gcomm = h->rcomm = MPI_COMM_NULL;
}

void da_hybrid_positions(const da_hybrid_t *h, int64_t *pos) {
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  const int ns = da_layout_segments(&h->ring.layout, h->ring.rank, segs);
  const int64_t first = h->uly.layout.starts[h->uly.rank], n = h->uly.nloc;
  int64_t row = 0;
  for (int s = 0; s < ns; s++)
    for (int64_t i = 0; i < segs[s].count; i++, row++)
      if (row >= first && row < first + n) pos[row - first] = da_span_at(segs[s], i);
}

/* The regroup buffers of a call: the group's rows batch-major for the ring, [B][n_g][heads][D].
 * Forward: q, k, v, out (dtype), lse (fp32). Backward: q, out, dout, k, v, lse, and the ring's
 * dq, dk, dv (dtype). */
enum { HF_Q, HF_K, HF_V, HF_O, HF_L, HF_N };
enum { HB_Q, HB_O, HB_DO, HB_K, HB_V, HB_L, HB_DQ, HB_DK, HB_DV, HB_N };
static void hy_layout(const da_hybrid_t *h, int bwd, arena_t *a) {
  const uheads_t u = heads_of(&h->uly);
  const size_t es = esize(&h->uly), D = (size_t)h->uly.kp.D, rows = (size_t)(h->ring.B * h->ring.nloc);
  const size_t q = rows * u.Hl * D * es, kv = rows * u.Gk * D * es, l = rows * u.Hl * sizeof(float);
  memset(a, 0, sizeof *a);
  if (!bwd) {
    arena_add(a, q), arena_add(a, kv), arena_add(a, kv), arena_add(a, q), arena_add(a, l);
  } else {
    arena_add(a, q), arena_add(a, q), arena_add(a, q), arena_add(a, kv), arena_add(a, kv), arena_add(a, l);
    arena_add(a, q), arena_add(a, kv), arena_add(a, kv);
  }
}

size_t da_hybrid_fwd_bytes(const da_hybrid_t *h) {
  arena_t a;
  hy_layout(h, 0, &a);
  return da_ulysses_xchg_fwd_bytes(&h->uly) + arena_total(&a) + da_ring_fwd_bytes(&h->ring);
}

size_t da_hybrid_bwd_bytes(const da_hybrid_t *h) {
  arena_t a;
  hy_layout(h, 1, &a);
  return da_ulysses_xchg_bwd_bytes(&h->uly) + arena_total(&a) + da_ring_bwd_bytes(&h->ring);
}

uint64_t da_hybrid_fwd_comm_bytes(const da_hybrid_t *h) {
  return da_ulysses_fwd_comm_bytes(&h->uly) + da_ring_fwd_comm_bytes(&h->ring);
}

uint64_t da_hybrid_bwd_comm_bytes(const da_hybrid_t *h) {
  return da_ulysses_bwd_comm_bytes(&h->uly) + da_ring_bwd_comm_bytes(&h->ring);
}

/* Move nt tensors of w bytes per row between the gathered source order (row_at of the group's
 * Ulysses) and batch-major buffers bm[t] ([B][n_g] rows). to_bm: gathered -> batch-major. Each
 * source's rows of one tensor and batch element are one contiguous run on both sides. */
static void regroup(const da_ring_t *Y, int nt, size_t w, char *gathered, char *const *bm, int to_bm) {
  const int64_t n = Y->layout.seq;
  for (int src = 0; src < Y->P; src++) {
    const size_t cnt = (size_t)Y->layout.counts[src];
    if (!cnt) continue;
    for (int t = 0; t < nt; t++)
      for (int64_t b = 0; b < Y->B; b++) {
        char *g = gathered + (size_t)row_at(Y, nt, src, t, b, 0) * w;
        char *m = bm[t] + (size_t)(b * n + Y->layout.starts[src]) * w;
        memcpy(to_bm ? m : g, to_bm ? g : m, cnt * w);
      }
  }
}

/* As regroup from batch-major dtype rows (width w elements) to gathered fp32 rows: the ring's
 * gradients into the fp32 partials Ulysses sends home (and sums there when KV heads were
 * replicated). */
static void regroup_to_f32(const da_ring_t *Y, int nt, int64_t w, float *gathered, char *const *bm) {
  const int64_t n = Y->layout.seq;
  const int dt = (int)Y->kp.dtype;
  const size_t es = esize(Y);
  for (int src = 0; src < Y->P; src++) {
    const int64_t cnt = Y->layout.counts[src];
    for (int t = 0; t < nt; t++)
      for (int64_t b = 0; b < Y->B; b++) {
        float *g = gathered + row_at(Y, nt, src, t, b, 0) * w;
        const char *m = bm[t] + (size_t)((b * n + Y->layout.starts[src]) * w) * es;
        for (int64_t e = 0; e < cnt * w; e++) g[e] = da_load_f32(m, dt, e);
      }
  }
}

/* One compute phase of the hybrid, forward or backward (the two differ only in what they regroup
 * and which ring call they make): the ring across groups, its row widths and the regroup buffers
 * of hy_layout, allocated in one piece. */
typedef struct {
  da_ring_t *X;             /* the ring across groups */
  int64_t n, wq, wk;        /* its rows per rank; elements of a q-like row (Hl * D), of a k/v row (Gk * D) */
  size_t qrow, kvrow, lrow; /* bytes of a dtype q-like row, a dtype k/v row, an fp32 lse row */
  arena_t a;
} hy_phase_t;

static da_status_t hy_phase_open(const da_ring_t *Y, da_hybrid_t *h, int bwd, hy_phase_t *p, char **buf) {
  const uheads_t u = heads_of(Y);
  const size_t es = esize(Y);
  p->X = &h->ring;
  p->n = p->X->nloc, p->wq = u.Hl * Y->kp.D, p->wk = u.Gk * Y->kp.D;
  p->qrow = (size_t)p->wq * es, p->kvrow = (size_t)p->wk * es, p->lrow = (size_t)u.Hl * sizeof(float);
  hy_layout(h, bwd, &p->a);
  const size_t total = arena_total(&p->a);
  p->a.base = da_calloc(total ? total : 1, 64);
  if (!p->a.base)
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d %s: %zu bytes of hybrid regroup buffers", h->uly.rank,
                  bwd ? "backward" : "forward", total);
  for (int i = 0; i < p->a.n; i++) buf[i] = arena_at(&p->a, i);
  return DA_SUCCESS;
}

static void hy_phase_close(hy_phase_t *p) {
  /* After a timeout of the ring MPI may still write into the buffers: keep them out of use. */
  if (p->X->broken)
    DA_WARN(DA_SUB_COMM, "the hybrid's ring timed out; %zu bytes of regroup buffers are kept out of use",
            arena_total(&p->a));
  else
    da_free(p->a.base);
}

/* The forward's compute phase: the group's rows batch-major, the ring across groups, back. */
static da_status_t hy_fwd_compute(da_ring_t *Y, const da_uly_io_t *io, void *ctx, void *stream) {
  hy_phase_t p;
  char *b[HF_N];
  DA_CHECK(hy_phase_open(Y, ctx, 0, &p, b));
  const int64_t n = p.n, wq = p.wq, wk = p.wk;
  regroup(Y, 1, p.qrow, (char *)io->q, b + HF_Q, 1);
  regroup(Y, 2, p.kvrow, (char *)io->kv, b + HF_K, 1);
  const da_rview_t q = {b[HF_Q], n * wq, wq}, k = {b[HF_K], n * wk, wk}, v = {b[HF_V], n * wk, wk};
  const da_rview_t out = {b[HF_O], n * wq, wq};
  da_status_t st = da_ring_fwd(p.X, q, k, v, out, (float *)b[HF_L], stream);
  regroup(Y, 1, p.qrow, io->out, b + HF_O, 0);
  regroup(Y, 1, p.lrow, (char *)io->lse_out, b + HF_L, 0);
  hy_phase_close(&p);
  return st;
}

static da_status_t hy_bwd_compute(da_ring_t *Y, const da_uly_io_t *io, void *ctx, void *stream) {
  hy_phase_t p;
  char *b[HB_N];
  DA_CHECK(hy_phase_open(Y, ctx, 1, &p, b));
  const int64_t n = p.n, wq = p.wq, wk = p.wk;
  regroup(Y, 3, p.qrow, (char *)io->q, b + HB_Q, 1); /* q, out, dout */
  regroup(Y, 2, p.kvrow, (char *)io->kv, b + HB_K, 1);
  regroup(Y, 1, p.lrow, (char *)io->lse, b + HB_L, 1);
  const da_rview_t q = {b[HB_Q], n * wq, wq}, o = {b[HB_O], n * wq, wq}, dout = {b[HB_DO], n * wq, wq};
  const da_rview_t k = {b[HB_K], n * wk, wk}, v = {b[HB_V], n * wk, wk};
  const da_rview_t dq = {b[HB_DQ], n * wq, wq}, dk = {b[HB_DK], n * wk, wk}, dv = {b[HB_DV], n * wk, wk};
  da_status_t st = da_ring_bwd(p.X, q, k, v, o, dout, (const float *)b[HB_L], dq, dk, dv, stream);
  regroup_to_f32(Y, 1, wq, io->dq, b + HB_DQ);
  regroup_to_f32(Y, 2, wk, io->dkv, b + HB_DK);
  hy_phase_close(&p);
  return st;
}

/* Before a call: the plan's mode on both levels; the ring's step figures land in the plan's
 * arrays (top's, P >= P/U steps), cleared in full since the ring clears only its own steps. */
static void hy_begin(const da_ring_t *top, da_hybrid_t *h, da_ring_stats_t *T, da_ring_stats_t *X) {
  h->uly.mode = h->ring.mode = top->mode;
  for (int s = 0; s < top->P; s++) T->step_compute_s[s] = T->step_wait_s[s] = 0, T->step_bytes[s] = 0;
  X->step_compute_s = T->step_compute_s, X->step_wait_s = T->step_wait_s, X->step_bytes = T->step_bytes;
  X->wall_s = X->compute_s = X->exposed_s = 0, X->bytes_sent = 0;
}

/* After: the plan's figures. The all-to-alls are exposed (step 0's wait and bytes); compute is
 * the compute phase less the ring's waits (the regroup copies count as compute, as packing does
 * in the ring). */
static void hy_end(da_ring_t *top, const da_hybrid_t *h, da_ring_stats_t *T, const da_ring_stats_t *Ys,
                   const da_ring_stats_t *X) {
  const double phase = Ys->compute_s - X->exposed_s;
  T->wall_s = Ys->wall_s;
  T->exposed_s = Ys->exposed_s + X->exposed_s;
  T->compute_s = phase > 0 ? phase : 0;
  T->bytes_sent = Ys->bytes_sent + X->bytes_sent;
  T->step_wait_s[0] += Ys->exposed_s;
  T->step_bytes[0] += Ys->bytes_sent;
  const double extra = Ys->compute_s - X->wall_s; /* the regroup copies */
  if (extra > 0) T->step_compute_s[0] += extra;
  if (h->uly.broken || h->ring.broken) top->broken = 1;
}

da_status_t da_hybrid_fwd(da_ring_t *top, da_hybrid_t *h, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                          float *lse, void *stream) {
  hy_begin(top, h, &top->fwd, &h->ring.fwd);
  da_status_t st = da_ulysses_fwd_with(&h->uly, q, k, v, out, lse, hy_fwd_compute, h, stream);
  hy_end(top, h, &top->fwd, &h->uly.fwd, &h->ring.fwd);
  return st;
}

da_status_t da_hybrid_bwd(da_ring_t *top, da_hybrid_t *h, da_rview_t q, da_rview_t k, da_rview_t v, da_rview_t out,
                          da_rview_t dout, const float *lse, da_rview_t dq, da_rview_t dk, da_rview_t dv, void *stream) {
  hy_begin(top, h, &top->bwd, &h->ring.bwd);
  da_status_t st = da_ulysses_bwd_with(&h->uly, q, k, v, out, dout, lse, dq, dk, dv, hy_bwd_compute, h, stream);
  hy_end(top, h, &top->bwd, &h->uly.bwd, &h->ring.bwd);
  return st;
}
