/* distattn.h: the one public header of distattn, a C runtime for exact softmax attention over
 * long sequences split across the ranks of an MPI job. Opaque handles, status codes, a
 * versioned problem struct. Everything here is plain C11; MPI types appear only in the
 * distributed part, guarded so single-rank users need no MPI headers. */
/* ---- using the library (docs/library.md) -------------------------------------------------
 * Linking: `pkg-config --cflags --libs distattn`, or find_package(distattn) and the target
 * distattn::distattn (distattn::distattn_static for libdistattn.a); libdistattn exports exactly
 * the functions declared here. Python: the `distattn` package in python/ (ctypes over the .so).
 *
 * Errors: every call that can fail returns a da_status_t (DA_SUCCESS = 0) and never exits or
 * aborts; NULL or invalid arguments to any call are refused with DA_ERR_INVALID_ARGUMENT and a
 * message naming the function and the argument (calls without a status: frees accept NULL,
 * counts return -1 or 0, pointers NULL); da_status_string() names the code and da_last_error(ctx) gives the detailed message of
 * the context's last failure (da_last_error(NULL): the calling thread's last failure, e.g. from
 * da_context_create). A handle output (da_context_t **, da_plan_t **, ...) is NULL after a
 * failure; tensor outputs may be partly written.
 *
 * Ownership: handles are created and freed in pairs (da_X_create / da_X_free); every free accepts
 * NULL. A handle keeps a pointer to the one it was made from, so free in reverse order: plans and
 * caches, then their da_comm_t, then the context. Tensors are borrowed only for the duration of a
 * call: the library never keeps a caller pointer (the KV cache copies rows into its own pages;
 * a page returned by da_kvcache_get_page belongs to the cache). Problems and configs are copied.
 *
 * Tensors: da_tensor_t describes the caller's memory (data, dtype, device, shape, strides in
 * elements); the last axis must be contiguous, other strides are free as long as no two elements
 * share an address: transposed views ([B][S][H][D] over [B][H][S][D] storage), slices of a packed
 * QKV buffer, padded rows all work; overlapping, zero or negative strides are refused naming the
 * tensor and the axis (DA_ERR_INVALID_ARGUMENT). Outputs must not overlap inputs. Attention tensors are [B][S][H][D] or
 * [S][H][D]; lse is float32 [B][S][H] whatever the dtype.
 *
 * Threads: a context, and everything made from it, is used by one thread at a time; separate
 * contexts may be used from several threads at once (the process-wide state -- logging, memory
 * counters, the CPU ISA choice -- is thread-safe). Each call runs its kernels on the context's
 * own threads (da_config_t.nthreads; OpenMP) and returns when its outputs are written.
 *
 * Streams: the last argument of the compute calls is a cudaStream_t for a CUDA context (the work
 * is ordered on it); on the CPU pass NULL: the call is synchronous.
 *
 * MPI: the distributed calls need MPI initialized by the caller (any thread level; calls from
 * several threads at once need MPI_THREAD_MULTIPLE and distinct da_comm_t) and must be made by
 * every rank of the communicator in the same order. Handles may be freed after MPI_Finalize
 * (they then release only memory). */
#ifndef DISTATTN_H
#define DISTATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DISTATTN_VERSION_MAJOR 0
#define DISTATTN_VERSION_MINOR 1
#define DISTATTN_VERSION_PATCH 0
#define DISTATTN_VERSION_CODE (DISTATTN_VERSION_MAJOR * 10000 + DISTATTN_VERSION_MINOR * 100 + DISTATTN_VERSION_PATCH)
/* Version of the structs below. Bumped whenever a field is added (at the end). */
#define DA_API_VERSION 3

/* ---- status codes ------------------------------------------------------------------------ */
typedef enum da_status {
  DA_SUCCESS = 0,
  DA_ERR_INVALID_ARGUMENT = 1, /* bad shape, stride, null tensor, H % G != 0, ... */
  DA_ERR_UNSUPPORTED = 2,      /* valid but not implemented by this backend (e.g. D = 512) */
  DA_ERR_OUT_OF_MEMORY = 3,    /* allocation failed or the problem exceeds the memory budget */
  DA_ERR_SYSTEM = 4,           /* an OS call failed (errno in the message) */
  DA_ERR_MPI = 5,              /* an MPI call failed (MPI's error string in the message) */
  DA_ERR_CUDA = 6,             /* a CUDA call failed (CUDA's message) */
  DA_ERR_NCCL = 7,             /* an NCCL call failed (NCCL's message) */
  DA_ERR_TIMEOUT = 8,          /* a peer did not answer within the deadline */
  DA_ERR_MISMATCH = 9,         /* ranks disagree on the problem */
  DA_ERR_IO = 10,              /* a file could not be read/written or is malformed */
  DA_ERR_REMOTE = 11,          /* another rank failed; this rank stopped because of it */
  DA_ERR_INTERNAL = 12,        /* a bug in distattn: please report */
  DA_NUM_STATUS
} da_status_t;

/* A static string for every code ("invalid argument", ...); never NULL. */
const char *da_status_string(da_status_t st);

/* ---- data model ---------------------------------------------------------------------------- */
typedef enum da_dtype { DA_FLOAT32 = 0, DA_BFLOAT16 = 1, DA_FLOAT16 = 2, DA_NUM_DTYPES } da_dtype_t;
typedef enum da_device { DA_DEVICE_CPU = 0, DA_DEVICE_CUDA = 1 } da_device_t;

/* Mask bits, evaluated on global token positions (q_pos, k_pos); combinable with |.
 *   causal : k_pos <= q_pos
 *   window : 0 <= q_pos - k_pos < window           (implies causal)
 *   doc    : q and k lie in the same document, documents given by cu_seqlens */
enum {
  DA_MASK_NONE = 0,
  DA_MASK_CAUSAL = 1u << 0,
  DA_MASK_WINDOW = 1u << 1,
  DA_MASK_DOC = 1u << 2,
};

/* A strided tensor view (DLPack-shaped). Strides are in elements; the last dimension must be
 * contiguous (stride 1). Attention tensors are [S][H][D] (ndim 3) or [B][S][H][D] (ndim 4). */
typedef struct da_tensor {
  void *data;
  da_dtype_t dtype;
  da_device_t device;
  int device_id;
  int ndim;
  int64_t shape[4];
  int64_t strides[4];
} da_tensor_t;

/* Fill a contiguous (row-major) CPU descriptor: da_tensor_make(&t, ptr, DA_BFLOAT16, 3,
 * (int64_t[]){S, H, D}) sets strides {H*D, D, 1}. For a view, set t.strides (elements) afterwards;
 * for device memory, set t.device and t.device_id. DA_ERR_INVALID_ARGUMENT for a NULL t, ndim
 * outside 0..4, a NULL shape (ndim > 0), a negative extent or an element count past int64 (*t is
 * then zeroed when t is not NULL). Returned a void before API version 2.1; ignoring it is fine. */
da_status_t da_tensor_make(da_tensor_t *t, void *data, da_dtype_t dtype, int ndim, const int64_t *shape);

/* The attention problem. Always start from DA_PROBLEM_INITIALIZER and set what you need; the
 * leading size/version let later releases add fields without breaking callers. */
typedef struct da_problem {
  size_t size;           /* sizeof(da_problem_t), set by the initializer */
  unsigned version;      /* DA_API_VERSION, set by the initializer */
  int64_t batch;         /* B >= 1 */
  int64_t seq;           /* S: total (global) sequence length, any positive integer */
  int64_t heads;         /* H: query heads */
  int64_t kv_heads;      /* G: KV heads, H % G == 0 (G == H: MHA, G == 1: MQA); 0 means H */
  int64_t dim;           /* D: head dim (CPU: 16..256, multiple of 8 when not 64/128 paths) */
  unsigned mask;         /* DA_MASK_* bits */
  int64_t window;        /* W for DA_MASK_WINDOW */
  int64_t ndocs;         /* for DA_MASK_DOC: number of documents ... */
  const int64_t *cu_seqlens; /* ... and their cumulative lengths [ndocs+1], 0 .. S */
  da_dtype_t dtype;      /* storage dtype of q, k, v, out, dout */
  float scale;           /* softmax scale; 0 means 1/sqrt(D) */
  int block_q, block_k;  /* kernel tile sizes; 0 = backend default */
} da_problem_t;

#define DA_PROBLEM_INITIALIZER                                                                   \
  { sizeof(da_problem_t), DA_API_VERSION, 1, 0, 0, 0, 0, DA_MASK_NONE, 0, 0, NULL, DA_FLOAT32, \
    0.0f, 0, 0 }

/* ---- context --------------------------------------------------------------------------------- */
/* A context holds the backend choice, thread count and the last detailed error. It is not
 * thread-safe: use one per thread that calls distattn. */
typedef struct da_context da_context_t;

typedef struct da_config {
  size_t size;
  unsigned version;
  da_device_t device; /* backend: CPU (default) or CUDA */
  int nthreads;       /* CPU kernel threads, 0..1024; 0 = the cores this process is bound to
                         (or DISTATTN_NTHREADS) */
} da_config_t;

#define DA_CONFIG_INITIALIZER { sizeof(da_config_t), DA_API_VERSION, DA_DEVICE_CPU, 0 }

/* cfg NULL = DA_CONFIG_INITIALIZER. *ctx is NULL on failure (message: da_last_error(NULL));
 * DA_ERR_UNSUPPORTED for a backend that is not built in. Every DISTATTN_* environment variable
 * the library reads is checked here (docs/reliability.md lists them): a malformed or out-of-range
 * value is DA_ERR_INVALID_ARGUMENT naming the variable, never a silent default. */
da_status_t da_context_create(const da_config_t *cfg, da_context_t **ctx);
/* After every handle made from ctx is freed. NULL is a no-op. */
void da_context_free(da_context_t *ctx);
/* The detailed message of the last failure on ctx ("q: shape[2] = 7 but heads = 8"), or of the
 * calling thread's last failure when ctx is NULL. Empty string when none. */
const char *da_last_error(const da_context_t *ctx);

/* ---- single-rank attention ------------------------------------------------------------------- */
/* Forward. q is [B][S][H][D], k and v are [B][S][G][D], out is [B][S][H][D] (all prob->dtype,
 * any row/head/batch strides), lse is [B][S][H] float32 (may be NULL). Query and key i sit at
 * global position i. Rows whose mask allows no key get out = 0 and lse = -inf.
 * stream: a cudaStream_t for the CUDA backend, ignored (pass NULL) on the CPU. */
da_status_t da_attention_fwd(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                             const da_tensor_t *k, const da_tensor_t *v, da_tensor_t *out,
                             da_tensor_t *lse, void *stream);

/* Backward. Inputs as for the forward plus out, dout ([B][S][H][D]) and the forward's lse
 * (float32, required). Writes dq [B][S][H][D], dk and dv [B][S][G][D] in prob->dtype
 * (overwritten, not accumulated); fp32 accumulation inside. */
da_status_t da_attention_bwd(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                             const da_tensor_t *k, const da_tensor_t *v, const da_tensor_t *out,
                             const da_tensor_t *dout, const da_tensor_t *lse, da_tensor_t *dq,
                             da_tensor_t *dk, da_tensor_t *dv, void *stream);

/* Decode: q is [B][T][H][D], T new query tokens at global positions prob->seq - T .. seq - 1;
 * the KV cache k, v is [B][S][G][D] (S = prob->seq, the new tokens' k/v included). Split-KV over
 * threads. out [B][T][H][D], lse [B][T][H] float32 (may be NULL). */
da_status_t da_attention_decode(da_context_t *ctx, const da_problem_t *prob, const da_tensor_t *q,
                                const da_tensor_t *k, const da_tensor_t *v, da_tensor_t *out,
                                da_tensor_t *lse, void *stream);

/* The library's version string, e.g. "0.1.0 (git abc1234)". */
const char *da_version_string(void);

/* ==== distributed attention over MPI ==================================================
 * This section is declared only when <mpi.h> was included BEFORE this header (it tests
 * MPI_VERSION, which every MPI defines in mpi.h), so single-rank users need no MPI headers:
 *     #include <mpi.h>
 *     #include <distattn.h>
 * Every call below is collective over the communicator unless it says otherwise: all ranks call
 * it, in the same order, with the same problem. A failure on any rank is returned on every rank
 * (the failing rank's own status; DA_ERR_REMOTE naming it elsewhere), never a hang: blocking
 * waits give up after the plan's timeout with DA_ERR_TIMEOUT naming the peer and the step.
 * Detailed messages: da_last_error(ctx). */
#ifdef MPI_VERSION

/* A communicator: the context (backend, threads) plus a private duplicate of the caller's
 * MPI_Comm, so distattn's messages never mix with the caller's. The duplicate is made with
 * MPI_Comm_idup bounded by DISTATTN_TIMEOUT (or 300 s): a rank that never calls it gives the
 * others DA_ERR_TIMEOUT (which ranks is not named: finding out would mean sending on the
 * caller's communicator). */
typedef struct da_comm da_comm_t;
da_status_t da_comm_create(da_context_t *ctx, MPI_Comm comm, da_comm_t **out); /* collective */

/* (API version 3) da_comm_create with a config: its timeout bounds the duplicate and the
 * communicator's own setup collectives instead of DISTATTN_TIMEOUT (plans, caches and decode plans
 * made from it keep their own config's timeout). cfg NULL = DA_COMM_CONFIG_INITIALIZER. */
typedef struct da_comm_config {
  size_t size;      /* sizeof(da_comm_config_t), set by the initializer */
  unsigned version; /* DA_API_VERSION */
  double timeout;   /* seconds a rank waits for the others; 0 = DISTATTN_TIMEOUT or 300 */
} da_comm_config_t;
#define DA_COMM_CONFIG_INITIALIZER { sizeof(da_comm_config_t), DA_API_VERSION, 0.0 }
da_status_t da_comm_create_config(da_context_t *ctx, MPI_Comm comm, const da_comm_config_t *cfg,
                                  da_comm_t **out); /* collective */
void da_comm_free(da_comm_t *comm);                                            /* collective */
int da_comm_rank(const da_comm_t *comm); /* local */
int da_comm_size(const da_comm_t *comm); /* local */

/* The distributed algorithms: which global positions a rank owns and how the work meets (all are
 * exact; ring, striped and zigzag pass KV blocks around a ring and differ in load balance under
 * causal masks; ulysses exchanges heads for tokens by all-to-all; hybrid does Ulysses inside
 * groups of ranks and the ring across them). */
typedef enum da_algo {
  DA_ALGO_RING = 0,    /* contiguous shards (Ring Attention) */
  DA_ALGO_STRIPED = 1, /* token i on rank i mod P (Striped Attention) */
  DA_ALGO_ZIGZAG = 2,  /* 2P chunks, rank r owns chunks r and 2P-1-r */
  DA_ALGO_ULYSSES = 3, /* contiguous shards; an all-to-all gives each rank the whole sequence for
                          H/P heads (DeepSpeed-Ulysses): needs H % P == 0 and G % P == 0 or
                          P % G == 0, refused at plan time otherwise */
  DA_ALGO_HYBRID = 4,  /* (API version 3) Ulysses inside groups of U = da_plan_config_t.ulysses
                          consecutive ranks (a node's GPUs), a ring across the P/U groups on
                          da_plan_config_t.ring_layout: needs U >= 1 dividing P, H % U == 0 and
                          G % U == 0 or U % G == 0, refused at plan time otherwise (docs/ulysses.md) */
} da_algo_t;

typedef struct da_plan_config {
  size_t size;           /* sizeof(da_plan_config_t), set by the initializer */
  unsigned version;      /* DA_API_VERSION */
  da_algo_t algo;
  int64_t block;         /* KV sub-block in tokens: the unit of work between two progress calls
                            on the transfers; 0 = automatic (a quarter of the largest shard, at
                            least 1024, docs/ring.md) */
  const char *transport; /* "mpi" or "self" (one rank); NULL = DISTATTN_TRANSPORT or "mpi" */
  double timeout;        /* seconds a rank waits for a peer; 0 = DISTATTN_TIMEOUT or 300 */
  /* API version 2: the memory check. da_plan_create adds up, per rank, the bytes the plan will
   * allocate (the forward's ring buffers and per-call scratch) plus what mem_count asks for, and
   * refuses with DA_ERR_OUT_OF_MEMORY, before allocating any of it, when the sum exceeds the
   * budget; the message names both. */
  int64_t mem_budget;    /* bytes per rank; 0 = DISTATTN_MEM_BUDGET (a size: 512M, 8G; "off" or -1 =
                            no check), else MemAvailable / processes of the job on this machine;
                            < 0 = no check */
  unsigned mem_count;    /* DA_MEM_* bits: what else to count against the budget (0 = plan only) */
  /* API version 3: the hybrid (DA_ALGO_HYBRID; a non-zero ulysses with another algo is refused). */
  int ulysses;           /* the Ulysses degree U: ranks per group (consecutive ranks) */
  da_algo_t ring_layout; /* the ring's layout across the P/U groups: DA_ALGO_RING (contiguous),
                            DA_ALGO_STRIPED or DA_ALGO_ZIGZAG (the initializer's) */
} da_plan_config_t;

enum {
  DA_MEM_BACKWARD = 1u << 0, /* the backward's buffers too (allocated by the first da_plan_bwd) */
  DA_MEM_TENSORS = 1u << 1,  /* the caller's tensors of this rank's rows: q, k, v, out, lse, and with
                                DA_MEM_BACKWARD dout, dq, dk, dv (what a caller holds to run the plan) */
};

#define DA_PLAN_CONFIG_INITIALIZER \
  { sizeof(da_plan_config_t), DA_API_VERSION, DA_ALGO_RING, 0, NULL, 0.0, 0, 0, 0, DA_ALGO_ZIGZAG }

/* A plan: the problem validated and agreed on by every rank, the layout, the block schedule and
 * the buffers. Ranks that pass different problems (or configs) all get DA_ERR_MISMATCH; a problem
 * over a rank's memory budget gets DA_ERR_OUT_OF_MEMORY there (DA_ERR_REMOTE elsewhere). A rank
 * that never calls it makes the others return DA_ERR_TIMEOUT after cfg->timeout plus a roll call
 * of at most min(timeout, 5 s) that names the missing ranks; free the da_comm_t after that. */
typedef struct da_plan da_plan_t;
da_status_t da_plan_create(da_comm_t *comm, const da_problem_t *prob, const da_plan_config_t *cfg,
                           da_plan_t **out); /* collective */
void da_plan_free(da_plan_t *plan);          /* collective (frees the plan's communicator) */

/* This rank's share of the sequence (local): its number of rows n_local, and their global
 * positions in local row order (pos has room for n_local values). */
int64_t da_plan_local_rows(const da_plan_t *plan);
da_status_t da_plan_local_positions(const da_plan_t *plan, int64_t *pos, int64_t n);

/* Forward over this rank's LOCAL rows: q and out are [B][n_local][H][D], k and v are
 * [B][n_local][G][D] (prob->dtype; ndim 3 [n_local][..][D] when B == 1; any row/head/batch
 * stride, last axis contiguous), lse is [B][n_local][H] float32 (may be NULL; the backward needs
 * it). Local row i sits at global position da_plan_local_positions()[i]. No rank ever holds more
 * than its own shard plus two travelling KV blocks. stream: cudaStream_t for CUDA, else NULL. */
da_status_t da_plan_fwd(da_plan_t *plan, const da_tensor_t *q, const da_tensor_t *k, const da_tensor_t *v,
                        da_tensor_t *out, da_tensor_t *lse, void *stream); /* collective */

/* Backward over the local rows: inputs as for the forward plus out and dout [B][n_local][H][D]
 * and the forward's lse (required). Writes (overwrites) dq [B][n_local][H][D] and dk, dv
 * [B][n_local][G][D] for this rank's own keys; fp32 accumulation across every ring step. */
da_status_t da_plan_bwd(da_plan_t *plan, const da_tensor_t *q, const da_tensor_t *k, const da_tensor_t *v,
                        const da_tensor_t *out, const da_tensor_t *dout, const da_tensor_t *lse,
                        da_tensor_t *dq, da_tensor_t *dk, da_tensor_t *dv, void *stream); /* collective */

/* Benchmark modes (for overlap measurement): COMPUTE_ONLY runs the kernels of every step on the
 * local KV block without transfers, COMM_ONLY moves the blocks without computing. Both produce
 * wrong results on purpose; RUN is the default. Local. */
typedef enum da_plan_mode { DA_PLAN_RUN = 0, DA_PLAN_COMPUTE_ONLY = 1, DA_PLAN_COMM_ONLY = 2 } da_plan_mode_t;
da_status_t da_plan_set_mode(da_plan_t *plan, da_plan_mode_t mode);

/* Figures of this rank (local). Times and bytes are of the most recent da_plan_fwd / da_plan_bwd;
 * the step arrays (nsteps entries each) belong to the plan and stay valid until its next call. */
typedef struct da_plan_stats {
  size_t size;
  unsigned version;
  int rank, nranks, nsteps;
  int64_t local_rows;
  int64_t pairs_total;      /* allowed (q, k) pairs of the whole problem, all batches */
  int64_t pairs_rank;       /* those this rank computes */
  double fwd_s, bwd_s;               /* wall time of the last call */
  double fwd_compute_s, bwd_compute_s; /* in kernels */
  double fwd_exposed_s, bwd_exposed_s; /* blocked waiting for transfers after compute */
  uint64_t fwd_bytes_sent, bwd_bytes_sent;
  size_t mem_fwd_bytes, mem_bwd_bytes; /* buffers the plan holds on this rank once it has run a
                                          forward / a backward (allocated at the first call, kept
                                          until da_plan_free; the backward's include the forward's) */
  size_t peak_bytes;                   /* high-water of distattn's allocations in this process */
  const double *fwd_step_compute_s, *fwd_step_wait_s, *bwd_step_compute_s, *bwd_step_wait_s;
  const uint64_t *fwd_step_bytes, *bwd_step_bytes;
  /* From the plan, valid before any call: bytes this rank sends per forward / backward, and the
   * schedule's work imbalance (max over ranks of allowed pairs computed ÷ mean; 1 = balanced). */
  uint64_t plan_fwd_bytes, plan_bwd_bytes;
  double work_imbalance;
  int64_t block; /* the KV sub-block in use (tokens): the configured one or the automatic choice */
} da_plan_stats_t;

#define DA_PLAN_STATS_INITIALIZER { .size = sizeof(da_plan_stats_t), .version = DA_API_VERSION }

da_status_t da_plan_stats(const da_plan_t *plan, da_plan_stats_t *stats);

/* ==== decode over a distributed paged KV cache (tree | ring) ===========================
 * The KV cache of B sequences is spread over the ranks in pages of `page` tokens (rows
 * [page][G][D] in prob->dtype). A sequence starts from a prefill laid out like da_plan_fwd's
 * local rows (contiguous, striped or zigzag; or weighted) and grows by appended tokens, page by
 * page, each page to the rank that keeps the shards balanced: equal weights never let two ranks'
 * shards differ by more than one page; weights keep every rank within a page of its share. A
 * decode step runs the split-KV kernel on every rank's shard and combines the (o, lse) partials:
 * tree = one fused MPI reduction whose operator is the merge (flat, or within nodes then across
 * node leaders); ring = the query and the running partials travel around the ring in P-1
 * dependent steps (the baseline). See docs/decode.md. */
typedef struct da_kvcache da_kvcache_t;

typedef struct da_kvcache_config {
  size_t size;            /* sizeof(da_kvcache_config_t), set by the initializer */
  unsigned version;       /* DA_API_VERSION */
  int64_t page;           /* tokens per page; 0 = 256 */
  da_algo_t layout;       /* prefill layout: DA_ALGO_RING (contiguous), STRIPED or ZIGZAG */
  const double *weights;  /* [P] capacity weights (copied), NULL = equal; when set, the prefill is one
                             run per rank proportional to its weight and appended pages follow them */
  double timeout;         /* seconds a rank waits for a peer; 0 = DISTATTN_TIMEOUT or 300 */
  /* Where the pages live: NULL = DISTATTN_TRANSPORT, else host memory. A device transport
   * ("cuda-ipc", "nccl"; "host-ipc" = the host seam of tests) puts them in that transport's device
   * memory (CUDA: cudaMalloc; the pointers of da_kvcache_get_page are then device pointers, and k, v
   * passed to prefill / append stay host tensors, copied in). Give the decode plan the same one. */
  const char *transport;
} da_kvcache_config_t;

#define DA_KVCACHE_CONFIG_INITIALIZER { sizeof(da_kvcache_config_t), DA_API_VERSION, 0, DA_ALGO_RING, NULL, 0.0, NULL }

/* An empty cache for prob->batch sequences of prob->kv_heads x prob->dim rows in prob->dtype
 * (heads, seq and mask are not used). Ranks passing different shapes all get DA_ERR_MISMATCH. */
da_status_t da_kvcache_create(da_comm_t *comm, const da_problem_t *prob, const da_kvcache_config_t *cfg,
                              da_kvcache_t **out); /* collective */
void da_kvcache_free(da_kvcache_t *cache);        /* collective */

/* Fill the empty sequence b with len tokens (positions 0 .. len-1) laid out by cfg->layout (or the
 * weights). k and v hold this rank's rows [n_local][G][D] (ndim 3, any row stride, G and D packed)
 * in local order (da_kvcache_local_positions): what da_plan_fwd with the same algo and seq = len
 * holds. k = v = NULL: the pages are only allocated; write them through da_kvcache_get_page.
 * Collective: every rank passes the same b and len. */
da_status_t da_kvcache_prefill(da_kvcache_t *cache, int64_t b, int64_t len, const da_tensor_t *k,
                               const da_tensor_t *v);

/* Append ntok[b] >= 0 tokens to every sequence b, at positions len_b .. len_b + ntok[b] - 1. k and v
 * are [B][T][G][D] (or [B][G][D] when T = 1), T >= max ntok, row t of sequence b = token len_b + t,
 * and hold the same values on every rank (the step's new tokens); each rank copies only the rows
 * its pages own. k = v = NULL: allocate only. Collective: every rank must pass the same ntok. The
 * counts are checked without a wait on the decode path: the append starts a nonblocking allreduce
 * of them that the next append or da_decode_step completes (within the cache's timeout); ranks that
 * passed different counts (or where the append was refused) get DA_ERR_MISMATCH there, on every
 * rank, naming the ranks and their counts, and the cache is refused from then on (free it). */
da_status_t da_kvcache_append(da_kvcache_t *cache, const int64_t *ntok, const da_tensor_t *k,
                              const da_tensor_t *v);

/* Local queries: the length of sequence b, the rows of it this rank holds, and their global
 * positions in local order (pos has room for n >= da_kvcache_local_rows values). */
int64_t da_kvcache_length(const da_kvcache_t *cache, int64_t b);
int64_t da_kvcache_local_rows(const da_kvcache_t *cache, int64_t b);
da_status_t da_kvcache_local_positions(const da_kvcache_t *cache, int64_t b, int64_t *pos, int64_t n);

/* Direct access to this rank's pages of sequence b (local), e.g. to fill a prefill in place. */
typedef struct da_kvcache_page {
  void *k, *v;                  /* rows [count][G][D] in the cache dtype, row strides ldk, ldv (elements) */
  int64_t ldk, ldv;
  int64_t start, stride, count; /* their global positions: start + i * stride, i < count */
} da_kvcache_page_t;
int64_t da_kvcache_num_pages(const da_kvcache_t *cache, int64_t b);
da_status_t da_kvcache_get_page(da_kvcache_t *cache, int64_t b, int64_t i, da_kvcache_page_t *page);

/* This rank's page memory in bytes (allocated capacity); *rows_bytes (may be NULL) receives the
 * bytes of the rows it actually holds (its shard: rows * 2 * G * D * element size). Local. */
size_t da_kvcache_bytes(const da_kvcache_t *cache, size_t *rows_bytes);

typedef enum da_decode_algo {
  DA_DECODE_TREE = 0, /* one fused reduction (MPI_Allreduce / MPI_Reduce with the merge as MPI_Op) */
  DA_DECODE_RING = 1, /* baseline: the query and the running partials go around the ring, P-1
                         dependent steps, each decoding one shard */
} da_decode_algo_t;

typedef enum da_decode_topo {
  DA_TOPO_FLAT = 0,      /* one reduction over all ranks */
  DA_TOPO_TWO_LEVEL = 1, /* reduce within each node, then across node leaders, then broadcast */
} da_decode_topo_t;

typedef struct da_decode_config {
  size_t size;           /* sizeof(da_decode_config_t), set by the initializer */
  unsigned version;      /* DA_API_VERSION */
  da_decode_algo_t algo;
  da_decode_topo_t topo; /* tree only */
  int root;              /* -1: every rank gets the output (tree: allreduce; ring: ends on rank P-1,
                            which broadcasts it); r >= 0: only rank r (tree: reduce; ring: ends there) */
  int node_size;         /* two-level: ranks per node group; 0 = ranks that share memory
                            (MPI_Comm_split_type); a smaller value emulates several nodes */
  const char *transport; /* "mpi" or "self" (one rank); NULL = DISTATTN_TRANSPORT or "mpi". A device
                            transport (cuda-ipc, nccl; host-ipc = the tests' host seam) runs the
                            device tree: the cache's pages in device memory (the cache must name the
                            same transport), partials on the device, the merge as two device
                            allreduces (max of lse, then sum of the rescaled o and l); flat tree only */
  double timeout;        /* seconds a rank waits for a peer; 0 = DISTATTN_TIMEOUT or 300 */
} da_decode_config_t;

#define DA_DECODE_CONFIG_INITIALIZER \
  { sizeof(da_decode_config_t), DA_API_VERSION, DA_DECODE_TREE, DA_TOPO_FLAT, -1, 0, NULL, 0.0 }

/* A decode plan: the problem (batch, heads, kv_heads, dim, dtype, scale) agreed on by every rank,
 * the reduction's MPI datatype, operator and communicators (two-level), and the buffers. */
typedef struct da_decode_plan da_decode_plan_t;
da_status_t da_decode_plan_create(da_comm_t *comm, const da_problem_t *prob, const da_decode_config_t *cfg,
                                  da_decode_plan_t **out); /* collective */
void da_decode_plan_free(da_decode_plan_t *plan);          /* collective */

/* One decode step: q is [B][T][H][D] (or [B][H][D] when T = 1), the same on every rank: the T
 * newest tokens of every sequence, at positions len_b - T .. len_b - 1 of the cache (their k/v
 * already appended), causal among themselves. Writes out (like q, prob->dtype) and lse ([B][T][H]
 * or [B][H] float32, may be NULL) on every rank, or only on the root when cfg->root >= 0. Partials
 * and their merge are fp32 whatever P. Collective. */
da_status_t da_decode_step(da_decode_plan_t *plan, da_kvcache_t *cache, const da_tensor_t *q, da_tensor_t *out,
                           da_tensor_t *lse, void *stream);

/* Figures of this rank's most recent da_decode_step (local). */
typedef struct da_decode_stats {
  size_t size;
  unsigned version;
  int rank, nranks;
  int levels, nodes;     /* reduction levels (1 flat, 2 two-level) and node groups */
  double step_s;         /* wall time of the step */
  double compute_s;      /* in the decode kernel */
  double reduce_s;       /* combining partials: the tree reduction or the ring steps */
  uint64_t bytes_sent;   /* by this rank: exact for the ring; for the tree, what a binomial-tree
                            reduce (+ broadcast) sends, since MPI picks its own algorithm */
  uint64_t kv_bytes;     /* KV bytes the kernel read on this rank */
  size_t partial_bytes;  /* one rank's partials: B * T * H * (D + 1) * 4 */
  size_t peak_bytes;     /* high-water of distattn's allocations in this process */
} da_decode_stats_t;

#define DA_DECODE_STATS_INITIALIZER { .size = sizeof(da_decode_stats_t), .version = DA_API_VERSION }

da_status_t da_decode_plan_stats(const da_decode_plan_t *plan, da_decode_stats_t *stats);

/* ==== attention offload to memory ranks (Lamina) =======================================
 * Every rank of the communicator is a COMPUTE or a MEMORY rank (its own choice, e.g. from its
 * command line: an MPMD mpirun or a Slurm heterogeneous job gives all ranks one communicator).
 * Each compute rank c = 0..nc-1 (in rank order) is paired with the memory ranks m (in rank order)
 * with floor(m * nc / nm) == c (groups differ by at most one rank; nm >= nc >= 1). The memory
 * ranks of a group hold the KV cache of their compute rank's B sequences, for every layer, sharded
 * in proportion to their memory budgets (the weighted shard map of da_kvcache_config_t), and run
 * the memory-bound decode attention for it. Per request (one layer of a micro-batch of sequences)
 * the compute rank broadcasts q and the new token's k, v to its group; the memory ranks append
 * the token, decode their shards and tree-reduce the fp32 (o, lse) partials back to it with the
 * merge as the reduction operator. Up to `microbatches` requests may be in flight, so the compute
 * rank's other work overlaps the offloaded attention. CPU contexts only. See docs/offload.md.
 *
 * Errors, as everywhere in this section, reach every rank that takes part: a rank without a
 * role, no compute rank, fewer memory than compute ranks (DA_ERR_INVALID_ARGUMENT), ranks that
 * disagree on the problem or config (DA_ERR_MISMATCH naming the field), a cache over a memory
 * rank's budget (DA_ERR_OUT_OF_MEMORY, da_offload_check_fit). A memory rank that fails (append
 * out of memory, a malformed request) keeps its own status and answers this and every later
 * request with poisoned partials: its compute rank gets DA_ERR_REMOTE, never wrong numbers. A
 * rank that stops answering: every wait of the request protocol (the broadcast, the reduction,
 * a memory rank's wait for the next request, stop and cancel) gives up after cfg.timeout with
 * DA_ERR_TIMEOUT; the message names the rank, the request and layer, the seconds waited, and the
 * group members that did not answer a short roll call of the group (min(timeout, 1 s)) -- the
 * stopped, killed or hung ones. The offload is then broken: free it (its buffers MPI may still
 * write into are never handed back). Not bounded (as for every create): the setup collectives
 * of da_offload_create. */
typedef enum da_role { DA_ROLE_NONE = -1, DA_ROLE_COMPUTE = 0, DA_ROLE_MEMORY = 1 } da_role_t;

typedef struct da_offload_config {
  size_t size;        /* sizeof(da_offload_config_t), set by the initializer */
  unsigned version;   /* DA_API_VERSION */
  int64_t page;       /* tokens per KV page; 0 = 256 */
  int layers;         /* KV caches per sequence (one per model layer); >= 1 */
  int microbatches;   /* requests a compute rank may have in flight (1 .. batch); the batch is cut
                         into micro-batches of at most ceil(batch / microbatches) sequences */
  double mem_budget;  /* bytes of KV cache this rank may hold; 0 = discovered (sysinfo: free +
                         buffer memory, shared by the ranks of the node); memory ranks get shards
                         in proportion to it */
  double timeout;     /* seconds a rank waits for a peer; 0 = DISTATTN_TIMEOUT or 300 */
} da_offload_config_t;

#define DA_OFFLOAD_CONFIG_INITIALIZER { sizeof(da_offload_config_t), DA_API_VERSION, 0, 1, 1, 0.0, 0.0 }

typedef struct da_offload da_offload_t;

/* Split comm's ranks by role into groups (above) and create each group's distributed KV cache on
 * its memory ranks. prob: batch = sequences PER COMPUTE RANK, heads, kv_heads, dim, dtype, scale
 * (the same on every rank; seq and mask are not used: decode is causal over the cache). Every
 * rank also publishes its cfg->mem_budget. Collective over comm. */
da_status_t da_offload_create(da_comm_t *comm, da_role_t role, const da_problem_t *prob,
                              const da_offload_config_t *cfg, da_offload_t **out);
/* Collective over comm (a compute rank calls da_offload_stop or da_offload_cancel first, its
 * memory ranks return from da_offload_serve). NULL is a no-op. */
void da_offload_free(da_offload_t *off);

typedef struct da_offload_info {
  size_t size;                 /* filled by da_offload_get_info */
  unsigned version;
  da_role_t role;
  int group, ngroups;          /* this rank's group = index of its compute rank */
  int ncompute, nmemory;       /* in the job */
  int group_memory;            /* memory ranks in this group */
  int index;                   /* memory ranks: index within the group's memory ranks; compute: -1 */
  int compute_world_rank;      /* the rank (in comm) of this group's compute rank */
  double budget;               /* this rank's memory budget in bytes */
  double share;                /* memory ranks: budget / sum of the group's budgets */
  int discovered;              /* the budget came from sysinfo, not the config */
} da_offload_info_t;
da_status_t da_offload_get_info(const da_offload_t *off, da_offload_info_t *info); /* local */

/* Memory ranks: the group's cache (batch = layers * B; cache sequence l * B + b holds layer l of
 * the compute rank's sequence b), to fill before serving: da_kvcache_prefill (collective over the
 * group's memory ranks: every one calls it for the same sequences) and da_kvcache_get_page, or
 * prefill rows. NULL on compute ranks. The offload owns it. */
da_kvcache_t *da_offload_cache(da_offload_t *off);

/* Will the cache fit? final_len[B] (the same on every rank) = the longest each sequence will
 * get. Every memory rank's projected shard (its share of layers * sum(final_len) rows, plus a
 * page per cache sequence) must fit its budget: otherwise DA_ERR_OUT_OF_MEMORY on every rank,
 * naming the rank, the MiB and the budget. *max_shard (may be NULL) = the largest projection in
 * bytes. Collective over comm; bounded by the timeout. */
da_status_t da_offload_check_fit(da_offload_t *off, const int64_t *final_len, double *max_shard);

/* KV bytes of prob->batch sequences of final_len tokens over `layers` layers: what one rank
 * would hold without offload. Local; no handle needed. -1 (da_last_error(NULL) says why) for a
 * NULL problem or final_len, or layers < 1. */
double da_offload_kv_bytes(const da_problem_t *prob, int layers, const int64_t *final_len);

/* ---- compute ranks (local calls: only the group's memory ranks take part) ----
 * Start the attention of layer `layer` for the n sequences first .. first + n - 1: q is
 * [n][H][D], k and v are [n][G][D] (prob->dtype, ndim 3, any row stride, the last two axes
 * packed): the new token of each sequence, appended at position len before the decode (so the
 * query attends to the whole cache, itself included). 1 <= n <= ceil(B / microbatches). The rows
 * are copied: the tensors may be reused on return. *slot (< microbatches) is what to wait on;
 * DA_ERR_INVALID_ARGUMENT when every slot is in flight. */
da_status_t da_offload_start(da_offload_t *off, int layer, int64_t first, const da_tensor_t *q,
                             const da_tensor_t *k, const da_tensor_t *v, int *slot);
/* Drive the progress of the requests in flight (call it between chunks of other work: no helper
 * thread moves the messages). */
void da_offload_progress(da_offload_t *off);
/* Wait for a slot: out [n][H][D] (prob->dtype, ndim 3, last two axes packed) and lse [n][H]
 * (float32, ndim 2, may be NULL). A memory rank that failed: DA_ERR_REMOTE; one that does not
 * answer: DA_ERR_TIMEOUT (above). */
da_status_t da_offload_wait(da_offload_t *off, int slot, da_tensor_t *out, da_tensor_t *lse);
/* One layer of the whole batch: q [B][H][D], k, v [B][G][D] -> out [B][H][D], lse [B][H] (may be
 * NULL): every micro-batch started, then all waited (nothing may be in flight before). */
da_status_t da_offload_step(da_offload_t *off, int layer, const da_tensor_t *q, const da_tensor_t *k,
                            const da_tensor_t *v, da_tensor_t *out, da_tensor_t *lse);
/* Tell the group's memory ranks to leave da_offload_serve with DA_SUCCESS (nothing may be in
 * flight). */
da_status_t da_offload_stop(da_offload_t *off);
/* End the group's offload because of a failure elsewhere (e.g. another part of the job gave up):
 * waits for the requests in flight (results dropped), then the memory ranks leave
 * da_offload_serve with DA_ERR_REMOTE, their message naming this rank and `reason` (may be NULL;
 * truncated to what one request message holds). Returns DA_SUCCESS when the group got it. */
da_status_t da_offload_cancel(da_offload_t *off, const char *reason);

/* ---- memory ranks ----
 * Serve the group's compute rank until it stops (DA_SUCCESS) or cancels (DA_ERR_REMOTE): receive,
 * append, decode, reduce. A local failure is kept and returned at the end (the compute rank got
 * poisoned partials meanwhile); DA_ERR_TIMEOUT when no request comes within the timeout. */
da_status_t da_offload_serve(da_offload_t *off);

/* Figures (local). Compute ranks: of the last da_offload_wait; memory ranks: totals over serve.
 * Times on the compute rank's clock (memory clocks are offset by a ping-pong at create). */
typedef struct da_offload_stats {
  size_t size;        /* filled by da_offload_get_stats */
  unsigned version;
  double send_s;      /* compute: post of the broadcast until the last memory rank holds it */
  double attn_s;      /* compute: from then until the slowest memory rank's partials are ready
                         (append + decode on that rank, plus its wait for the message) */
  double reduce_s;    /* compute: from then until the merged partials are on the compute rank */
  double recv_s;      /* compute: unpacking the merged partials into out and lse */
  double total_s;     /* compute: post .. wait returned */
  uint64_t net_bytes; /* bytes on the network for the request: broadcast (group_memory copies of
                         the message) + the binomial reduction (group_memory partial messages) */
  uint64_t kv_bytes;  /* KV bytes the memory ranks' kernels read for it (summed over the group) */
  uint64_t requests;  /* requests started (compute) or served (memory) so far */
  double kernel_s;    /* memory: time in append + decode, summed */
} da_offload_stats_t;
da_status_t da_offload_get_stats(const da_offload_t *off, da_offload_stats_t *st); /* local */

#endif /* MPI_VERSION */

#ifdef __cplusplus
}
#endif
#endif /* DISTATTN_H */
