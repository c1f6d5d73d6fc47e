/* distattn.h: the one public header of distattn, a C runtime for exact softmax attention over
 * long sequences split across the ranks of an MPI job. Opaque handles, status codes, a
 * versioned problem struct. Everything here is plain C11; MPI types appear only in the
 * distributed part, guarded so single-rank users need no MPI headers. */
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
#define DA_API_VERSION 1

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

/* Fill a contiguous descriptor: da_tensor_make(&t, ptr, DA_BFLOAT16, 3, (int64_t[]){S, H, D}). */
void da_tensor_make(da_tensor_t *t, void *data, da_dtype_t dtype, int ndim, const int64_t *shape);

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
  int nthreads;       /* CPU kernel threads; 0 = the cores this process is bound to
                         (or DISTATTN_NTHREADS) */
} da_config_t;

#define DA_CONFIG_INITIALIZER { sizeof(da_config_t), DA_API_VERSION, DA_DEVICE_CPU, 0 }

da_status_t da_context_create(const da_config_t *cfg, da_context_t **ctx);
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

#ifdef __cplusplus
}
#endif
#endif /* DISTATTN_H */
