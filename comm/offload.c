/* offload.c: attention offloading to memory ranks (the da_offload_* calls of include/distattn.h,
 * docs/offload.md). The world is split
 * by role; each compute rank and its memory ranks share a group communicator (compute = rank 0).
 * A request is two nonblocking collectives on it, posted in the same order everywhere: an
 * MPI_Ibcast of [header | q | k | v] from the compute rank, then an MPI_Ireduce to it of the
 * (o, lse) rows with the merge operator (the compute rank contributes the identity). The KV cache
 * is the ordinary distributed paged cache (kvcache.c) over the group's memory ranks, weighted by
 * their budgets. Not here: the decode of tree.c (its helpers are static; the few lines it takes
 * are repeated below). */
#define _GNU_SOURCE
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysinfo.h>
#include <time.h>
#include "kvcache.h" /* first: mpi.h before distattn.h declares the distributed API */
#include "dtype.h"
#include "tensor.h"

enum { HDR = 8 };                     /* int64 words before the payload */
/* The header's words: the command; ATTEND: the layer, the first sequence, how many, and the post
 * time (a double, compute rank's clock); STOP / CANCEL: the requests so far (the reason follows). */
enum { HDR_CMD = 0, HDR_LAYER = 1, HDR_NREQ = 1, HDR_FIRST = 2, HDR_N = 3, HDR_TPOST = 4 };
enum { CMD_ATTEND = 1, CMD_STOP = 2, CMD_CANCEL = 3 };
enum { TAG_CLOCK = 31, TAG_ROLL = 32 }; /* point-to-point tags on the group communicator */
#define ROLL_GRACE_S 1.0                /* the roll call listens min(timeout, this) seconds */
#define CLOCK_ROUNDS 8                  /* ping-pongs of the clock offset measurement */

typedef struct slot {
  int busy;
  char *msg;          /* [HDR int64][n][H][D] q, [n][G][D] k, [n][G][D] v */
  float *part;        /* [n * H + 1][D + 1]: partial rows then the trailer */
  MPI_Request bc, rd;
  int64_t n, rows;
  int64_t req, first; /* request number (from 1, counted on both sides) and its first sequence */
  int layer;
  double t_post;
} slot_t;

struct da_offload {
  da_context_t *ctx;
  const da_kernels_t *kt;
  da_kparams_t kp;
  da_offload_config_t cfg;
  da_offload_info_t info;
  int64_t B, nmax;        /* sequences per compute rank, largest micro-batch */
  int L;
  MPI_Comm world, group, mem; /* world dup; compute + its memory ranks; the memory ranks only */
  int wrank, grank, gsize;
  int *gworld;            /* [gsize] rank in world of each group rank (group rank 0 = compute) */
  int64_t nreq;           /* requests started (compute) / received (memory) */
  double timeout;
  double clock_off;       /* memory ranks: add to MPI_Wtime to get the compute rank's clock */
  MPI_Datatype rowtype;
  MPI_Op op;
  int have_type, have_op, broken;
  size_t msg_bytes;
  slot_t *slots;
  int nslots;
  da_comm_t *dcomm;       /* memory ranks */
  da_kvcache_t *cache;
  char *kstage, *vstage;  /* memory: [L * B][G][D] staging of appended rows */
  int64_t *ntok;          /* [L * B] */
  float *o, *lse;         /* kernel outputs of one sequence [H][D], [H] */
  da_offload_stats_t st;
};

static const char *role_name(int64_t r) { return r == DA_ROLE_COMPUTE ? "compute" : r == DA_ROLE_MEMORY ? "memory" : "none"; }

/* "rank 3 offload (memory rank 1 of group 0)": who is speaking, for every message of the protocol. */
static int who(const da_offload_t *p, char *buf, size_t n) {
  if (p->info.role == DA_ROLE_COMPUTE)
    return snprintf(buf, n, "rank %d offload (compute rank of group %d)", p->wrank, p->info.group);
  return snprintf(buf, n, "rank %d offload (memory rank %d of group %d)", p->wrank, p->info.index, p->info.group);
}

/* After a timeout on the group's collectives: which members are silent? A collective cannot say
 * which member is missing, so every member that gives up tells every other one (a small eager
 * message, tag TAG_ROLL, never waited for: MPI_Request_free) and listens for the same from them
 * for a grace period, min(timeout, 1 s). The members stuck on the same request give up within
 * about the same time (each waits on the silent rank, or on a member that waits on it), so the
 * ones never heard from are the stopped, killed or hung ones. The message carries nothing: the
 * source is the news. Writes "rank 3 (memory)" (or a list) into buf; returns how many. */
static int roll_call(da_offload_t *p, char *buf, size_t n) {
  static const int token = 1;
  const int G = p->gsize;
  int *in = calloc((size_t)G, sizeof *in), *heard = calloc((size_t)G, sizeof *heard);
  MPI_Request *rr = malloc((size_t)G * sizeof *rr);
  buf[0] = '\0';
  if (!in || !heard || !rr || !p->gworld) {
    free(in), free(heard), free(rr);
    snprintf(buf, n, "(roll call impossible: out of memory)");
    return 0;
  }
  for (int i = 0; i < G; i++) {
    rr[i] = MPI_REQUEST_NULL;
    if (i == p->grank) continue;
    MPI_Request sr;
    if (MPI_Isend(&token, 1, MPI_INT, i, TAG_ROLL, p->group, &sr) == MPI_SUCCESS) MPI_Request_free(&sr);
    MPI_Irecv(&in[i], 1, MPI_INT, i, TAG_ROLL, p->group, &rr[i]);
  }
  heard[p->grank] = 1;
  int nheard = 1;
  const double grace = fmin(p->timeout, ROLL_GRACE_S), t0 = da_time_now();
  for (long it = 0; nheard < G; it++) {
    for (int i = 0; i < G; i++) {
      int flag = 0;
      if (heard[i] || rr[i] == MPI_REQUEST_NULL) continue;
      if (MPI_Test(&rr[i], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) heard[i] = 1, nheard++;
    }
    const double waited = da_time_now() - t0;
    if (waited > grace) break;
    da_mpi_backoff(it, waited);
  }
  int silent = 0;
  size_t len = 0;
  for (int i = 0; i < G; i++) {
    if (heard[i]) continue;
    if (rr[i] != MPI_REQUEST_NULL) { /* a receive that never matched: cancel it (allowed for receives) */
      MPI_Cancel(&rr[i]);
      MPI_Wait(&rr[i], MPI_STATUS_IGNORE);
    }
    if (len < n)
      len += (size_t)snprintf(buf + len, n - len, "%s%d (%s)", silent ? ", " : "", p->gworld[i],
                              i == 0 ? "compute" : "memory");
    silent++;
  }
  free(in), free(heard), free(rr);
  return silent;
}

/* The group rank of a member whose roll-call word waits for this rank (it gave up on the group's
 * collectives, which therefore never complete), or -1. The probe leaves the word queued, for this
 * rank's own roll call to receive. Every wait of the protocol looks for it, so that a member that
 * began its wait late (still answering a request when the silent rank stopped) joins the first
 * one's roll call at once instead of after its own deadline, when that roll call is long over
 * and would have counted it as silent beside the stopped rank. */
static int roll_notice(const da_offload_t *p) {
  int flag = 0;
  MPI_Status s;
  if (MPI_Iprobe(MPI_ANY_SOURCE, TAG_ROLL, p->group, &flag, &s) != MPI_SUCCESS || !flag) return -1;
  return s.MPI_SOURCE;
}

/* A wait of the protocol gave up, at its deadline or because group member `first` gave up before
 * it (-1: at the deadline): the message names this rank, the request, the seconds waited, that
 * member, and the group members that did not answer the roll call. The offload is broken from
 * now on. */
static da_status_t timed_out(da_offload_t *p, const char *what, double waited, const slot_t *sl, int first) {
  p->broken = 1;
  char me[96], req[128] = "", why[96] = "", silent[256];
  who(p, me, sizeof me);
  if (sl) snprintf(req, sizeof req, " request %lld (layer %d, sequences %lld..%lld):", (long long)sl->req, sl->layer,
                   (long long)sl->first, (long long)(sl->first + sl->n - 1));
  else snprintf(req, sizeof req, " after request %lld:", (long long)p->nreq);
  if (first >= 0 && p->gworld)
    snprintf(why, sizeof why, "; rank %d (%s) of the group gave up first", p->gworld[first],
             first == 0 ? "compute" : "memory");
  const int ns = roll_call(p, silent, sizeof silent);
  const double grace = fmin(p->timeout, ROLL_GRACE_S);
  if (ns > 0)
    return DA_ERR(DA_ERR_TIMEOUT, "%s%s waited %.1f s for %s%s; not answering the group's roll call within %g s: "
                  "rank%s %s (stopped, killed or hung)", me, req, waited, what, why, grace, ns > 1 ? "s" : "", silent);
  return DA_ERR(DA_ERR_TIMEOUT, "%s%s waited %.1f s for %s%s; every member of the group answered the roll call (a "
                "rank is too slow for the timeout, or the ranks called different operations)", me, req, waited, what,
                why);
}

/* Poll r against the deadline and for a member's roll-call word; what = what we wait for ("the
 * reduction of the partials"). */
static da_status_t wait_req(da_offload_t *p, MPI_Request *r, const char *what, const slot_t *sl) {
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    int done = 0;
    const int rc = MPI_Test(r, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      p->broken = 1;
      return da_mpi_error(rc, __FILE__, __LINE__, "rank %d offload: %s", p->wrank, what);
    }
    if (done) return DA_SUCCESS;
    const double waited = da_time_now() - t0;
    const int first = roll_notice(p);
    if (first >= 0 || waited > p->timeout) return timed_out(p, what, waited, sl, first);
    da_mpi_backoff(it, waited);
  }
}

/* A setup transfer or collective posted as r, polled against the deadline. */
static da_status_t wait_setup(da_offload_t *p, int rc, MPI_Request *r, const char *what) {
  if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "rank %d offload: %s", p->wrank, what);
  int done = 0;
  rc = da_mpi_poll(r, p->timeout, &done);
  if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "rank %d offload: %s", p->wrank, what);
  if (!done) {
    p->broken = 1;
    return DA_ERR(DA_ERR_TIMEOUT, "rank %d offload: %s did not complete within %g s (a peer is missing or stuck)",
                  p->wrank, what, p->timeout);
  }
  return DA_SUCCESS;
}

/* ---- create ------------------------------------------------------------------------------------- */

/* Bytes of memory this rank may use when none is configured: free + buffer memory of the node
 * (sysinfo) divided among the ranks that share it. */
static double discover_budget(MPI_Comm world) {
  struct sysinfo si;
  if (sysinfo(&si)) return 0;
  double bytes = ((double)si.freeram + (double)si.bufferram) * (double)si.mem_unit;
  MPI_Comm node;
  int local = 1;
  if (MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
  }
  return bytes / (local > 0 ? local : 1);
}

/* What every rank publishes at create: role, budget and the problem, to check them everywhere. */
enum { PUB_BATCH, PUB_HEADS, PUB_KV_HEADS, PUB_DIM, PUB_DTYPE, PUB_PAGE, PUB_LAYERS, PUB_MICROBATCHES, PUB_NFIELDS };
static const char *const pub_names[PUB_NFIELDS] = {"batch", "heads", "kv_heads", "dim",
                                                   "dtype", "page",  "layers",   "microbatches"};
typedef struct pub {
  int64_t role;
  int64_t f[PUB_NFIELDS]; /* the problem, the same on every rank (pub_names) */
  double budget;
  int64_t local_err; /* this rank's problem is invalid (its message stays local) */
} pub_t;

void da_offload_free(da_offload_t *p) {
  if (!p) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (p->cache) da_kvcache_free(p->cache);
  if (p->dcomm) da_comm_free(p->dcomm);
  if (!finalized) {
    if (p->have_op) MPI_Op_free(&p->op);
    if (p->have_type) MPI_Type_free(&p->rowtype);
    if (p->mem != MPI_COMM_NULL) MPI_Comm_free(&p->mem);
    if (p->group != MPI_COMM_NULL) MPI_Comm_free(&p->group);
    if (p->world != MPI_COMM_NULL) MPI_Comm_free(&p->world);
  }
  for (int i = 0; p->slots && i < p->nslots; i++) {
    if (p->broken) continue; /* MPI may still read or write them */
    da_free(p->slots[i].msg);
    da_free(p->slots[i].part);
  }
  free(p->slots);
  free(p->gworld);
  da_free(p->kstage), da_free(p->vstage), free(p->ntok);
  da_free(p->o), da_free(p->lse);
  free(p);
}

/* Check what every rank published; the same verdict on every rank. */
static da_status_t check_roles(da_offload_t *p, const pub_t *all, int P) {
  int nc = 0, nm = 0;
  for (int r = 0; r < P; r++) {
    if (all[r].role == DA_ROLE_NONE)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: rank %d has no role: give every rank --role compute or --role "
                    "memory on its command line (one per mpirun/srun component)", r);
    if (all[r].role != DA_ROLE_COMPUTE && all[r].role != DA_ROLE_MEMORY)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: rank %d has an unknown role %lld", r, (long long)all[r].role);
    nc += all[r].role == DA_ROLE_COMPUTE, nm += all[r].role == DA_ROLE_MEMORY;
  }
  if (nc == 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: the job's %d ranks are all memory ranks; at least one needs --role "
                  "compute", P);
  if (nm < nc)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: %d compute rank%s and %d memory rank%s: every compute rank needs at "
                  "least one memory rank (--role memory)", nc, nc == 1 ? "" : "s", nm, nm == 1 ? "" : "s");
  for (int r = 0; r < P; r++)
    if (all[r].local_err)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: rank %d was given an invalid problem or config (see its message)", r);
  for (int f = 0; f < PUB_NFIELDS; f++)
    for (int r = 1; r < P; r++)
      if (all[r].f[f] != all[0].f[f])
        return DA_ERR(DA_ERR_MISMATCH, "offload: ranks disagree on %s: rank 0 (%s) has %lld, rank %d (%s) has %lld",
                      pub_names[f], role_name(all[0].role), (long long)all[0].f[f], r, role_name(all[r].role),
                      (long long)all[r].f[f]);
  for (int r = 0; r < P; r++)
    if (all[r].role == DA_ROLE_MEMORY && !(all[r].budget > 0))
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: memory rank %d has no memory budget (--mem-budget, or sysinfo "
                    "failed)", r);
  p->info.ncompute = nc, p->info.nmemory = nm;
  return DA_SUCCESS;
}

static da_status_t local_check(da_offload_t *p, const da_problem_t *prob, const da_offload_config_t *cfg) {
  if (cfg->size < sizeof(size_t) + sizeof(unsigned) || cfg->version == 0 || cfg->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_offload_config_t: size %zu / version %u not recognized",
                  cfg->size, cfg->version);
  if (!prob) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_offload_create: problem is NULL");
  if (prob->batch < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: batch %lld < 1", (long long)prob->batch);
  if (cfg->layers < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: layers %d < 1", cfg->layers);
  if (cfg->microbatches < 1 || cfg->microbatches > prob->batch)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: microbatches %d is not in 1 .. batch (%lld)", cfg->microbatches,
                  (long long)prob->batch);
  if (cfg->page < 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: page %lld < 0", (long long)cfg->page);
  if (!(cfg->mem_budget >= 0) || !(cfg->timeout >= 0))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "offload: mem_budget and timeout must be >= 0");
  if (da_context_device(p->ctx) != DA_DEVICE_CPU)
    return DA_ERR(DA_ERR_UNSUPPORTED, "offload: the kv cache lives in host memory; use a CPU context");
  da_problem_t pr = *prob;
  pr.seq = 1, pr.mask = DA_MASK_CAUSAL, pr.ndocs = 0, pr.cu_seqlens = NULL;
  DA_CHECK(da_context_params(p->ctx, &pr, &p->kp));
  p->kt = da_context_kernels(p->ctx);
  return DA_SUCCESS;
}

/* Memory rank i of the group measures the offset of its clock to the compute rank's: CLOCK_ROUNDS
 * ping-pongs, the one with the shortest round trip counts (NTP-style midpoint). */
static da_status_t clock_sync(da_offload_t *p) {
  const int rounds = CLOCK_ROUNDS;
  MPI_Request r;
  if (p->grank == 0) {
    for (int i = 1; i < p->gsize; i++)
      for (int k = 0; k < rounds; k++) {
        double x;
        DA_CHECK(wait_setup(p, MPI_Irecv(&x, 1, MPI_DOUBLE, i, TAG_CLOCK, p->group, &r), &r, "clock ping"));
        x = MPI_Wtime();
        DA_CHECK(wait_setup(p, MPI_Isend(&x, 1, MPI_DOUBLE, i, TAG_CLOCK, p->group, &r), &r, "clock pong"));
      }
    return DA_SUCCESS;
  }
  double best = INFINITY;
  for (int k = 0; k < rounds; k++) {
    double t0 = MPI_Wtime(), tc;
    DA_CHECK(wait_setup(p, MPI_Isend(&t0, 1, MPI_DOUBLE, 0, TAG_CLOCK, p->group, &r), &r, "clock ping"));
    DA_CHECK(wait_setup(p, MPI_Irecv(&tc, 1, MPI_DOUBLE, 0, TAG_CLOCK, p->group, &r), &r, "clock pong"));
    double t1 = MPI_Wtime();
    if (t1 - t0 < best) best = t1 - t0, p->clock_off = tc - 0.5 * (t0 + t1);
  }
  return DA_SUCCESS;
}

/* A slot's request message or partial rows. Named so the sanitizer suppression
 * (tests/sanitize/lsan.supp) can find it: after a timeout MPI may still read or write them (a
 * pending broadcast or reduction), so a broken offload never frees them. */
static __attribute__((noinline)) void *alloc_slot_buffer(size_t bytes) {
  void *b = da_malloc(bytes, 64);
  __asm__ volatile("" ::: "memory"); /* no tail call: this frame must stay in the allocation stack */
  return b;
}

/* The groups: compute rank c gets the memory ranks m with m * nc / nm == c. Fills this rank's group,
 * its index among the group's memory ranks and its share of the group's cache, and the budgets of
 * the group's memory ranks in w (the cache's weights); returns how many there are. */
static int assign_group(da_offload_t *p, const pub_t *all, int P, double *w) {
  const int nc = p->info.ncompute, nm = p->info.nmemory;
  int ci = 0, mi = 0, mygroup = -1, myindex = -1, nw = 0;
  double gsum = 0;
  for (int r = 0; r < P; r++) {
    int g = all[r].role == DA_ROLE_COMPUTE ? ci++ : (int)((int64_t)mi++ * nc / nm);
    if (r == p->wrank) mygroup = g;
  }
  ci = 0, mi = 0;
  for (int r = 0; r < P; r++) {
    int g = all[r].role == DA_ROLE_COMPUTE ? ci++ : (int)((int64_t)mi++ * nc / nm);
    if (g != mygroup) continue;
    if (all[r].role == DA_ROLE_COMPUTE) p->info.compute_world_rank = r;
    else {
      if (r == p->wrank) myindex = nw;
      w[nw++] = all[r].budget;
      gsum += all[r].budget;
    }
  }
  p->info.group = mygroup, p->info.ngroups = nc, p->info.group_memory = nw, p->info.index = myindex;
  p->info.share = myindex >= 0 ? all[p->wrank].budget / gsum : 0;
  return nw;
}

/* The group's communicator (compute rank first) and the memory ranks' own one. */
static da_status_t split_group(da_offload_t *p) {
  const int mem = p->info.role == DA_ROLE_MEMORY, mygroup = p->info.group;
  int rc = MPI_Comm_split(p->world, mygroup, mem ? 1 + p->wrank : 0, &p->group);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_split(p->world, mem ? mygroup : MPI_UNDEFINED, p->wrank, &p->mem);
  if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "rank %d offload: MPI_Comm_split", p->wrank);
  MPI_Comm_set_errhandler(p->group, MPI_ERRORS_RETURN);
  MPI_Comm_rank(p->group, &p->grank);
  MPI_Comm_size(p->group, &p->gsize);
  return DA_SUCCESS;
}

/* The group's ranks in world numbering, for messages. */
static da_status_t group_world_ranks(da_offload_t *p) {
  p->gworld = malloc((size_t)p->gsize * sizeof *p->gworld);
  int *idx = malloc((size_t)p->gsize * sizeof *idx);
  if (!p->gworld || !idx) {
    free(idx);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: group ranks");
  }
  MPI_Group gg, gw;
  MPI_Comm_group(p->group, &gg), MPI_Comm_group(p->world, &gw);
  for (int i = 0; i < p->gsize; i++) idx[i] = i;
  MPI_Group_translate_ranks(gg, p->gsize, idx, gw, p->gworld);
  free(idx);
  MPI_Group_free(&gg), MPI_Group_free(&gw);
  return DA_SUCCESS;
}

/* The request slots (one per micro-batch) and, on memory ranks, the staging and kernel buffers. */
static da_status_t alloc_buffers(da_offload_t *p) {
  const int D = p->kp.D, H = p->kp.H, G = p->kp.G;
  const size_t es = da_dtype_size(p->kp.dtype);
  p->nmax = (p->B + p->cfg.microbatches - 1) / p->cfg.microbatches;
  p->msg_bytes = HDR * sizeof(int64_t) + (size_t)p->nmax * (size_t)(H + 2 * G) * (size_t)D * es;
  p->nslots = p->cfg.microbatches;
  p->slots = calloc((size_t)p->nslots, sizeof *p->slots);
  if (!p->slots) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: slots");
  for (int i = 0; i < p->nslots; i++) {
    p->slots[i].msg = alloc_slot_buffer(p->msg_bytes);
    p->slots[i].part = alloc_slot_buffer((size_t)(p->nmax * H + 1) * (size_t)(D + 1) * sizeof(float));
    if (!p->slots[i].msg || !p->slots[i].part) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: slot buffers");
  }
  if (p->info.role != DA_ROLE_MEMORY) return DA_SUCCESS;
  const int64_t NB = (int64_t)p->L * p->B;
  p->kstage = da_malloc((size_t)(NB * G * D) * es, 64), p->vstage = da_malloc((size_t)(NB * G * D) * es, 64);
  p->ntok = calloc((size_t)NB, sizeof *p->ntok);
  p->o = da_malloc((size_t)(H * D) * sizeof(float), 64), p->lse = da_malloc((size_t)H * sizeof(float), 64);
  if (!p->kstage || !p->vstage || !p->ntok || !p->o || !p->lse)
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: memory rank buffers");
  return DA_SUCCESS;
}

/* Memory ranks: the group's paged KV cache over the memory ranks, weighted by their budgets w. */
static da_status_t create_cache(da_offload_t *p, const double *w) {
  DA_CHECK(da_comm_create(p->ctx, p->mem, &p->dcomm));
  da_problem_t pr = DA_PROBLEM_INITIALIZER;
  pr.batch = (int64_t)p->L * p->B, pr.seq = 1, pr.heads = p->kp.H, pr.kv_heads = p->kp.G, pr.dim = p->kp.D;
  pr.dtype = p->kp.dtype, pr.mask = DA_MASK_CAUSAL;
  da_kvcache_config_t kc = DA_KVCACHE_CONFIG_INITIALIZER;
  kc.page = p->cfg.page, kc.weights = w, kc.timeout = p->timeout;
  return da_kvcache_create(p->dcomm, &pr, &kc, &p->cache);
}

/* Agree within the world before the collectives that follow: this rank's own failure, or
 * DA_ERR_REMOTE when only another rank failed. */
static da_status_t agree_setup(da_offload_t *p, da_status_t st) {
  int bad = st != DA_SUCCESS, any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, p->world);
  if (!any) return DA_SUCCESS;
  return st != DA_SUCCESS ? st : DA_ERR(DA_ERR_REMOTE, "rank %d offload: another rank failed to set up", p->wrank);
}

/* The partial row's datatype (D + 1 floats) and the merge operator of the reduction. */
static da_status_t create_merge_op(da_offload_t *p) {
  DA_MPICHECK(MPI_Type_contiguous(p->kp.D + 1, MPI_FLOAT, &p->rowtype), "rank %d offload: MPI_Type_contiguous",
              p->wrank);
  p->have_type = 1;
  DA_MPICHECK(MPI_Type_commit(&p->rowtype), "rank %d offload: MPI_Type_commit", p->wrank);
  DA_MPICHECK(MPI_Op_create(da_partial_merge_op, 1, &p->op), "rank %d offload: MPI_Op_create", p->wrank);
  p->have_op = 1;
  return DA_SUCCESS;
}

/* Everything after the roles are checked: groups, communicators, buffers, the cache, the operator
 * and the clocks. Collective over the world; a failure anywhere fails every rank. */
static da_status_t build(da_offload_t *p, const pub_t *all, int P) {
  double *w = calloc((size_t)P, sizeof *w);
  if (!w) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: weights");
  assign_group(p, all, P, w);
  da_status_t st = split_group(p);
  if (st != DA_SUCCESS) {
    free(w);
    return st;
  }
  st = group_world_ranks(p);
  if (st == DA_SUCCESS) st = alloc_buffers(p);
  st = agree_setup(p, st);
  if (st == DA_SUCCESS) st = agree_setup(p, p->info.role == DA_ROLE_MEMORY ? create_cache(p, w) : DA_SUCCESS);
  free(w);
  DA_CHECK(st);
  DA_CHECK(create_merge_op(p));
  return clock_sync(p);
}

da_status_t da_offload_create(da_comm_t *comm, da_role_t role, const da_problem_t *prob,
                              const da_offload_config_t *cfg, da_offload_t **out) {
  da_error_clear();
  da_context_t *ctx;
  da_status_t cst;
  da_offload_t *p = da_comm_create_begin(comm, (void **)out, "da_offload_create", sizeof *p, "offload", &ctx, &cst);
  if (!p) return cst;
  MPI_Comm world = da_comm_mpi(comm);
  da_offload_config_t def = DA_OFFLOAD_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  p->ctx = ctx;
  p->world = p->group = p->mem = MPI_COMM_NULL;
  int rc = MPI_Comm_dup(world, &p->world);
  if (rc != MPI_SUCCESS) {
    p->world = MPI_COMM_NULL;
    da_offload_free(p);
    return da_context_finish(ctx, da_mpi_error(rc, __FILE__, __LINE__, "da_offload_create: MPI_Comm_dup"));
  }
  MPI_Comm_set_errhandler(p->world, MPI_ERRORS_RETURN);
  MPI_Comm_rank(p->world, &p->wrank);
  int P = 0;
  MPI_Comm_size(p->world, &P);
  p->cfg = *cfg;
  p->timeout = cfg->timeout > 0 ? cfg->timeout : da_comm_default_timeout();
  da_status_t lst = local_check(p, prob, cfg);
  p->B = prob ? prob->batch : 0;
  p->L = cfg->layers;
  p->info.role = role;
  p->info.index = -1;
  p->info.budget = cfg->mem_budget;
  const double found = discover_budget(p->world); /* collective: every rank calls it */
  if (!(p->info.budget > 0)) p->info.budget = found, p->info.discovered = 1;
  pub_t me = {.role = role, .budget = p->info.budget, .local_err = lst != DA_SUCCESS};
  me.f[PUB_BATCH] = p->B, me.f[PUB_HEADS] = p->kp.H, me.f[PUB_KV_HEADS] = p->kp.G, me.f[PUB_DIM] = p->kp.D;
  me.f[PUB_DTYPE] = p->kp.dtype, me.f[PUB_PAGE] = cfg->page ? cfg->page : DA_KVCACHE_DEFAULT_PAGE;
  me.f[PUB_LAYERS] = cfg->layers, me.f[PUB_MICROBATCHES] = cfg->microbatches;
  pub_t *all = calloc((size_t)P, sizeof *all);
  da_status_t st = all ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: roles");
  if (st == DA_SUCCESS) {
    rc = MPI_Allgather(&me, sizeof me, MPI_BYTE, all, sizeof me, MPI_BYTE, p->world);
    if (rc != MPI_SUCCESS) st = da_mpi_error(rc, __FILE__, __LINE__, "rank %d offload: MPI_Allgather", p->wrank);
  }
  if (st == DA_SUCCESS && lst != DA_SUCCESS) st = lst; /* keep this rank's own message */
  else if (st == DA_SUCCESS) st = check_roles(p, all, P);
  if (st == DA_SUCCESS) st = build(p, all, P);
  free(all);
  if (st != DA_SUCCESS) {
    da_offload_free(p);
    return da_context_finish(ctx, st);
  }
  DA_INFO(DA_SUB_PLAN, "offload: rank %d %s, group %d of %d (%d memory ranks), budget %.1f MiB%s, share %.3f",
          p->wrank, role_name(role), p->info.group, p->info.ngroups, p->info.group_memory,
          p->info.budget / 1048576.0, p->info.discovered ? " (sysinfo)" : "", p->info.share);
  *out = p;
  return da_context_finish(ctx, DA_SUCCESS);
}

da_status_t da_offload_get_info(const da_offload_t *p, da_offload_info_t *info) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_get_info: offload is NULL");
  DA_ARG_CHECK(da_context_errbuf(p->ctx), info != NULL, "da_offload_get_info: info is NULL");
  *info = p->info;
  info->size = sizeof *info, info->version = DA_API_VERSION;
  return da_errbuf_finish(da_context_errbuf(p->ctx), DA_SUCCESS);
}

da_kvcache_t *da_offload_cache(da_offload_t *p) { return p ? p->cache : NULL; }

double da_offload_kv_bytes(const da_problem_t *prob, int layers, const int64_t *final_len) {
  da_error_clear();
  if (!prob || !final_len || layers < 1 || prob->batch < 0 || prob->dim < 1 || prob->heads < 1 || prob->kv_heads < 0) {
    DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_offload_kv_bytes: %s", !prob ? "problem is NULL" : !final_len ? "final_len is "
           "NULL" : layers < 1 ? "layers < 1" : "batch, heads, kv_heads or dim out of range");
    return -1.0;
  }
  const int64_t G = prob->kv_heads ? prob->kv_heads : prob->heads;
  double rows = 0;
  for (int64_t b = 0; b < prob->batch; b++) rows += (double)final_len[b];
  return rows * layers * 2.0 * (double)(G * prob->dim) * (double)da_dtype_size(prob->dtype);
}

da_status_t da_offload_check_fit(da_offload_t *p, const int64_t *final_len, double *max_shard) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_check_fit: offload is NULL");
  DA_ARG_CHECK(da_context_errbuf(p->ctx), final_len != NULL || p->B == 0, "da_offload_check_fit: final_len is NULL");
  const int64_t page = p->cfg.page ? p->cfg.page : DA_KVCACHE_DEFAULT_PAGE;
  double rows = 0;
  for (int64_t b = 0; b < p->B; b++) rows += (double)final_len[b];
  const double row2 = 2.0 * p->kp.G * p->kp.D * (double)da_dtype_size(p->kp.dtype);
  /* within a page (+1 token) of the quota per cache sequence: the weighted shard map's bound */
  double mine = p->info.role == DA_ROLE_MEMORY ? (p->info.share * rows * p->L + (double)p->L * p->B * (page + 1)) * row2 : 0;
  struct { double v; int r; } in = {p->info.role == DA_ROLE_MEMORY ? mine - p->info.budget : -INFINITY, p->wrank}, worst;
  double mx = mine;
  MPI_Request r;
  da_status_t st = wait_setup(p, MPI_Iallreduce(MPI_IN_PLACE, &mx, 1, MPI_DOUBLE, MPI_MAX, p->world, &r), &r,
                              "the fit check (allreduce)");
  if (st == DA_SUCCESS)
    st = wait_setup(p, MPI_Iallreduce(&in, &worst, 1, MPI_DOUBLE_INT, MPI_MAXLOC, p->world, &r), &r,
                    "the fit check (allreduce)");
  if (st != DA_SUCCESS) return da_context_finish(p->ctx, st);
  if (max_shard) *max_shard = mx;
  if (worst.v > 0) {
    double vals[2] = {mine, p->info.budget};
    st = wait_setup(p, MPI_Ibcast(vals, 2, MPI_DOUBLE, worst.r, p->world, &r), &r, "the fit check (broadcast)");
    if (st != DA_SUCCESS) return da_context_finish(p->ctx, st);
    return da_context_finish(p->ctx, DA_ERR(DA_ERR_OUT_OF_MEMORY, "offload: memory rank %d would hold %.1f MiB of KV "
                                            "cache, over its budget of %.1f MiB: add memory ranks or budget",
                                            worst.r, vals[0] / 1048576.0, vals[1] / 1048576.0));
  }
  return da_context_finish(p->ctx, DA_SUCCESS);
}

/* ---- compute side ------------------------------------------------------------------------------- */

/* t must be [n][heads][D] (ndim 3; n = want, or any n in 1..nmax when want is 0) in dtype dt on the
 * CPU with the last two axes packed; *ld = its row stride in elements. */
static da_status_t check_rows(const da_offload_t *p, const char *fn, const char *name, const da_tensor_t *t, int64_t want,
                              int64_t heads, int64_t D, da_dtype_t dt, int ndim, int64_t *ld) {
  if (!t || !t->data) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: %s is NULL", p->wrank, fn, name);
  if (t->ndim < 1 || t->ndim > 4)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: %s: ndim %d (expected %d)", p->wrank, fn, name, t->ndim, ndim);
  if (t->device != DA_DEVICE_CPU)
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: %s: %s is not in host memory", p->wrank, fn, name);
  if (t->dtype != dt)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: %s has dtype %d, expected %d", p->wrank, fn, name,
                  (int)t->dtype, (int)dt);
  const int64_t n = t->ndim == ndim ? t->shape[0] : -1;
  const int64_t lim = want ? want : p->nmax;
  int ok = t->ndim == ndim && n >= (want ? want : 1) && n <= lim && t->shape[1] == heads && t->strides[0] >= heads * D;
  if (ok && ndim == 3) ok = t->shape[2] == D && t->strides[2] == 1 && t->strides[1] == D;
  if (ok && ndim == 2) ok = t->strides[1] == 1;
  if (!ok)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: %s must be [n][%lld]%s with n in %lld..%lld, the last axes "
                  "packed (ndim %d, shape[0] %lld)", p->wrank, fn, name, (long long)heads, ndim == 3 ? "[D]" : "",
                  (long long)(want ? want : 1), (long long)lim, t->ndim, (long long)(t->ndim > 0 ? t->shape[0] : 0));
  char who[48];
  snprintf(who, sizeof who, "rank %d: %s: ", p->wrank, fn);
  DA_CHECK(da_tensor_check_strides(t, da_dtype_size(dt), 1, who, name, NULL)); /* the span exists: no row stride
                                                                                 past any address */
  *ld = t->strides[0];
  return DA_SUCCESS;
}

static da_status_t start(da_offload_t *p, int layer, int64_t first, const da_tensor_t *q, const da_tensor_t *k,
                         const da_tensor_t *v, int *slot) {
  static const char fn[] = "da_offload_start";
  if (!p) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: offload is NULL", fn);
  if (p->info.role != DA_ROLE_COMPUTE)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s on a memory rank", p->wrank, fn);
  if (p->broken) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: this offload had a failure; free it", p->wrank);
  const int H = p->kp.H, G = p->kp.G, D = p->kp.D, w = D + 1;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  DA_CHECK(check_rows(p, fn, "q", q, 0, H, D, p->kp.dtype, 3, &ldq));
  const int64_t n = q->shape[0];
  DA_CHECK(check_rows(p, fn, "k", k, n, G, D, p->kp.dtype, 3, &ldk));
  DA_CHECK(check_rows(p, fn, "v", v, n, G, D, p->kp.dtype, 3, &ldv));
  if (layer < 0 || layer >= p->L || first < 0 || first + n > p->B || !slot)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: layer %d, sequences %lld + %lld (layers %d, batch %lld) or "
                  "slot is NULL", p->wrank, fn, layer, (long long)first, (long long)n, p->L, (long long)p->B);
  int s = -1;
  for (int i = 0; i < p->nslots && s < 0; i++)
    if (!p->slots[i].busy) s = i;
  if (s < 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: all %d slots in flight", p->wrank, fn, p->nslots);
  slot_t *sl = &p->slots[s];
  const size_t es = da_dtype_size(p->kp.dtype), qr = (size_t)(H * D) * es, kr = (size_t)(G * D) * es;
  int64_t *h = (int64_t *)sl->msg;
  sl->t_post = MPI_Wtime();
  h[HDR_CMD] = CMD_ATTEND, h[HDR_LAYER] = layer, h[HDR_FIRST] = first, h[HDR_N] = n;
  memcpy(&h[HDR_TPOST], &sl->t_post, sizeof(double));
  char *pl = sl->msg + HDR * sizeof(int64_t), *pq = pl, *pk = pq + (size_t)(p->nmax * H * D) * es,
       *pv = pk + (size_t)(p->nmax * G * D) * es;
  for (int64_t i = 0; i < n; i++) {
    memcpy(pq + (size_t)i * qr, (const char *)q->data + (size_t)(i * ldq) * es, qr);
    memcpy(pk + (size_t)i * kr, (const char *)k->data + (size_t)(i * ldk) * es, kr);
    memcpy(pv + (size_t)i * kr, (const char *)v->data + (size_t)(i * ldv) * es, kr);
  }
  sl->n = n, sl->rows = n * H + 1, sl->layer = layer, sl->first = first, sl->req = ++p->nreq;
  p->st.requests = (uint64_t)p->nreq;
  for (int64_t i = 0; i < sl->rows; i++) { /* the identity: o = 0, lse = -inf; trailer: -inf times, 0 bytes */
    float *r = sl->part + i * w;
    for (int d = 0; d < D; d++) r[d] = i == sl->rows - 1 && d != DA_TRAILER_KV_BYTES ? -INFINITY : 0.0f;
    r[D] = i == sl->rows - 1 ? da_bits_to_f32(DA_LSE_TRAILER) : -INFINITY;
  }
  DA_MPICHECK(MPI_Ibcast(sl->msg, (int)p->msg_bytes, MPI_BYTE, 0, p->group, &sl->bc),
              "rank %d offload: MPI_Ibcast (request)", p->wrank);
  DA_MPICHECK(MPI_Ireduce(MPI_IN_PLACE, sl->part, (int)sl->rows, p->rowtype, p->op, 0, p->group, &sl->rd),
              "rank %d offload: MPI_Ireduce (partials)", p->wrank);
  sl->busy = 1;
  *slot = s;
  return DA_SUCCESS;
}

da_status_t da_offload_start(da_offload_t *p, int layer, int64_t first, const da_tensor_t *q, const da_tensor_t *k,
                             const da_tensor_t *v, int *slot) {
  da_error_clear();
  da_status_t st = start(p, layer, first, q, k, v, slot);
  return p ? da_context_finish(p->ctx, st) : st;
}

void da_offload_progress(da_offload_t *p) {
  int flag;
  for (int i = 0; p && i < p->nslots; i++)
    if (p->slots[i].busy) {
      MPI_Test(&p->slots[i].bc, &flag, MPI_STATUS_IGNORE);
      MPI_Test(&p->slots[i].rd, &flag, MPI_STATUS_IGNORE);
    }
}

/* Wait for slot s to complete (out / lse NULL: drop the result). */
static da_status_t finish(da_offload_t *p, int s, da_tensor_t *out, da_tensor_t *lse) {
  static const char fn[] = "da_offload_wait";
  if (!p) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s: offload is NULL", fn);
  if (p->info.role != DA_ROLE_COMPUTE || s < 0 || s >= p->nslots || !p->slots[s].busy)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: slot %d is not in flight", p->wrank, fn, s);
  slot_t *sl = &p->slots[s];
  const int H = p->kp.H, D = p->kp.D, w = D + 1;
  int64_t ldo = 0, ldl = 0;
  if (out) DA_CHECK(check_rows(p, fn, "out", out, sl->n, H, D, p->kp.dtype, 3, &ldo));
  if (lse) DA_CHECK(check_rows(p, fn, "lse", lse, sl->n, H, 1, DA_FLOAT32, 2, &ldl));
  DA_CHECK(wait_req(p, &sl->bc, "the request broadcast to reach the memory ranks", sl));
  DA_CHECK(wait_req(p, &sl->rd, "the reduction of the partials", sl));
  const double t_done = MPI_Wtime();
  sl->busy = 0;
  const float *tr = sl->part + (sl->rows - 1) * w;
  for (int64_t i = 0; i < sl->n * H; i++)
    if (da_lse_is(sl->part[i * w + D], DA_LSE_POISON))
      return DA_ERR(DA_ERR_REMOTE, "rank %d offload (group %d) request %lld: a memory rank failed on this request (its "
                    "partials arrived poisoned; its own message says why)", p->wrank, p->info.group, (long long)sl->req);
  for (int64_t i = 0; out && i < sl->n; i++)
    for (int h = 0; h < H; h++) {
      const float *r = sl->part + (i * H + h) * w;
      for (int d = 0; d < D; d++) da_store_f32(out->data, (int)p->kp.dtype, i * ldo + (int64_t)h * D + d, r[d]);
      if (lse) ((float *)lse->data)[i * ldl + h] = r[D];
    }
  const double t_end = MPI_Wtime();
  /* the trailer (kvcache.h): latest arrival, latest partials ready (after t_post), KV bytes */
  const double a = D > DA_TRAILER_ARRIVED ? tr[DA_TRAILER_ARRIVED] : 0,
               b = D > DA_TRAILER_READY ? tr[DA_TRAILER_READY] : a;
  p->st.send_s = a > 0 ? a : 0;
  p->st.attn_s = b > a ? b - a : 0;
  p->st.reduce_s = t_done - sl->t_post - (b > 0 ? b : 0);
  if (p->st.reduce_s < 0) p->st.reduce_s = 0;
  p->st.recv_s = t_end - t_done;
  p->st.total_s = t_end - sl->t_post;
  p->st.kv_bytes = D > DA_TRAILER_KV_BYTES ? (uint64_t)tr[DA_TRAILER_KV_BYTES] : 0;
  p->st.net_bytes = (uint64_t)p->info.group_memory * (p->msg_bytes + (uint64_t)sl->rows * (uint64_t)w * sizeof(float));
  return DA_SUCCESS;
}

da_status_t da_offload_wait(da_offload_t *p, int s, da_tensor_t *out, da_tensor_t *lse) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_wait: offload is NULL");
  DA_ARG_CHECK(da_context_errbuf(p->ctx), p->info.role == DA_ROLE_COMPUTE && s >= 0 && s < p->nslots && p->slots[s].busy,
               "rank %d: da_offload_wait: slot %d is not a request in flight on this rank (%s rank, %d slots)",
               p->wrank, s, p->info.role == DA_ROLE_COMPUTE ? "compute" : "memory", p->nslots);
  da_status_t st = out ? finish(p, s, out, lse) : DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_offload_wait: out is NULL");
  return p ? da_context_finish(p->ctx, st) : st;
}

/* A row view [first .. first + n) of a [B][heads][D] (or [B][heads]) tensor. */
static da_tensor_t rows_of(const da_tensor_t *t, int64_t first, int64_t n) {
  da_tensor_t r = *t;
  r.data = (char *)t->data + (size_t)(first * t->strides[0]) * da_dtype_size(t->dtype);
  r.shape[0] = n;
  return r;
}

da_status_t da_offload_step(da_offload_t *p, int layer, const da_tensor_t *q, const da_tensor_t *k,
                            const da_tensor_t *v, da_tensor_t *out, da_tensor_t *lse) {
  da_error_clear();
  static const char fn[] = "da_offload_step";
  DA_ARG_CHECK(NULL, p != NULL, "%s: offload is NULL", fn);
  DA_ARG_CHECK(da_context_errbuf(p->ctx), p->info.role == DA_ROLE_COMPUTE, "rank %d: %s on a memory rank", p->wrank, fn);
  da_status_t st = DA_SUCCESS;
  for (int i = 0; i < p->nslots && st == DA_SUCCESS; i++)
    if (p->slots && p->slots[i].busy) st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s with slot %d in flight", p->wrank, fn, i);
  /* the shapes of the whole batch: [B][..]; the per-micro-batch calls check the rest */
  const da_tensor_t *all[5] = {q, k, v, out, lse};
  static const char *const names[5] = {"q", "k", "v", "out", "lse"};
  for (int i = 0; i < 5 && st == DA_SUCCESS; i++)
    if ((i < 4 && (!all[i] || !all[i]->data)) || (all[i] && (all[i]->ndim < 2 || all[i]->shape[0] != p->B)))
      st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: %s must be [B = %lld][...]", p->wrank, fn, names[i],
                  (long long)p->B);
  /* every row view below is taken inside a span that exists (rows_of adds first * row stride) */
  for (int i = 0; i < 5 && st == DA_SUCCESS; i++)
    if (all[i]) {
      char who[48];
      snprintf(who, sizeof who, "rank %d: %s: ", p->wrank, fn);
      st = da_tensor_check_strides(all[i], i == 4 ? sizeof(float) : da_dtype_size(all[i]->dtype), 1, who, names[i],
                                   NULL);
    }
  const int64_t nmb = (p->B + p->nmax - 1) / p->nmax; /* <= microbatches = slots */
  int *slots = malloc((size_t)nmb * sizeof *slots), started = 0;
  if (st == DA_SUCCESS && !slots) st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: slots", fn);
  for (int64_t m = 0; m < nmb && st == DA_SUCCESS; m++) {
    const int64_t f = m * p->nmax, n = f + p->nmax <= p->B ? p->nmax : p->B - f;
    const da_tensor_t tq = rows_of(q, f, n), tk = rows_of(k, f, n), tv = rows_of(v, f, n);
    st = start(p, layer, f, &tq, &tk, &tv, &slots[m]);
    started += st == DA_SUCCESS;
  }
  for (int64_t m = 0; m < started; m++) {
    const int64_t f = m * p->nmax, n = f + p->nmax <= p->B ? p->nmax : p->B - f;
    da_tensor_t to = rows_of(out, f, n), tl = lse ? rows_of(lse, f, n) : to;
    da_status_t s2 = st == DA_SUCCESS ? finish(p, slots[m], &to, lse ? &tl : NULL) : finish(p, slots[m], NULL, NULL);
    if (st == DA_SUCCESS) st = s2;
  }
  free(slots);
  return da_context_finish(p->ctx, st);
}

/* The header-only broadcast of STOP or CANCEL (with the reason in the payload). */
static da_status_t send_cmd(da_offload_t *p, int cmd, const char *reason) {
  int64_t *h = (int64_t *)p->slots[0].msg;
  memset(h, 0, HDR * sizeof(int64_t));
  h[HDR_CMD] = cmd, h[HDR_NREQ] = p->nreq;
  char *text = p->slots[0].msg + HDR * sizeof(int64_t);
  const size_t room = p->msg_bytes - HDR * sizeof(int64_t);
  if (room > 0) snprintf(text, room, "%s", reason ? reason : "");
  MPI_Request r;
  DA_MPICHECK(MPI_Ibcast(p->slots[0].msg, (int)p->msg_bytes, MPI_BYTE, 0, p->group, &r),
              "rank %d offload: MPI_Ibcast (stop)", p->wrank);
  return wait_req(p, &r, cmd == CMD_STOP ? "the stop broadcast" : "the cancel broadcast", NULL);
}

da_status_t da_offload_stop(da_offload_t *p) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_stop: offload is NULL");
  if (p->info.role != DA_ROLE_COMPUTE) return DA_SUCCESS;
  if (p->broken) return da_context_finish(p->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_stop: this "
                                                         "offload had a failure; free it", p->wrank));
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i].busy)
      return da_context_finish(p->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_stop with slot %d in flight",
                                              p->wrank, i));
  return da_context_finish(p->ctx, send_cmd(p, CMD_STOP, NULL));
}

da_status_t da_offload_cancel(da_offload_t *p, const char *reason) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_cancel: offload is NULL");
  if (p->info.role != DA_ROLE_COMPUTE)
    return da_context_finish(p->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_cancel on a memory rank", p->wrank));
  if (p->broken) return da_context_finish(p->ctx, DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_cancel: this "
                                                         "offload had a failure; free it", p->wrank));
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i].busy) {
      da_status_t st = finish(p, i, NULL, NULL);
      if (st == DA_ERR_TIMEOUT || p->broken) return da_context_finish(p->ctx, st);
    }
  return da_context_finish(p->ctx, send_cmd(p, CMD_CANCEL, reason));
}

/* ---- memory side -------------------------------------------------------------------------------- */

/* Append the request's k, v to cache sequences layer * B + first .. and decode them into part. */
static da_status_t attend(da_offload_t *p, slot_t *sl, int layer, int64_t first, int64_t n, uint64_t *kvb) {
  const int H = p->kp.H, G = p->kp.G, D = p->kp.D, w = D + 1;
  const size_t es = da_dtype_size(p->kp.dtype), rowb = (size_t)(G * D) * es;
  const int64_t NB = (int64_t)p->L * p->B, base = (int64_t)layer * p->B + first;
  if (layer < 0 || layer >= p->L || first < 0 || n < 1 || n > p->nmax || first + n > p->B)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d offload: malformed request (layer %d, sequences %lld + %lld)",
                  p->wrank, layer, (long long)first, (long long)n);
  const char *pl = sl->msg + HDR * sizeof(int64_t), *pq = pl, *pk = pq + (size_t)(p->nmax * H * D) * es,
             *pv = pk + (size_t)(p->nmax * G * D) * es;
  memset(p->ntok, 0, (size_t)NB * sizeof *p->ntok);
  for (int64_t i = 0; i < n; i++) {
    p->ntok[base + i] = 1;
    memcpy(p->kstage + (size_t)(base + i) * rowb, pk + (size_t)i * rowb, rowb);
    memcpy(p->vstage + (size_t)(base + i) * rowb, pv + (size_t)i * rowb, rowb);
  }
  da_tensor_t tk, tv;
  const int64_t sh[3] = {NB, G, D};
  da_tensor_make(&tk, p->kstage, p->kp.dtype, 3, sh), da_tensor_make(&tv, p->vstage, p->kp.dtype, 3, sh);
  DA_CHECK(da_kvcache_append(p->cache, p->ntok, &tk, &tv));
  const da_kvcache_t *c = p->cache;
  for (int64_t i = 0; i < n; i++) {
    const da_kvseq_t *s = &c->seq[base + i];
    float *rows = sl->part + (size_t)(i * H) * (size_t)w;
    if (s->npages == 0 || s->rows == 0) {
      for (int h = 0; h < H; h++) {
        memset(rows + h * w, 0, (size_t)D * sizeof(float));
        rows[h * w + D] = -INFINITY;
      }
      continue;
    }
    DA_CHECK(p->kt->decode(&p->kp, pq + (size_t)(i * H * D) * es, (int64_t)H * D, da_span(s->len - 1, 1, 1), s->pages,
                           (int)s->npages, p->o, p->lse, NULL));
    for (int h = 0; h < H; h++) {
      memcpy(rows + h * w, p->o + h * D, (size_t)D * sizeof(float));
      rows[h * w + D] = p->lse[h];
    }
    *kvb += (uint64_t)s->rows * 2 * c->row_bytes;
  }
  return DA_SUCCESS;
}

/* Post the receive of the next request into sl and wait for it (what: for the timeout's message),
 * progressing the reductions of the previous requests meanwhile. */
static da_status_t next_request(da_offload_t *p, slot_t *sl, const char *what) {
  MPI_Request bc;
  DA_MPICHECK(MPI_Ibcast(sl->msg, (int)p->msg_bytes, MPI_BYTE, 0, p->group, &bc),
              "rank %d offload: MPI_Ibcast (request)", p->wrank);
  const double t0 = da_time_now();
  for (long it = 0;; it++) {
    int flag = 0;
    DA_MPICHECK(MPI_Test(&bc, &flag, MPI_STATUS_IGNORE), "rank %d offload: MPI_Test (request)", p->wrank);
    if (flag) return DA_SUCCESS;
    for (int i = 0; i < p->nslots; i++)
      if (p->slots[i].busy) MPI_Test(&p->slots[i].rd, &flag, MPI_STATUS_IGNORE);
    const double waited = da_time_now() - t0;
    const int first = roll_notice(p);
    if (first >= 0 || waited > p->timeout) return timed_out(p, what, waited, NULL, first);
    da_mpi_backoff(it, waited);
  }
}

/* STOP or CANCEL in sl: finish the reductions in flight, then return `failed` (the first local
 * failure, or success) or, on a cancel, the compute rank's reason. */
static da_status_t stop_serving(da_offload_t *p, slot_t *sl, da_status_t failed) {
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i].busy) {
      DA_CHECK(wait_req(p, &p->slots[i].rd, "the reduction of the partials", &p->slots[i]));
      p->slots[i].busy = 0;
    }
  if (((const int64_t *)sl->msg)[HDR_CMD] != CMD_CANCEL) return failed;
  char me[96];
  who(p, me, sizeof me);
  const char *why = sl->msg + HDR * sizeof(int64_t);
  sl->msg[p->msg_bytes - 1] = '\0';
  return DA_ERR(DA_ERR_REMOTE, "%s: compute rank %d cancelled the offload after request %lld%s%s", me,
                p->info.compute_world_rank, (long long)p->nreq, *why ? ": " : "", why);
}

/* Answer the ATTEND request in sl (received at t_recv, compute rank's clock): its partials, poisoned
 * once this rank has failed (*failed keeps the first failure), the trailer, and the reduction. */
static da_status_t answer(da_offload_t *p, slot_t *sl, double t_recv, da_status_t *failed) {
  const int H = p->kp.H, D = p->kp.D, w = D + 1;
  const int64_t *h = (const int64_t *)sl->msg;
  double t_post;
  memcpy(&t_post, &h[HDR_TPOST], sizeof t_post);
  const int layer = (int)h[HDR_LAYER];
  const int64_t first = h[HDR_FIRST], n = h[HDR_N] >= 1 && h[HDR_N] <= p->nmax ? h[HDR_N] : 1;
  sl->req = ++p->nreq, sl->layer = layer, sl->first = first, sl->n = n;
  uint64_t kvb = 0;
  const double tk0 = da_time_now();
  da_status_t st = *failed == DA_SUCCESS ? attend(p, sl, layer, first, n, &kvb) : *failed;
  p->st.kernel_s += da_time_now() - tk0;
  p->st.requests++;
  p->st.kv_bytes += kvb;
  sl->rows = n * H + 1;
  if (st != DA_SUCCESS) {
    if (*failed == DA_SUCCESS) {
      *failed = st;
      DA_WARN(DA_SUB_COMM, "rank %d offload: %s (answering with poisoned partials)", p->wrank, da_error_message());
    }
    for (int64_t i = 0; i < n * H; i++) sl->part[i * w + D] = da_bits_to_f32(DA_LSE_POISON);
  }
  float *tr = sl->part + (sl->rows - 1) * w;
  const double t_ready = MPI_Wtime() + p->clock_off;
  for (int d = 0; d < D; d++)
    tr[d] = d == DA_TRAILER_ARRIVED    ? (float)(t_recv - t_post)
            : d == DA_TRAILER_READY    ? (float)(t_ready - t_post)
            : d == DA_TRAILER_KV_BYTES ? (float)kvb
                                       : -INFINITY;
  tr[D] = da_bits_to_f32(DA_LSE_TRAILER);
  DA_MPICHECK(MPI_Ireduce(sl->part, NULL, (int)sl->rows, p->rowtype, p->op, 0, p->group, &sl->rd),
              "rank %d offload: MPI_Ireduce (partials)", p->wrank);
  sl->busy = 1;
  return DA_SUCCESS;
}

/* The memory rank's loop: requests round-robin over the slots until STOP or CANCEL. */
static da_status_t serve(da_offload_t *p) {
  if (p->info.role != DA_ROLE_MEMORY)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_serve on a compute rank", p->wrank);
  if (p->broken)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_offload_serve: this offload had a failure; free it", p->wrank);
  char what[128];
  snprintf(what, sizeof what, "the next request from compute rank %d", p->info.compute_world_rank);
  da_status_t failed = DA_SUCCESS; /* the first local failure: later requests are answered poisoned */
  for (int64_t k = 0;; k++) {
    slot_t *sl = &p->slots[k % p->nslots];
    if (sl->busy) {
      DA_CHECK(wait_req(p, &sl->rd, "the reduction of the partials", sl));
      sl->busy = 0;
    }
    DA_CHECK(next_request(p, sl, what));
    const double t_recv = MPI_Wtime() + p->clock_off;
    const int64_t cmd = ((const int64_t *)sl->msg)[HDR_CMD];
    if (cmd == CMD_STOP || cmd == CMD_CANCEL) return stop_serving(p, sl, failed);
    DA_CHECK(answer(p, sl, t_recv, &failed));
  }
}

da_status_t da_offload_serve(da_offload_t *p) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_serve: offload is NULL");
  return da_context_finish(p->ctx, serve(p));
}

da_status_t da_offload_get_stats(const da_offload_t *p, da_offload_stats_t *st) {
  da_error_clear();
  DA_ARG_CHECK(NULL, p != NULL, "da_offload_get_stats: offload is NULL");
  DA_ARG_CHECK(da_context_errbuf(p->ctx), st != NULL, "da_offload_get_stats: stats is NULL");
  *st = p->st;
  st->size = sizeof *st, st->version = DA_API_VERSION;
  return da_errbuf_finish(da_context_errbuf(p->ctx), DA_SUCCESS);
}
