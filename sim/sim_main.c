/* sim_main.c: distattn-sim, the driver program of the SMPI build. It runs the library's real
 * ring / striped / zigzag / ulysses (and, where the library has it, hybrid) plans (da_plan_fwd,
 * da_plan_bwd) or tree / ring decode
 * (da_decode_step) under smpirun, with the sim kernel backend injecting calibrated compute time,
 * and prints one JSON line (rank 0) with the simulated times. Inputs are never written: this
 * program measures time, never values (correctness is tests/test_ring.c's and test_tree.c's). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <mpi.h>
#include <smpi/smpi.h>
#include "distattn.h"
#include "core.h"
#include "sim.h"

static void usage(void) {
  fprintf(stderr,
          "usage: smpirun ... distattn-sim [--algo ring|striped|zigzag|ulysses|hybrid | --decode tree|ring] [--seq N | --context N]\n"
          "         [--ulysses U] [--layout ring|striped|zigzag] (hybrid: Ulysses degree U, the ring's layout)\n"
          "         [--heads H] [--kv-heads G] [--dim D] [--batch B] [--dtype bf16|fp16|fp32] [--mask none|causal|window:W]\n"
          "         [--backward] [--block T] [--steps N] [--label S]\n"
          "         [--fwd-tflops F] [--bwd-tflops F] [--mem-gbps M] [--call-us U] [--calib NAME]\n");
}

static int parse_i(const char *s, int64_t *v) { return da_parse_size(s, v) == 0 ? 0 : -1; }

/* Exit status of a run asked for an algorithm this library build does not have (sim/sweep.py
 * lists such rows as "not run", never as results). */
enum { EXIT_NOT_IN_BUILD = 3 };

/* --algo hybrid: Ulysses inside groups of U consecutive ranks, the ring across them (issue 20).
 * The library's driver lands separately; sim/Makefile defines DA_SIM_HYBRID when
 * include/distattn.h has DA_ALGO_HYBRID, and this is the one place that names its config fields.
 * Without it the program says so and exits EXIT_NOT_IN_BUILD. Returns 0 when cfg is set. */
static int hybrid_config(da_plan_config_t *cfg, int64_t U, da_algo_t layout) {
#ifdef DA_SIM_HYBRID
  cfg->algo = DA_ALGO_HYBRID;
  cfg->ulysses = (int)U;
  cfg->ring_layout = layout;
  return 0;
#else
  (void)cfg, (void)U, (void)layout;
  return -1;
#endif
}

/* The start line of a timed section: every rank leaves it at the same simulated instant, so a
 * rank's own elapsed time is the section's time. MPI_Barrier does not give that: the algorithms
 * SMPI's ompi selector picks (bruck at 64 and 512 ranks, the fan-in / fan-out tree at 256 and 1024)
 * release ranks 15 to 55 us apart on the h100 platform, and the first rank out then counts the
 * skew as its own step time (tree decode +16% to +52% over the model, docs/scaling.md). Recursive
 * doubling over XOR partners (power-of-two P) is symmetric: every rank's last message arrives
 * after the same rounds, all inside a node or all across, so all leave together. Other P: the
 * library's barrier, and its skew (the sweep uses powers of two). */
static void start_line(MPI_Comm comm) {
  int P, r;
  MPI_Comm_size(comm, &P);
  MPI_Comm_rank(comm, &r);
  if (P & (P - 1)) {
    MPI_Barrier(comm);
    return;
  }
  char x = 0, y;
  for (int m = 1; m < P; m <<= 1)
    MPI_Sendrecv(&x, 0, MPI_BYTE, r ^ m, 77, &y, 0, MPI_BYTE, r ^ m, 77, comm, MPI_STATUS_IGNORE);
}

/* Spread of the ranks' start times (the simulated clock is global): max - min, for the record. */
static double start_skew(double t0) {
  double a[2] = {t0, -t0}, b[2];
  MPI_Allreduce(a, b, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return b[0] + b[1];
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  da_sim_copy_hook_install();
  int P, rank;
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int64_t seq = 128 * 1024, H = 32, G = 0, D = 128, B = 1, block = 0, steps = 3, window = 0;
  const char *algo = "ring", *dec = NULL, *label = "", *dts = "bf16", *mask = "causal", *layout = "zigzag";
  int64_t U = 0;
  int bwd = 0, bad = 0;
  for (int i = 1; i < argc && !bad; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && (i++, 1))
    if (ARG("--algo")) algo = v;
    else if (ARG("--decode")) dec = v;
    else if (ARG("--seq") || ARG("--context")) bad = parse_i(v, &seq);
    else if (ARG("--heads")) bad = parse_i(v, &H);
    else if (ARG("--kv-heads")) bad = parse_i(v, &G);
    else if (ARG("--dim")) bad = parse_i(v, &D);
    else if (ARG("--batch")) bad = parse_i(v, &B);
    else if (ARG("--block")) bad = parse_i(v, &block);
    else if (ARG("--steps")) bad = parse_i(v, &steps);
    else if (ARG("--dtype")) dts = v;
    else if (ARG("--mask")) mask = v;
    else if (ARG("--label")) label = v;
    else if (ARG("--ulysses")) bad = parse_i(v, &U);
    else if (ARG("--layout")) layout = v;
    else if (ARG("--calib")) {
      /* A copy: ranks share da_sim_calib, and a finished rank's argv may be gone. */
      static char name[32];
      snprintf(name, sizeof name, "%s", v);
      da_sim_calib.name = name;
    }
    else if (ARG("--fwd-tflops")) da_sim_calib.fwd_flops = atof(v) * 1e12;
    else if (ARG("--bwd-tflops")) da_sim_calib.bwd_flops = atof(v) * 1e12;
    else if (ARG("--mem-gbps")) da_sim_calib.mem_bps = atof(v) * 1e9;
    else if (ARG("--call-us")) da_sim_calib.call_s = atof(v) * 1e-6;
    else if (!strcmp(a, "--backward")) bwd = 1;
    else bad = 1;
#undef ARG
  }
  da_problem_t prob = DA_PROBLEM_INITIALIZER;
  prob.batch = B, prob.seq = seq, prob.heads = H, prob.kv_heads = G ? G : H, prob.dim = D;
  prob.dtype = !strcmp(dts, "fp32") ? DA_FLOAT32 : !strcmp(dts, "fp16") ? DA_FLOAT16 : DA_BFLOAT16;
  if (!strcmp(mask, "none")) prob.mask = DA_MASK_NONE;
  else if (!strcmp(mask, "causal")) prob.mask = DA_MASK_CAUSAL;
  else if (!strncmp(mask, "window:", 7) && !parse_i(mask + 7, &window)) prob.mask = DA_MASK_WINDOW | DA_MASK_CAUSAL, prob.window = window;
  else bad = 1;
  /* The ring layouts by name (also the hybrid's --layout); -1 for any other name. */
#define RING_ALGO(x) (!strcmp(x, "ring") ? DA_ALGO_RING : !strcmp(x, "striped") ? DA_ALGO_STRIPED \
                      : !strcmp(x, "zigzag") ? DA_ALGO_ZIGZAG : (da_algo_t)-1)
  const int hybrid = !strcmp(algo, "hybrid");
  da_algo_t al = !strcmp(algo, "ulysses") ? DA_ALGO_ULYSSES : RING_ALGO(algo);
  if ((int)al < 0 && !hybrid) bad = 1;
  if (hybrid && ((int)RING_ALGO(layout) < 0 || U < 1)) bad = 1;
  if (dec && strcmp(dec, "tree") && strcmp(dec, "ring")) bad = 1;
  if (bad) {
    if (rank == 0) usage();
    MPI_Finalize();
    return 2;
  }
  da_plan_config_t cfg = DA_PLAN_CONFIG_INITIALIZER;
  cfg.algo = al, cfg.block = block;
  if (hybrid && hybrid_config(&cfg, U, RING_ALGO(layout))) {
    if (rank == 0) fprintf(stderr, "distattn-sim: --algo hybrid: driver not in this build\n");
    MPI_Finalize();
    return EXIT_NOT_IN_BUILD;
  }
#undef RING_ALGO

  da_context_t *ctx = NULL;
  da_comm_t *comm = NULL;
  da_status_t st = da_context_create(NULL, &ctx);
  if (!st) st = da_comm_create(ctx, MPI_COMM_WORLD, &comm);
  double t_fwd = 0, t_bwd = 0, compute = 0, exposed = 0, t_med = 0, t_p99 = 0, skew = 0;
  uint64_t bytes = 0;
  size_t mem = 0;
  int64_t used_block = 0;
  const size_t es = prob.dtype == DA_FLOAT32 ? 4 : 2;
  if (!st && !dec) {
    da_plan_t *plan = NULL;
    st = da_plan_create(comm, &prob, &cfg, &plan);
    if (!st) {
      int64_t n = da_plan_local_rows(plan), nn = n ? n : 1;
      /* Payload (sim_alloc.c): q, k, v, out, dout and the gradients alias one untouched arena. */
      char *big = da_malloc((size_t)(B * nn * H * D) * es + (256u << 10), 64);
      char *kv = da_malloc((size_t)(B * nn * prob.kv_heads * D) * es + (256u << 10), 64);
      float *lsebuf = da_malloc((size_t)(B * nn * H) * 4 + (256u << 10), 64);
      da_tensor_t q, k, o, lse;
      da_tensor_make(&q, big, prob.dtype, 4, (int64_t[]){B, n, H, D});
      da_tensor_make(&o, big, prob.dtype, 4, (int64_t[]){B, n, H, D});
      da_tensor_make(&k, kv, prob.dtype, 4, (int64_t[]){B, n, prob.kv_heads, D});
      da_tensor_make(&lse, lsebuf, DA_FLOAT32, 3, (int64_t[]){B, n, H});
      start_line(MPI_COMM_WORLD);
      double t0 = MPI_Wtime();
      /* No lse unless the backward needs it: the plan copies it row by row on the host. */
      st = da_plan_fwd(plan, &q, &k, &k, &o, bwd ? &lse : NULL, NULL);
      double t1 = MPI_Wtime();
      if (!st && bwd) {
        start_line(MPI_COMM_WORLD);
        t1 = MPI_Wtime();
        da_tensor_t dq = q, dk = k, dv = k;
        st = da_plan_bwd(plan, &q, &k, &k, &o, &o, &lse, &dq, &dk, &dv, NULL);
      }
      double t2 = MPI_Wtime();
      skew = start_skew(t0);
      da_plan_stats_t s = DA_PLAN_STATS_INITIALIZER;
      da_plan_stats(plan, &s);
      t_fwd = t1 - t0, t_bwd = bwd ? t2 - t1 : 0;
      compute = s.fwd_compute_s + (bwd ? s.bwd_compute_s : 0);
      exposed = s.fwd_exposed_s + (bwd ? s.bwd_exposed_s : 0);
      bytes = s.plan_fwd_bytes + (bwd ? s.plan_bwd_bytes : 0);
      mem = bwd ? s.mem_bwd_bytes : s.mem_fwd_bytes;
      used_block = s.block;
      da_free(big), da_free(kv), da_free(lsebuf);
      da_plan_free(plan);
    }
  } else if (!st) {
    /* Decode: a context of `seq` tokens prefilled (pages only), one token appended per step. */
    da_kvcache_t *cache = NULL;
    da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
    st = da_kvcache_create(comm, &prob, &kc, &cache);
    for (int64_t b = 0; b < B && !st; b++) st = da_kvcache_prefill(cache, b, seq - 1, NULL, NULL);
    da_decode_config_t dc = DA_DECODE_CONFIG_INITIALIZER;
    dc.algo = !strcmp(dec, "ring") ? DA_DECODE_RING : DA_DECODE_TREE;
    da_decode_plan_t *dp = NULL;
    if (!st) st = da_decode_plan_create(comm, &prob, &dc, &dp);
    char *qb = calloc((size_t)(B * H * D), es), *ob = calloc((size_t)(B * H * D), es);
    int64_t *ntok = calloc((size_t)B, sizeof *ntok);
    double *ts = calloc((size_t)(steps > 0 ? steps : 1), sizeof *ts);
    for (int64_t b = 0; b < B; b++) ntok[b] = 1;
    da_tensor_t q, o;
    da_tensor_make(&q, qb, prob.dtype, 3, (int64_t[]){B, H, D});
    da_tensor_make(&o, ob, prob.dtype, 3, (int64_t[]){B, H, D});
    for (int64_t i = 0; i < steps && !st; i++) {
      start_line(MPI_COMM_WORLD);
      double t0 = MPI_Wtime();
      st = da_kvcache_append(cache, ntok, NULL, NULL);
      if (!st) st = da_decode_step(dp, cache, &q, &o, NULL, NULL);
      ts[i] = MPI_Wtime() - t0;
      MPI_Allreduce(MPI_IN_PLACE, &ts[i], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      const double sk = start_skew(t0);
      if (sk > skew) skew = sk;
    }
    if (!st) {
      for (int64_t i = 1; i < steps; i++) /* insertion sort: a handful of steps */
        for (int64_t j = i; j > 0 && ts[j] < ts[j - 1]; j--) {
          double t = ts[j];
          ts[j] = ts[j - 1], ts[j - 1] = t;
        }
      t_med = ts[(steps - 1) / 2], t_p99 = ts[steps - 1];
      da_decode_stats_t ds = DA_DECODE_STATS_INITIALIZER;
      da_decode_plan_stats(dp, &ds);
      compute = ds.compute_s, exposed = ds.reduce_s, bytes = ds.bytes_sent, mem = da_kvcache_bytes(cache, NULL);
    }
    free(qb), free(ob), free(ntok), free(ts);
    if (dp) da_decode_plan_free(dp);
    if (cache) da_kvcache_free(cache);
  }
  int fail = st != DA_SUCCESS, anyfail = 0;
  if (fail) fprintf(stderr, "distattn-sim rank %d: %s: %s\n", rank, da_status_string(st), da_last_error(ctx));
  MPI_Allreduce(&fail, &anyfail, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  double mx[5] = {t_fwd, t_bwd, compute, exposed, (double)mem}, smx[5];
  MPI_Reduce(mx, smx, 5, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  unsigned long long b64 = bytes, sb = 0;
  MPI_Reduce(&b64, &sb, 1, MPI_UNSIGNED_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank == 0 && !anyfail) {
    const da_sim_calib_t *c = &da_sim_calib;
    if (!dec)
      printf("{\"cmd\":\"sim\",\"label\":\"%s\",\"algo\":\"%s\",\"ranks\":%d,\"seq\":%lld,\"batch\":%lld,\"heads\":%lld,"
             "\"kv_heads\":%lld,\"dim\":%lld,\"mask\":\"%s\",\"dtype\":\"%s\",\"backward\":%s,\"block\":%lld,"
             "\"fwd_s\":%.6e,\"bwd_s\":%.6e,\"total_s\":%.6e,\"compute_s\":%.6e,\"comm_exposed_s\":%.6e,"
             "\"comm_bytes\":%llu,\"mem_bytes\":%.0f,",
             label, algo, P, (long long)seq, (long long)B, (long long)H, (long long)prob.kv_heads, (long long)D, mask,
             dts, bwd ? "true" : "false", (long long)used_block, smx[0], smx[1], smx[0] + smx[1], smx[2], smx[3], sb,
             smx[4]);
    else
      printf("{\"cmd\":\"sim-decode\",\"label\":\"%s\",\"algo\":\"%s\",\"ranks\":%d,\"context\":%lld,\"batch\":%lld,"
             "\"heads\":%lld,\"kv_heads\":%lld,\"dim\":%lld,\"dtype\":\"%s\",\"steps\":%lld,\"step_median_s\":%.6e,"
             "\"step_max_s\":%.6e,\"compute_s\":%.6e,\"reduce_s\":%.6e,\"comm_bytes\":%llu,\"mem_bytes\":%.0f,",
             label, dec, P, (long long)seq, (long long)B, (long long)H, (long long)prob.kv_heads, (long long)D, dts,
             (long long)steps, t_med, t_p99, smx[2], smx[3], sb, smx[4]);
    if (!dec && hybrid) printf("\"ulysses\":%lld,\"layout\":\"%s\",", (long long)U, layout);
    printf("\"start_skew_s\":%.3e,", skew);
    printf("\"calib\":\"%s\",\"fwd_tflops\":%g,\"bwd_tflops\":%g,\"mem_gbps\":%g,\"call_us\":%g}\n", c->name,
           c->fwd_flops / 1e12, c->bwd_flops / 1e12, c->mem_bps / 1e9, c->call_s * 1e6);
    fflush(stdout);
  }
  if (comm) da_comm_free(comm);
  da_context_free(ctx);
  MPI_Finalize();
  return anyfail ? 1 : 0;
}
