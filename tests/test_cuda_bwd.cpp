/* test_cuda_bwd.cpp: the CUDA backward block kernel (kernels/cuda/bwd.cu, da_cuda_bwd_block) run
 * on the CPU by the SIMT runner (tests/simt) against the float64 reference (kernels/ref), on the
 * rounded inputs the kernel sees. Covers head dims 64 and 128, bf16 and fp16, every mask (none,
 * causal, window, doc, causal+doc, window+doc), GQA 4:1 and 4:2, lengths 1, 7, 129 and about 300,
 * contiguous, offset and strided (stride 3) position spans, 16-byte aligned rows (cp.async path)
 * and odd row strides (element path), many documents (several launches per call).
 * Fresh random inputs each run (the seed is printed; DISTATTN_TEST_SEED reruns one). dq, dk, dv
 * are accumulated (+=): they start from random values and the test checks result - start. Every
 * buffer ends at an inaccessible page (any access past it crashes the test, even an atomicAdd of
 * zero, which no value check can see); NaN guards sit before each output, and the padding of
 * every input row holds NaN, so a read past a row shows. Speed is not measured here.
 * Exit 0 = pass. */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "core.h"
#include "dtype.h"
#include "kernels.h"
#include "ref.h"
#include "rng.h"
#include "cuda_backend.h"

namespace {

uint64_t next(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
int64_t rnd(uint64_t *s, int64_t lo, int64_t hi) { return lo + (int64_t)(next(s) % (uint64_t)(hi - lo + 1)); }

enum { M_NONE, M_CAUSAL, M_WINDOW, M_DOC, M_CAUSAL_DOC, M_WINDOW_DOC, NMASKS };
enum { L_SAME, L_AFTER, L_STRIDED, NLAYOUTS }; /* q and k on the same positions; q after k; stride 3 */
const char *layout_names[NLAYOUTS] = {"same", "q-after-k", "stride-3"};

struct Case {
  int D, H, G, mask, layout, ndocs;
  da_dtype_t dt;
  int64_t nq, nk;
  bool aligned; /* row strides multiples of 8 elements (cp.async) or odd (element loads) */
  int hsplit;   /* blocks per (KV tile, KV head): 0 = the entry's own choice (on the runner's 108
                   "SMs" that is H/G for these small cases: atomic dk/dv), 1 = owner writes */
};

/* n elements of T that end exactly at an inaccessible page (the
 * start is 16-byte aligned when n * sizeof(T) is a multiple of 16; callers round n up). Freed with
 * the Fenced object. */
template <typename T>
struct Fenced {
  T *p = nullptr;
  void *map = nullptr;
  size_t len = 0;
  explicit Fenced(size_t n) {
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE), bytes = n * sizeof(T);
    len = (bytes + pg - 1) / pg * pg + pg;
    map = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
      perror("mmap");
      abort();
    }
    char *fence = (char *)map + len - pg;
    mprotect(fence, pg, PROT_NONE);
    p = (T *)(fence - bytes);
  }
  Fenced(const Fenced &) = delete;
  Fenced &operator=(const Fenced &) = delete;
  ~Fenced() { munmap(map, len); }
  T &operator[](size_t i) { return p[i]; }
};

/* 16-bit rows [n][heads*D] with row stride ld, padding NaN; ref gets the rounded values packed. */
struct Rows {
  std::unique_ptr<Fenced<uint16_t>> buf;
  std::vector<double> ref;
  int64_t ld;
  uint16_t *data() { return buf->p; }
};

const int GUARD = 64; /* NaN elements before every accumulated output */

Rows make_rows(uint64_t seed, uint32_t tensor, da_span_t pos, int heads, int D, da_dtype_t dt, int64_t ld,
               float amp) {
  Rows r;
  r.ld = ld;
  const size_t n = (size_t)(pos.count * ld + 7) / 8 * 8; /* 16-byte aligned start, as cudaMalloc's */
  r.buf.reset(new Fenced<uint16_t>(n));
  for (size_t i = 0; i < n; i++) (*r.buf)[i] = dt == DA_BFLOAT16 ? 0x7fc0 : 0x7e00;
  r.ref.resize((size_t)(pos.count * heads * D));
  std::vector<float> row((size_t)D);
  for (int64_t i = 0; i < pos.count; i++)
    for (int h = 0; h < heads; h++) {
      da_rng_row(seed, tensor, pos.start + i * pos.stride, h, D, row.data());
      for (int d = 0; d < D; d++) {
        const float x = da_round_to((int)dt, amp * row[(size_t)d]);
        da_store_f32(r.data(), (int)dt, i * ld + (int64_t)h * D + d, x);
        r.ref[(size_t)((i * heads + h) * D + d)] = x;
      }
    }
  return r;
}

/* Worst error of got against ref normalized by max(max |ref|, floor) (per tensor, as
 * tests/test_kernels.c check_bwd does for gradients); NaN or Inf is an infinite error. */
double tensor_err(const std::vector<double> &ref, const std::vector<double> &got, double floor, int64_t *where) {
  double scale = floor > 1e-6 ? floor : 1e-6, worst = 0;
  for (double x : ref) scale = std::fabs(x) > scale ? std::fabs(x) : scale;
  *where = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    const double e = std::isfinite(got[i]) ? std::fabs(got[i] - ref[i]) / scale : INFINITY;
    if (e > worst || (i == 0 && e >= worst)) worst = e, *where = (int64_t)i;
  }
  return worst;
}

/* Documents covering [0, S): ndocs lengths >= 1 around S / ndocs with jitter. */
int64_t make_docs(uint64_t *rs, int64_t S, int64_t ndocs, int64_t *cu) {
  if (ndocs > S) ndocs = S;
  const int64_t j = S / (3 * ndocs);
  cu[0] = 0;
  for (int64_t i = 1; i < ndocs; i++) {
    int64_t c = S * i / ndocs + rnd(rs, -j, j);
    if (c < cu[i - 1] + 1) c = cu[i - 1] + 1;
    if (c > S - (ndocs - i)) c = S - (ndocs - i);
    cu[i] = c;
  }
  cu[ndocs] = S;
  return ndocs;
}

struct Errs {
  double dq, dk, dv;
};

/* One case: returns 0 on pass. */
int run_case(const Case &c, uint64_t seed, Errs *worst) {
  uint64_t rs = seed;
  const int H = c.H, G = c.G, D = c.D;
  const da_dtype_t dt = c.dt;
  da_span_t qs, ks;
  switch (c.layout) {
    case L_SAME: {
      const int64_t n = c.nq > c.nk ? c.nq : c.nk;
      qs = da_span(n - c.nq, 1, c.nq), ks = da_span(0, 1, c.nk); /* q the last rows: causal sees keys */
      break;
    }
    case L_AFTER: qs = da_span(c.nk + rnd(&rs, 0, 5), 1, c.nq), ks = da_span(rnd(&rs, 0, 3), 1, c.nk); break;
    default: { /* q on the last rows of the keys' range, both stride 3, offsets 0..2 apart */
      const int64_t n = c.nq > c.nk ? c.nq : c.nk;
      qs = da_span(3 * (n - c.nq) + rnd(&rs, 0, 2), 3, c.nq), ks = da_span(rnd(&rs, 0, 2), 3, c.nk);
      break;
    }
  }
  const int64_t S = 1 + (da_span_last(qs) > da_span_last(ks) ? da_span_last(qs) : da_span_last(ks));
  da_kparams_t p;
  std::memset(&p, 0, sizeof p);
  p.H = H, p.G = G, p.D = D, p.dtype = dt;
  p.scale = (float)(1.0 / std::sqrt((double)D));
  std::vector<int64_t> cu((size_t)c.ndocs + 2);
  if (c.mask == M_CAUSAL || c.mask == M_CAUSAL_DOC) p.mask.flags |= DA_MASK_CAUSAL;
  if (c.mask == M_WINDOW || c.mask == M_WINDOW_DOC) {
    p.mask.flags |= DA_MASK_WINDOW;
    p.mask.window = rnd(&rs, 0, 2) == 0 ? rnd(&rs, 1, S) : rnd(&rs, 1, S / 6 + 1);
  }
  if (c.mask >= M_DOC) {
    p.mask.flags |= DA_MASK_DOC;
    p.mask.ndocs = make_docs(&rs, S, rnd(&rs, c.ndocs > 3 ? c.ndocs / 2 : 1, c.ndocs), cu.data());
    p.mask.cu_seqlens = cu.data();
  }
  char md[256];
  da_mask_describe(&p.mask, md, sizeof md);
  char desc[512];
  snprintf(desc, sizeof desc, "%s D %d H %d G %d mask %s layout %s nq %lld nk %lld %s rows hsplit %d (seed %llu)",
           dt == DA_BFLOAT16 ? "bf16" : "fp16", D, H, G, md, layout_names[c.layout], (long long)c.nq,
           (long long)c.nk, c.aligned ? "aligned" : "odd-stride", c.hsplit, (unsigned long long)seed);

  if (getenv("DA_TEST_VERBOSE"))
    printf("# %s: %lld allowed pairs\n", desc, (long long)da_mask_count_pairs(&p.mask, qs, ks));
  auto ld_of = [&](int heads) { return (int64_t)heads * D + (c.aligned ? 8 * rnd(&rs, 0, 1) : 2 * rnd(&rs, 0, 3) + 1); };
  const uint64_t iseed = next(&rs);
  Rows q = make_rows(iseed, DA_RNG_Q, qs, H, D, dt, ld_of(H), 3.0f);
  Rows dout = make_rows(iseed, DA_RNG_DOUT, qs, H, D, dt, ld_of(H), 1.0f);
  Rows k = make_rows(iseed, DA_RNG_K, ks, G, D, dt, ld_of(G), 1.0f);
  Rows v = make_rows(iseed, DA_RNG_V, ks, G, D, dt, ld_of(G), 1.0f);

  /* Forward in float64 on the rounded inputs: out (stored in dt, as a forward leaves it), lse. */
  const int64_t nq = c.nq, nk = c.nk;
  std::vector<double> out((size_t)(nq * H * D)), lse((size_t)(nq * H));
  if (da_ref_fwd(&p, q.ref.data(), qs, k.ref.data(), v.ref.data(), ks, out.data(), lse.data()) != DA_SUCCESS) {
    printf("FAIL %s: reference forward: %s\n", desc, da_error_message());
    return 1;
  }
  /* lse and delta = rowsum(dout * out) on the stored out, in fp32, with NaN guards. */
  Fenced<float> lsef((size_t)(nq * H)), deltaf((size_t)(nq * H));
  double dmax = 0;
  for (int64_t r = 0; r < nq * H; r++) {
    double x = 0;
    for (int d = 0; d < D; d++) x += dout.ref[(size_t)(r * D + d)] * (double)da_round_to((int)dt, (float)out[(size_t)(r * D + d)]);
    lsef[(size_t)r] = (float)lse[(size_t)r];
    deltaf[(size_t)r] = (float)x;
    dmax = std::fabs(x) > dmax ? std::fabs(x) : dmax;
  }
  /* Reference gradients. */
  std::vector<double> eq((size_t)(nq * H * D)), ek((size_t)(nk * G * D)), ev((size_t)(nk * G * D));
  if (da_ref_bwd(&p, q.ref.data(), qs, k.ref.data(), v.ref.data(), ks, dout.ref.data(), eq.data(), ek.data(),
                 ev.data()) != DA_SUCCESS) {
    printf("FAIL %s: reference backward: %s\n", desc, da_error_message());
    return 1;
  }
  /* Accumulators: random start values after a NaN guard, ending at the fence. */
  auto acc = [&](Fenced<float> &b, std::vector<float> *start) {
    const int64_t n = (int64_t)start->size();
    for (int i = 0; i < GUARD; i++) b[(size_t)i] = NAN;
    for (int64_t i = 0; i < n; i++) b[(size_t)(GUARD + i)] = (*start)[(size_t)i] = (float)(rnd(&rs, -1000, 1000) / 500.0);
  };
  std::vector<float> q0((size_t)(nq * H * D)), k0((size_t)(nk * G * D)), v0((size_t)(nk * G * D));
  Fenced<float> dq(GUARD + q0.size()), dk(GUARD + k0.size()), dv(GUARD + v0.size());
  acc(dq, &q0), acc(dk, &k0), acc(dv, &v0);

  const da_status_t st =
      c.hsplit ? da_cuda_bwd_block_split(&p, q.data(), q.ld, dout.data(), dout.ld, lsef.p, deltaf.p, qs, k.data(), k.ld,
                                         v.data(), v.ld, ks, dq.p + GUARD, dk.p + GUARD, dv.p + GUARD, c.hsplit, nullptr)
               : da_cuda_bwd_block(&p, q.data(), q.ld, dout.data(), dout.ld, lsef.p, deltaf.p, qs, k.data(), k.ld,
                                   v.data(), v.ld, ks, dq.p + GUARD, dk.p + GUARD, dv.p + GUARD, nullptr);
  if (st != DA_SUCCESS) {
    printf("FAIL %s: da_cuda_bwd_block returned %s: %s\n", desc, da_status_string(st), da_error_message());
    return 1;
  }
  int bad = 0;
  auto check = [&](const char *name, Fenced<float> &b, const std::vector<float> &start,
                   const std::vector<double> &ref, double floor, double *w) {
    const int64_t n = (int64_t)start.size();
    for (int i = 0; i < GUARD; i++)
      if (!std::isnan(b[(size_t)i])) {
        printf("FAIL %s: %s guard element %d overwritten\n", desc, name, i);
        bad = 1;
        return;
      }
    std::vector<double> got((size_t)n);
    for (int64_t i = 0; i < n; i++) got[(size_t)i] = (double)b[(size_t)(GUARD + i)] - start[(size_t)i];
    int64_t where;
    const double e = tensor_err(ref, got, floor, &where);
    if (e > *w) *w = e;
    if (!(e <= 2e-2)) {
      printf("FAIL %s: %s error %.3g > 2e-2 at [%lld][%lld][%lld]: got %.9g, reference %.9g\n", desc, name, e,
             (long long)(where / (D * (name[1] == 'q' ? H : G))), (long long)((where / D) % (name[1] == 'q' ? H : G)),
             (long long)(where % D), got[(size_t)where], ref[(size_t)where]);
      bad = 1;
    }
  };
  double qmax = 0, kmax = 0;
  for (double x : q.ref) qmax = std::fabs(x) > qmax ? std::fabs(x) : qmax;
  for (double x : k.ref) kmax = std::fabs(x) > kmax ? std::fabs(x) : kmax;
  /* dq, dk floors: one term scale * delta * |k| (|q|), as check_bwd (rows seeing one key cancel). */
  check("dq", dq, q0, eq, p.scale * dmax * kmax, &worst->dq);
  check("dk", dk, k0, ek, p.scale * dmax * qmax, &worst->dk);
  check("dv", dv, v0, ev, 0.0, &worst->dv);
  return bad;
}

} // namespace

/* Arguments: case indices to run (all when none), for debugging one case; or "tsan": the small
 * set for the ThreadSanitizer build. */
int main(int argc, char **argv) {
  const char *e = getenv("DISTATTN_TEST_SEED");
  const uint64_t base = e && *e ? strtoull(e, nullptr, 0) : (uint64_t)time(nullptr) * 1000003ull + (uint64_t)getpid();
  printf("# test_cuda_bwd: seed %llu (DISTATTN_TEST_SEED reruns it)\n", (unsigned long long)base);
  /* Unsupported shapes are refused with DA_ERR_UNSUPPORTED, never run wrong. */
  {
    da_kparams_t p;
    std::memset(&p, 0, sizeof p);
    p.H = 2, p.G = 1, p.D = 96, p.dtype = DA_BFLOAT16, p.scale = 0.1f;
    float f = 0;
    uint16_t x = 0;
    const da_status_t st = da_cuda_bwd_block(&p, &x, 96 * 2, &x, 96 * 2, &f, &f, da_span(0, 1, 1), &x, 96, &x, 96,
                                             da_span(0, 1, 1), &f, &f, &f, nullptr);
    if (st != DA_ERR_UNSUPPORTED) {
      printf("FAIL: D = 96 returned %s, expected unsupported\n", da_status_string(st));
      return 1;
    }
    p.D = 64, p.dtype = DA_FLOAT32;
    if (da_cuda_bwd_block(&p, &x, 128, &x, 128, &f, &f, da_span(0, 1, 1), &x, 64, &x, 64, da_span(0, 1, 1), &f, &f,
                          &f, nullptr) != DA_ERR_UNSUPPORTED) {
      printf("FAIL: fp32 storage not refused\n");
      return 1;
    }
  }
  std::vector<Case> cases;
  const bool tsan = argc > 1 && !strcmp(argv[1], "tsan");
  if (tsan) {
    /* Threaded under ThreadSanitizer (slow: one OS thread per CUDA thread): two small cases with
     * several steps per block, so both cp.async stages, the prefetch and every barrier are used. */
    cases.push_back({64, 2, 1, M_CAUSAL, L_SAME, 6, DA_BFLOAT16, 100, 70, true, 1});
    cases.push_back({128, 4, 1, M_WINDOW_DOC, L_SAME, 6, DA_FLOAT16, 70, 40, false, 0});
  } else {
    /* Lengths (nq, nk) by case index: every length on both sides, the large ones rarely (the runner
     * is slow: a 300 x 300 pair at D = 128 takes seconds). */
    static const int64_t lens[][2] = {{7, 129}, {129, 7}, {1, 129}, {129, 1}, {129, 129}, {7, 7}, {1, 7}, {129, 65}};
    int ci = 0;
    for (int dti = 0; dti < 2; dti++)
      for (int D : {64, 128})
        for (int m = 0; m < NMASKS; m++, ci++) {
          Case c;
          c.D = D, c.H = 4, c.G = ci % 2 ? 2 : 1, c.mask = m, c.layout = ci % NLAYOUTS, c.ndocs = 6;
          c.dt = dti ? DA_FLOAT16 : DA_BFLOAT16;
          c.nq = lens[ci % 8][0], c.nk = lens[ci % 8][1];
          c.aligned = (ci / 3) % 2 == 0;
          /* owner writes, the entry's choice (atomics), and an uneven split of 4 heads in 3 */
          c.hsplit = ci % 3 == 0 ? 1 : ci % 3 == 1 ? 0 : 3;
          cases.push_back(c);
        }
    /* About 300 rows, and many documents (several launches, each with its own document window). */
    cases.push_back({128, 4, 2, M_CAUSAL, L_SAME, 6, DA_BFLOAT16, 300, 129, true, 1});
    cases.push_back({64, 4, 1, M_WINDOW_DOC, L_STRIDED, 6, DA_FLOAT16, 300, 129, false, 0});
    cases.push_back({64, 4, 2, M_CAUSAL_DOC, L_SAME, 60, DA_BFLOAT16, 300, 300, true, 1});
    cases.push_back({128, 4, 1, M_NONE, L_AFTER, 6, DA_FLOAT16, 1, 300, true, 0});
  }
  int fails = 0;
  Errs worst[2][2] = {}; /* [dtype][D == 128] */
  int ran = 0;
  for (size_t i = 0; i < cases.size(); i++) {
    bool pick = argc < 2 || tsan;
    for (int a = 1; a < argc && !tsan; a++) pick = pick || (size_t)atoi(argv[a]) == i;
    if (!pick) continue;
    const Case &c = cases[i];
    const clock_t t0 = clock();
    const int f = run_case(c, base + 7919 * i, &worst[c.dt == DA_FLOAT16][c.D == 128]);
    if (getenv("DA_TEST_VERBOSE")) printf("# case %zu: %s, %.2f s CPU\n", i, f ? "FAIL" : "ok", (double)(clock() - t0) / CLOCKS_PER_SEC);
    fails += f, ran++;
  }
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++)
      printf("# %s D %d: max error dq %.3g dk %.3g dv %.3g (budget 2e-2, normalized per tensor)\n",
             a ? "fp16" : "bf16", b ? 128 : 64, worst[a][b].dq, worst[a][b].dk, worst[a][b].dv);
  printf("# %d cases, %d failed\n", ran, fails);
  return fails ? 1 : 0;
}
