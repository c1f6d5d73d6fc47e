/* cpu.c: the CPU backend table: capability checks and the choice, once per process, of the ISA
 * level the kernels run at (AVX-512 with AMX tiles for bf16, AVX-512 with BF16 dot products,
 * AVX-512, AVX2+FMA, or portable C), from what the CPU reports, never from the build machine.
 * DISTATTN_CPU_ISA=<level> forces a level (tests and benchmarks compare them); asking for one the
 * CPU lacks is an error, not a silent fallback. avx2bf16emu (the bf16 pair-product path of
 * avx512bf16 with its dot products done in AVX2 FMAs) is never picked by itself: it exists so that
 * CPUs without AVX512-BF16 test that path's tiling and packing. */
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "cpu_impl.h"
#include "dtype.h"

static const da_kernels_t *impl;

/* AMX with bf16 tiles: 1 when the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and
 * 22) and Linux grants this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA; without it the first tile instruction faults); -1 when the CPU has them but
 * the grant was refused; 0 without them. Asked once, by pick(). */
static int amx_usable(void) {
#if defined(__linux__) && defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 22 & 1)) return 0;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
#else
  return 0;
#endif
}

static const da_kernels_t *pick(void) {
  const char *want = da_param_string("DISTATTN_CPU_ISA");
  int has512 = 0, has2 = 0, hasbf16 = 0, hasamx = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  hasbf16 = has512 && __builtin_cpu_supports("avx512bf16");
  const int amx = hasbf16 ? amx_usable() : 0;
  hasamx = amx == 1;
  has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#ifdef DA_CPU_HAVE_X86
  static const struct {
    const char *name, *needs;
    const da_kernels_t *table;
  } levels[] = {
      {"amx", "AMX-BF16 (with the tile state granted by Linux) and AVX512-BF16", &da_cpu_impl_amx},
      {"avx512bf16", "AVX512-BF16", &da_cpu_impl_avx512bf16},
      {"avx512", "AVX-512", &da_cpu_impl_avx512},
      {"avx2", "AVX2/FMA", &da_cpu_impl_avx2},
      {"avx2bf16emu", "AVX2/FMA", &da_cpu_impl_avx2bf16emu},
  };
  const int has[] = {hasamx, hasbf16, has512, has2, has2};
  for (size_t i = 0; want && i < sizeof levels / sizeof levels[0]; i++)
    if (!strcmp(want, levels[i].name)) {
      if (!has[i])
        return DA_ERR(DA_ERR_UNSUPPORTED, "DISTATTN_CPU_ISA=%s but this CPU lacks %s", want, levels[i].needs), NULL;
      return levels[i].table;
    }
#endif
  if (want && strcmp(want, "generic") && strcmp(want, "auto"))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                  "DISTATTN_CPU_ISA=%s: expected amx, avx512bf16, avx512, avx2, avx2bf16emu, generic or auto", want),
           NULL;
  if (want && !strcmp(want, "generic")) return &da_cpu_impl_generic;
#ifdef DA_CPU_HAVE_X86
  if (hasamx) return &da_cpu_impl_amx;
  /* A CPU with AMX runs vdpbf16ps at half its fp32 FMA rate (Sapphire Rapids, measured: the
   * avx512bf16 level's bf16 at 0.7x of widening to fp32), so without the tiles it widens. */
  if (amx == -1) {
    DA_WARN(DA_SUB_KERNEL, "cpu kernels: the CPU has AMX but Linux refused the tile state (arch_prctl "
                           "ARCH_REQ_XCOMP_PERM): bf16 is widened to fp32 (avx512)");
    return &da_cpu_impl_avx512;
  }
  if (hasbf16) return &da_cpu_impl_avx512bf16;
  if (has512) return &da_cpu_impl_avx512;
  if (has2) return &da_cpu_impl_avx2;
#endif
  (void)has512, (void)has2, (void)hasbf16, (void)hasamx;
  return &da_cpu_impl_generic;
}

static da_status_t get(const da_kernels_t **out) {
  const da_kernels_t *k = __atomic_load_n(&impl, __ATOMIC_ACQUIRE);
  if (!k) {
    k = pick();
    if (!k) return DA_ERR_UNSUPPORTED; /* message recorded by pick() */
    DA_INFO(DA_SUB_KERNEL, "cpu kernels: %s", k->name);
    __atomic_store_n(&impl, k, __ATOMIC_RELEASE);
  }
  *out = k;
  return DA_SUCCESS;
}

/* The name of the ISA level in use ("cpu-avx512", ...), for reports. */
const char *da_cpu_isa_name(void) {
  const da_kernels_t *k;
  return get(&k) == DA_SUCCESS ? k->name : "cpu-unavailable";
}

static da_status_t supports(const da_kparams_t *p) {
  DA_CHECK(da_kparams_check(p));
  if (p->D > DA_CPU_MAX_DIM)
    return DA_ERR(DA_ERR_UNSUPPORTED, "cpu backend: head dim %d > %d is not supported", p->D, DA_CPU_MAX_DIM);
  const da_kernels_t *k;
  return get(&k);
}

/* Forwarders: the table below is what callers hold; each call goes to the chosen level. */
static da_status_t fwd_block(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos, const void *k,
                             int64_t ldk, const void *v, int64_t ldv, da_span_t kpos, da_fwd_state_t *st,
                             void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->fwd_block(p, q, ldq, qpos, k, ldk, v, ldv, kpos, st, stream);
}
static da_status_t fwd_finish(const da_kparams_t *p, const da_fwd_state_t *st, void *out, da_dtype_t odt,
                              int64_t ldo, float *lse, void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->fwd_finish(p, st, out, odt, ldo, lse, stream);
}
static da_status_t merge(const da_kparams_t *p, int64_t n, float *oa, float *la, const float *ob, const float *lb,
                         void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->merge(p, n, oa, la, ob, lb, stream);
}
static da_status_t bwd_prep(const da_kparams_t *p, int64_t nq, const void *out, int64_t ldo, const void *dout,
                            int64_t lddo, float *delta, void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->bwd_prep(p, nq, out, ldo, dout, lddo, delta, stream);
}
static da_status_t bwd_block(const da_kparams_t *p, const void *q, int64_t ldq, const void *dout, int64_t lddo,
                             const float *lse, const float *delta, da_span_t qpos, const void *k, int64_t ldk,
                             const void *v, int64_t ldv, da_span_t kpos, float *dq, float *dk, float *dv,
                             void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->bwd_block(p, q, ldq, dout, lddo, lse, delta, qpos, k, ldk, v, ldv, kpos, dq, dk, dv, stream);
}
static da_status_t decode(const da_kparams_t *p, const void *q, int64_t ldq, da_span_t qpos,
                          const da_kvpage_t *pages, int npages, float *o, float *lse, void *stream) {
  const da_kernels_t *t;
  DA_CHECK(get(&t));
  return t->decode(p, q, ldq, qpos, pages, npages, o, lse, stream);
}

/* dst = x (+ y) in ddt: the ring's dK/dV folds and gradient stores. Memory-bound and short next
 * to the blocks that produce x: one thread. */
static da_status_t acc_store(int64_t rows, int64_t len, const float *x, const float *y, void *dst, da_dtype_t ddt,
                             int64_t ldd, void *stream) {
  (void)stream;
  for (int64_t i = 0; i < rows; i++) {
    const float *a = x + i * len, *b = y ? y + i * len : NULL;
    if (ddt == DA_FLOAT32) {
      float *d = (float *)dst + i * ldd;
      if (b)
        for (int64_t j = 0; j < len; j++) d[j] = a[j] + b[j];
      else if (d != a)
        memmove(d, a, (size_t)len * sizeof(float));
    } else {
      for (int64_t j = 0; j < len; j++) da_store_f32(dst, (int)ddt, i * ldd + j, b ? a[j] + b[j] : a[j]);
    }
  }
  return DA_SUCCESS;
}

const da_kernels_t da_kernels_cpu = {
    .name = "cpu",
    .supports = supports,
    .fwd_block = fwd_block,
    .fwd_finish = fwd_finish,
    .merge = merge,
    .bwd_prep = bwd_prep,
    .bwd_block = bwd_block,
    .decode = decode,
    .acc_store = acc_store,
    .stream_ordered = 0, /* runs on the host before returning */
};
