/* decode.cu: split-KV decode of the CUDA backend (decode of kernels.h): a few query rows against
 * a KV shard given as pages. Memory-bound, so the design is about reading K and V once at full
 * width: the keys of all pages are cut into splits, one CUDA block per (query row and head, split);
 * within a block each key row is read by D/8 lanes with one 16-byte load each (K and V), a warp
 * covers 32/(D/8) keys at a time, and every lane keeps an online-softmax state (m, l, 8 outputs)
 * that is merged across lanes, warps and finally splits (da_decode_combine_kernel). Pages travel
 * by value in the launch (DA_DEC_PAGES per launch; more pages make more launches); the split
 * partials live in stream-ordered scratch (cudaMallocAsync). Never synchronizes. */
#include <type_traits>
#include <vector>
#include "compat.cuh"
#include "ptx.cuh"
#include "tile.cuh"
#include "cuda_backend.h"

#define DA_DEC_THREADS 128 /* 4 warps */
#define DA_DEC_PAGES 16    /* pages per launch, passed by value */
#define DA_DEC_KEYS 512    /* keys per split, aimed at (fewer if the device has idle SMs) */
#define DA_LOG2E_F 1.4426950408889634f
#define DA_LN2_F 0.6931471805599453f

struct da_dec_page {
  const void *k, *v;
  int64_t ldk, ldv;
  da_span_t pos;
  int64_t base; /* index of the page's first key in the launch's concatenation */
  int al;       /* rows 16-byte aligned (vector loads) */
};

struct da_dec_args {
  const void *q;
  int64_t ldq;
  da_span_t qpos;
  int H, G;
  float scale_log2;
  int npages;
  int64_t nkeys;   /* keys of this launch's pages */
  int nsplit;      /* splits of this launch */
  int split0;      /* index of this launch's first split among all splits */
  int64_t row0;    /* first (query row * H + head) of this launch */
  int64_t rows;    /* all rows (nq * H): the stride of the partials */
  float *po, *pm, *pl; /* partials [splits][rows][D], [splits][rows], [splits][rows] */
  da_dmask mask;
  da_dec_page page[DA_DEC_PAGES];
};

/* 8 consecutive 16-bit elements as floats: one 16-byte load when aligned, else 8 loads. */
template <typename T>
DA_DEV void da_dec_load8(const uint16_t *p, int al, float x[8]) {
  uint32_t w[4];
  if (al) {
    const uint4 u = *(const uint4 *)p;
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; e++) w[e] = (uint32_t)p[2 * e] | ((uint32_t)p[2 * e + 1] << 16);
  }
#pragma unroll
  for (int e = 0; e < 8; e++) {
    const uint16_t b = (uint16_t)(w[e / 2] >> (16 * (e % 2)));
    if (std::is_same<T, __nv_bfloat16>::value) {
      x[e] = __uint_as_float((uint32_t)b << 16);
    } else {
      __half_raw r;
      r.x = b;
      x[e] = __half2float(__half(r));
    }
  }
}

/* Merge state (m2, l2, o2) into (m, l, o) (log2 units; NaN-propagating). */
DA_DEV void da_dec_merge(float &m, float &l, float o[8], float m2, float l2, const float o2[8]) {
  const float M = da_fmax_nan(m, m2), use = M == -INFINITY ? 0.0f : M;
  const float w1 = da_exp2(m - use), w2 = da_exp2(m2 - use);
  l = w1 * l + w2 * l2;
#pragma unroll
  for (int e = 0; e < 8; e++) o[e] = w1 * o[e] + w2 * o2[e];
  m = M;
}

// budget: da_decode_kernel sm_80 REG<=96 SHARED<=4096
template <int D, typename T>
DA_GLOBAL(DA_DEC_THREADS) void da_decode_kernel(const da_dec_args a) {
  constexpr int LPK = D / 8, KPW = 32 / LPK, WARPS = DA_DEC_THREADS / 32, STEP = WARPS * KPW;
  __shared__ float sm_o[WARPS][D], sm_m[WARPS], sm_l[WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slot = lane / LPK, part = lane % LPK;
  const int64_t r = a.row0 + blockIdx.x, i = r / a.H;
  const int h = (int)(r % a.H), g = h / (a.H / a.G), s = blockIdx.y;
  const int64_t qp = da_pos(a.qpos, i);

  float q[8], o[8], m = -INFINITY, l = 0.0f;
  {
    const uint16_t *qr = (const uint16_t *)a.q + i * a.ldq + (int64_t)h * D + part * 8;
    da_dec_load8<T>(qr, 0, q);
#pragma unroll
    for (int e = 0; e < 8; e++) q[e] *= a.scale_log2, o[e] = 0.0f;
  }
  /* this split's keys: [x0, x1) of the concatenated pages */
  const int64_t x0 = a.nkeys * s / a.nsplit, x1 = a.nkeys * (s + 1) / a.nsplit;
  for (int pi = 0; pi < a.npages; pi++) {
    const da_dec_page &pg = a.page[pi];
    int64_t lo = x0 - pg.base, hi = x1 - pg.base - 1, jlo, jhi;
    da_row_keys(a.mask, qp, pg.pos, &jlo, &jhi);
    lo = lo > jlo ? lo : jlo, hi = hi < jhi ? hi : jhi;
    if (lo > hi) continue; /* uniform over the block */
    const uint16_t *kb = (const uint16_t *)pg.k + (int64_t)g * D + part * 8;
    const uint16_t *vb = (const uint16_t *)pg.v + (int64_t)g * D + part * 8;
    for (int64_t j0 = lo + warp * KPW; j0 <= hi; j0 += STEP) {
      const int64_t j = j0 + slot;
      const bool ok = j <= hi;
      float k[8], v[8];
      if (ok) {
        da_dec_load8<T>(kb + j * pg.ldk, pg.al, k);
        da_dec_load8<T>(vb + j * pg.ldv, pg.al, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; e++) k[e] = v[e] = 0.0f;
      }
      float sc = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; e++) sc += q[e] * k[e];
#pragma unroll
      for (int w = 1; w < LPK; w *= 2) sc += __shfl_xor_sync(0xffffffffu, sc, w);
      sc = ok ? sc : -INFINITY;
      float use, alpha;
      m = da_softmax_fold(m, sc, &use, &alpha);
      const float pr = da_exp2(sc - use);
      l = l * alpha + pr;
#pragma unroll
      for (int e = 0; e < 8; e++) o[e] = o[e] * alpha + pr * v[e];
    }
  }
  /* merge the warp's key slots (lanes part, part + LPK, ...), then the warps */
#pragma unroll
  for (int w = LPK; w < 32; w *= 2) {
    float o2[8];
    const float m2 = __shfl_xor_sync(0xffffffffu, m, w), l2 = __shfl_xor_sync(0xffffffffu, l, w);
#pragma unroll
    for (int e = 0; e < 8; e++) o2[e] = __shfl_xor_sync(0xffffffffu, o[e], w);
    da_dec_merge(m, l, o, m2, l2, o2);
  }
  if (slot == 0) {
#pragma unroll
    for (int e = 0; e < 8; e++) sm_o[warp][part * 8 + e] = o[e];
    if (part == 0) sm_m[warp] = m, sm_l[warp] = l;
  }
  __syncthreads();
  if (warp == 0 && slot == 0) {
    for (int w = 1; w < WARPS; w++) {
      float o2[8];
#pragma unroll
      for (int e = 0; e < 8; e++) o2[e] = sm_o[w][part * 8 + e];
      da_dec_merge(m, l, o, sm_m[w], sm_l[w], o2);
    }
    const int64_t at = (int64_t)(a.split0 + s) * a.rows + r;
#pragma unroll
    for (int e = 0; e < 8; e++) a.po[at * D + part * 8 + e] = o[e];
    if (part == 0) a.pm[at] = m, a.pl[at] = l;
  }
}

/* Row r of the result from the nsplit partials: o = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s,
 * lse = (M + log2 L) ln 2; rows no split saw: o = 0, lse = -inf (as the CPU backend). */
// budget: da_decode_combine_kernel sm_80 REG<=40 SHARED<=0
DA_GLOBAL(DA_DEC_THREADS) void da_decode_combine_kernel(int64_t rows, int D, int nsplit, const float *po,
                                                         const float *pm, const float *pl, float *o, float *lse) {
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; s++) {
    const float ms = pm[(int64_t)s * rows + r];
    M = ms > M || ms != ms ? ms : M;
  }
  if (M == -INFINITY) {
    for (int d = lane; d < D; d += 32) o[r * D + d] = 0.0f;
    if (lse && lane == 0) lse[r] = -INFINITY;
    return;
  }
  float L = 0.0f;
  for (int s = 0; s < nsplit; s++) {
    const float ms = pm[(int64_t)s * rows + r];
    if (ms == -INFINITY) continue;
    L += (M != M ? M : exp2f(ms - M)) * pl[(int64_t)s * rows + r];
  }
  const float inv = 1.0f / L;
  for (int d = lane; d < D; d += 32) {
    float x = 0.0f;
    for (int s = 0; s < nsplit; s++) {
      const float ms = pm[(int64_t)s * rows + r];
      if (ms == -INFINITY) continue;
      x += (M != M ? M : exp2f(ms - M)) * po[((int64_t)s * rows + r) * D + d];
    }
    o[r * D + d] = x * inv;
  }
  if (lse && lane == 0) lse[r] = (M + log2f(L)) * DA_LN2_F;
}

template <int D, typename T> static da_status_t dec_launch(const da_dec_args &a, int64_t nrows, cudaStream_t stream) {
  void (&kern)(const da_dec_args) = da_decode_kernel<D, T>; /* a reference: see fwd.cu */
  dim3 grid((unsigned)nrows, (unsigned)a.nsplit);
  DA_LAUNCH(kern, grid, DA_DEC_THREADS, 0, stream, a);
  return da_cuda_status(cudaGetLastError(), "decode launch");
}

static da_status_t dec_any(const da_kparams_t *p, const da_dec_args &a, int64_t nrows, cudaStream_t stream) {
  const bool bf = p->dtype == DA_BFLOAT16;
  if (p->D == 64) return bf ? dec_launch<64, __nv_bfloat16>(a, nrows, stream) : dec_launch<64, __half>(a, nrows, stream);
  return bf ? dec_launch<128, __nv_bfloat16>(a, nrows, stream) : dec_launch<128, __half>(a, nrows, stream);
}

extern "C" da_status_t da_cuda_decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                                      const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream) {
  const int64_t nq = qpos.count, rows = nq * p->H, D = p->D;
  if (nq <= 0) return DA_SUCCESS;
  if (npages < 0 || (npages > 0 && !pages))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "cuda decode: %d pages at %p", npages, (const void *)pages);
  if (rows > 0x7fffffff) return DA_ERR(DA_ERR_UNSUPPORTED, "cuda decode: %lld query rows x heads", (long long)rows);
  cudaStream_t cs = (cudaStream_t)stream;
  /* the non-empty pages, in batches of DA_DEC_PAGES (one launch each) */
  std::vector<da_dec_page> pg;
  int64_t total = 0;
  for (int i = 0; i < npages; i++) {
    if (pages[i].pos.count <= 0) continue;
    da_dec_page x;
    x.k = pages[i].k, x.v = pages[i].v, x.ldk = pages[i].ldk, x.ldv = pages[i].ldv, x.pos = pages[i].pos, x.base = 0;
    x.al = (uintptr_t)x.k % 16 == 0 && (uintptr_t)x.v % 16 == 0 && (x.ldk * 2) % 16 == 0 && (x.ldv * 2) % 16 == 0;
    pg.push_back(x);
    total += x.pos.count;
  }
  /* splits: enough blocks to fill the device twice over, at least DA_DEC_KEYS / 2 keys each */
  int dev = 0, sms = 108;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    sms = 108, (void)cudaGetLastError();
  const int64_t want = (2 * (int64_t)sms + rows - 1) / rows;
  int64_t chunk = (total + want - 1) / (want > 0 ? want : 1);
  if (chunk < DA_DEC_KEYS / 2) chunk = DA_DEC_KEYS / 2;
  const int nb = pg.empty() ? 1 : (int)((pg.size() + DA_DEC_PAGES - 1) / DA_DEC_PAGES);
  std::vector<int64_t> bkeys((size_t)nb, 0);
  std::vector<int> bsplit((size_t)nb, 1);
  int64_t splits = 0;
  for (int b = 0; b < nb; b++) {
    for (size_t i = (size_t)b * DA_DEC_PAGES; i < pg.size() && i < (size_t)(b + 1) * DA_DEC_PAGES; i++) {
      pg[i].base = bkeys[b];
      bkeys[b] += pg[i].pos.count;
    }
    const int64_t ns = (bkeys[b] + chunk - 1) / chunk;
    bsplit[b] = (int)(ns < 1 ? 1 : ns > 65535 ? 65535 : ns);
    splits += bsplit[b];
  }
  void *scratch = NULL;
  DA_CHECK(da_cuda_scratch_alloc(&scratch, (size_t)(splits * rows * (D + 2)) * sizeof(float), stream));
  da_dec_args a;
  a.q = q, a.ldq = ldq, a.qpos = qpos, a.H = p->H, a.G = p->G, a.scale_log2 = p->scale * DA_LOG2E_F;
  a.rows = rows;
  a.po = (float *)scratch, a.pm = a.po + splits * rows * D, a.pl = a.pm + splits * rows;
  da_status_t st = DA_SUCCESS;
  for (int64_t r0 = 0, r1; r0 < nq && st == DA_SUCCESS; r0 = r1) {
    a.mask = da_dmask_chunk(&p->mask, qpos, r0, &r1);
    a.row0 = r0 * p->H;
    a.split0 = 0;
    for (int b = 0; b < nb && st == DA_SUCCESS; b++) {
      a.npages = 0;
      for (size_t i = (size_t)b * DA_DEC_PAGES; i < pg.size() && i < (size_t)(b + 1) * DA_DEC_PAGES; i++)
        a.page[a.npages++] = pg[i];
      a.nkeys = bkeys[b], a.nsplit = bsplit[b];
      st = dec_any(p, a, (r1 - r0) * p->H, cs);
      a.split0 += bsplit[b];
    }
  }
  if (st == DA_SUCCESS) {
    const unsigned blocks = (unsigned)((rows * 32 + DA_DEC_THREADS - 1) / DA_DEC_THREADS);
    DA_LAUNCH(da_decode_combine_kernel, blocks, DA_DEC_THREADS, 0, stream, rows, p->D, (int)splits, a.po, a.pm, a.pl, o,
              lse);
    st = da_cuda_status(cudaGetLastError(), "decode combine launch");
  }
  da_status_t fs = da_cuda_scratch_free(scratch, stream);
  return st != DA_SUCCESS ? st : fs;
}
