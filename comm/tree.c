/* tree.c: decode against the distributed paged KV cache (da_decode_* of include/distattn.h). Each
 * rank runs the kernel's split-KV decode on its own pages, producing fp32 partials (o, lse) per
 * query row; the partials are then combined either by ONE fused MPI reduction whose operator is
 * the (o, lse) merge (tree: MPI_Iallreduce or MPI_Ireduce to the owner, flat or two-level), or by
 * passing them around the ring in P-1 dependent steps (the baseline). No rank ever moves KV rows.
 * The cache itself is kvcache.c; the shard map partition/kvmap.c. */
#include <mpi.h> /* before distattn.h: declares the distributed section */
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "distattn.h"
#include "dtype.h"
#include "kvcache.h"
#include "tensor.h"

/* The ring's messages travel on the plan's own communicator, so this tag cannot meet the ring
 * attention driver's (transport.h) even if both ran at once. */
enum { DA_TAG_DECODE = 21 };

/* DISTATTN_DECODE_BLOCKING=1: the flat tree uses the blocking MPI_Allreduce and the ring the blocking
 * MPI_Bcast of its result (no deadline: a missing peer hangs them), to measure what the nonblocking
 * calls with polling cost, and for the simulator (SMPI's nonblocking collectives are linear in P). */
DA_PARAM(Blocking, "DECODE_BLOCKING", 0)

struct da_decode_plan {
  da_context_t *ctx;
  const da_kernels_t *kt;
  da_kparams_t kp;       /* H, G, D, scale, dtype, mask (causal), threads */
  int64_t B;
  da_decode_config_t cfg;
  char transport[16];
  MPI_Comm mcomm;        /* the plan's own duplicate */
  da_xport_t xp;         /* agreement and the ring's exchanges */
  int rank, P;
  /* tree: one partial row is D + 1 floats (o then lse); the operator merges rows */
  MPI_Datatype rowtype;
  MPI_Op op;
  int have_type, have_op;
  MPI_Comm node, leaders; /* two-level: this rank's node group, and the node leaders (MPI_COMM_NULL
                             on non-leaders) */
  int node_rank, node_size, nnodes, leader_rank, root_leader;
  /* buffers, grown with B * T * H */
  int64_t cap_rows;
  float *part;                   /* [rows][D + 1] */
  char *msg;                     /* ring: the travelling message, partials [rows][D + 1] then q */
  float *o, *lse;                /* kernel outputs of one sequence: [T][H][D], [T][H] */
  char *qpack;                   /* q of one sequence with its heads packed, when the caller's are not */
  int64_t cap_t;
  int64_t last_t; /* T of the previous step (1 at first) */
  int broken; /* a reduction timed out: MPI may still write into part (leaked on free) */
  da_decode_stats_t st;
  /* ---- the device tree (a device transport: host-ipc on the host seam, cuda-ipc, nccl) ----
   * Partials on the device, merged by two device allreduces (xp.t->allreduce_dev): the max of lse
   * (plus one failure flag), then the sum of the rescaled o and of l = exp(lse - max). */
  const da_devapi_t *dev; /* NULL: the host paths above */
  da_dstream_t dstream;   /* the plan's stream: kernels, copies, and xp.stream for the allreduces */
  float *d_sum;           /* device [rows][D] o, then [rows] l: one contiguous sum */
  float *d_max;           /* device [rows] lse, then the max; [rows] = failure flag */
  char *d_q;              /* device [B][T][H][D] q in the plan dtype */
  float *h_sum, *h_max, *h_lse; /* host staging of the same, and this rank's own lse */
  char *h_q;                    /* host [B][T][H][D] q packed, before its copy */
  int64_t dcap_rows;
};

/* ---- the merge operator (kvcache.h) ---------------------------------------------------------------- */

/* inout[i] = merge(in[i], inout[i]) for n rows of D + 1 floats, through the CPU backend's merge
 * (the partials are in host memory here whatever the backend). */
static void merge_rows(const float *in, float *inout, int64_t n, int D) {
  static const da_kernels_t *cpu;
  if (!cpu) cpu = da_kernels_get(DA_DEVICE_CPU);
  da_kparams_t kp1;
  memset(&kp1, 0, sizeof kp1);
  kp1.H = 1, kp1.G = 1, kp1.D = D, kp1.scale = 1.0f, kp1.dtype = DA_FLOAT32, kp1.nthreads = 1;
  const int64_t w = D + 1;
  for (int64_t i = 0; i < n; i++) {
    const float *b = in + i * w;
    float *a = inout + i * w;
    if (da_lse_is(a[D], DA_LSE_TRAILER)) {
      for (int d = 0; d < D; d++) a[d] = d == DA_TRAILER_KV_BYTES ? a[d] + b[d] : fmaxf(a[d], b[d]);
      continue;
    }
    if (da_lse_is(a[D], DA_LSE_POISON)) continue;
    if (da_lse_is(b[D], DA_LSE_POISON)) {
      a[D] = b[D];
      continue;
    }
    cpu->merge(&kp1, 1, a, a + D, b, b + D, NULL);
  }
}

void da_partial_merge_op(void *in, void *inout, int *len, MPI_Datatype *dt) {
  int bytes = 0;
  MPI_Type_size(*dt, &bytes);
  merge_rows(in, inout, *len, bytes / (int)sizeof(float) - 1);
}

/* ---- waiting with a deadline ----------------------------------------------------------------------- */

/* A collective request cannot be cancelled: on timeout the plan is marked broken and its buffers
 * are never reused or freed. */
static da_status_t coll_wait(da_decode_plan_t *p, MPI_Request *r, const char *what) {
  int done = 0, rc = da_mpi_poll(r, p->xp.timeout_s, &done);
  if (rc == MPI_SUCCESS && done) return DA_SUCCESS;
  p->broken = 1;
  if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "rank %d decode: %s", p->rank, what);
  return DA_ERR(DA_ERR_TIMEOUT, "rank %d decode: %s did not complete within %g s (a peer is missing or stuck)",
                p->rank, what, p->xp.timeout_s);
}

/* ---- bytes of a binomial tree (the model for what the tree sends; MPI picks its own algorithm) -- */

/* Children of relative rank v in a binomial broadcast tree of n ranks rooted at 0. */
static int binomial_children(int v, int n) {
  int c = 0;
  for (int m = 1; m < n; m <<= 1) {
    if (v & m) break; /* m reached v's lowest set bit: above it lies the parent */
    if (v + m < n) c++;
  }
  return c;
}

static uint64_t tree_bytes(const da_decode_plan_t *p, uint64_t m) {
  const int root = p->cfg.root, all = root < 0;
  if (p->P == 1) return 0;
  if (p->cfg.topo == DA_TOPO_FLAT) {
    int r0 = all ? 0 : root, v = (p->rank - r0 + p->P) % p->P;
    return m * (uint64_t)((v != 0) + (all ? binomial_children(v, p->P) : 0));
  }
  uint64_t msgs = p->node_rank != 0; /* reduce within the node */
  if (p->node_rank == 0 && p->nnodes > 1) {
    int v = (p->leader_rank - (all ? 0 : p->root_leader) + p->nnodes) % p->nnodes;
    msgs += (v != 0) + (all ? binomial_children(v, p->nnodes) : 0);
  }
  if (all) msgs += binomial_children(p->node_rank, p->node_size); /* broadcast within the node */
  return m * msgs;
}

/* ---- plan ------------------------------------------------------------------------------------------ */

void da_decode_plan_free(da_decode_plan_t *p) {
  if (!p) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    if (p->have_op) MPI_Op_free(&p->op);
    if (p->have_type) MPI_Type_free(&p->rowtype);
    if (p->node != MPI_COMM_NULL) MPI_Comm_free(&p->node);
    if (p->leaders != MPI_COMM_NULL) MPI_Comm_free(&p->leaders);
  }
  if (p->dev) {
    if (p->dstream) (void)p->dev->stream_sync(p->dstream);
    da_dev_free(p->dev, p->d_sum), da_dev_free(p->dev, p->d_max), da_dev_free(p->dev, p->d_q);
  }
  free(p->h_sum), free(p->h_max), free(p->h_lse), free(p->h_q);
  da_xport_close(&p->xp); /* before the stream it was given */
  if (p->dev && p->dstream) p->dev->stream_destroy(p->dstream);
  if (p->mcomm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&p->mcomm);
  if (!p->broken) da_free(p->part); /* else MPI may still write into it */
  da_free(p->msg);
  da_free(p->o), da_free(p->lse), da_free(p->qpack);
  free(p);
}

static da_status_t plan_local(da_decode_plan_t *p, const da_problem_t *prob, const da_decode_config_t *cfg) {
  if (cfg->size < sizeof(size_t) + sizeof(unsigned) || cfg->version == 0 || cfg->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_decode_config_t: size %zu / version %u not recognized (start from "
                  "DA_DECODE_CONFIG_INITIALIZER)", cfg->size, cfg->version);
  if ((unsigned)cfg->algo > DA_DECODE_RING)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: unknown algo %d (tree, ring)", (int)cfg->algo);
  if ((unsigned)cfg->topo > DA_TOPO_TWO_LEVEL)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: unknown topo %d (flat, two-level)", (int)cfg->topo);
  if (cfg->root < -1 || cfg->root >= p->P)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: root %d is not -1 (every rank) or a rank of 0..%d", cfg->root,
                  p->P - 1);
  if (cfg->node_size < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: node_size %d must be >= 0 (0 = shared memory)",
                  cfg->node_size);
  if (!(cfg->timeout >= 0) || !isfinite(cfg->timeout))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: timeout %g s must be >= 0", cfg->timeout);
  const char *tp = cfg->transport ? cfg->transport : da_param_string("DISTATTN_TRANSPORT");
  if (!tp) tp = "mpi";
  tp = da_transport_resolve(tp, da_context_device(p->ctx) == DA_DEVICE_CUDA); /* mpi on the GPU: staged */
  const da_transport_t *t = da_transport_find(tp);
  if (!t) return DA_ERR_INVALID_ARGUMENT;
  if (t->devapi && (cfg->algo != DA_DECODE_TREE || cfg->topo != DA_TOPO_FLAT))
    return DA_ERR(DA_ERR_UNSUPPORTED, "decode config: on the %s transport (device memory) only the flat tree is built; "
                  "the ring and the two-level tree combine partials in host memory with MPI (use algo tree, topo flat, "
                  "or the mpi transport)", t->name);
  if (t->devapi && !t->allreduce_dev)
    return DA_ERR(DA_ERR_UNSUPPORTED, "decode config: the %s transport has no device allreduce", t->name);
  if (!strcmp(tp, "self") && p->P != 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "decode config: the self transport runs one rank, this job has %d", p->P);
  snprintf(p->transport, sizeof p->transport, "%s", tp);
  p->cfg = *cfg;
  p->cfg.transport = NULL;
  if (!prob) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_decode_plan_create: problem is NULL");
  /* CPU kernels read host memory (the host seam's "device" memory is host memory too); CUDA kernels
   * read CUDA memory, which only the cuda-ipc and nccl transports hold. */
  const da_device_t want = t->devapi && strcmp(t->devapi->name, "host") ? DA_DEVICE_CUDA : DA_DEVICE_CPU;
  if (da_context_device(p->ctx) != want)
    return DA_ERR(DA_ERR_UNSUPPORTED, "decode: the %s transport keeps partials and KV pages in %s memory, which a %s "
                  "context's kernels cannot read", t->name, t->devapi ? t->devapi->name : "host",
                  da_context_device(p->ctx) == DA_DEVICE_CPU ? "CPU" : "CUDA");
  if (prob->mask & DA_MASK_DOC)
    return DA_ERR(DA_ERR_UNSUPPORTED, "decode: document masks are not supported (one sequence per batch element)");
  da_problem_t pr = *prob;
  if (pr.seq < 1) pr.seq = 1; /* the cache decides the lengths */
  pr.mask = (prob->mask & DA_MASK_WINDOW) ? (DA_MASK_CAUSAL | DA_MASK_WINDOW) : DA_MASK_CAUSAL;
  pr.ndocs = 0, pr.cu_seqlens = NULL;
  DA_CHECK(da_context_params(p->ctx, &pr, &p->kp));
  p->kt = da_context_kernels(p->ctx);
  p->B = prob->batch;
  return DA_SUCCESS;
}

/* Datatype, operator and (two-level) communicators. Collective over the plan's communicator. */
static da_status_t plan_build(da_decode_plan_t *p) {
  DA_MPICHECK(MPI_Type_contiguous(p->kp.D + 1, MPI_FLOAT, &p->rowtype), "rank %d decode: MPI_Type_contiguous", p->rank);
  p->have_type = 1;
  DA_MPICHECK(MPI_Type_commit(&p->rowtype), "rank %d decode: MPI_Type_commit", p->rank);
  /* commute = 1: merge(a, b) == merge(b, a) bit for bit, and MPI may then pick any tree. */
  DA_MPICHECK(MPI_Op_create(da_partial_merge_op, 1, &p->op), "rank %d decode: MPI_Op_create", p->rank);
  p->have_op = 1;
  p->node_rank = 0, p->node_size = 1, p->nnodes = p->P, p->leader_rank = p->rank, p->root_leader = 0;
  if (p->cfg.algo != DA_DECODE_TREE || p->cfg.topo != DA_TOPO_TWO_LEVEL) return DA_SUCCESS;
  /* The root (reduce mode) leads its node, so the leaders' reduction ends on it. */
  const int root = p->cfg.root, key = root >= 0 ? (p->rank == root ? 0 : p->rank + 1) : p->rank;
  if (p->cfg.node_size > 0)
    DA_MPICHECK(MPI_Comm_split(p->mcomm, p->rank / p->cfg.node_size, key, &p->node),
                "rank %d decode: MPI_Comm_split (nodes)", p->rank);
  else
    DA_MPICHECK(MPI_Comm_split_type(p->mcomm, MPI_COMM_TYPE_SHARED, key, MPI_INFO_NULL, &p->node),
                "rank %d decode: MPI_Comm_split_type (shared memory)", p->rank);
  DA_MPICHECK(MPI_Comm_set_errhandler(p->node, MPI_ERRORS_RETURN), "rank %d decode: errhandler", p->rank);
  DA_MPICHECK(MPI_Comm_rank(p->node, &p->node_rank), "rank %d decode: node rank", p->rank);
  DA_MPICHECK(MPI_Comm_size(p->node, &p->node_size), "rank %d decode: node size", p->rank);
  DA_MPICHECK(MPI_Comm_split(p->mcomm, p->node_rank == 0 ? 0 : MPI_UNDEFINED, p->rank, &p->leaders),
              "rank %d decode: MPI_Comm_split (leaders)", p->rank);
  int64_t f[2] = {p->node_rank == 0, 0}; /* node groups; the root's index among the leaders */
  p->leader_rank = -1;
  if (p->leaders != MPI_COMM_NULL) {
    DA_MPICHECK(MPI_Comm_set_errhandler(p->leaders, MPI_ERRORS_RETURN), "rank %d decode: errhandler", p->rank);
    DA_MPICHECK(MPI_Comm_rank(p->leaders, &p->leader_rank), "rank %d decode: leader rank", p->rank);
    if (p->rank == root) f[1] = p->leader_rank;
  }
  DA_CHECK(p->xp.t->allreduce(&p->xp, f, 2, DA_XT_INT64, DA_XOP_SUM));
  p->nnodes = (int)f[0];
  p->root_leader = (int)f[1];
  return DA_SUCCESS;
}

da_status_t da_decode_plan_create(da_comm_t *comm, const da_problem_t *prob, const da_decode_config_t *cfg,
                                  da_decode_plan_t **out) {
  da_error_clear();
  da_context_t *ctx;
  da_status_t st;
  da_decode_plan_t *p =
      da_comm_create_begin(comm, (void **)out, "da_decode_plan_create", sizeof *p, "decode plan", &ctx, &st);
  if (!p) return st;
  da_decode_config_t def = DA_DECODE_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  p->ctx = ctx;
  p->mcomm = p->node = p->leaders = MPI_COMM_NULL;
  /* The plan's duplicate, bounded: a rank that never calls this must not hang the others. The
   * two-level split below comes only after an agreement that has seen every rank. */
  double timeout;
  st = da_comm_dup_bounded(comm, cfg->timeout, "da_decode_plan_create", &p->mcomm, &timeout);
  if (st != DA_SUCCESS) {
    da_decode_plan_free(p);
    return da_context_finish(ctx, st);
  }
  MPI_Comm_set_errhandler(p->mcomm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(p->mcomm, &p->rank);
  MPI_Comm_size(p->mcomm, &p->P);
  /* One transport for both agreement and the ring: the self transport only exists at P = 1; a
   * device transport (the device tree) is opened itself, for its device allreduce. */
  const char *tp = cfg->transport ? cfg->transport : da_param_string("DISTATTN_TRANSPORT");
  tp = da_transport_resolve(tp, da_context_device(ctx) == DA_DEVICE_CUDA); /* mpi on the GPU: staged (cuda-mpi) */
  const da_transport_t *tt = tp && strcmp(tp, "mpi") && strcmp(tp, "self") ? da_transport_find(tp) : NULL;
  da_error_clear(); /* an unknown name is reported by plan_local, on every rank */
  st = da_xport_open(&p->xp, tt && tt->devapi ? tp : tp && !strcmp(tp, "self") && p->P == 1 ? "self" : "mpi", p->mcomm,
                     timeout);
  if (st == DA_SUCCESS && p->xp.t->devapi) {
    p->dev = p->xp.t->devapi;
    st = p->dev->stream_create(&p->dstream);
    p->xp.stream = p->dstream;
  }
  if (st != DA_SUCCESS) {
    da_decode_plan_free(p);
    return da_context_finish(ctx, st);
  }
  p->xp.phase = "decode plan";
  st = da_xport_agree(&p->xp, plan_local(p, prob, cfg), "decode plan");
  if (st == DA_SUCCESS) {
    uint32_t sb;
    memcpy(&sb, &p->kp.scale, 4);
    const int64_t f[] = {p->B, p->kp.H, p->kp.G, p->kp.D, p->kp.dtype, sb, p->kp.mask.flags,
                         (p->kp.mask.flags & DA_MASK_WINDOW) ? p->kp.mask.window : 0, p->cfg.algo, p->cfg.topo,
                         p->cfg.root, p->cfg.node_size, (int64_t)(da_fnv1a(DA_FNV_INIT, p->transport,
                                                                              strlen(p->transport)) >> 2)};
    static const char *const names[] = {"batch", "heads", "kv_heads", "dim", "dtype", "scale", "mask", "window",
                                        "algo", "topo", "root", "node_size", "#transport"};
    st = da_agree_fields(&p->xp, f, 13, names, "decode plan");
  }
  if (st == DA_SUCCESS) st = da_xport_agree(&p->xp, plan_build(p), "decode plan");
  if (st != DA_SUCCESS) {
    da_decode_plan_free(p);
    return da_context_finish(ctx, st);
  }
  p->last_t = 1;
  p->st.size = sizeof p->st, p->st.version = DA_API_VERSION;
  p->st.rank = p->rank, p->st.nranks = p->P;
  p->st.levels = p->cfg.algo == DA_DECODE_TREE && p->cfg.topo == DA_TOPO_TWO_LEVEL ? 2 : 1;
  p->st.nodes = p->st.levels == 2 ? p->nnodes : 1;
  DA_INFO(DA_SUB_PLAN, "decode plan: %s%s over %d ranks (%d node groups), %s, B %lld H %d G %d D %d",
          p->cfg.algo == DA_DECODE_TREE ? "tree" : "ring",
          p->cfg.algo == DA_DECODE_TREE ? (p->cfg.topo == DA_TOPO_TWO_LEVEL ? " two-level" : " flat") : "", p->P,
          p->st.nodes, p->cfg.root < 0 ? "output on every rank" : "output on the root", (long long)p->B, p->kp.H,
          p->kp.G, p->kp.D);
  *out = p;
  return da_context_finish(ctx, DA_SUCCESS);
}

da_status_t da_decode_plan_stats(const da_decode_plan_t *p, da_decode_stats_t *s) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_decode_plan_stats: plan is NULL");
  da_errbuf_t *e = da_context_errbuf(p->ctx);
  DA_ARG_CHECK(e, s != NULL, "da_decode_plan_stats: stats is NULL");
  DA_ARG_CHECK(e, s->size >= sizeof(da_decode_stats_t) && s->version != 0 && s->version <= DA_API_VERSION,
               "da_decode_stats_t: size %zu / version %u not recognized (start from DA_DECODE_STATS_INITIALIZER)",
               s->size, s->version);
  *s = p->st;
  s->peak_bytes = da_mem_peak();
  return da_errbuf_finish(e, DA_SUCCESS);
}

/* ---- one step ---------------------------------------------------------------------------------------- */

/* A caller's q / out ([B][T][H][D] or [B][H][D]) or lse ([B][T][H] or [B][H]) view. */
typedef struct {
  char *base;
  int64_t sb, st, sh; /* strides of batch, token, head (elements) */
  size_t esz;
} qview_t;

static da_status_t check_q(const da_decode_plan_t *p, const char *name, const da_tensor_t *t, da_dtype_t dt, int64_t T,
                           int has_d, qview_t *v) {
  const int r = p->rank;
  const int64_t H = p->kp.H, D = p->kp.D;
  if (!t) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: tensor is NULL", r, name);
  if (!t->data) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: data pointer is NULL", r, name);
  if (t->dtype != dt)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: dtype %s, expected %s", r, name, da_dtype_name(t->dtype),
                  da_dtype_name(dt));
  if (t->device != DA_DEVICE_CPU)
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: %s: decode reads host memory (device %d given)", r, name, (int)t->device);
  const int full = has_d ? 4 : 3;
  if (t->ndim != full && t->ndim != full - 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: ndim = %d, expected %d ([B][T]%s) or %d ([B]%s)", r, name,
                  t->ndim, full, has_d ? "[H][D]" : "[H]", full - 1, has_d ? "[H][D]" : "[H]");
  const int tok = t->ndim == full;
  int64_t want[4], n = 0;
  want[n++] = p->B;
  if (tok) want[n++] = T;
  want[n++] = H;
  if (has_d) want[n++] = D;
  for (int i = 0; i < t->ndim; i++)
    if (t->shape[i] != want[i])
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: shape[%d] = %lld, expected %lld", r, name, i,
                    (long long)t->shape[i], (long long)want[i]);
  const char *names[4];
  int na = 0;
  names[na++] = "batch";
  if (tok) names[na++] = "tokens";
  names[na++] = "heads";
  if (has_d) names[na++] = "dim";
  char who[32];
  snprintf(who, sizeof who, "rank %d: ", r);
  DA_CHECK(da_tensor_check_strides(t, has_d ? da_dtype_size(dt) : sizeof(float), has_d, who, name, names));
  v->base = t->data;
  v->sb = t->strides[0];
  v->st = tok ? t->strides[1] : 0;
  v->sh = t->strides[tok + 1];
  v->esz = has_d ? da_dtype_size(dt) : sizeof(float);
  return DA_SUCCESS;
}

static da_status_t grow(da_decode_plan_t *p, int64_t T) {
  const int64_t H = p->kp.H, D = p->kp.D, rows = p->B * T * H;
  if (rows > p->cap_rows) {
    da_free(p->part), da_free(p->msg);
    const size_t bytes = (size_t)rows * (size_t)(D + 1) * sizeof(float);
    const size_t qbytes = (size_t)rows * (size_t)D * da_dtype_size(p->kp.dtype);
    p->part = da_malloc(bytes, 64);
    p->msg = p->cfg.algo == DA_DECODE_RING ? da_malloc(bytes + qbytes, 64) : NULL;
    p->cap_rows = 0;
    if (!p->part || (p->cfg.algo == DA_DECODE_RING && !p->msg))
      return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: decode partials for %lld rows", p->rank, (long long)rows);
    p->cap_rows = rows;
  }
  if (T > p->cap_t) {
    da_free(p->o), da_free(p->lse), da_free(p->qpack);
    p->o = da_malloc((size_t)(T * H * D) * sizeof(float), 64);
    p->lse = da_malloc((size_t)(T * H) * sizeof(float), 64);
    p->qpack = da_malloc((size_t)(T * H * D) * da_dtype_size(p->kp.dtype), 64);
    p->cap_t = 0;
    if (!p->o || !p->lse || !p->qpack) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: decode buffers", p->rank);
    p->cap_t = T;
  }
  return DA_SUCCESS;
}

/* This rank's partials of every query row into p->part ([B][T][H] rows of D + 1 floats). */
static da_status_t local_partials(da_decode_plan_t *p, const da_kvcache_t *c, const qview_t *vq, int64_t T,
                                  uint64_t *kv_bytes) {
  const int H = p->kp.H, D = p->kp.D, w = D + 1;
  const size_t es = da_dtype_size(p->kp.dtype);
  *kv_bytes = 0;
  for (int64_t b = 0; b < p->B; b++) {
    const da_kvseq_t *s = &c->seq[b];
    float *rows = p->part + (size_t)(b * T * H) * (size_t)w;
    if (s->npages == 0 || s->rows == 0) { /* nothing here: the merge's identity */
      for (int64_t i = 0; i < T * H; i++) {
        memset(rows + i * w, 0, (size_t)D * sizeof(float));
        rows[i * w + D] = -INFINITY;
      }
      continue;
    }
    /* q rows of sequence b with heads packed (head stride D), as the kernel contract wants. */
    const char *qb = vq->base + (size_t)(b * vq->sb) * es;
    int64_t ldq = vq->st;
    if (vq->sh != D || (T > 1 && vq->st < (int64_t)H * D)) {
      for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
          memcpy(p->qpack + (size_t)((t * H + h) * D) * es, qb + (size_t)(t * vq->st + h * vq->sh) * es, (size_t)D * es);
      qb = p->qpack;
      ldq = (int64_t)H * D;
    }
    if (T == 1) ldq = (int64_t)H * D; /* one row: its stride is never used to step */
    DA_CHECK(p->kt->decode(&p->kp, qb, ldq, da_span(s->len - T, 1, T), s->pages, (int)s->npages, p->o, p->lse, NULL));
    for (int64_t i = 0; i < T * H; i++) {
      memcpy(rows + i * w, p->o + i * D, (size_t)D * sizeof(float));
      rows[i * w + D] = p->lse[i];
    }
    *kv_bytes += (uint64_t)s->rows * 2 * c->row_bytes;
  }
  return DA_SUCCESS;
}

/* Tree: one fused reduction with the merge operator (flat), or node / leaders / node (two-level). */
static da_status_t tree_reduce(da_decode_plan_t *p, int64_t rows) {
  if (p->P == 1) return DA_SUCCESS;
  if (rows > INT32_MAX) return DA_ERR(DA_ERR_UNSUPPORTED, "decode: %lld partial rows exceed an MPI count", (long long)rows);
  const int n = (int)rows, root = p->cfg.root;
  MPI_Request r;
  if (p->cfg.topo == DA_TOPO_FLAT) {
    if (da_param_Blocking() && root < 0) { /* measurement aid: no deadline */
      DA_MPICHECK(MPI_Allreduce(MPI_IN_PLACE, p->part, n, p->rowtype, p->op, p->mcomm), "rank %d decode: MPI_Allreduce",
                  p->rank);
      return DA_SUCCESS;
    }
    if (root < 0) {
      DA_MPICHECK(MPI_Iallreduce(MPI_IN_PLACE, p->part, n, p->rowtype, p->op, p->mcomm, &r),
                  "rank %d decode: MPI_Iallreduce", p->rank);
      return coll_wait(p, &r, "the merge allreduce");
    }
    DA_MPICHECK(MPI_Ireduce(p->rank == root ? MPI_IN_PLACE : p->part, p->rank == root ? p->part : NULL, n, p->rowtype,
                            p->op, root, p->mcomm, &r),
                "rank %d decode: MPI_Ireduce", p->rank);
    return coll_wait(p, &r, "the merge reduce");
  }
  /* Within the node first (shared memory), then across node leaders, then back within the node. */
  if (p->node_size > 1) {
    DA_MPICHECK(MPI_Ireduce(p->node_rank == 0 ? MPI_IN_PLACE : p->part, p->node_rank == 0 ? p->part : NULL, n,
                            p->rowtype, p->op, 0, p->node, &r),
                "rank %d decode: MPI_Ireduce (node)", p->rank);
    DA_CHECK(coll_wait(p, &r, "the merge reduce within the node"));
  }
  if (p->leaders != MPI_COMM_NULL && p->nnodes > 1) {
    if (root < 0) {
      DA_MPICHECK(MPI_Iallreduce(MPI_IN_PLACE, p->part, n, p->rowtype, p->op, p->leaders, &r),
                  "rank %d decode: MPI_Iallreduce (leaders)", p->rank);
      DA_CHECK(coll_wait(p, &r, "the merge allreduce across node leaders"));
    } else {
      const int me = p->leader_rank == p->root_leader;
      DA_MPICHECK(MPI_Ireduce(me ? MPI_IN_PLACE : p->part, me ? p->part : NULL, n, p->rowtype, p->op, p->root_leader,
                              p->leaders, &r),
                  "rank %d decode: MPI_Ireduce (leaders)", p->rank);
      DA_CHECK(coll_wait(p, &r, "the merge reduce across node leaders"));
    }
  }
  if (root < 0 && p->node_size > 1) {
    DA_MPICHECK(MPI_Ibcast(p->part, n, p->rowtype, 0, p->node, &r), "rank %d decode: MPI_Ibcast (node)", p->rank);
    DA_CHECK(coll_wait(p, &r, "the broadcast within the node"));
  }
  return DA_SUCCESS;
}

/* Ring (the baseline of the paper): the query and the running partials travel along the ring.
 * The chain starts on the rank after the owner (root; rank P-1 when every rank wants the output)
 * and ends on the owner: rank k of the chain waits for the message of rank k-1, decodes ITS shard
 * with the query it carries, merges, and passes it on: P-1 dependent steps, each holding one
 * shard's decode on the critical path. With root = -1 the owner then broadcasts the result (one
 * MPI_Ibcast, as the tree's allreduce ends with a broadcast too). */
static da_status_t ring_step(da_decode_plan_t *p, const da_kvcache_t *c, const qview_t *vq, int64_t T, int ok,
                             uint64_t *kv_bytes, double *compute_s, uint64_t *sent, da_status_t *local) {
  const int P = p->P, H = p->kp.H, D = p->kp.D, w = D + 1;
  const int64_t rows = p->B * T * H;
  const size_t es = da_dtype_size(p->kp.dtype), pbytes = (size_t)rows * (size_t)w * sizeof(float);
  const size_t bytes = pbytes + (size_t)rows * (size_t)D * es;
  const int owner = p->cfg.root >= 0 ? p->cfg.root : P - 1, first = (owner + 1) % P;
  const int k = (p->rank - first + P) % P, next = (p->rank + 1) % P, prev = (p->rank + P - 1) % P;
  float *mrows = (float *)p->msg;
  char *mq = p->msg + pbytes;
  /* the query as it travels: packed [B][T][H][D] behind the partials */
  const qview_t vm = {mq, T * H * D, (int64_t)H * D, D, es};
  da_xreq_t *req = NULL;
  *sent = 0, *kv_bytes = 0, *compute_s = 0;
  if (k > 0) { /* wait for the query and the partials so far */
    DA_CHECK(p->xp.t->exchange_start(&p->xp, NULL, 0, next, p->msg, bytes, prev, DA_TAG_DECODE, k, &req));
    DA_CHECK(p->xp.t->wait(&p->xp, req));
  } else if (ok) { /* the chain's first rank sends its own query along */
    for (int64_t b = 0; b < p->B; b++)
      for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
          memcpy(mq + (size_t)(((b * T + t) * H + h) * D) * es,
                 vq->base + (size_t)(b * vq->sb + t * vq->st + h * vq->sh) * es, (size_t)D * es);
  }
  const double t0 = da_time_now();
  if (ok) {
    *local = local_partials(p, c, k > 0 ? &vm : vq, T, kv_bytes);
    ok = *local == DA_SUCCESS;
  }
  *compute_s = da_time_now() - t0;
  if (!ok)
    for (int64_t i = 0; i < rows; i++) p->part[i * w + D] = da_bits_to_f32(DA_LSE_POISON);
  if (k > 0) merge_rows(mrows, p->part, rows, D);
  if (k < P - 1) {
    memcpy(mrows, p->part, pbytes);
    DA_CHECK(p->xp.t->exchange_start(&p->xp, p->msg, bytes, next, NULL, 0, prev, DA_TAG_DECODE, k + 1, &req));
    DA_CHECK(p->xp.t->wait(&p->xp, req));
    *sent += bytes;
  }
  if (p->cfg.root < 0 && P > 1) {
    if (rows > INT32_MAX) return DA_ERR(DA_ERR_UNSUPPORTED, "decode: %lld rows exceed an MPI count", (long long)rows);
    if (da_param_Blocking()) { /* measurement aid, as the tree's: no deadline */
      DA_MPICHECK(MPI_Bcast(p->part, (int)rows, p->rowtype, owner, p->mcomm), "rank %d decode: MPI_Bcast (ring result)",
                  p->rank);
    } else {
      MPI_Request r;
      DA_MPICHECK(MPI_Ibcast(p->part, (int)rows, p->rowtype, owner, p->mcomm, &r),
                  "rank %d decode: MPI_Ibcast (ring result)", p->rank);
      DA_CHECK(coll_wait(p, &r, "the broadcast of the ring's result"));
    }
    *sent += pbytes * (uint64_t)binomial_children((p->rank - owner + P) % P, P);
  }
  return DA_SUCCESS;
}

/* The step's local checks of the cache and the caller's tensors. T (queries per sequence) comes
 * from q; a rank whose q is unusable still needs the row count its peers use: it assumes the
 * previous step's T (decode loops keep T fixed); a different T makes the reduction fail, not hang. */
static da_status_t check_step(da_decode_plan_t *p, da_kvcache_t *c, const da_tensor_t *q, const da_tensor_t *out,
                              const da_tensor_t *lse, int gets_output, int64_t *T, qview_t *vq, qview_t *vo,
                              qview_t *vl) {
  const int D = p->kp.D;
  *T = q && q->ndim == 4 && q->shape[1] >= 1 ? q->shape[1] : q && q->ndim == 3 ? 1 : p->last_t;
  if (!c) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_decode_step: cache is NULL", p->rank);
  if (c->broken) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: the kv cache had a failed append", p->rank);
  if (c->chk_st != DA_SUCCESS) /* every rank learnt it at once: its ranks disagreed, or a check timed out */
    return da_kvcache_check_finish(c, "da_decode_step");
  if (c->B != p->B || c->G != p->kp.G || c->D != D || c->dtype != p->kp.dtype)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                  "rank %d: the cache holds %lld sequences of [%d][%d] %s rows, the plan "
                  "expects %lld of [%d][%d] %s",
                  p->rank, (long long)c->B, c->G, c->D, da_dtype_name(c->dtype), (long long)p->B, p->kp.G, D,
                  da_dtype_name(p->kp.dtype));
  DA_CHECK(check_q(p, "q", q, p->kp.dtype, *T, 1, vq));
  if (gets_output) DA_CHECK(check_q(p, "out", out, p->kp.dtype, *T, 1, vo));
  if (gets_output && lse) DA_CHECK(check_q(p, "lse", lse, DA_FLOAT32, *T, 0, vl));
  for (int64_t b = 0; b < p->B; b++)
    if (c->seq[b].len < *T)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                    "rank %d: sequence %lld holds %lld tokens, fewer than the %lld queries "
                    "(append their k, v first)",
                    p->rank, (long long)b, (long long)c->seq[b].len, (long long)*T);
  return DA_SUCCESS;
}

/* The merged rows into the caller's out (dtype) and lse (fp32, may be absent). */
static void write_outputs(const da_decode_plan_t *p, int64_t T, const qview_t *vo, const qview_t *vl, int has_lse) {
  const int H = p->kp.H, D = p->kp.D, w = D + 1;
  const da_dtype_t dt = p->kp.dtype;
  for (int64_t b = 0; b < p->B; b++)
    for (int64_t t = 0; t < T; t++)
      for (int h = 0; h < H; h++) {
        const float *row = p->part + (size_t)((b * T + t) * H + h) * (size_t)w;
        char *dst = vo->base + (size_t)(b * vo->sb + t * vo->st + h * vo->sh) * vo->esz;
        for (int d = 0; d < D; d++) da_store_f32(dst, (int)dt, d, row[d]);
        if (has_lse) ((float *)vl->base)[b * vl->sb + t * vl->st + h * vl->sh] = row[D];
      }
}

/* ---- the device tree -------------------------------------------------------------------------------- */

static da_status_t grow_dev(da_decode_plan_t *p, int64_t T) {
  const int64_t H = p->kp.H, D = p->kp.D, rows = p->B * T * H;
  if (rows <= p->dcap_rows) return DA_SUCCESS;
  const da_devapi_t *d = p->dev;
  (d->free)(p->d_sum), (d->free)(p->d_max), (d->free)(p->d_q);
  free(p->h_sum), free(p->h_max), free(p->h_lse), free(p->h_q);
  p->d_sum = p->d_max = NULL, p->d_q = p->h_q = NULL, p->h_sum = p->h_max = p->h_lse = NULL;
  p->dcap_rows = 0;
  const size_t sum = (size_t)rows * (size_t)(D + 1) * sizeof(float), mx = (size_t)(rows + 1) * sizeof(float);
  const size_t qb = (size_t)rows * (size_t)D * da_dtype_size(p->kp.dtype);
  DA_CHECK(da_dev_alloc(d, (void **)&p->d_sum, sum));
  DA_CHECK(da_dev_alloc(d, (void **)&p->d_max, mx));
  DA_CHECK(da_dev_alloc(d, (void **)&p->d_q, qb));
  p->h_sum = malloc(sum), p->h_max = malloc(mx), p->h_lse = malloc(mx), p->h_q = malloc(qb ? qb : 1);
  if (!p->h_sum || !p->h_max || !p->h_lse || !p->h_q)
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: decode staging for %lld rows", p->rank, (long long)rows);
  p->dcap_rows = rows;
  return DA_SUCCESS;
}

/* This rank's partials on the device: q packed into d_q, then the kernel per sequence writing o
 * into d_sum's [rows][D] and lse into d_max's [rows]. A sequence without rows here is marked in
 * empty[b] (its partial is the merge's identity, set on the host). */
static da_status_t local_partials_dev(da_decode_plan_t *p, const da_kvcache_t *c, const qview_t *vq, int64_t T,
                                      char *empty, uint64_t *kv_bytes) {
  const int H = p->kp.H, D = p->kp.D;
  const size_t es = da_dtype_size(p->kp.dtype);
  const int64_t per = T * H; /* rows of one sequence */
  *kv_bytes = 0;
  for (int64_t b = 0; b < p->B; b++)
    for (int64_t t = 0; t < T; t++)
      for (int h = 0; h < H; h++)
        memcpy(p->h_q + (size_t)(((b * T + t) * H + h) * D) * es,
               vq->base + (size_t)(b * vq->sb + t * vq->st + h * vq->sh) * es, (size_t)D * es);
  DA_CHECK(p->dev->copy_from_host(p->d_q, p->h_q, (size_t)(p->B * per * D) * es, p->dstream));
  for (int64_t b = 0; b < p->B; b++) {
    const da_kvseq_t *s = &c->seq[b];
    empty[b] = s->npages == 0 || s->rows == 0;
    if (empty[b]) continue;
    DA_CHECK(p->kt->decode(&p->kp, p->d_q + (size_t)(b * per * D) * es, (int64_t)H * D, da_span(s->len - T, 1, T),
                           s->pages, (int)s->npages, p->d_sum + b * per * D, p->d_max + b * per, p->dstream));
    *kv_bytes += (uint64_t)s->rows * 2 * c->row_bytes;
  }
  return DA_SUCCESS;
}

/* The device tree's combine into p->part ([rows][D + 1], as the host paths leave it). Exact in
 * fp32 with two sum-or-max allreduces, since NCCL has no custom operator (Tree Attention does the
 * same): M = allreduce_max(lse_r); w_r = exp(lse_r - M); (O, L) = allreduce_sum(o_r * w_r, w_r);
 * out = O / L, lse = M + log L. The max carries one more value, this rank's failure flag, so a
 * failed rank (it still takes part, with zero weight) is known to every rank: *anyfail. The
 * elementwise steps between the allreduces run on the host over staged copies (copy_to_host /
 * copy_from_host: host memory on the host seam; four PCIe copies of rows * (D + 1) floats on CUDA,
 * small beside the KV shard; a device kernel for them is future work). */
static da_status_t combine_dev(da_decode_plan_t *p, const da_kvcache_t *c, const qview_t *vq, int64_t T,
                               da_status_t *st, uint64_t *kvb, double *compute_s, uint64_t *sent, int *anyfail) {
  const int D = p->kp.D, w = D + 1;
  const int64_t rows = p->B * T * p->kp.H, per = T * p->kp.H;
  const da_devapi_t *d = p->dev;
  char stack_empty[64], *empty = p->B <= 64 ? stack_empty : calloc((size_t)p->B, 1);
  if (!empty) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: decode", p->rank);
  memset(empty, 0, (size_t)p->B);
  *anyfail = 0;
  if (*st == DA_SUCCESS && c->dev != d)
    *st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d decode: the cache's pages are in %s memory and the plan runs on the "
                 "%s transport: create both with the same transport", p->rank, c->dev ? c->dev->name : "host",
                 p->xp.t->name);
  const double t1 = da_time_now();
  if (*st == DA_SUCCESS) *st = local_partials_dev(p, c, vq, T, empty, kvb);
  if (*st == DA_SUCCESS) *st = d->copy_to_host(p->h_lse, p->d_max, (size_t)rows * sizeof(float), p->dstream);
  *compute_s = da_time_now() - t1;
  const int failed = *st != DA_SUCCESS;
  for (int64_t i = 0; i < rows; i++)
    if (failed || empty[i / per]) p->h_lse[i] = -INFINITY; /* the merge's identity: weight 0 */
  /* 1. the row maxima, and whether any rank failed */
  memcpy(p->h_max, p->h_lse, (size_t)rows * sizeof(float));
  p->h_max[rows] = failed ? 1.0f : 0.0f;
  da_status_t x = d->copy_from_host(p->d_max, p->h_max, (size_t)(rows + 1) * sizeof(float), p->dstream);
  if (x == DA_SUCCESS) x = p->xp.t->allreduce_dev(&p->xp, p->d_max, (int)(rows + 1), DA_XOP_MAX);
  if (x == DA_SUCCESS) x = d->copy_to_host(p->h_max, p->d_max, (size_t)(rows + 1) * sizeof(float), p->dstream);
  /* 2. this rank's rescaled partials o * w and weights w = exp(lse - M), summed over ranks */
  if (x == DA_SUCCESS && !failed) x = d->copy_to_host(p->h_sum, p->d_sum, (size_t)(rows * D) * sizeof(float), p->dstream);
  if (x == DA_SUCCESS) {
    float *o = p->h_sum, *l = p->h_sum + rows * D;
    for (int64_t i = 0; i < rows; i++) {
      const float m = p->h_max[i], a = p->h_lse[i];
      const float wt = a == -INFINITY || m == -INFINITY ? 0.0f : expf(a - m);
      for (int dd = 0; dd < D; dd++) o[i * D + dd] = wt == 0.0f ? 0.0f : o[i * D + dd] * wt;
      l[i] = wt;
    }
    x = d->copy_from_host(p->d_sum, p->h_sum, (size_t)rows * (size_t)w * sizeof(float), p->dstream);
  }
  if (x == DA_SUCCESS) x = p->xp.t->allreduce_dev(&p->xp, p->d_sum, (int)(rows * w), DA_XOP_SUM);
  if (x == DA_SUCCESS) x = d->copy_to_host(p->h_sum, p->d_sum, (size_t)rows * (size_t)w * sizeof(float), p->dstream);
  if (empty != stack_empty) free(empty);
  if (x != DA_SUCCESS) return x;
  *anyfail = p->h_max[rows] > 0.0f;
  /* 3. normalize: out = O / L, lse = M + log L */
  const float *o = p->h_sum, *l = p->h_sum + rows * D;
  for (int64_t i = 0; i < rows && !*anyfail; i++) {
    float *row = p->part + i * w;
    for (int dd = 0; dd < D; dd++) row[dd] = o[i * D + dd] / l[i];
    row[D] = p->h_max[i] + logf(l[i]);
  }
  /* what a binomial reduce + broadcast of both allreduces sends from this rank (MPI and NCCL pick
   * their own algorithms: a model, as for the host tree) */
  const int v = p->rank;
  *sent = (uint64_t)((rows + 1) + rows * w) * sizeof(float) *
          (uint64_t)(p->P > 1 ? (v != 0) + binomial_children(v, p->P) : 0);
  return DA_SUCCESS;
}

/* The partials of every rank combined into p->part: the tree (local partials, then one fused
 * reduction) or the ring (compute and combine interleave along the chain). *st holds this rank's
 * local failure (its partials go out poisoned); the return value is a transfer failure. */
static da_status_t combine(da_decode_plan_t *p, const da_kvcache_t *c, const qview_t *vq, int64_t T, da_status_t *st,
                           uint64_t *kvb, double *compute_s, uint64_t *sent) {
  const int D = p->kp.D, w = D + 1;
  const int64_t rows = p->B * T * p->kp.H;
  if (p->cfg.algo != DA_DECODE_TREE) {
    da_status_t cst = ring_step(p, c, vq, T, *st == DA_SUCCESS, kvb, compute_s, sent, st);
    if (cst == DA_ERR_TIMEOUT) p->broken = 1;
    return cst;
  }
  const double t1 = da_time_now();
  if (*st == DA_SUCCESS) *st = local_partials(p, c, vq, T, kvb);
  *compute_s = da_time_now() - t1;
  if (*st != DA_SUCCESS)
    for (int64_t i = 0; i < rows; i++) p->part[i * w + D] = da_bits_to_f32(DA_LSE_POISON);
  *sent = tree_bytes(p, (uint64_t)rows * (uint64_t)w * sizeof(float));
  return tree_reduce(p, rows);
}

da_status_t da_decode_step(da_decode_plan_t *p, da_kvcache_t *c, const da_tensor_t *q, da_tensor_t *out,
                           da_tensor_t *lse, void *stream) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_decode_step: plan is NULL");
  if (p->broken)
    return da_context_finish(p->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: this decode plan had a reduction time "
                                            "out; free it and create a new one", p->rank));
  const double t0 = da_time_now();
  const int D = p->kp.D, w = D + 1;
  const int gets_output = p->cfg.root < 0 || p->cfg.root == p->rank;
  p->xp.phase = "decode";
  /* ---- local checks: a failure here still joins the reduction, with poisoned partials ---- */
  int64_t T = 1;
  qview_t vq = {0}, vo = {0}, vl = {0};
  da_status_t st = check_step(p, c, q, out, lse, gets_output, &T, &vq, &vo, &vl);
  const int64_t rows = p->B * T * p->kp.H;
  /* The buffers must exist even on a failing rank: it still takes part in the reduction. */
  da_status_t gst = grow(p, T);
  if (gst != DA_SUCCESS) /* without a buffer this rank cannot take part: its peers time out */
    return da_context_finish(p->ctx, gst);
  p->last_t = T;
  uint64_t kvb = 0, sent = 0;
  double compute_s = 0;
  if (p->dev) { /* the device tree: every rank took part in both allreduces and knows the outcome */
    int anyfail = 0;
    da_status_t dst = grow_dev(p, T);
    if (dst != DA_SUCCESS) return da_context_finish(p->ctx, dst); /* cannot take part: peers time out */
    da_status_t cst = combine_dev(p, c, &vq, T, &st, &kvb, &compute_s, &sent, &anyfail);
    if (cst != DA_SUCCESS) return da_context_finish(p->ctx, st != DA_SUCCESS ? st : cst);
    if (anyfail || st != DA_SUCCESS) return da_context_finish(p->ctx, da_xport_agree(&p->xp, st, "decode"));
  } else {
    da_status_t cst = combine(p, c, &vq, T, &st, &kvb, &compute_s, &sent);
    if (cst != DA_SUCCESS) /* a transfer failed: peers are in unknown states, no agreement is tried */
      return da_context_finish(p->ctx, st != DA_SUCCESS ? st : cst);
  }
  /* The cache's check of the last append's counts (kvcache.h), started by the append and run during
   * this step: completed here, after the step's own work, so it adds no collective latency. Every
   * rank gets the same answer; a disagreement is this step's error (its output is not written). */
  if (c) {
    da_status_t kst = da_kvcache_check_finish(c, "da_decode_step");
    if (kst != DA_SUCCESS && st == DA_SUCCESS) return da_context_finish(p->ctx, kst);
  }
  /* ---- outcome: a poisoned row means some rank failed; every rank holding the result knows ---- */
  int poisoned = 0;
  if (gets_output)
    for (int64_t i = 0; i < rows && !poisoned; i++) poisoned = da_lse_is(p->part[i * w + D], DA_LSE_POISON);
  if (st != DA_SUCCESS || poisoned) {
    if (p->cfg.root < 0) /* every rank saw it: agree on who and why */
      return da_context_finish(p->ctx, da_xport_agree(&p->xp, st, "decode"));
    if (st == DA_SUCCESS)
      st = DA_ERR(DA_ERR_REMOTE, "rank %d decode: another rank failed (its partials arrived poisoned)", p->rank);
    return da_context_finish(p->ctx, st);
  }
  if (gets_output) write_outputs(p, T, &vo, &vl, lse != NULL);
  p->st.step_s = da_time_now() - t0;
  p->st.compute_s = compute_s;
  p->st.reduce_s = p->st.step_s - compute_s;
  p->st.bytes_sent = sent;
  p->st.kv_bytes = kvb;
  p->st.partial_bytes = (size_t)rows * (size_t)w * sizeof(float);
  (void)stream;
  return da_context_finish(p->ctx, DA_SUCCESS);
}
