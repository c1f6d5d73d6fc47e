/* small.cu: the row-wise entries of the CUDA backend: state_init (o = 0, m = -inf, l = 0),
 * fwd_finish (out = o / l, lse), merge of normalized partials, bwd_prep (delta = rowsum(dout *
 * out)), and acc_store (dst = x + y in a dtype: the ring's dK/dV folds and gradient stores). Memory-bound, one warp per (row, head) with each lane walking D in steps of 32; the
 * arithmetic mirrors the CPU backend (kernels/cpu/cpu_impl.c) so both give the same empty-row and
 * NaN results. Never synchronizes. */
#include "compat.cuh"
#include "ptx.cuh"
#include "tile.cuh"
#include "cuda_backend.h"

#define DA_ROW_THREADS 256 /* 8 warps, one row each */
#define DA_LN2 0.6931471805599453f

/* A 16-bit or fp32 element as float; dt as da_dtype_t. */
DA_DEV float da_ld_elem(const void *p, int dt, int64_t i) {
  if (dt == DA_FLOAT32) return ((const float *)p)[i];
  const uint16_t b = ((const uint16_t *)p)[i];
  if (dt == DA_BFLOAT16) return __uint_as_float((uint32_t)b << 16);
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

DA_DEV void da_st_elem(void *p, int dt, int64_t i, float x) {
  if (dt == DA_FLOAT32) {
    ((float *)p)[i] = x;
  } else if (dt == DA_BFLOAT16) {
    __nv_bfloat16 v = __float2bfloat16_rn(x);
    ((__nv_bfloat16 *)p)[i] = v;
  } else {
    ((__half *)p)[i] = __float2half_rn(x);
  }
}

/* Grid of warps over rows: the global warp index and the total. */
DA_DEV int64_t da_warp_id() { return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; }
DA_DEV int64_t da_warp_count() { return (int64_t)gridDim.x * blockDim.x / 32; }

static unsigned da_row_blocks(int64_t rows) {
  int64_t b = (rows + DA_ROW_THREADS / 32 - 1) / (DA_ROW_THREADS / 32);
  return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b); /* grid-stride beyond */
}

// budget: da_state_init_kernel sm_80 REG<=32 SHARED<=0
DA_GLOBAL(DA_ROW_THREADS) void da_state_init_kernel(float *o, float *m, float *l, int64_t rows, int D) {
  for (int64_t r = da_warp_id(); r < rows; r += da_warp_count()) {
    const int lane = threadIdx.x % 32;
    for (int d = lane; d < D; d += 32) o[r * D + d] = 0.0f;
    if (lane == 0) m[r] = -INFINITY, l[r] = 0.0f;
  }
}

extern "C" da_status_t da_cuda_state_init(const da_kparams_t *p, da_fwd_state_t *st, void *stream) {
  const int64_t rows = st->nq * p->H;
  if (rows <= 0) return DA_SUCCESS;
  DA_LAUNCH(da_state_init_kernel, da_row_blocks(rows), DA_ROW_THREADS, 0, stream, st->o, st->m, st->l, rows, p->D);
  return da_cuda_status(cudaGetLastError(), "state_init launch");
}

/* out row (i, h) = o / l in dtype odt (row stride ldo), lse = (m + log2 l) ln 2; l == 0 exactly
 * when the row saw no allowed key: out = 0, lse = -inf (a NaN l stays NaN). */
// budget: da_fwd_finish_kernel sm_80 REG<=48 SHARED<=0
DA_GLOBAL(DA_ROW_THREADS) void da_fwd_finish_kernel(const float *o, const float *m, const float *l, int64_t rows,
                                                     int H, int D, void *out, int odt, int64_t ldo, float *lse) {
  for (int64_t r = da_warp_id(); r < rows; r += da_warp_count()) {
    const int lane = threadIdx.x % 32;
    const int64_t i = r / H, h = r % H;
    const float lr = l[r], inv = 1.0f / lr;
    const bool empty = lr == 0.0f;
    for (int d = lane; d < D; d += 32) da_st_elem(out, odt, i * ldo + h * D + d, empty ? 0.0f : o[r * D + d] * inv);
    if (lse && lane == 0) lse[r] = empty ? -INFINITY : (m[r] + log2f(lr)) * DA_LN2;
  }
}

extern "C" da_status_t da_cuda_fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out, da_dtype_t odt,
                                          int64_t ldo, float *lse, void *stream) {
  const int64_t rows = st->nq * p->H;
  if (rows <= 0) return DA_SUCCESS;
  if ((unsigned)odt >= DA_NUM_DTYPES) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "fwd_finish: unknown output dtype %d", (int)odt);
  DA_LAUNCH(da_fwd_finish_kernel, da_row_blocks(rows), DA_ROW_THREADS, 0, stream, st->o, st->m, st->l, rows, p->H, p->D,
            out, (int)odt, ldo, lse);
  return da_cuda_status(cudaGetLastError(), "fwd_finish launch");
}

/* a <- merge(a, b): lse-weighted average; an -inf partial counts as empty (natural log). */
// budget: da_merge_kernel sm_80 REG<=48 SHARED<=0
DA_GLOBAL(DA_ROW_THREADS) void da_merge_kernel(int64_t rows, int D, float *oa, float *la, const float *ob,
                                                const float *lb) {
  for (int64_t r = da_warp_id(); r < rows; r += da_warp_count()) {
    const int lane = threadIdx.x % 32;
    const float a = la[r], b = lb[r];
    float *x = oa + r * D;
    const float *y = ob + r * D;
    if (b == -INFINITY) continue;
    if (a == -INFINITY) {
      for (int d = lane; d < D; d += 32) x[d] = y[d];
      __syncwarp();
      if (lane == 0) la[r] = b;
      continue;
    }
    const float mx = a > b ? a : b, wa = expf(a - mx), wb = expf(b - mx), s = wa + wb;
    for (int d = lane; d < D; d += 32) x[d] = (wa / s) * x[d] + (wb / s) * y[d];
    __syncwarp(); /* every lane has read la[r] before lane 0 writes it */
    if (lane == 0) la[r] = mx + logf(s);
  }
}

extern "C" da_status_t da_cuda_merge(const da_kparams_t *p, int64_t n, float *o_a, float *lse_a, const float *o_b,
                                     const float *lse_b, void *stream) {
  const int64_t rows = n * p->H;
  if (rows <= 0) return DA_SUCCESS;
  DA_LAUNCH(da_merge_kernel, da_row_blocks(rows), DA_ROW_THREADS, 0, stream, rows, p->D, o_a, lse_a, o_b, lse_b);
  return da_cuda_status(cudaGetLastError(), "merge launch");
}

/* delta [nq][H] = sum_d out * dout in fp32 (a warp per row, xor-shuffle reduction). */
// budget: da_bwd_prep_kernel sm_80 REG<=48 SHARED<=0
DA_GLOBAL(DA_ROW_THREADS) void da_bwd_prep_kernel(int64_t rows, int H, int D, int dt, const void *out, int64_t ldo,
                                                   const void *dout, int64_t lddo, float *delta) {
  for (int64_t r = da_warp_id(); r < rows; r += da_warp_count()) {
    const int lane = threadIdx.x % 32;
    const int64_t i = r / H, h = r % H;
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32)
      acc += da_ld_elem(out, dt, i * ldo + h * D + d) * da_ld_elem(dout, dt, i * lddo + h * D + d);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[r] = acc;
  }
}

extern "C" da_status_t da_cuda_bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo,
                                        const void *dout, int64_t lddo, float *delta, void *stream) {
  const int64_t rows = nq * p->H;
  if (rows <= 0) return DA_SUCCESS;
  DA_LAUNCH(da_bwd_prep_kernel, da_row_blocks(rows), DA_ROW_THREADS, 0, stream, rows, p->H, p->D, (int)p->dtype, out,
            ldo, dout, lddo, delta);
  return da_cuda_status(cudaGetLastError(), "bwd_prep launch");
}

/* dst[i * ldd + j] = x[i * len + j] (+ y[...]) in ddt; grid-stride over the rows * len elements,
 * each read before it is written (dst may be x). */
// budget: da_acc_store_kernel sm_80 REG<=32 SHARED<=0
DA_GLOBAL(DA_ROW_THREADS) void da_acc_store_kernel(int64_t rows, int64_t len, const float *x, const float *y, void *dst,
                                                    int ddt, int64_t ldd) {
  const int64_t n = rows * len, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e / len, j = e % len;
    const float a = x[e];
    da_st_elem(dst, ddt, i * ldd + j, y ? a + y[e] : a);
  }
}

extern "C" da_status_t da_cuda_acc_store(int64_t rows, int64_t len, const float *x, const float *y, void *dst,
                                         da_dtype_t ddt, int64_t ldd, void *stream) {
  const int64_t n = rows * len;
  if (n <= 0) return DA_SUCCESS;
  if ((unsigned)ddt >= DA_NUM_DTYPES) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "acc_store: unknown dtype %d", (int)ddt);
  int64_t blocks = (n + DA_ROW_THREADS - 1) / DA_ROW_THREADS;
  blocks = blocks < 1 ? 1 : blocks > 65535 ? 65535 : blocks; /* grid-stride beyond */
  DA_LAUNCH(da_acc_store_kernel, (unsigned)blocks, DA_ROW_THREADS, 0, stream, rows, len, x, y, dst, (int)ddt, ldd);
  return da_cuda_status(cudaGetLastError(), "acc_store launch");
}
