/* cmd_decode.c: `distattn decode`, autoregressive decode against a distributed paged KV cache over
 * MPI (tree | ring). Every rank fills only its own pages from the counter RNG (no rank ever holds
 * the whole context); each step appends the new token's k, v and decodes it; sampled output rows
 * are verified in float64 by streaming over the whole context regenerated from the RNG, with no
 * gather. Reports per-step latency (median, p99), bytes per step, KV read rate per rank and peak
 * memory per rank against the rank's shard. Not a library layer: it may exit. */
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
#include "common.h"
#include "report.h"
#include "rng.h"
#include "verify.h"

static const char *const algo_names[] = {"tree", "ring", NULL};
static const char *const topo_names[] = {"flat", "two-level", NULL};
static const char *const layout_names[] = {"contiguous", "striped", "zigzag", NULL};
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};
static const char *const device_names[] = {"cpu", "cuda", NULL};

typedef struct dec_opts {
  int algo, topo, layout, dtype, device;
  int64_t context, heads, kv_heads, dim, batch, steps, warmup, verify, page, node_size, root, seed, threads;
  double timeout;
  const char *lengths, *weights, *json;
  int64_t mem_budget; /* bytes of KV cache a rank may hold (0 = no limit) */
} dec_opts_t;

static int g_rank, g_size;

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
static void fill_pages(da_kvcache_t *cache, const da_vprob_t *vp, int64_t b) {
  const int G = vp->kp.G, D = vp->kp.D, dt = (int)vp->kp.dtype;
  const uint64_t seed = da_verify_seed(vp->seed, b);
  const int64_t np = da_kvcache_num_pages(cache, b);
#pragma omp parallel num_threads(vp->kp.nthreads > 0 ? vp->kp.nthreads : 1)
  {
    float *tmp = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < np; i++) {
      da_kvcache_page_t pg;
      if (!tmp || da_kvcache_get_page(cache, b, i, &pg) != DA_SUCCESS) continue;
      for (int64_t j = 0; j < pg.count; j++) {
        const int64_t pos = pg.start + j * pg.stride;
        for (int g = 0; g < G; g++) {
          da_rng_row(seed, DA_RNG_K, pos, g, D, tmp);
          da_verify_poison(DA_RNG_K, pos, g, tmp);
          for (int d = 0; d < D; d++) da_store_f32(pg.k, dt, j * pg.ldk + (int64_t)g * D + d, tmp[d]);
          da_rng_row(seed, DA_RNG_V, pos, g, D, tmp);
          da_verify_poison(DA_RNG_V, pos, g, tmp);
          for (int d = 0; d < D; d++) da_store_f32(pg.v, dt, j * pg.ldv + (int64_t)g * D + d, tmp[d]);
        }
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

/* `--offload` or `--role` on the command line: attention offloaded to memory ranks (cmd_offload.c). */
int da_cmd_offload(int argc, char **argv) __attribute__((weak));

int da_cmd_decode(int argc, char **argv) {
  for (int i = 1; i < argc && da_cmd_offload; i++)
    if (!strcmp(argv[i], "--offload") || !strncmp(argv[i], "--role", 6)) return da_cmd_offload(argc, argv);
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) MPI_Init(NULL, NULL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);

  dec_opts_t o;
  memset(&o, 0, sizeof o);
  o.batch = 1, o.steps = 8, o.warmup = 1, o.verify = 4, o.page = 256, o.root = -1, o.seed = 1;
  da_opt_t opts[] = {
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &o.algo, .help = "how partials are combined", .choices = algo_names},
      {.name = "context", .type = DA_OPT_SIZE, .dest = &o.context,
       .help = "tokens in every sequence's cache before the first step (required)", .min = 1, .max = 1LL << 34},
      {.name = "heads", .type = DA_OPT_INT, .dest = &o.heads, .help = "query heads H (required)", .min = 1, .max = 65536},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &o.kv_heads, .help = "KV heads G (H % G == 0; 0 = H)", .min = 0,
       .max = 65536},
      {.name = "dim", .type = DA_OPT_INT, .dest = &o.dim, .help = "head dim D (required)", .min = 1, .max = 4096},
      {.name = "batch", .type = DA_OPT_INT, .dest = &o.batch, .help = "sequences B", .min = 1, .max = 1 << 20},
      {.name = "lengths", .type = DA_OPT_STRING, .dest = &o.lengths, .metavar = "L1,L2,..",
       .help = "per-sequence context lengths (B values; overrides --context)"},
      {.name = "steps", .type = DA_OPT_INT, .dest = &o.steps, .help = "timed decode steps T (append + decode)",
       .min = 1, .max = 1 << 20},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &o.warmup, .help = "untimed steps first (they grow the cache too)",
       .min = 0, .max = 1 << 20},
      {.name = "verify", .type = DA_OPT_INT, .dest = &o.verify,
       .help = "sampled (step, sequence) rows checked in float64 (0 = off)", .min = 0, .max = 1 << 20},
      {.name = "page", .type = DA_OPT_SIZE, .dest = &o.page, .help = "tokens per KV cache page", .min = 1,
       .max = 1LL << 30},
      {.name = "layout", .type = DA_OPT_ENUM, .dest = &o.layout, .help = "prefill layout of the cache",
       .choices = layout_names},
      {.name = "weights", .type = DA_OPT_STRING, .dest = &o.weights, .metavar = "W0,W1,..",
       .help = "capacity weight per rank (shards proportional; replaces --layout)"},
      {.name = "topo", .type = DA_OPT_ENUM, .dest = &o.topo, .help = "tree reduction: flat, or within nodes then leaders",
       .choices = topo_names},
      {.name = "node-size", .type = DA_OPT_INT, .dest = &o.node_size,
       .help = "two-level: ranks per node group (0 = ranks sharing memory)", .min = 0, .max = 1 << 20},
      {.name = "root", .type = DA_OPT_INT, .dest = &o.root,
       .help = "only this rank gets the output (tree: MPI_Reduce; ring: the chain ends there); -1 = every rank",
       .min = -1, .max = 1 << 20},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &o.dtype, .help = "storage dtype of q, k, v, out",
       .choices = dtype_names},
      {.name = "seed", .type = DA_OPT_INT, .dest = &o.seed, .help = "seed of the counter-based inputs", .min = 0,
       .max = INT64_MAX},
      {.name = "device", .type = DA_OPT_ENUM, .dest = &o.device, .help = "kernel backend", .choices = device_names},
      {.name = "threads", .type = DA_OPT_INT, .dest = &o.threads,
       .help = "kernel threads per rank (0 = this rank's share of its cores)", .min = 0, .max = 4096},
      {.name = "json", .type = DA_OPT_STRING, .dest = &o.json, .metavar = "FILE",
       .help = "append one JSON object (JSON Lines) to FILE"},
      {.name = "timeout", .type = DA_OPT_DOUBLE, .dest = &o.timeout,
       .help = "seconds a rank waits for a peer before failing (0 = DISTATTN_TIMEOUT or 300)", .dmin = 0, .dmax = 1e6},
      {.name = "mem-budget", .type = DA_OPT_SIZE, .dest = &o.mem_budget,
       .help = "bytes of KV cache a rank may hold; a larger shard is refused (0 = no limit; see --offload)", .min = 0,
       .max = 1LL << 50},
      {0},
  };
  da_cmdspec_t cmd = {.name = "decode",
                      .summary = "autoregressive decode against a distributed paged KV cache (tree | ring), timed per "
                                 "step and verified in float64 on sampled rows",
                      .opts = opts};

  /* Every rank parses the same argv and reaches the same verdict; only rank 0 speaks. */
  int saved_out = -1, saved_err = -1;
  if (g_rank != 0) {
    fflush(stdout), fflush(stderr);
    int devnull = open("/dev/null", O_WRONLY);
    saved_out = dup(1), saved_err = dup(2);
    if (devnull >= 0) dup2(devnull, 1), dup2(devnull, 2), close(devnull);
  }
  int prc = da_args_parse(&cmd, argc, argv);
  int64_t G = o.kv_heads ? o.kv_heads : o.heads;
  int64_t *lens = calloc((size_t)(o.batch > 0 ? o.batch : 1), sizeof *lens);
  double *weights = o.weights ? calloc((size_t)g_size, sizeof *weights) : NULL;
  if (prc == DA_ARGS_OK) {
    const char *missing = !da_args_find(opts, "context")->given && !o.lengths ? "--context"
                          : !da_args_find(opts, "heads")->given                ? "--heads"
                          : !da_args_find(opts, "dim")->given                  ? "--dim"
                                                                               : NULL;
    G = o.kv_heads ? o.kv_heads : o.heads;
    if (!lens || (o.weights && !weights)) prc = da_args_error(&cmd, "out of memory");
    else if (missing) prc = da_args_error(&cmd, "%s is required", missing);
    else if (o.heads % G)
      prc = da_args_error(&cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o.heads, (long long)G);
    else if (o.lengths && da_parse_size_list(o.lengths, lens, o.batch))
      prc = da_args_error(&cmd, "--lengths '%s': expected %lld sizes (one per sequence, --batch)", o.lengths,
                          (long long)o.batch);
    else if (o.weights && parse_list_doubles(o.weights, weights, g_size))
      prc = da_args_error(&cmd, "--weights '%s': expected %d positive numbers (one per rank)", o.weights, g_size);
    else if (o.root >= g_size)
      prc = da_args_error(&cmd, "--root %lld: the job has %d ranks", (long long)o.root, g_size);
    else if (o.device == DA_DEVICE_CUDA && !da_kernels_get(DA_DEVICE_CUDA))
      prc = da_args_error(&cmd, "--device cuda: not built: %s", da_error_message());
    else if (o.json && da_json_check_path(o.json))
      prc = DA_ARGS_USAGE;
    char perr[256];
    if (prc == DA_ARGS_OK && da_verify_poison_init(perr, sizeof perr)) prc = da_args_error(&cmd, "%s", perr);
    if (prc == DA_ARGS_OK && !o.lengths)
      for (int64_t b = 0; b < o.batch; b++) lens[b] = o.context;
    if (prc == DA_ARGS_OK && o.lengths) o.context = lens[0];
    if (prc == DA_ARGS_OK && o.mem_budget > 0) { /* the largest shard this run would put on a rank */
      double rows = 0;
      for (int64_t b = 0; b < o.batch; b++) rows += (double)(lens[b] + o.steps + o.warmup) / g_size + (double)o.page;
      const double need = rows * 2.0 * (double)(G * o.dim) * (double)da_dtype_size((da_dtype_t)o.dtype);
      if (need > (double)o.mem_budget)
        prc = da_args_error(&cmd, "the KV cache needs %.1f MiB per rank (%d rank%s), over --mem-budget %.1f MiB: offload "
                            "it to memory ranks (--offload, --role compute / --role memory)", need / 1048576.0, g_size,
                            g_size == 1 ? "" : "s", (double)o.mem_budget / 1048576.0);
    }
  }
  if (g_rank != 0) {
    fflush(stdout), fflush(stderr);
    if (saved_out >= 0) dup2(saved_out, 1), close(saved_out);
    if (saved_err >= 0) dup2(saved_err, 2), close(saved_err);
  }
  prc = da_mpi_max_int(prc);
  if (prc != DA_ARGS_OK) {
    free(lens), free(weights);
    MPI_Finalize();
    return prc == DA_ARGS_HELP ? 0 : 2;
  }

  /* ---- context, communicator, cache, plan ---- */
  int rc = 0;
  const int threads = o.threads ? (int)o.threads : da_mpi_default_threads();
  const int H = (int)o.heads, D = (int)o.dim, P = g_size;
  const int64_t B = o.batch, T = o.steps, W = o.warmup, NS = T + W;
  const da_dtype_t dt = (da_dtype_t)o.dtype;
  const size_t es = da_dtype_size(dt);
  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_kvcache_t *cache = NULL;
  da_decode_plan_t *plan = NULL;
  char *qb = NULL, *kb = NULL, *vb = NULL, *ob = NULL;
  float *lb = NULL, *tmp = NULL;
  double *t_step = NULL, *t_comp = NULL, *t_red = NULL;
  sample_t *samples = NULL;
  int64_t nsamp = 0;
  da_config_t ccfg = DA_CONFIG_INITIALIZER;
  ccfg.device = (da_device_t)o.device;
  ccfg.nthreads = threads;
  da_status_t st = da_context_create(&ccfg, &ctx);
  if (da_mpi_max_int(st != DA_SUCCESS)) {
    rc = da_report_failure("decode", g_rank, "context", st ? st : DA_ERR_REMOTE, ctx);
    goto out;
  }
  if ((st = da_comm_create(ctx, MPI_COMM_WORLD, &comm)) != DA_SUCCESS) {
    rc = da_report_failure("decode", g_rank, "communicator", st, ctx);
    goto out;
  }
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.seq = o.context, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = dt;
  prob.mask = DA_MASK_CAUSAL;
  da_kvcache_config_t kcfg = DA_KVCACHE_CONFIG_INITIALIZER;
  kcfg.page = o.page, kcfg.layout = (da_algo_t)o.layout, kcfg.weights = weights, kcfg.timeout = o.timeout;
  if ((st = da_kvcache_create(comm, &prob, &kcfg, &cache)) != DA_SUCCESS) {
    rc = da_report_failure("decode", g_rank, "kv cache", st, ctx);
    goto out;
  }
  da_decode_config_t dcfg = DA_DECODE_CONFIG_INITIALIZER;
  dcfg.algo = (da_decode_algo_t)o.algo, dcfg.topo = (da_decode_topo_t)o.topo, dcfg.root = (int)o.root;
  dcfg.node_size = (int)o.node_size, dcfg.timeout = o.timeout;
  if ((st = da_decode_plan_create(comm, &prob, &dcfg, &plan)) != DA_SUCCESS) {
    rc = da_report_failure("decode", g_rank, "decode plan", st, ctx);
    goto out;
  }

  /* ---- prefill: pages allocated along the layout, then filled in place from the RNG ---- */
  da_vprob_t vp = {.B = B, .S = o.context, .seed = (uint64_t)o.seed};
  vp.kp.H = H, vp.kp.G = (int)G, vp.kp.D = D, vp.kp.scale = (float)(1.0 / sqrt((double)D)), vp.kp.dtype = dt;
  vp.kp.mask.flags = DA_MASK_NONE; /* the newest token sees the whole cache */
  vp.kp.nthreads = threads;
  double t_fill = MPI_Wtime();
  for (int64_t b = 0; b < B; b++) {
    if ((st = da_kvcache_prefill(cache, b, lens[b], NULL, NULL)) != DA_SUCCESS) break;
    fill_pages(cache, &vp, b);
  }
  if (st != DA_SUCCESS) {
    rc = da_report_failure("decode", g_rank, "prefill", st, ctx);
    goto out;
  }
  t_fill = MPI_Wtime() - t_fill;

  /* ---- buffers of one step: the new token's q, k, v (every rank makes the same), out, lse ---- */
  qb = malloc((size_t)(B * H * D) * es), ob = malloc((size_t)(B * H * D) * es);
  kb = malloc((size_t)(B * G * D) * es), vb = malloc((size_t)(B * G * D) * es);
  lb = malloc((size_t)(B * H) * sizeof(float)), tmp = malloc((size_t)D * sizeof(float));
  t_step = calloc((size_t)T, sizeof *t_step), t_comp = calloc((size_t)T, sizeof *t_comp);
  t_red = calloc((size_t)T, sizeof *t_red);
  /* Samples: R (step, sequence) pairs spread evenly over the T x B timed rows; sample i is checked
   * by rank i mod P (or by the root, the only rank holding outputs with --root). */
  const int64_t R = o.verify < T * B ? o.verify : T * B;
  samples = calloc((size_t)(R ? R : 1), sizeof *samples);
  int oom = !qb || !ob || !kb || !vb || !lb || !tmp || !t_step || !t_comp || !t_red || !samples;
  for (int64_t i = 0; i < R && !oom; i++) {
    int64_t idx = R == 1 ? T * B - 1 : i * (T * B - 1) / (R - 1);
    samples[i].step = idx / B, samples[i].b = idx % B;
    samples[i].out = malloc((size_t)(H * D) * es), samples[i].lse = malloc((size_t)H * sizeof(float));
    oom |= !samples[i].out || !samples[i].lse;
    nsamp = i + 1;
  }
  if (da_mpi_max_int(oom)) {
    if (oom) fprintf(stderr, "distattn decode: rank %d: out of memory for the step buffers\n", g_rank);
    rc = 1;
    goto out;
  }
  const int verifier_root = o.root >= 0;

  /* ---- header ---- */
  char hosts[1024];
  size_t shard_rows_bytes = 0, shard_alloc = da_kvcache_bytes(cache, &shard_rows_bytes);
  if (g_rank == 0) {
    da_report_header(stdout, &cmd, threads);
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0;
    MPI_Get_library_version(lib, &len);
    lib[strcspn(lib, ",\n")] = '\0';
    da_report_line(stdout, "ranks: %d  mpi: %s (MPI %d.%d)  backend: %s", g_size, lib, MPI_VERSION, MPI_SUBVERSION,
                   device_names[o.device]);
  }
  fflush(stdout);
  da_rank_map(threads, hosts, sizeof hosts);
  da_decode_stats_t ds = DA_DECODE_STATS_INITIALIZER;
  da_decode_plan_stats(plan, &ds);
  {
    unsigned long long sh[2] = {(unsigned long long)shard_rows_bytes, ~(unsigned long long)shard_rows_bytes};
    MPI_Allreduce(MPI_IN_PLACE, sh, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    double fill = t_fill;
    MPI_Allreduce(MPI_IN_PLACE, &fill, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (g_rank == 0) {
      da_report_line(stdout, "cache: %s prefill, pages of %lld tokens, shards %.1f..%.1f MiB per rank (k + v), "
                             "filled from the RNG in %.2f s", o.weights ? "weighted" : layout_names[o.layout],
                     (long long)o.page, (double)~sh[1] / 1048576.0, (double)sh[0] / 1048576.0, fill);
      if (o.algo == 0) {
        char groups[64] = "";
        if (o.topo) snprintf(groups, sizeof groups, " (%d node group%s)", ds.nodes, ds.nodes == 1 ? "" : "s");
        da_report_line(stdout, "combine: tree, %s%s, %s; one fused reduction with the (o, lse) merge as MPI_Op",
                       topo_names[o.topo], groups,
                       o.root < 0 ? "MPI_Iallreduce (output on every rank)" : "MPI_Ireduce (output on the root)");
      } else {
        da_report_line(stdout, "combine: ring, the query and the running partials travel %d dependent hops, each "
                               "rank decoding its shard on arrival (output on %s)", P - 1,
                       o.root < 0 ? "every rank: broadcast from the last" : "the root");
      }
      da_report_line(stdout, "step: append the token's k, v then decode it; latency = max over ranks, median and "
                             "p99 over %lld steps (after %lld warmup)", (long long)T, (long long)W);
      da_report_line(stdout, "comm: bytes sent per step summed over ranks (ring: exact; tree: binomial-tree model); "
                             "kv GB/s: KV bytes read / kernel time, mean over ranks");
      if (R)
        da_report_line(stdout, "verify: %lld rows in float64, every key regenerated from the RNG and streamed (no "
                               "gather); tolerance %g", (long long)R, dt == DA_FLOAT32 ? 1e-4 : 2e-2);
    }
  }

  /* ---- the autoregressive loop ---- */
  int64_t *ntok = malloc((size_t)B * sizeof *ntok);
  double kv_bytes = 0, comp_total = 0, bytes_step = 0;
  int64_t keys_total = 0;
  if (!ntok) {
    rc = 1;
    goto out;
  }
  for (int64_t b = 0; b < B; b++) ntok[b] = 1;
  int64_t si = 0; /* next sample */
  int64_t nf[4] = {0, 0, 0, 0}; /* NaN / Inf in q, k, v (the cache), out */
  for (int64_t it = 0; it < NS; it++) {
    /* The new token of every sequence: k, v, q at its position, regenerated identically by every
     * rank (in a model, the last layer's output is replicated). */
    for (int64_t b = 0; b < B; b++) {
      const int64_t pos = da_kvcache_length(cache, b);
      const uint64_t seed = da_verify_seed((uint64_t)o.seed, b);
      for (int g = 0; g < G; g++) {
        da_rng_row(seed, DA_RNG_K, pos, g, D, tmp);
        da_verify_poison(DA_RNG_K, pos, g, tmp);
        for (int d = 0; d < D; d++) da_store_f32(kb, (int)dt, (b * G + g) * D + d, tmp[d]);
        da_rng_row(seed, DA_RNG_V, pos, g, D, tmp);
        da_verify_poison(DA_RNG_V, pos, g, tmp);
        for (int d = 0; d < D; d++) da_store_f32(vb, (int)dt, (b * G + g) * D + d, tmp[d]);
      }
      for (int h = 0; h < H; h++) {
        da_rng_row(seed, DA_RNG_Q, pos, h, D, tmp);
        da_verify_poison(DA_RNG_Q, pos, h, tmp);
        for (int d = 0; d < D; d++) da_store_f32(qb, (int)dt, ((int64_t)b * H + h) * D + d, tmp[d]);
      }
    }
    da_tensor_t tq, tk, tv, to, tl;
    const int64_t shq[3] = {B, H, D}, shk[3] = {B, G, D}, shl[2] = {B, H};
    da_tensor_make(&tq, qb, dt, 3, shq), da_tensor_make(&to, ob, dt, 3, shq);
    da_tensor_make(&tk, kb, dt, 3, shk), da_tensor_make(&tv, vb, dt, 3, shk);
    da_tensor_make(&tl, lb, DA_FLOAT32, 2, shl);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    st = da_kvcache_append(cache, ntok, &tk, &tv);
    if (st == DA_SUCCESS) st = da_decode_step(plan, cache, &tq, &to, &tl, NULL);
    double t = MPI_Wtime() - t0;
    /* every rank learns whether any failed (a rank-local append failure has no other way out) */
    double red[2] = {t, st != DA_SUCCESS};
    MPI_Allreduce(MPI_IN_PLACE, red, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (red[1] > 0) {
      rc = da_report_failure("decode", g_rank, "decode step", st != DA_SUCCESS ? st : DA_ERR_REMOTE, ctx);
      break;
    }
    if (it < W) continue;
    const int64_t s = it - W;
    /* non-finite values: q is the same on every rank, out on every rank that holds it: count once */
    if (g_rank == 0) nf[0] += da_count_nonfinite(qb, dt, B * H * D);
    if (g_rank == (o.root >= 0 ? (int)o.root : 0)) nf[3] += da_count_nonfinite(ob, dt, B * H * D);
    da_decode_plan_stats(plan, &ds);
    t_step[s] = red[0];
    t_comp[s] = ds.compute_s;
    t_red[s] = ds.reduce_s;
    kv_bytes += (double)ds.kv_bytes;
    comp_total += ds.compute_s;
    bytes_step += (double)ds.bytes_sent;
    for (int64_t b = 0; b < B; b++) keys_total += da_kvcache_length(cache, b);
    for (; si < nsamp && samples[si].step == s; si++) {
      sample_t *sm = &samples[si];
      sm->qpos = da_kvcache_length(cache, sm->b) - 1;
      memcpy(sm->out, ob + (size_t)(sm->b * H * D) * es, (size_t)(H * D) * es);
      memcpy(sm->lse, lb + sm->b * H, (size_t)H * sizeof(float));
    }
  }
  free(ntok);
  if (rc) goto out;

  /* ---- verification: every sampled row from scratch in float64 over its whole context ---- */
  int64_t vrows = 0, vwrong = 0, vnonfinite = 0, vnfwrong = 0;
  double vmax[2] = {0, 0}; /* abs, rel */
  int vfail = 0;
  {
    const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2;
    double *ro = malloc((size_t)(H * D) * sizeof(double)), *rl = malloc((size_t)H * sizeof(double));
    if (!ro || !rl) vfail = 1;
    for (int64_t i = 0; i < nsamp && !vfail; i++) {
      if ((verifier_root ? (int)o.root : (int)(i % P)) != g_rank) continue;
      sample_t *sm = &samples[i];
      da_vprob_t v1 = vp;
      v1.S = sm->qpos + 1;
      if (da_verify_fwd_row(&v1, sm->b, sm->qpos, ro, rl)) {
        vfail = 1;
        break;
      }
      vrows++;
      for (int h = 0; h < H; h++) {
        double ae = 0, rel = da_verify_rel(sm->out, dt, (int64_t)h * D, ro + h * D, D, &ae);
        if (isnan(rel)) { /* a poisoned input reaches the reference: counted apart, not measured */
          vnonfinite++;
          continue;
        }
        double le = fabs((double)sm->lse[h] - rl[h]), lrel = le / fmax(1.0, fabs(rl[h]));
        if (!(rel <= tol) || !(lrel <= tol)) vwrong++, vnfwrong += ae == INFINITY;
        if (!(rel <= vmax[1])) vmax[1] = rel;
        if (!(ae <= vmax[0])) vmax[0] = ae;
        if (!(lrel <= vmax[1])) vmax[1] = lrel;
      }
    }
    free(ro), free(rl);
  }
  if (da_mpi_max_int(vfail)) {
    if (vfail) fprintf(stderr, "distattn decode: rank %d: verification ran out of memory\n", g_rank);
    rc = 1;
    goto out;
  }
  /* the cache's k and v on this rank (every token, appended ones included) */
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i < da_kvcache_num_pages(cache, b); i++) {
      da_kvcache_page_t pg;
      if (da_kvcache_get_page(cache, b, i, &pg) != DA_SUCCESS) continue;
      for (int64_t j = 0; j < pg.count; j++) {
        nf[1] += da_count_nonfinite((const char *)pg.k + (size_t)(j * pg.ldk) * es, dt, G * D);
        nf[2] += da_count_nonfinite((const char *)pg.v + (size_t)(j * pg.ldv) * es, dt, G * D);
      }
    }
  int64_t vsum[8] = {vrows, vwrong, vnonfinite, vnfwrong, nf[0], nf[1], nf[2], nf[3]};
  MPI_Allreduce(MPI_IN_PLACE, vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, vsum, 8, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  static const char *const nf_names[] = {"q", "k", "v", "out"};

  /* ---- figures ---- */
  da_kvcache_bytes(cache, &shard_rows_bytes);
  const double rss = (double)da_peak_rss_bytes(), shard = (double)shard_rows_bytes;
  /* per rank: KV read rate, peak memory over its shard; then over ranks */
  double mine[7] = {comp_total > 0 ? kv_bytes / comp_total : 0, shard > 0 ? rss / shard : 0, rss, shard,
                    (double)da_mem_peak(), comp_total, kv_bytes};
  double mx[7], sm6[7], mn1 = mine[0];
  MPI_Allreduce(mine, mx, 7, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(mine, sm6, 7, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &mn1, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  double bsum = bytes_step;
  MPI_Allreduce(MPI_IN_PLACE, &bsum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  /* compute and reduction time per step: max over ranks, then median over steps */
  MPI_Allreduce(MPI_IN_PLACE, t_comp, (int)T, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, t_red, (int)T, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const double step_p99 = da_p99(t_step, T), step_med = da_median(t_step, T);
  const double comp_med = da_median(t_comp, T), red_med = da_median(t_red, T);
  const double comm_per_step = bsum / (double)T;
  const double kv_gbps = sm6[0] / P * 1e-9, kv_gbps_min = mn1 * 1e-9;
  const double imbalance = sm6[5] > 0 ? mx[5] / (sm6[5] / P) : 1.0;
  const double keys_per_step = (double)keys_total / (double)T;
  const double gflops = 4.0 * H * D * keys_per_step / step_med * 1e-9;
  const int mem_ok = mx[1] <= 1.3;

  if (g_rank == 0) {
    static const char *const names[] = {"algo", "ranks", "context", "batch", "heads", "kv", "dim", "dtype", "steps",
                                        "med_ms", "p99_ms", "comp_ms", "comb_ms", "comm_KB", "kvGB/s", "shard_MB",
                                        "peak_MB", "mem_x", "rows", "max_rel", "wrong"};
    static const int widths[] = {5, 5, 9, 5, 5, 3, 4, 5, 5, 9, 9, 9, 8, 8, 7, 9, 8, 5, 5, 9, 6};
    da_table_t tb;
    da_table_init(&tb, stdout, 21, names, widths);
    da_table_print_header(&tb);
    da_table_str(&tb, o.algo == 0 && o.topo == 1 ? "tree2" : algo_names[o.algo]);
    da_table_int(&tb, P), da_table_int(&tb, o.context), da_table_int(&tb, B), da_table_int(&tb, H);
    da_table_int(&tb, G), da_table_int(&tb, D), da_table_str(&tb, dtype_names[o.dtype]), da_table_int(&tb, T);
    da_table_dbl(&tb, step_med * 1e3, 3, 0), da_table_dbl(&tb, step_p99 * 1e3, 3, 0);
    da_table_dbl(&tb, comp_med * 1e3, 3, 0), da_table_dbl(&tb, red_med * 1e3, 3, 0);
    da_table_dbl(&tb, comm_per_step / 1024.0, 2, 0), da_table_dbl(&tb, kv_gbps, 2, 0);
    da_table_dbl(&tb, mx[3] / 1048576.0, 1, 0), da_table_dbl(&tb, mx[2] / 1048576.0, 1, 0);
    da_table_dbl(&tb, mx[1], 2, 0), da_table_int(&tb, vsum[0]), da_table_dbl(&tb, R ? vmax[1] : NAN, 2, 1);
    da_table_int(&tb, vsum[1]);
    da_table_end_row(&tb);
    da_report_line(stdout, "memory: peak RSS / shard, max over ranks = %.3f (limit 1.3: %s); distattn allocations "
                           "peak %.1f MiB, pages allocated %.1f MiB on rank 0", mx[1], mem_ok ? "ok" : "EXCEEDED",
                   mx[4] / 1048576.0, (double)shard_alloc / 1048576.0);
    da_report_nonfinite(stdout, 4, nf_names, vsum + 4, vsum[2], vsum[3], vsum[4] + vsum[5] + vsum[6] > 0);
    if (o.json) {
      da_json_t j;
      da_json_begin(&j);
      da_json_str(&j, "cmd", "decode");
      da_json_str(&j, "algo", algo_names[o.algo]);
      da_json_str(&j, "topo", o.algo == 0 ? topo_names[o.topo] : NULL);
      da_json_int(&j, "root", o.root);
      da_json_int(&j, "ranks", P);
      da_json_int(&j, "context", o.context);
      da_json_str(&j, "lengths", o.lengths);
      da_json_int(&j, "batch", B);
      da_json_int(&j, "heads", H);
      da_json_int(&j, "kv_heads", G);
      da_json_int(&j, "dim", D);
      da_json_str(&j, "mask", "causal");
      da_json_str(&j, "dtype", dtype_names[o.dtype]);
      da_json_str(&j, "device", device_names[o.device]);
      da_json_int(&j, "threads", threads);
      da_json_int(&j, "page", o.page);
      da_json_str(&j, "layout", o.weights ? "weighted" : layout_names[o.layout]);
      da_json_int(&j, "steps", T);
      da_json_int(&j, "warmup", W);
      da_json_dbl(&j, "step_median_s", step_med);
      da_json_dbl(&j, "step_p99_s", step_p99);
      da_json_dbl(&j, "compute_median_s", comp_med);
      da_json_dbl(&j, "combine_median_s", red_med);
      da_json_dbl(&j, "fwd_s", step_med);
      da_json_null(&j, "bwd_s");
      da_json_dbl(&j, "gflops", gflops);
      da_json_int(&j, "verify_rows", vsum[0]);
      da_json_dbl(&j, "max_abs_err", R ? vmax[0] : NAN);
      da_json_dbl(&j, "max_rel_err", R ? vmax[1] : NAN);
      da_json_int(&j, "wrong", vsum[1]);
      da_json_dbl(&j, "comm_bytes", comm_per_step);
      da_json_dbl(&j, "comm_bytes_per_step", comm_per_step);
      da_json_dbl(&j, "comm_exposed_s", red_med);
      da_json_null(&j, "overlap");
      da_json_dbl(&j, "imbalance", imbalance);
      da_json_dbl(&j, "kv_bytes_per_step", sm6[6] / (double)T); /* summed over ranks */
      da_json_dbl(&j, "kv_read_gbps_per_rank", kv_gbps);
      da_json_dbl(&j, "kv_read_gbps_min_rank", kv_gbps_min);
      da_json_dbl(&j, "shard_bytes_max", mx[3]);
      da_json_dbl(&j, "peak_over_shard_max", mx[1]);
      da_json_dbl(&j, "peak_alloc_bytes_max", mx[4]);
      da_json_int(&j, "peak_rss_bytes", (int64_t)mx[2]);
      da_json_dbl(&j, "fill_s", t_fill);
      da_json_int(&j, "nonfinite_rows", vsum[2]);
      da_json_int(&j, "nonfinite_inputs", vsum[4] + vsum[5] + vsum[6]);
      da_json_int(&j, "nonfinite_outputs", vsum[7]);
      da_json_int(&j, "nonfinite_wrong", vsum[3]);
      da_json_str(&j, "hosts", hosts);
      da_json_str(&j, "git", da_git_version());
      const char *job = getenv("SLURM_JOB_ID");
      if (job && *job) da_json_str(&j, "SLURM_JOB_ID", job);
      da_json_str(&j, "cpu", da_report_cpu_model());
      if (da_json_append(&j, o.json)) rc = 1;
      da_json_free(&j);
    }
    if (da_report_footer(stdout, vsum[1], rc == 0)) rc = rc ? rc : 1;
    fflush(stdout);
  }
  if (vsum[1] > 0 && !rc) rc = 1;
  rc = da_mpi_max_int(rc);
out:
  for (int64_t i = 0; samples && i < nsamp; i++) free(samples[i].out), free(samples[i].lse);
  free(samples);
  free(qb), free(kb), free(vb), free(ob), free(lb), free(tmp), free(t_step), free(t_comp), free(t_red);
  da_decode_plan_free(plan);
  da_kvcache_free(cache);
  da_comm_free(comm);
  da_context_free(ctx);
  free(lens), free(weights);
  MPI_Finalize();
  return rc;
}
