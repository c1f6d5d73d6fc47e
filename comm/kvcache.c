/* kvcache.c: the distributed paged KV cache (da_kvcache_* of include/distattn.h). Pages of `page`
 * rows hold k then v; a prefill is cut into pages along its layout segments, appended tokens fill
 * pages of consecutive positions on the rank partition/kvmap.c picks. Every rank replays the shard
 * map from the token counts, so appends move no rows; creation and prefill are agreed on by every
 * rank, and each append's counts by a deferred nonblocking check (completed by the next append or
 * decode step). Decode itself lives in tree.c. */
#include <mpi.h> /* before distattn.h: declares the distributed section */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "distattn.h"
#include "kvcache.h"
#include "tensor.h"
#include "env.h"

double da_comm_default_timeout(void) {
  double t = 300.0;
  int set = 0;
  /* DISTATTN_TIMEOUT: real seconds >= DA_TIMEOUT_MIN_S (core/env.c). A bad value was refused by
   * da_context_create already; one met here anyway is logged, never used. */
  if (da_env_double("DISTATTN_TIMEOUT", &t, &set) != DA_SUCCESS) {
    DA_WARN(DA_SUB_ENV, "%s (using 300 s)", da_error_message());
    t = 300.0;
  }
  return t;
}

uint64_t da_fnv1a(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

da_status_t da_fields_compare(da_xport_t *xp, const int64_t *f, int n, const char *const *names, const char *what,
                              char *msg, size_t cap, int *bad) {
  int64_t stack[64], *red = 2 * n <= 64 ? stack : malloc((size_t)(2 * n) * sizeof *red);
  if (!red) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "%s: agreement buffer", what);
  for (int i = 0; i < n; i++) red[i] = f[i], red[n + i] = -f[i];
  da_status_t st = xp->t->allreduce(xp, red, 2 * n, DA_XT_INT64, DA_XOP_MAX);
  if (st != DA_SUCCESS) {
    if (red != stack) free(red);
    return st;
  }
  int len = 0;
  *bad = 0;
  msg[0] = '\0';
  for (int i = 0; i < n; i++) {
    int64_t mx = red[i], mn = -red[n + i];
    if (mx == mn) continue;
    *bad = 1;
    if (len >= (int)cap - 80) continue;
    if (names[i][0] == '#')
      len += snprintf(msg + len, cap - (size_t)len, "%s%s differ", len ? ", " : "", names[i] + 1);
    else
      len += snprintf(msg + len, cap - (size_t)len, "%s%s (here %lld, ranks range %lld..%lld)", len ? ", " : "",
                      names[i], (long long)f[i], (long long)mn, (long long)mx);
  }
  if (red != stack) free(red);
  return DA_SUCCESS;
}

da_status_t da_agree_fields(da_xport_t *xp, const int64_t *f, int n, const char *const *names, const char *what) {
  char msg[400];
  int bad = 0;
  DA_CHECK(da_fields_compare(xp, f, n, names, what, msg, sizeof msg, &bad));
  if (bad) return DA_ERR(DA_ERR_MISMATCH, "rank %d: %s: ranks disagree: %s", xp->rank, what, msg);
  return DA_SUCCESS;
}

/* ---- the deferred check of the appended counts (kvcache.h) -------------------------------------- */

/* The check's buffers: [2 W] sent (each word v, then -v, so one MPI_MAX gives max and min), [2 W]
 * received. Their own allocation (named for tests/sanitize/lsan.supp): after a check timed out MPI
 * may still write them, so they are never freed then. */
static int64_t *kvcheck_buffers(void) { return calloc(4 * DA_KVCHECK_WORDS, sizeof(int64_t)); }

static void check_words(const da_kvcache_t *c, int64_t *f) {
  f[0] = c->nappend, f[1] = (int64_t)(c->chash >> 1), f[2] = c->ctotal, f[3] = c->cfailed;
}

/* Start the check of the append just made (or refused). Every rank starts one per append call,
 * whatever its local outcome, so the checks pair up across ranks. */
static da_status_t check_start(da_kvcache_t *c) {
  if (c->ccomm == MPI_COMM_NULL || !c->cbuf || c->chk_st != DA_SUCCESS) return DA_SUCCESS; /* P = 1 */
  int64_t f[DA_KVCHECK_WORDS], *snd = c->cbuf, *rcv = c->cbuf + 2 * DA_KVCHECK_WORDS;
  check_words(c, f);
  for (int i = 0; i < DA_KVCHECK_WORDS; i++) snd[i] = f[i], snd[DA_KVCHECK_WORDS + i] = -f[i];
  DA_MPICHECK(MPI_Iallreduce(snd, rcv, 2 * DA_KVCHECK_WORDS, MPI_INT64_T, MPI_MAX, c->ccomm, &c->creq),
              "rank %d da_kvcache_append: count check", c->rank);
  return DA_SUCCESS;
}

/* "ranks 0-2, 5" for the n ranks listed in r (ascending). */
static int rank_list(char *buf, size_t cap, const int *r, int n) {
  int len = snprintf(buf, cap, "rank%s ", n > 1 ? "s" : "");
  for (int i = 0; i < n && len < (int)cap; i++) {
    int j = i;
    while (j + 1 < n && r[j + 1] == r[j] + 1) j++;
    len += snprintf(buf + len, cap - (size_t)len, "%s%d", i ? ", " : "", r[i]);
    if (j > i && len < (int)cap) len += snprintf(buf + len, cap - (size_t)len, "-%d", r[j]);
    i = j;
  }
  return len;
}

/* The ranks disagreed: gather what each appended (one allgather on the cache's control transport;
 * every rank is on this path, since all received the same check) and name them, grouped. */
enum { REC_N, REC_TOTAL, REC_FAILED, REC_HASH, REC_LAST, REC_WORDS = REC_LAST + 5 };
static da_status_t check_report(da_kvcache_t *c, const char *fn) {
  int64_t mine[REC_WORDS] = {c->nappend, c->ctotal, c->cfailed, (int64_t)(c->chash >> 1)};
  memcpy(mine + REC_LAST, c->clast, sizeof c->clast);
  int64_t *all = malloc((size_t)c->P * sizeof mine);
  int *grp = malloc((size_t)c->P * sizeof *grp), *done = calloc((size_t)c->P, sizeof *done);
  da_status_t st = all && grp && done ? DA_SUCCESS : DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d %s: count report", c->rank, fn);
  if (st == DA_SUCCESS) st = c->xp.t->allgather(&c->xp, mine, all, sizeof mine);
  if (st == DA_SUCCESS) {
    char msg[DA_ERRMSG_MAX - 160];
    int len = 0, groups = 0;
    for (int r = 0; r < c->P && len < (int)sizeof msg - 1; r++) {
      if (done[r]) continue;
      const int64_t *a = all + (size_t)r * REC_WORDS;
      int n = 0;
      for (int q = r; q < c->P; q++)
        if (!done[q] && !memcmp(a, all + (size_t)q * REC_WORDS, sizeof mine)) done[q] = 1, grp[n++] = q;
      if (++groups > 4) { /* the message has room for a few: the rest are counted */
        int rest = n;
        for (int q = r + 1; q < c->P; q++) rest += !done[q];
        len += snprintf(msg + len, sizeof msg - (size_t)len, "; %d more rank(s) with other counts", rest);
        break;
      }
      char ranks[96], counts[96];
      rank_list(ranks, sizeof ranks, grp, n);
      int cl = snprintf(counts, sizeof counts, "{");
      for (int64_t b = 0; b < c->B && b < 4; b++)
        cl += snprintf(counts + cl, sizeof counts - (size_t)cl, "%s%lld", b ? ", " : "", (long long)a[REC_LAST + 1 + b]);
      snprintf(counts + cl, sizeof counts - (size_t)cl, "%s}", c->B > 4 ? ", ..." : "");
      if (a[REC_FAILED])
        len += snprintf(msg + len, sizeof msg - (size_t)len, "%s%s: append %lld refused or failed there", len ? "; " : "",
                        ranks, (long long)a[REC_N]);
      else
        len += snprintf(msg + len, sizeof msg - (size_t)len, "%s%s: append %lld of %lld token(s) %s, %lld appended in all",
                        len ? "; " : "", ranks, (long long)a[REC_N], (long long)a[REC_LAST], counts,
                        (long long)a[REC_TOTAL]);
    }
    st = DA_ERR(DA_ERR_MISMATCH, "rank %d %s: ranks disagree on the kv cache's appended token counts: %s (every rank "
                "must append the same counts; the shards no longer agree: free the cache)", c->rank, fn, msg);
  }
  free(all), free(grp), free(done);
  return st;
}

da_status_t da_kvcache_check_finish(da_kvcache_t *c, const char *fn) {
  if (c->chk_st == DA_ERR_MISMATCH)
    return DA_ERR(DA_ERR_MISMATCH, "rank %d %s: the ranks of this kv cache disagreed on the token counts of append "
                  "%lld (reported then); free it", c->rank, fn, (long long)c->chk_at);
  if (c->chk_st != DA_SUCCESS)
    return DA_ERR(c->chk_st, "rank %d %s: the count check of append %lld of this kv cache failed (reported then); "
                  "free it", c->rank, fn, (long long)c->chk_at);
  if (c->creq == MPI_REQUEST_NULL) return DA_SUCCESS;
  int done = 0, rc = da_mpi_poll(&c->creq, c->xp.timeout_s, &done);
  if (rc != MPI_SUCCESS || !done) { /* the request cannot be cancelled: MPI keeps it and its buffers */
    c->creq = MPI_REQUEST_NULL, c->cbuf = NULL;
    c->chk_st = rc != MPI_SUCCESS ? DA_ERR_MPI : DA_ERR_TIMEOUT, c->chk_at = c->nappend;
    if (rc != MPI_SUCCESS) return da_mpi_error(rc, __FILE__, __LINE__, "rank %d %s: kv cache count check", c->rank, fn);
    return DA_ERR(DA_ERR_TIMEOUT, "rank %d %s: the kv cache's check of append %lld did not complete within %g s (a "
                  "peer is missing or stuck, or the ranks made different calls on the cache)", c->rank, fn,
                  (long long)c->nappend, c->xp.timeout_s);
  }
  const int64_t *rcv = c->cbuf + 2 * DA_KVCHECK_WORDS;
  int agree = 1;
  for (int i = 0; i < DA_KVCHECK_WORDS; i++) agree &= rcv[i] == -rcv[DA_KVCHECK_WORDS + i];
  if (agree) return DA_SUCCESS;
  c->chk_st = DA_ERR_MISMATCH, c->chk_at = c->nappend;
  return check_report(c, fn);
}

/* At free: the last append's check, if still in flight, completes (bounded); a disagreement nobody
 * was told of yet is logged. Returns 1 when the check must be left to MPI (its communicator and
 * buffers are then not freed). */
static int check_close(da_kvcache_t *c) {
  if (c->creq != MPI_REQUEST_NULL) {
    int done = 0, rc = da_mpi_poll(&c->creq, c->xp.timeout_s, &done);
    if (rc != MPI_SUCCESS || !done) return 1;
    const int64_t *rcv = c->cbuf + 2 * DA_KVCHECK_WORDS;
    for (int i = 0; i < DA_KVCHECK_WORDS; i++)
      if (rcv[i] != -rcv[DA_KVCHECK_WORDS + i]) {
        DA_WARN(DA_SUB_PLAN, "rank %d da_kvcache_free: the ranks disagreed on the token counts of the last append "
                "(%lld); nothing used the cache after it", c->rank, (long long)c->nappend);
        break;
      }
  }
  if (c->chk_st == DA_ERR_TIMEOUT || c->chk_st == DA_ERR_MPI) return 1;
  free(c->cbuf);
  c->cbuf = NULL;
  return 0;
}

/* ---- sequences and pages -------------------------------------------------------------------- */

static void seq_clear(da_kvcache_t *c, da_kvseq_t *s) {
  for (int64_t i = 0; i < s->npages; i++) {
    if (c->dev) da_dev_free(c->dev, s->mem[i]);
    else da_free(s->mem[i]);
    c->alloc_bytes -= 2 * (size_t)s->pcap[i] * c->row_bytes;
  }
  free(s->pages);
  free(s->mem);
  free(s->pcap);
  s->pages = NULL, s->mem = NULL, s->pcap = NULL;
  s->npages = s->cap = 0;
  s->rows = 0;
  s->cur = -1;
  s->owner = -1;
  s->len = s->prefill = 0;
}

/* A new local page of capacity `cap` rows at positions pos (pos.count rows already in use). */
static da_status_t page_add(da_kvcache_t *c, da_kvseq_t *s, int64_t cap, da_span_t pos) {
  if (s->npages == s->cap) {
    int64_t nc = s->cap ? 2 * s->cap : 16;
    da_kvpage_t *p = realloc(s->pages, (size_t)nc * sizeof *p);
    if (p) s->pages = p;
    char **m = realloc(s->mem, (size_t)nc * sizeof *m);
    if (m) s->mem = m;
    int64_t *pc = realloc(s->pcap, (size_t)nc * sizeof *pc);
    if (pc) s->pcap = pc;
    if (!p || !m || !pc) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d: kv cache page table", c->rank);
    s->cap = nc;
  }
  size_t half = 0, both = 0;
  if (cap < 0 || da_mul_size((size_t)cap, c->row_bytes, &half) || da_mul_size(half, 2, &both))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: kv cache page of %lld rows of %zu bytes: the size overflows",
                  c->rank, (long long)cap, c->row_bytes);
  char *mem = NULL, why[256] = "";
  da_status_t st = DA_ERR_OUT_OF_MEMORY;
  if (c->dev) { /* the device table's own reason goes into the message: not every failure is memory */
    st = da_dev_alloc(c->dev, (void **)&mem, both);
    if (st != DA_SUCCESS) mem = NULL, snprintf(why, sizeof why, ": %s", da_error_message());
  } else {
    mem = da_malloc(both, 64);
  }
  if (!mem)
    return DA_ERR(st, "rank %d: kv cache page of %lld rows (%zu bytes; %zu already allocated)%s", c->rank,
                  (long long)cap, 2 * half, c->alloc_bytes, why);
  c->alloc_bytes += 2 * half;
  const int64_t ld = (int64_t)c->G * c->D;
  s->pages[s->npages] = (da_kvpage_t){.k = mem, .v = mem + half, .ldk = ld, .ldv = ld, .pos = pos};
  s->mem[s->npages] = mem;
  s->pcap[s->npages] = cap;
  s->npages++;
  return DA_SUCCESS;
}

/* ---- tensors ---------------------------------------------------------------------------------- */

/* Rows of [outer...][G][D] with the last axis contiguous: row (i, j) of head g starts at
 * base + (i * s0 + j * s1 + g * sg) elements. */
typedef struct {
  const char *base;
  int64_t s0, s1, sg;
} kview_t;

static da_status_t check_rows(const da_kvcache_t *c, const char *name, const da_tensor_t *t, int nouter,
                              const int64_t *outer, const char *const *axis, kview_t *v) {
  const int r = c->rank;
  if (!t) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: tensor is NULL", r, name);
  if (t->dtype != c->dtype)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: dtype %s, the cache holds %s", r, name,
                  da_dtype_name(t->dtype), da_dtype_name(c->dtype));
  if (t->device != DA_DEVICE_CPU)
    return DA_ERR(DA_ERR_UNSUPPORTED, "rank %d: %s: the kv cache lives in host memory (device %d given)", r, name,
                  (int)t->device);
  if (t->ndim != nouter + 2)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: ndim = %d, expected %d", r, name, t->ndim, nouter + 2);
  for (int i = 0; i < nouter; i++)
    if (t->shape[i] < outer[i] || (outer[i] >= 0 && i == 0 && t->shape[0] != outer[0]))
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: shape[%d] (%s) = %lld, expected %s%lld", r, name, i,
                    axis[i], (long long)t->shape[i], i ? ">= " : "", (long long)outer[i]);
  if (t->shape[nouter] != c->G || t->shape[nouter + 1] != c->D)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: rows are [%lld][%lld], the cache holds [%d][%d] (kv_heads, "
                  "dim)", r, name, (long long)t->shape[nouter], (long long)t->shape[nouter + 1], c->G, c->D);
  const char *names[4] = {0};
  for (int i = 0; i < nouter; i++) names[i] = axis[i];
  names[nouter] = "kv heads", names[nouter + 1] = "dim";
  char who[32];
  snprintf(who, sizeof who, "rank %d: ", r);
  DA_CHECK(da_tensor_check_strides(t, c->esz, 1, who, name, names));
  int64_t n = 1;
  for (int i = 0; i < nouter; i++) n *= t->shape[i];
  if (!t->data && n > 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: %s: data pointer is NULL", r, name);
  v->base = t->data;
  v->s0 = t->strides[0];
  v->s1 = nouter > 1 ? t->strides[1] : 0;
  v->sg = t->strides[nouter];
  return DA_SUCCESS;
}

static void copy_row(const da_kvcache_t *c, char *dst, const kview_t *v, int64_t i, int64_t j) {
  const size_t dbytes = (size_t)c->D * c->esz;
  for (int g = 0; g < c->G; g++)
    memcpy(dst + (size_t)g * dbytes, v->base + (size_t)(i * v->s0 + j * v->s1 + g * v->sg) * c->esz, dbytes);
}

/* Row (i, j) of the caller's (host) view into page memory dst: packed there directly, or, when the
 * pages are device memory, packed in host memory and copied (stream-ordered, blocking). */
static da_status_t put_row(da_kvcache_t *c, char *dst, const kview_t *v, int64_t i, int64_t j) {
  if (!c->dev) {
    copy_row(c, dst, v, i, j);
    return DA_SUCCESS;
  }
  copy_row(c, c->rowbuf, v, i, j);
  return c->dev->copy_from_host(dst, c->rowbuf, c->row_bytes, c->dstream);
}

/* The pages' home: the config's transport (size-gated: a config from before the field has none),
 * else DISTATTN_TRANSPORT; a device transport's table and a stream for the copies, or host memory.
 * The context must match: CPU kernels read host (or host-seam) memory, CUDA kernels CUDA memory. */
static da_status_t cache_home(da_kvcache_t *c, const da_kvcache_config_t *cfg) {
  const char *tp = cfg->size >= offsetof(da_kvcache_config_t, transport) + sizeof cfg->transport ? cfg->transport
                                                                                                : NULL;
  if (!tp) tp = da_param_string("DISTATTN_TRANSPORT");
  /* mpi in a CUDA context is the staged cuda-mpi: pages in GPU memory */
  tp = da_transport_resolve(tp ? tp : "mpi", da_context_device(c->ctx) == DA_DEVICE_CUDA);
  snprintf(c->transport, sizeof c->transport, "%s", tp);
  const da_transport_t *t = da_transport_find(c->transport);
  if (!t) return DA_ERR_INVALID_ARGUMENT;
  const da_device_t want = t->devapi && strcmp(t->devapi->name, "host") ? DA_DEVICE_CUDA : DA_DEVICE_CPU;
  if (da_context_device(c->ctx) != want)
    return DA_ERR(DA_ERR_UNSUPPORTED, "kv cache: the %s transport keeps pages in %s memory, which a %s context's kernels "
                  "cannot read", t->name, t->devapi ? t->devapi->name : "host",
                  da_context_device(c->ctx) == DA_DEVICE_CPU ? "CPU" : "CUDA");
  if (!t->devapi) return DA_SUCCESS;
  int ndev = 0;
  DA_CHECK(t->devapi->probe(&ndev));
  c->dev = t->devapi;
  c->rowbuf = malloc(c->row_bytes ? c->row_bytes : 1);
  if (!c->rowbuf) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "kv cache: row staging");
  return c->dev->stream_create(&c->dstream);
}

/* ---- create / free ---------------------------------------------------------------------------- */

static da_status_t cache_local(da_comm_t *comm, const da_problem_t *prob, const da_kvcache_config_t *cfg,
                               da_kvcache_t *c) {
  if (cfg->size < sizeof(size_t) + sizeof(unsigned) || cfg->version == 0 || cfg->version > DA_API_VERSION)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_kvcache_config_t: size %zu / version %u not recognized (start from "
                  "DA_KVCACHE_CONFIG_INITIALIZER)", cfg->size, cfg->version);
  if (cfg->page < 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache config: page = %lld tokens must be >= 0 (0 = 256)",
                  (long long)cfg->page);
  if ((unsigned)cfg->layout > DA_ALGO_ZIGZAG)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache config: unknown prefill layout %d (ring, striped, zigzag)",
                  (int)cfg->layout);
  if (!(cfg->timeout >= 0) || !isfinite(cfg->timeout))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache config: timeout %g s must be >= 0", cfg->timeout);
  /* Only the row shape matters here: lengths come from prefill and appends, masks from decode. */
  da_problem_t pr = *prob;
  if (pr.seq < 1) pr.seq = 1;
  pr.mask = DA_MASK_NONE, pr.ndocs = 0, pr.cu_seqlens = NULL;
  da_kparams_t kp;
  DA_CHECK(da_context_params(c->ctx, &pr, &kp));
  c->B = prob->batch, c->G = kp.G, c->D = kp.D, c->dtype = prob->dtype;
  c->esz = da_dtype_size(c->dtype);
  c->row_bytes = (size_t)c->G * c->D * c->esz;
  DA_CHECK(cache_home(c, cfg));
  c->page = cfg->page ? cfg->page : DA_KVCACHE_DEFAULT_PAGE;
  c->layout = cfg->layout;
  static const da_layout_kind_t kinds[] = {DA_LAYOUT_CONTIGUOUS, DA_LAYOUT_STRIPED, DA_LAYOUT_ZIGZAG};
  DA_CHECK(da_kvmap_init(&c->map, c->P, c->page, kinds[cfg->layout], cfg->weights));
  c->seq = calloc((size_t)c->B, sizeof *c->seq);
  if (!c->seq) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "kv cache: %lld sequences", (long long)c->B);
  for (int64_t b = 0; b < c->B; b++) {
    c->seq[b].tokens = calloc((size_t)c->P, sizeof(int64_t));
    if (!c->seq[b].tokens) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "kv cache: token counts");
    c->seq[b].cur = -1, c->seq[b].owner = -1;
  }
  return DA_SUCCESS;
}

void da_kvcache_free(da_kvcache_t *c) {
  if (!c) return;
  int leave_check = check_close(c);
  if (c->seq)
    for (int64_t b = 0; b < c->B; b++) {
      seq_clear(c, &c->seq[b]);
      free(c->seq[b].tokens);
    }
  free(c->seq);
  if (c->dev && c->dstream) c->dev->stream_destroy(c->dstream);
  free(c->rowbuf);
  da_kvmap_free(&c->map);
  da_xport_close(&c->xp);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (c->mcomm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&c->mcomm);
  if (c->ccomm != MPI_COMM_NULL && !finalized && !leave_check) MPI_Comm_free(&c->ccomm);
  free(c);
}

da_status_t da_kvcache_create(da_comm_t *comm, const da_problem_t *prob, const da_kvcache_config_t *cfg,
                              da_kvcache_t **out) {
  da_error_clear();
  da_context_t *ctx;
  da_status_t st;
  da_kvcache_t *c = da_comm_create_begin(comm, (void **)out, "da_kvcache_create", sizeof *c, "kv cache", &ctx, &st);
  if (!c) return st;
  da_kvcache_config_t def = DA_KVCACHE_CONFIG_INITIALIZER;
  if (!cfg) cfg = &def;
  c->ctx = ctx;
  c->mcomm = c->ccomm = MPI_COMM_NULL;
  c->creq = MPI_REQUEST_NULL;
  c->chash = DA_FNV_INIT;
  /* The control transport comes first: every later failure must reach the other ranks. */
  double timeout;
  st = da_comm_dup_bounded(comm, cfg->timeout, "da_kvcache_create", &c->mcomm, &timeout);
  if (st != DA_SUCCESS) {
    da_kvcache_free(c);
    return da_context_finish(ctx, st);
  }
  st = da_xport_open(&c->xp, "mpi", c->mcomm, timeout);
  if (st != DA_SUCCESS) {
    da_kvcache_free(c);
    return da_context_finish(ctx, st);
  }
  c->rank = c->xp.rank, c->P = c->xp.nranks;
  c->xp.phase = "kv cache";
  if (!prob) st = DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_kvcache_create: problem is NULL");
  else st = cache_local(comm, prob, cfg, c);
  st = da_xport_agree(&c->xp, st, "kv cache");
  if (st == DA_SUCCESS) {
    uint64_t h = DA_FNV_INIT;
    if (c->map.weights) h = da_fnv1a(h, c->map.weights, (size_t)c->P * sizeof(double));
    const int64_t f[] = {c->B, c->G, c->D, c->dtype, c->page, c->layout, c->map.weighted, (int64_t)(h >> 2),
                         (int64_t)(da_fnv1a(DA_FNV_INIT, c->transport, strlen(c->transport)) >> 2)};
    static const char *const names[] = {"batch", "kv_heads", "dim", "dtype", "page", "layout", "weighted", "#weights",
                                        "#transport"};
    st = da_agree_fields(&c->xp, f, 9, names, "kv cache");
  }
  /* The append check's own communicator and buffers (every rank got here: the agreement passed). */
  if (st == DA_SUCCESS && c->P > 1) {
    st = da_mpi_comm_dup(c->mcomm, timeout, "da_kvcache_create", &c->ccomm);
    if (st == DA_SUCCESS && !(c->cbuf = kvcheck_buffers()))
      st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "rank %d da_kvcache_create: append check buffers", c->rank);
    st = da_xport_agree(&c->xp, st, "kv cache");
  }
  if (st != DA_SUCCESS) {
    da_kvcache_free(c);
    return da_context_finish(ctx, st);
  }
  DA_INFO(DA_SUB_PLAN, "kv cache: %lld sequences of [%d][%d] %s rows, pages of %lld tokens, prefill %s%s", (long long)c->B,
          c->G, c->D, da_dtype_name(c->dtype), (long long)c->page, da_layout_name(c->map.kind),
          c->map.weighted ? " (weighted appends)" : "");
  *out = c;
  return da_context_finish(ctx, DA_SUCCESS);
}

/* ---- prefill ---------------------------------------------------------------------------------- */

static da_status_t prefill_local(da_kvcache_t *c, int64_t b, int64_t len, const da_tensor_t *k, const da_tensor_t *v,
                                 kview_t *vk, kview_t *vv, int64_t *nloc) {
  if (c->broken) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: this kv cache had a failed append; free it", c->rank);
  if (b < 0 || b >= c->B)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_prefill: sequence %lld of %lld", c->rank, (long long)b,
                  (long long)c->B);
  if (len < 0) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_prefill: len = %lld", c->rank, (long long)len);
  if (c->seq[b].len)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_prefill: sequence %lld already holds %lld tokens",
                  c->rank, (long long)b, (long long)c->seq[b].len);
  if (!k != !v)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_prefill: give both k and v, or neither", c->rank);
  *nloc = 0;
  if (len > 0) {
    da_layout_t L;
    DA_CHECK(da_kvmap_prefill_layout(&c->map, len, &L));
    *nloc = da_layout_count(&L, c->rank);
    da_layout_free(&L);
  }
  if (k) {
    static const char *const axis[] = {"local rows (da_kvcache_local_rows)"};
    const int64_t outer[1] = {*nloc};
    DA_CHECK(check_rows(c, "k", k, 1, outer, axis, vk));
    DA_CHECK(check_rows(c, "v", v, 1, outer, axis, vv));
  }
  return DA_SUCCESS;
}

static da_status_t prefill_build(da_kvcache_t *c, int64_t b, int64_t len, const kview_t *vk, const kview_t *vv) {
  da_kvseq_t *s = &c->seq[b];
  if (len == 0) return DA_SUCCESS;
  da_layout_t L;
  DA_CHECK(da_kvmap_prefill_layout(&c->map, len, &L));
  for (int r = 0; r < c->P; r++) s->tokens[r] = da_layout_count(&L, r);
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  int ns = da_layout_segments(&L, c->rank, segs);
  da_layout_free(&L);
  int64_t row = 0;
  for (int sg = 0; sg < ns; sg++)
    for (int64_t i0 = 0; i0 < segs[sg].count; i0 += c->page) {
      int64_t n = segs[sg].count - i0 < c->page ? segs[sg].count - i0 : c->page;
      DA_CHECK(page_add(c, s, n, da_span_sub(segs[sg], i0, n)));
      da_kvpage_t *pg = &s->pages[s->npages - 1];
      if (vk)
        for (int64_t i = 0; i < n; i++) {
          DA_CHECK(put_row(c, (char *)pg->k + (size_t)i * c->row_bytes, vk, row + i, 0));
          DA_CHECK(put_row(c, (char *)pg->v + (size_t)i * c->row_bytes, vv, row + i, 0));
        }
      row += n;
    }
  s->rows = row;
  s->len = s->prefill = len;
  return DA_SUCCESS;
}

da_status_t da_kvcache_prefill(da_kvcache_t *c, int64_t b, int64_t len, const da_tensor_t *k, const da_tensor_t *v) {
  da_error_clear();
  DA_ARG_CHECK(NULL, c != NULL, "da_kvcache_prefill: cache is NULL");
  kview_t vk, vv;
  int64_t nloc = 0;
  c->xp.phase = "kv cache prefill";
  da_status_t st = prefill_local(c, b, len, k, v, &vk, &vv, &nloc);
  st = da_xport_agree(&c->xp, st, "kv cache prefill");
  if (st == DA_SUCCESS) {
    static const char *const names[] = {"sequence", "length", "with data"};
    const int64_t f[] = {b, len, k != NULL};
    st = da_agree_fields(&c->xp, f, 3, names, "kv cache prefill");
  }
  if (st == DA_SUCCESS) {
    st = da_xport_agree(&c->xp, prefill_build(c, b, len, k ? &vk : NULL, k ? &vv : NULL), "kv cache prefill");
    if (st != DA_SUCCESS) { /* every rank undoes it: the sequence stays empty everywhere */
      seq_clear(c, &c->seq[b]);
      memset(c->seq[b].tokens, 0, (size_t)c->P * sizeof(int64_t));
    }
  }
  return da_context_finish(c->ctx, st);
}

/* ---- append ------------------------------------------------------------------------------------- */

/* One token at position s->len of sequence b; row t of the caller's tensors (when given). */
static da_status_t append_one(da_kvcache_t *c, int64_t b, const kview_t *vk, const kview_t *vv, int64_t t) {
  da_kvseq_t *s = &c->seq[b];
  const int64_t pos = s->len;
  if ((pos - s->prefill) % c->page == 0) { /* a new append page starts here */
    s->owner = da_kvmap_next_owner(&c->map, s->tokens, pos);
    s->cur = -1;
    if (s->owner == c->rank) {
      DA_CHECK(page_add(c, s, c->page, da_span(pos, 1, 0)));
      s->cur = s->npages - 1;
    }
  }
  if (s->owner == c->rank) {
    da_kvpage_t *pg = &s->pages[s->cur];
    if (vk) {
      DA_CHECK(put_row(c, (char *)pg->k + (size_t)pg->pos.count * c->row_bytes, vk, b, t));
      DA_CHECK(put_row(c, (char *)pg->v + (size_t)pg->pos.count * c->row_bytes, vv, b, t));
    }
    pg->pos.count++;
    s->rows++;
  }
  s->tokens[s->owner]++;
  s->len++;
  return DA_SUCCESS;
}

/* The append proper (the local checks and the rows); the public call wraps it in the count check. */
static da_status_t append_local(da_kvcache_t *c, const int64_t *ntok, const da_tensor_t *k, const da_tensor_t *v) {
  if (c->broken)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: this kv cache had a failed append; "
                                            "free it", c->rank);
  if (!ntok) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_kvcache_append: ntok is NULL");
  if (!k != !v)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_append: give both k and v, "
                                            "or neither", c->rank);
  int64_t T = 0;
  for (int64_t b = 0; b < c->B; b++) {
    if (ntok[b] < 0)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "da_kvcache_append: ntok[%lld] = %lld < 0",
                                              (long long)b, (long long)ntok[b]);
    if (ntok[b] > T) T = ntok[b];
  }
  kview_t vk, vv;
  if (k) {
    const int ndim = k->ndim == 3 ? 1 : 2; /* [B][G][D] means T = 1 */
    static const char *const axis[] = {"batch", "new tokens"};
    const int64_t outer[2] = {c->B, T};
    if (ndim == 1 && T > 1)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "rank %d: da_kvcache_append: k is [B][G][D] "
                                              "but up to %lld tokens are appended (use [B][T][G][D])", c->rank,
                                              (long long)T);
    da_status_t st = check_rows(c, "k", k, ndim, outer, axis, &vk);
    if (st == DA_SUCCESS) st = check_rows(c, "v", v, ndim, outer, axis, &vv);
    if (st != DA_SUCCESS) return st;
  }
  for (int64_t b = 0; b < c->B; b++)
    for (int64_t t = 0; t < ntok[b]; t++) {
      da_status_t st = append_one(c, b, k ? &vk : NULL, k ? &vv : NULL, t);
      if (st != DA_SUCCESS) {
        c->broken = 1; /* other ranks went on: the shard map no longer matches theirs */
        return st;
      }
    }
  return DA_SUCCESS;
}

da_status_t da_kvcache_append(da_kvcache_t *c, const int64_t *ntok, const da_tensor_t *k, const da_tensor_t *v) {
  da_error_clear();
  DA_ARG_CHECK(NULL, c != NULL, "da_kvcache_append: cache is NULL");
  /* The previous append's check first (it ran while the caller decoded): a disagreement there is
   * reported before anything changes here. Then this append, then its own check, started whatever
   * happened here (a refused append is flagged, so the others learn of it at their next call). */
  da_status_t st = da_kvcache_check_finish(c, "da_kvcache_append");
  if (st != DA_SUCCESS) return da_context_finish(c->ctx, st);
  st = append_local(c, ntok, k, v);
  c->nappend++;
  c->cfailed = st != DA_SUCCESS;
  memset(c->clast, 0, sizeof c->clast);
  if (st == DA_SUCCESS) {
    for (int64_t b = 0; b < c->B; b++) {
      c->clast[0] += ntok[b];
      if (b < 4) c->clast[1 + b] = ntok[b];
    }
    c->ctotal += c->clast[0];
    c->chash = da_fnv1a(c->chash, ntok, (size_t)c->B * sizeof *ntok);
  }
  da_status_t cst = check_start(c);
  return da_context_finish(c->ctx, st != DA_SUCCESS ? st : cst);
}

/* ---- queries ------------------------------------------------------------------------------------ */

int64_t da_kvcache_length(const da_kvcache_t *c, int64_t b) {
  return c && b >= 0 && b < c->B ? c->seq[b].len : -1;
}

int64_t da_kvcache_local_rows(const da_kvcache_t *c, int64_t b) {
  return c && b >= 0 && b < c->B ? c->seq[b].rows : -1;
}

da_status_t da_kvcache_local_positions(const da_kvcache_t *c, int64_t b, int64_t *pos, int64_t n) {
  da_error_clear();
  DA_ARG_CHECK(NULL, c != NULL, "da_kvcache_local_positions: cache is NULL");
  da_errbuf_t *e = da_context_errbuf(c->ctx);
  DA_ARG_CHECK(e, b >= 0 && b < c->B, "da_kvcache_local_positions: no sequence %lld (batch %lld)", (long long)b,
               (long long)c->B);
  const da_kvseq_t *s = &c->seq[b];
  DA_ARG_CHECK(e, n >= s->rows && (pos || !s->rows), "da_kvcache_local_positions: room for %lld positions%s, rank %d "
               "holds %lld", (long long)n, pos ? "" : " (pos is NULL)", c->rank, (long long)s->rows);
  int64_t i = 0;
  for (int64_t p = 0; p < s->npages; p++)
    for (int64_t j = 0; j < s->pages[p].pos.count; j++) pos[i++] = da_span_at(s->pages[p].pos, j);
  return da_errbuf_finish(e, DA_SUCCESS);
}

int64_t da_kvcache_num_pages(const da_kvcache_t *c, int64_t b) {
  return c && b >= 0 && b < c->B ? c->seq[b].npages : -1;
}

da_status_t da_kvcache_get_page(da_kvcache_t *c, int64_t b, int64_t i, da_kvcache_page_t *pg) {
  da_error_clear();
  DA_ARG_CHECK(NULL, c != NULL, "da_kvcache_get_page: cache is NULL");
  da_errbuf_t *e = da_context_errbuf(c->ctx);
  DA_ARG_CHECK(e, pg != NULL, "da_kvcache_get_page: page is NULL");
  DA_ARG_CHECK(e, b >= 0 && b < c->B && i >= 0 && i < c->seq[b].npages,
               "da_kvcache_get_page: no page %lld of sequence %lld here (batch %lld, %lld pages)", (long long)i,
               (long long)b, (long long)c->B, (long long)(b >= 0 && b < c->B ? c->seq[b].npages : 0));
  const da_kvpage_t *p = &c->seq[b].pages[i];
  pg->k = (void *)p->k, pg->v = (void *)p->v;
  pg->ldk = p->ldk, pg->ldv = p->ldv;
  pg->start = p->pos.start, pg->stride = p->pos.stride, pg->count = p->pos.count;
  return da_errbuf_finish(e, DA_SUCCESS);
}

size_t da_kvcache_bytes(const da_kvcache_t *c, size_t *rows_bytes) {
  if (!c) return 0;
  if (rows_bytes) {
    int64_t rows = 0;
    for (int64_t b = 0; b < c->B; b++) rows += c->seq[b].rows;
    *rows_bytes = (size_t)rows * 2 * c->row_bytes;
  }
  return c->alloc_bytes;
}
