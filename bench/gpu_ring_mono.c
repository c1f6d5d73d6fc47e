/* gpu_ring_mono.c: the monolithic reference of bench/gpu-ring-check.sh: ONE call of the CUDA
 * kernel table's forward (state_init, fwd_block over the whole sequence, fwd_finish) on the whole
 * problem on one GPU, timed with CUDA events (median of --iters after one warmup), printed as one
 * JSON line. The P-way split of the same problem (`distattn run --device cuda`) is held against
 * it: ratio = split time / this time. Random bf16/fp16 inputs (the numbers do not matter here:
 * the split run is the verified one). Exit 77 without a usable GPU. Not a test. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

#define CK(call)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      fprintf(stderr, "gpu_ring_mono: %s: %s\n", #call, cudaGetErrorString(e_));          \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)
#define DK(call)                                                                                      \
  do {                                                                                                \
    da_status_t s_ = (call);                                                                          \
    if (s_ != DA_SUCCESS) {                                                                           \
      fprintf(stderr, "gpu_ring_mono: %s: %s: %s\n", #call, da_status_string(s_), da_error_message()); \
      return 1;                                                                                       \
    }                                                                                                 \
  } while (0)

/* n random 16-bit values in [-1, 1) (bf16 or fp16 bit patterns) on the device at *out. */
static int rand_dev(void **out, int64_t n, da_dtype_t dt, uint64_t seed) {
  uint16_t *h = malloc((size_t)n * 2);
  if (!h) return 1;
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    float x = (float)((s >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
    uint32_t b;
    memcpy(&b, &x, 4);
    if (dt == DA_BFLOAT16) h[i] = (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
    else { /* fp16 of a value in [-1, 1): sign, exponent, 10 mantissa bits (truncated) */
      uint32_t sign = (b >> 16) & 0x8000, e = (b >> 23) & 0xFF, m = b & 0x7FFFFF;
      h[i] = e < 103 ? (uint16_t)sign : (uint16_t)(sign | ((e - 112) << 10) | (m >> 13));
    }
  }
  CK(cudaMalloc(out, (size_t)n * 2));
  CK(cudaMemcpy(*out, h, (size_t)n * 2, cudaMemcpyHostToDevice));
  free(h);
  return 0;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int64_t S = 1 << 20, H = 8, G = 8, D = 128, iters = 3;
  const char *dtn = "bf16";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--seq")) S = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--heads")) H = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--kv-heads")) G = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--dim")) D = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--iters")) iters = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--dtype")) dtn = argv[i + 1];
    else {
      fprintf(stderr, "usage: gpu_ring_mono [--seq S] [--heads H] [--kv-heads G] [--dim D] [--dtype bf16|fp16] "
              "[--iters N]\n");
      return 2;
    }
  }
  if (S < 1 || H < 1 || G < 1 || H % G || iters < 1 || iters > 100) {
    fprintf(stderr, "gpu_ring_mono: bad sizes\n");
    return 2;
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
    printf("# gpu_ring_mono: no usable CUDA device: skipped\n");
    return 77;
  }
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const da_kernels_t *kt = da_kernels_get(DA_DEVICE_CUDA);
  if (!kt) {
    fprintf(stderr, "gpu_ring_mono: %s\n", da_error_message());
    return 1;
  }
  const da_dtype_t dt = !strcmp(dtn, "fp16") ? DA_FLOAT16 : DA_BFLOAT16;
  da_kparams_t p = {.H = (int)H, .G = (int)G, .D = (int)D, .scale = (float)(1.0 / sqrt((double)D)), .dtype = dt};
  p.mask.flags = DA_MASK_CAUSAL;
  DK(kt->supports(&p));
  void *q, *k, *v, *out;
  float *o, *m, *l, *lse;
  if (rand_dev(&q, S * H * D, dt, 1) || rand_dev(&k, S * G * D, dt, 2) || rand_dev(&v, S * G * D, dt, 3)) return 1;
  CK(cudaMalloc(&out, (size_t)(S * H * D) * 2));
  CK(cudaMalloc((void **)&o, (size_t)(S * H * D) * 4));
  CK(cudaMalloc((void **)&m, (size_t)(S * H) * 4));
  CK(cudaMalloc((void **)&l, (size_t)(S * H) * 4));
  CK(cudaMalloc((void **)&lse, (size_t)(S * H) * 4));
  cudaStream_t st;
  cudaEvent_t a, b;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  double *t = calloc((size_t)iters, sizeof *t);
  for (int64_t it = -1; it < iters; it++) { /* one warmup */
    da_fwd_state_t fs = {o, m, l, S};
    CK(cudaEventRecord(a, st));
    DK(da_fwd_state_init(kt, &p, &fs, st));
    DK(kt->fwd_block(&p, q, H * D, da_span(0, 1, S), k, G * D, v, G * D, da_span(0, 1, S), &fs, st));
    DK(kt->fwd_finish(&p, &fs, out, dt, H * D, lse, st));
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (it >= 0) t[it] = ms * 1e-3;
  }
  qsort(t, (size_t)iters, sizeof *t, cmp);
  const double med = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
  const double pairs = (double)S * (double)(S + 1) / 2.0, flops = 4.0 * H * D * pairs;
  printf("{\"cmd\":\"mono\",\"device\":\"%s\",\"seq\":%lld,\"heads\":%lld,\"kv_heads\":%lld,\"dim\":%lld,"
         "\"dtype\":\"%s\",\"mask\":\"causal\",\"iters\":%lld,\"fwd_s\":%.6f,\"tflops\":%.2f}\n",
         prop.name, (long long)S, (long long)H, (long long)G, (long long)D, dtn, (long long)iters, med,
         flops / med * 1e-12);
  free(t);
  return 0;
}
