/* test_cuda_rules.cpp: the DA_HD rules of the CUDA kernels (kernels/cuda/tile.cuh) held against
 * plain references on the host: the device mask (per-row key interval, documents carried by value
 * per query chunk) against core/mask.h's da_mask_allows element by element; the key-index range
 * of a row against a brute-force scan; the tile schedule of the forward kernel (visited KV tiles,
 * FULL tiles) against a brute-force walk of every pair; the tile class against da_mask_classify;
 * the online-softmax fold against float64. Random masks of every kind (with more documents than
 * one launch carries), strided spans. Built as host C++ with DA_SIMT (no GPU, no nvcc).
 * A failure prints the case and the seed; exit status 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "tile.cuh"

static uint64_t rs;
static uint64_t next() {
  uint64_t z = (rs += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static int64_t rnd(int64_t lo, int64_t hi) { return lo + (int64_t)(next() % (uint64_t)(hi - lo + 1)); }

static long failures = 0, checks = 0;
#define EXPECT(cond, ...)                                  \
  do {                                                     \
    checks++;                                              \
    if (!(cond)) {                                         \
      if (failures++ < 20) {                               \
        printf("FAIL %s:%d: ", __FILE__, __LINE__);        \
        printf(__VA_ARGS__);                               \
        printf("\n");                                      \
      }                                                    \
    }                                                      \
  } while (0)

/* A random mask over [0, S): kind bits causal / window / doc, up to 80 documents (more than one
 * launch carries, so chunking is exercised). cu needs 81 entries. */
static da_mask_t random_mask(int kind, int64_t S, int64_t *cu) {
  da_mask_t m = {0, 0, 0, NULL};
  if (kind & 1) m.flags |= DA_MASK_CAUSAL;
  if (kind & 2) m.flags |= DA_MASK_WINDOW, m.window = rnd(0, 2) ? rnd(1, 40) : rnd(1, S);
  if (kind & 4) {
    int64_t nd = rnd(1, 80);
    cu[0] = 0;
    for (int64_t d = 1; d <= nd; d++) cu[d] = cu[d - 1] + rnd(1, 2 * S / nd + 1);
    if (rnd(0, 1)) cu[nd] = S; /* else positions past the last document exist */
    if (cu[nd] < cu[nd - 1] + 1) cu[nd] = cu[nd - 1] + 1;
    m.flags |= DA_MASK_DOC, m.ndocs = nd, m.cu_seqlens = cu;
  }
  return m;
}

static void describe(const da_mask_t *m, char *buf) { da_mask_describe(m, buf, 256); }

/* Chunks cover every row once, in order, each within DA_DOC_INLINE documents; every row of a
 * chunk sees exactly the keys da_mask_allows gives it (all keys of [0, S + 20) scanned). */
static void test_allows(int kind) {
  int64_t cu[81];
  const int64_t S = rnd(20, 400);
  da_mask_t m = random_mask(kind, S, cu);
  char md[256];
  describe(&m, md);
  const da_span_t qpos = da_span(rnd(0, 30), rnd(1, 3), rnd(1, 150));
  int64_t r1;
  for (int64_t r0 = 0; r0 < qpos.count; r0 = r1) {
    const da_dmask dm = da_dmask_chunk(&m, qpos, r0, &r1);
    EXPECT(r1 > r0 && r1 <= qpos.count, "mask %s: chunk [%lld, %lld)", md, (long long)r0, (long long)r1);
    EXPECT(dm.nb <= DA_DOC_INLINE, "mask %s: %d documents in a chunk", md, dm.nb);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t q = da_span_at(qpos, r);
      for (int64_t k = 0; k < S + 20 + q; k++)
        EXPECT(da_dmask_allows(dm, q, k) == (bool)da_mask_allows(&m, q, k), "mask %s: q %lld k %lld: device %d core %d",
               md, (long long)q, (long long)k, (int)da_dmask_allows(dm, q, k), da_mask_allows(&m, q, k));
    }
  }
}

/* Key indices of a row: exactly the j with da_mask_allows(q, kpos(j)), as one interval. */
static void test_row_keys(int kind) {
  int64_t cu[81];
  const int64_t S = rnd(20, 400);
  da_mask_t m = random_mask(kind, S, cu);
  char md[256];
  describe(&m, md);
  const da_span_t kpos = da_span(rnd(0, 50), rnd(1, 4), rnd(1, 120));
  for (int t = 0; t < 40; t++) {
    const int64_t q = rnd(0, S + 10);
    int64_t r1;
    const da_span_t one = da_span(q, 1, 1);
    const da_dmask dm = da_dmask_chunk(&m, one, 0, &r1);
    int64_t jlo, jhi;
    da_row_keys(dm, q, kpos, &jlo, &jhi);
    for (int64_t j = 0; j < kpos.count; j++) {
      const bool in = j >= jlo && j <= jhi;
      EXPECT(in == (bool)da_mask_allows(&m, q, da_span_at(kpos, j)), "mask %s: q %lld key index %lld (pos %lld): range [%lld, %lld]",
             md, (long long)q, (long long)j, (long long)da_span_at(kpos, j), (long long)jlo, (long long)jhi);
    }
  }
}

/* The forward kernel's schedule for a query tile of 64 rows and KV tiles of 64 keys: every KV
 * tile holding an allowed pair lies in the visited range; a tile called FULL has every pair
 * allowed (rows past the query count excluded, as in the kernel). */
static void test_schedule(int kind) {
  int64_t cu[81];
  const int64_t S = rnd(64, 600);
  da_mask_t m = random_mask(kind, S, cu);
  char md[256];
  describe(&m, md);
  const da_span_t qpos = da_span(rnd(0, 100), rnd(1, 3), rnd(1, 200));
  const da_span_t kpos = da_span(rnd(0, 100), rnd(1, 3), rnd(1, 400));
  int64_t r1;
  for (int64_t c0 = 0; c0 < qpos.count; c0 = r1) {
    const da_dmask dm = da_dmask_chunk(&m, qpos, c0, &r1);
    for (int64_t t0 = c0; t0 < r1; t0 += 64) {
      const int64_t n = r1 - t0 < 64 ? r1 - t0 : 64;
      const da_qtile_keys tk = da_qtile_keys_of(dm, da_span_at(qpos, t0), da_span_at(qpos, t0 + n - 1), kpos);
      for (int64_t j0 = 0; j0 < kpos.count; j0 += 64) {
        const int64_t j1 = j0 + 63;
        bool any = false, all = j1 < kpos.count;
        for (int64_t r = t0; r < t0 + n; r++)
          for (int64_t j = j0; j <= j1 && j < kpos.count; j++) {
            const bool a = da_mask_allows(&m, da_span_at(qpos, r), da_span_at(kpos, j));
            any |= a, all &= a;
          }
        const bool visited = j1 >= tk.first_lo && j0 <= tk.last_hi;
        EXPECT(!any || visited, "mask %s: q tile at row %lld, k tile %lld: allowed pairs but not visited (range [%lld, %lld])",
               md, (long long)t0, (long long)j0, (long long)tk.first_lo, (long long)tk.last_hi);
        const bool full = da_ktile_full(tk, j0, j1) && j1 < kpos.count;
        EXPECT(!full || all, "mask %s: q tile at row %lld, k tile %lld called FULL but not every pair is allowed", md,
               (long long)t0, (long long)j0);
        if (kind == 0) EXPECT(!all || full, "no mask: a whole tile must be FULL");
      }
    }
  }
}

/* EMPTY and FULL agree with da_mask_classify (exact for both) on contiguous position ranges. */
static void test_classify(int kind) {
  int64_t cu[81];
  const int64_t S = rnd(20, 400);
  da_mask_t m = random_mask(kind, S, cu);
  char md[256];
  describe(&m, md);
  for (int t = 0; t < 60; t++) {
    const int64_t q0 = rnd(0, S), q1 = q0 + rnd(0, 40), k0 = rnd(0, S), k1 = k0 + rnd(0, 40);
    int64_t r1;
    const da_span_t qs = da_span(q0, 1, q1 - q0 + 1);
    const da_dmask dm = da_dmask_chunk(&m, qs, 0, &r1);
    if (r1 < qs.count) continue; /* the query range spans more documents than one chunk */
    const int dc = da_dmask_classify(dm, q0, q1, k0, k1), cc = (int)da_mask_classify(&m, q0, q1, k0, k1);
    if (cc != DA_TILE_PARTIAL) EXPECT(dc == cc, "mask %s: q [%lld, %lld] k [%lld, %lld]: device %d core %d", md, (long long)q0,
                                      (long long)q1, (long long)k0, (long long)k1, dc, cc);
    else EXPECT(dc != DA_TILE_FULL, "mask %s: a PARTIAL pair called FULL", md);
  }
}

/* Online softmax in log2 units, folded tile by tile as the kernels do (including rows that see
 * nothing for a while, -inf scores and a NaN), against float64. */
static void test_fold() {
  for (int t = 0; t < 200; t++) {
    const int n = (int)rnd(1, 300);
    float s[300];
    for (int i = 0; i < n; i++) s[i] = rnd(0, 4) == 0 ? -INFINITY : (float)((double)rnd(-4000, 4000) / 100.0);
    const bool nan = t % 50 == 7;
    if (nan) s[rnd(0, n - 1)] = NAN;
    float m = -INFINITY, l = 0.0f;
    for (int i0 = 0; i0 < n; i0 += 16) { /* tiles of 16 keys */
      float mx = -INFINITY;
      for (int i = i0; i < n && i < i0 + 16; i++) mx = da_fmax_nan(mx, s[i]);
      float use, alpha;
      m = da_softmax_fold(m, mx, &use, &alpha);
      float sum = 0.0f;
      for (int i = i0; i < n && i < i0 + 16; i++) sum += da_exp2(s[i] - use);
      l = l * alpha + sum;
    }
    double M = -INFINITY, L = 0.0;
    for (int i = 0; i < n; i++) M = s[i] > M ? s[i] : M;
    for (int i = 0; i < n; i++) L += M == -INFINITY ? 0.0 : exp2((double)s[i] - M);
    if (nan) {
      EXPECT(isnan(m) && isnan(l), "a NaN score must poison m and l (m %g l %g)", (double)m, (double)l);
    } else if (M == -INFINITY) {
      EXPECT(m == -INFINITY && l == 0.0f, "nothing seen: m %g l %g", (double)m, (double)l);
    } else {
      EXPECT(m == (float)M, "max %g expected %g", (double)m, M);
      EXPECT(fabs(l - L) <= 1e-5 * L, "sum %.9g expected %.9g", (double)l, L);
    }
  }
}

int main(int argc, char **argv) {
  const char *e = getenv("DISTATTN_TEST_SEED");
  const uint64_t seed = e && *e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
  rs = seed;
  printf("# test_cuda_rules: seed %llu (DISTATTN_TEST_SEED)\n", (unsigned long long)seed);
  for (int rep = 0; rep < 25; rep++)
    for (int kind = 0; kind < 8; kind++) {
      if ((kind & 3) == 3) continue; /* window implies causal: covered by kind 2 */
      test_allows(kind);
      test_row_keys(kind);
      test_schedule(kind);
      test_classify(kind);
    }
  test_fold();
  printf("# %ld checks, %ld failures\n", checks, failures);
  return failures ? 1 : 0;
}
