/* cmd_run.c: `distattn run`, distributed exact attention over MPI (ring | striped | zigzag),
 * forward and optionally backward, timed nccl-tests style and verified in float64 on sampled rows
 * by the ranks that own them. Every rank generates only its own rows from the counter RNG, or
 * reads only its own rows of q/k/v/dout .npy files with MPI-IO (--input, launcher/npyio.c), and
 * writes only its own rows of the outputs (--output): no rank ever holds the full sequence. The
 * work is the phases of run_phases, run in order by da_mpi_cmd_main (common.h) over one run_t. Not
 * a library layer: it may exit; the plan code never does.
 * Device memory (--device cuda, or the test device: --transport host-ipc with the CPU kernels):
 * inputs are still generated or read on the host, copied to the device before the timed runs,
 * and the outputs copied back for the float64 check (docs/launcher.md). */
#define _GNU_SOURCE
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"
#include "args.h"
#include "core.h"
#include "dtype.h"
#include "kernels.h"
#include "launcher.h"
#include "npyio.h"
#include "paths.h"
#include "place.h" /* --bind, the rank -> host/core/GPU map (launcher/place.c) */
#include "gpumap.h" /* --device cuda: the rank -> GPU map, --ranks-per-gpu */
#include "common.h"
#include "fault.h" /* da_fault_point: the test-only fault injection */
#include "report.h"
#include "rng.h"
#include "transport.h" /* da_test_link: the test-only slow link, echoed in the header and record */
#include "verify.h"

/* Indices are da_algo_t values. */
static const char *const algo_names[] = {"ring", "striped", "zigzag", "ulysses", "hybrid", NULL};
/* The hybrid's ring layouts (--layout): da_algo_t values, then "auto" (zigzag for the hybrid;
 * any other choice belongs to --algo hybrid only). */
static const char *const layout_names[] = {"ring", "striped", "zigzag", "auto", NULL};
enum { LAYOUT_AUTO = 3 };
static const char run_summary[] = "distributed exact attention over MPI (ring | striped | zigzag | ulysses | hybrid), "
                                  "forward and "
                                  "backward, timed and verified in float64 on sampled rows";

typedef struct run_opts {
  int algo, dtype, device, backward, overlap, bind;
  int layout;      /* --layout: the hybrid's ring layout (da_algo_t), LAYOUT_AUTO = zigzag */
  int64_t ulysses; /* --ulysses: the hybrid's Ulysses degree, 0 = not given */
  int64_t ranks_per_gpu;
  int64_t seq, heads, kv_heads, dim, batch, block, verify, iters, warmup, seed, threads;
  double timeout;
  da_mask_spec_t mask;
  const char *json, *input, *output, *transport;
} run_opts_t;

/* The hybrid's ring layout: --layout, or zigzag for auto. */
static da_algo_t run_ring_layout(const run_opts_t *o) {
  return o->layout == LAYOUT_AUTO ? DA_ALGO_ZIGZAG : (da_algo_t)o->layout;
}

typedef struct vresult {
  int64_t rows, wrong, nonfinite; /* nonfinite: rows whose reference is NaN / Inf (not wrong) */
  int64_t nonfinite_wrong;        /* wrong rows that are NaN / Inf where the reference is finite */
  double max_abs, max_rel;
} vresult_t;

static void vnote(vresult_t *v, double rel, double abs_err, double tol) {
  if (!(rel <= tol)) v->wrong++;
  if (!(rel <= v->max_rel)) v->max_rel = rel;
  if (!(abs_err <= v->max_abs)) v->max_abs = abs_err;
}

/* Rows checked so far, per tensor (out, dq, dk, dv): their max|x - ref| and max|ref|. The
 * relative error of each is taken once all are in, against max(its max|ref|, floor) with the
 * floor from the largest |ref| of the tensor over every rank's rows (da_verify_floor). */
enum { VT_OUT, VT_DQ, VT_DK, VT_DV, VT_N };
typedef struct vrows {
  double *abs, *ref, *noise; /* noise: the row's rounding noise (da_verify_den; 0 for out) */
  int *kind;
  int64_t n, cap;
} vrows_t;

static int vrow(vrows_t *v, int kind, const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len,
                double noise) {
  if (v->n == v->cap) {
    int64_t cap = v->cap ? 2 * v->cap : 256;
    double *a = realloc(v->abs, (size_t)cap * sizeof(double)), *r = a ? realloc(v->ref, (size_t)cap * sizeof(double)) : NULL;
    double *ns = r ? realloc(v->noise, (size_t)cap * sizeof(double)) : NULL;
    int *k = ns ? realloc(v->kind, (size_t)cap * sizeof(int)) : NULL;
    if (a) v->abs = a;
    if (r) v->ref = r;
    if (ns) v->noise = ns;
    if (k) v->kind = k;
    if (!k) return -1;
    v->cap = cap;
  }
  da_verify_err(x, dt, off, ref, len, &v->abs[v->n], &v->ref[v->n]);
  v->noise[v->n] = noise;
  v->kind[v->n++] = kind;
  return 0;
}

/* Collective: the floors need every rank's largest |ref| per tensor. */
static void vrows_finish(vrows_t *v, vresult_t *res, double tol) {
  double mx[VT_N] = {0};
  for (int64_t i = 0; i < v->n; i++)
    if (v->ref[i] > mx[v->kind[i]]) mx[v->kind[i]] = v->ref[i];
  MPI_Allreduce(MPI_IN_PLACE, mx, VT_N, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  static const char *const names[VT_N] = {"out", "dq", "dk", "dv"};
  double worst[VT_N] = {0}, over_noise[VT_N] = {0}; /* largest error / rounding noise: DA_VERIFY_NOISE_K's margin */
  int64_t by_noise[VT_N] = {0};                     /* rows whose scale is their rounding noise */
  for (int64_t i = 0; i < v->n; i++) {
    if (isnan(v->ref[i])) { /* a poisoned input reaches this row's reference: nothing to measure */
      res->nonfinite++;
      continue;
    }
    double den = da_verify_den(v->ref[i], mx[v->kind[i]], v->noise[i], tol);
    by_noise[v->kind[i]] += den > v->ref[i] && den > da_verify_floor(mx[v->kind[i]]);
    vnote(res, v->abs[i] / den, v->abs[i], tol);
    res->nonfinite_wrong += v->abs[i] == INFINITY;
    if (!(v->abs[i] / den <= worst[v->kind[i]])) worst[v->kind[i]] = v->abs[i] / den;
    if (v->noise[i] > 0 && !(v->abs[i] / v->noise[i] <= over_noise[v->kind[i]]))
      over_noise[v->kind[i]] = v->abs[i] / v->noise[i];
  }
  for (int t = 0; t < VT_N; t++)
    DA_INFO(DA_SUB_IO, "verify %s: worst row rel err %.3g (tensor max |ref| %.3g; largest error / rounding noise %.3g; "
            "%lld rows scaled by their noise)", names[t], worst[t], mx[t], over_noise[t], (long long)by_noise[t]);
  free(v->abs), free(v->ref), free(v->noise), free(v->kind);
}

/* --backward: the softmax statistics of every query row, lse and rowsum(dout * out) (B*S*H scalars
 * each, not rows of q/k/v), into *lse_all and *delta_all: each rank contributes its own rows and the
 * sum over ranks fills the tables. Collective; rc is this rank's state so far. 0, or -1. */
static int row_stats(const da_vprob_t *vp, int64_t n, const int64_t *pos, const void *out, const float *lse,
                     const void *dout, int rc, float **lse_all, float **delta_all) {
  const int H = vp->kp.H, D = vp->kp.D, dt = (int)vp->kp.dtype;
  const int64_t B = vp->B, S = vp->S;
  const size_t ns = (size_t)(B * S * H);
  float *ls = *lse_all = da_test_fail_alloc("row_stats") ? NULL : calloc(ns, sizeof(float));
  float *dl = *delta_all = calloc(ns, sizeof(float));
  if (!ls || !dl) {
    int me = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    fprintf(stderr, "distattn run: rank %d: out of memory for the backward check's row statistics (2 x %zu bytes)\n",
            me, ns * sizeof(float));
    rc = -1;
  }
  if (!rc)
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
          size_t g = (size_t)((b * S + pos[i]) * H + h), l = (size_t)((b * n + i) * H + h);
          double d = 0;
          for (int e = 0; e < D; e++)
            d += (double)da_load_f32(out, dt, (int64_t)l * D + e) * da_load_f32(dout, dt, (int64_t)l * D + e);
          ls[g] = lse[l], dl[g] = (float)d;
        }
  if (da_mpi_max_int(rc != 0)) return -1; /* rc is -1 on failure: max(-1, 0) would hide it */
  if (ns > (size_t)INT32_MAX) return -1;
  MPI_Allreduce(MPI_IN_PLACE, ls, (int)ns, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, dl, (int)ns, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  return rc;
}

/* Float64 check of R sampled local rows (and, with --backward, their dq and the dk/dv of the
 * same local key rows) on this rank. Collective only for the backward's per-row statistics. */
static int verify(const run_opts_t *o, const da_vprob_t *vp, int64_t n, const int64_t *pos, const void *out,
                  const float *lse, const void *dout, const void *dq, const void *dk, const void *dv, vresult_t *res) {
  const int H = vp->kp.H, G = vp->kp.G, D = vp->kp.D;
  const int64_t B = vp->B, S = vp->S, R = o->verify < n ? o->verify : n;
  const da_dtype_t dt = vp->kp.dtype;
  const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2;
  memset(res, 0, sizeof *res);
  double *ro = malloc((size_t)H * D * 8), *rl = malloc((size_t)H * 8), *rq = malloc((size_t)H * D * 8);
  double *rk = malloc((size_t)G * D * 8), *rv = malloc((size_t)G * D * 8);
  double *nq = malloc((size_t)H * 8), *nk = malloc((size_t)G * 8), *nv = malloc((size_t)G * 8);
  float *lse_all = NULL, *delta_all = NULL;
  vrows_t vr = {0};
  int rc = 0;
  if (!ro || !rl || !rq || !rk || !rv || !nq || !nk || !nv) rc = -1;
  if (o->backward && o->verify > 0) rc = row_stats(vp, n, pos, out, lse, dout, rc, &lse_all, &delta_all);
  for (int64_t s = 0; s < R && rc == 0; s++) {
    const int64_t i = R == 1 ? n / 2 : s * (n - 1) / (R - 1), b = s % B, l = b * n + i;
    if (da_verify_fwd_row(vp, b, pos[i], ro, rl)) {
      rc = -1;
      break;
    }
    res->rows++;
    for (int h = 0; h < H; h++) {
      if (vrow(&vr, VT_OUT, out, dt, (l * H + h) * D, ro + h * D, D, 0)) rc = -1;
      if (isnan(rl[h]) || rl[h] == INFINITY) continue; /* poisoned: the out row above is counted apart */
      double le = rl[h] == -INFINITY ? (lse[l * H + h] == -INFINITY ? 0 : INFINITY) : fabs(lse[l * H + h] - rl[h]);
      vnote(res, le / fmax(1.0, fabs(rl[h])), le, tol);
    }
    if (!o->backward) continue;
    if (da_verify_dq_row(vp, b, pos[i], ro, rl, rq, nq) ||
        da_verify_dkv_row(vp, b, pos[i], lse_all + b * S * H, delta_all + b * S * H, rk, rv, nk, nv)) {
      rc = -1;
      break;
    }
    for (int h = 0; h < H; h++)
      if (vrow(&vr, VT_DQ, dq, dt, (l * H + h) * D, rq + h * D, D, nq[h])) rc = -1;
    for (int g = 0; g < G; g++)
      if (vrow(&vr, VT_DK, dk, dt, (l * G + g) * D, rk + g * D, D, nk[g]) ||
          vrow(&vr, VT_DV, dv, dt, (l * G + g) * D, rv + g * D, D, nv[g]))
        rc = -1;
  }
  vrows_finish(&vr, res, tol);
  free(ro), free(rl), free(rq), free(rk), free(rv), free(nq), free(nk), free(nv), free(lse_all), free(delta_all);
  return rc;
}

/* The files --output writes, in this order (the gradients with --backward). */
static const char *const da_run_out_names[5] = {"out.npy", "lse.npy", "dq.npy", "dk.npy", "dv.npy"};

/* ---- the command's state, carried through its phases ---- */

/* What the check sums over ranks, by index into run_t.ck. */
enum {
  CK_ROWS,                 /* verified rows */
  CK_WRONG,                /* wrong values */
  CK_NF_ROWS,              /* verified rows whose float64 reference is non-finite (not wrong) */
  CK_NF,                   /* + 0..7: NaN / Inf values in q k v dout out dq dk dv (nf_names) */
  CK_NF_WRONG = CK_NF + 8, /* wrong rows non-finite where the reference is finite */
  CK_N
};
static const char *const nf_names[] = {"q", "k", "v", "dout", "out", "dq", "dk", "dv"};

typedef struct run {
  da_mpi_job_t job;
  run_opts_t o;
  da_opt_t opts[32];
  da_cmdspec_t cmd;
  int64_t G;            /* KV heads in effect */
  da_npy_inputs_t npin; /* --input: what the files hold */
  da_placement_t place; /* --bind: this rank's cores (and GPU) */
  da_gpumap_t gmap;      /* --device cuda: this rank's GPU; gmap_json: every rank's, on rank 0 */
  char gmap_json[4096];
  char place_env[64];
  int threads;
  da_plan_t *plan;
  da_plan_stats_t ps;
  /* this rank's n rows of every sequence: positions, inputs, outputs, gradients (--backward) */
  int64_t n, *pos;
  size_t nq, nk; /* elements of the q-shaped and of the k-shaped buffers */
  char *q, *k, *v, *outb, *dout, *dq, *dk, *dv;
  float *lse;
  da_vprob_t vp; /* the problem as the RNG and the float64 verifier see it */
  da_tensor_t tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
  char hosts[1024], maskdesc[256];
  double link_gbps, link_us; /* DISTATTN_TEST_LINK_*: the test-only slow link, when on */
  int link_on;
  /* figures: the timed runs (medians, max or sum over ranks), the overlap runs, the check */
  double fwd_s, bwd_s, total_s, gflops, imbalance, comm_bytes, exposed_s, compute_s, peak_rss;
  double overlap, comp_only_s, comm_only_s;
  double max_abs, max_rel;
  int64_t ck[CK_N];
  /* device memory: the transport's device table (NULL: host memory), its name, the copies'
   * stream, the device twins of q k v dout out lse dq dk dv, the peak device bytes (max over ranks) */
  const da_devapi_t *dev;
  char tpname[32];
  da_dstream_t dstream;
  void *dbuf[9];
  double peak_dev, peak_pinned; /* peak_pinned: staging of the -mpi device transports (pinned host) */
} run_t;

/* The options table, pointing into r->o, with the defaults. */
static void run_options(run_t *r) {
  run_opts_t *o = &r->o;
  o->algo = 2, o->dtype = DA_FLOAT32, o->device = 0, o->batch = 1, o->verify = 8, o->iters = 3, o->warmup = 1;
  o->seed = 1, o->layout = LAYOUT_AUTO;
  const da_opt_t opts[] = {
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &o->algo, .help = "token layout / algorithm", .choices = algo_names},
      {.name = "ulysses", .type = DA_OPT_INT, .dest = &o->ulysses, .metavar = "U", .min = 1, .max = 1 << 20,
       .help = "hybrid: Ulysses degree, groups of U consecutive ranks (the ring runs across ranks / U groups)"},
      {.name = "layout", .type = DA_OPT_ENUM, .dest = &o->layout, .choices = layout_names,
       .help = "hybrid: the ring's layout across the groups (auto: zigzag)"},
      {.name = "seq", .type = DA_OPT_SIZE, .dest = &o->seq, .help = "total sequence length S (required)", .min = 1,
       .max = 1LL << 34},
      da_opt_heads(&o->heads),
      da_opt_kv_heads(&o->kv_heads),
      da_opt_dim(&o->dim),
      {.name = "batch", .type = DA_OPT_INT, .dest = &o->batch, .help = "batch B", .min = 1, .max = 1 << 20},
      {.name = "mask", .type = DA_OPT_MASK, .dest = &o->mask, .help = "none | causal | window:W | doc:L1,L2,.. (+ joins)"},
      da_opt_dtype(&o->dtype),
      {.name = "backward", .type = DA_OPT_FLAG, .dest = &o->backward, .help = "also run and verify the backward"},
      {.name = "block", .type = DA_OPT_SIZE, .dest = &o->block,
       .help = "KV sub-block tokens between progress calls (0 = automatic)", .min = 0, .max = 1LL << 34},
      {.name = "verify", .type = DA_OPT_INT, .dest = &o->verify, .help = "rows per rank checked in float64 (0 = off)",
       .min = 0, .max = 1 << 20},
      {.name = "iters", .type = DA_OPT_INT, .dest = &o->iters, .help = "timed iterations (median reported)", .min = 1,
       .max = 1000000},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &o->warmup, .help = "untimed iterations first", .min = 0,
       .max = 1000000},
      da_opt_seed(&o->seed),
      da_opt_device(&o->device),
      da_opt_ranks_per_gpu(&o->ranks_per_gpu),
      da_opt_threads(&o->threads),
      {.name = "bind", .type = DA_OPT_ENUM, .dest = &o->bind, .choices = da_bind_names,
       .help = "cores per rank: keep the launcher's, next to the rank's GPU, NUMA blocks, or unbound"},
      da_opt_json(&o->json),
      {.name = "input", .type = DA_OPT_STRING, .dest = &o->input, .metavar = "DIR",
       .help = "read q.npy k.npy v.npy (dout.npy) [S,H,D] or [B,S,H,D] with MPI-IO instead of seeded inputs",
       .sample = "agree-sample-in"},
      {.name = "output", .type = DA_OPT_STRING, .dest = &o->output, .metavar = "DIR",
       .help = "write out.npy lse.npy (dq.npy dk.npy dv.npy) with MPI-IO", .sample = "."},
      {.name = "measure-overlap", .type = DA_OPT_FLAG, .dest = &o->overlap,
       .help = "also time compute-only and transfer-only runs and report the overlap"},
      da_opt_timeout(&o->timeout),
      da_opt_transport(&o->transport),
      {0},
  };
  _Static_assert(sizeof opts <= sizeof r->opts, "run_t.opts holds every option and the terminator");
  da_cmd_options(&r->cmd, "run", run_summary, r->opts, opts, sizeof opts / sizeof *opts);
}

/* ---- parse and agree ---- */

/* Parse and check the options (usage errors print their message to stderr and give
 * DA_ARGS_USAGE): sizes, GQA, the mask against the length, the backend, the --json path (rank 0
 * writes the record: it checks the path before anything long runs). */
static int run_parse(void *c, int argc, char **argv) {
  run_t *r = c;
  run_opts_t *o = &r->o;
  da_opt_t *opts = r->opts;
  da_mask_spec_free(&o->mask); /* a second parse (da_mpi_parse_agree) starts clean */
  int prc = da_args_parse(&r->cmd, argc, argv);
  if (prc != DA_ARGS_OK) return prc;
  /* with --input the sizes come from the files (given ones must agree: da_npyio_inspect) */
  const char *missing = o->input ? NULL : !da_args_find(opts, "seq")->given ? "--seq"
                        : !da_args_find(opts, "heads")->given ? "--heads" : !da_args_find(opts, "dim")->given ? "--dim"
                                                                                                              : NULL;
  const int64_t G = r->G = o->kv_heads ? o->kv_heads : o->heads;
  if (missing) return da_args_error(&r->cmd, "%s is required (or --input DIR)", missing);
  if ((!o->input || (da_args_find(opts, "heads")->given && o->kv_heads)) && (G > o->heads || o->heads % G))
    return da_args_error(&r->cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o->heads,
                         (long long)G);
  if ((!o->input || da_args_find(opts, "seq")->given) && da_mask_check(&o->mask.mask, o->seq) != DA_SUCCESS)
    return da_args_error(&r->cmd, "--mask: %s", strncmp(da_error_message(), "mask: ", 6) ? da_error_message()
                                                                                       : da_error_message() + 6);
  if (o->device == DA_DEVICE_CUDA && !da_kernels_get(DA_DEVICE_CUDA))
    return da_args_error(&r->cmd, "--device cuda: %s", da_error_message());
  if (o->device == DA_DEVICE_CUDA && (o->algo == DA_ALGO_ULYSSES || o->algo == DA_ALGO_HYBRID))
    return da_args_error(&r->cmd, "--device cuda runs ring, striped and zigzag (ulysses and hybrid keep their buffers in host "
                         "memory)");
  /* --device cuda: the GPU map (run_plan) probes the devices first: without one every rank stops
   * there with exit 2 and one message naming CUDA; what the CUDA context cannot do yet is said by
   * the context itself (da_mpi_job_open). */
  if (o->ranks_per_gpu && o->device != DA_DEVICE_CUDA)
    return da_args_error(&r->cmd, "--ranks-per-gpu needs --device cuda");
  /* the files of the run against each other, before anything creates one (--json is created by
   * its check below): no output may be an input or another output */
  static const char *const in_names[] = {"q.npy", "k.npy", "v.npy", "dout.npy"};
  static const char *const in_roles[] = {"--input q.npy", "--input k.npy", "--input v.npy", "--input dout.npy"};
  static const char *const out_roles[] = {"--output out.npy", "--output lse.npy", "--output dq.npy",
                                          "--output dk.npy", "--output dv.npy"};
  da_pathset_t ps = {0};
  da_paths_add(&ps, "--json", o->json, 1);
  da_paths_add_debug(&ps);
  for (int f = 0; f < (o->backward ? 4 : 3); f++) da_paths_add_in(&ps, in_roles[f], o->input, in_names[f], 0);
  for (int f = 0; f < (o->backward ? 5 : 2); f++) da_paths_add_in(&ps, out_roles[f], o->output, da_run_out_names[f], 1);
  if (da_paths_refuse("run", &ps)) return DA_ARGS_USAGE;
  if (o->json && r->job.rank == 0 && da_json_check_path(o->json)) return DA_ARGS_USAGE;
  char err[256];
  if (da_verify_poison_init(err, sizeof err)) return da_args_error(&r->cmd, "%s", err);
  return DA_ARGS_OK;
}

/* ---- inputs, first half: the .npy files ---- */

/* --input: the files' shapes and dtype become the problem (options given must agree). 0, or the
 * exit code with the reason in err. */
static int run_inspect_inputs(run_t *r, char *err, size_t en) {
  run_opts_t *o = &r->o;
  da_npy_expect_t want = {-1, -1, -1, -1, -1, -1};
  if (da_args_find(r->opts, "batch")->given) want.B = o->batch;
  if (da_args_find(r->opts, "seq")->given) want.S = o->seq;
  if (da_args_find(r->opts, "heads")->given) want.H = o->heads;
  if (da_args_find(r->opts, "kv-heads")->given && o->kv_heads) want.G = o->kv_heads;
  if (da_args_find(r->opts, "dim")->given) want.D = o->dim;
  if (da_args_find(r->opts, "dtype")->given) want.dtype = o->dtype;
  const da_npy_inputs_t *in = &r->npin;
  int rc = da_npyio_inspect(o->input, o->backward, &want, &r->npin, err, en);
  if (!rc && (in->H > 65536 || in->D > 4096 || in->B > (1 << 20) || in->S > (1LL << 34)))
    rc = 2, snprintf(err, en, "q.npy: shape: sizes over the limits of --heads / --dim / --batch / --seq");
  if (rc) return rc;
  o->batch = in->B, o->seq = in->S, o->heads = in->H, o->kv_heads = in->G, o->dim = in->D, o->dtype = in->dtype;
  r->G = in->G;
  if (da_mask_check(&o->mask.mask, o->seq) != DA_SUCCESS)
    rc = 2, snprintf(err, en, "--mask with q.npy's sequence %lld: %s", (long long)o->seq, da_error_message());
  return rc;
}

/* The files of --input and the directory of --output, checked before anything is built. Every
 * rank checks the same files and prints the same verdict, so each exits with its own code. */
static int run_check_files(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  char err[1536] = "";
  int rc = o->input ? run_inspect_inputs(r, err, sizeof err) : 0;
  if (rc) fprintf(stderr, "distattn run: rank %d: --input %s: %s\n", r->job.rank, o->input, err);
  if (!rc && o->output &&
      (rc = da_npyio_check_dir(o->output, da_run_out_names, o->backward ? 5 : 2, err, sizeof err)) != 0)
    fprintf(stderr, "distattn run: rank %d: %s\n", r->job.rank, err);
  return rc;
}

/* ---- plan ---- */

/* The transport when none is named (--transport, DISTATTN_TRANSPORT): for a CUDA run, nccl when
 * no GPU is shared on any node (the GPU map of run_plan, which probed the devices on every rank
 * first and stopped the job with exit 2 without one), cuda-ipc when ranks share GPUs (NCCL refuses
 * two ranks on one GPU) on one node; where neither serves (ranks share GPUs across nodes, or
 * several nodes without NCCL in the build), cuda-mpi: mpi staged through pinned host memory.
 * `mpi` named for a CUDA run is cuda-mpi too. Host runs, and --device cuda with pretend GPUs
 * (DISTATTN_TEST_GPUS): mpi. */
static int run_pick_transport(run_t *r) {
  const run_opts_t *o = &r->o;
  const char *named = o->transport ? o->transport : getenv("DISTATTN_TRANSPORT");
  if (named && !*named) named = NULL;
  const char *name = named ? named : "mpi";
  const int cuda = da_device_effective(o->device) == DA_DEVICE_CUDA;
  if (cuda && !named) {
    const int shared = da_mpi_max_int(r->gmap.shared), one_node = da_mpi_one_node();
    if (one_node) name = shared ? "cuda-ipc" : "nccl";
    else name = shared ? "cuda-mpi" /* NCCL refuses shared GPUs, IPC stops at the node */
                       : da_transport_cuda_default(0);
  }
  name = da_transport_resolve(name, cuda);
  snprintf(r->tpname, sizeof r->tpname, "%s", name);
  const da_transport_t *t = da_transport_find(name);
  r->dev = t ? t->devapi : NULL; /* an unknown name: the plan says so on every rank */
  return 0;
}

/* This rank's cores (--bind), the context and communicator, then the plan. */
static int run_plan(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  char err[256];
  if (o->device == DA_DEVICE_CUDA) { /* which GPU: before anything makes a CUDA context */
    int rc = da_gpumap_world(da_devapi_cuda_or_null(), (int)o->ranks_per_gpu, da_transport_choice(o->transport),
                             o->timeout, "run", &r->gmap);
    if (rc) return rc;
  }
  if (da_place_world((da_bind_t)o->bind, &r->place, r->place_env, sizeof r->place_env, err, sizeof err))
    fprintf(stderr, "distattn run: rank %d: %s\n", r->job.rank, err);
  r->threads = o->threads ? (int)o->threads : r->place.threads;
  int rc = da_mpi_job_open(&r->job, "run", da_device_effective(o->device), r->threads);
  if (rc || (rc = run_pick_transport(r)) != 0) return rc;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = o->batch, prob.seq = o->seq, prob.heads = o->heads, prob.kv_heads = r->G, prob.dim = o->dim;
  prob.mask = o->mask.mask.flags, prob.window = o->mask.mask.window;
  prob.ndocs = o->mask.mask.ndocs, prob.cu_seqlens = o->mask.mask.cu_seqlens;
  prob.dtype = (da_dtype_t)o->dtype;
  da_plan_config_t pcfg = DA_PLAN_CONFIG_INITIALIZER;
  pcfg.algo = (da_algo_t)o->algo, pcfg.block = o->block, pcfg.timeout = o->timeout;
  /* The plan refuses a degree with another algo, or a missing one (0) with hybrid, on every rank. */
  pcfg.ulysses = (int)o->ulysses;
  if (o->layout != LAYOUT_AUTO && o->algo != DA_ALGO_HYBRID) {
    fprintf(stderr, "distattn run: rank %d: --layout is the hybrid's ring layout (--algo hybrid); --algo %s is "
            "its own layout\n", r->job.rank, algo_names[o->algo]);
    return 2;
  }
  pcfg.ring_layout = run_ring_layout(o);
  pcfg.transport = r->tpname;
  /* The plan refuses, before anything large is allocated, a problem whose buffers and tensors
   * exceed this rank's share of the machine's memory (or DISTATTN_MEM_BUDGET): exit 2. */
  pcfg.mem_count = DA_MEM_TENSORS | (o->backward ? DA_MEM_BACKWARD : 0);
  da_fault_point("plan");
  da_status_t st = da_plan_create(r->job.comm, &prob, &pcfg, &r->plan);
  return st == DA_SUCCESS ? 0 : da_report_failure("run", r->job.rank, "plan", st, r->job.ctx);
}

/* ---- inputs, second half: this rank's rows ---- */

/* The buffers of this rank's rows (one spare byte each: a zero-row rank still gets pointers). 0,
 * or 1 on every rank when one of them ran out of memory. */
static int run_alloc(run_t *r) {
  const int64_t B = r->o.batch, H = r->o.heads, D = r->o.dim, n = r->n = da_plan_local_rows(r->plan);
  const size_t es = da_dtype_size((da_dtype_t)r->o.dtype), nq = r->nq = (size_t)(B * n * H * D);
  const size_t nk = r->nk = (size_t)(B * n * r->G * D);
  const int bw = r->o.backward;
  r->pos = malloc((size_t)(n + 1) * sizeof *r->pos);
  r->q = malloc(nq * es + 1), r->k = malloc(nk * es + 1), r->v = malloc(nk * es + 1), r->outb = malloc(nq * es + 1);
  r->dout = bw ? malloc(nq * es + 1) : NULL, r->dq = bw ? malloc(nq * es + 1) : NULL;
  r->dk = bw ? malloc(nk * es + 1) : NULL, r->dv = bw ? malloc(nk * es + 1) : NULL;
  r->lse = malloc((size_t)(B * n * H) * sizeof(float) + 4);
  int oom = !r->pos || !r->q || !r->k || !r->v || !r->outb || !r->lse;
  oom |= bw && (!r->dout || !r->dq || !r->dk || !r->dv);
  if (!da_mpi_max_int(oom)) return 0;
  if (oom) fprintf(stderr, "distattn run: rank %d: out of memory for %lld local rows\n", r->job.rank, (long long)n);
  return 1;
}

/* q, k, v (and dout) of this rank's rows: read from the files, each rank's rows straight into its
 * shard buffers with one collective read per file, or generated where they live from the RNG. */
static int run_fill(run_t *r) {
  const run_opts_t *o = &r->o;
  const int H = (int)o->heads, D = (int)o->dim, G = (int)r->G;
  const int64_t B = o->batch, n = r->n;
  const da_dtype_t dt = (da_dtype_t)o->dtype;
  const size_t es = da_dtype_size(dt);
  if (o->input) {
    char *dst[DA_NPYIO_NIN] = {r->q, r->k, r->v, r->dout};
    char err[1536] = "";
    int rc = 0;
    for (int f = 0; f < r->npin.nfiles && !rc; f++) {
      const int64_t heads = (f == DA_NPYIO_K || f == DA_NPYIO_V) ? G : H;
      rc = da_npyio_read(r->npin.path[f], r->npin.data_offset[f], B, o->seq, heads * D * (int64_t)es, r->pos, n,
                         dst[f], err, sizeof err);
    }
    if (rc) fprintf(stderr, "distattn run: rank %d: --input %s: %s\n", r->job.rank, o->input, err);
    return rc;
  }
  for (int64_t b = 0; b < B; b++) {
    da_verify_gen(&r->vp, DA_RNG_Q, b, r->pos, n, H, r->q + (size_t)(b * n * H * D) * es, (int64_t)H * D);
    da_verify_gen(&r->vp, DA_RNG_K, b, r->pos, n, G, r->k + (size_t)(b * n * G * D) * es, (int64_t)G * D);
    da_verify_gen(&r->vp, DA_RNG_V, b, r->pos, n, G, r->v + (size_t)(b * n * G * D) * es, (int64_t)G * D);
    if (o->backward)
      da_verify_gen(&r->vp, DA_RNG_DOUT, b, r->pos, n, H, r->dout + (size_t)(b * n * H * D) * es, (int64_t)H * D);
  }
  return 0;
}

/* Device memory: a twin of every tensor on the transport's device, the inputs copied over. The
 * host buffers stay: they are what the check and --output read, after run_fetch. 0, or 1 on every
 * rank when one of them failed (said on stderr). */
static int run_to_device(run_t *r) {
  const da_devapi_t *d = r->dev;
  const size_t es = da_dtype_size((da_dtype_t)r->o.dtype), nl = (size_t)(r->o.batch * r->n * r->o.heads);
  void *const host[9] = {r->q, r->k, r->v, r->dout, r->outb, r->lse, r->dq, r->dk, r->dv};
  const size_t bytes[9] = {r->nq * es, r->nk * es, r->nk * es, r->nq * es, r->nq * es, nl * 4, r->nq * es,
                           r->nk * es, r->nk * es};
  da_status_t st = d->stream_create(&r->dstream);
  for (int i = 0; i < 9 && st == DA_SUCCESS; i++)
    if (host[i]) st = da_dev_alloc(d, &r->dbuf[i], bytes[i] + 4);
  for (int i = 0; i < 4 && st == DA_SUCCESS; i++)
    if (host[i] && bytes[i]) st = d->copy_from_host(r->dbuf[i], host[i], bytes[i], r->dstream);
  if (st != DA_SUCCESS)
    fprintf(stderr, "distattn run: rank %d: inputs to %s memory: %s\n", r->job.rank, d->name, da_error_message());
  return da_mpi_max_int(st != DA_SUCCESS);
}

/* The buffers, the problem as the verifier sees it, the inputs, and the tensors over them. */
static int run_inputs(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  int rc = run_alloc(r);
  if (rc) return rc;
  da_plan_local_positions(r->plan, r->pos, r->n);
  const int64_t B = o->batch, n = r->n, H = o->heads, G = r->G, D = o->dim;
  const da_dtype_t dt = (da_dtype_t)o->dtype;
  r->vp = (da_vprob_t){.B = B, .S = o->seq, .seed = (uint64_t)o->seed};
  r->vp.kp.H = (int)H, r->vp.kp.G = (int)G, r->vp.kp.D = (int)D, r->vp.kp.dtype = dt;
  r->vp.kp.scale = (float)(1.0 / sqrt((double)D)), r->vp.kp.mask = o->mask.mask;
  if ((rc = run_fill(r)) != 0) return rc;
  if (r->dev && (rc = run_to_device(r)) != 0) return rc;
  /* the tensors the plan runs on: the device twins in device memory, else the host buffers */
  void *const b[9] = {r->q, r->k, r->v, r->dout, r->outb, r->lse, r->dq, r->dk, r->dv};
  void *t[9];
  for (int i = 0; i < 9; i++) t[i] = r->dev ? r->dbuf[i] : b[i];
  const int64_t shq[4] = {B, n, H, D}, shk[4] = {B, n, G, D}, shl[3] = {B, n, H};
  da_tensor_make(&r->tq, t[0], dt, 4, shq), da_tensor_make(&r->tk, t[1], dt, 4, shk);
  da_tensor_make(&r->tv, t[2], dt, 4, shk), da_tensor_make(&r->to, t[4], dt, 4, shq);
  da_tensor_make(&r->tl, t[5], DA_FLOAT32, 3, shl), da_tensor_make(&r->tdo, t[3], dt, 4, shq);
  da_tensor_make(&r->tdq, t[6], dt, 4, shq), da_tensor_make(&r->tdk, t[7], dt, 4, shk);
  da_tensor_make(&r->tdv, t[8], dt, 4, shk);
  da_tensor_t *all[9] = {&r->tq, &r->tk, &r->tv, &r->tdo, &r->to, &r->tl, &r->tdq, &r->tdk, &r->tdv};
  for (int i = 0; i < 9; i++) all[i]->device = da_device_effective(o->device); /* the host seam (and pretend GPUs) are the CPU's */
  return 0;
}

/* ---- the header: what runs where ---- */

/* The Ulysses degree in use: the hybrid's U, every rank for ulysses, 1 for the ring layouts. */
static int run_ulysses_degree(const run_t *r) {
  if (r->o.algo == DA_ALGO_HYBRID) return r->o.ulysses > 0 ? (int)r->o.ulysses : 1;
  return r->o.algo == DA_ALGO_ULYSSES ? r->job.size : 1;
}

/* Rank 0: the plan's layout, buffers and volumes (max or sum over ranks: collective), how the
 * figures are taken, and the inputs, outputs and check in use. */
static void run_print_plan(run_t *r) {
  const run_opts_t *o = &r->o;
  const da_plan_stats_t *ps = &r->ps;
  int64_t rows[2] = {r->n, -r->n};
  MPI_Allreduce(MPI_IN_PLACE, rows, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  unsigned long long mem[2] = {(unsigned long long)ps->mem_fwd_bytes, (unsigned long long)ps->mem_bwd_bytes};
  unsigned long long vol[2] = {(unsigned long long)ps->plan_fwd_bytes, (unsigned long long)ps->plan_bwd_bytes};
  MPI_Allreduce(MPI_IN_PLACE, mem, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, vol, 2, MPI_UNSIGNED_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  if (r->job.rank != 0) return;
  char hyb[96] = "";
  if (o->algo == DA_ALGO_HYBRID)
    snprintf(hyb, sizeof hyb, " (ulysses %d x ring %d on %s)", run_ulysses_degree(r), r->job.size / run_ulysses_degree(r),
             layout_names[run_ring_layout(o)]);
  da_report_line(stdout, "layout: %s%s  local rows %lld..%lld  pairs %lld  work imbalance (schedule) %.4f  KV "
                         "sub-block %lld%s", algo_names[o->algo], hyb, (long long)-rows[1], (long long)rows[0],
                 (long long)ps->pairs_total, ps->work_imbalance, (long long)ps->block, o->block ? "" : " (auto)");
  /* Ulysses moves q, k, v (out, dout) in the storage dtype and the gradients home in fp32; the
   * ring moves KV blocks and the fp32 dK/dV sums. Its buffers hold the whole sequence for H/P
   * heads; the hybrid does both, its group's rows for H/U heads. */
  const int uly = o->algo == DA_ALGO_ULYSSES, hy = o->algo == DA_ALGO_HYBRID;
  da_report_line(stdout, "plan: buffers per rank %.2f MiB (fwd) / %.2f MiB (fwd+bwd)%s; sent per call, all ranks: "
                         "fwd %.2f MiB, bwd %.2f MiB (%s in %s, %s in fp32)", mem[0] / 1048576.0,
                 mem[1] / 1048576.0, uly ? ", the whole sequence for H/P heads" : hy ? ", the group's rows for H/U heads" : "",
                 vol[0] / 1048576.0, o->backward ? vol[1] / 1048576.0 : 0.0,
                 uly ? "all-to-all of q, k, v, out" : hy ? "group all-to-all of q, k, v, out; ring KV" : "KV",
                 da_dtype_names[o->dtype], uly ? "dq, dk, dv" : hy ? "dq, dk, dv home; ring dK/dV" : "dK/dV");
  da_report_line(stdout, "time: median of %lld iters, max over ranks; gflops: (4 fwd + 10 bwd) * H * D * pairs / "
                         "time; comm: bytes sent per call, summed over ranks", (long long)o->iters);
  if (o->input)
    da_report_line(stdout, "input: %s: q.npy k.npy v.npy%s, %s, %s [%s%lld, %lld, %lld] (MPI-IO, each rank its "
                           "rows)", o->input, o->backward ? " dout.npy" : "", da_npyio_descr(o->dtype),
                   r->npin.batched ? "[B, S, H, D]" : "[S, H, D]", r->npin.batched ? "B, " : "", (long long)o->seq,
                   (long long)o->heads, (long long)o->dim);
  if (o->output)
    da_report_line(stdout, "output: %s: out.npy lse.npy%s (written to temporary names, renamed when every rank "
                           "has finished)", o->output, o->backward ? " dq.npy dk.npy dv.npy" : "");
  if (o->verify)
    da_report_line(stdout, "verify: %lld rows per rank in float64 from %s (out, lse%s); "
                           "tolerance %g%s", (long long)o->verify,
                   o->input ? "the input files, streamed in chunks" : "regenerated inputs",
                   o->backward ? ", dq, dk, dv" : "",
                   o->dtype == DA_FLOAT32 ? 1e-4 : 2e-2,
                   o->backward ? "; dk/dv use the run's per-row lse and rowsum(dout*out) of the other rows" : "");
}

/* The header: command, machine, MPI, the test link when on, every rank's placement, the plan. */
static int run_print_setup(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  r->link_on = da_test_link(&r->link_gbps, &r->link_us) > 0; /* malformed: the plan already failed */
  da_mask_describe(&o->mask.mask, r->maskdesc, sizeof r->maskdesc);
  if (r->job.rank == 0) {
    char tp[160];
    snprintf(tp, sizeof tp, "  transport: %s (%s%s)", r->tpname,
             !r->dev ? "host memory" : !strcmp(r->dev->name, "cuda") ? "GPU memory" : "host seam memory: a test device",
             r->dev && strstr(r->tpname, "-mpi") ? ", staged through pinned host buffers" : "");
    da_report_mpi_header(&r->cmd, r->threads, r->job.size,
                         (int)da_device_effective(o->device) == o->device ? da_device_names[o->device]
                                                                    : "cpu (DISTATTN_TEST_GPUS: pretend GPUs, host seam)",
                         tp);
    if (r->link_on)
      da_report_line(stdout, "test link hook: DISTATTN_TEST_LINK_GBPS=%g DISTATTN_TEST_LINK_US=%g (transfers slowed "
                             "to this link; not a real network)", r->link_gbps, r->link_us);
  }
  fflush(stdout);
  da_place_print(stdout, (da_bind_t)o->bind, &r->place, r->place_env, r->hosts, sizeof r->hosts);
  if (o->device == DA_DEVICE_CUDA) da_gpumap_print(&r->gmap, da_devapi_cuda_or_null(), r->gmap_json, sizeof r->gmap_json);
  da_plan_stats(r->plan, &r->ps);
  run_print_plan(r);
  return 0;
}

/* ---- execute ---- */

/* One iteration: the forward, then with --backward the backward, each between a barrier and its
 * own clock readings; t gets this rank's seconds of each. */
static da_status_t run_once(run_t *r, double t[2]) {
  t[0] = t[1] = 0;
  MPI_Barrier(MPI_COMM_WORLD);
  da_fault_point("forward");
  double t0 = MPI_Wtime();
  da_status_t st = da_plan_fwd(r->plan, &r->tq, &r->tk, &r->tv, &r->to, &r->tl, NULL);
  t[0] = MPI_Wtime() - t0;
  if (st != DA_SUCCESS || !r->o.backward) return st;
  MPI_Barrier(MPI_COMM_WORLD);
  da_fault_point("backward");
  t0 = MPI_Wtime();
  st = da_plan_bwd(r->plan, &r->tq, &r->tk, &r->tv, &r->to, &r->tdo, &r->tl, &r->tdq, &r->tdk, &r->tdv, NULL);
  t[1] = MPI_Wtime() - t0;
  return st;
}

/* Figures of the last iteration: bytes summed over ranks, exposed time max, compute imbalance
 * max / mean, peak memory max; the rate from the median time. */
static void run_figures(run_t *r) {
  da_plan_stats(r->plan, &r->ps);
  const da_plan_stats_t *ps = &r->ps;
  double comp = ps->fwd_compute_s + ps->bwd_compute_s, expo = ps->fwd_exposed_s + ps->bwd_exposed_s;
  double sums[2] = {(double)(ps->fwd_bytes_sent + ps->bwd_bytes_sent), comp};
  uint64_t peak_dev = 0, peak_pinned = 0;
  da_dev_mem_stats(NULL, &peak_dev); /* every device byte of this process: plan buffers and tensors */
  da_dev_pinned_stats(NULL, &peak_pinned); /* the staged transports' pinned host buffers */
  double maxs[5] = {expo, comp, (double)da_peak_rss_bytes(), (double)peak_dev, (double)peak_pinned};
  MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, maxs, 5, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  r->comm_bytes = sums[0], r->exposed_s = maxs[0], r->compute_s = maxs[1], r->peak_rss = maxs[2];
  r->peak_dev = maxs[3], r->peak_pinned = maxs[4];
  const double flops = (double)ps->pairs_total * r->o.heads * r->o.dim * (4.0 + (r->o.backward ? 10.0 : 0.0));
  r->gflops = flops / r->total_s * 1e-9;
  r->imbalance = sums[1] > 0 ? maxs[1] / (sums[1] / r->job.size) : 1.0;
}

/* Warmup then timed iterations, each iteration's times the max over ranks; the medians. */
static int run_execute(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  double *tf = calloc((size_t)o->iters, sizeof *tf), *tb = calloc((size_t)o->iters, sizeof *tb);
  double *tt = calloc((size_t)o->iters, sizeof *tt);
  da_status_t st = DA_SUCCESS;
  for (int64_t it = 0; it < o->warmup + o->iters; it++) {
    double t[2];
    if ((st = run_once(r, t)) != DA_SUCCESS) break; /* every rank has a failure status (the plan agreed on it) */
    MPI_Allreduce(MPI_IN_PLACE, t, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= o->warmup) tf[it - o->warmup] = t[0], tb[it - o->warmup] = t[1], tt[it - o->warmup] = t[0] + t[1];
  }
  r->fwd_s = da_median(tf, o->iters), r->bwd_s = o->backward ? da_median(tb, o->iters) : NAN;
  r->total_s = da_median(tt, o->iters);
  free(tf), free(tb), free(tt);
  if (st != DA_SUCCESS)
    return da_report_failure("run", r->job.rank, o->backward ? "forward/backward" : "forward", st, r->job.ctx);
  run_figures(r);
  return 0;
}

/* Device memory: the outputs of the last iteration back into the host buffers the check and
 * --output read. */
static int run_fetch(void *c) {
  run_t *r = c;
  if (!r->dev) return 0;
  const size_t es = da_dtype_size((da_dtype_t)r->o.dtype), nl = (size_t)(r->o.batch * r->n * r->o.heads);
  void *const host[5] = {r->outb, r->lse, r->dq, r->dk, r->dv};
  void *const dev[5] = {r->dbuf[4], r->dbuf[5], r->dbuf[6], r->dbuf[7], r->dbuf[8]};
  const size_t bytes[5] = {r->nq * es, nl * 4, r->nq * es, r->nk * es, r->nk * es};
  da_status_t st = DA_SUCCESS;
  for (int i = 0; i < 5 && st == DA_SUCCESS; i++)
    if (host[i] && bytes[i]) st = r->dev->copy_to_host(host[i], dev[i], bytes[i], r->dstream);
  if (st != DA_SUCCESS)
    fprintf(stderr, "distattn run: rank %d: outputs from %s memory: %s\n", r->job.rank, r->dev->name,
            da_error_message());
  return da_mpi_max_int(st != DA_SUCCESS);
}

/* ---- verify ---- */

/* Sums over ranks into r->ck: the check's rows, wrong values, rows with a non-finite reference,
 * then NaN / Inf values per tensor (this rank's inputs and the outputs of the last iteration: one
 * pass over memory the run just touched); the largest errors, max over ranks. */
static void run_count(run_t *r, const vresult_t *vr) {
  const da_dtype_t dt = (da_dtype_t)r->o.dtype;
  int64_t *ck = r->ck;
  ck[CK_ROWS] = vr->rows, ck[CK_WRONG] = vr->wrong, ck[CK_NF_ROWS] = vr->nonfinite;
  ck[CK_NF_WRONG] = vr->nonfinite_wrong;
  /* the gradients and dout exist (non-NULL) with --backward only */
  const char *const bufs[8] = {r->q, r->k, r->v, r->dout, r->outb, r->dq, r->dk, r->dv};
  const size_t len[8] = {r->nq, r->nk, r->nk, r->nq, r->nq, r->nq, r->nk, r->nk};
  for (int t = 0; t < 8; t++) ck[CK_NF + t] = bufs[t] ? da_count_nonfinite(bufs[t], dt, (int64_t)len[t]) : 0;
  double vmax[2] = {vr->max_abs, vr->max_rel};
  MPI_Allreduce(MPI_IN_PLACE, vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, ck, CK_N, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  r->max_abs = vmax[0], r->max_rel = vmax[1];
}

/* DISTATTN_TEST_PLANT=TENSOR:X (test aid, TENSOR one of out, dq, dk, dv): X is added to every
 * value of this rank's TENSOR after the run and before the check, so a test can show which errors
 * the verifier catches (tests/mpi.cmake: cli_run_plant_*). 0, or -1 when malformed. */
static int run_plant(run_t *r) {
  const char *env = da_param_string("DISTATTN_TEST_PLANT");
  if (!env) return 0;
  static const char *const names[] = {"out", "dq", "dk", "dv"};
  char *bufs[] = {r->outb, r->dq, r->dk, r->dv};
  const size_t len[] = {r->nq, r->nq, r->nk, r->nk};
  const char *colon = strchr(env, ':');
  char *end = NULL;
  double x = colon ? strtod(colon + 1, &end) : NAN;
  for (int t = 0; t < 4; t++)
    if (colon && (size_t)(colon - env) == strlen(names[t]) && !strncmp(env, names[t], strlen(names[t])) && end &&
        !*end && isfinite(x) && bufs[t]) {
      for (size_t i = 0; i < len[t]; i++)
        da_store_f32(bufs[t], r->o.dtype, (int64_t)i, da_load_f32(bufs[t], r->o.dtype, (int64_t)i) + (float)x);
      return 0;
    }
  fprintf(stderr, "distattn run: rank %d: DISTATTN_TEST_PLANT=%s: expected TENSOR:X, TENSOR one of out, dq, dk, dv "
          "(the gradients with --backward)\n", r->job.rank, env);
  return -1;
}

/* The float64 check of sampled rows (before the overlap runs, which overwrite the outputs), from
 * the input files streamed in chunks with --input, else from inputs regenerated from the RNG. */
static int run_verify(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  vresult_t vr = {0};
  if (da_mpi_max_int(run_plant(r) ? 2 : 0)) return 2;
  int vfail = 0;
  da_fault_point("verify");
  da_npyio_source_t *src = NULL;
  if (o->verify > 0 && o->input) {
    char err[1536] = "";
    src = da_npyio_source_open(&r->npin, err, sizeof err);
    if (!src) fprintf(stderr, "distattn run: rank %d: --verify: %s\n", r->job.rank, err);
    r->vp.rows = da_npyio_source_row, r->vp.rows_ctx = src;
    vfail = !src;
  }
  if (da_mpi_max_int(vfail)) {
    da_npyio_source_close(src);
    return 1;
  }
  if (o->verify > 0)
    vfail = verify(o, &r->vp, r->n, r->pos, r->outb, r->lse, r->dout, r->dq, r->dk, r->dv, &vr) != 0;
  da_npyio_source_close(src);
  r->vp.rows = NULL, r->vp.rows_ctx = NULL;
  if (da_mpi_max_int(vfail)) {
    if (vfail)
      fprintf(stderr, "distattn run: rank %d: verification ran out of memory%s\n", r->job.rank,
              o->input ? " or could not read the input files" : "");
    return 1;
  }
  run_count(r, &vr);
  return 0;
}

/* ---- outputs ---- */

/* The files --output writes (out, lse, and the gradients with --backward) over this rank's rows;
 * returns how many. Seeded runs write [S, ...] when B = 1, like unbatched input files. */
static int run_output_files(const run_t *r, da_npy_out_t w[5]) {
  const char *const *names = da_run_out_names;
  const void *bufs[5] = {r->outb, r->lse, r->dq, r->dk, r->dv};
  const int batched = r->npin.batched || r->o.batch > 1, nw = r->o.backward ? 5 : 2;
  const int64_t H = r->o.heads, D = r->o.dim;
  const size_t es = da_dtype_size((da_dtype_t)r->o.dtype);
  for (int f = 0; f < nw; f++) {
    const int64_t heads = (f == 3 || f == 4) ? r->G : H;
    w[f].name = names[f], w[f].buf = bufs[f];
    w[f].descr = f == 1 ? "<f4" : da_npyio_descr(r->o.dtype);
    w[f].ndim = 0;
    if (batched) w[f].shape[w[f].ndim++] = r->o.batch;
    w[f].shape[w[f].ndim++] = r->o.seq;
    w[f].shape[w[f].ndim++] = heads;
    if (f != 1) w[f].shape[w[f].ndim++] = D;
    w[f].rowbytes = f == 1 ? H * 4 : heads * D * (int64_t)es;
  }
  return nw;
}

/* The .npy outputs (before the overlap runs, which overwrite them): only from a run whose verified
 * rows were right, so the final names never hold a failed run's results. */
static int run_write_outputs(void *c) {
  run_t *r = c;
  const run_opts_t *o = &r->o;
  if (!o->output) return 0;
  if (r->ck[CK_WRONG] > 0) {
    if (r->job.rank == 0)
      fprintf(stderr, "distattn run: --output %s: not written: verification found %lld wrong values\n", o->output,
              (long long)r->ck[CK_WRONG]);
    return 0;
  }
  da_npy_out_t w[5];
  const int nw = run_output_files(r, w);
  char err[1536] = "";
  const int rc = da_npyio_write(o->output, nw, w, o->batch, o->seq, r->pos, r->n, err, sizeof err);
  if (rc)
    fprintf(stderr, "distattn run: rank %d: --output %s: %s (nothing written under the final names)\n", r->job.rank,
            o->output, err);
  return rc;
}

/* ---- overlap: compute without transfers, transfers without compute, both ---- */

/* The median over --iters (after one warmup when there is warmup) of one plan mode's iteration,
 * max over ranks, into *median. */
static da_status_t run_time_mode(run_t *r, da_plan_mode_t mode, double *tm, double *median) {
  const run_opts_t *o = &r->o;
  const int64_t skip = o->warmup > 0;
  da_status_t st = DA_SUCCESS;
  da_plan_set_mode(r->plan, mode);
  for (int64_t it = 0; it < o->iters + skip && st == DA_SUCCESS; it++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    st = da_plan_fwd(r->plan, &r->tq, &r->tk, &r->tv, &r->to, &r->tl, NULL);
    if (st == DA_SUCCESS && o->backward)
      st = da_plan_bwd(r->plan, &r->tq, &r->tk, &r->tv, &r->to, &r->tdo, &r->tl, &r->tdq, &r->tdk, &r->tdv, NULL);
    double t = MPI_Wtime() - t0;
    MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= skip) tm[it - skip] = t;
  }
  *median = da_median(tm, o->iters);
  return st;
}

/* --measure-overlap: the share of the shorter of compute-only and transfers-only that the real
 * run hides, clamped to [0, 1] (NaN when not measured). */
static int run_overlap(void *c) {
  run_t *r = c;
  r->overlap = r->comp_only_s = r->comm_only_s = NAN;
  if (!r->o.overlap) return 0;
  double *tm = calloc((size_t)r->o.iters, sizeof *tm);
  da_status_t st = run_time_mode(r, DA_PLAN_COMPUTE_ONLY, tm, &r->comp_only_s);
  if (st == DA_SUCCESS) st = run_time_mode(r, DA_PLAN_COMM_ONLY, tm, &r->comm_only_s);
  da_plan_set_mode(r->plan, DA_PLAN_RUN);
  free(tm);
  if (st != DA_SUCCESS) return da_report_failure("run", r->job.rank, "overlap measurement", st, r->job.ctx);
  double mn = fmin(r->comp_only_s, r->comm_only_s);
  double overlap = mn > 0 ? (r->comp_only_s + r->comm_only_s - r->total_s) / mn : 1.0;
  r->overlap = overlap < 0 ? 0 : overlap > 1 ? 1 : overlap;
  return 0;
}

/* ---- report ---- */

/* Rank 0: the table's one row. */
static void run_print_row(const run_t *r) {
  static const char *const names[] = {"algo", "ranks", "seq", "batch", "heads", "kv", "dim", "mask", "dtype",
                                      "fwd_ms", "bwd_ms", "gflops", "comm_MB", "exposed_ms", "overlap", "imbal",
                                      "imb_work", "rows", "max_rel", "wrong", "dev_MB"};
  static const int widths[] = {7, 5, 9, 5, 5, 3, 4, 12, 5, 10, 10, 8, 9, 10, 7, 6, 8, 6, 9, 6, 9};
  const run_opts_t *o = &r->o;
  da_table_t t;
  da_table_init(&t, stdout, r->dev ? 21 : 20, names, widths); /* dev_MB: peak device memory, device runs */
  da_table_print_header(&t);
  da_table_str(&t, algo_names[o->algo]);
  da_table_int(&t, r->job.size), da_table_int(&t, o->seq), da_table_int(&t, o->batch), da_table_int(&t, o->heads);
  da_table_int(&t, r->G), da_table_int(&t, o->dim), da_table_str(&t, r->maskdesc);
  da_table_str(&t, da_dtype_names[o->dtype]);
  da_table_dbl(&t, r->fwd_s * 1e3, 2, 0), da_table_dbl(&t, r->bwd_s * 1e3, 2, 0), da_table_dbl(&t, r->gflops, 2, 0);
  da_table_dbl(&t, r->comm_bytes / 1048576.0, 2, 0), da_table_dbl(&t, r->exposed_s * 1e3, 2, 0);
  da_table_dbl(&t, r->overlap, 2, 0), da_table_dbl(&t, r->imbalance, 2, 0);
  da_table_dbl(&t, r->ps.work_imbalance, 3, 0);
  da_table_int(&t, r->ck[CK_ROWS]), da_table_dbl(&t, o->verify ? r->max_rel : NAN, 2, 1);
  da_table_int(&t, r->ck[CK_WRONG]);
  if (r->dev) da_table_dbl(&t, r->peak_dev / 1048576.0, 2, 0);
  da_table_end_row(&t);
}

/* Rank 0: the JSON Lines record appended to --json, every field in this order (tests/mpi.cmake
 * checks it). 0, or -1 when it could not be written (said on stderr). */
static int run_json(const run_t *r) {
  const run_opts_t *o = &r->o;
  const int64_t *nf = r->ck + CK_NF;
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "run");
  da_json_str(&j, "algo", algo_names[o->algo]);
  da_json_int(&j, "ranks", r->job.size);
  da_json_int(&j, "seq", o->seq);
  da_json_problem(&j, o->batch, o->heads, r->G, o->dim, r->maskdesc, da_dtype_names[o->dtype],
                  da_device_names[o->device], r->threads);
  da_json_int(&j, "block", r->ps.block); /* in use: --block or the automatic choice */
  da_json_int(&j, "iters", o->iters);
  /* The degrees: ulysses x ring = ranks (ring layouts 1 x P, ulysses P x 1). */
  da_json_int(&j, "ulysses", run_ulysses_degree(r));
  da_json_int(&j, "ring", r->job.size / run_ulysses_degree(r));
  da_json_str(&j, "ring_layout", o->algo == DA_ALGO_HYBRID ? layout_names[run_ring_layout(o)]
                                 : o->algo == DA_ALGO_ULYSSES ? "none" : algo_names[o->algo]);
  da_json_dbl(&j, "fwd_s", r->fwd_s);
  if (o->backward) da_json_dbl(&j, "bwd_s", r->bwd_s);
  else da_json_null(&j, "bwd_s");
  da_json_dbl(&j, "gflops", r->gflops);
  da_json_int(&j, "pairs", r->ps.pairs_total);
  da_json_check(&j, r->ck[CK_ROWS], r->max_abs, r->max_rel, r->ck[CK_WRONG], o->verify > 0);
  da_json_dbl(&j, "comm_bytes", r->comm_bytes);
  da_json_dbl(&j, "comm_exposed_s", r->exposed_s);
  da_json_dbl(&j, "overlap", r->overlap);
  da_json_dbl(&j, "t_compute_only_s", r->comp_only_s);
  da_json_dbl(&j, "t_comm_only_s", r->comm_only_s);
  da_json_dbl(&j, "imbalance", r->imbalance);
  da_json_dbl(&j, "imbalance_work", r->ps.work_imbalance);
  da_json_dbl(&j, "compute_s", r->compute_s); /* max over ranks, fwd + bwd, last iteration */
  da_json_nonfinite(&j, r->ck[CK_NF_ROWS], nf[0] + nf[1] + nf[2] + nf[3], nf[4] + nf[5] + nf[6] + nf[7],
                    r->ck[CK_NF_WRONG]);
  if (r->link_on) da_json_dbl(&j, "link_gbps", r->link_gbps), da_json_dbl(&j, "link_us", r->link_us);
  else da_json_null(&j, "link_gbps"), da_json_null(&j, "link_us");
  da_json_int(&j, "peak_rss_bytes", (int64_t)r->peak_rss); /* max over ranks */
  if (o->device == DA_DEVICE_CUDA && r->gmap_json[0]) da_json_raw(&j, "gpu_map", r->gmap_json);
  da_json_job(&j, r->hosts, 1);
  da_json_str(&j, "transport", r->tpname);
  if (r->dev) da_json_int(&j, "peak_device_bytes", (int64_t)r->peak_dev); /* max over ranks */
  else da_json_null(&j, "peak_device_bytes");
  if (r->dev) da_json_int(&j, "peak_pinned_bytes", (int64_t)r->peak_pinned); /* max over ranks; 0 but staged */
  else da_json_null(&j, "peak_pinned_bytes");
  if (o->input) da_json_str(&j, "input", o->input);
  if (o->output) da_json_str(&j, "output", o->output);
  return da_json_finish(&j, o->json);
}

/* The table, the overlap and non-finite notes, the record, then the verdict all ranks agree on. */
static int run_report(void *c) {
  run_t *r = c;
  const int64_t *nf = r->ck + CK_NF;
  int rc = 0;
  if (r->job.rank == 0) {
    run_print_row(r);
    if (r->dev)
      da_report_line(stdout, "dev_MB: peak device memory per rank, max over ranks (%s: plan buffers and tensors)",
                     r->dev->name);
    if (r->dev && r->peak_pinned > 0)
      da_report_line(stdout, "pinned: %.2f MiB of pinned host staging per rank at peak, max over ranks (%s: a mirror "
                             "of each KV slot and dK/dV sum)", r->peak_pinned / 1048576.0, r->tpname);
    if (r->o.overlap)
      da_report_line(stdout, "overlap: compute-only %.2f ms, transfers-only %.2f ms, both %.2f ms",
                     r->comp_only_s * 1e3, r->comm_only_s * 1e3, r->total_s * 1e3);
    const int inputs_poisoned = nf[0] + nf[1] + nf[2] + nf[3] > 0;
    da_report_nonfinite(stdout, 8, nf_names, nf, r->ck[CK_NF_ROWS], r->ck[CK_NF_WRONG], inputs_poisoned);
    if (r->o.json && run_json(r)) rc = 1;
  }
  return da_mpi_verdict(r->job.rank, r->ck[CK_WRONG], rc);
}

static void run_release(void *c) {
  run_t *r = c;
  free(r->pos), free(r->q), free(r->k), free(r->v), free(r->outb), free(r->dout), free(r->dq), free(r->dk);
  free(r->dv), free(r->lse);
  da_plan_free(r->plan);
  for (int i = 0; i < 9 && r->dev; i++) da_dev_free(r->dev, r->dbuf[i]);
  if (r->dev && r->dstream) r->dev->stream_destroy(r->dstream);
  da_mask_spec_free(&r->o.mask);
}

static const da_cmdspec_t *run_spec(void *c) { return &((run_t *)c)->cmd; }

/* The phases in order (common.h: parse and agree comes first, release last). */
static const da_phase_fn run_phases[] = {
    run_check_files,   /* inputs: the .npy files give the sizes */
    run_plan,          /* placement, context, communicator, plan */
    run_inputs,        /* this rank's rows: read or generated */
    run_print_setup,   /* the header */
    run_execute,       /* the timed iterations */
    run_fetch,         /* device memory: the outputs back to the host */
    run_verify,        /* float64 check of sampled rows, non-finite counts */
    run_write_outputs, /* --output */
    run_overlap,       /* --measure-overlap */
    run_report,        /* table, JSON record, verdict */
    NULL};

int da_cmd_run(int argc, char **argv) {
  static const da_mpi_cmd_t spec = {.name = "run", .parse = run_parse, .phases = run_phases, .release = run_release,
                                    .spec = run_spec, .size = sizeof(run_t)};
  run_t r;
  memset(&r, 0, sizeof r);
  r.ps = (da_plan_stats_t)DA_PLAN_STATS_INITIALIZER; /* versioned: size and version set */
  run_options(&r);
  return da_mpi_cmd_main(&spec, &r.job, &r, argc, argv);
}
