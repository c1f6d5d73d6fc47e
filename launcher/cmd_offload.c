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
 * stops. Not a library layer: it may exit. */
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
#include "fault.h"
#include "report.h"
#include "rng.h"
#include "verify.h"

static const char *const role_names[] = {"compute", "memory", NULL};
static const char *const dtype_names[] = {"fp32", "bf16", "fp16", NULL};

static int g_rank, g_size;

/* The other layers of the model: busy for `s` seconds, driving the offload's progress meanwhile
 * (no helper thread: MPI progresses in our calls). */
static void emulate_compute(da_offload_t *off, double s) {
  const double end = da_time_now() + s;
  volatile double x = 1.0;
  while (da_time_now() < end) {
    for (int i = 0; i < 200; i++) x = x * 1.0000001 + 1e-9;
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
    struct timespec ts = {0, 1000000};
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

int da_cmd_offload(int argc, char **argv) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) MPI_Init(NULL, NULL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);

  int offload = 0, role = -1, dtype = 0, baseline = 0;
  int64_t context = 0, heads = 0, kv_heads = 0, dim = 0, batch = 1, steps = 8, warmup = 1, verify = 4, page = 256;
  int64_t seed = 1, threads = 0, layers = 1, micro = 1, budget = 0;
  double layer_ms = 0, timeout = 0;
  const char *lengths = NULL, *json = NULL;
  da_opt_t opts[] = {
      {.name = "offload", .type = DA_OPT_FLAG, .dest = &offload, .help = "offload attention to memory ranks"},
      {.name = "role", .type = DA_OPT_ENUM, .dest = &role, .help = "this rank's role (required with --offload)",
       .choices = role_names},
      {.name = "mem-budget", .type = DA_OPT_SIZE, .dest = &budget,
       .help = "bytes of KV cache this rank may hold (0 = free memory from sysinfo)", .min = 0, .max = 1LL << 50},
      {.name = "context", .type = DA_OPT_SIZE, .dest = &context, .help = "tokens per sequence before the first step",
       .min = 1, .max = 1LL << 34},
      {.name = "lengths", .type = DA_OPT_STRING, .dest = &lengths, .metavar = "L1,L2,..",
       .help = "per-sequence context lengths (B values)"},
      {.name = "heads", .type = DA_OPT_INT, .dest = &heads, .help = "query heads H (required)", .min = 1, .max = 65536},
      {.name = "kv-heads", .type = DA_OPT_INT, .dest = &kv_heads, .help = "KV heads G (0 = H)", .min = 0, .max = 65536},
      {.name = "dim", .type = DA_OPT_INT, .dest = &dim, .help = "head dim D (required)", .min = 1, .max = 4096},
      {.name = "batch", .type = DA_OPT_INT, .dest = &batch, .help = "sequences per compute rank", .min = 1, .max = 1 << 20},
      {.name = "layers", .type = DA_OPT_INT, .dest = &layers, .help = "model layers (one KV cache each)", .min = 1,
       .max = 1024},
      {.name = "microbatches", .type = DA_OPT_INT, .dest = &micro,
       .help = "micro-batches per step (pipelining: 1 = none)", .min = 1, .max = 1 << 20},
      {.name = "layer-compute", .type = DA_OPT_DOUBLE, .dest = &layer_ms,
       .help = "emulated compute per layer per step for the whole batch (ms)", .dmin = 0, .dmax = 1e6},
      {.name = "baseline", .type = DA_OPT_FLAG, .dest = &baseline,
       .help = "also decode locally on the compute ranks (tokens/s without offload), when it fits --mem-budget"},
      {.name = "steps", .type = DA_OPT_INT, .dest = &steps, .help = "timed steps", .min = 1, .max = 1 << 20},
      {.name = "warmup", .type = DA_OPT_INT, .dest = &warmup, .help = "untimed steps first", .min = 0, .max = 1 << 20},
      {.name = "verify", .type = DA_OPT_INT, .dest = &verify, .help = "sampled rows checked in float64", .min = 0,
       .max = 1 << 20},
      {.name = "page", .type = DA_OPT_SIZE, .dest = &page, .help = "tokens per KV page", .min = 1, .max = 1LL << 30},
      {.name = "dtype", .type = DA_OPT_ENUM, .dest = &dtype, .help = "storage dtype", .choices = dtype_names},
      {.name = "seed", .type = DA_OPT_INT, .dest = &seed, .help = "seed of the inputs", .min = 0, .max = INT64_MAX},
      {.name = "threads", .type = DA_OPT_INT, .dest = &threads, .help = "kernel threads per rank (0 = 1)", .min = 0,
       .max = 4096},
      {.name = "json", .type = DA_OPT_STRING, .dest = &json, .metavar = "FILE", .help = "append one JSON object"},
      {.name = "timeout", .type = DA_OPT_DOUBLE, .dest = &timeout, .help = "seconds to wait for a peer", .dmin = 0,
       .dmax = 1e6},
      {0},
  };
  da_cmdspec_t cmd = {.name = "decode --offload",
                      .summary = "decode with attention offloaded to memory ranks (Lamina): give each rank --role",
                      .opts = opts};
  /* Ranks of different roles have different command lines: each parses its own and speaks for
   * itself. */
  int prc = da_args_parse(&cmd, argc, argv);
  int64_t G = kv_heads ? kv_heads : heads;
  int64_t *lens = calloc((size_t)batch, sizeof *lens);
  if (prc == DA_ARGS_OK) {
    if (!da_args_find(opts, "context")->given && !lengths) prc = da_args_error(&cmd, "--context is required");
    else if (!heads || !dim) prc = da_args_error(&cmd, "--heads and --dim are required");
    else if (heads % G) prc = da_args_error(&cmd, "--heads %lld is not a multiple of --kv-heads %lld", (long long)heads, (long long)G);
    else if (lengths && da_parse_size_list(lengths, lens, batch))
      prc = da_args_error(&cmd, "--lengths '%s': expected %lld sizes", lengths, (long long)batch);
    else if (json && da_json_check_path(json)) prc = DA_ARGS_USAGE;
    if (prc == DA_ARGS_OK && !lengths)
      for (int64_t b = 0; b < batch; b++) lens[b] = context;
    if (lengths) context = lens[0];
  }
  prc = da_mpi_max_int(prc);
  if (prc != DA_ARGS_OK) {
    free(lens);
    MPI_Finalize();
    return prc == DA_ARGS_HELP ? 0 : 2;
  }
  if (!offload && g_rank == 0) fprintf(stderr, "distattn decode: --role given: running with --offload\n");

  const int H = (int)heads, D = (int)dim, L = (int)layers, dt = dtype;
  const int64_t B = batch, T = steps, W = warmup, NS = T + W;
  const size_t es = da_dtype_size((da_dtype_t)dt);
  const int nth = threads ? (int)threads : 1;
  int rc = 0;
  da_context_t *ctx = NULL;
  da_comm_t *wcomm = NULL;
  da_offload_t *off = NULL;
  da_config_t ccfg = DA_CONFIG_INITIALIZER;
  ccfg.nthreads = nth;
  da_status_t st = da_context_create(&ccfg, &ctx);
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.seq = context, prob.heads = H, prob.kv_heads = G, prob.dim = D, prob.dtype = (da_dtype_t)dt;
  prob.mask = DA_MASK_CAUSAL;
  da_offload_config_t ocfg = DA_OFFLOAD_CONFIG_INITIALIZER;
  ocfg.page = page, ocfg.layers = L, ocfg.microbatches = (int)micro, ocfg.mem_budget = (double)budget;
  ocfg.timeout = timeout;
  if (st == DA_SUCCESS) st = da_comm_create(ctx, MPI_COMM_WORLD, &wcomm);
  if (st == DA_SUCCESS) st = da_offload_create(wcomm, role < 0 ? DA_ROLE_NONE : (da_role_t)role, &prob, &ocfg, &off);
  if (da_mpi_max_int(st != DA_SUCCESS)) { /* role errors reach every rank: each says it */
    fprintf(stderr, "distattn decode: rank %d: offload: %s: %s\n", g_rank, da_status_string(st), da_last_error(ctx));
    rc = st == DA_ERR_INVALID_ARGUMENT || st == DA_ERR_MISMATCH ? 2 : 1;
    goto out_early;
  }
  da_offload_info_t info;
  da_offload_get_info(off, &info);
  const int is_mem = info.role == DA_ROLE_MEMORY;
  int64_t *fin = malloc((size_t)B * sizeof *fin);
  for (int64_t b = 0; b < B; b++) fin[b] = lens[b] + NS;
  double max_shard = 0;
  st = da_offload_check_fit(off, fin, &max_shard);
  if (st != DA_SUCCESS) {
    if (g_rank == 0) fprintf(stderr, "distattn decode: %s\n", da_last_error(ctx));
    rc = 2;
    free(fin);
    goto out;
  }
  const double kv_local = da_offload_kv_bytes(&prob, L, fin); /* one compute rank's KV without offload */
  const uint64_t nstreams = (uint64_t)info.ngroups * (uint64_t)L * (uint64_t)B;
  free(fin);

  /* ---- memory ranks: fill and serve ---- */
  double t_fill = MPI_Wtime();
  if (is_mem) {
    da_kvcache_t *cache = da_offload_cache(off);
    for (int l = 0; l < L && st == DA_SUCCESS; l++)
      for (int64_t b = 0; b < B && st == DA_SUCCESS; b++) {
        const int64_t s = (int64_t)l * B + b, idx = ((int64_t)info.group * L + l) * B + b;
        st = da_kvcache_prefill(cache, s, lens[b], NULL, NULL);
        if (st == DA_SUCCESS) fill_pages(cache, s, da_verify_seed((uint64_t)seed, idx), (int)G, D, dt, nth);
      }
  }
  t_fill = MPI_Wtime() - t_fill;
  if (da_mpi_max_int(st != DA_SUCCESS)) {
    if (st != DA_SUCCESS) fprintf(stderr, "distattn decode: rank %d: prefill: %s\n", g_rank, da_last_error(ctx));
    rc = 1;
    goto out;
  }
  if (g_rank == 0) {
    da_report_header(stdout, &cmd, nth);
    da_report_line(stdout, "offload: %d compute + %d memory ranks, %d group%s; batch %lld per compute rank, %d layer%s, "
                           "%lld micro-batch%s, emulated compute %.3f ms per layer", info.ncompute, info.nmemory,
                   info.ngroups, info.ngroups == 1 ? "" : "s", (long long)B, L, L == 1 ? "" : "s", (long long)micro,
                   micro == 1 ? "" : "es", layer_ms);
  }
  {
    double mine[4] = {(double)info.role, (double)info.group, info.budget, info.share}, *all = NULL;
    if (g_rank == 0) all = malloc((size_t)g_size * sizeof mine);
    MPI_Gather(mine, 4, MPI_DOUBLE, all, 4, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    for (int r = 0; g_rank == 0 && all && r < g_size; r++)
      da_report_line(stdout, " rank %3d  %-7s  group %d  budget %10.1f MiB%s", r, role_names[(int)all[4 * r]],
                     (int)all[4 * r + 1], all[4 * r + 2] / 1048576.0,
                     all[4 * r] == DA_ROLE_MEMORY ? "  shard share" : "");
    if (g_rank == 0 && all) {
      da_report_line(stdout, "kv cache: %.1f MiB per compute rank's sequences (all layers), largest memory shard %.1f MiB; "
                             "filled in %.2f s", kv_local / 1048576.0, max_shard / 1048576.0, t_fill);
    }
    free(all);
    fflush(stdout);
  }

  /* ---- compute ranks: the pipelined model loop ---- */
  const int64_t nmax = (B + micro - 1) / micro, nmb = (B + nmax - 1) / nmax;
  const int64_t R = verify < T * L * B ? verify : T * L * B;
  sample_t *samples = calloc((size_t)(R ? R : 1), sizeof *samples);
  double *t_step = calloc((size_t)T, sizeof *t_step);
  const int64_t nreq = T * L * nmb;
  double *r_send = calloc((size_t)nreq + 1, 8), *r_attn = calloc((size_t)nreq + 1, 8), *r_red = calloc((size_t)nreq + 1, 8),
         *r_recv = calloc((size_t)nreq + 1, 8), *r_tot = calloc((size_t)nreq + 1, 8);
  double net_bytes = 0, kv_bytes = 0;
  int64_t nr = 0;
  for (int64_t i = 0; i < R; i++) {
    int64_t idx = R == 1 ? T * L * B - 1 : i * (T * L * B - 1) / (R - 1);
    samples[i].step = idx / (L * B), samples[i].layer = (idx / B) % L, samples[i].b = idx % B;
    samples[i].out = malloc((size_t)(H * D) * es), samples[i].lse = malloc((size_t)H * sizeof(float));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (is_mem) {
    st = da_offload_serve(off);
    if (st != DA_SUCCESS) {
      da_offload_stats_t os;
      da_offload_get_stats(off, &os);
      const int64_t per_step = (int64_t)L * nmb, done = (int64_t)os.requests;
      fprintf(stderr, "distattn decode: rank %d: step %lld: serve: %s\n", g_rank,
              (long long)(done / per_step), da_last_error(ctx));
      /* the compute rank cancelled because the job is ending: join the roll call now */
      if (st == DA_ERR_REMOTE) da_fault_abort("offload");
    }
  } else {
    char *q = malloc((size_t)(B * H * D) * es), *k = malloc((size_t)(B * G * D) * es), *v = malloc((size_t)(B * G * D) * es);
    char *out = malloc((size_t)(L * B * H * D) * es);
    float *lse = malloc((size_t)(L * B * H) * sizeof(float)), *tmp = malloc((size_t)D * sizeof(float));
    int *slot = malloc((size_t)(L * nmb) * sizeof *slot);
    const double per_mb = layer_ms * 1e-3 / (double)nmb;
    int gave_up = -1; /* a rank of the job that gave up waiting (another group's failure) */
    for (int64_t it = 0; it < NS && st == DA_SUCCESS && gave_up < 0; it++) {
      const double t0 = MPI_Wtime();
      for (int l = 0; l <= L && st == DA_SUCCESS && gave_up < 0; l++)
        for (int64_t m = 0; m < nmb && st == DA_SUCCESS && gave_up < 0; m++) {
          const int64_t f = m * nmax, n = f + nmax <= B ? nmax : B - f;
          if (l > 0) { /* layer l of micro-batch m needs its attention of layer l - 1 */
            const int64_t o = (int64_t)(l - 1) * B + f, sho[3] = {n, H, D}, shl[2] = {n, H};
            da_tensor_t to, tl;
            da_tensor_make(&to, out + (size_t)(o * H * D) * es, (da_dtype_t)dt, 3, sho);
            da_tensor_make(&tl, lse + o * H, DA_FLOAT32, 2, shl);
            st = da_offload_wait(off, slot[(l - 1) * nmb + m], &to, &tl);
            if (st != DA_SUCCESS) break;
            da_offload_stats_t os;
            da_offload_get_stats(off, &os);
            if (it >= W) {
              r_send[nr] = os.send_s, r_attn[nr] = os.attn_s, r_red[nr] = os.reduce_s, r_recv[nr] = os.recv_s;
              r_tot[nr++] = os.total_s;
              net_bytes += (double)os.net_bytes, kv_bytes += (double)os.kv_bytes;
            }
          }
          if (l == L) continue;
          if ((gave_up = da_fault_notice()) >= 0) break;
          emulate_compute(off, per_mb);
          for (int64_t i = 0; i < n; i++) {
            const int64_t b = f + i, idx = ((int64_t)info.group * L + l) * B + b;
            gen_token(da_verify_seed((uint64_t)seed, idx), lens[b] + it, H, (int)G, D, dt, q, k, v, i, tmp);
          }
          const int64_t shq[3] = {n, H, D}, shk[3] = {n, G, D};
          da_tensor_t tq, tk, tv;
          da_tensor_make(&tq, q, (da_dtype_t)dt, 3, shq);
          da_tensor_make(&tk, k, (da_dtype_t)dt, 3, shk), da_tensor_make(&tv, v, (da_dtype_t)dt, 3, shk);
          st = da_offload_start(off, l, f, &tq, &tk, &tv, &slot[l * nmb + m]);
        }
      if (st != DA_SUCCESS) {
        fprintf(stderr, "distattn decode: rank %d: step %lld: %s\n", g_rank, (long long)it, da_last_error(ctx));
        break;
      }
      if (gave_up >= 0) {
        char why[160];
        snprintf(why, sizeof why, "rank %d of the job gave up waiting for a peer (its message says which)", gave_up);
        fprintf(stderr, "distattn decode: rank %d: step %lld: %s: cancelling the offload of group %d\n", g_rank,
                (long long)it, why, info.group);
        da_status_t cs = da_offload_cancel(off, why);
        if (cs != DA_SUCCESS) fprintf(stderr, "distattn decode: rank %d: cancel: %s\n", g_rank, da_last_error(ctx));
        da_fault_abort("offload");
      }
      if (it < W) continue;
      t_step[it - W] = MPI_Wtime() - t0;
      for (int64_t i = 0; i < R; i++)
        if (samples[i].step == it - W) {
          const int64_t o = samples[i].layer * B + samples[i].b;
          samples[i].qpos = lens[samples[i].b] + it;
          memcpy(samples[i].out, out + (size_t)(o * H * D) * es, (size_t)(H * D) * es);
          memcpy(samples[i].lse, lse + o * H, (size_t)H * sizeof(float));
        }
    }
    /* after a timeout the group is broken: nothing more can be said to it */
    da_status_t s2 = st == DA_ERR_TIMEOUT ? DA_SUCCESS : da_offload_stop(off);
    if (st == DA_SUCCESS) st = s2;
    free(q), free(k), free(v), free(out), free(lse), free(tmp), free(slot);
  }
  if (da_mpi_max_int(st != DA_SUCCESS)) {
    rc = 1;
    goto out;
  }

  /* ---- baseline: the same loop with the cache on the compute rank (no offload) ---- */
  double base_tps = NAN;
  int base_refused = 0;
  if (baseline) {
    if (!is_mem) {
      if (budget > 0 && kv_local > (double)budget) {
        base_refused = 1;
      } else {
        da_comm_t *self = NULL;
        da_kvcache_t *cache = NULL;
        da_decode_plan_t *plan = NULL;
        da_problem_t pl = prob;
        pl.batch = (int64_t)L * B;
        da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
        kc.page = page;
        da_status_t bs = da_comm_create(ctx, MPI_COMM_SELF, &self);
        if (bs == DA_SUCCESS) bs = da_kvcache_create(self, &pl, &kc, &cache);
        da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
        if (bs == DA_SUCCESS) bs = da_decode_plan_create(self, &pl, &dc, &plan);
        for (int l = 0; l < L && bs == DA_SUCCESS; l++)
          for (int64_t b = 0; b < B && bs == DA_SUCCESS; b++) {
            const int64_t s = (int64_t)l * B + b, idx = ((int64_t)info.group * L + l) * B + b;
            bs = da_kvcache_prefill(cache, s, lens[b], NULL, NULL);
            if (bs == DA_SUCCESS) fill_pages(cache, s, da_verify_seed((uint64_t)seed, idx), (int)G, D, dt, nth);
          }
        char *q = malloc((size_t)(L * B * H * D) * es), *k = malloc((size_t)(L * B * G * D) * es);
        char *v = malloc((size_t)(L * B * G * D) * es), *o = malloc((size_t)(L * B * H * D) * es);
        float *tmp = malloc((size_t)D * sizeof(float));
        int64_t *ntok = calloc((size_t)(L * B), sizeof *ntok);
        double t_all = 0;
        for (int64_t it = 0; it < NS && bs == DA_SUCCESS; it++) {
          const double t0 = MPI_Wtime();
          for (int l = 0; l < L && bs == DA_SUCCESS; l++) {
            emulate_compute(NULL, layer_ms * 1e-3);
            for (int64_t s = 0; s < L * B; s++) ntok[s] = s / B == l;
            for (int64_t b = 0; b < B; b++) {
              const int64_t s = (int64_t)l * B + b, idx = ((int64_t)info.group * L + l) * B + b;
              gen_token(da_verify_seed((uint64_t)seed, idx), lens[b] + it, H, (int)G, D, dt, q, k, v, s, tmp);
            }
            da_tensor_t tk, tv;
            const int64_t shk[3] = {L * B, G, D};
            da_tensor_make(&tk, k, (da_dtype_t)dt, 3, shk), da_tensor_make(&tv, v, (da_dtype_t)dt, 3, shk);
            bs = da_kvcache_append(cache, ntok, &tk, &tv);
            /* decode this layer's sequences: a plan over all L * B streams would decode every layer, so
             * the q of the other layers' streams is that of their current last token (cost counted) */
            if (bs == DA_SUCCESS && l == L - 1) {
              da_tensor_t tq, to;
              const int64_t shq[3] = {L * B, H, D};
              da_tensor_make(&tq, q, (da_dtype_t)dt, 3, shq), da_tensor_make(&to, o, (da_dtype_t)dt, 3, shq);
              bs = da_decode_step(plan, cache, &tq, &to, NULL, NULL);
            }
          }
          if (it >= W) t_all += MPI_Wtime() - t0;
        }
        if (bs != DA_SUCCESS) fprintf(stderr, "distattn decode: rank %d: baseline: %s\n", g_rank, da_last_error(ctx));
        else base_tps = (double)(B * T) / t_all;
        free(q), free(k), free(v), free(o), free(tmp), free(ntok);
        da_decode_plan_free(plan), da_kvcache_free(cache), da_comm_free(self);
      }
    }
    quiet_barrier();
  }

  /* ---- verification on the compute ranks ---- */
  int64_t vrows = 0, vwrong = 0;
  double vmax[2] = {0, 0};
  if (!is_mem) {
    const double tol = dt == DA_FLOAT32 ? 1e-4 : 2e-2;
    da_vprob_t vp = {.B = (int64_t)nstreams, .S = context, .seed = (uint64_t)seed};
    vp.kp.H = H, vp.kp.G = (int)G, vp.kp.D = D, vp.kp.scale = (float)(1.0 / sqrt((double)D));
    vp.kp.dtype = (da_dtype_t)dt, vp.kp.mask.flags = DA_MASK_NONE, vp.kp.nthreads = nth;
    double *ro = malloc((size_t)(H * D) * sizeof(double)), *rl = malloc((size_t)H * sizeof(double));
    for (int64_t i = 0; i < R; i++) {
      sample_t *sm = &samples[i];
      const int64_t idx = ((int64_t)info.group * L + sm->layer) * B + sm->b;
      da_vprob_t v1 = vp;
      v1.S = sm->qpos + 1;
      if (da_verify_fwd_row(&v1, idx, sm->qpos, ro, rl)) break;
      vrows++;
      for (int h = 0; h < H; h++) {
        double ae = 0, rel = da_verify_rel(sm->out, (da_dtype_t)dt, (int64_t)h * D, ro + h * D, D, &ae);
        double lrel = fabs((double)sm->lse[h] - rl[h]) / fmax(1.0, fabs(rl[h]));
        if (!(rel <= tol) || !(lrel <= tol)) vwrong++;
        vmax[0] = fmax(vmax[0], ae), vmax[1] = fmax(vmax[1], fmax(rel, lrel));
      }
    }
    free(ro), free(rl);
  }
  int64_t vs[2] = {vrows, vwrong};
  MPI_Allreduce(MPI_IN_PLACE, vs, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, vmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

  /* ---- figures: per compute rank, then max (times) / sum (bytes, tokens) over compute ranks ---- */
  double med[6] = {0}, sum[4] = {0};
  if (!is_mem && nr > 0) {
    double tt = 0;
    for (int64_t s = 0; s < T; s++) tt += t_step[s];
    med[0] = da_median(r_send, nr), med[1] = da_median(r_attn, nr), med[2] = da_median(r_red, nr), med[3] = da_median(r_recv, nr);
    med[4] = da_median(r_tot, nr);
    sum[0] = net_bytes / (double)T, sum[1] = kv_bytes / (double)T, sum[2] = (double)(B * T) / tt;
    sum[3] = isnan(base_tps) ? 0 : base_tps;
  }
  double step_med = 0, step_p99 = 0;
  if (!is_mem) step_med = da_median(t_step, T), step_p99 = da_p99(t_step, T);
  med[5] = step_p99;
  MPI_Allreduce(MPI_IN_PLACE, med, 6, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, sum, 4, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &step_med, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  int refused_any = da_mpi_max_int(base_refused);
  const double ratio = sum[1] > 0 ? sum[0] / sum[1] : NAN;
  const double lamina = 2.0 / (double)context;
  if (g_rank == 0) {
    static const char *const names[] = {"ranks", "context", "batch", "heads", "kv", "dim", "layers", "mb", "steps",
                                        "med_ms", "p99_ms", "send_ms", "attn_ms", "red_ms", "recv_ms", "net_KB",
                                        "kv_MB", "net/kv", "tok/s", "tok/s_loc", "rows", "max_rel", "wrong"};
    static const int widths[] = {6, 9, 5, 5, 3, 4, 6, 3, 5, 9, 9, 8, 8, 8, 8, 9, 9, 9, 9, 9, 5, 9, 6};
    char ranks[32];
    snprintf(ranks, sizeof ranks, "%d+%d", info.ncompute, info.nmemory);
    da_table_t tb;
    da_table_init(&tb, stdout, 23, names, widths);
    da_table_print_header(&tb);
    da_table_str(&tb, ranks), da_table_int(&tb, context), da_table_int(&tb, B), da_table_int(&tb, H);
    da_table_int(&tb, G), da_table_int(&tb, D), da_table_int(&tb, L), da_table_int(&tb, nmb), da_table_int(&tb, T);
    da_table_dbl(&tb, step_med * 1e3, 3, 0), da_table_dbl(&tb, med[5] * 1e3, 3, 0);
    for (int i = 0; i < 4; i++) da_table_dbl(&tb, med[i] * 1e3, 3, 0);
    da_table_dbl(&tb, sum[0] / 1024.0, 2, 0), da_table_dbl(&tb, sum[1] / 1048576.0, 2, 0);
    da_table_dbl(&tb, ratio, 2, 1), da_table_dbl(&tb, sum[2], 1, 0);
    if (baseline && !refused_any) da_table_dbl(&tb, sum[3], 1, 0);
    else da_table_str(&tb, refused_any ? "no-fit" : "-");
    da_table_int(&tb, vs[0]), da_table_dbl(&tb, R ? vmax[1] : NAN, 2, 1), da_table_int(&tb, vs[1]);
    da_table_end_row(&tb);
    da_report_line(stdout, "per request (layer x micro-batch), median: send %.3f, remote attention %.3f, reduce %.3f, "
                           "receive %.3f ms (total %.3f ms)", med[0] * 1e3, med[1] * 1e3, med[2] * 1e3, med[3] * 1e3,
                   med[4] * 1e3);
    da_report_line(stdout, "network bytes / KV bytes read = %.3g (Lamina's estimate 2/L = %.3g at L = %lld)", ratio,
                   lamina, (long long)context);
    if (baseline)
      da_report_line(stdout, "without offload: %s", refused_any ? "refused on a compute rank: its KV cache exceeds --mem-budget"
                                                                : "tok/s_loc = the same loop with the cache on the compute rank");
    if (json) {
      da_json_t j;
      da_json_begin(&j);
      da_json_str(&j, "cmd", "decode");
      da_json_str(&j, "algo", "offload");
      da_json_int(&j, "ranks", g_size);
      da_json_int(&j, "compute_ranks", info.ncompute);
      da_json_int(&j, "memory_ranks", info.nmemory);
      da_json_int(&j, "context", context);
      da_json_int(&j, "batch", B);
      da_json_int(&j, "heads", H);
      da_json_int(&j, "kv_heads", G);
      da_json_int(&j, "dim", D);
      da_json_str(&j, "mask", "causal");
      da_json_str(&j, "dtype", dtype_names[dt]);
      da_json_str(&j, "device", "cpu");
      da_json_int(&j, "layers", L);
      da_json_int(&j, "microbatches", nmb);
      da_json_dbl(&j, "layer_compute_ms", layer_ms);
      da_json_int(&j, "steps", T);
      da_json_dbl(&j, "step_median_s", step_med);
      da_json_dbl(&j, "step_p99_s", med[5]);
      da_json_dbl(&j, "send_median_s", med[0]);
      da_json_dbl(&j, "remote_attention_median_s", med[1]);
      da_json_dbl(&j, "reduce_median_s", med[2]);
      da_json_dbl(&j, "receive_median_s", med[3]);
      da_json_dbl(&j, "request_median_s", med[4]);
      da_json_dbl(&j, "net_bytes_per_step", sum[0]);
      da_json_dbl(&j, "kv_bytes_per_step", sum[1]);
      da_json_dbl(&j, "net_over_kv", ratio);
      da_json_dbl(&j, "lamina_2_over_L", lamina);
      da_json_dbl(&j, "tokens_per_s", sum[2]);
      if (baseline && !refused_any) da_json_dbl(&j, "tokens_per_s_local", sum[3]);
      else da_json_str(&j, "tokens_per_s_local", NULL);
      da_json_int(&j, "verify_rows", vs[0]);
      da_json_dbl(&j, "max_abs_err", R ? vmax[0] : NAN);
      da_json_dbl(&j, "max_rel_err", R ? vmax[1] : NAN);
      da_json_int(&j, "wrong", vs[1]);
      da_json_int(&j, "peak_rss_bytes", (int64_t)da_peak_rss_bytes());
      da_json_str(&j, "hosts", da_report_hostname());
      da_json_str(&j, "git", da_git_version());
      if (da_json_append(&j, json)) rc = 1;
      da_json_free(&j);
    }
    if (da_report_footer(stdout, vs[1], rc == 0)) rc = rc ? rc : 1;
    fflush(stdout);
  }
  if (vs[1] > 0 && !rc) rc = 1;
  rc = da_mpi_max_int(rc);
  for (int64_t i = 0; i < R; i++) free(samples[i].out), free(samples[i].lse);
  free(samples), free(t_step), free(r_send), free(r_attn), free(r_red), free(r_recv), free(r_tot);
out:
  da_offload_free(off);
  off = NULL;
out_early:
  da_offload_free(off);
  da_comm_free(wcomm);
  da_context_free(ctx);
  free(lens);
  MPI_Finalize();
  return rc;
}
