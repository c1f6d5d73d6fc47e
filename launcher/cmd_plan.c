/* cmd_plan.c: `distattn plan`, the closed-form cost model of the ring / striped / zigzag drivers
 * and of tree / ring decode (docs/scaling.md). Per ring step: the slowest rank's kernel time
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
} machine_t;

/* Presets: H100 SXM (FA3-class kernels, anchors.md: 616 TF causal fwd, 561 bwd; HBM 3.0 TB/s
 * measured; NVLink4 450 GB/s; NDR 50 GB/s per GPU), A100 SXM (FA2-class 190 / 150 TF, HBM
 * 1.8 TB/s; NVLink3 300 GB/s; HDR 25 GB/s) and this 2-core VM's CPU ranks (docs/scaling.md:
 * calibrated from `distattn kernel`, Open MPI shared memory ~4 GB/s per rank). The link latencies
 * match sim/mkplatform.py's routes: inside a node two GPU links; across nodes two GPU links, both
 * NICs and the core switch (h100: 2 x 1.0 + 2 x 2.0 + 1.0 = 7 us; a100: 2 x 1.5 + 2 x 2.5 + 1.0 = 9 us;
 * the platform folds half the core's latency into each uplink). */
static const machine_t machines[] = {
    {"h100", 600, 450, 3000, 10, 450, 2.0, 50, 7.0, 8},
    {"a100", 190, 150, 1800, 10, 300, 3.0, 25, 9.0, 8},
    {"cpu", 0.10, 0.08, 10, 20, 4, 5.0, 4, 5.0, 2},
};
static const char *const machine_names[] = {"h100", "a100", "cpu", NULL};
static const char *const algo_names[] = {"ring", "striped", "zigzag", "all", NULL};
enum { ALGO_RING, ALGO_STRIPED, ALGO_ZIGZAG, ALGO_ALL }; /* indices of algo_names */
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};
enum { DTYPE_FP32, DTYPE_BF16 }; /* indices of dtype_names: fp32 has 4 bytes per element, the others 2 */

typedef struct problem {
  int64_t P, S, B, H, G, D, block;
  int causal, bwd;
  double e; /* bytes per element */
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
  int64_t P, S, B, H, G, D, block, node;
  int algo, mach, dtype, bwd, decode;
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
  *o = (plan_opts_t){.P = 8, .S = 256 * 1024, .B = 1, .H = 32, .G = 0, .D = 128, .algo = ALGO_ALL,
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
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &o->algo, .help = "algorithm(s) to model", .choices = algo_names},
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
                                 "zigzag (and tree / ring decode) on a given machine; runs nothing",
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
  *p = (problem_t){
      o->P, o->S, o->B, o->H, o->G, o->D, o->block, mf == DA_MASK_CAUSAL, o->bwd, o->dtype == DTYPE_FP32 ? 4.0 : 2.0};
  return -1;
}

static void print_header(const plan_opts_t *o, const machine_t *m, const problem_t *p) {
  printf("# distattn plan: P = %lld, S = %lld, B = %lld, H = %lld, G = %lld, D = %lld, %s, %s, %s\n", (long long)p->P,
         (long long)p->S, (long long)p->B, (long long)p->H, (long long)p->G, (long long)p->D,
         p->causal ? "causal" : "none", dtype_names[o->dtype], p->bwd ? "forward + backward" : "forward");
  printf(
      "# machine %s: kernels %.4g / %.4g TFLOP/s (fwd / bwd), %.4g GB/s memory, %.3g us per call; links %.4g GB/s "
      "%.3g us inside nodes of %lld, %.4g GB/s %.3g us between\n",
      m->name, m->fwd_tflops, m->bwd_tflops, m->mem_gbps, m->call_us, m->link_gbps, m->link_us, (long long)m->node,
      m->net_gbps, m->net_us);
  printf("# %-8s %8s %9s %12s %12s %12s %12s %12s %10s\n", "algo", "block", "calls", "step_comp_s", "step_xfer_s",
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
static int json_algo(const plan_opts_t *o, const machine_t *m, const problem_t *p, int a, const estimate_t *E) {
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
  da_json_int(&j, "hide_min_tokens_per_rank", hide_threshold(a, m, p));
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

int da_cmd_plan(int argc, char **argv) {
  plan_opts_t o;
  machine_t m = machines[0];
  problem_t p = {0};
  int rc = plan_parse(argc, argv, &o, &m, &p);
  if (rc >= 0) return rc;
  print_header(&o, &m, &p);
  double best_t = INFINITY;
  int best_a = -1;
  int64_t best_b = 0;
  for (int a = 0; a < ALGO_ALL; a++) {
    if (o.algo != ALGO_ALL && o.algo != a) continue;
    const estimate_t E = best_block(a, &m, &p);
    const double bt = E.fwd_s + E.bwd_s;
    printf("  %-8s %8lld %9lld %12.4e %12.4e %12.4e %12.4e %12.4e %10.3f\n", algo_names[a], (long long)E.block,
           (long long)E.calls, E.step_compute_s, E.step_xfer_s, E.fwd_s, E.bwd_s, E.exposed_s, E.mem_bytes / 1e9);
    if (bt < best_t) best_t = bt, best_a = a, best_b = E.block;
    if (o.json && json_algo(&o, &m, &p, a, &E)) return 1;
  }
  printf("# best: %s, block %lld (%.4g s)\n", algo_names[best_a], (long long)best_b, best_t);
  if (p.P > 1) print_hiding(&m, &p, best_a);
  if (o.decode && decode_report(&o, &m, &p)) return 1;
  return 0;
}
