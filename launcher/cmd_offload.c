/* cmd_offload.c: `distattn decode --offload --role compute|memory ...`, decode with the attention
 * offloaded to memory ranks (comm/offload.c, docs/offload.md). Each rank's role comes from its own
 * command line (one mpirun / srun component per role). Memory ranks fill their pages of every
 * layer's cache from the counter RNG and serve; compute ranks run an emulated model: per step and
 * layer, per micro-batch, a configurable amount of busy compute, then the offloaded attention of
 * that micro-batch, pipelined so the next micro-batch's compute overlaps it. Reports the latency
 * split (send, remote attention, reduce, receive), network bytes against KV bytes read, tokens/s
 * with offload and (--baseline) without, and verifies sampled rows in float64. A rank that gives
 * up on a peer ends the job through launcher/fault.c; a compute rank whose own group is healthy
 * notices that (da_fault_notice) and cancels its group, so every surviving rank says why it
 * stops. The command is the phases of offload_phases, run in order by da_mpi_cmd_main (common.h)
 * over one orun_t. Not a library layer: it may exit. */
#define _GNU_SOURCE
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "distattn.h"
#include "args.h"
#include "core.h"
#include "dtype.h"
#include "kernels.h"
#include "launcher.h"
#include "common.h"
#include "paths.h"
#include "fault.h"
#include "report.h"
#include "rng.h"
#include "verify.h"

static const char *const role_names[] = {"compute", "memory", NULL};

enum { SPIN_BETWEEN_POLLS = 200 };    /* emulated compute: multiply-adds between progress calls */
enum { QUIET_POLL_NS = 1000 * 1000 }; /* quiet_barrier: 1 ms between tests */

/* The other layers of the model: busy for `s` seconds, driving the offload's progress meanwhile
 * (no helper thread: MPI progresses in our calls). */
static void emulate_compute(da_offload_t *off, double s) {
  const double end = da_time_now() + s;
  volatile double x = 1.0;
  while (da_time_now() < end) {
    for (int i = 0; i < SPIN_BETWEEN_POLLS; i++) x = x * 1.0000001 + 1e-9;
    if (off) da_offload_progress(off);
  }
}

/* Wait for a world barrier without spinning (memory ranks idle while the baseline runs). */
static void quiet_barrier(void) {
  MPI_Request r;
  MPI_Ibarrier(MPI_COMM_WORLD, &r);
  for (int flag = 0;;) {
    MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
    if (flag) break;
    struct timespec ts = {0, QUIET_POLL_NS};
    nanosleep(&ts, NULL);
  }
}

/* Fill this rank's pages of cache sequence s from the RNG stream `idx` (as da_verify_gen makes rows). */
static void fill_pages(da_kvcache_t *cache, int64_t s, uint64_t seed, int G, int D, int dt, int threads) {
  const int64_t np = da_kvcache_num_pages(cache, s);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    float *tmp = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < np; i++) {
      da_kvcache_page_t pg;
      if (!tmp || da_kvcache_get_page(cache, s, i, &pg) != DA_SUCCESS) continue;
      for (int64_t j = 0; j < pg.count; j++)
        for (int g = 0; g < G; g++) {
          const int64_t pos = pg.start + j * pg.stride;
          da_rng_row(seed, DA_RNG_K, pos, g, D, tmp);
          for (int d = 0; d < D; d++) da_store_f32(pg.k, dt, j * pg.ldk + (int64_t)g * D + d, tmp[d]);
          da_rng_row(seed, DA_RNG_V, pos, g, D, tmp);
          for (int d = 0; d < D; d++) da_store_f32(pg.v, dt, j * pg.ldv + (int64_t)g * D + d, tmp[d]);
        }
    }
    free(tmp);
  }
}

/* The new token (position pos) of stream idx: q [H][D], k, v [G][D] into the buffers at row r. */
static void gen_token(uint64_t seed, int64_t pos, int H, int G, int D, int dt, char *q, char *k, char *v, int64_t r,
                      float *tmp) {
  for (int g = 0; g < G; g++) {
    da_rng_row(seed, DA_RNG_K, pos, g, D, tmp);
    for (int d = 0; d < D; d++) da_store_f32(k, dt, (r * G + g) * D + d, tmp[d]);
    da_rng_row(seed, DA_RNG_V, pos, g, D, tmp);
    for (int d = 0; d < D; d++) da_store_f32(v, dt, (r * G + g) * D + d, tmp[d]);
  }
  for (int h = 0; h < H; h++) {
    da_rng_row(seed, DA_RNG_Q, pos, h, D, tmp);
    for (int d = 0; d < D; d++) da_store_f32(q, dt, (r * H + h) * D + d, tmp[d]);
  }
}

typedef struct sample {
  int64_t step, layer, b, qpos;
  char *out;
  float *lse;
} sample_t;

/* ---- the run's state, shared by its phases ---- */

typedef struct offload_opts { /* the command line */
  int offload, role, dtype, baseline, device;
  int64_t context, heads, kv_heads, dim, batch, steps, warmup, verify, page, seed, threads, layers, micro, budget;
  double layer_ms, timeout;
  const char *lengths, *json;
} offload_opts_t;

enum { OFFLOAD_NOPTS = 24 }; /* options of `distattn decode --offload`, with the table's end mark */

/* Latency split of every timed request (layer x micro-batch) of a compute rank, and its bytes. */
typedef struct latencies {
  double *send, *attn, *red, *recv, *tot; /* [n] */
  int64_t n;
  double net_bytes, kv_bytes;
} latencies_t;

typedef struct orun {
  da_mpi_job_t job; /* rank, size, the library context and the communicator over the world */
  offload_opts_t o;
  da_opt_t opts[OFFLOAD_NOPTS];
  int implied_offload; /* --role without --offload */
  da_cmdspec_t cmd;
  /* the problem: H, G, D, L layers, dt dtype; B sequences per compute rank, T timed steps after
   * W warm-up steps (NS in all); nmb micro-batches of at most nmax sequences */
  int H, D, L, dt, nth;
  int64_t G, B, T, W, NS, nmax, nmb;
  size_t es;
  int64_t *lens; /* [B] context length of each sequence */
  da_offload_t *off;
  da_problem_t prob;
  da_offload_info_t info;
  int is_mem;
  double kv_local, max_shard, t_fill; /* one compute rank's KV without offload; largest shard */
  /* what the phases measure */
  sample_t *samples; /* [R] sampled outputs, verified at the end */
  int64_t R;
  double *t_step; /* [T] */
  latencies_t lat;
  double base_tps;  /* tokens/s without offload (NAN: not measured) */
  int base_refused; /* the baseline's cache would exceed --mem-budget */
  int64_t vs[2];    /* verified rows, wrong (summed over ranks) */
  double vmax[2];   /* max abs, max rel error */
} orun_t;

/* The figures of the table and the JSON record, reduced over ranks: times the max over compute
 * ranks, bytes and tokens their sum. */
typedef struct figures {
  double med[6]; /* medians: send, attention, reduce, receive, request; [5] the step p99 */
  double sum[4]; /* net bytes per step, KV bytes per step, tokens/s, tokens/s without offload */
  double step_med, ratio, lamina;
  int refused_any;
} figures_t;

/* ---- parse and agree ---- */

static void offload_options(orun_t *x) {
  offload_opts_t *o = &x->o;
  *o = (offload_opts_t){
      .role = -1, .batch = 1, .steps = 8, .warmup = 1, .verify = 4, .page = 256, .seed = 1, .layers = 1, .micro = 1};
  const da_opt_t opts[OFFLOAD_NOPTS] = {
      {.name = "offload", .type = DA_OPT_FLAG, .dest = &o->offload, .help = "offload attention to memory ranks"},
      {.name = "role", .type = DA_OPT_ENUM, .dest = &o->role, .help = "this rank's role (required with --offload)",
       .choices = role_names, .per_rank = 1},
      {.name = "mem-budget", .type = DA_OPT_SIZE, .dest = &o->budget,
       .help = "bytes of KV cache this rank may hold (0 = free memory from sysinfo)", .min = 0, .max = 1LL << 50,
       .per_rank = 1 /* a memory rank's own */},
      {.name = "context", .type = DA_OPT_SIZE, .dest = &o->context, .help = "tokens per sequence before the first step",
       .min = 1, .max = 1LL << 34},
      {.name = "lengths", .type = DA_OPT_STRING, .dest = &o->lengths, .metavar = "L1,L2,..",
       .help = "per-sequence context lengths (B values)", .sample = "64"},
      {.name = "heads", .type = DA_OPT_INT, .dest = &o->heads, .help = "query heads H (required)", .min = 1,
       .max = 65536},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &o->kv_heads, .help = "KV heads G (0 = H)", .min = 0,
       .max = 65536},
      {.name = "dim", .type = DA_OPT_INT, .dest = &o->dim, .help = "head dim D (required)", .min = 1, .max = 4096},
      {.name = "batch", .type = DA_OPT_INT, .dest = &o->batch, .help = "sequences per compute rank", .min = 1,
       .max = 1 << 20},
      {.name = "layers", .type = DA_OPT_INT, .dest = &o->layers, .help = "model layers (one KV cache each)", .min = 1,
       .max = 1024},
      {.name = "microbatches", .type = DA_OPT_INT, .dest = &o->micro,
       .help = "micro-batches per step (pipelining: 1 = none)", .min = 1, .max = 1 << 20},
      {.name = "layer-compute", .type = DA_OPT_DOUBLE, .dest = &o->layer_ms,
       .help = "emulated compute per layer per step for the whole batch (ms)", .dmin = 0, .dmax = 1e6},
      {.name = "baseline", .type = DA_OPT_FLAG, .dest = &o->baseline,
       .help = "also decode locally on the compute ranks (tokens/s without offload), when it fits --mem-budget"},
      {.name = "steps", .type = DA_OPT_INT, .dest = &o->steps, .help = "timed steps", .min = 1, .max = 1 << 20},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &o->warmup, .help = "untimed steps first", .min = 0,
       .max = 1 << 20},
      {.name = "verify", .type = DA_OPT_INT, .dest = &o->verify, .help = "sampled rows checked in float64", .min = 0,
       .max = 1 << 20},
      {.name = "page", .type = DA_OPT_SIZE, .dest = &o->page, .help = "tokens per KV page", .min = 1, .max = 1LL << 30},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &o->dtype, .help = "storage dtype", .choices = da_dtype_names},
      {.name = "seed", .type = DA_OPT_INT, .dest = &o->seed, .help = "seed of the inputs", .min = 0, .max = INT64_MAX},
      {.name = "threads", .type = DA_OPT_INT, .dest = &o->threads, .help = "kernel threads per rank (0 = 1)", .min = 0,
       .max = DA_MAX_NTHREADS, .per_rank = 1},
      /* per rank: rank 0 (a compute rank) writes the record; slurm/offload-hetjob.sbatch gives
       * --json to the compute component only */
      {.name = "json", .type = DA_OPT_STRING, .dest = &o->json, .metavar = "FILE", .help = "append one JSON object",
       .sample = "agree-sample.jsonl", .per_rank = 1},
      {.name = "timeout", .type = DA_OPT_DOUBLE, .dest = &o->timeout, .help = "seconds to wait for a peer", .dmin = 0,
       .dmax = 1e6, .dfloor = DA_TIMEOUT_MIN_S},
      {.name = "device", .type = DA_OPT_ENUM, .dest = &o->device, .choices = da_device_names,
       .help = "kernel backend: cpu only (the offloaded KV cache and its decode stay in host memory)"},
      {0},
  };
  memcpy(x->opts, opts, sizeof opts);
  x->cmd = (da_cmdspec_t){.name = "decode --offload",
                          .summary = "decode with attention offloaded to memory ranks (Lamina): give each rank --role",
                          .opts = x->opts};
}

/* Ranks of different roles have different command lines: each parses its own (da_mpi_parse_agree
 * runs this on every rank, perhaps twice, and agrees on the worst verdict). DA_ARGS_*. */
static int offload_parse(void *c, int argc, char **argv) {
  orun_t *x = c;
  offload_opts_t *o = &x->o;
  free(x->lens);
  offload_options(x);
  int prc = da_args_parse(&x->cmd, argc, argv);
  x->G = o->kv_heads ? o->kv_heads : o->heads;
  x->lens = calloc((size_t)o->batch, sizeof *x->lens);
  if (prc != DA_ARGS_OK) return prc;
  /* Offload exists to put the KV cache in the memory ranks' host memory (Lamina): a GPU compute
   * rank would only pay the PCIe copies of the partials, so it is refused until one pays for itself. */
  if (o->device == DA_DEVICE_CUDA)
    return da_args_error(&x->cmd, "--device cuda: the offloaded attention stays host-side: memory ranks keep the KV "
                         "cache in host memory and decode it with the CPU kernels (docs/offload.md); run --offload "
                         "with --device cpu, or the device tree decode without --offload");
  if (!da_args_find(x->opts, "context")->given && !o->lengths) return da_args_error(&x->cmd, "--context is required");
  if (!o->heads || !o->dim) return da_args_error(&x->cmd, "--heads and --dim are required");
  if (o->heads % x->G)
    return da_args_error(&x->cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)o->heads,
                         (long long)x->G);
  if (o->lengths && da_parse_size_list(o->lengths, x->lens, o->batch))
    return da_args_error(&x->cmd, "--lengths '%s': expected %lld sizes", o->lengths, (long long)o->batch);
  if (da_paths_refuse_json("decode", o->json)) return DA_ARGS_USAGE;
  if (o->json && da_json_check_path(o->json)) return DA_ARGS_USAGE;
  if (o->lengths) o->context = x->lens[0];
  else
    for (int64_t b = 0; b < o->batch; b++) x->lens[b] = o->context;
  x->H = (int)o->heads, x->D = (int)o->dim, x->L = (int)o->layers, x->dt = o->dtype;
  x->B = o->batch, x->T = o->steps, x->W = o->warmup, x->NS = x->T + x->W;
  x->es = da_dtype_size((da_dtype_t)x->dt);
  x->nth = o->threads ? (int)o->threads : 1;
  x->nmax = (x->B + o->micro - 1) / o->micro, x->nmb = (x->B + x->nmax - 1) / x->nmax;
  x->base_tps = NAN;
  /* --role alone means --offload (da_cmd_decode sent us here): the effective value the ranks agree on */
  x->implied_offload = !o->offload;
  o->offload = 1;
  return DA_ARGS_OK;
}

/* ---- plan: the offload object, its groups, and whether the cache fits ---- */

/* Phase, collective: the context and communicator, the offload object with every rank's role, and
 * whether the cache fits the memory ranks' budgets. 0, or the exit code every rank agrees on. */
static int offload_setup(void *c) {
  orun_t *x = c;
  const offload_opts_t *o = &x->o;
  if (x->implied_offload && x->job.rank == 0) fprintf(stderr, "distattn decode: --role given: running with --offload\n");
  int rc = da_mpi_job_open(&x->job, "decode", DA_DEVICE_CPU, x->nth);
  if (rc) return rc;
  da_problem_t *prob = &x->prob;
  *prob = (da_problem_t)DA_PROBLEM_INITIALIZER;
  prob->batch = x->B, prob->seq = o->context, prob->heads = x->H, prob->kv_heads = x->G, prob->dim = x->D;
  prob->dtype = (da_dtype_t)x->dt, prob->mask = DA_MASK_CAUSAL;
  da_offload_config_t ocfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  ocfg.page = o->page, ocfg.layers = x->L, ocfg.microbatches = (int)o->micro, ocfg.mem_budget = (double)o->budget;
  ocfg.timeout = o->timeout;
  da_fault_point("plan");
  da_status_t st =
      da_offload_create(x->job.comm, o->role < 0 ? DA_ROLE_NONE : (da_role_t)o->role, prob, &ocfg, &x->off);
  if (da_mpi_max_int(st != DA_SUCCESS)) { /* role errors reach every rank: each says it */
    fprintf(stderr, "distattn decode: rank %d: offload: %s: %s\n", x->job.rank, da_status_string(st), da_last_error(x->job.ctx));
    return st == DA_ERR_INVALID_ARGUMENT || st == DA_ERR_MISMATCH ? 2 : 1;
  }
  da_offload_get_info(x->off, &x->info);
  x->is_mem = x->info.role == DA_ROLE_MEMORY;
  int64_t *fin = malloc((size_t)x->B * sizeof *fin);
  for (int64_t b = 0; b < x->B; b++) fin[b] = x->lens[b] + x->NS;
  st = da_offload_check_fit(x->off, fin, &x->max_shard);
  if (st == DA_SUCCESS) x->kv_local = da_offload_kv_bytes(prob, x->L, fin); /* one compute rank's KV, not offloaded */
  free(fin);
  if (st != DA_SUCCESS) {
    if (x->job.rank == 0) fprintf(stderr, "distattn decode: %s\n", da_last_error(x->job.ctx));
    return 2;
  }
  return 0;
}

/* ---- inputs: memory ranks fill their pages of every layer's cache ---- */

/* Cache sequence s = l * B + b holds stream ((group * L + l) * B + b) of the RNG. */
static int64_t stream_of(const orun_t *x, int l, int64_t b) { return ((int64_t)x->info.group * x->L + l) * x->B + b; }

/* Prefill every sequence of every layer of cache and fill this rank's pages from the RNG. */
static da_status_t fill_cache(const orun_t *x, da_kvcache_t *cache) {
  da_status_t st = DA_SUCCESS;
  for (int l = 0; l < x->L && st == DA_SUCCESS; l++)
    for (int64_t b = 0; b < x->B && st == DA_SUCCESS; b++) {
      const int64_t s = (int64_t)l * x->B + b;
      st = da_kvcache_prefill(cache, s, x->lens[b], NULL, NULL);
      if (st == DA_SUCCESS)
        fill_pages(cache, s, da_verify_seed((uint64_t)x->o.seed, stream_of(x, l, b)), (int)x->G, x->D, x->dt, x->nth);
    }
  return st;
}

/* Phase, collective: memory ranks fill their pages. 0, or 1 when a memory rank failed. */
static int offload_fill(void *c) {
  orun_t *x = c;
  da_status_t st = DA_SUCCESS;
  x->t_fill = MPI_Wtime();
  if (x->is_mem) st = fill_cache(x, da_offload_cache(x->off));
  x->t_fill = MPI_Wtime() - x->t_fill;
  if (da_mpi_max_int(st != DA_SUCCESS)) {
    if (st != DA_SUCCESS) fprintf(stderr, "distattn decode: rank %d: prefill: %s\n", x->job.rank, da_last_error(x->job.ctx));
    return 1;
  }
  return 0;
}

/* Collective: rank 0 prints the header, every rank's role, group and budget, and the cache. */
static void print_layout(const orun_t *x) {
  const da_offload_info_t *in = &x->info;
  const int64_t micro = x->o.micro;
  if (x->job.rank == 0) {
    da_report_header(stdout, &x->cmd, x->nth);
    da_report_line(stdout,
                   "offload: %d compute + %d memory ranks, %d group%s; batch %lld per compute rank, %d layer%s, "
                   "%lld micro-batch%s, emulated compute %.3f ms per layer",
                   in->ncompute, in->nmemory, in->ngroups, in->ngroups == 1 ? "" : "s", (long long)x->B, x->L,
                   x->L == 1 ? "" : "s", (long long)micro, micro == 1 ? "" : "es", x->o.layer_ms);
  }
  double mine[4] = {(double)in->role, (double)in->group, in->budget, in->share}, *all = NULL;
  if (x->job.rank == 0) all = malloc((size_t)x->job.size * sizeof mine);
  MPI_Gather(mine, 4, MPI_DOUBLE, all, 4, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  for (int r = 0; x->job.rank == 0 && all && r < x->job.size; r++)
    da_report_line(stdout, " rank %3d  %-7s  group %d  budget %10.1f MiB%s", r, role_names[(int)all[4 * r]],
                   (int)all[4 * r + 1], all[4 * r + 2] / 1048576.0,
                   all[4 * r] == DA_ROLE_MEMORY ? "  shard share" : "");
  if (x->job.rank == 0 && all)
    da_report_line(stdout,
                   "kv cache: %.1f MiB per compute rank's sequences (all layers), largest memory shard %.1f MiB; "
                   "filled in %.2f s",
                   x->kv_local / 1048576.0, x->max_shard / 1048576.0, x->t_fill);
  free(all);
  fflush(stdout);
}

/* The sampled (step, layer, sequence) outputs, spread evenly over the timed run, and the
 * per-step and per-request measurements. */
static void alloc_results(orun_t *x) {
  const int64_t T = x->T, L = x->L, B = x->B, total = T * L * B, nreq = T * L * x->nmb;
  x->R = x->o.verify < total ? x->o.verify : total;
  x->samples = calloc((size_t)(x->R ? x->R : 1), sizeof *x->samples);
  for (int64_t i = 0; i < x->R; i++) {
    int64_t idx = x->R == 1 ? total - 1 : i * (total - 1) / (x->R - 1);
    sample_t *sm = &x->samples[i];
    sm->step = idx / (L * B), sm->layer = (idx / B) % L, sm->b = idx % B;
    sm->out = malloc((size_t)(x->H * x->D) * x->es), sm->lse = malloc((size_t)x->H * sizeof(float));
  }
  x->t_step = calloc((size_t)T, sizeof *x->t_step);
  latencies_t *lt = &x->lat;
  lt->send = calloc((size_t)nreq + 1, 8), lt->attn = calloc((size_t)nreq + 1, 8), lt->red = calloc((size_t)nreq + 1, 8);
  lt->recv = calloc((size_t)nreq + 1, 8), lt->tot = calloc((size_t)nreq + 1, 8);
}

/* ---- execute: memory ranks serve, compute ranks run the pipelined model loop ---- */

static da_status_t serve_memory(orun_t *x) {
  da_status_t st = da_offload_serve(x->off);
  if (st == DA_SUCCESS) return st;
  char why[1024]; /* before the stats call: a successful library call clears the context's error */
  snprintf(why, sizeof why, "%s", da_last_error(x->job.ctx));
  da_offload_stats_t os;
  da_offload_get_stats(x->off, &os);
  const int64_t per_step = (int64_t)x->L * x->nmb, done = (int64_t)os.requests;
  fprintf(stderr, "distattn decode: rank %d: step %lld: serve: %s\n", x->job.rank, (long long)(done / per_step), why);
  /* the compute rank cancelled because the job is ending: join the roll call now */
  if (st == DA_ERR_REMOTE) da_fault_abort("offload");
  return st;
}

/* A compute rank's buffers: the new tokens of one micro-batch, every layer's outputs of a step,
 * and the slot of every request in flight. */
typedef struct cbufs {
  char *q, *k, *v, *out;
  float *lse, *tmp;
  int *slot;     /* [L][nmb] */
  double per_mb; /* emulated compute per micro-batch, seconds */
} cbufs_t;

/* Layer l of micro-batch m is done: wait for its attention and, in a timed step, keep its
 * latencies and bytes. */
static da_status_t collect(orun_t *x, cbufs_t *c, int64_t it, int l, int64_t m) {
  const int64_t f = m * x->nmax, n = f + x->nmax <= x->B ? x->nmax : x->B - f, o = (int64_t)l * x->B + f;
  const int64_t sho[3] = {n, x->H, x->D}, shl[2] = {n, x->H};
  da_tensor_t to, tl;
  da_tensor_make(&to, c->out + (size_t)(o * x->H * x->D) * x->es, (da_dtype_t)x->dt, 3, sho);
  da_tensor_make(&tl, c->lse + o * x->H, DA_FLOAT32, 2, shl);
  DA_CHECK(da_offload_wait(x->off, c->slot[l * x->nmb + m], &to, &tl));
  da_offload_stats_t os;
  da_offload_get_stats(x->off, &os);
  if (it < x->W) return DA_SUCCESS;
  latencies_t *lt = &x->lat;
  lt->send[lt->n] = os.send_s, lt->attn[lt->n] = os.attn_s, lt->red[lt->n] = os.reduce_s, lt->recv[lt->n] = os.recv_s;
  lt->tot[lt->n++] = os.total_s;
  lt->net_bytes += (double)os.net_bytes, lt->kv_bytes += (double)os.kv_bytes;
  return DA_SUCCESS;
}

/* Layer l of micro-batch m: the emulated compute, then the new token's q, k, v sent off. */
static da_status_t post(orun_t *x, cbufs_t *c, int64_t it, int l, int64_t m) {
  const int64_t f = m * x->nmax, n = f + x->nmax <= x->B ? x->nmax : x->B - f;
  emulate_compute(x->off, c->per_mb);
  for (int64_t i = 0; i < n; i++)
    gen_token(da_verify_seed((uint64_t)x->o.seed, stream_of(x, l, f + i)), x->lens[f + i] + it, x->H, (int)x->G, x->D,
              x->dt, c->q, c->k, c->v, i, c->tmp);
  const int64_t shq[3] = {n, x->H, x->D}, shk[3] = {n, x->G, x->D};
  da_tensor_t tq, tk, tv;
  da_tensor_make(&tq, c->q, (da_dtype_t)x->dt, 3, shq);
  da_tensor_make(&tk, c->k, (da_dtype_t)x->dt, 3, shk), da_tensor_make(&tv, c->v, (da_dtype_t)x->dt, 3, shk);
  return da_offload_start(x->off, l, f, &tq, &tk, &tv, &c->slot[l * x->nmb + m]);
}

/* One step: every layer of every micro-batch, layer l + 1 of a micro-batch posted once its layer l
 * is back, so the next micro-batch's compute overlaps it. Stops early when another rank of the
 * job gave up (*gave_up: its rank). */
static da_status_t step_layers(orun_t *x, cbufs_t *c, int64_t it, int *gave_up) {
  for (int l = 0; l <= x->L; l++)
    for (int64_t m = 0; m < x->nmb; m++) {
      if (l > 0) DA_CHECK(collect(x, c, it, l - 1, m));
      if (l == x->L) continue;
      if ((*gave_up = da_fault_notice()) >= 0) return DA_SUCCESS;
      DA_CHECK(post(x, c, it, l, m));
    }
  return DA_SUCCESS;
}

/* Another group's failure ends the job: cancel this group's offload, so its memory ranks say why
 * they stop, and join the roll call. */
static _Noreturn void cancel_group(orun_t *x, int64_t it, int gave_up) {
  char why[160];
  snprintf(why, sizeof why, "rank %d of the job gave up waiting for a peer (its message says which)", gave_up);
  fprintf(stderr, "distattn decode: rank %d: step %lld: %s: cancelling the offload of group %d\n", x->job.rank,
          (long long)it, why, x->info.group);
  da_status_t cs = da_offload_cancel(x->off, why);
  if (cs != DA_SUCCESS) fprintf(stderr, "distattn decode: rank %d: cancel: %s\n", x->job.rank, da_last_error(x->job.ctx));
  da_fault_abort("offload");
}

/* Keep the outputs of timed step it that were sampled for verification. */
static void keep_samples(orun_t *x, const cbufs_t *c, int64_t it) {
  for (int64_t i = 0; i < x->R; i++) {
    sample_t *sm = &x->samples[i];
    if (sm->step != it - x->W) continue;
    const int64_t o = sm->layer * x->B + sm->b;
    sm->qpos = x->lens[sm->b] + it;
    memcpy(sm->out, c->out + (size_t)(o * x->H * x->D) * x->es, (size_t)(x->H * x->D) * x->es);
    memcpy(sm->lse, c->lse + o * x->H, (size_t)x->H * sizeof(float));
  }
}

static da_status_t compute_loop(orun_t *x) {
  const int H = x->H, D = x->D, L = x->L;
  const int64_t B = x->B, G = x->G;
  const size_t es = x->es;
  cbufs_t c = {.q = malloc((size_t)(B * H * D) * es),
               .k = malloc((size_t)(B * G * D) * es),
               .v = malloc((size_t)(B * G * D) * es),
               .out = malloc((size_t)(L * B * H * D) * es),
               .lse = malloc((size_t)(L * B * H) * sizeof(float)),
               .tmp = malloc((size_t)D * sizeof(float)),
               .slot = malloc((size_t)(L * x->nmb) * sizeof(int)),
               .per_mb = x->o.layer_ms * 1e-3 / (double)x->nmb};
  da_status_t st = DA_SUCCESS;
  for (int64_t it = 0; it < x->NS; it++) {
    const double t0 = MPI_Wtime();
    int gave_up = -1; /* a rank of the job that gave up waiting (another group's failure) */
    st = step_layers(x, &c, it, &gave_up);
    if (st != DA_SUCCESS) {
      fprintf(stderr, "distattn decode: rank %d: step %lld: %s\n", x->job.rank, (long long)it, da_last_error(x->job.ctx));
      break;
    }
    if (gave_up >= 0) cancel_group(x, it, gave_up);
    if (it < x->W) continue;
    x->t_step[it - x->W] = MPI_Wtime() - t0;
    keep_samples(x, &c, it);
  }
  /* after a timeout the group is broken: nothing more can be said to it */
  da_status_t s2 = st == DA_ERR_TIMEOUT ? DA_SUCCESS : da_offload_stop(x->off);
  if (st == DA_SUCCESS) st = s2;
  free(c.q), free(c.k), free(c.v), free(c.out), free(c.lse), free(c.tmp), free(c.slot);
  return st;
}

/* ---- baseline: the same loop with the cache on the compute rank (no offload) ---- */

typedef struct local_decode {
  da_comm_t *self;
  da_kvcache_t *cache;
  da_decode_plan_t *plan;
  char *q, *k, *v, *o; /* [L * B] rows: every layer's sequences */
  float *tmp;
  int64_t *ntok;
} local_decode_t;

/* One step of the local loop: per layer the emulated compute and the new token appended; then one
 * decode over all L * B streams (a plan over them decodes every layer at once, so the q of the
 * other layers' streams is that of their current last token: cost counted). */
static da_status_t baseline_step(const orun_t *x, local_decode_t *ld, int64_t it) {
  const int L = x->L;
  const int64_t B = x->B, LB = (int64_t)L * B;
  da_status_t bs = DA_SUCCESS;
  for (int l = 0; l < L && bs == DA_SUCCESS; l++) {
    emulate_compute(NULL, x->o.layer_ms * 1e-3);
    for (int64_t s = 0; s < LB; s++) ld->ntok[s] = s / B == l;
    for (int64_t b = 0; b < B; b++)
      gen_token(da_verify_seed((uint64_t)x->o.seed, stream_of(x, l, b)), x->lens[b] + it, x->H, (int)x->G, x->D, x->dt,
                ld->q, ld->k, ld->v, (int64_t)l * B + b, ld->tmp);
    da_tensor_t tk, tv;
    const int64_t shk[3] = {LB, x->G, x->D};
    da_tensor_make(&tk, ld->k, (da_dtype_t)x->dt, 3, shk), da_tensor_make(&tv, ld->v, (da_dtype_t)x->dt, 3, shk);
    bs = da_kvcache_append(ld->cache, ld->ntok, &tk, &tv);
    if (bs == DA_SUCCESS && l == L - 1) {
      da_tensor_t tq, to;
      const int64_t shq[3] = {LB, x->H, x->D};
      da_tensor_make(&tq, ld->q, (da_dtype_t)x->dt, 3, shq), da_tensor_make(&to, ld->o, (da_dtype_t)x->dt, 3, shq);
      bs = da_decode_step(ld->plan, ld->cache, &tq, &to, NULL, NULL);
    }
  }
  return bs;
}

/* A compute rank's tokens/s without offload: its cache, filled as the memory ranks fill theirs. */
static void run_baseline(orun_t *x) {
  const int64_t LB = (int64_t)x->L * x->B, rowq = (int64_t)x->H * x->D, rowk = x->G * x->D;
  local_decode_t ld = {0};
  da_problem_t pl = x->prob;
  pl.batch = LB;
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  kc.page = x->o.page;
  da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
  da_status_t bs = da_comm_create(x->job.ctx, MPI_COMM_SELF, &ld.self);
  if (bs == DA_SUCCESS) bs = da_kvcache_create(ld.self, &pl, &kc, &ld.cache);
  if (bs == DA_SUCCESS) bs = da_decode_plan_create(ld.self, &pl, &dc, &ld.plan);
  if (bs == DA_SUCCESS) bs = fill_cache(x, ld.cache);
  ld.q = malloc((size_t)(LB * rowq) * x->es), ld.k = malloc((size_t)(LB * rowk) * x->es);
  ld.v = malloc((size_t)(LB * rowk) * x->es), ld.o = malloc((size_t)(LB * rowq) * x->es);
  ld.tmp = malloc((size_t)x->D * sizeof(float));
  ld.ntok = calloc((size_t)LB, sizeof *ld.ntok);
  double t_all = 0;
  for (int64_t it = 0; it < x->NS && bs == DA_SUCCESS; it++) {
    const double t0 = MPI_Wtime();
    bs = baseline_step(x, &ld, it);
    if (it >= x->W) t_all += MPI_Wtime() - t0;
  }
  if (bs != DA_SUCCESS)
    fprintf(stderr, "distattn decode: rank %d: baseline: %s\n", x->job.rank, da_last_error(x->job.ctx));
  else
    x->base_tps = (double)(x->B * x->T) / t_all;
  free(ld.q), free(ld.k), free(ld.v), free(ld.o), free(ld.tmp), free(ld.ntok);
  da_decode_plan_free(ld.plan), da_kvcache_free(ld.cache), da_comm_free(ld.self);
}

/* Phase, collective (--baseline): the compute ranks whose cache fits --mem-budget run it; memory
 * ranks wait without spinning. */
static int offload_baseline(void *c) {
  orun_t *x = c;
  if (!x->o.baseline) return 0;
  if (!x->is_mem) {
    if (x->o.budget > 0 && x->kv_local > (double)x->o.budget)
      x->base_refused = 1;
    else
      run_baseline(x);
  }
  quiet_barrier();
  return 0;
}

/* ---- verify: the sampled rows of the compute ranks against float64 ---- */

/* Phase, collective: x->vs (rows, wrong) summed and x->vmax (abs, rel error) maxed over ranks. */
static int offload_verify(void *c) {
  orun_t *x = c;
  da_fault_point("verify");
  x->vs[0] = x->vs[1] = 0;
  x->vmax[0] = x->vmax[1] = 0;
  if (!x->is_mem) {
    const int H = x->H, D = x->D;
    const double tol = x->dt == DA_FLOAT32 ? 1e-4 : 2e-2;
    da_vprob_t vp = {.B = (int64_t)x->info.ngroups * x->L * x->B, .S = x->o.context, .seed = (uint64_t)x->o.seed};
    vp.kp.H = H, vp.kp.G = (int)x->G, vp.kp.D = D, vp.kp.scale = (float)(1.0 / sqrt((double)D));
    vp.kp.dtype = (da_dtype_t)x->dt, vp.kp.mask.flags = DA_MASK_NONE, vp.kp.nthreads = x->nth;
    double *ro = malloc((size_t)(H * D) * sizeof(double)), *rl = malloc((size_t)H * sizeof(double));
    for (int64_t i = 0; i < x->R; i++) {
      const sample_t *sm = &x->samples[i];
      da_vprob_t v1 = vp;
      v1.S = sm->qpos + 1;
      if (da_verify_fwd_row(&v1, stream_of(x, (int)sm->layer, sm->b), sm->qpos, ro, rl)) break;
      x->vs[0]++;
      for (int h = 0; h < H; h++) {
        double ae = 0, rel = da_verify_rel(sm->out, (da_dtype_t)x->dt, (int64_t)h * D, ro + h * D, D, &ae);
        double lrel = fabs((double)sm->lse[h] - rl[h]) / fmax(1.0, fabs(rl[h]));
        if (!(rel <= tol) || !(lrel <= tol)) x->vs[1]++;
        x->vmax[0] = fmax(x->vmax[0], ae), x->vmax[1] = fmax(x->vmax[1], fmax(rel, lrel));
      }
    }
    free(ro), free(rl);
  }
  MPI_Allreduce(MPI_IN_PLACE, x->vs, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, x->vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return 0;
}

/* ---- report ---- */

/* Collective: per compute rank, then max (times) / sum (bytes, tokens) over compute ranks. */
static figures_t reduce_figures(orun_t *x) {
  figures_t fg = {{0}, {0}, 0, 0, 0, 0};
  const latencies_t *lt = &x->lat;
  const int64_t T = x->T;
  if (!x->is_mem && lt->n > 0) {
    double tt = 0;
    for (int64_t s = 0; s < T; s++) tt += x->t_step[s];
    fg.med[0] = da_median(lt->send, lt->n), fg.med[1] = da_median(lt->attn, lt->n);
    fg.med[2] = da_median(lt->red, lt->n), fg.med[3] = da_median(lt->recv, lt->n),
    fg.med[4] = da_median(lt->tot, lt->n);
    fg.sum[0] = lt->net_bytes / (double)T, fg.sum[1] = lt->kv_bytes / (double)T, fg.sum[2] = (double)(x->B * T) / tt;
    fg.sum[3] = isnan(x->base_tps) ? 0 : x->base_tps;
  }
  double step_p99 = 0;
  if (!x->is_mem) fg.step_med = da_median(x->t_step, T), step_p99 = da_p99(x->t_step, T);
  fg.med[5] = step_p99;
  MPI_Allreduce(MPI_IN_PLACE, fg.med, 6, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, fg.sum, 4, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &fg.step_med, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  fg.refused_any = da_mpi_max_int(x->base_refused);
  fg.ratio = fg.sum[1] > 0 ? fg.sum[0] / fg.sum[1] : NAN;
  fg.lamina = 2.0 / (double)x->o.context;
  return fg;
}

static void print_table(const orun_t *x, const figures_t *fg) {
  static const char *const names[] = {"ranks",   "context",   "batch",   "heads",   "kv",     "dim",
                                      "layers",  "mb",        "steps",   "med_ms",  "p99_ms", "send_ms",
                                      "attn_ms", "red_ms",    "recv_ms", "net_KB",  "kv_MB",  "net/kv",
                                      "tok/s",   "tok/s_loc", "rows",    "max_rel", "wrong"};
  static const int widths[] = {6, 9, 5, 5, 3, 4, 6, 3, 5, 9, 9, 8, 8, 8, 8, 9, 9, 9, 9, 9, 5, 9, 6};
  char ranks[32];
  snprintf(ranks, sizeof ranks, "%d+%d", x->info.ncompute, x->info.nmemory);
  da_table_t tb;
  da_table_init(&tb, stdout, 23, names, widths);
  da_table_print_header(&tb);
  da_table_str(&tb, ranks), da_table_int(&tb, x->o.context), da_table_int(&tb, x->B), da_table_int(&tb, x->H);
  da_table_int(&tb, x->G), da_table_int(&tb, x->D), da_table_int(&tb, x->L), da_table_int(&tb, x->nmb);
  da_table_int(&tb, x->T);
  da_table_dbl(&tb, fg->step_med * 1e3, 3, 0), da_table_dbl(&tb, fg->med[5] * 1e3, 3, 0);
  for (int i = 0; i < 4; i++) da_table_dbl(&tb, fg->med[i] * 1e3, 3, 0);
  da_table_dbl(&tb, fg->sum[0] / 1024.0, 2, 0), da_table_dbl(&tb, fg->sum[1] / 1048576.0, 2, 0);
  da_table_dbl(&tb, fg->ratio, 2, 1), da_table_dbl(&tb, fg->sum[2], 1, 0);
  if (x->o.baseline && !fg->refused_any)
    da_table_dbl(&tb, fg->sum[3], 1, 0);
  else
    da_table_str(&tb, fg->refused_any ? "no-fit" : "-");
  da_table_int(&tb, x->vs[0]), da_table_dbl(&tb, x->R ? x->vmax[1] : NAN, 2, 1), da_table_int(&tb, x->vs[1]);
  da_table_end_row(&tb);
  da_report_line(stdout,
                 "per request (layer x micro-batch), median: send %.3f, remote attention %.3f, reduce %.3f, "
                 "receive %.3f ms (total %.3f ms)",
                 fg->med[0] * 1e3, fg->med[1] * 1e3, fg->med[2] * 1e3, fg->med[3] * 1e3, fg->med[4] * 1e3);
  da_report_line(stdout, "network bytes / KV bytes read = %.3g (Lamina's estimate 2/L = %.3g at L = %lld)", fg->ratio,
                 fg->lamina, (long long)x->o.context);
  if (x->o.baseline)
    da_report_line(stdout, "without offload: %s",
                   fg->refused_any ? "refused on a compute rank: its KV cache exceeds --mem-budget"
                                   : "tok/s_loc = the same loop with the cache on the compute rank");
}

/* The JSON record (--json), appended by rank 0. 0 on success. */
static int json_record(const orun_t *x, const figures_t *fg) {
  da_json_t j;
  da_json_begin(&j);
  da_json_str(&j, "cmd", "decode"), da_json_str(&j, "algo", "offload");
  da_json_int(&j, "ranks", x->job.size), da_json_int(&j, "compute_ranks", x->info.ncompute);
  da_json_int(&j, "memory_ranks", x->info.nmemory);
  da_json_int(&j, "context", x->o.context), da_json_int(&j, "batch", x->B), da_json_int(&j, "heads", x->H);
  da_json_int(&j, "kv_heads", x->G), da_json_int(&j, "dim", x->D), da_json_str(&j, "mask", "causal");
  da_json_str(&j, "dtype", da_dtype_names[x->dt]), da_json_str(&j, "device", "cpu");
  da_json_int(&j, "layers", x->L), da_json_int(&j, "microbatches", x->nmb);
  da_json_dbl(&j, "layer_compute_ms", x->o.layer_ms), da_json_int(&j, "steps", x->T);
  da_json_dbl(&j, "step_median_s", fg->step_med), da_json_dbl(&j, "step_p99_s", fg->med[5]);
  da_json_dbl(&j, "send_median_s", fg->med[0]), da_json_dbl(&j, "remote_attention_median_s", fg->med[1]);
  da_json_dbl(&j, "reduce_median_s", fg->med[2]), da_json_dbl(&j, "receive_median_s", fg->med[3]);
  da_json_dbl(&j, "request_median_s", fg->med[4]);
  da_json_dbl(&j, "net_bytes_per_step", fg->sum[0]), da_json_dbl(&j, "kv_bytes_per_step", fg->sum[1]);
  da_json_dbl(&j, "net_over_kv", fg->ratio), da_json_dbl(&j, "lamina_2_over_L", fg->lamina);
  da_json_dbl(&j, "tokens_per_s", fg->sum[2]);
  if (x->o.baseline && !fg->refused_any)
    da_json_dbl(&j, "tokens_per_s_local", fg->sum[3]);
  else
    da_json_str(&j, "tokens_per_s_local", NULL);
  da_json_check(&j, x->vs[0], x->vmax[0], x->vmax[1], x->vs[1], x->R != 0);
  da_json_common(&j, NULL);
  int rc = da_json_append(&j, x->o.json);
  da_json_free(&j);
  return rc;
}

/* Phase, collective: the figures, rank 0's table, record and footer; the exit code every rank
 * agrees on. */
static int offload_report(void *c) {
  orun_t *x = c;
  const figures_t fg = reduce_figures(x);
  int rc = 0;
  if (x->job.rank == 0) {
    print_table(x, &fg);
    if (x->o.json && json_record(x, &fg)) rc = 1;
    if (da_report_footer(stdout, x->vs[1], rc == 0)) rc = rc ? rc : 1;
    fflush(stdout);
  }
  if (x->vs[1] > 0 && !rc) rc = 1;
  return da_mpi_max_int(rc);
}

/* Phase, collective: memory ranks serve while compute ranks run the model loop; every rank learns
 * whether any failed. */
static int offload_execute(void *c) {
  orun_t *x = c;
  print_layout(x);
  alloc_results(x);
  MPI_Barrier(MPI_COMM_WORLD);
  da_fault_point("forward");
  const da_status_t st = x->is_mem ? serve_memory(x) : compute_loop(x);
  return da_mpi_max_int(st != DA_SUCCESS) ? 1 : 0;
}

/* What parse and the phases made; the job's context and communicator are da_mpi_cmd_main's. */
static void offload_release(void *c) {
  orun_t *x = c;
  for (int64_t i = 0; x->samples && i < x->R; i++) free(x->samples[i].out), free(x->samples[i].lse);
  free(x->samples), free(x->t_step);
  free(x->lat.send), free(x->lat.attn), free(x->lat.red), free(x->lat.recv), free(x->lat.tot);
  da_offload_free(x->off);
  free(x->lens);
}

static const da_cmdspec_t *offload_spec(void *c) { return &((orun_t *)c)->cmd; }

static const da_phase_fn offload_phases[] = {offload_setup,  offload_fill,   offload_execute, offload_baseline,
                                             offload_verify, offload_report, NULL};

int da_cmd_offload(int argc, char **argv) {
  static const da_mpi_cmd_t spec = {
      .name = "decode", .parse = offload_parse, .phases = offload_phases, .release = offload_release, .spec = offload_spec, .size = sizeof(orun_t)};
  orun_t x;
  memset(&x, 0, sizeof x);
  return da_mpi_cmd_main(&spec, &x.job, &x, argc, argv);
}
