/* cmd_run.c: `distattn run`, distributed exact attention over MPI (ring | striped | zigzag),
 * forward and optionally backward, timed nccl-tests style and verified in float64 on sampled rows
 * by the ranks that own them. Every rank generates only its own rows from the counter RNG, or
 * reads only its own rows of q/k/v/dout .npy files with MPI-IO (--input, launcher/npyio.c), and
 * writes only its own rows of the outputs (--output): no rank ever holds the full sequence. Not a
 * library layer: it may exit; the plan code never does. */
#define _GNU_SOURCE
#include <mpi.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "distattn.h"
#include "args.h"
#include "core.h"
#include "dtype.h"
#include "kernels.h"
#include "launcher.h"
#include "npyio.h"
#include "place.h" /* --bind, the rank -> host/core/GPU map (launcher/place.c) */
#include "common.h"
#include "report.h"
#include "rng.h"
#include "transport.h" /* da_test_link: the test-only slow link, echoed in the header and record */
#include "verify.h"

static const char *const algo_names[] = {"ring", "striped", "zigzag", NULL};
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};
static const char *const device_names[] = {"cpu", "cuda", NULL};

typedef struct run_opts {
  int algo, dtype, device, backward, overlap, bind;
  int64_t seq, heads, kv_heads, dim, batch, block, verify, iters, warmup, seed, threads;
  double timeout;
  da_mask_spec_t mask;
  const char *json, *input, *output;
} run_opts_t;

static int g_rank, g_size;







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
  double *abs, *ref;
  int *kind;
  int64_t n, cap;
} vrows_t;

static int vrow(vrows_t *v, int kind, const void *x, da_dtype_t dt, int64_t off, const double *ref, int64_t len) {
  if (v->n == v->cap) {
    int64_t cap = v->cap ? 2 * v->cap : 256;
    double *a = realloc(v->abs, (size_t)cap * sizeof(double)), *r = a ? realloc(v->ref, (size_t)cap * sizeof(double)) : NULL;
    int *k = r ? realloc(v->kind, (size_t)cap * sizeof(int)) : NULL;
    if (a) v->abs = a;
    if (r) v->ref = r;
    if (k) v->kind = k;
    if (!k) return -1;
    v->cap = cap;
  }
  da_verify_err(x, dt, off, ref, len, &v->abs[v->n], &v->ref[v->n]);
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
  double worst[VT_N] = {0};
  for (int64_t i = 0; i < v->n; i++) {
    if (isnan(v->ref[i])) { /* a poisoned input reaches this row's reference: nothing to measure */
      res->nonfinite++;
      continue;
    }
    double f = da_verify_floor(mx[v->kind[i]]), den = v->ref[i] > f ? v->ref[i] : f;
    vnote(res, v->abs[i] / den, v->abs[i], tol);
    res->nonfinite_wrong += v->abs[i] == INFINITY;
    if (!(v->abs[i] / den <= worst[v->kind[i]])) worst[v->kind[i]] = v->abs[i] / den;
  }
  for (int t = 0; t < VT_N; t++)
    DA_INFO(DA_SUB_IO, "verify %s: worst row rel err %.3g (tensor max |ref| %.3g)", names[t], worst[t], mx[t]);
  free(v->abs), free(v->ref), free(v->kind);
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
  float *lse_all = NULL, *delta_all = NULL;
  vrows_t vr = {0};
  int rc = 0;
  if (!ro || !rl || !rq || !rk || !rv) rc = -1;
  if (o->backward && o->verify > 0) {
    /* The softmax statistics of every query row (B*S*H scalars, not rows of q/k/v): each rank
     * contributes its own and the sum fills the table. */
    size_t ns = (size_t)(B * S * H);
    lse_all = calloc(ns, sizeof(float)), delta_all = calloc(ns, sizeof(float));
    if (!lse_all || !delta_all) rc = -1;
    if (!rc)
      for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++)
          for (int h = 0; h < H; h++) {
            size_t g = (size_t)((b * S + pos[i]) * H + h), l = (size_t)((b * n + i) * H + h);
            double d = 0;
            for (int e = 0; e < D; e++)
              d += (double)da_load_f32(out, (int)dt, (int64_t)l * D + e) * da_load_f32(dout, (int)dt, (int64_t)l * D + e);
            lse_all[g] = lse[l], delta_all[g] = (float)d;
          }
    int bad = da_mpi_max_int(rc);
    if (bad) rc = -1;
    else if (ns <= (size_t)INT32_MAX) {
      MPI_Allreduce(MPI_IN_PLACE, lse_all, (int)ns, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      MPI_Allreduce(MPI_IN_PLACE, delta_all, (int)ns, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    } else {
      rc = -1;
    }
  }
  for (int64_t s = 0; s < R && rc == 0; s++) {
    const int64_t i = R == 1 ? n / 2 : s * (n - 1) / (R - 1), b = s % B, l = b * n + i;
    if (da_verify_fwd_row(vp, b, pos[i], ro, rl)) {
      rc = -1;
      break;
    }
    res->rows++;
    for (int h = 0; h < H; h++) {
      if (vrow(&vr, VT_OUT, out, dt, (l * H + h) * D, ro + h * D, D)) rc = -1;
      if (isnan(rl[h]) || rl[h] == INFINITY) continue; /* poisoned: the out row above is counted apart */
      double le = rl[h] == -INFINITY ? (lse[l * H + h] == -INFINITY ? 0 : INFINITY) : fabs(lse[l * H + h] - rl[h]);
      vnote(res, le / fmax(1.0, fabs(rl[h])), le, tol);
    }
    if (!o->backward) continue;
    if (da_verify_dq_row(vp, b, pos[i], ro, rl, rq) || da_verify_dkv_row(vp, b, pos[i], lse_all + b * S * H,
                                                                         delta_all + b * S * H, rk, rv)) {
      rc = -1;
      break;
    }
    for (int h = 0; h < H; h++)
      if (vrow(&vr, VT_DQ, dq, dt, (l * H + h) * D, rq + h * D, D)) rc = -1;
    for (int g = 0; g < G; g++)
      if (vrow(&vr, VT_DK, dk, dt, (l * G + g) * D, rk + g * D, D) || vrow(&vr, VT_DV, dv, dt, (l * G + g) * D, rv + g * D, D))
        rc = -1;
  }
  vrows_finish(&vr, res, tol);
  free(ro), free(rl), free(rq), free(rk), free(rv), free(lse_all), free(delta_all);
  return rc;
}

/* Parse and check the options (usage errors print their message to stderr and give
 * DA_ARGS_USAGE): sizes, GQA, the mask against the length, the backend, the --json path (rank 0
 * writes the record: it checks the path before anything long runs). */
static int parse_run(da_cmdspec_t *cmd, da_opt_t *opts, int argc, char **argv, run_opts_t *o, int64_t *G) {
  int prc = da_args_parse(cmd, argc, argv);
  if (prc != DA_ARGS_OK) return prc;
  /* with --input the sizes come from the files (given ones must agree: da_npyio_inspect) */
  const char *missing = o->input ? NULL : !da_args_find(opts, "seq")->given ? "--seq"
                        : !da_args_find(opts, "heads")->given ? "--heads" : !da_args_find(opts, "dim")->given ? "--dim"
                                                                                                              : NULL;
  *G = o->kv_heads ? o->kv_heads : o->heads;
  if (missing) return da_args_error(cmd, "%s is required (or --input DIR)", missing);
  if ((!o->input || (da_args_find(opts, "heads")->given && o->kv_heads)) && (*G > o->heads || o->heads % *G))
    return da_args_error(cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o->heads, (long long)*G);
  if ((!o->input || da_args_find(opts, "seq")->given) && da_mask_check(&o->mask.mask, o->seq) != DA_SUCCESS)
    return da_args_error(cmd, "--mask: %s", strncmp(da_error_message(), "mask: ", 6) ? da_error_message()
                                                                                   : da_error_message() + 6);
  if (o->device == DA_DEVICE_CUDA && !da_kernels_get(DA_DEVICE_CUDA))
    return da_args_error(cmd, "--device cuda: not built: %s", da_error_message());
  if (o->json && g_rank == 0 && da_json_check_path(o->json)) return DA_ARGS_USAGE;
  char err[256];
  if (da_verify_poison_init(err, sizeof err)) return da_args_error(cmd, "%s", err);
  return DA_ARGS_OK;
}

int da_cmd_run(int argc, char **argv) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) MPI_Init(NULL, NULL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);

  run_opts_t o;
  memset(&o, 0, sizeof o);
  o.algo = 2, o.dtype = DA_FLOAT32, o.device = 0, o.batch = 1, o.verify = 8, o.iters = 3, o.warmup = 1, o.seed = 1;
  da_opt_t opts[] = {
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &o.algo, .help = "token layout / algorithm", .choices = algo_names},
      {.name = "seq", .type = DA_OPT_SIZE, .dest = &o.seq, .help = "total sequence length S (required)", .min = 1,
       .max = 1LL << 34},
      {.name = "heads", .type = DA_OPT_INT, .dest = &o.heads, .help = "query heads H (required)", .min = 1, .max = 65536},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &o.kv_heads, .help = "KV heads G (H % G == 0; 0 = H)", .min = 0,
       .max = 65536},
      {.name = "dim", .type = DA_OPT_INT, .dest = &o.dim, .help = "head dim D (required)", .min = 1, .max = 4096},
      {.name = "batch", .type = DA_OPT_INT, .dest = &o.batch, .help = "batch B", .min = 1, .max = 1 << 20},
      {.name = "mask", .type = DA_OPT_MASK, .dest = &o.mask, .help = "none | causal | window:W | doc:L1,L2,.. (+ joins)"},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &o.dtype, .help = "storage dtype of q, k, v, out",
       .choices = dtype_names},
      {.name = "backward", .type = DA_OPT_FLAG, .dest = &o.backward, .help = "also run and verify the backward"},
      {.name = "block", .type = DA_OPT_SIZE, .dest = &o.block,
       .help = "KV sub-block tokens between progress calls (0 = automatic)", .min = 0, .max = 1LL << 34},
      {.name = "verify", .type = DA_OPT_INT, .dest = &o.verify, .help = "rows per rank checked in float64 (0 = off)",
       .min = 0, .max = 1 << 20},
      {.name = "iters", .type = DA_OPT_INT, .dest = &o.iters, .help = "timed iterations (median reported)", .min = 1,
       .max = 1000000},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &o.warmup, .help = "untimed iterations first", .min = 0,
       .max = 1000000},
      {.name = "seed", .type = DA_OPT_INT, .dest = &o.seed, .help = "seed of the counter-based inputs", .min = 0,
       .max = INT64_MAX},
      {.name = "device", .type = DA_OPT_ENUM, .dest = &o.device, .help = "kernel backend", .choices = device_names},
      {.name = "threads", .type = DA_OPT_INT, .dest = &o.threads,
       .help = "kernel threads per rank (0 = this rank's share of its cores)", .min = 0, .max = 4096},
      {.name = "bind", .type = DA_OPT_ENUM, .dest = &o.bind, .choices = da_bind_names,
       .help = "cores per rank: keep the launcher's, next to the rank's GPU, NUMA blocks, or unbound"},
      {.name = "json", .type = DA_OPT_STRING, .dest = &o.json, .metavar = "FILE",
       .help = "append one JSON object (JSON Lines) to FILE"},
      {.name = "input", .type = DA_OPT_STRING, .dest = &o.input, .metavar = "DIR",
       .help = "read q.npy k.npy v.npy (dout.npy) [S,H,D] or [B,S,H,D] with MPI-IO instead of seeded inputs"},
      {.name = "output", .type = DA_OPT_STRING, .dest = &o.output, .metavar = "DIR",
       .help = "write out.npy lse.npy (dq.npy dk.npy dv.npy) with MPI-IO"},
      {.name = "measure-overlap", .type = DA_OPT_FLAG, .dest = &o.overlap,
       .help = "also time compute-only and transfer-only runs and report the overlap"},
      {.name = "timeout", .type = DA_OPT_DOUBLE, .dest = &o.timeout,
       .help = "seconds a rank waits for a peer before failing (0 = DISTATTN_TIMEOUT or 300)", .dmin = 0,
       .dmax = 1e6},
      {0},
  };
  da_cmdspec_t cmd = {.name = "run",
                      .summary = "distributed exact attention over MPI (ring | striped | zigzag), forward and "
                                 "backward, timed and verified in float64 on sampled rows",
                      .opts = opts};

  /* Every rank parses its own argv (mpirun gives all the same one, an MPMD launch may not) and
   * all exit with the worst verdict. Rank 0 speaks; when rank 0 was fine but another rank was
   * not, the lowest such rank says why, so a usage error always prints exactly one message. */
  int saved_out = -1, saved_err = -1;
  if (g_rank != 0) {
    fflush(stdout), fflush(stderr);
    int devnull = open("/dev/null", O_WRONLY);
    saved_out = dup(1), saved_err = dup(2);
    if (devnull >= 0) dup2(devnull, 1), dup2(devnull, 2), close(devnull);
  }
  int64_t G = 0;
  int prc = parse_run(&cmd, opts, argc, argv, &o, &G);
  if (g_rank != 0) {
    fflush(stdout), fflush(stderr);
    if (saved_out >= 0) dup2(saved_out, 1), close(saved_out);
    if (saved_err >= 0) dup2(saved_err, 2), close(saved_err);
  }
  {
    int v[2] = {prc, prc != DA_ARGS_OK ? g_rank : g_size}, rank0 = prc;
    MPI_Bcast(&rank0, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &v[1], 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (rank0 == DA_ARGS_OK && v[1] == g_rank && g_rank != 0) {
      fprintf(stderr, "distattn run: rank %d was given other arguments than rank 0, and they are wrong:\n", g_rank);
      da_mask_spec_free(&o.mask);
      parse_run(&cmd, opts, argc, argv, &o, &G); /* again, to print its message */
    }
    prc = da_mpi_max_int(prc);
  }
  if (prc != DA_ARGS_OK) {
    da_mask_spec_free(&o.mask);
    MPI_Finalize();
    return prc == DA_ARGS_HELP ? 0 : 2;
  }

  /* ---- .npy inputs: the files give the sizes; every rank prints the same verdict ---- */
  int rc = 0;
  da_npy_inputs_t npin;
  memset(&npin, 0, sizeof npin);
  if (o.input || o.output) {
    char ierr[1536] = "";
    if (o.input) {
      da_npy_expect_t want = {-1, -1, -1, -1, -1, -1};
      if (da_args_find(opts, "batch")->given) want.B = o.batch;
      if (da_args_find(opts, "seq")->given) want.S = o.seq;
      if (da_args_find(opts, "heads")->given) want.H = o.heads;
      if (da_args_find(opts, "kv-heads")->given && o.kv_heads) want.G = o.kv_heads;
      if (da_args_find(opts, "dim")->given) want.D = o.dim;
      if (da_args_find(opts, "dtype")->given) want.dtype = o.dtype;
      rc = da_npyio_inspect(o.input, o.backward, &want, &npin, ierr, sizeof ierr);
      if (!rc && (npin.H > 65536 || npin.D > 4096 || npin.B > (1 << 20) || npin.S > (1LL << 34)))
        rc = 2, snprintf(ierr, sizeof ierr, "q.npy: shape: sizes over the limits of --heads / --dim / --batch / --seq");
      if (!rc) {
        o.batch = npin.B, o.seq = npin.S, o.heads = npin.H, o.kv_heads = npin.G, o.dim = npin.D, o.dtype = npin.dtype;
        G = npin.G;
        if (da_mask_check(&o.mask.mask, o.seq) != DA_SUCCESS)
          rc = 2, snprintf(ierr, sizeof ierr, "--mask with q.npy's sequence %lld: %s", (long long)o.seq, da_error_message());
      }
      if (rc) fprintf(stderr, "distattn run: rank %d: --input %s: %s\n", g_rank, o.input, ierr);
    }
    if (!rc && o.output && (rc = da_npyio_check_dir(o.output, ierr, sizeof ierr)) != 0)
      fprintf(stderr, "distattn run: rank %d: %s\n", g_rank, ierr);
    if (rc) {
      da_mask_spec_free(&o.mask);
      MPI_Finalize();
      return rc;
    }
  }

  /* ---- context, communicator, plan ---- */
  da_placement_t place;
  char place_env[64], place_err[256];
  if (da_place_world((da_bind_t)o.bind, &place, place_env, sizeof place_env, place_err, sizeof place_err))
    fprintf(stderr, "distattn run: rank %d: %s\n", g_rank, place_err);
  const int threads = o.threads ? (int)o.threads : place.threads;
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_plan_t *plan = NULL;
  da_config_t ccfg = DA_CONFIG_INITIALIZER;
  ccfg.device = (da_device_t)o.device;
  ccfg.nthreads = threads;
  da_status_t st = da_context_create(&ccfg, &ctx);
  if (da_mpi_max_int(st != DA_SUCCESS)) {
    rc = da_report_failure("run", g_rank, "context", st ? st : DA_ERR_REMOTE, ctx);
    goto out;
  }
  if ((st = da_comm_create(ctx, MPI_COMM_WORLD, &comm)) != DA_SUCCESS) {
    rc = da_report_failure("run", g_rank, "communicator", st, ctx);
    goto out;
  }
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = o.batch, prob.seq = o.seq, prob.heads = o.heads, prob.kv_heads = G, prob.dim = o.dim;
  prob.mask = o.mask.mask.flags, prob.window = o.mask.mask.window;
  prob.ndocs = o.mask.mask.ndocs, prob.cu_seqlens = o.mask.mask.cu_seqlens;
  prob.dtype = (da_dtype_t)o.dtype;
  da_plan_config_t pcfg = DA_PLAN_CONFIG_INITIALIZER;
  pcfg.algo = (da_algo_t)o.algo, pcfg.block = o.block, pcfg.timeout = o.timeout;
  /* The plan refuses, before anything large is allocated, a problem whose buffers and tensors
   * exceed this rank's share of the machine's memory (or DISTATTN_MEM_BUDGET): exit 2. */
  pcfg.mem_count = DA_MEM_TENSORS | (o.backward ? DA_MEM_BACKWARD : 0);
  if ((st = da_plan_create(comm, &prob, &pcfg, &plan)) != DA_SUCCESS) {
    rc = da_report_failure("run", g_rank, "plan", st, ctx);
    goto out;
  }

  /* ---- this rank's inputs, generated where they live ---- */
  const int H = (int)o.heads, D = (int)o.dim;
  const int64_t B = o.batch, n = da_plan_local_rows(plan);
  const da_dtype_t dt = (da_dtype_t)o.dtype;
  const size_t es = da_dtype_size(dt), nq = (size_t)(B * n * H * D), nk = (size_t)(B * n * G * D);
  int64_t *pos = malloc((size_t)(n + 1) * sizeof *pos);
  char *q = malloc(nq * es + 1), *k = malloc(nk * es + 1), *v = malloc(nk * es + 1), *outb = malloc(nq * es + 1);
  char *dout = o.backward ? malloc(nq * es + 1) : NULL, *dq = o.backward ? malloc(nq * es + 1) : NULL;
  char *dk = o.backward ? malloc(nk * es + 1) : NULL, *dv = o.backward ? malloc(nk * es + 1) : NULL;
  float *lse = malloc((size_t)(B * n * H) * sizeof(float) + 4);
  int oom = !pos || !q || !k || !v || !outb || !lse || (o.backward && (!dout || !dq || !dk || !dv));
  if (da_mpi_max_int(oom)) {
    if (oom) fprintf(stderr, "distattn run: rank %d: out of memory for %lld local rows\n", g_rank, (long long)n);
    rc = 1;
    goto free_bufs;
  }
  da_plan_local_positions(plan, pos, n);
  da_vprob_t vp = {.B = B, .S = o.seq, .seed = (uint64_t)o.seed};
  vp.kp.H = H, vp.kp.G = (int)G, vp.kp.D = D, vp.kp.scale = (float)(1.0 / sqrt((double)D)), vp.kp.dtype = dt;
  vp.kp.mask = o.mask.mask;
  if (o.input) {
    /* each rank's rows straight into its shard buffers, one collective read per file */
    char *dst[DA_NPYIO_NIN] = {q, k, v, dout};
    char ierr[1536] = "";
    for (int f = 0; f < npin.nfiles && !rc; f++) {
      const int64_t heads = (f == DA_NPYIO_K || f == DA_NPYIO_V) ? G : H;
      rc = da_npyio_read(npin.path[f], npin.data_offset[f], B, o.seq, heads * D * (int64_t)es, pos, n, dst[f], ierr,
                         sizeof ierr);
    }
    if (rc) {
      fprintf(stderr, "distattn run: rank %d: --input %s: %s\n", g_rank, o.input, ierr);
      goto free_bufs;
    }
  }
  for (int64_t b = 0; b < B && !o.input; b++) {
    da_verify_gen(&vp, DA_RNG_Q, b, pos, n, H, q + (size_t)(b * n * H * D) * es, (int64_t)H * D);
    da_verify_gen(&vp, DA_RNG_K, b, pos, n, (int)G, k + (size_t)(b * n * G * D) * es, G * D);
    da_verify_gen(&vp, DA_RNG_V, b, pos, n, (int)G, v + (size_t)(b * n * G * D) * es, G * D);
    if (o.backward) da_verify_gen(&vp, DA_RNG_DOUT, b, pos, n, H, dout + (size_t)(b * n * H * D) * es, (int64_t)H * D);
  }
  da_tensor_t tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
  const int64_t shq[4] = {B, n, H, D}, shk[4] = {B, n, G, D}, shl[3] = {B, n, H};
  da_tensor_make(&tq, q, dt, 4, shq), da_tensor_make(&tk, k, dt, 4, shk), da_tensor_make(&tv, v, dt, 4, shk);
  da_tensor_make(&to, outb, dt, 4, shq), da_tensor_make(&tl, lse, DA_FLOAT32, 3, shl);
  da_tensor_make(&tdo, dout, dt, 4, shq), da_tensor_make(&tdq, dq, dt, 4, shq);
  da_tensor_make(&tdk, dk, dt, 4, shk), da_tensor_make(&tdv, dv, dt, 4, shk);

  /* ---- header ---- */
  char hosts[1024], maskdesc[256];
  double link_gbps = 0, link_us = 0;
  const int link_on = da_test_link(&link_gbps, &link_us) > 0; /* malformed: the plan already failed */
  da_mask_describe(&o.mask.mask, maskdesc, sizeof maskdesc);
  if (g_rank == 0) {
    da_report_header(stdout, &cmd, threads);
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0;
    MPI_Get_library_version(lib, &len);
    lib[strcspn(lib, ",\n")] = '\0'; /* first clause: "Open MPI v4.1.4" */
    da_report_line(stdout, "ranks: %d  mpi: %s (MPI %d.%d)  backend: %s  transport: mpi (host memory)", g_size, lib,
                   MPI_VERSION, MPI_SUBVERSION, device_names[o.device]);
    if (link_on)
      da_report_line(stdout, "test link hook: DISTATTN_TEST_LINK_GBPS=%g DISTATTN_TEST_LINK_US=%g (transfers slowed "
                             "to this link; not a real network)", link_gbps, link_us);
  }
  fflush(stdout);
  da_place_print(stdout, (da_bind_t)o.bind, &place, place_env, hosts, sizeof hosts);
  da_plan_stats_t ps = DA_PLAN_STATS_INITIALIZER;
  da_plan_stats(plan, &ps);
  {
    int64_t rows[2] = {n, -n};
    MPI_Allreduce(MPI_IN_PLACE, rows, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    unsigned long long mem[2] = {(unsigned long long)ps.mem_fwd_bytes, (unsigned long long)ps.mem_bwd_bytes};
    unsigned long long vol[2] = {(unsigned long long)ps.plan_fwd_bytes, (unsigned long long)ps.plan_bwd_bytes};
    MPI_Allreduce(MPI_IN_PLACE, mem, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, vol, 2, MPI_UNSIGNED_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (g_rank == 0) {
      da_report_line(stdout, "layout: %s  local rows %lld..%lld  pairs %lld  work imbalance (schedule) %.4f  KV "
                             "sub-block %lld%s", algo_names[o.algo], (long long)-rows[1], (long long)rows[0],
                     (long long)ps.pairs_total, ps.work_imbalance, (long long)ps.block, o.block ? "" : " (auto)");
      da_report_line(stdout, "plan: buffers per rank %.2f MiB (fwd) / %.2f MiB (fwd+bwd); sent per call, all ranks: "
                             "fwd %.2f MiB, bwd %.2f MiB (KV in %s, dK/dV in fp32)", mem[0] / 1048576.0,
                     mem[1] / 1048576.0, vol[0] / 1048576.0, o.backward ? vol[1] / 1048576.0 : 0.0,
                     dtype_names[o.dtype]);
      da_report_line(stdout, "time: median of %lld iters, max over ranks; gflops: (4 fwd + 10 bwd) * H * D * pairs / "
                             "time; comm: bytes sent per call, summed over ranks", (long long)o.iters);
      if (o.input)
        da_report_line(stdout, "input: %s: q.npy k.npy v.npy%s, %s, %s [%s%lld, %lld, %lld] (MPI-IO, each rank its "
                               "rows)", o.input, o.backward ? " dout.npy" : "", da_npyio_descr(o.dtype),
                       npin.batched ? "[B, S, H, D]" : "[S, H, D]", npin.batched ? "B, " : "", (long long)o.seq,
                       (long long)H, (long long)D);
      if (o.output)
        da_report_line(stdout, "output: %s: out.npy lse.npy%s (written to temporary names, renamed when every rank "
                               "has finished)", o.output, o.backward ? " dq.npy dk.npy dv.npy" : "");
      if (o.verify)
        da_report_line(stdout, "verify: %lld rows per rank in float64 from %s (out, lse%s); "
                               "tolerance %g%s", (long long)o.verify,
                       o.input ? "the input files, streamed in chunks" : "regenerated inputs",
                       o.backward ? ", dq, dk, dv" : "",
                       dt == DA_FLOAT32 ? 1e-4 : 2e-2,
                       o.backward ? "; dk/dv use the run's per-row lse and rowsum(dout*out) of the other rows" : "");
    }
  }

  /* ---- timed runs ---- */
  const int64_t total_it = o.warmup + o.iters;
  double *tf = calloc((size_t)o.iters, sizeof *tf), *tb = calloc((size_t)o.iters, sizeof *tb);
  double *tt = calloc((size_t)o.iters, sizeof *tt);
  for (int64_t it = 0; it < total_it && st == DA_SUCCESS; it++) {
    double t[2] = {0, 0};
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    st = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL);
    t[0] = MPI_Wtime() - t0;
    if (st == DA_SUCCESS && o.backward) {
      MPI_Barrier(MPI_COMM_WORLD);
      t0 = MPI_Wtime();
      st = da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, NULL);
      t[1] = MPI_Wtime() - t0;
    }
    if (st != DA_SUCCESS) break; /* every rank has a failure status (the plan agreed on it) */
    MPI_Allreduce(MPI_IN_PLACE, t, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= o.warmup) tf[it - o.warmup] = t[0], tb[it - o.warmup] = t[1], tt[it - o.warmup] = t[0] + t[1];
  }
  if (st != DA_SUCCESS) {
    rc = da_report_failure("run", g_rank, o.backward ? "forward/backward" : "forward", st, ctx);
    goto free_times;
  }
  da_plan_stats(plan, &ps);
  /* Figures of the last iteration: bytes summed, exposed time max, compute imbalance max/mean. */
  double comp = ps.fwd_compute_s + ps.bwd_compute_s, expo = ps.fwd_exposed_s + ps.bwd_exposed_s;
  double sums[2] = {(double)(ps.fwd_bytes_sent + ps.bwd_bytes_sent), comp}, maxs[3] = {expo, comp, 0};
  maxs[2] = (double)da_peak_rss_bytes();
  MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, maxs, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const double fwd_s = da_median(tf, o.iters), bwd_s = o.backward ? da_median(tb, o.iters) : NAN;
  const double t_total = da_median(tt, o.iters);
  const double flops = (double)ps.pairs_total * H * D * (4.0 + (o.backward ? 10.0 : 0.0));
  const double gflops = flops / t_total * 1e-9;
  const double imbalance = sums[1] > 0 ? maxs[1] / (sums[1] / g_size) : 1.0;

  /* ---- verification (before the overlap runs, which overwrite the outputs) ---- */
  vresult_t vr = {0};
  int vfail = 0;
  da_npyio_source_t *src = NULL;
  if (o.verify > 0 && o.input) {
    char ierr[1536] = "";
    src = da_npyio_source_open(&npin, ierr, sizeof ierr);
    if (!src) fprintf(stderr, "distattn run: rank %d: --verify: %s\n", g_rank, ierr);
    vp.rows = da_npyio_source_row, vp.rows_ctx = src;
    vfail = !src;
  }
  if (da_mpi_max_int(vfail)) {
    da_npyio_source_close(src);
    rc = 1;
    goto free_times;
  }
  if (o.verify > 0) vfail = verify(&o, &vp, n, pos, outb, lse, dout, dq, dk, dv, &vr) != 0;
  da_npyio_source_close(src);
  if (da_mpi_max_int(vfail)) {
    if (vfail)
      fprintf(stderr, "distattn run: rank %d: verification ran out of memory%s\n", g_rank,
              o.input ? " or could not read the input files" : "");
    rc = 1;
    goto free_times;
  }
  double vmax[2] = {vr.max_abs, vr.max_rel};
  /* rows, wrong, rows with a non-finite reference, then NaN / Inf values per tensor (this rank's
   * inputs and the outputs of the last iteration: one pass over memory the run just touched) */
  static const char *const nf_names[] = {"q", "k", "v", "dout", "out", "dq", "dk", "dv"};
  int64_t vsum[12] = {vr.rows, vr.wrong, vr.nonfinite, da_count_nonfinite(q, dt, (int64_t)nq),
                      da_count_nonfinite(k, dt, (int64_t)nk), da_count_nonfinite(v, dt, (int64_t)nk),
                      o.backward ? da_count_nonfinite(dout, dt, (int64_t)nq) : 0,
                      da_count_nonfinite(outb, dt, (int64_t)nq), o.backward ? da_count_nonfinite(dq, dt, (int64_t)nq) : 0,
                      o.backward ? da_count_nonfinite(dk, dt, (int64_t)nk) : 0,
                      o.backward ? da_count_nonfinite(dv, dt, (int64_t)nk) : 0, vr.nonfinite_wrong};
  MPI_Allreduce(MPI_IN_PLACE, vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, vsum, 12, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  const int64_t *nf = vsum + 3, nf_in = nf[0] + nf[1] + nf[2] + nf[3], nf_out = nf[4] + nf[5] + nf[6] + nf[7];

  /* ---- .npy outputs (before the overlap runs, which overwrite them): only from a run whose
   * verified rows were right, so the final names never hold a failed run's results ---- */
  if (o.output && vsum[1] > 0 && g_rank == 0)
    fprintf(stderr, "distattn run: --output %s: not written: verification found %lld wrong values\n", o.output,
            (long long)vsum[1]);
  if (o.output && vsum[1] == 0) {
    const int nb = npin.batched || B > 1; /* seeded runs: [S, ...] when B = 1 */
    const int nw = o.backward ? 5 : 2;
    da_npy_out_t w[5];
    const void *bufs[5] = {outb, lse, dq, dk, dv};
    static const char *const wn[5] = {"out.npy", "lse.npy", "dq.npy", "dk.npy", "dv.npy"};
    for (int f = 0; f < nw; f++) {
      const int64_t heads = (f == 3 || f == 4) ? G : H;
      w[f].name = wn[f], w[f].buf = bufs[f];
      w[f].descr = f == 1 ? "<f4" : da_npyio_descr(o.dtype);
      w[f].ndim = 0;
      if (nb) w[f].shape[w[f].ndim++] = B;
      w[f].shape[w[f].ndim++] = o.seq;
      w[f].shape[w[f].ndim++] = heads;
      if (f != 1) w[f].shape[w[f].ndim++] = D;
      w[f].rowbytes = f == 1 ? (int64_t)H * 4 : heads * D * (int64_t)es;
    }
    char werr[1536] = "";
    int wrc = da_npyio_write(o.output, nw, w, B, o.seq, pos, n, werr, sizeof werr);
    if (wrc) {
      fprintf(stderr, "distattn run: rank %d: --output %s: %s (nothing written under the final names)\n", g_rank,
              o.output, werr);
      rc = wrc;
      goto free_times;
    }
  }

  /* ---- overlap: compute without transfers, transfers without compute, both ---- */
  double overlap = NAN, t_comp = NAN, t_comm = NAN;
  if (o.overlap) {
    double *tm = calloc((size_t)o.iters, sizeof *tm);
    for (int mode = DA_PLAN_COMPUTE_ONLY; mode <= DA_PLAN_COMM_ONLY && st == DA_SUCCESS; mode++) {
      da_plan_set_mode(plan, (da_plan_mode_t)mode);
      for (int64_t it = 0; it < o.iters + (o.warmup > 0) && st == DA_SUCCESS; it++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        st = da_plan_fwd(plan, &tq, &tk, &tv, &to, &tl, NULL);
        if (st == DA_SUCCESS && o.backward) st = da_plan_bwd(plan, &tq, &tk, &tv, &to, &tdo, &tl, &tdq, &tdk, &tdv, NULL);
        double t = MPI_Wtime() - t0;
        MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (it >= (o.warmup > 0)) tm[it - (o.warmup > 0)] = t;
      }
      if (mode == DA_PLAN_COMPUTE_ONLY) t_comp = da_median(tm, o.iters);
      else t_comm = da_median(tm, o.iters);
    }
    da_plan_set_mode(plan, DA_PLAN_RUN);
    free(tm);
    if (st != DA_SUCCESS) {
      rc = da_report_failure("run", g_rank, "overlap measurement", st, ctx);
      goto free_times;
    }
    double mn = fmin(t_comp, t_comm);
    overlap = mn > 0 ? (t_comp + t_comm - t_total) / mn : 1.0;
    overlap = overlap < 0 ? 0 : overlap > 1 ? 1 : overlap;
  }

  /* ---- report ---- */
  int wrong_any = vsum[1] > 0;
  if (g_rank == 0) {
    static const char *const names[] = {"algo", "ranks", "seq", "batch", "heads", "kv", "dim", "mask", "dtype",
                                        "fwd_ms", "bwd_ms", "gflops", "comm_MB", "exposed_ms", "overlap", "imbal",
                                        "imb_work", "rows", "max_rel", "wrong"};
    static const int widths[] = {7, 5, 9, 5, 5, 3, 4, 12, 5, 10, 10, 8, 9, 10, 7, 6, 8, 6, 9, 6};
    da_table_t t;
    da_table_init(&t, stdout, 20, names, widths);
    da_table_print_header(&t);
    da_table_str(&t, algo_names[o.algo]);
    da_table_int(&t, g_size), da_table_int(&t, o.seq), da_table_int(&t, B), da_table_int(&t, H);
    da_table_int(&t, G), da_table_int(&t, D), da_table_str(&t, maskdesc), da_table_str(&t, dtype_names[o.dtype]);
    da_table_dbl(&t, fwd_s * 1e3, 2, 0), da_table_dbl(&t, bwd_s * 1e3, 2, 0), da_table_dbl(&t, gflops, 2, 0);
    da_table_dbl(&t, sums[0] / 1048576.0, 2, 0), da_table_dbl(&t, maxs[0] * 1e3, 2, 0);
    da_table_dbl(&t, overlap, 2, 0), da_table_dbl(&t, imbalance, 2, 0), da_table_dbl(&t, ps.work_imbalance, 3, 0);
    da_table_int(&t, vsum[0]), da_table_dbl(&t, o.verify ? vmax[1] : NAN, 2, 1), da_table_int(&t, vsum[1]);
    da_table_end_row(&t);
    if (o.overlap)
      da_report_line(stdout, "overlap: compute-only %.2f ms, transfers-only %.2f ms, both %.2f ms", t_comp * 1e3,
                     t_comm * 1e3, t_total * 1e3);
    da_report_nonfinite(stdout, 8, nf_names, nf, vsum[2], vsum[11], nf_in > 0);
    if (o.json) {
      da_json_t j;
      da_json_begin(&j);
      da_json_str(&j, "cmd", "run");
      da_json_str(&j, "algo", algo_names[o.algo]);
      da_json_int(&j, "ranks", g_size);
      da_json_int(&j, "seq", o.seq);
      da_json_int(&j, "batch", B);
      da_json_int(&j, "heads", H);
      da_json_int(&j, "kv_heads", G);
      da_json_int(&j, "dim", D);
      da_json_str(&j, "mask", maskdesc);
      da_json_str(&j, "dtype", dtype_names[o.dtype]);
      da_json_str(&j, "device", device_names[o.device]);
      da_json_int(&j, "threads", threads);
      da_json_int(&j, "block", ps.block); /* in use: --block or the automatic choice */
      da_json_int(&j, "iters", o.iters);
      da_json_dbl(&j, "fwd_s", fwd_s);
      if (o.backward) da_json_dbl(&j, "bwd_s", bwd_s);
      else da_json_null(&j, "bwd_s");
      da_json_dbl(&j, "gflops", gflops);
      da_json_int(&j, "pairs", ps.pairs_total);
      da_json_int(&j, "verify_rows", vsum[0]);
      da_json_dbl(&j, "max_abs_err", o.verify ? vmax[0] : NAN);
      da_json_dbl(&j, "max_rel_err", o.verify ? vmax[1] : NAN);
      da_json_int(&j, "wrong", vsum[1]);
      da_json_dbl(&j, "comm_bytes", sums[0]);
      da_json_dbl(&j, "comm_exposed_s", maxs[0]);
      da_json_dbl(&j, "overlap", overlap);
      da_json_dbl(&j, "t_compute_only_s", t_comp);
      da_json_dbl(&j, "t_comm_only_s", t_comm);
      da_json_dbl(&j, "imbalance", imbalance);
      da_json_dbl(&j, "imbalance_work", ps.work_imbalance);
      da_json_dbl(&j, "compute_s", maxs[1]); /* max over ranks, fwd + bwd, last iteration */
      da_json_int(&j, "nonfinite_rows", vsum[2]);
      da_json_int(&j, "nonfinite_inputs", nf_in);
      da_json_int(&j, "nonfinite_outputs", nf_out);
      da_json_int(&j, "nonfinite_wrong", vsum[11]);
      if (link_on) da_json_dbl(&j, "link_gbps", link_gbps), da_json_dbl(&j, "link_us", link_us);
      else da_json_null(&j, "link_gbps"), da_json_null(&j, "link_us");
      da_json_int(&j, "peak_rss_bytes", (int64_t)maxs[2]); /* max over ranks */
      da_json_str(&j, "hosts", hosts);
      da_json_str(&j, "git", da_git_version());
      const char *job = getenv("SLURM_JOB_ID");
      if (job && *job) da_json_str(&j, "SLURM_JOB_ID", job);
      const char *nodes = getenv("SLURM_JOB_NODELIST"), *step_nodes = getenv("SLURM_STEP_NODELIST");
      if (nodes && *nodes) da_json_str(&j, "SLURM_JOB_NODELIST", nodes);
      if (step_nodes && *step_nodes) da_json_str(&j, "SLURM_STEP_NODELIST", step_nodes);
      da_json_str(&j, "cpu", da_report_cpu_model());
      if (o.input) da_json_str(&j, "input", o.input);
      if (o.output) da_json_str(&j, "output", o.output);
      if (da_json_append(&j, o.json)) rc = 1;
      da_json_free(&j);
    }
    if (da_report_footer(stdout, vsum[1], rc == 0)) rc = rc ? rc : 1;
    fflush(stdout);
  }
  if (wrong_any && !rc) rc = 1;
  rc = da_mpi_max_int(rc);
free_times:
  free(tf), free(tb), free(tt);
free_bufs:
  free(pos), free(q), free(k), free(v), free(outb), free(dout), free(dq), free(dk), free(dv), free(lse);
out:
  da_plan_free(plan);
  da_comm_free(comm);
  da_context_free(ctx);
  da_mask_spec_free(&o.mask);
  MPI_Finalize();
  return rc;
}
