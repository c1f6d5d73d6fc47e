/* cmd_decode.c: `distattn decode`, autoregressive decode against a distributed paged KV cache over
 * MPI (tree | ring). Every rank fills only its own pages from the counter RNG (no rank ever holds
 * the whole context); each step appends the new token's k, v and decodes it; sampled output rows
 * are verified in float64 by streaming over the whole context regenerated from the RNG, with no
 * gather. Reports per-step latency (median, p99), bytes per step, KV read rate per rank and peak
 * memory per rank against the rank's shard. The work is the phases of decode_phases, run in order
 * by da_mpi_cmd_main (common.h) over one decode_t. Not a library layer: it may exit. */
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
#include "common.h"
#include "fault.h" /* da_fault_point: the test-only fault injection */
#include "paths.h"
#include "gpumap.h" /* --device cuda: the rank -> GPU map, --ranks-per-gpu */
#include "report.h"
#include "rng.h"
#include "verify.h"
#include "transport.h" /* the combine's transport: where the cache's pages live (devapi.h) */

static const char *const algo_names[] = {"tree", "ring", NULL};
static const char *const topo_names[] = {"flat", "two-level", NULL};
static const char *const layout_names[] = {"contiguous", "striped", "zigzag", NULL};
static const char decode_summary[] = "autoregressive decode against a distributed paged KV cache (tree | ring), "
                                     "timed per step and verified in float64 on sampled rows";

typedef struct dec_opts {
  int algo, topo, layout, dtype, device;
  int64_t context, heads, kv_heads, dim, batch, steps, warmup, verify, page, node_size, root, seed, threads;
  double timeout;
  const char *lengths, *weights, *json, *transport;
  int64_t mem_budget; /* bytes of KV cache a rank may hold (0 = no limit) */
  int64_t ranks_per_gpu;
} dec_opts_t;

static int parse_list_doubles(const char *s, double *out, int64_t n) {
  int64_t i = 0;
  const char *p = s;
  while (*p && i < n) {
    char *end = NULL;
    out[i] = strtod(p, &end);
    if (end == p || !(out[i] > 0) || !isfinite(out[i])) return -1;
    i++;
    p = end;
    if (*p == ',') p++;
    else if (*p) return -1;
  }
  return i == n && !*p ? 0 : -1;
}

/* Fill this rank's pages of sequence b from the RNG: row (pos, g) of K and V as da_verify_gen
 * makes them, so the float64 verifier regenerates exactly what the kernel reads. */
/* The device table of memory the CPU cannot address (CUDA pages), or NULL: host memory, or the host
 * seam's shared memory, which the CPU reads and writes in place. */
static const da_devapi_t *cuda_pages(const char *transport) {
  const da_transport_t *t = da_transport_find(transport);
  da_error_clear();
  return t && t->devapi && strcmp(t->devapi->name, "host") ? t->devapi : NULL;
}

/* Fill this rank's pages of sequence b from the RNG: row (pos, g) of K and V as da_verify_gen
 * makes them, so the float64 verifier regenerates exactly what the kernel reads. Pages in CUDA
 * memory (dev) are generated in host memory and copied (their rows are packed: ld = G * D). */
static void fill_pages(da_kvcache_t *cache, const da_vprob_t *vp, int64_t b, const da_devapi_t *dev) {
  const int G = vp->kp.G, D = vp->kp.D, dt = (int)vp->kp.dtype;
  const size_t es = da_dtype_size((da_dtype_t)dt);
  const uint64_t seed = da_verify_seed(vp->seed, b);
  const int64_t np = da_kvcache_num_pages(cache, b);
#pragma omp parallel num_threads(vp->kp.nthreads > 0 ? vp->kp.nthreads : 1)
  {
    float *tmp = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < np; i++) {
      da_kvcache_page_t pg;
      if (!tmp || da_kvcache_get_page(cache, b, i, &pg) != DA_SUCCESS) continue;
      const size_t bytes = (size_t)(pg.count * G * D) * es;
      char *hk = dev ? malloc(bytes ? bytes : 1) : pg.k, *hv = dev ? malloc(bytes ? bytes : 1) : pg.v;
      if (!hk || !hv) continue; /* the verification then reports the wrong rows */
      const int64_t ldk = dev ? (int64_t)G * D : pg.ldk, ldv = dev ? (int64_t)G * D : pg.ldv;
      for (int64_t j = 0; j < pg.count; j++) {
        const int64_t pos = pg.start + j * pg.stride;
        for (int g = 0; g < G; g++) {
          da_rng_row(seed, DA_RNG_K, pos, g, D, tmp);
          da_verify_poison(DA_RNG_K, pos, g, tmp);
          for (int d = 0; d < D; d++) da_store_f32(hk, dt, j * ldk + (int64_t)g * D + d, tmp[d]);
          da_rng_row(seed, DA_RNG_V, pos, g, D, tmp);
          da_verify_poison(DA_RNG_V, pos, g, tmp);
          for (int d = 0; d < D; d++) da_store_f32(hv, dt, j * ldv + (int64_t)g * D + d, tmp[d]);
        }
      }
      if (dev) {
        (void)dev->copy_from_host(pg.k, hk, bytes, NULL); /* NULL: CUDA's default stream */
        (void)dev->copy_from_host(pg.v, hv, bytes, NULL);
        free(hk), free(hv);
      }
    }
    free(tmp);
  }
}

/* A sampled output row kept for verification: which step and sequence, its query position, the
 * row in the output dtype and its lse. */
typedef struct sample {
  int64_t step, b, qpos;
  char *out; /* [H][D] dtype */
  float *lse; /* [H] */
} sample_t;

/* ---- the command's state, carried through its phases ---- */

/* What the check sums over ranks, by index into decode_t.ck. */
enum {
  DK_ROWS,     /* verified rows */
  DK_WRONG,    /* wrong (row, head) vectors */
  DK_NF_ROWS,  /* verified vectors whose float64 reference is non-finite (not wrong) */
  DK_NF_WRONG, /* wrong vectors non-finite where the reference is finite */
  DK_NF,       /* + 0..3: NaN / Inf values in q, k, v (the cache), out (nf_names) */
  DK_N = DK_NF + 4
};
static const char *const nf_names[] = {"q", "k", "v", "out"};

typedef struct decode {
  da_mpi_job_t job;
  dec_opts_t o;
  da_opt_t opts[32];
  da_cmdspec_t cmd;
  int64_t G;        /* KV heads in effect */
  int64_t *lens;    /* [B] context length of every sequence before the first step */
  double *weights;  /* --weights: [P] capacity per rank, else NULL */
  int threads;
  da_kvcache_t *cache;
  da_decode_plan_t *plan;
  da_decode_stats_t ds;
  da_vprob_t vp;    /* the problem as the RNG and the float64 verifier see it */
  double t_fill;    /* seconds this rank took to fill its pages */
  size_t shard_rows_bytes, shard_alloc;
  char hosts[1024];
  da_gpumap_t gmap;      /* --device cuda: this rank's GPU; gmap_json: every rank's, on rank 0 */
  const char *cuda_tp;   /* --device cuda, none named: the transport decode_plan chose (NULL before) */
  char gmap_json[4096];
  /* one step: the new token's q, k, v (every rank makes the same), out, lse; a row of scratch */
  char *qb, *kb, *vb, *ob;
  float *lb, *tmp;
  double *t_step, *t_comp, *t_red; /* [T] per timed step */
  sample_t *samples;               /* R (step, sequence) rows kept for the check */
  int64_t R, nsamp;
  /* this rank's totals over the timed steps */
  double kv_bytes, comp_total, bytes_step;
  int64_t keys_total;
  int64_t ck[DK_N]; /* this rank's counts, summed over ranks by decode_verify */
  double max_abs, max_rel;
  /* figures over ranks */
  double step_med, step_p99, comp_med, red_med, comm_per_step, kv_gbps, kv_gbps_min, imbalance, gflops;
  double peak_over_shard, peak_rss, shard_max, alloc_peak, kv_bytes_all;
} decode_t;

/* The options table, pointing into d->o, with the defaults. */
static void decode_options(decode_t *d) {
  dec_opts_t *o = &d->o;
  o->batch = 1, o->steps = 8, o->warmup = 1, o->verify = 4, o->page = 256, o->root = -1, o->seed = 1;
  const da_opt_t opts[] = {
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &o->algo, .help = "how partials are combined", .choices = algo_names},
      {.name = "context", .type = DA_OPT_SIZE, .dest = &o->context,
       .help = "tokens in every sequence's cache before the first step (required)", .min = 1, .max = 1LL << 34},
      da_opt_heads(&o->heads),
      da_opt_kv_heads(&o->kv_heads),
      da_opt_dim(&o->dim),
      {.name = "batch", .type = DA_OPT_INT, .dest = &o->batch, .help = "sequences B", .min = 1, .max = 1 << 20},
      {.name = "lengths", .type = DA_OPT_STRING, .dest = &o->lengths, .metavar = "L1,L2,..",
       .help = "per-sequence context lengths (B values; overrides --context)", .sample = "64"},
      {.name = "steps", .type = DA_OPT_INT, .dest = &o->steps, .help = "timed decode steps T (append + decode)",
       .min = 1, .max = 1 << 20},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &o->warmup, .help = "untimed steps first (they grow the cache too)",
       .min = 0, .max = 1 << 20},
      {.name = "verify", .type = DA_OPT_INT, .dest = &o->verify,
       .help = "sampled (step, sequence) rows checked in float64 (0 = off)", .min = 0, .max = 1 << 20},
      {.name = "page", .type = DA_OPT_SIZE, .dest = &o->page, .help = "tokens per KV cache page", .min = 1,
       .max = 1LL << 30},
      {.name = "layout", .type = DA_OPT_ENUM, .dest = &o->layout, .help = "prefill layout of the cache",
       .choices = layout_names},
      {.name = "weights", .type = DA_OPT_STRING, .dest = &o->weights, .metavar = "W0,W1,..",
       .help = "capacity weight per rank (shards proportional; replaces --layout)", .sample = "1,1"},
      {.name = "topo", .type = DA_OPT_ENUM, .dest = &o->topo, .help = "tree reduction: flat, or within nodes then leaders",
       .choices = topo_names},
      {.name = "node-size", .type = DA_OPT_INT, .dest = &o->node_size,
       .help = "two-level: ranks per node group (0 = ranks sharing memory)", .min = 0, .max = 1 << 20},
      {.name = "root", .type = DA_OPT_INT, .dest = &o->root,
       .help = "only this rank gets the output (tree: MPI_Reduce; ring: the chain ends there); -1 = every rank",
       .min = -1, .max = 1 << 20},
      da_opt_dtype(&o->dtype),
      da_opt_seed(&o->seed),
      da_opt_device(&o->device),
      da_opt_ranks_per_gpu(&o->ranks_per_gpu),
      da_opt_threads(&o->threads),
      da_opt_json(&o->json),
      da_opt_timeout(&o->timeout),
      da_opt_transport(&o->transport),
      {.name = "mem-budget", .type = DA_OPT_SIZE, .dest = &o->mem_budget,
       .help = "bytes of KV cache a rank may hold; a larger shard is refused (0 = no limit; see --offload)", .min = 0,
       .max = 1LL << 50},
      {0},
  };
  _Static_assert(sizeof opts <= sizeof d->opts, "decode_t.opts holds every option and the terminator");
  da_cmd_options(&d->cmd, "decode", decode_summary, d->opts, opts, sizeof opts / sizeof *opts);
}

/* ---- parse and agree ---- */

/* The options against each other and the job: required ones, GQA, --lengths, --weights, --root,
 * the backend, the --json path. */
static int decode_check_options(decode_t *d) {
  const dec_opts_t *o = &d->o;
  da_cmdspec_t *cmd = &d->cmd;
  const char *missing = !da_args_find(d->opts, "context")->given && !o->lengths ? "--context"
                        : !da_args_find(d->opts, "heads")->given                ? "--heads"
                        : !da_args_find(d->opts, "dim")->given                  ? "--dim"
                                                                                : NULL;
  if (missing) return da_args_error(cmd, "%s is required", missing);
  if (o->heads % d->G)
    return da_args_error(cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o->heads,
                         (long long)d->G);
  if (o->lengths && da_parse_size_list(o->lengths, d->lens, o->batch))
    return da_args_error(cmd, "--lengths '%s': expected %lld sizes (one per sequence, --batch)", o->lengths,
                         (long long)o->batch);
  if (o->weights && parse_list_doubles(o->weights, d->weights, d->job.size))
    return da_args_error(cmd, "--weights '%s': expected %d positive numbers (one per rank)", o->weights, d->job.size);
  if (o->root >= d->job.size)
    return da_args_error(cmd, "--root %lld: the job has %d ranks", (long long)o->root, d->job.size);
  if (o->device == DA_DEVICE_CUDA && !da_kernels_get(DA_DEVICE_CUDA))
    return da_args_error(cmd, "--device cuda: %s", da_error_message());
  /* --device cuda: the GPU map (decode_plan) probes first: without a device every rank stops
   * there with exit 2 and one message naming CUDA. */
  if (o->ranks_per_gpu && o->device != DA_DEVICE_CUDA) return da_args_error(cmd, "--ranks-per-gpu needs --device cuda");
  if (da_paths_refuse_json("decode", o->json)) return DA_ARGS_USAGE;
  if (o->json && da_json_check_path(o->json)) return DA_ARGS_USAGE;
  return DA_ARGS_OK;
}

/* --mem-budget: the largest shard this run would put on a rank (its share of every sequence, the
 * steps included, plus a partly filled page each), refused when over the budget. */
static int decode_check_budget(decode_t *d) {
  const dec_opts_t *o = &d->o;
  const int P = d->job.size;
  if (o->mem_budget <= 0) return DA_ARGS_OK;
  double rows = 0;
  for (int64_t b = 0; b < o->batch; b++) rows += (double)(d->lens[b] + o->steps + o->warmup) / P + (double)o->page;
  const double need = rows * 2.0 * (double)(d->G * o->dim) * (double)da_dtype_size((da_dtype_t)o->dtype);
  if (need <= (double)o->mem_budget) return DA_ARGS_OK;
  return da_args_error(&d->cmd, "the KV cache needs %.1f MiB per rank (%d rank%s), over --mem-budget %.1f MiB: offload "
                       "it to memory ranks (--offload, --role compute / --role memory)", need / 1048576.0, P,
                       P == 1 ? "" : "s", (double)o->mem_budget / 1048576.0);
}

/* Parse and check argv: usage errors print their message and give DA_ARGS_USAGE. */
static int decode_parse(void *c, int argc, char **argv) {
  decode_t *d = c;
  dec_opts_t *o = &d->o;
  free(d->lens), free(d->weights); /* a second parse (da_mpi_parse_agree) starts clean */
  d->lens = NULL, d->weights = NULL;
  int prc = da_args_parse(&d->cmd, argc, argv);
  if (prc != DA_ARGS_OK) return prc;
  d->G = o->kv_heads ? o->kv_heads : o->heads;
  d->lens = calloc((size_t)o->batch, sizeof *d->lens);
  d->weights = o->weights ? calloc((size_t)d->job.size, sizeof *d->weights) : NULL;
  if (!d->lens || (o->weights && !d->weights)) return da_args_error(&d->cmd, "out of memory");
  if ((prc = decode_check_options(d)) != DA_ARGS_OK) return prc;
  char err[256];
  if (da_verify_poison_init(err, sizeof err)) return da_args_error(&d->cmd, "%s", err);
  for (int64_t b = 0; b < o->batch && !o->lengths; b++) d->lens[b] = o->context;
  if (o->lengths) o->context = d->lens[0];
  return decode_check_budget(d);
}

/* ---- plan ---- */

/* The transport of the combine: --transport, else DISTATTN_TRANSPORT (mpi for a CUDA run is the
 * staged cuda-mpi), else mpi for --device cpu and, for --device cuda, cuda-ipc (ranks of one node,
 * sharing GPUs or not; nccl when asked for), or on several nodes what decode_plan chose (nccl, or
 * cuda-mpi where NCCL is not built or GPUs are shared), or host-ipc under the test hook
 * DISTATTN_TEST_GPUS (the host seam). */
static const char *decode_transport(const decode_t *d) {
  const char *env = getenv("DISTATTN_TRANSPORT");
  const int cuda = da_device_effective(d->o.device) == DA_DEVICE_CUDA;
  if (d->o.transport || (env && *env) || d->o.device != DA_DEVICE_CUDA)
    return da_transport_resolve(da_transport_choice(d->o.transport), cuda);
  if (!cuda) return "host-ipc";
  return d->cuda_tp ? d->cuda_tp : "cuda-ipc";
}

/* The context and communicator, the paged KV cache and the decode plan. */
static int decode_plan(void *c) {
  decode_t *d = c;
  const dec_opts_t *o = &d->o;
  if (o->device == DA_DEVICE_CUDA) { /* which GPU: before anything makes a CUDA context */
    int rc = da_gpumap_world(da_devapi_cuda_or_null(), (int)o->ranks_per_gpu, decode_transport(d), o->timeout,
                             "decode", &d->gmap);
    if (rc) return rc;
    /* Several nodes: cuda-ipc stops at the node; nccl refuses shared GPUs; cuda-mpi serves both. */
    const int shared = da_mpi_max_int(d->gmap.shared);
    if (!da_mpi_one_node()) d->cuda_tp = shared ? "cuda-mpi" : da_transport_cuda_default(0);
  }
  d->threads = o->threads ? (int)o->threads : da_mpi_default_threads();
  int rc = da_mpi_job_open(&d->job, "decode", da_device_effective(o->device), d->threads);
  if (rc) return rc;
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = o->batch, prob.seq = o->context, prob.heads = o->heads, prob.kv_heads = d->G, prob.dim = o->dim;
  prob.dtype = (da_dtype_t)o->dtype, prob.mask = DA_MASK_CAUSAL;
  da_kvcache_config_t kcfg = DA_KVCACHE_CONFIG_INITIALIZER;
  kcfg.page = o->page, kcfg.layout = (da_algo_t)o->layout, kcfg.weights = d->weights, kcfg.timeout = o->timeout;
  da_fault_point("plan");
  kcfg.transport = decode_transport(d); /* a device transport puts the pages in its device memory */
  da_status_t st = da_kvcache_create(d->job.comm, &prob, &kcfg, &d->cache);
  if (st != DA_SUCCESS) return da_report_failure("decode", d->job.rank, "kv cache", st, d->job.ctx);
  da_decode_config_t dcfg = DA_DECODE_CONFIG_INITIALIZER;
  dcfg.algo = (da_decode_algo_t)o->algo, dcfg.topo = (da_decode_topo_t)o->topo, dcfg.root = (int)o->root;
  dcfg.node_size = (int)o->node_size, dcfg.timeout = o->timeout;
  dcfg.transport = decode_transport(d); /* a device transport runs the device tree (comm/tree.c) */
  st = da_decode_plan_create(d->job.comm, &prob, &dcfg, &d->plan);
  return st == DA_SUCCESS ? 0 : da_report_failure("decode", d->job.rank, "decode plan", st, d->job.ctx);
}

/* ---- inputs ---- */

/* Prefill: pages allocated along the layout, then filled in place from the RNG. */
static int decode_prefill(void *c) {
  decode_t *d = c;
  const dec_opts_t *o = &d->o;
  d->vp = (da_vprob_t){.B = o->batch, .S = o->context, .seed = (uint64_t)o->seed};
  d->vp.kp.H = (int)o->heads, d->vp.kp.G = (int)d->G, d->vp.kp.D = (int)o->dim;
  d->vp.kp.scale = (float)(1.0 / sqrt((double)o->dim)), d->vp.kp.dtype = (da_dtype_t)o->dtype;
  d->vp.kp.mask.flags = DA_MASK_NONE; /* the newest token sees the whole cache */
  d->vp.kp.nthreads = d->threads;
  double t0 = MPI_Wtime();
  da_status_t st = DA_SUCCESS;
  for (int64_t b = 0; b < o->batch && st == DA_SUCCESS; b++)
    if ((st = da_kvcache_prefill(d->cache, b, d->lens[b], NULL, NULL)) == DA_SUCCESS)
      fill_pages(d->cache, &d->vp, b, cuda_pages(decode_transport(d)));
  /* local: a rank whose pages cannot be allocated (--page 1G) tells every rank before any waits */
  const int rc = da_mpi_agree_step("decode", d->job.rank, "prefill", st, d->job.ctx);
  if (rc) return rc;
  d->t_fill = MPI_Wtime() - t0;
  return 0;
}

/* The buffers of one step and of the timings, and the samples: R (step, sequence) pairs spread
 * evenly over the T x B timed rows. 0, or 1 on every rank when one ran out of memory. */
static int decode_buffers(void *c) {
  decode_t *d = c;
  const int64_t B = d->o.batch, H = d->o.heads, G = d->G, D = d->o.dim, T = d->o.steps;
  const size_t es = da_dtype_size((da_dtype_t)d->o.dtype);
  d->qb = malloc((size_t)(B * H * D) * es), d->ob = malloc((size_t)(B * H * D) * es);
  d->kb = malloc((size_t)(B * G * D) * es), d->vb = malloc((size_t)(B * G * D) * es);
  d->lb = malloc((size_t)(B * H) * sizeof(float)), d->tmp = malloc((size_t)D * sizeof(float));
  d->t_step = calloc((size_t)T, sizeof *d->t_step), d->t_comp = calloc((size_t)T, sizeof *d->t_comp);
  d->t_red = calloc((size_t)T, sizeof *d->t_red);
  const int64_t R = d->R = d->o.verify < T * B ? d->o.verify : T * B;
  d->samples = calloc((size_t)(R ? R : 1), sizeof *d->samples);
  int oom = !d->qb || !d->ob || !d->kb || !d->vb || !d->lb || !d->tmp || !d->t_step || !d->t_comp || !d->t_red ||
            !d->samples;
  for (int64_t i = 0; i < R && !oom; i++) {
    sample_t *sm = &d->samples[i];
    const int64_t idx = R == 1 ? T * B - 1 : i * (T * B - 1) / (R - 1);
    sm->step = idx / B, sm->b = idx % B;
    sm->out = malloc((size_t)(H * D) * es), sm->lse = malloc((size_t)H * sizeof(float));
    oom |= !sm->out || !sm->lse;
    d->nsamp = i + 1;
  }
  if (!da_mpi_max_int(oom)) return 0;
  if (oom) fprintf(stderr, "distattn decode: rank %d: out of memory for the step buffers\n", d->job.rank);
  return 1;
}

/* ---- the header: what runs where ---- */

/* Rank 0: the cache (shards: min and max over ranks; fill time: max: collective), how partials
 * are combined, how the figures are taken, the check. */
static void decode_print_plan(decode_t *d) {
  const dec_opts_t *o = &d->o;
  unsigned long long sh[2] = {(unsigned long long)d->shard_rows_bytes, ~(unsigned long long)d->shard_rows_bytes};
  MPI_Allreduce(MPI_IN_PLACE, sh, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  double fill = d->t_fill;
  MPI_Allreduce(MPI_IN_PLACE, &fill, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (d->job.rank != 0) return;
  da_report_line(stdout, "cache: %s prefill, pages of %lld tokens, shards %.1f..%.1f MiB per rank (k + v), "
                         "filled from the RNG in %.2f s", o->weights ? "weighted" : layout_names[o->layout],
                 (long long)o->page, (double)~sh[1] / 1048576.0, (double)sh[0] / 1048576.0, fill);
  const da_transport_t *tt = da_transport_find(decode_transport(d));
  da_error_clear();
  if (o->algo == 0 && tt && tt->devapi) {
    da_report_line(stdout, "combine: device tree on %s (%s memory): partials on the device, two allreduces, max of lse "
                   "then sum of the rescaled (o, l), exact in fp32 (output %s)", tt->name, tt->devapi->name,
                   o->root < 0 ? "on every rank" : "written on the root");
  } else if (o->algo == 0) {
    char groups[64] = "";
    if (o->topo) snprintf(groups, sizeof groups, " (%d node group%s)", d->ds.nodes, d->ds.nodes == 1 ? "" : "s");
    da_report_line(stdout, "combine: tree, %s%s, %s; one fused reduction with the (o, lse) merge as MPI_Op",
                   topo_names[o->topo], groups,
                   o->root < 0 ? "MPI_Iallreduce (output on every rank)" : "MPI_Ireduce (output on the root)");
  } else {
    da_report_line(stdout, "combine: ring, the query and the running partials travel %d dependent hops, each "
                           "rank decoding its shard on arrival (output on %s)", d->job.size - 1,
                   o->root < 0 ? "every rank: broadcast from the last" : "the root");
  }
  da_report_line(stdout, "step: append the token's k, v then decode it; latency = max over ranks, median and "
                         "p99 over %lld steps (after %lld warmup)", (long long)o->steps, (long long)o->warmup);
  da_report_line(stdout, "comm: bytes sent per step summed over ranks (ring: exact; tree: binomial-tree model); "
                         "kv GB/s: KV bytes read / kernel time, mean over ranks");
  if (d->R)
    da_report_line(stdout, "verify: %lld rows in float64, every key regenerated from the RNG and streamed (no "
                           "gather); tolerance %g", (long long)d->R, o->dtype == DA_FLOAT32 ? 1e-4 : 2e-2);
}

/* The header: command, machine, MPI, every rank's place, the cache and the combine. */
static int decode_print_setup(void *c) {
  decode_t *d = c;
  d->shard_alloc = da_kvcache_bytes(d->cache, &d->shard_rows_bytes);
  if (d->job.rank == 0) {
    char tp[160];
    snprintf(tp, sizeof tp, "  transport: %s%s", decode_transport(d),
             strstr(decode_transport(d), "-mpi") ? " (staged through pinned host buffers)" : "");
    da_report_mpi_header(&d->cmd, d->threads, d->job.size,
                         (int)da_device_effective(d->o.device) == d->o.device
                             ? da_device_names[d->o.device]
                             : "cpu (DISTATTN_TEST_GPUS: pretend GPUs, host seam)", tp);
  }
  fflush(stdout);
  da_rank_map(d->threads, d->hosts, sizeof d->hosts);
  if (d->o.device == DA_DEVICE_CUDA)
    da_gpumap_print(&d->gmap, da_devapi_cuda_or_null(), d->gmap_json, sizeof d->gmap_json);
  da_decode_plan_stats(d->plan, &d->ds);
  decode_print_plan(d);
  return 0;
}

/* ---- execute: the autoregressive loop ---- */

/* One row of the new token into buf at element off: tensor (DA_RNG_Q/K/V) of sequence b at pos,
 * head h, regenerated from the RNG (with the test's poison) exactly as the verifier will. */
static void decode_token_row(decode_t *d, uint64_t seed, uint32_t tensor, int64_t pos, int h, char *buf,
                             int64_t off) {
  const int D = (int)d->o.dim, dt = d->o.dtype;
  da_rng_row(seed, tensor, pos, h, D, d->tmp);
  da_verify_poison(tensor, pos, h, d->tmp);
  for (int e = 0; e < D; e++) da_store_f32(buf, dt, off + e, d->tmp[e]);
}

/* The new token of every sequence: k, v, q at its position, regenerated identically by every
 * rank (in a model, the last layer's output is replicated). */
static void decode_token(decode_t *d) {
  const int64_t H = d->o.heads, G = d->G, D = d->o.dim;
  for (int64_t b = 0; b < d->o.batch; b++) {
    const int64_t pos = da_kvcache_length(d->cache, b);
    const uint64_t seed = da_verify_seed((uint64_t)d->o.seed, b);
    for (int g = 0; g < G; g++) {
      decode_token_row(d, seed, DA_RNG_K, pos, g, d->kb, (b * G + g) * D);
      decode_token_row(d, seed, DA_RNG_V, pos, g, d->vb, (b * G + g) * D);
    }
    for (int h = 0; h < H; h++) decode_token_row(d, seed, DA_RNG_Q, pos, h, d->qb, (b * H + h) * D);
  }
}

/* One step: append the new tokens' k, v, then decode them; *t gets the slowest rank's seconds.
 * 0, or the exit code once every rank learned of a failure (a rank-local append failure has no
 * other way out). */
static int decode_step_once(decode_t *d, const int64_t *ntok, double *t) {
  const int64_t B = d->o.batch, H = d->o.heads, G = d->G, D = d->o.dim;
  const da_dtype_t dt = (da_dtype_t)d->o.dtype;
  da_tensor_t tq, tk, tv, to, tl;
  const int64_t shq[3] = {B, H, D}, shk[3] = {B, G, D}, shl[2] = {B, H};
  da_tensor_make(&tq, d->qb, dt, 3, shq), da_tensor_make(&to, d->ob, dt, 3, shq);
  da_tensor_make(&tk, d->kb, dt, 3, shk), da_tensor_make(&tv, d->vb, dt, 3, shk);
  da_tensor_make(&tl, d->lb, DA_FLOAT32, 2, shl);
  /* The append is local and may allocate a page (--page 1G): its outcome is agreed before the
   * collective step (the allreduce also stands for the barrier that lines the ranks up), so a rank
   * that cannot grow its cache says so everywhere instead of leaving the others in the step. Its
   * time still counts in the step's. */
  double ta = MPI_Wtime();
  da_status_t st = da_kvcache_append(d->cache, ntok, &tk, &tv);
  ta = MPI_Wtime() - ta;
  if (da_mpi_max_int(st != DA_SUCCESS))
    return da_mpi_agree_step("decode", d->job.rank, "kv cache append", st, d->job.ctx);
  da_fault_point("forward");
  double t0 = MPI_Wtime();
  st = da_decode_step(d->plan, d->cache, &tq, &to, &tl, NULL);
  double red[2] = {MPI_Wtime() - t0 + ta, st != DA_SUCCESS};
  MPI_Allreduce(MPI_IN_PLACE, red, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  *t = red[0];
  if (red[1] > 0)
    return da_report_failure("decode", d->job.rank, "decode step", st != DA_SUCCESS ? st : DA_ERR_REMOTE, d->job.ctx);
  return 0;
}

/* Timed step s took t: its times, this rank's KV bytes, bytes sent and keys attended, the
 * non-finite values of q and out, and the sampled rows of this step (*si: the next sample). */
static void decode_record(decode_t *d, int64_t s, double t, int64_t *si) {
  const int64_t B = d->o.batch, H = d->o.heads, D = d->o.dim;
  const da_dtype_t dt = (da_dtype_t)d->o.dtype;
  const size_t es = da_dtype_size(dt);
  /* q is the same on every rank, out on every rank that holds it: count once */
  if (d->job.rank == 0) d->ck[DK_NF + 0] += da_count_nonfinite(d->qb, dt, B * H * D);
  const int out_rank = d->o.root >= 0 ? (int)d->o.root : 0;
  if (d->job.rank == out_rank) d->ck[DK_NF + 3] += da_count_nonfinite(d->ob, dt, B * H * D);
  da_decode_plan_stats(d->plan, &d->ds);
  d->t_step[s] = t, d->t_comp[s] = d->ds.compute_s, d->t_red[s] = d->ds.reduce_s;
  d->kv_bytes += (double)d->ds.kv_bytes;
  d->comp_total += d->ds.compute_s;
  d->bytes_step += (double)d->ds.bytes_sent;
  for (int64_t b = 0; b < B; b++) d->keys_total += da_kvcache_length(d->cache, b);
  for (; *si < d->nsamp && d->samples[*si].step == s; ++*si) {
    sample_t *sm = &d->samples[*si];
    sm->qpos = da_kvcache_length(d->cache, sm->b) - 1;
    memcpy(sm->out, d->ob + (size_t)(sm->b * H * D) * es, (size_t)(H * D) * es);
    memcpy(sm->lse, d->lb + sm->b * H, (size_t)H * sizeof(float));
  }
}

/* Warmup steps (they grow the cache too), then the timed ones. */
static int decode_execute(void *c) {
  decode_t *d = c;
  const int64_t B = d->o.batch, W = d->o.warmup, NS = d->o.steps + W;
  int64_t *ntok = malloc((size_t)B * sizeof *ntok); /* one new token per sequence and step */
  if (!ntok) return 1;
  for (int64_t b = 0; b < B; b++) ntok[b] = 1;
  int64_t si = 0; /* next sample */
  int rc = 0;
  for (int64_t it = 0; it < NS && !rc; it++) {
    double t = 0;
    decode_token(d);
    rc = decode_step_once(d, ntok, &t);
    if (!rc && it >= W) decode_record(d, it - W, t, &si);
  }
  free(ntok);
  return rc;
}

/* ---- verify ---- */

/* This rank's samples (sample i is checked by rank i mod P, or by the root, the only rank holding
 * outputs with --root), each from scratch in float64 over its whole context regenerated from the
 * RNG: no gather. Counts into d->ck, largest errors into vmax (abs, rel). 0, or 1 out of memory. */
static int decode_check_samples(decode_t *d, double vmax[2]) {
  const int H = (int)d->o.heads, D = (int)d->o.dim, P = d->job.size;
  const da_dtype_t dt = (da_dtype_t)d->o.dtype;
  const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2;
  double *ro = malloc((size_t)(H * D) * sizeof(double)), *rl = malloc((size_t)H * sizeof(double));
  int vfail = !ro || !rl;
  for (int64_t i = 0; i < d->nsamp && !vfail; i++) {
    if ((d->o.root >= 0 ? (int)d->o.root : (int)(i % P)) != d->job.rank) continue;
    const sample_t *sm = &d->samples[i];
    da_vprob_t v1 = d->vp;
    v1.S = sm->qpos + 1;
    if ((vfail = da_verify_fwd_row(&v1, sm->b, sm->qpos, ro, rl) != 0)) break;
    d->ck[DK_ROWS]++;
    for (int h = 0; h < H; h++) {
      double ae = 0, rel = da_verify_rel(sm->out, dt, (int64_t)h * D, ro + h * D, D, &ae);
      if (isnan(rel)) { /* a poisoned input reaches the reference: counted apart, not measured */
        d->ck[DK_NF_ROWS]++;
        continue;
      }
      double le = fabs((double)sm->lse[h] - rl[h]), lrel = le / fmax(1.0, fabs(rl[h]));
      if (!(rel <= tol) || !(lrel <= tol)) d->ck[DK_WRONG]++, d->ck[DK_NF_WRONG] += ae == INFINITY;
      if (!(rel <= vmax[1])) vmax[1] = rel;
      if (!(ae <= vmax[0])) vmax[0] = ae;
      if (!(lrel <= vmax[1])) vmax[1] = lrel;
    }
  }
  free(ro), free(rl);
  return vfail;
}

/* NaN / Inf in this rank's cache: k and v of every token, appended ones included. */
static void decode_count_cache(decode_t *d) {
  const int64_t GD = d->G * d->o.dim;
  const da_dtype_t dt = (da_dtype_t)d->o.dtype;
  const size_t es = da_dtype_size(dt);
  const da_devapi_t *dev = cuda_pages(decode_transport(d)); /* CUDA pages: read through a host copy */
  for (int64_t b = 0; b < d->o.batch; b++)
    for (int64_t i = 0; i < da_kvcache_num_pages(d->cache, b); i++) {
      da_kvcache_page_t pg;
      if (da_kvcache_get_page(d->cache, b, i, &pg) != DA_SUCCESS) continue;
      const size_t bytes = (size_t)(pg.count * GD) * es;
      char *k = dev ? malloc(bytes ? bytes : 1) : pg.k, *v = dev ? malloc(bytes ? bytes : 1) : pg.v;
      if (dev && (!k || !v || dev->copy_to_host(k, pg.k, bytes, NULL) || dev->copy_to_host(v, pg.v, bytes, NULL))) {
        if (k != pg.k) free(k);
        if (v != pg.v) free(v);
        continue;
      }
      const int64_t ldk = dev ? GD : pg.ldk, ldv = dev ? GD : pg.ldv;
      for (int64_t j = 0; j < pg.count; j++) {
        d->ck[DK_NF + 1] += da_count_nonfinite(k + (size_t)(j * ldk) * es, dt, GD);
        d->ck[DK_NF + 2] += da_count_nonfinite(v + (size_t)(j * ldv) * es, dt, GD);
      }
      if (dev) free(k), free(v);
    }
}

/* The check of the sampled rows and the non-finite counts, summed over ranks. */
static int decode_verify(void *c) {
  decode_t *d = c;
  double vmax[2] = {0, 0}; /* abs, rel */
  da_fault_point("verify");
  int vfail = decode_check_samples(d, vmax);
  if (da_mpi_max_int(vfail)) {
    if (vfail) fprintf(stderr, "distattn decode: rank %d: verification ran out of memory\n", d->job.rank);
    return 1;
  }
  decode_count_cache(d);
  MPI_Allreduce(MPI_IN_PLACE, vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, d->ck, DK_N, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  d->max_abs = vmax[0], d->max_rel = vmax[1];
  return 0;
}

/* ---- report ---- */

/* The figures over ranks: step latency (median and p99 of the slowest rank's), compute and combine
 * medians (max over ranks per step), bytes per step, KV read rate per rank, memory over the shard. */
static void decode_figures(decode_t *d) {
  const int64_t T = d->o.steps;
  const int P = d->job.size;
  da_kvcache_bytes(d->cache, &d->shard_rows_bytes);
  const double rss = (double)da_peak_rss_bytes(), shard = (double)d->shard_rows_bytes;
  /* per rank: KV read rate, peak memory over its shard; then over ranks */
  double mine[7] = {d->comp_total > 0 ? d->kv_bytes / d->comp_total : 0, shard > 0 ? rss / shard : 0, rss, shard,
                    (double)da_mem_peak(), d->comp_total, d->kv_bytes};
  double mx[7], sum[7], mn = mine[0], bsum = d->bytes_step;
  MPI_Allreduce(mine, mx, 7, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(mine, sum, 7, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &mn, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &bsum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, d->t_comp, (int)T, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, d->t_red, (int)T, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  d->step_p99 = da_p99(d->t_step, T), d->step_med = da_median(d->t_step, T);
  d->comp_med = da_median(d->t_comp, T), d->red_med = da_median(d->t_red, T);
  d->comm_per_step = bsum / (double)T;
  d->kv_gbps = sum[0] / P * 1e-9, d->kv_gbps_min = mn * 1e-9;
  d->imbalance = sum[5] > 0 ? mx[5] / (sum[5] / P) : 1.0;
  const double keys_per_step = (double)d->keys_total / (double)T;
  d->gflops = 4.0 * d->o.heads * d->o.dim * keys_per_step / d->step_med * 1e-9;
  d->peak_over_shard = mx[1], d->peak_rss = mx[2], d->shard_max = mx[3], d->alloc_peak = mx[4];
  d->kv_bytes_all = sum[6];
}

/* Rank 0: the table's one row and the memory line. */
static void decode_print_row(const decode_t *d) {
  static const char *const names[] = {"algo", "ranks", "context", "batch", "heads", "kv", "dim", "dtype", "steps",
                                      "med_ms", "p99_ms", "comp_ms", "comb_ms", "comm_KB", "kvGB/s", "shard_MB",
                                      "peak_MB", "mem_x", "rows", "max_rel", "wrong"};
  static const int widths[] = {5, 5, 9, 5, 5, 3, 4, 5, 5, 9, 9, 9, 8, 8, 7, 9, 8, 5, 5, 9, 6};
  const dec_opts_t *o = &d->o;
  da_table_t tb;
  da_table_init(&tb, stdout, 21, names, widths);
  da_table_print_header(&tb);
  da_table_str(&tb, o->algo == 0 && o->topo == 1 ? "tree2" : algo_names[o->algo]);
  da_table_int(&tb, d->job.size), da_table_int(&tb, o->context), da_table_int(&tb, o->batch);
  da_table_int(&tb, o->heads), da_table_int(&tb, d->G), da_table_int(&tb, o->dim);
  da_table_str(&tb, da_dtype_names[o->dtype]), da_table_int(&tb, o->steps);
  da_table_dbl(&tb, d->step_med * 1e3, 3, 0), da_table_dbl(&tb, d->step_p99 * 1e3, 3, 0);
  da_table_dbl(&tb, d->comp_med * 1e3, 3, 0), da_table_dbl(&tb, d->red_med * 1e3, 3, 0);
  da_table_dbl(&tb, d->comm_per_step / 1024.0, 2, 0), da_table_dbl(&tb, d->kv_gbps, 2, 0);
  da_table_dbl(&tb, d->shard_max / 1048576.0, 1, 0), da_table_dbl(&tb, d->peak_rss / 1048576.0, 1, 0);
  da_table_dbl(&tb, d->peak_over_shard, 2, 0), da_table_int(&tb, d->ck[DK_ROWS]);
  da_table_dbl(&tb, d->R ? d->max_rel : NAN, 2, 1), da_table_int(&tb, d->ck[DK_WRONG]);
  da_table_end_row(&tb);
  da_report_line(stdout, "memory: peak RSS / shard, max over ranks = %.3f (limit 1.3: %s); distattn allocations "
                         "peak %.1f MiB, pages allocated %.1f MiB on rank 0", d->peak_over_shard,
                 d->peak_over_shard <= 1.3 ? "ok" : "EXCEEDED", d->alloc_peak / 1048576.0,
                 (double)d->shard_alloc / 1048576.0);
}

/* Rank 0: the JSON Lines record appended to --json. 0, or -1 when it could not be written. */
static int decode_json(const decode_t *d) {
  const dec_opts_t *o = &d->o;
  const int64_t *nf = d->ck + DK_NF;
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "decode");
  da_json_str(&j, "algo", algo_names[o->algo]);
  da_json_str(&j, "topo", o->algo == 0 ? topo_names[o->topo] : NULL);
  da_json_int(&j, "root", o->root);
  da_json_int(&j, "ranks", d->job.size);
  da_json_int(&j, "context", o->context);
  da_json_str(&j, "lengths", o->lengths);
  da_json_problem(&j, o->batch, o->heads, d->G, o->dim, "causal", da_dtype_names[o->dtype],
                  da_device_names[o->device], d->threads);
  da_json_int(&j, "page", o->page);
  da_json_str(&j, "layout", o->weights ? "weighted" : layout_names[o->layout]);
  da_json_int(&j, "steps", o->steps);
  da_json_int(&j, "warmup", o->warmup);
  da_json_dbl(&j, "step_median_s", d->step_med);
  da_json_dbl(&j, "step_p99_s", d->step_p99);
  da_json_dbl(&j, "compute_median_s", d->comp_med);
  da_json_dbl(&j, "combine_median_s", d->red_med);
  da_json_dbl(&j, "fwd_s", d->step_med);
  da_json_null(&j, "bwd_s");
  da_json_dbl(&j, "gflops", d->gflops);
  da_json_check(&j, d->ck[DK_ROWS], d->max_abs, d->max_rel, d->ck[DK_WRONG], d->R > 0);
  da_json_dbl(&j, "comm_bytes", d->comm_per_step);
  da_json_dbl(&j, "comm_bytes_per_step", d->comm_per_step);
  da_json_dbl(&j, "comm_exposed_s", d->red_med);
  da_json_null(&j, "overlap");
  da_json_dbl(&j, "imbalance", d->imbalance);
  da_json_dbl(&j, "kv_bytes_per_step", d->kv_bytes_all / (double)o->steps); /* summed over ranks */
  da_json_dbl(&j, "kv_read_gbps_per_rank", d->kv_gbps);
  da_json_dbl(&j, "kv_read_gbps_min_rank", d->kv_gbps_min);
  da_json_dbl(&j, "shard_bytes_max", d->shard_max);
  da_json_dbl(&j, "peak_over_shard_max", d->peak_over_shard);
  da_json_dbl(&j, "peak_alloc_bytes_max", d->alloc_peak);
  da_json_int(&j, "peak_rss_bytes", (int64_t)d->peak_rss); /* max over ranks */
  da_json_dbl(&j, "fill_s", d->t_fill);
  da_json_nonfinite(&j, d->ck[DK_NF_ROWS], nf[0] + nf[1] + nf[2], nf[3], d->ck[DK_NF_WRONG]);
  if (o->device == DA_DEVICE_CUDA && d->gmap_json[0]) da_json_raw(&j, "gpu_map", d->gmap_json);
  da_json_job(&j, d->hosts, 0);
  return da_json_finish(&j, o->json);
}

/* The figures, the table, the memory and non-finite notes, the record, then the verdict. */
static int decode_report(void *c) {
  decode_t *d = c;
  const int64_t *nf = d->ck + DK_NF;
  int rc = 0;
  decode_figures(d);
  if (d->job.rank == 0) {
    decode_print_row(d);
    da_report_nonfinite(stdout, 4, nf_names, nf, d->ck[DK_NF_ROWS], d->ck[DK_NF_WRONG], nf[0] + nf[1] + nf[2] > 0);
    if (d->o.json && decode_json(d)) rc = 1;
  }
  return da_mpi_verdict(d->job.rank, d->ck[DK_WRONG], rc);
}

static void decode_release(void *c) {
  decode_t *d = c;
  for (int64_t i = 0; d->samples && i < d->nsamp; i++) free(d->samples[i].out), free(d->samples[i].lse);
  free(d->samples);
  free(d->qb), free(d->kb), free(d->vb), free(d->ob), free(d->lb), free(d->tmp);
  free(d->t_step), free(d->t_comp), free(d->t_red);
  da_decode_plan_free(d->plan);
  da_kvcache_free(d->cache);
  free(d->lens), free(d->weights);
}

static const da_cmdspec_t *decode_spec(void *c) { return &((decode_t *)c)->cmd; }

/* The phases in order (common.h: parse and agree comes first, release last). */
static const da_phase_fn decode_phases[] = {
    decode_plan,        /* context, communicator, KV cache, decode plan */
    decode_prefill,     /* inputs: every rank's pages filled from the RNG */
    decode_buffers,     /* one step's buffers and the sampled rows */
    decode_print_setup, /* the header */
    decode_execute,     /* the autoregressive loop */
    decode_verify,      /* float64 check of the samples, non-finite counts */
    decode_report,      /* figures, table, JSON record, verdict */
    NULL};

/* `--offload` or `--role` on the command line: attention offloaded to memory ranks (cmd_offload.c). */
int da_cmd_offload(int argc, char **argv) __attribute__((weak));

int da_cmd_decode(int argc, char **argv) {
  for (int i = 1; i < argc && da_cmd_offload; i++)
    if (!strcmp(argv[i], "--offload") || !strncmp(argv[i], "--role", 6)) return da_cmd_offload(argc, argv);
  static const da_mpi_cmd_t spec = {
      .name = "decode", .parse = decode_parse, .phases = decode_phases, .release = decode_release, .spec = decode_spec, .size = sizeof(decode_t)};
  decode_t d;
  memset(&d, 0, sizeof d);
  d.ds = (da_decode_stats_t)DA_DECODE_STATS_INITIALIZER; /* versioned: size and version set */
  decode_options(&d);
  return da_mpi_cmd_main(&spec, &d.job, &d, argc, argv);
}
