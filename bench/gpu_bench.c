/* gpu_bench.c: the CUDA backend's benchmark driver for bench/gpu-check.sh: forward, backward and
 * split-KV decode through the kernel table (da_kernels_get(DA_DEVICE_CUDA)) on device memory,
 * timed with CUDA events, one JSON line per measurement on stdout (the torch SDPA side is
 * bench/gpu_bench.py, same shapes). Decode is also held against a same-run device-to-device
 * cudaMemcpy of the same bytes (its bandwidth ceiling). --check runs small cases once each (for
 * compute-sanitizer) and checks only that every call succeeds; correctness is test_kernels_gpu's
 * job. --probe only says whether a device is there. Exit 77 without a usable GPU. Not a correctness test, not run by ctest. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

#define CK(call)                                                                            \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      fprintf(stderr, "gpu_bench: %s failed: %s\n", #call, cudaGetErrorString(e_));         \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)
#define DK(call)                                                                            \
  do {                                                                                      \
    da_status_t s_ = (call);                                                                \
    if (s_ != DA_SUCCESS) {                                                                 \
      fprintf(stderr, "gpu_bench: %s: %s: %s\n", #call, da_status_string(s_), da_error_message()); \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

static char device_name[256];

/* n random bf16/fp16 values in [-1, 1) on the device. */
static void *rand_dev(int64_t n, da_dtype_t dt, uint64_t seed) {
  uint16_t *h = malloc((size_t)n * 2);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    float x = (float)((double)(s >> 11) * 0x1.0p-53 * 2 - 1);
    uint32_t u;
    memcpy(&u, &x, 4);
    if (dt == DA_BFLOAT16) h[i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    else { /* fp16 of a value in [-1, 1): exponent and 10 mantissa bits (truncated; inputs only) */
      int ex = (int)((u >> 23) & 0xff) - 127 + 15;
      h[i] = ex <= 0 ? (uint16_t)((u >> 16) & 0x8000) : (uint16_t)(((u >> 16) & 0x8000) | (ex << 10) | ((u >> 13) & 0x3ff));
    }
  }
  void *d;
  CK(cudaMalloc(&d, (size_t)n * 2));
  CK(cudaMemcpy(d, h, (size_t)n * 2, cudaMemcpyHostToDevice));
  free(h);
  return d;
}

static float *fdev(int64_t n) {
  float *d;
  CK(cudaMalloc((void **)&d, (size_t)(n > 0 ? n : 1) * 4));
  CK(cudaMemset(d, 0, (size_t)(n > 0 ? n : 1) * 4));
  return d;
}

typedef struct {
  const da_kernels_t *kt;
  da_kparams_t p;
  int64_t S;
  void *q, *k, *v, *out, *dout;
  float *o, *m, *l, *lse, *delta, *dq, *dk, *dv;
} prob_t;

static void prob_init(prob_t *x, const da_kernels_t *kt, int64_t S, int H, int G, int D, da_dtype_t dt, unsigned mask,
                      const int64_t *cu, int ndocs) {
  memset(x, 0, sizeof *x);
  x->kt = kt, x->S = S;
  x->p.H = H, x->p.G = G, x->p.D = D, x->p.dtype = dt, x->p.scale = 1.0f / sqrtf((float)D);
  x->p.mask.flags = mask;
  if (mask & DA_MASK_WINDOW) x->p.mask.window = 256;
  if (mask & DA_MASK_DOC) x->p.mask.ndocs = ndocs, x->p.mask.cu_seqlens = cu;
  x->q = rand_dev(S * H * D, dt, 1), x->k = rand_dev(S * G * D, dt, 2), x->v = rand_dev(S * G * D, dt, 3);
  x->dout = rand_dev(S * H * D, dt, 4), x->out = rand_dev(S * H * D, dt, 5);
  x->o = fdev(S * H * D), x->m = fdev(S * H), x->l = fdev(S * H), x->lse = fdev(S * H), x->delta = fdev(S * H);
  x->dq = fdev(S * H * D), x->dk = fdev(S * G * D), x->dv = fdev(S * G * D);
}

static void prob_free(prob_t *x) {
  void *ps[] = {x->q, x->k, x->v, x->out, x->dout, x->o, x->m, x->l, x->lse, x->delta, x->dq, x->dk, x->dv};
  for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) cudaFree(ps[i]);
}

static da_status_t run_fwd(prob_t *x) {
  const int64_t ld = (int64_t)x->p.H * x->p.D, ldk = (int64_t)x->p.G * x->p.D;
  da_fwd_state_t st = {x->o, x->m, x->l, x->S};
  da_span_t sp = da_span(0, 1, x->S);
  da_status_t s = da_fwd_state_init(x->kt, &x->p, &st, NULL);
  if (!s) s = x->kt->fwd_block(&x->p, x->q, ld, sp, x->k, ldk, x->v, ldk, sp, &st, NULL);
  if (!s) s = x->kt->fwd_finish(&x->p, &st, x->out, x->p.dtype, ld, x->lse, NULL);
  return s;
}

static da_status_t run_bwd(prob_t *x) {
  const int64_t ld = (int64_t)x->p.H * x->p.D, ldk = (int64_t)x->p.G * x->p.D;
  da_span_t sp = da_span(0, 1, x->S);
  da_status_t s = x->kt->bwd_prep(&x->p, x->S, x->out, ld, x->dout, ld, x->delta, NULL);
  if (!s)
    s = x->kt->bwd_block(&x->p, x->q, ld, x->dout, ld, x->lse, x->delta, sp, x->k, ldk, x->v, ldk, sp, x->dq, x->dk,
                         x->dv, NULL);
  return s;
}

/* Mean milliseconds of f over iters runs after warmup runs (events on the default stream). */
static double time_ms(da_status_t (*f)(prob_t *), prob_t *x, int warm, int iters, da_status_t *st) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  *st = DA_SUCCESS;
  for (int i = 0; i < warm && !*st; i++) *st = f(x);
  CK(cudaEventRecord(a, NULL));
  for (int i = 0; i < iters && !*st; i++) *st = f(x);
  CK(cudaEventRecord(b, NULL));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a), cudaEventDestroy(b);
  return ms / iters;
}

static const char *mask_name(unsigned f) {
  return f == 0 ? "none" : f == DA_MASK_CAUSAL ? "causal" : f == (DA_MASK_CAUSAL | DA_MASK_DOC) ? "causal+doc" : "other";
}

static void bench_attn(const da_kernels_t *kt, int64_t S, int H, int D, unsigned mask) {
  prob_t x;
  prob_init(&x, kt, S, H, H, D, DA_BFLOAT16, mask, NULL, 0);
  /* useful flops: 2 matmuls of 2 S^2 H D each, half of them under a causal mask */
  const double flops = 4.0 * (double)S * (double)S * H * D * (mask & DA_MASK_CAUSAL ? 0.5 : 1.0);
  da_status_t st;
  double ms = time_ms(run_fwd, &x, 2, 5, &st);
  if (st) printf("{\"op\":\"fwd\",\"impl\":\"distattn\",\"S\":%lld,\"H\":%d,\"D\":%d,\"mask\":\"%s\",\"error\":\"%s\"}\n",
                 (long long)S, H, D, mask_name(mask), da_error_message());
  else printf("{\"op\":\"fwd\",\"impl\":\"distattn\",\"device\":\"%s\",\"dtype\":\"bf16\",\"S\":%lld,\"H\":%d,\"D\":%d,\"mask\":\"%s\",\"ms\":%.4f,\"tflops\":%.2f}\n",
              device_name, (long long)S, H, D, mask_name(mask), ms, flops / ms * 1e-9);
  ms = time_ms(run_bwd, &x, 1, 3, &st);
  if (st) printf("{\"op\":\"bwd\",\"impl\":\"distattn\",\"S\":%lld,\"H\":%d,\"D\":%d,\"mask\":\"%s\",\"error\":\"%s\"}\n",
                 (long long)S, H, D, mask_name(mask), da_error_message());
  else printf("{\"op\":\"bwd\",\"impl\":\"distattn\",\"device\":\"%s\",\"dtype\":\"bf16\",\"S\":%lld,\"H\":%d,\"D\":%d,\"mask\":\"%s\",\"ms\":%.4f,\"tflops\":%.2f}\n",
              device_name, (long long)S, H, D, mask_name(mask), ms, 2.5 * flops / ms * 1e-9);
  fflush(stdout);
  prob_free(&x);
}

/* Decode: nq = 1 query row, H = 32 heads over G = 8 KV heads, D = 128, a cache of S keys in npages
 * pages; bandwidth = K and V bytes / time, against a device-to-device copy of the same bytes. */
static void bench_decode(const da_kernels_t *kt, int64_t S, int npages) {
  const int H = 32, G = 8, D = 128;
  da_kparams_t p = {.H = H, .G = G, .D = D, .scale = 1.0f / sqrtf(128.0f), .dtype = DA_BFLOAT16};
  void *q = rand_dev((int64_t)H * D, DA_BFLOAT16, 7), *k = rand_dev(S * G * D, DA_BFLOAT16, 8),
       *v = rand_dev(S * G * D, DA_BFLOAT16, 9);
  float *o = fdev((int64_t)H * D), *lse = fdev(H);
  da_kvpage_t pages[64];
  const int64_t per = S / npages;
  for (int i = 0; i < npages; i++) {
    pages[i].k = (const char *)k + (size_t)(i * per * G * D) * 2, pages[i].v = (const char *)v + (size_t)(i * per * G * D) * 2;
    pages[i].ldk = pages[i].ldv = (int64_t)G * D;
    pages[i].pos = da_span(i * per, 1, i == npages - 1 ? S - i * per : per);
  }
  const size_t bytes = (size_t)S * G * D * 2 * 2;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int w = 0; w < 3; w++) DK(kt->decode(&p, q, (int64_t)H * D, da_span(S, 1, 1), pages, npages, o, lse, NULL));
  const int iters = 20;
  CK(cudaEventRecord(a, NULL));
  for (int w = 0; w < iters; w++) DK(kt->decode(&p, q, (int64_t)H * D, da_span(S, 1, 1), pages, npages, o, lse, NULL));
  CK(cudaEventRecord(b, NULL));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  ms /= iters;
  void *dst;
  CK(cudaMalloc(&dst, bytes / 2));
  for (int w = 0; w < 3; w++) CK(cudaMemcpy(dst, k, bytes / 2, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(a, NULL));
  for (int w = 0; w < iters; w++) {
    CK(cudaMemcpyAsync(dst, k, bytes / 2, cudaMemcpyDeviceToDevice, NULL));
    CK(cudaMemcpyAsync(dst, v, bytes / 2, cudaMemcpyDeviceToDevice, NULL));
  }
  CK(cudaEventRecord(b, NULL));
  CK(cudaEventSynchronize(b));
  float cms;
  CK(cudaEventElapsedTime(&cms, a, b));
  cms /= iters;
  /* the copy moves `bytes` in and `bytes` out; decode only reads them: both rates are given as
   * bytes of cache per second, ratio = decode rate / copy rate (the 0.85x target) */
  printf("{\"op\":\"decode\",\"impl\":\"distattn\",\"device\":\"%s\",\"dtype\":\"bf16\",\"S\":%lld,\"H\":%d,\"G\":%d,\"D\":%d,"
         "\"pages\":%d,\"ms\":%.4f,\"GBps\":%.1f,\"copy_ms\":%.4f,\"copy_GBps\":%.1f,\"ratio_vs_copy\":%.3f}\n",
         device_name, (long long)S, H, G, D, npages, ms, bytes / ms * 1e-6, cms, bytes / cms * 1e-6, cms / ms);
  fflush(stdout);
  cudaFree(dst), cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(o), cudaFree(lse);
  cudaEventDestroy(a), cudaEventDestroy(b);
}

/* Small cases, each entry once, for compute-sanitizer: every call must succeed. */
static int check_small(const da_kernels_t *kt) {
  static const int64_t cu[4] = {0, 100, 230, 300};
  const int Ds[2] = {64, 128};
  const unsigned masks[3] = {0, DA_MASK_CAUSAL, DA_MASK_CAUSAL | DA_MASK_DOC};
  for (int d = 0; d < 2; d++)
    for (int mi = 0; mi < 3; mi++) {
      prob_t x;
      prob_init(&x, kt, 300, 4, 2, Ds[d], d ? DA_FLOAT16 : DA_BFLOAT16, masks[mi], cu, 3);
      DK(run_fwd(&x));
      da_status_t s = run_bwd(&x);
      if (s) printf("# check: bwd D %d: %s: %s\n", Ds[d], da_status_string(s), da_error_message());
      da_kvpage_t pg = {x.k, x.v, (int64_t)2 * Ds[d], (int64_t)2 * Ds[d], da_span(0, 1, 300)};
      DK(kt->decode(&x.p, x.q, (int64_t)4 * Ds[d], da_span(299, 1, 1), &pg, 1, x.dq, x.lse, NULL));
      CK(cudaDeviceSynchronize());
      prob_free(&x);
      printf("# check: D %d mask %s: fwd, bwd, decode ran\n", Ds[d], mask_name(masks[mi]));
    }
  return 0;
}

int main(int argc, char **argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    printf("# gpu_bench: no usable CUDA device: skipped\n");
    return 77;
  }
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  snprintf(device_name, sizeof device_name, "%s", prop.name);
  const da_kernels_t *kt = da_kernels_get(DA_DEVICE_CUDA);
  if (!kt) {
    fprintf(stderr, "gpu_bench: %s\n", da_error_message());
    return 1;
  }
  printf("# gpu_bench: device %s (sm_%d%d, %d SMs), table %s\n", prop.name, prop.major, prop.minor,
         prop.multiProcessorCount, kt->name);
  if (argc > 1 && !strcmp(argv[1], "--probe")) return 0; /* a device is there (gpu-check.sh) */
  if (argc > 1 && !strcmp(argv[1], "--check")) return check_small(kt);
  const int64_t Ss[3] = {4096, 8192, 16384};
  for (int i = 0; i < 3; i++) {
    bench_attn(kt, Ss[i], 16, 128, 0);
    bench_attn(kt, Ss[i], 16, 128, DA_MASK_CAUSAL);
  }
  bench_decode(kt, 65536, 1);
  bench_decode(kt, 262144, 1);
  bench_decode(kt, 262144, 16);
  return 0;
}
