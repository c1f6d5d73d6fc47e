/* cmd_plan.c: `distattn plan`, the closed-form cost model of the ring / striped / zigzag drivers,
 * of Ulysses and the hybrid Ulysses x ring (forward), and of tree / ring decode (docs/scaling.md). Per ring step: the slowest rank's kernel time
 * (calls x fixed cost + FLOPs / rate, from the layout's exact pair counts under the mask) against
 * the KV block's transfer (latency + bytes / bandwidth of the ring's slowest link); a step takes
 * the larger. It names the fastest algorithm and block and the smallest shard whose compute hides
 * its transfer (Liu et al.'s condition). It runs nothing and needs no MPI; sim/ checks it against
 * the real drivers under SimGrid. Masks: none and causal (others are refused, not guessed). */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "args.h"
#include "launcher.h"
#include "paths.h"
#include "report.h"

typedef struct machine {
  const char *name;
  double fwd_tflops, bwd_tflops, mem_gbps, call_us; /* kernel rates (sim/sim.h) */
  double link_gbps, link_us;                         /* inside a node, per direction */
  double net_gbps, net_us;                           /* between nodes, per GPU NIC */
  int64_t node;                                      /* ranks per node */
  int64_t nics;                                      /* NICs per node (1: one uplink shared by the node) */
} machine_t;

/* Presets: H100 SXM (FA3-class kernels, anchors.md: 616 TF causal fwd, 561 bwd; HBM 3.0 TB/s
 * measured; NVLink4 450 GB/s; NDR 50 GB/s per GPU), A100 SXM (FA2-class 190 / 150 TF, HBM
 * 1.8 TB/s; NVLink3 300 GB/s; HDR 25 GB/s) and this 2-core VM's CPU ranks (docs/scaling.md:
 * calibrated from `distattn kernel`, Open MPI shared memory ~4 GB/s per rank). The link latencies
 * match sim/mkplatform.py's routes: inside a node two GPU links; across nodes two GPU links, both
 * NICs and the core switch (h100: 2 x 1.0 + 2 x 2.0 + 1.0 = 7 us; a100: 2 x 1.5 + 2 x 2.5 + 1.0 = 9 us;
 * the platform folds half the core's latency into each uplink). */
static const machine_t machines[] = {
    {"h100", 600, 450, 3000, 10, 450, 2.0, 50, 7.0, 8, 1},
    {"h100rail", 600, 450, 3000, 10, 450, 2.0, 50, 7.0, 8, 8}, /* one NIC per GPU (mkplatform.py h100rail) */
    {"a100", 190, 150, 1800, 10, 300, 3.0, 25, 9.0, 8, 1},
    {"cpu", 0.10, 0.08, 10, 20, 4, 5.0, 4, 5.0, 2, 1},
};
static const char *const machine_names[] = {"h100", "h100rail", "a100", "cpu", NULL};
static const char *const algo_names[] = {"ring", "striped", "zigzag", "ulysses", "hybrid", NULL};
enum { ALGO_RING, ALGO_STRIPED, ALGO_ZIGZAG, ALGO_ULYSSES, ALGO_HYBRID, ALGO_COUNT }; /* indices of algo_names */
#define ALGO_BIT(a) (1u << (a))
#define ALGO_ALL_BITS (ALGO_BIT(ALGO_COUNT) - 1u)
static const char *const layout_names[] = {"ring", "striped", "zigzag", NULL}; /* the hybrid's ring */
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};
enum { DTYPE_FP32, DTYPE_BF16 }; /* indices of dtype_names: fp32 has 4 bytes per element, the others 2 */

typedef struct problem {
  int64_t P, S, B, H, G, D, block;
  int causal, bwd;
  double e; /* bytes per element */
  /* The ring's hop, when not the machine's plain one (the hybrid's ring of groups): GB/s and us
   * per direction; 0 = inside a node when P fits one, else one GPU's NIC. */
  double hop_gbps, hop_us;
} problem_t;

typedef struct estimate {
  int64_t n, block, calls;          /* largest shard, sub-block, kernel calls per rank */
  double step_compute_s, step_xfer_s; /* a middle step (s >= 1): slowest rank's kernels, the transfer */
  double fwd_s, bwd_s, exposed_s, compute_s;
  double mem_bytes;                 /* per rank: inputs, outputs, ring buffers */
} estimate_t;

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* The slowest rank's pairs and kernel calls at step s (0 = own block), per batch element.
 * Contiguous causal: s = 0 the diagonal block, s >= 1 a full block on the ranks after the
 * source. Striped: every step about half a block (n(n+1)/2 when the source is not after the rank).
 * Zigzag (chunks of c = n/2): s = 0 c^2 + c(c+1), s >= 1 exactly 2c^2 on every rank. */
static void step_work(int algo, const problem_t *p, int64_t n, int64_t blk, int s, double *pairs, int64_t *calls) {
  if (!p->causal) {
    *pairs = (double)n * n;
    *calls = algo == ALGO_ZIGZAG ? 4 * cdiv(cdiv(n, 2), blk) : cdiv(n, blk);
    return;
  }
  if (algo == ALGO_RING) {
    *pairs = s == 0 ? (double)n * (n + 1) / 2 : (double)n * n;
    *calls = cdiv(n, blk);
  } else if (algo == ALGO_STRIPED) {
    *pairs = (double)n * (n + 1) / 2;
    *calls = cdiv(n, blk);
  } else {
    double c = (double)cdiv(n, 2);
    *pairs = s == 0 ? c * c + c * (c + 1) : 2 * c * c;
    *calls = (s == 0 ? 3 : 2) * cdiv(cdiv(n, 2), blk);
  }
}

static double link_time(const machine_t *m, const problem_t *p, double bytes) {
  if (p->hop_gbps > 0) return p->hop_us * 1e-6 + bytes / (p->hop_gbps * 1e9);
  int inter = p->P > m->node;
  double bw = (inter ? m->net_gbps : m->link_gbps) * 1e9, lat = (inter ? m->net_us : m->link_us) * 1e-6;
  return lat + bytes / bw;
}

static int64_t auto_block(int64_t n) {
  int64_t b = cdiv(cdiv(n, 4), 64) * 64;
  return b < 1024 ? 1024 : b;
}

static estimate_t model(int algo, const machine_t *m, const problem_t *p, int64_t blk) {
  estimate_t E;
  memset(&E, 0, sizeof E);
  const int64_t n = cdiv(p->S, p->P), B = p->B;
  E.n = n;
  E.block = blk = blk > 0 ? blk : auto_block(n);
  const double F = m->fwd_tflops * 1e12, Fb = m->bwd_tflops * 1e12, t0 = m->call_us * 1e-6, M = m->mem_gbps * 1e9;
  const double kv = 2.0 * B * n * p->G * p->D * p->e, dkv = 2.0 * B * n * p->G * p->D * 4;
  const double state = (double)B * n * p->H * (p->D + 2) * 4;
  /* init, packing the own KV block (read + write), finish */
  E.fwd_s = t0 + state / M + 2 * kv / M + t0 * B + (double)B * n * p->H * p->D * (4 + p->e) / M;
  /* The driver's host passes (comm/ring.c, da_payload): clearing dq and the own dK/dV sum, packing,
   * then delta; at the end the own sum's last add and storing dq, dk, dv in the input dtype. */
  const double big = (double)B * n * p->H * p->D * 4, own = dkv;
  if (p->bwd)
    E.bwd_s = (big + own) / M + 2 * kv / M + t0 * B + (double)B * n * p->H * p->D * 2 * p->e / M +
              (p->P > 1 ? 3 * own / M : 0) + (big + own) * (4 + p->e) / 4 / M;
  for (int s = 0; s < p->P; s++) {
    double pairs;
    int64_t calls;
    step_work(algo, p, n, blk, s, &pairs, &calls);
    const double cf = B * (calls * t0 + 4.0 * p->H * p->D * pairs / F);
    const double xf = s + 1 < p->P ? link_time(m, p, kv) : 0;
    E.fwd_s += cf > xf ? cf : xf;
    E.exposed_s += xf > cf ? xf - cf : 0;
    E.compute_s += cf;
    E.calls += B * calls;
    if (s == (p->P > 1 ? 1 : 0)) E.step_compute_s = cf, E.step_xfer_s = xf;
    if (p->bwd) {
      /* The KV block and, one hop behind, the fp32 dK/dV sum share the link to r+1. */
      /* Kernels, then clearing this step's dK/dV part (s >= 1) and adding it to the sum that came
       * from r-1 (s >= 2): memory passes of the driver on the same device. */
      const double cb = B * (calls * t0 + 10.0 * p->H * p->D * pairs / Fb) + (s >= 1 ? dkv / M : 0) +
                        (s >= 2 ? 3 * dkv / M : 0);
      const double xb = (s + 1 < p->P ? link_time(m, p, kv) : 0) + (s >= 1 && p->P > 1 ? link_time(m, p, dkv) : 0);
      E.bwd_s += cb > xb ? cb : xb;
      E.exposed_s += xb > cb ? xb - cb : 0;
      E.compute_s += cb;
    }
  }
  /* Inputs q, k, v, out (+ dout, dq, dk, dv), lse; two KV slots and the fp32 state (docs/ring.md);
   * backward: three travelling fp32 dK/dV sums and the own one. */
  const double rowq = (double)p->H * p->D * p->e, rowk = (double)p->G * p->D * p->e;
  E.mem_bytes = B * n * (2 * rowq + 2 * rowk + 4.0 * p->H) + 2 * kv + state;
  if (p->bwd) E.mem_bytes += B * n * (2 * rowq + 2 * rowk) + 4 * dkv;
  return E;
}

/* A node's GPUs crossing to other nodes at once, `cross` of them: each gets its own NIC's rate while
 * the node has a NIC per crossing GPU, else an equal share of the node's NICs. GB/s. */
static double net_rate(const machine_t *m, int64_t cross) {
  const double share = (double)m->nics * m->net_gbps / (double)(cross > 0 ? cross : 1);
  return share < m->net_gbps ? share : m->net_gbps;
}

/* One all-to-all among U consecutive ranks, `pair` bytes from every rank to every other, all
 * posted at once (SMPI's and Open MPI's basic linear alltoallv): the busiest resource's load over
 * its rate, plus one latency. A GPU's NVLink link carries its pairs inside the node; on a
 * one-uplink machine (nics == 1, sim/mkplatform.py h100) its pairs to other nodes ride it too. The
 * L ranks of the group on one node cross to the other U - L at once (net_rate). */
static double a2a_time(const machine_t *m, int64_t U, double pair) {
  if (U < 2 || pair <= 0) return 0;
  const int64_t L = U < m->node ? U : m->node;
  const double nvl = (double)(m->nics == 1 ? U - 1 : L - 1) * pair;
  double t = m->link_us * 1e-6 + nvl / (m->link_gbps * 1e9);
  if (U > L) {
    const double x = m->net_us * 1e-6 + (double)(U - L) * pair / (net_rate(m, L) * 1e9);
    if (x > t) t = x;
  }
  return t;
}

static estimate_t best_block(int a, const machine_t *m, const problem_t *p);

/* Ulysses over groups of U consecutive ranks, forward (comm/ulysses.c; the hybrid as issue 20 and
 * docs/ulysses.md describe it). Each rank holds n = S/P tokens with all heads. In: q (H/U heads
 * to each peer of the group) and k, v (Gk = G/U heads each, or the one head its queries read,
 * replicated, when G < U) by two all-to-alls, after the host packs them (read + write at the
 * memory rate: the simulator charges comm/ulysses.c's copies so). U == P (pure Ulysses): the kernels
 * on the whole sequence for H/P heads, one call per (Q source, KV source) pair that the mask
 * allows, fwd_finish per Q source; then out and lse home by two all-to-alls and the unpacking.
 * U < P (hybrid): the ring of R = P/U groups runs on the group's S/R tokens for H/U heads (this
 * file's ring model, with the hop of rank i of a group to rank i of the next: across nodes once
 * P exceeds a node, min(U, node) GPUs of a node crossing at once), plus one more pass over the
 * gathered rows to lay them out for the ring and one over out before it goes home. All-to-all time
 * is exposed (nothing overlaps it). */
static estimate_t ulysses_model(int layout, const machine_t *m, const problem_t *p, int64_t U) {
  estimate_t E;
  memset(&E, 0, sizeof E);
  const int64_t P = p->P, B = p->B, n = cdiv(p->S, P), R = P / U, Hl = p->H / U, Gk = p->G >= U ? p->G / U : 1;
  const double e = p->e, D = (double)p->D, M = m->mem_gbps * 1e9, t0 = m->call_us * 1e-6, F = m->fwd_tflops * 1e12;
  const double Sg = (double)U * n; /* the group's tokens */
  const double pack = 2.0 * B * n * ((double)p->H + 2.0 * Gk * U) * D * e / M;
  const double unpack = 2.0 * B * n * p->H * D * e / M;
  const double a2a = a2a_time(m, U, B * n * Hl * D * e) + a2a_time(m, U, B * n * 2.0 * Gk * D * e) +
                     a2a_time(m, U, B * n * Hl * D * e) + a2a_time(m, U, B * n * Hl * 4.0);
  if (R == 1) {
    const double S = (double)p->S, pairs = p->causal ? S * (S + 1) / 2 : S * S;
    const double calls = p->causal ? U * (U + 1) / 2.0 : (double)U * U;
    const double kern = B * (calls * t0 + 4.0 * Hl * D * pairs / F);
    const double finish = B * (U * t0 + S * Hl * (D * (4 + e) + 12) / M), init = B * S * Hl * (D + 2) * 4 / M;
    E.n = p->S, E.block = n, E.calls = B * (int64_t)(calls + U);
    E.compute_s = kern + finish + init;
    E.step_compute_s = E.compute_s;
  } else {
    problem_t q = *p;
    q.P = R, q.H = Hl, q.G = Gk, q.bwd = 0;
    if (P > m->node) q.hop_gbps = net_rate(m, U < m->node ? U : m->node), q.hop_us = m->net_us;
    else q.hop_gbps = m->link_gbps, q.hop_us = m->link_us;
    E = best_block(layout, m, &q);
    const double relay = 2.0 * B * Sg * ((double)Hl + 2.0 * Gk) * D * e / M + 2.0 * B * Sg * Hl * D * e / M;
    E.fwd_s += relay;
  }
  if (R == 1) E.step_xfer_s = a2a; /* hybrid: the ring hop's, from its model */
  E.fwd_s += pack + a2a + unpack + (R == 1 ? E.compute_s : 0);
  E.exposed_s += a2a;
  /* Caller's q, k, v, out; send buffers; the gathered q, k, v and fp32 state (pure) or the ring's
   * own (hybrid); out for the group's tokens and the receive buffers home. */
  const double rowq = (double)p->H * D * e, rowk = (double)p->G * D * e;
  E.mem_bytes = B * n * (2 * rowq + 2 * rowk) + B * n * ((double)p->H + 2.0 * Gk * U) * D * e +
                (R == 1 ? B * Sg * ((Hl + 2.0 * Gk) * D * e + Hl * (D + 2) * 4) : E.mem_bytes) +
                B * Sg * Hl * D * e + B * n * rowq;
  return E;
}

/* Whether Ulysses of degree U applies (comm/ulysses.c's plan-time check): H % U == 0 and the KV
 * heads split (G % U == 0) or replicate (U % G == 0); U divides P. NULL if so, else why not. */
static const char *ulysses_refusal(const problem_t *p, int64_t U) {
  if (U < 1 || p->P % U) return "the degree does not divide the ranks";
  if (p->H % U) return "the query heads do not split over the degree";
  if (p->G % U && U % p->G) return "the KV heads neither split nor replicate over the degree";
  return NULL;
}

/* Smallest shard n whose middle-step compute hides the KV transfer (forward), by bisection on the
 * model itself (FLOPs and link latency, no call costs); and Liu et al.'s bare condition for a full block:
 * 4 n^2 H D / F >= 2 n G D e / BW, i.e. n >= F G e / (2 H BW). */
static int64_t hide_threshold(int algo, const machine_t *m0, const problem_t *p0) {
  problem_t p = *p0;
  machine_t mm = *m0, *m = &mm;
  mm.call_us = 0; /* FLOPs against bytes, as in Liu et al.: a call's fixed cost is not work */
  if (p.P < 2) return 0;
  int64_t lo = 1, hi = (int64_t)1 << 32;
  for (int it = 0; it < 64 && lo < hi; it++) {
    int64_t mid = lo + (hi - lo) / 2;
    p.S = mid * p.P;
    estimate_t E = model(algo, m, &p, 0);
    if (E.step_compute_s >= E.step_xfer_s) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/* Decode: the tree is one shard decode and an allreduce of B*H*(D+1) fp32 rows by recursive
 * doubling (Open MPI's choice for small allreduces; sim/sweep.py pins it in SMPI): log2 P exchange
 * rounds, those inside a node at NVLink cost; in a round across nodes every rank of a node crosses
 * at once, sharing the node's network rate (one NIC per node, as sim/mkplatform.py). The ring is P
 * dependent shard decodes and P - 1 hops carrying the partials and the query, then a broadcast
 * (binomial: log2 P hops). */
static void decode_model(const machine_t *m, const problem_t *p, double *tree_s, double *ring_s) {
  const double shard = 2.0 * p->B * cdiv(p->S, p->P) * p->G * p->D * p->e;
  const double k = m->call_us * 1e-6 + shard / (m->mem_gbps * 1e9);
  const double part = (double)p->B * p->H * (p->D + 1) * 4, q = (double)p->B * p->H * p->D * p->e;
  int lg = 0, lgn = 0;
  while ((1LL << lg) < p->P) lg++;
  while ((1LL << lgn) < m->node && (1LL << lgn) < p->P) lgn++;
  const double hop_in = m->link_us * 1e-6 + part / (m->link_gbps * 1e9);
  const double hop_out = m->net_us * 1e-6 + part / (m->net_gbps * 1e9);
  const double per_node = (double)(p->P < m->node ? p->P : m->node);
  const double hop_x = m->net_us * 1e-6 + per_node * part / (m->net_gbps * 1e9);
  *tree_s = k + lgn * hop_in + (lg - lgn) * hop_x;
  /* The ring's P - 1 dependent hops: all but nodes - 1 of them inside a node. */
  const double msg = part + q, nodes = (double)cdiv(p->P, m->node);
  const double ring_hops = (p->P - nodes) * (m->link_us * 1e-6 + msg / (m->link_gbps * 1e9)) +
                           (nodes - 1) * (m->net_us * 1e-6 + msg / (m->net_gbps * 1e9));
  *ring_s = p->P * k + ring_hops + lgn * hop_in + (lg - lgn) * hop_out;
}

/* The command line: the problem, the algorithms to model, and the machine's rates and links
 * (presets, each overridable; a negative value keeps the preset). */
typedef struct plan_opts {
  int64_t P, S, B, H, G, D, block, node, U;
  unsigned algos; /* ALGO_BIT set: --algo ring,zigzag,... or all */
  int mach, dtype, bwd, decode, layout;
  da_mask_spec_t mask;
  double fwd_tf, bwd_tf, mem, call, lgb, lus, ngb, nus;
  const char *json;
} plan_opts_t;

static void override(double *field, double v) {
  if (v >= 0) *field = v;
}

/* The preset machine with the command line's overrides. -1 when a rate or bandwidth is not > 0. */
static int machine_of(const plan_opts_t *o, machine_t *m) {
  *m = machines[o->mach];
  override(&m->fwd_tflops, o->fwd_tf), override(&m->bwd_tflops, o->bwd_tf), override(&m->mem_gbps, o->mem);
  override(&m->call_us, o->call), override(&m->link_gbps, o->lgb), override(&m->link_us, o->lus);
  override(&m->net_gbps, o->ngb), override(&m->net_us, o->nus);
  if (o->node > 0) m->node = o->node;
  return m->fwd_tflops > 0 && m->bwd_tflops > 0 && m->mem_gbps > 0 && m->link_gbps > 0 && m->net_gbps > 0 ? 0 : -1;
}

/* Parse and check the command line into o, the machine m and the problem p. Returns -1 to go on,
 * else the exit code (0 after --help, 2 on a usage error). */
static int plan_parse(int argc, char **argv, plan_opts_t *o, machine_t *m, problem_t *p) {
  *o = (plan_opts_t){.P = 8, .S = 256 * 1024, .B = 1, .H = 32, .G = 0, .D = 128, .algos = ALGO_ALL_BITS, .layout = ALGO_ZIGZAG,
                     .dtype = DTYPE_BF16, .mask = {{DA_MASK_CAUSAL, 0, 0, NULL}, NULL}, .fwd_tf = -1,
                     .bwd_tf = -1, .mem = -1, .call = -1, .lgb = -1, .lus = -1, .ngb = -1, .nus = -1};
  da_opt_t opts[] = {
      {.name = "ranks", .type = DA_OPT_INT, .dest = &o->P, .help = "ranks P", .min = 1, .max = 1 << 20, .alias = "np"},
      {.name = "seq", .type = DA_OPT_SIZE, .dest = &o->S, .help = "sequence length S (decode: context)", .min = 1,
       .max = 1LL << 40, .alias = "context"},
      {.name = "batch", .type = DA_OPT_INT, .dest = &o->B, .help = "batch B", .min = 1, .max = 1 << 20},
      {.name = "heads", .type = DA_OPT_INT, .dest = &o->H, .help = "query heads H", .min = 1, .max = 65536},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &o->G, .help = "KV heads G (0 = H)", .min = 0, .max = 65536},
      {.name = "dim", .type = DA_OPT_INT, .dest = &o->D, .help = "head dim D", .min = 1, .max = 65536},
      {.name = "mask", .type = DA_OPT_MASK, .dest = &o->mask, .help = "none or causal"},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &o->dtype, .help = "storage dtype", .choices = dtype_names},
      {.name = "algo", .type = DA_OPT_SET, .dest = &o->algos,
       .help = "algorithms to model and choose among (comma list, or all)", .choices = algo_names},
      {.name = "ulysses", .type = DA_OPT_INT, .dest = &o->U,
       .help = "hybrid: Ulysses degree U (groups of U consecutive ranks; 0 = every U dividing P and H)", .min = 0,
       .max = 1 << 20},
      {.name = "layout", .type = DA_OPT_ENUM, .dest = &o->layout, .help = "hybrid: the ring's layout",
       .choices = layout_names},
      {.name = "block", .type = DA_OPT_SIZE, .dest = &o->block, .help = "KV sub-block (0 = search 256.. and auto)",
       .min = 0, .max = 1LL << 40},
      {.name = "backward", .type = DA_OPT_FLAG, .dest = &o->bwd, .help = "forward + backward"},
      {.name = "decode", .type = DA_OPT_FLAG, .dest = &o->decode, .help = "also model one decode step (tree vs ring)"},
      {.name = "machine", .type = DA_OPT_ENUM, .dest = &o->mach, .help = "preset rates and links",
       .choices = machine_names},
      {.name = "fwd-tflops", .type = DA_OPT_DOUBLE, .dest = &o->fwd_tf, .help = "forward kernel TFLOP/s (<0: preset)",
       .dmin = -1, .dmax = 1e6},
      {.name = "bwd-tflops", .type = DA_OPT_DOUBLE, .dest = &o->bwd_tf, .help = "backward kernel TFLOP/s", .dmin = -1,
       .dmax = 1e6},
      {.name = "mem-gbps", .type = DA_OPT_DOUBLE, .dest = &o->mem, .help = "memory GB/s", .dmin = -1, .dmax = 1e6},
      {.name = "call-us", .type = DA_OPT_DOUBLE, .dest = &o->call, .help = "fixed cost per kernel call, us", .dmin = -1,
       .dmax = 1e6},
      {.name = "link-gbps", .type = DA_OPT_DOUBLE, .dest = &o->lgb, .help = "link GB/s inside a node", .dmin = -1,
       .dmax = 1e6},
      {.name = "link-us", .type = DA_OPT_DOUBLE, .dest = &o->lus, .help = "link latency inside a node, us", .dmin = -1,
       .dmax = 1e6},
      {.name = "net-gbps", .type = DA_OPT_DOUBLE, .dest = &o->ngb, .help = "network GB/s per rank", .dmin = -1,
       .dmax = 1e6},
      {.name = "net-us", .type = DA_OPT_DOUBLE, .dest = &o->nus, .help = "network latency, us", .dmin = -1,
       .dmax = 1e6},
      {.name = "node", .type = DA_OPT_INT, .dest = &o->node, .help = "ranks per node (0: preset)", .min = 0,
       .max = 1 << 20},
      {.name = "json", .type = DA_OPT_STRING, .dest = &o->json, .metavar = "FILE",
       .help = "append one JSON object per algorithm"},
      {0},
  };
  da_cmdspec_t cmd = {.name = "plan",
                      .summary = "closed-form time, exposed communication and memory per rank of ring / striped / "
                                 "zigzag / ulysses / hybrid (and tree / ring decode) on a given machine, and the "
                                 "best algorithm and degrees with the reason; runs nothing",
                      .opts = opts};
  int prc = da_args_parse(&cmd, argc, argv);
  if (prc == DA_ARGS_HELP) return 0;
  if (prc != DA_ARGS_OK) return 2;
  const unsigned mf = o->mask.mask.flags;
  da_mask_spec_free(&o->mask);
  if (mf != DA_MASK_NONE && mf != DA_MASK_CAUSAL) return da_args_error(&cmd, "the model covers --mask none and causal only");
  if (o->G == 0) o->G = o->H;
  if (o->H % o->G)
    return da_args_error(&cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o->H, (long long)o->G);
  if (da_paths_refuse_json("plan", o->json)) return 2;
  if (o->json && da_json_check_path(o->json)) return 2;
  if (machine_of(o, m)) return da_args_error(&cmd, "rates and bandwidths must be > 0");
  const unsigned uh = ALGO_BIT(ALGO_ULYSSES) | ALGO_BIT(ALGO_HYBRID);
  if (!o->algos) return da_args_error(&cmd, "--algo names no algorithm");
  if (o->bwd && (o->algos & uh) && o->algos != ALGO_ALL_BITS)
    return da_args_error(&cmd, "the model of ulysses and hybrid covers the forward only (no --backward)");
  if (o->U && !(o->algos & ALGO_BIT(ALGO_HYBRID)))
    return da_args_error(&cmd, "--ulysses is the hybrid's degree (--algo hybrid or all)");
  if (o->U && (o->P % o->U || o->H % o->U))
    return da_args_error(&cmd, "--ulysses %lld must divide --ranks %lld and --heads %lld", (long long)o->U,
                         (long long)o->P, (long long)o->H);
  *p = (problem_t){
      o->P, o->S, o->B, o->H, o->G, o->D, o->block, mf == DA_MASK_CAUSAL, o->bwd, o->dtype == DTYPE_FP32 ? 4.0 : 2.0,
      0, 0};
  return -1;
}

static void print_header(const plan_opts_t *o, const machine_t *m, const problem_t *p) {
  printf("# distattn plan: P = %lld, S = %lld, B = %lld, H = %lld, G = %lld, D = %lld, %s, %s, %s\n", (long long)p->P,
         (long long)p->S, (long long)p->B, (long long)p->H, (long long)p->G, (long long)p->D,
         p->causal ? "causal" : "none", dtype_names[o->dtype], p->bwd ? "forward + backward" : "forward");
  printf(
      "# machine %s: kernels %.4g / %.4g TFLOP/s (fwd / bwd), %.4g GB/s memory, %.3g us per call; links %.4g GB/s "
      "%.3g us inside nodes of %lld, %.4g GB/s %.3g us between (%lld NIC%s per node)\n",
      m->name, m->fwd_tflops, m->bwd_tflops, m->mem_gbps, m->call_us, m->link_gbps, m->link_us, (long long)m->node,
      m->net_gbps, m->net_us, (long long)m->nics, m->nics == 1 ? "" : "s");
  printf("# %-11s %8s %9s %12s %12s %12s %12s %12s %10s\n", "algo", "block", "calls", "step_comp_s", "step_xfer_s",
         "fwd_s", "bwd_s", "exposed_s", "mem_GB");
}

/* The fastest block for algorithm a: the given one, else the automatic choice and powers of two
 * from 256 up to the shard (segment for zigzag) -- at least two calls per segment so the transfer
 * is polled. Ties go to the larger block. */
static estimate_t best_block(int a, const machine_t *m, const problem_t *p) {
  const int64_t n = (p->S + p->P - 1) / p->P;
  int64_t cands[40];
  int nc = 0;
  if (p->block > 0)
    cands[nc++] = p->block;
  else {
    int64_t seg = a == ALGO_ZIGZAG ? (n + 1) / 2 : n;
    cands[nc++] = 0;
    for (int64_t b = 256; b <= seg / 2 && nc < 40; b *= 2) cands[nc++] = b;
  }
  estimate_t best_e;
  memset(&best_e, 0, sizeof best_e);
  double bt = INFINITY;
  for (int i = 0; i < nc; i++) {
    estimate_t E = model(a, m, p, cands[i]);
    double t = E.fwd_s + E.bwd_s;
    if (t < bt * (1 - 1e-9) || (fabs(t - bt) <= 1e-9 * bt && E.block > best_e.block)) bt = t, best_e = E;
  }
  return best_e;
}

/* One JSON record for algorithm a's estimate E. 0 on success. */
static int json_algo(const plan_opts_t *o, const machine_t *m, const problem_t *p, int a, int64_t U,
                     const estimate_t *E) {
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "plan");
  da_json_str(&j, "algo", algo_names[a]);
  da_json_int(&j, "ranks", p->P), da_json_int(&j, "seq", p->S), da_json_int(&j, "batch", p->B);
  da_json_int(&j, "heads", p->H), da_json_int(&j, "kv_heads", p->G), da_json_int(&j, "dim", p->D);
  da_json_str(&j, "mask", p->causal ? "causal" : "none"), da_json_str(&j, "dtype", dtype_names[o->dtype]);
  da_json_bool(&j, "backward", p->bwd), da_json_str(&j, "machine", m->name);
  da_json_int(&j, "block", E->block), da_json_int(&j, "calls", E->calls);
  da_json_dbl(&j, "step_compute_s", E->step_compute_s), da_json_dbl(&j, "step_xfer_s", E->step_xfer_s);
  da_json_dbl(&j, "fwd_s", E->fwd_s), da_json_dbl(&j, "bwd_s", E->bwd_s);
  da_json_dbl(&j, "total_s", E->fwd_s + E->bwd_s), da_json_dbl(&j, "comm_exposed_s", E->exposed_s);
  da_json_dbl(&j, "compute_s", E->compute_s), da_json_dbl(&j, "mem_bytes", E->mem_bytes);
  if (a < ALGO_ULYSSES) da_json_int(&j, "hide_min_tokens_per_rank", hide_threshold(a, m, p));
  else {
    da_json_int(&j, "ulysses", U), da_json_int(&j, "ring_degree", p->P / U);
    if (a == ALGO_HYBRID) da_json_str(&j, "layout", layout_names[o->layout]);
  }
  int rc = da_json_append(&j, o->json);
  da_json_free(&j);
  return rc;
}

/* Where the transfers hide: the model's threshold per algorithm, Liu et al.'s condition, and this
 * problem's verdict for the best algorithm. */
static void print_hiding(const machine_t *m, const problem_t *p, int best_a) {
  const int64_t n = (p->S + p->P - 1) / p->P;
  const int inter = p->P > m->node;
  const double F = m->fwd_tflops * 1e12, bw = (inter ? m->net_gbps : m->link_gbps) * 1e9;
  const double liu = F * p->G * p->e / (2.0 * p->H * bw);
  printf("# ring hides its transfers from %lld tokens per rank (model, contiguous ring); "
         "striped %lld, zigzag %lld; Liu et al. full-block condition n >= F*G*e/(2*H*BW) = %.0f (%s link)\n",
         (long long)hide_threshold(ALGO_RING, m, p), (long long)hide_threshold(ALGO_STRIPED, m, p),
         (long long)hide_threshold(ALGO_ZIGZAG, m, p), liu, inter ? "network" : "in-node");
  printf("# this problem: %lld tokens per rank: %s\n", (long long)n,
         n >= hide_threshold(best_a, m, p) ? "transfers hidden" : "transfer-bound (exposed communication)");
}

/* One decode step, tree against ring: the line and (--json) its record. 0 on success. */
static int decode_report(const plan_opts_t *o, const machine_t *m, const problem_t *p) {
  double tt, tr;
  decode_model(m, p, &tt, &tr);
  printf("# decode step, context %lld: tree %.4e s, ring %.4e s (ring / tree %.2fx)\n", (long long)p->S, tt, tr,
         tr / tt);
  if (!o->json) return 0;
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "plan-decode");
  da_json_int(&j, "ranks", p->P), da_json_int(&j, "context", p->S), da_json_int(&j, "batch", p->B);
  da_json_int(&j, "heads", p->H), da_json_int(&j, "kv_heads", p->G), da_json_int(&j, "dim", p->D);
  da_json_str(&j, "machine", m->name), da_json_dbl(&j, "tree_s", tt), da_json_dbl(&j, "ring_s", tr);
  int rc = da_json_append(&j, o->json);
  da_json_free(&j);
  return rc;
}

/* The best of the rows printed so far: algorithm, Ulysses degree, estimate. */
typedef struct best {
  int a;
  int64_t U;
  estimate_t E;
  double t;
} best_t;

static int row(const plan_opts_t *o, const machine_t *m, const problem_t *p, int a, int64_t U, const estimate_t *E,
               best_t *b) {
  char name[32];
  if (a == ALGO_HYBRID) snprintf(name, sizeof name, "hybrid/%lld", (long long)U);
  else snprintf(name, sizeof name, "%s", algo_names[a]);
  const double t = E->fwd_s + E->bwd_s;
  printf("  %-11s %8lld %9lld %12.4e %12.4e %12.4e %12.4e %12.4e %10.3f\n", name, (long long)E->block,
         (long long)E->calls, E->step_compute_s, E->step_xfer_s, E->fwd_s, E->bwd_s, E->exposed_s, E->mem_bytes / 1e9);
  if (t < b->t) b->a = a, b->U = U, b->E = *E, b->t = t;
  return o->json ? json_algo(o, m, p, a, U, E) : 0;
}

/* Why the best is best: compute-bound when exposed communication is under a tenth of its time,
 * else link-bound; and the head count where it kept Ulysses from the whole job. */
static void print_best(const plan_opts_t *o, const machine_t *m, const problem_t *p, const best_t *b,
                       const char *uly_refused) {
  const double fl = 4.0 * p->B * p->H * p->D * (p->causal ? (double)p->S * (p->S + 1) / 2 : (double)p->S * p->S) /
                    (p->P * m->fwd_tflops * 1e12);
  const double xf = b->E.exposed_s / b->t;
  if (b->a == ALGO_HYBRID)
    printf("# best: hybrid, ulysses %lld x ring %lld (%s), block %lld (%.4g s)", (long long)b->U,
           (long long)(p->P / b->U), layout_names[o->layout], (long long)b->E.block, b->t);
  else if (b->a == ALGO_ULYSSES) printf("# best: ulysses, degree %lld (%.4g s)", (long long)p->P, b->t);
  else printf("# best: %s, block %lld (%.4g s)", algo_names[b->a], (long long)b->E.block, b->t);
  printf(": %s (exposed communication %.0f%% of the time)", xf < 0.1 ? "compute-bound" : "link-bound", 100 * xf);
  if (!p->bwd) printf("; %.2fx the compute floor (%.4g s: forward FLOPs / (P x %.4g TFLOP/s))", b->t / fl, fl,
                      m->fwd_tflops);
  if (uly_refused && b->a != ALGO_ULYSSES)
    printf("; head count: ulysses alone is refused at P = %lld (%s; H = %lld, G = %lld)", (long long)p->P,
           uly_refused, (long long)p->H, (long long)p->G);
  printf("\n");
}

int da_cmd_plan(int argc, char **argv) {
  plan_opts_t o;
  machine_t m = machines[0];
  problem_t p = {0};
  int rc = plan_parse(argc, argv, &o, &m, &p);
  if (rc >= 0) return rc;
  print_header(&o, &m, &p);
  best_t best = {-1, 0, {0}, INFINITY};
  for (int a = 0; a < ALGO_ULYSSES; a++) {
    if (!(o.algos & ALGO_BIT(a))) continue;
    const estimate_t E = best_block(a, &m, &p);
    if (row(&o, &m, &p, a, 0, &E, &best)) return 1;
  }
  /* Ulysses and hybrid: forward only; every degree their plan-time checks accept. */
  const char *uly_refused = ulysses_refusal(&p, p.P);
  const unsigned uh = ALGO_BIT(ALGO_ULYSSES) | ALGO_BIT(ALGO_HYBRID);
  if (!p.bwd && (o.algos & ALGO_BIT(ALGO_ULYSSES))) {
    if (!uly_refused) {
      const estimate_t E = ulysses_model(o.layout, &m, &p, p.P);
      if (row(&o, &m, &p, ALGO_ULYSSES, p.P, &E, &best)) return 1;
    } else
      printf("  %-11s refused at P = %lld: %s (H = %lld, G = %lld)\n", "ulysses", (long long)p.P, uly_refused,
             (long long)p.H, (long long)p.G);
  }
  if (!p.bwd && (o.algos & ALGO_BIT(ALGO_HYBRID)))
    for (int64_t U = 2; U < p.P; U++) {
      if ((o.U && U != o.U) || ulysses_refusal(&p, U)) continue;
      const estimate_t E = ulysses_model(o.layout, &m, &p, U);
      if (row(&o, &m, &p, ALGO_HYBRID, U, &E, &best)) return 1;
    }
  if (p.bwd && (o.algos & uh)) printf("# ulysses, hybrid: not modelled for the backward (forward only)\n");
  if (best.a < 0) {
    fprintf(stderr, "distattn plan: no algorithm applies (%s at P = %lld)\n", uly_refused ? uly_refused : "none",
            (long long)p.P);
    return 2;
  }
  print_best(&o, &m, &p, &best, o.algos & ALGO_BIT(ALGO_ULYSSES) ? uly_refused : NULL);
  if (p.P > 1 && best.a < ALGO_ULYSSES) print_hiding(&m, &p, best.a);
  if (o.decode && decode_report(&o, &m, &p)) return 1;
  return 0;
}
