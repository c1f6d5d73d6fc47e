/* plan.c: the distributed public API of include/distattn.h (da_comm_*, da_plan_*): validates the
 * problem and the per-rank tensors with messages naming the rank and the field, makes every rank
 * agree on the problem (a mismatch or a failure anywhere is an error everywhere, never a hang),
 * builds the layout and schedule, and hands packed views to the ring driver (ring.c), the Ulysses
 * driver or the hybrid (ulysses.c). */
#include <mpi.h> /* before distattn.h: declares the distributed section */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "distattn.h"
#include "ring.h"
#include "ulysses.h"
#include "kvcache.h" /* da_fnv1a, the da_comm_t accessors defined here */
#include "tensor.h"

struct da_comm {
  da_context_t *ctx;
  MPI_Comm comm; /* our duplicate of the caller's communicator */
  int rank, nranks;
  da_xport_t ctl; /* control collectives (agreement) over the duplicate */
  int node_procs; /* ranks of this communicator on this machine (same kernel): share MemAvailable */
};

struct da_plan {
  da_comm_t *comm;
  da_problem_t prob;
  int64_t *cu;       /* copy of the document boundaries (prob.cu_seqlens points here) */
  da_algo_t algo;
  int64_t block;
  int64_t block_used; /* block, or the automatic choice */
  char transport[16];
  double timeout;
  int64_t mem_budget; /* config (API v2): bytes, 0 = default, < 0 = no check */
  unsigned mem_count;
  int ulysses;           /* hybrid: the Ulysses degree */
  da_algo_t ring_layout; /* hybrid: the ring's layout across groups */
  int hy_on;             /* hy was set up (its communicators are to be freed) */
  da_hybrid_t hy;
  MPI_Comm mcomm;    /* the plan's own duplicate: a plan that timed out leaves unmatched
                        messages behind, and they must never match another plan's receives */
  da_xport_t xp;     /* the data transport */
  da_dstream_t own_stream; /* device mode: the stream of calls that pass none (created at first use) */
  da_ring_t ring;
  int64_t *positions; /* [nloc] global position of every local row */
  double *steps;      /* 4 x [P]: fwd compute, fwd wait, bwd compute, bwd wait */
  uint64_t *step_bytes; /* 2 x [P] */
  int64_t pairs_total, pairs_rank;
};

/* ---- communicator ------------------------------------------------------------------------- */

/* Which machine this process runs on, as a hash: the kernel's boot id (network namespaces and
 * containers on one kernel share its memory, whatever their host names), else the host name. */
static int64_t machine_id(void) {
  char id[256] = "";
  FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (!f || !fgets(id, sizeof id, f)) gethostname(id, sizeof id - 1);
  if (f) fclose(f);
  id[sizeof id - 1] = '\0';
  return (int64_t)(da_fnv1a(DA_FNV_INIT, id, strlen(id)) >> 2);
}

da_status_t da_comm_create(da_context_t *ctx, MPI_Comm comm, da_comm_t **out) {
  return da_comm_create_config(ctx, comm, NULL, out);
}

da_status_t da_comm_create_config(da_context_t *ctx, MPI_Comm comm, const da_comm_config_t *cfg, da_comm_t **out) {
  da_error_clear();
  DA_ARG_CHECK(da_context_errbuf(ctx), out != NULL, "da_comm_create: output pointer is NULL");
  *out = NULL;
  DA_ARG_CHECK(NULL, ctx != NULL, "da_comm_create: context is NULL");
  const da_comm_config_t def = DA_COMM_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  if (cfg->size < offsetof(da_comm_config_t, timeout) + sizeof cfg->timeout || cfg->version == 0 ||
      cfg->version > DA_API_VERSION)
    return da_context_finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_comm_create: config of size %zu, version %u "
                                         "(use DA_COMM_CONFIG_INITIALIZER)", cfg->size, cfg->version));
  if (!(cfg->timeout >= 0) || !isfinite(cfg->timeout))
    return da_context_finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_comm_create: timeout %g s: expected 0 (the "
                                         "default) or a finite number of seconds", cfg->timeout));
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized)
    return da_context_finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_comm_create: MPI is not initialized "
                                         "(call MPI_Init first)"));
  if (comm == MPI_COMM_NULL)
    return da_context_finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_comm_create: communicator is MPI_COMM_NULL"));
  /* An intercommunicator joins two groups: MPI_Comm_idup works on it, but the collectives of the
   * plans mean one group (an allgather over an intercommunicator gathers the other group's data,
   * and the sizes no longer match: MPI_ERR_BUFFER). Say so instead. */
  int inter = 0;
  if (MPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS)
    return da_context_finish(ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_comm_create: the communicator is not a valid "
                                         "MPI communicator (MPI_Comm_test_inter failed)"));
  if (inter)
    return da_context_finish(ctx, DA_ERR(DA_ERR_UNSUPPORTED, "da_comm_create: an intercommunicator is not supported "
                                         "(merge its two groups with MPI_Intercomm_merge first)"));
  da_comm_t *c = calloc(1, sizeof *c);
  if (!c) return da_context_finish(ctx, DA_ERR(DA_ERR_OUT_OF_MEMORY, "communicator"));
  c->ctx = ctx;
  /* A private duplicate: our tags can never match the caller's messages, and setting its error
   * handler to "return" leaves the caller's communicator alone. Bounded: a rank that never calls
   * da_comm_create must not hang the others (no roll call here: it would send on the caller's
   * communicator). */
  const double timeout = cfg->timeout > 0 ? cfg->timeout : da_comm_default_timeout();
  da_status_t st = da_mpi_comm_dup(comm, timeout, "da_comm_create", &c->comm);
  if (st != DA_SUCCESS) {
    free(c);
    return da_context_finish(ctx, st);
  }
  st = da_xport_open(&c->ctl, "mpi", c->comm, timeout);
  if (st != DA_SUCCESS) {
    MPI_Comm_free(&c->comm);
    free(c);
    return da_context_finish(ctx, st);
  }
  c->rank = c->ctl.rank;
  c->nranks = c->ctl.nranks;
  /* Processes per machine, for the default memory budget of plans (one small allgather). */
  int64_t me = machine_id(), *ids = malloc((size_t)c->nranks * sizeof *ids);
  st = ids ? c->ctl.t->allgather(&c->ctl, &me, ids, sizeof me) : DA_ERR(DA_ERR_OUT_OF_MEMORY, "communicator");
  for (int q = 0; st == DA_SUCCESS && q < c->nranks; q++) c->node_procs += ids[q] == me;
  free(ids);
  if (st != DA_SUCCESS) {
    da_xport_close(&c->ctl);
    MPI_Comm_free(&c->comm);
    free(c);
    return da_context_finish(ctx, st);
  }
  da_log_set_rank(c->rank);
  DA_INFO(DA_SUB_INIT, "communicator: rank %d of %d", c->rank, c->nranks);
  *out = c;
  return da_context_finish(ctx, DA_SUCCESS);
}

void da_comm_free(da_comm_t *comm) {
  if (!comm) return;
  da_xport_close(&comm->ctl);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm->comm);
  free(comm);
}

int da_comm_rank(const da_comm_t *comm) { return comm ? comm->rank : -1; }
int da_comm_size(const da_comm_t *comm) { return comm ? comm->nranks : 0; }

/* ---- agreement on the problem --------------------------------------------------------------- */

enum { F_BATCH, F_SEQ, F_HEADS, F_KVHEADS, F_DIM, F_MASK, F_WINDOW, F_NDOCS, F_DTYPE, F_ALGO, F_BLOCK, F_SCALE,
       F_HASH, F_NFIELDS };
static const char *const field_names[F_NFIELDS] = {
    "batch", "seq", "heads", "kv_heads", "dim", "mask", "window", "ndocs", "dtype", "algo", "block",
    "scale", "#documents/transport/tiles/hybrid degree and layout"}; /* '#': a hash (da_fields_compare) */

/* Every rank reduces max(f) and max(-f) of its fields: a field differs somewhere iff the two
 * disagree, and every rank sees the same result, so every rank returns the same verdict. */
static da_status_t agree_problem(da_comm_t *c, const da_plan_t *p, const da_kparams_t *kp) {
  int64_t f[F_NFIELDS];
  f[F_BATCH] = p->prob.batch, f[F_SEQ] = p->prob.seq, f[F_HEADS] = kp->H, f[F_KVHEADS] = kp->G;
  f[F_DIM] = kp->D, f[F_MASK] = p->prob.mask, f[F_WINDOW] = (p->prob.mask & DA_MASK_WINDOW) ? p->prob.window : 0;
  f[F_NDOCS] = (p->prob.mask & DA_MASK_DOC) ? p->prob.ndocs : 0;
  f[F_DTYPE] = p->prob.dtype, f[F_ALGO] = p->algo, f[F_BLOCK] = p->block;
  uint32_t sb;
  memcpy(&sb, &kp->scale, 4);
  f[F_SCALE] = sb;
  uint64_t h = DA_FNV_INIT;
  if (p->prob.mask & DA_MASK_DOC) h = da_fnv1a(h, p->cu, (size_t)(p->prob.ndocs + 1) * sizeof(int64_t));
  h = da_fnv1a(h, p->transport, strlen(p->transport));
  h = da_fnv1a(h, &kp->block_q, sizeof kp->block_q);
  h = da_fnv1a(h, &kp->block_k, sizeof kp->block_k);
  const int hyb[2] = {p->ulysses, (int)p->ring_layout};
  h = da_fnv1a(h, hyb, sizeof hyb);
  f[F_HASH] = (int64_t)(h >> 2); /* 62 bits: safe to negate */
  char msg[400];
  int bad = 0;
  DA_CHECK(da_fields_compare(&c->ctl, f, F_NFIELDS, field_names, "problem", msg, sizeof msg, &bad));
  if (bad)
    return DA_ERR(DA_ERR_MISMATCH, "rank %d: ranks disagree on the problem: %s", c->rank, msg);
  return DA_SUCCESS;
}

/* ---- plan ------------------------------------------------------------------------------------ */

/* The config has the fields of API version 3 (the hybrid's). */
static int has_v3(const da_plan_config_t *cfg) {
  return cfg->size >= offsetof(da_plan_config_t, ring_layout) + sizeof cfg->ring_layout && cfg->version >= 3;
}

/* The transport of a plan: the config's, DISTATTN_TRANSPORT, else the default of the context's
 * device: `mpi` for the CPU; for CUDA `cuda-ipc` when every rank runs on this node (ranks may
 * share a GPU), else `nccl` (one rank per GPU), else, in a build without NCCL, `cuda-mpi`
 * (staged through pinned host memory). `mpi` named in a CUDA context is `cuda-mpi`. Then the
 * pairing of memory and kernels: a device transport's memory must be what the kernels read (the
 * host seam's `host-ipc` / `host-mpi` with the CPU kernels: a test device; cuda-ipc, nccl and
 * cuda-mpi with the CUDA kernels), and the ring is the only driver that runs on device memory.
 * Refusals say so, in words. */
static da_status_t pick_transport(const da_comm_t *c, const da_plan_config_t *cfg, const char **tp) {
  const int cuda = da_context_device(c->ctx) == DA_DEVICE_CUDA;
  const char *name = cfg->transport ? cfg->transport : da_param_string("DISTATTN_TRANSPORT");
  if (!name) name = !cuda ? "mpi" : da_transport_cuda_default(c->node_procs == c->nranks);
  name = da_transport_resolve(name, cuda);
  const da_transport_t *t = da_transport_find(name);
  if (!t) return DA_ERR_INVALID_ARGUMENT;
  if (t->devapi && (cfg->algo == DA_ALGO_ULYSSES || cfg->algo == DA_ALGO_HYBRID))
    return da_transport_check_host(name, cfg->algo == DA_ALGO_HYBRID ? "plan config (hybrid)" : "plan config (ulysses)");
  const int dev_cuda = t->devapi && !strcmp(t->devapi->name, "cuda");
  if (cuda && !dev_cuda)
    return DA_ERR(DA_ERR_UNSUPPORTED, "plan config: a CUDA context keeps tensors in GPU memory and the %s transport "
                  "moves %s memory (use nccl, cuda-ipc, or mpi: staged through pinned host memory)", t->name,
                  t->devapi ? "host-seam" : "host");
  if (!cuda && dev_cuda)
    return DA_ERR(DA_ERR_UNSUPPORTED, "plan config: the %s transport moves GPU memory and this context runs the CPU "
                  "kernels on host memory (create the context with DA_DEVICE_CUDA)", t->name);
  *tp = name;
  return DA_SUCCESS;
}

static da_status_t check_config(const da_plan_config_t *cfg, const da_comm_t *c, const char **tp) {
  const int nranks = c->nranks;
  if (cfg->size < sizeof(size_t) + sizeof(unsigned) || cfg->version == 0 || cfg->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_plan_config_t: size %zu / version %u not recognized (start from "
                  "DA_PLAN_CONFIG_INITIALIZER)", cfg->size, cfg->version);
  if ((unsigned)cfg->algo > DA_ALGO_HYBRID)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: unknown algo %d (ring, striped, zigzag, ulysses, hybrid)",
                  (int)cfg->algo);
  if (has_v3(cfg)) {
    if (cfg->ulysses && cfg->algo != DA_ALGO_HYBRID)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: ulysses = %d is the hybrid's degree (algo hybrid), not "
                    "used by the %s algorithm", cfg->ulysses, cfg->algo == DA_ALGO_ULYSSES ? "ulysses (degree = ranks)"
                    : "ring");
    if (cfg->algo == DA_ALGO_HYBRID && (unsigned)cfg->ring_layout > DA_ALGO_ZIGZAG)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: ring_layout %d: the hybrid's ring runs on ring "
                    "(contiguous), striped or zigzag", (int)cfg->ring_layout);
  } else if (cfg->algo == DA_ALGO_HYBRID) {
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: algo hybrid needs a version 3 config (ulysses, ring_layout): "
                  "start from DA_PLAN_CONFIG_INITIALIZER");
  }
  if (cfg->block < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: block = %lld tokens must be >= 0 (0 = automatic)",
                  (long long)cfg->block);
  if (!(cfg->timeout >= 0) || !isfinite(cfg->timeout))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: timeout %g s must be >= 0 (0 = default)", cfg->timeout);
  if (cfg->size >= offsetof(da_plan_config_t, mem_count) + sizeof cfg->mem_count && cfg->version >= 2 &&
      (cfg->mem_count & ~(unsigned)(DA_MEM_BACKWARD | DA_MEM_TENSORS)))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: mem_count 0x%x has unknown bits (DA_MEM_BACKWARD, "
                  "DA_MEM_TENSORS)", cfg->mem_count);
  const char *name = NULL;
  DA_CHECK(pick_transport(c, cfg, &name));
  if (!strcmp(name, "self") && nranks != 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "plan config: the self transport runs one rank, this job has %d", nranks);
  *tp = name;
  return DA_SUCCESS;
}

void da_plan_free(da_plan_t *p) {
  if (!p) return;
  if (p->hy_on) da_hybrid_free(&p->hy);
  const da_devapi_t *dev = p->ring.dev;
  if (dev && p->own_stream) (void)dev->stream_sync(p->own_stream);
  /* The transport first: in device mode it stops mapping the peers' buffers and drains its comm
   * stream, after which nothing of ours is read or written by a copy. */
  da_xport_close(&p->xp);
  da_ring_release(&p->ring);
  if (dev && p->own_stream) dev->stream_destroy(p->own_stream);
  da_schedule_free(&p->ring.sched);
  da_layout_free(&p->ring.layout);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (p->mcomm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&p->mcomm);
  free(p->cu);
  free(p->positions);
  free(p->steps);
  free(p->step_bytes);
  free(p);
}

/* Local part of plan creation: everything that can fail without talking to other ranks. */
static da_status_t plan_local(da_comm_t *c, const da_problem_t *prob, const da_plan_config_t *cfg, da_plan_t *p,
                              da_kparams_t *kp) {
  const char *tp = NULL;
  DA_CHECK(check_config(cfg, c, &tp));
  DA_CHECK(da_context_params(c->ctx, prob, kp));
  /* Every rank runs the same check on agreed-upon sizes, so every rank prints the refusal. */
  if (cfg->algo == DA_ALGO_ULYSSES) DA_CHECK(da_ulysses_check(kp, c->nranks, da_transport_find(tp)));
  if (cfg->algo == DA_ALGO_HYBRID) {
    DA_CHECK(da_hybrid_check(kp, c->nranks, cfg->ulysses, da_transport_find(tp)));
    p->ulysses = cfg->ulysses, p->ring_layout = cfg->ring_layout;
  }
  p->prob = *prob;
  p->prob.size = sizeof p->prob;
  p->algo = cfg->algo;
  p->block = cfg->block;
  snprintf(p->transport, sizeof p->transport, "%s", tp);
  p->timeout = cfg->timeout > 0 ? cfg->timeout : da_comm_default_timeout();
  /* Fields of API version 2 are read only from a struct that has them. */
  if (cfg->size >= offsetof(da_plan_config_t, mem_count) + sizeof cfg->mem_count && cfg->version >= 2)
    p->mem_budget = cfg->mem_budget, p->mem_count = cfg->mem_count;
  if (prob->mask & DA_MASK_DOC) {
    p->cu = malloc((size_t)(prob->ndocs + 1) * sizeof *p->cu);
    if (!p->cu) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "document boundaries");
    memcpy(p->cu, prob->cu_seqlens, (size_t)(prob->ndocs + 1) * sizeof *p->cu);
    p->prob.cu_seqlens = p->cu;
    kp->mask.cu_seqlens = p->cu;
  } else {
    p->prob.cu_seqlens = NULL;
    kp->mask.cu_seqlens = NULL;
  }
  return DA_SUCCESS;
}

/* MemAvailable of /proc/meminfo in bytes, or 0 when unknown. */
static double mem_available(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  char line[256];
  double kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
  if (f) fclose(f);
  return kb * 1024.0;
}

/* "9248.25 GiB", "12.50 MiB", "812 bytes" into b[32]. */
static const char *human(double bytes, char *b) {
  if (bytes >= 1073741824.0) snprintf(b, 32, "%.2f GiB", bytes / 1073741824.0);
  else if (bytes >= 1048576.0) snprintf(b, 32, "%.2f MiB", bytes / 1048576.0);
  else snprintf(b, 32, "%.0f bytes", bytes);
  return b;
}

static size_t plan_fwd_bytes(const da_plan_t *p);
static size_t plan_bwd_bytes(const da_plan_t *p);

/* The memory check (da_plan_config_t.mem_budget): what this rank will hold for the plan, against
 * its budget, before any of it is allocated. Local; the caller agrees on the outcome. */
static da_status_t plan_memory(const da_comm_t *c, const da_plan_t *p) {
  const da_ring_t *R = &p->ring;
  double budget = (double)p->mem_budget;
  char from[160];
  snprintf(from, sizeof from, "da_plan_config_t.mem_budget");
  if (p->mem_budget == 0) {
    const char *env = da_param_string("DISTATTN_MEM_BUDGET");
    int64_t b = 0;
    if (env && (!strcmp(env, "off") || !strcmp(env, "-1"))) {
      budget = -1;
    } else if (env) {
      if (da_parse_size(env, &b) || b <= 0)
        return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: DISTATTN_MEM_BUDGET=%s: expected a size > 0 (K/M/G "
                      "suffixes) or off", c->rank, env);
      budget = (double)b;
      snprintf(from, sizeof from, "DISTATTN_MEM_BUDGET=%s", env);
    } else if (p->ring.dev) {
      budget = -1; /* device memory: MemAvailable says nothing about it (the device's allocator does) */
    } else {
      const double avail = mem_available();
      const int local = c->node_procs > 0 ? c->node_procs : 1;
      budget = avail > 0 ? avail / local : -1; /* unknown: nothing to check against */
      snprintf(from, sizeof from, "MemAvailable %.2f GiB / %d rank%s on this machine", avail / 1073741824.0, local,
               local == 1 ? "" : "s");
    }
  }
  if (budget < 0) return DA_SUCCESS;
  const int bwd = (p->mem_count & DA_MEM_BACKWARD) != 0;
  const double B = (double)p->prob.batch, n = (double)R->nloc, es = (double)da_dtype_size(p->prob.dtype);
  const double HD = (double)R->kp.H * R->kp.D, GD = (double)R->kp.G * R->kp.D;
  /* the driver's buffers, the per-call lse scratch and the position table */
  /* Ulysses holds the whole sequence for H/P heads during a call: that is its design. */
  /* The hybrid holds its group's rows for H/U heads during a call, and the ring's buffers. */
  const double drv = (double)(bwd ? plan_bwd_bytes(p) : plan_fwd_bytes(p));
  const double plan = drv + B * n * R->kp.H * 4.0 + n * 8.0;
  double tensors = 0;
  if (p->mem_count & DA_MEM_TENSORS) {
    tensors = B * n * ((2 * HD + 2 * GD) * es + 4.0 * R->kp.H); /* q k v out, lse */
    if (bwd) tensors += B * n * (2 * HD + 2 * GD) * es;          /* dout dq dk dv */
  }
  if (plan + tensors <= budget) return DA_SUCCESS;
  char need[32], have[32], pb[32], tb[32], parts[160];
  if (p->mem_count & DA_MEM_TENSORS)
    snprintf(parts, sizeof parts, "plan buffers %s + inputs and outputs %s", human(plan, pb), human(tensors, tb));
  else
    snprintf(parts, sizeof parts, "plan buffers%s", bwd ? ", forward and backward" : "");
  return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: the problem needs %s on this rank (%s), over its budget of %s (%s): "
                "use more ranks or nodes, or a shorter sequence", c->rank, human(plan + tensors, need), parts,
                human(budget, have), from);
}

/* The driver's figures: the ring's, Ulysses' or the hybrid's. */
static size_t plan_fwd_bytes(const da_plan_t *p) {
  if (p->algo == DA_ALGO_HYBRID) return da_hybrid_fwd_bytes(&p->hy);
  return p->algo == DA_ALGO_ULYSSES ? da_ulysses_fwd_bytes(&p->ring) : da_ring_fwd_bytes(&p->ring);
}
static size_t plan_bwd_bytes(const da_plan_t *p) {
  if (p->algo == DA_ALGO_HYBRID) return da_hybrid_bwd_bytes(&p->hy);
  return p->algo == DA_ALGO_ULYSSES ? da_ulysses_bwd_bytes(&p->ring) : da_ring_bwd_bytes(&p->ring);
}
static uint64_t plan_fwd_comm(const da_plan_t *p) {
  if (p->algo == DA_ALGO_HYBRID) return da_hybrid_fwd_comm_bytes(&p->hy);
  return p->algo == DA_ALGO_ULYSSES ? da_ulysses_fwd_comm_bytes(&p->ring) : da_ring_fwd_comm_bytes(&p->ring);
}
static uint64_t plan_bwd_comm(const da_plan_t *p) {
  if (p->algo == DA_ALGO_HYBRID) return da_hybrid_bwd_comm_bytes(&p->hy);
  return p->algo == DA_ALGO_ULYSSES ? da_ulysses_bwd_comm_bytes(&p->ring) : da_ring_bwd_comm_bytes(&p->ring);
}

/* The hybrid's share of plan_build: the group and ring communicators (split right after the
 * plan's bounded duplicate has seen every rank), the layouts, the schedule; block as the plan's
 * automatic choice on the largest group's rows. */
static da_status_t hybrid_build(da_plan_t *p, da_layout_kind_t kind, int64_t *block) {
  da_ring_t *R = &p->ring;
  p->hy_on = 1;
  DA_CHECK(da_hybrid_init(&p->hy, R, p->mcomm, p->transport, p->timeout, kind, p->ulysses, p->prob.seq));
  if (*block == 0) {
    *block = (p->hy.ring.nmax + 3) / 4;
    *block = (*block + 63) / 64 * 64;
    if (*block < 1024) *block = 1024;
  }
  return da_hybrid_schedule(&p->hy, *block);
}

static da_status_t plan_build(da_comm_t *c, da_plan_t *p, const da_kparams_t *kp) {
  static const da_layout_kind_t kinds[] = {DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_STRIPED, DA_LAYOUT_ZIGZAG,
                                           DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_CONTIGUOUS};
  const int P = c->nranks, r = c->rank;
  const int hybrid = p->algo == DA_ALGO_HYBRID;
  da_ring_t *R = &p->ring;
  DA_CHECK(da_mpi_comm_dup(c->comm, p->timeout, "da_plan_create", &p->mcomm));
  DA_CHECK(da_xport_open(&p->xp, p->transport, p->mcomm, p->timeout));
  R->kt = da_context_kernels(c->ctx);
  R->kp = *kp;
  R->xp = &p->xp;
  R->rank = r;
  R->P = P;
  R->B = p->prob.batch;
  int64_t block = p->block;
  if (hybrid) {
    DA_CHECK(hybrid_build(p, kinds[p->ring_layout], &block));
  } else {
    DA_CHECK(da_layout_init(&R->layout, kinds[p->algo], p->prob.seq, P, NULL));
    R->nloc = da_layout_count(&R->layout, r);
    R->nmax = da_layout_max_count(&R->layout);
  }
  /* Automatic sub-block: a quarter of the largest shard, so a step makes at least four progress
   * calls per KV segment, but never under 1024 keys: shorter calls cost the CPU kernel its K/V
   * packing and state passes again and again (measured in docs/ring.md: 512-key sub-blocks ran
   * 15% slower than 2048-key ones on 2048-row Q segments). */
  if (block == 0) {
    block = (R->nmax + 3) / 4;
    block = (block + 63) / 64 * 64;
    if (block < 1024) block = 1024;
  }
  p->block_used = block;
  if (!hybrid) DA_CHECK(da_schedule_ring(&R->layout, &kp->mask, block, &R->sched));
  DA_CHECK(da_ring_device_init(R)); /* host or device memory, from the transport */
  DA_CHECK(plan_memory(c, p)); /* before the first allocation that grows with the problem */
  p->positions = malloc((size_t)(R->nloc ? R->nloc : 1) * sizeof *p->positions);
  p->steps = calloc((size_t)4 * P, sizeof *p->steps);
  p->step_bytes = calloc((size_t)2 * P, sizeof *p->step_bytes);
  if (!p->positions || !p->steps || !p->step_bytes) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "plan tables");
  R->fwd.step_compute_s = p->steps, R->fwd.step_wait_s = p->steps + P;
  R->bwd.step_compute_s = p->steps + 2 * P, R->bwd.step_wait_s = p->steps + 3 * P;
  R->fwd.step_bytes = p->step_bytes, R->bwd.step_bytes = p->step_bytes + P;
  if (hybrid) {
    da_hybrid_positions(&p->hy, p->positions);
    /* Each rank of group g computes the group's pairs for H/U heads: work(g) / U in units of
     * all-head pairs (the remainder spread over its first ranks, so the figures add up). */
    const int U = p->ulysses, j = r % U;
    for (int g = 0; g < P / U; g++) p->pairs_total += da_schedule_rank_work(&p->hy.ring.sched, g);
    const int64_t w = da_schedule_rank_work(&p->hy.ring.sched, r / U);
    p->pairs_rank = (w / U + (j < w % U)) * R->B;
    p->pairs_total *= R->B;
  } else {
    da_span_t segs[DA_LAYOUT_MAX_SEGS];
    int ns = da_layout_segments(&R->layout, r, segs);
    int64_t i = 0;
    for (int sg = 0; sg < ns; sg++)
      for (int64_t j = 0; j < segs[sg].count; j++) p->positions[i++] = da_span_at(segs[sg], j);
    if (i != R->nloc)
      return DA_ERR(DA_ERR_INTERNAL, "layout: %lld positions for %lld rows", (long long)i, (long long)R->nloc);
    for (int q = 0; q < P; q++) p->pairs_total += da_schedule_rank_work(&R->sched, q);
  /* Ulysses: every rank computes every pair for H/P of the heads, pairs_total / P in units of
   * all-head pairs (the remainder spread over the first ranks, so the ranks' figures add up). The
   * ring schedule of the contiguous layout still counts the pairs of the whole problem. */
    p->pairs_rank = p->algo == DA_ALGO_ULYSSES ? p->pairs_total / P + (r < p->pairs_total % P)
                                               : da_schedule_rank_work(&R->sched, r);
    p->pairs_rank *= R->B;
    p->pairs_total *= R->B;
  }
  DA_INFO(DA_SUB_PLAN, "plan: %s%s over %d ranks, %lld local rows (max %lld), block %lld, transport %s; per call "
          "%zu / %zu bytes of buffers (fwd / bwd), sends %llu / %llu bytes",
          p->algo == DA_ALGO_ULYSSES ? "ulysses" : hybrid ? "hybrid, ring on " : "",
          p->algo == DA_ALGO_ULYSSES ? "" : da_layout_name(kinds[hybrid ? (int)p->ring_layout : (int)p->algo]), P,
          (long long)R->nloc,
          (long long)R->nmax, (long long)block, p->transport, plan_fwd_bytes(p), plan_bwd_bytes(p),
          (unsigned long long)plan_fwd_comm(p), (unsigned long long)plan_bwd_comm(p));
  return DA_SUCCESS;
}

da_status_t da_plan_create(da_comm_t *c, const da_problem_t *prob, const da_plan_config_t *cfg, da_plan_t **out) {
  da_error_clear();
  DA_ARG_CHECK(NULL, c != NULL, "da_plan_create: communicator is NULL");
  DA_ARG_CHECK(da_context_errbuf(c->ctx), out != NULL, "da_plan_create: output pointer is NULL");
  *out = NULL;
  da_plan_config_t def = DA_PLAN_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  da_plan_t *p = calloc(1, sizeof *p);
  /* Handles that da_plan_free looks at hold their null values from here on, whatever fails next
   * (calloc's zero is not MPI_COMM_NULL in Open MPI: freeing it aborts the job). */
  if (p) p->mcomm = MPI_COMM_NULL, p->comm = c;
  da_kparams_t kp;
  da_status_t st = p ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "plan");
  if (st == DA_SUCCESS && !prob) st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_plan_create: problem is NULL");
  if (st == DA_SUCCESS) st = plan_local(c, prob, cfg, p, &kp);
  c->ctl.phase = "plan";
  /* The setup collectives wait as long as the plan's own transfers would (the config's timeout,
   * when it is a valid one, else the communicator's). */
  const double ctl_timeout = c->ctl.timeout_s;
  if (cfg->size >= sizeof(size_t) + sizeof(unsigned) && cfg->timeout > 0 && isfinite(cfg->timeout))
    c->ctl.timeout_s = cfg->timeout;
  /* 1: every rank learns whether any rank rejected its arguments (and why). */
  st = da_xport_agree(&c->ctl, st, "plan");
  /* 2: every rank checks that all passed the same problem. */
  if (st == DA_SUCCESS) st = agree_problem(c, p, &kp);
  /* 3: layout, schedule, memory check, transport: can fail locally, so agree once more. */
  if (st == DA_SUCCESS) st = da_xport_agree(&c->ctl, plan_build(c, p, &kp), "plan");
  /* A setup collective timed out: a rank never got here (or is stuck). Name it. */
  if (st == DA_ERR_TIMEOUT)
    st = da_mpi_rollcall(c->comm, fmin(c->ctl.timeout_s, DA_ROLLCALL_GRACE_S), "da_plan_create");
  c->ctl.timeout_s = ctl_timeout;
  if (st != DA_SUCCESS) {
    da_plan_free(p);
    return da_context_finish(c->ctx, st);
  }
  *out = p;
  return da_context_finish(c->ctx, DA_SUCCESS);
}

int64_t da_plan_local_rows(const da_plan_t *p) { return p ? p->ring.nloc : -1; }

/* The context's error buffer of a plan (NULL plan: none, the thread-local message only). */
static da_errbuf_t *plan_errbuf(const da_plan_t *p) { return p ? da_context_errbuf(p->comm->ctx) : NULL; }

da_status_t da_plan_local_positions(const da_plan_t *p, int64_t *pos, int64_t n) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_plan_local_positions: plan is NULL");
  DA_ARG_CHECK(plan_errbuf(p), n >= p->ring.nloc && (pos || p->ring.nloc == 0),
               "da_plan_local_positions: room for %lld positions%s, rank %d has %lld rows", (long long)n,
               pos ? "" : " (pos is NULL)", p->ring.rank, (long long)p->ring.nloc);
  if (p->ring.nloc) memcpy(pos, p->positions, (size_t)p->ring.nloc * sizeof *pos);
  return da_errbuf_finish(plan_errbuf(p), DA_SUCCESS);
}

da_status_t da_plan_set_mode(da_plan_t *p, da_plan_mode_t mode) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_plan_set_mode: plan is NULL");
  DA_ARG_CHECK(plan_errbuf(p), (unsigned)mode <= DA_PLAN_COMM_ONLY,
               "da_plan_set_mode: mode %d (DA_PLAN_RUN, DA_PLAN_COMPUTE_ONLY, DA_PLAN_COMM_ONLY)", (int)mode);
  p->ring.mode = (da_ring_mode_t)mode;
  return da_errbuf_finish(plan_errbuf(p), DA_SUCCESS);
}

da_status_t da_plan_stats(const da_plan_t *p, da_plan_stats_t *s) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_plan_stats: plan is NULL");
  DA_ARG_CHECK(plan_errbuf(p), s != NULL, "da_plan_stats: stats is NULL");
  DA_ARG_CHECK(plan_errbuf(p), s->size >= sizeof(da_plan_stats_t) && s->version != 0 && s->version <= DA_API_VERSION,
               "da_plan_stats_t: size %zu / version %u not recognized (start from DA_PLAN_STATS_INITIALIZER)",
               s->size, s->version);
  const da_ring_t *R = &p->ring;
  s->rank = R->rank, s->nranks = R->P, s->nsteps = R->P;
  s->local_rows = R->nloc;
  s->pairs_total = p->pairs_total, s->pairs_rank = p->pairs_rank;
  s->fwd_s = R->fwd.wall_s, s->bwd_s = R->bwd.wall_s;
  s->fwd_compute_s = R->fwd.compute_s, s->bwd_compute_s = R->bwd.compute_s;
  s->fwd_exposed_s = R->fwd.exposed_s, s->bwd_exposed_s = R->bwd.exposed_s;
  s->fwd_bytes_sent = R->fwd.bytes_sent, s->bwd_bytes_sent = R->bwd.bytes_sent;
  s->mem_fwd_bytes = plan_fwd_bytes(p), s->mem_bwd_bytes = plan_bwd_bytes(p);
  s->peak_bytes = da_mem_peak();
  s->fwd_step_compute_s = R->fwd.step_compute_s, s->fwd_step_wait_s = R->fwd.step_wait_s;
  s->bwd_step_compute_s = R->bwd.step_compute_s, s->bwd_step_wait_s = R->bwd.step_wait_s;
  s->fwd_step_bytes = R->fwd.step_bytes, s->bwd_step_bytes = R->bwd.step_bytes;
  s->plan_fwd_bytes = plan_fwd_comm(p), s->plan_bwd_bytes = plan_bwd_comm(p);
  s->work_imbalance = p->algo == DA_ALGO_ULYSSES ? 1.0
                      : p->algo == DA_ALGO_HYBRID ? da_schedule_imbalance(&p->hy.ring.sched)
                                                  : da_schedule_imbalance(&R->sched);
  s->block = p->block_used;
  return da_errbuf_finish(plan_errbuf(p), DA_SUCCESS);
}

/* ---- tensors -------------------------------------------------------------------------------- */

/* A caller's tensor of local rows [B][n][heads][D] (or [B][n][heads] for lse, D == 0). */
typedef struct {
  char *base;
  int64_t bs, ld, hs;
  size_t esz;
  int packed; /* heads adjacent (head stride D): usable in place by the kernels */
} tview_t;

static da_status_t check_tensor(const da_plan_t *p, const char *name, const da_tensor_t *t, da_dtype_t dt,
                                int64_t heads, int64_t D, tview_t *v) {
  const int r = p->ring.rank;
  const int64_t B = p->prob.batch, n = p->ring.nloc;
  memset(v, 0, sizeof *v);
  if (!t) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: tensor is NULL", r, name);
  if (!t->data && n > 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: data pointer is NULL", r, name);
  if (t->dtype != dt)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: dtype %s, expected %s", r, name, da_dtype_name(t->dtype),
                  da_dtype_name(dt));
  if (t->device != da_context_device(p->comm->ctx))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: on device %d but the context runs on device %d", r, name,
                  (int)t->device, (int)da_context_device(p->comm->ctx));
  int nd = D ? 4 : 3;
  if (t->ndim != nd && t->ndim != nd - 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: ndim = %d, expected %d or %d", r, name, t->ndim, nd - 1, nd);
  int off = t->ndim == nd;
  if (off && t->shape[0] != B)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: shape[0] = %lld but batch = %lld", r, name,
                  (long long)t->shape[0], (long long)B);
  if (!off && B != 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: no batch axis but batch = %lld", r, name, (long long)B);
  const int64_t want[3] = {n, heads, D};
  const char *axis[3] = {"local rows (da_plan_local_rows)", "heads", "dim"};
  for (int i = 0; i < (D ? 3 : 2); i++)
    if (t->shape[off + i] != want[i])
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: shape[%d] (%s) = %lld, expected %lld", r, name, off + i,
                    axis[i], (long long)t->shape[off + i], (long long)want[i]);
  char who[32];
  snprintf(who, sizeof who, "rank %d: ", r);
  static const char *const names[4] = {"batch", "local rows", "heads", "dim"};
  DA_CHECK(da_tensor_check_strides(t, D ? da_dtype_size(dt) : sizeof(float), 1, who, name, names + 1 - off));
  v->esz = D ? da_dtype_size(dt) : sizeof(float);
  v->base = t->data;
  v->bs = off ? t->strides[0] : 0;
  v->ld = t->strides[off];
  v->hs = t->strides[off + 1];
  v->packed = heads == 1 || v->hs == (D ? D : 1);
  return DA_SUCCESS;
}

/* Heads packed for the driver: the view itself, or a packed copy (inputs) / a packed scratch
 * that unpack() scatters back (outputs). Unpacked views cost a copy; that is logged once. */
static da_status_t as_rview(const da_plan_t *p, const tview_t *v, int64_t heads, int64_t D, int copy_in,
                            void **tmp, da_rview_t *rv) {
  *tmp = NULL;
  if (p->ring.dev && !v->packed) /* packing would be host code on device memory */
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: a tensor on the device with head stride %lld: device tensors must "
                  "have adjacent heads (head stride = dim)", p->ring.rank, (long long)v->hs);
  if (v->packed) {
    *rv = (da_rview_t){v->base, v->bs, v->ld};
    return DA_SUCCESS;
  }
  const int64_t B = p->prob.batch, n = p->ring.nloc, w = D ? D : 1;
  char *t = da_malloc((size_t)(B * n * heads * w) * v->esz + 1, 64);
  if (!t) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: packing a strided tensor", p->ring.rank);
  DA_TRACE(DA_SUB_ALLOC, "packing a tensor whose heads are not adjacent (head stride %lld)", (long long)v->hs);
  if (copy_in)
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < n; i++)
        for (int64_t h = 0; h < heads; h++)
          memcpy(t + (size_t)(((b * n + i) * heads + h) * w) * v->esz,
                 v->base + (size_t)(b * v->bs + i * v->ld + h * v->hs) * v->esz, (size_t)w * v->esz);
  *tmp = t;
  *rv = (da_rview_t){t, n * heads * w, heads * w};
  return DA_SUCCESS;
}

static void unpack(const da_plan_t *p, const tview_t *v, int64_t heads, int64_t D, const char *t) {
  const int64_t B = p->prob.batch, n = p->ring.nloc, w = D ? D : 1;
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i < n; i++)
      for (int64_t h = 0; h < heads; h++)
        memcpy(v->base + (size_t)(b * v->bs + i * v->ld + h * v->hs) * v->esz,
               t + (size_t)(((b * n + i) * heads + h) * w) * v->esz, (size_t)w * v->esz);
}

/* Common tail of fwd/bwd: a timeout leaves peers in unknown states, so no agreement is tried
 * (it would only wait out a second deadline); anything else is agreed on by every rank. */
static da_status_t outcome(da_plan_t *p, da_status_t st, const char *what) {
  if (st == DA_ERR_TIMEOUT || p->ring.broken) {
    p->ring.broken = 1;
    return st;
  }
  return da_xport_agree(&p->xp, st, what);
}

/* The entry check of a call on a plan (fn names it in the message): clears the last error, then
 * refuses a NULL plan, and a plan whose ring had a transfer time out (its peers' state is unknown). */
static da_status_t plan_usable(da_plan_t *p, const char *fn) {
  da_error_clear();
  if (!p) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: plan is NULL", fn);
  if (p->ring.broken)
    return da_context_finish(p->comm->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: this plan had a transfer time "
                                                  "out; free it and create a new one", p->ring.rank));
  return DA_SUCCESS;
}

/* Device mode: lse is used in place, so it must be packed [B][n][H]. */
static da_status_t dev_lse(const da_plan_t *p, const tview_t *vl, float **out) {
  const int64_t n = p->ring.nloc, H = p->ring.kp.H;
  if (vl->hs != 1 || vl->ld != H || (p->prob.batch > 1 && vl->bs != n * H))
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: lse on the device must be packed [batch][rows][heads] (strides "
                  "%lld, %lld, %lld given)", p->ring.rank, (long long)vl->bs, (long long)vl->ld, (long long)vl->hs);
  *out = (float *)vl->base;
  return DA_SUCCESS;
}

/* The stream a call's work goes on: the caller's; in device mode without one, the plan's own, and
 * the call then drains it before returning (*drain = 1), so that it behaves like a host call. */
static da_status_t call_stream(da_plan_t *p, void *stream, void **use, int *drain) {
  *use = stream, *drain = 0;
  const da_devapi_t *dev = p->ring.dev;
  if (!dev || stream) return DA_SUCCESS;
  if (!p->own_stream) DA_CHECK(dev->stream_create(&p->own_stream));
  *use = p->own_stream, *drain = 1;
  return DA_SUCCESS;
}

#define NTMP 10

da_status_t da_plan_fwd(da_plan_t *p, const da_tensor_t *q, const da_tensor_t *k, const da_tensor_t *v,
                        da_tensor_t *out, da_tensor_t *lse, void *stream) {
  da_status_t st;
  if ((st = plan_usable(p, "da_plan_fwd"))) return st;
  const int64_t H = p->ring.kp.H, G = p->ring.kp.G, D = p->ring.kp.D, B = p->prob.batch, n = p->ring.nloc;
  const da_dtype_t dt = p->prob.dtype;
  tview_t vq, vk, vv, vo, vl;
  void *tmp[NTMP] = {0}, *use = NULL;
  float *lsebuf = NULL, *lsedev = NULL; /* host: a packed copy of lse; device: lse itself */
  int drain = 0;
  da_rview_t rq, rk, rv, ro;
  p->xp.phase = "forward";
  if ((st = check_tensor(p, "q", q, dt, H, D, &vq)) || (st = check_tensor(p, "k", k, dt, G, D, &vk)) ||
      (st = check_tensor(p, "v", v, dt, G, D, &vv)) || (st = check_tensor(p, "out", out, dt, H, D, &vo)) ||
      (lse && (st = check_tensor(p, "lse", lse, DA_FLOAT32, H, 0, &vl))))
    goto agreed;
  if ((st = as_rview(p, &vq, H, D, 1, &tmp[0], &rq)) || (st = as_rview(p, &vk, G, D, 1, &tmp[1], &rk)) ||
      (st = as_rview(p, &vv, G, D, 1, &tmp[2], &rv)) || (st = as_rview(p, &vo, H, D, 0, &tmp[3], &ro)))
    goto agreed;
  if (lse && p->ring.dev) st = dev_lse(p, &vl, &lsedev);
  else if (lse && !(lsebuf = da_malloc((size_t)(B * n * H) * sizeof(float) + 1, 64)))
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: lse buffer", p->ring.rank);
  if (st == DA_SUCCESS) st = call_stream(p, stream, &use, &drain);
agreed:
  /* Arguments first: a rank with a bad tensor must not leave its peers waiting in the ring. */
  st = da_xport_agree(&p->xp, st, "forward");
  if (st == DA_SUCCESS) {
    da_status_t local;
    const float *lsep = lsedev ? lsedev : lsebuf;
    if (p->algo == DA_ALGO_HYBRID) local = da_hybrid_fwd(&p->ring, &p->hy, rq, rk, rv, ro, lsebuf, use);
    else if (p->algo == DA_ALGO_ULYSSES) local = da_ulysses_fwd(&p->ring, rq, rk, rv, ro, lsebuf, use);
    else local = da_ring_fwd(&p->ring, rq, rk, rv, ro, (float *)lsep, use);
    if (local == DA_SUCCESS && drain) local = p->ring.dev->stream_sync(use);
    st = outcome(p, local, "forward");
    if (st == DA_SUCCESS && p->ring.mode == DA_RING_RUN) {
      if (tmp[3]) unpack(p, &vo, H, D, tmp[3]);
      if (lsebuf)
        for (int64_t b = 0; b < B; b++)
          for (int64_t i = 0; i < n; i++)
            for (int64_t h = 0; h < H; h++)
              ((float *)vl.base)[b * vl.bs + i * vl.ld + h * vl.hs] = lsebuf[(b * n + i) * H + h];
    }
  }
  for (int i = 0; i < NTMP; i++) da_free(tmp[i]);
  da_free(lsebuf);
  return da_context_finish(p->comm->ctx, st);
}

da_status_t da_plan_bwd(da_plan_t *p, const da_tensor_t *q, const da_tensor_t *k, const da_tensor_t *v,
                        const da_tensor_t *out, const da_tensor_t *dout, const da_tensor_t *lse, da_tensor_t *dq,
                        da_tensor_t *dk, da_tensor_t *dv, void *stream) {
  da_status_t st;
  if ((st = plan_usable(p, "da_plan_bwd"))) return st;
  const int64_t H = p->ring.kp.H, G = p->ring.kp.G, D = p->ring.kp.D, B = p->prob.batch, n = p->ring.nloc;
  const da_dtype_t dt = p->prob.dtype;
  tview_t vq, vk, vv, vo, vdo, vl, vdq, vdk, vdv;
  void *tmp[NTMP] = {0}, *use = NULL;
  float *lsebuf = NULL, *lsedev = NULL;
  int drain = 0;
  da_rview_t rq, rk, rv, ro, rdo, rdq, rdk, rdv;
  p->xp.phase = "backward";
  if ((st = check_tensor(p, "q", q, dt, H, D, &vq)) || (st = check_tensor(p, "k", k, dt, G, D, &vk)) ||
      (st = check_tensor(p, "v", v, dt, G, D, &vv)) || (st = check_tensor(p, "out", out, dt, H, D, &vo)) ||
      (st = check_tensor(p, "dout", dout, dt, H, D, &vdo)) ||
      (st = check_tensor(p, "lse", lse, DA_FLOAT32, H, 0, &vl)) ||
      (st = check_tensor(p, "dq", dq, dt, H, D, &vdq)) || (st = check_tensor(p, "dk", dk, dt, G, D, &vdk)) ||
      (st = check_tensor(p, "dv", dv, dt, G, D, &vdv)))
    goto agreed;
  if ((st = as_rview(p, &vq, H, D, 1, &tmp[0], &rq)) || (st = as_rview(p, &vk, G, D, 1, &tmp[1], &rk)) ||
      (st = as_rview(p, &vv, G, D, 1, &tmp[2], &rv)) || (st = as_rview(p, &vo, H, D, 1, &tmp[3], &ro)) ||
      (st = as_rview(p, &vdo, H, D, 1, &tmp[4], &rdo)) || (st = as_rview(p, &vdq, H, D, 0, &tmp[5], &rdq)) ||
      (st = as_rview(p, &vdk, G, D, 0, &tmp[6], &rdk)) || (st = as_rview(p, &vdv, G, D, 0, &tmp[7], &rdv)))
    goto agreed;
  if ((st = call_stream(p, stream, &use, &drain))) goto agreed;
  if (p->ring.dev) {
    st = dev_lse(p, &vl, &lsedev);
    goto agreed;
  }
  if (!(lsebuf = da_malloc((size_t)(B * n * H) * sizeof(float) + 1, 64))) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: lse buffer", p->ring.rank);
    goto agreed;
  }
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i < n; i++)
      for (int64_t h = 0; h < H; h++)
        lsebuf[(b * n + i) * H + h] = ((const float *)vl.base)[b * vl.bs + i * vl.ld + h * vl.hs];
agreed:
  st = da_xport_agree(&p->xp, st, "backward");
  if (st == DA_SUCCESS) {
    const float *lsep = lsedev ? lsedev : lsebuf;
    da_status_t local;
    if (p->algo == DA_ALGO_HYBRID)
      local = da_hybrid_bwd(&p->ring, &p->hy, rq, rk, rv, ro, rdo, lsep, rdq, rdk, rdv, use);
    else if (p->algo == DA_ALGO_ULYSSES)
      local = da_ulysses_bwd(&p->ring, rq, rk, rv, ro, rdo, lsep, rdq, rdk, rdv, use);
    else local = da_ring_bwd(&p->ring, rq, rk, rv, ro, rdo, lsep, rdq, rdk, rdv, use);
    if (local == DA_SUCCESS && drain) local = p->ring.dev->stream_sync(use);
    st = outcome(p, local, "backward");
    if (st == DA_SUCCESS && p->ring.mode == DA_RING_RUN) {
      if (tmp[5]) unpack(p, &vdq, H, D, tmp[5]);
      if (tmp[6]) unpack(p, &vdk, G, D, tmp[6]);
      if (tmp[7]) unpack(p, &vdv, G, D, tmp[7]);
    }
  }
  for (int i = 0; i < NTMP; i++) da_free(tmp[i]);
  da_free(lsebuf);
  return da_context_finish(p->comm->ctx, st);
}

/* ---- accessors for the other drivers of comm/ (kvcache.c, tree.c; declared in kvcache.h) ---- */
da_context_t *da_comm_context(const da_comm_t *c) { return c ? c->ctx : NULL; }
MPI_Comm da_comm_mpi(const da_comm_t *c) { return c ? c->comm : MPI_COMM_NULL; }

da_status_t da_comm_dup_bounded(const da_comm_t *comm, double requested, const char *fn, MPI_Comm *out,
                                double *timeout) {
  *timeout = requested > 0 && isfinite(requested) ? requested : da_comm_default_timeout();
  da_status_t st = da_mpi_comm_dup(da_comm_mpi(comm), *timeout, fn, out);
  if (st == DA_ERR_TIMEOUT) st = da_mpi_rollcall(da_comm_mpi(comm), fmin(*timeout, DA_ROLLCALL_GRACE_S), fn);
  return st;
}

void *da_comm_create_begin(da_comm_t *comm, void **out, const char *fn, size_t bytes, const char *what,
                           da_context_t **ctx, da_status_t *st) {
  *ctx = da_comm_context(comm);
  if (!comm) {
    *st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: communicator is NULL", fn);
    return NULL;
  }
  if (!out) {
    *st = da_context_finish(*ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: output is NULL", fn));
    return NULL;
  }
  *out = NULL;
  void *obj = calloc(1, bytes);
  if (!obj) *st = da_context_finish(*ctx, DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s", what));
  return obj;
}
