/* test_tensor.c: Check suite of core/tensor.c, the one stride check behind every entry point.
 * Accepted layouts are built the way frameworks build them (a dense array, permuted, sliced with
 * positive steps, padded), refused ones are checked against a brute-force oracle (every element
 * address enumerated: two equal addresses = overlap), so no expectation comes from the code under
 * test. One end-to-end case runs da_attention_fwd on a transposed view against the float64
 * reference, and the messages are checked to name the tensor and the axis. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "ref.h"
#include "tensor.h"
#include "test_util.h"
#include "test_run.h"

static const char *const AX4[4] = {"batch", "tokens", "heads", "dim"};

static da_tensor_t make(void *data, int ndim, const int64_t *shape, const int64_t *strides) {
  da_tensor_t t;
  memset(&t, 0, sizeof t);
  t.data = data, t.dtype = DA_FLOAT32, t.ndim = ndim;
  for (int i = 0; i < ndim; i++) t.shape[i] = shape[i], t.strides[i] = strides[i];
  return t;
}

/* A plausible heap address: the checks look at the address only for the span's end. */
#define ADDR ((void *)(uintptr_t)0x7f0000001000ull)

static da_status_t check4(const int64_t *shape, const int64_t *strides) {
  da_tensor_t t = make(ADDR, 4, shape, strides);
  return da_tensor_check_strides(&t, 4, 1, "", "q", AX4);
}

/* The oracle: enumerate every element's offset (small tensors only) and look for a repeat. */
static int cmp64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}
static int brute_overlap(int ndim, const int64_t *shape, const int64_t *strides) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  int64_t *off = tu_xmalloc((size_t)n * sizeof *off);
  for (int64_t e = 0; e < n; e++) {
    int64_t rem = e, o = 0;
    for (int i = ndim - 1; i >= 0; i--) o += (rem % shape[i]) * strides[i], rem /= shape[i];
    off[e] = o;
  }
  qsort(off, (size_t)n, sizeof *off, cmp64);
  int dup = 0;
  for (int64_t e = 1; e < n && !dup; e++) dup = off[e] == off[e - 1];
  free(off);
  return dup;
}

/* ---- accepted: what frameworks produce ------------------------------------------------------- */

START_TEST(test_common_layouts) {
  const int64_t B = 2, S = 5, H = 3, D = 8;
  struct {
    const char *what;
    int64_t shape[4], strides[4];
  } ok[] = {
      {"BSHD dense", {B, S, H, D}, {S * H * D, H * D, D, 1}},
      {"BHSD storage seen as BSHD (q.transpose(1, 2))", {B, S, H, D}, {H * S * D, D, S * D, 1}},
      {"SBHD storage seen as BSHD", {B, S, H, D}, {H * D, B * H * D, D, 1}},
      {"HSBD storage seen as BSHD", {B, S, H, D}, {D, B * D, S * B * D, 1}},
      {"q of a packed QKV [B][S][3][H][D]", {B, S, H, D}, {S * 3 * H * D, 3 * H * D, D, 1}},
      {"k of a packed KV [B][S][H][2][D]", {B, S, H, D}, {S * H * 2 * D, H * 2 * D, 2 * D, 1}},
      {"every other token (x[:, ::2])", {B, S, H, D}, {2 * S * H * D, 2 * H * D, D, 1}},
      {"padded rows and heads", {B, S, H, D}, {S * (H * (D + 3) + 7) + 11, H * (D + 3) + 7, D + 3, 1}},
      {"first 5 of 16 dims", {B, S, H, 5}, {S * H * 16, H * 16, 16, 1}},
      {"single head, arbitrary head stride", {B, S, 1, D}, {S * D, D, 12345, 1}},
      {"single token, zero stride", {B, 1, H, D}, {H * D, 0, D, 1}},
      {"single dim, stride 7", {B, S, H, 1}, {S * H * 8, H * 8, 8, 7}},
  };
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    da_status_t st = check4(ok[i].shape, ok[i].strides);
    ck_assert_msg(st == DA_SUCCESS, "%s refused: %s", ok[i].what, da_error_message());
  }
  /* Empty: nothing addressed, any strides (even negative) are fine. */
  const int64_t e_shape[4] = {B, 0, H, D}, e_str[4] = {-1, -5, 0, 9};
  ck_assert_int_eq(check4(e_shape, e_str), DA_SUCCESS);
}
END_TEST

/* Random dense arrays of 4 axes, permuted and sliced with random positive steps: always valid
 * (each element addressed once), so always accepted. */
START_TEST(test_permuted_sliced_accepted) {
  uint64_t rs = 1000 + (uint64_t)_i;
  for (int rep = 0; rep < 200; rep++) {
    int64_t full[4], dense[4], perm[4] = {0, 1, 2, 3};
    for (int i = 0; i < 4; i++) full[i] = tu_rand(&rs, 1, 9);
    dense[3] = 1;
    for (int i = 2; i >= 0; i--) dense[i] = dense[i + 1] * full[i + 1];
    for (int i = 3; i > 0; i--) { /* Fisher-Yates, but the last axis stays (it must be stride 1) */
      int j = (int)tu_rand(&rs, 0, i);
      if (i == 3 || j == 3) continue;
      int64_t x = perm[i];
      perm[i] = perm[j], perm[j] = x;
    }
    int64_t shape[4], strides[4];
    for (int i = 0; i < 4; i++) {
      const int64_t a = perm[i];
      const int64_t step = a == 3 ? 1 : tu_rand(&rs, 1, 3), start = tu_rand(&rs, 0, full[a] - 1);
      shape[i] = (full[a] - start + step - 1) / step;
      strides[i] = dense[a] * step;
    }
    ck_assert_msg(!brute_overlap(4, shape, strides), "the generator made an overlapping view");
    da_status_t st = check4(shape, strides);
    ck_assert_msg(st == DA_SUCCESS, "rep %d: shape %lld %lld %lld %lld strides %lld %lld %lld %lld refused: %s", rep,
                  (long long)shape[0], (long long)shape[1], (long long)shape[2], (long long)shape[3],
                  (long long)strides[0], (long long)strides[1], (long long)strides[2], (long long)strides[3],
                  da_error_message());
  }
}
END_TEST

/* Random small strides: whenever two elements share an address (brute force), refused. */
START_TEST(test_overlap_refused_vs_brute_force) {
  uint64_t rs = 2000 + (uint64_t)_i;
  int overlapping = 0, accepted = 0;
  for (int rep = 0; rep < 2000; rep++) {
    int64_t shape[4], strides[4];
    for (int i = 0; i < 4; i++) shape[i] = tu_rand(&rs, 1, 5), strides[i] = tu_rand(&rs, 1, 60);
    strides[3] = 1;
    const int dup = brute_overlap(4, shape, strides);
    da_status_t st = check4(shape, strides);
    if (dup) {
      overlapping++;
      ck_assert_msg(st == DA_ERR_INVALID_ARGUMENT,
                    "rep %d: overlapping shape %lld %lld %lld %lld strides %lld %lld %lld %lld accepted", rep,
                    (long long)shape[0], (long long)shape[1], (long long)shape[2], (long long)shape[3],
                    (long long)strides[0], (long long)strides[1], (long long)strides[2], (long long)strides[3]);
      ck_assert_msg(strstr(da_error_message(), "q: axis ") && strstr(da_error_message(), "overlap"), "message '%s'",
                    da_error_message());
    } else if (st == DA_SUCCESS) {
      accepted++;
    }
  }
  /* Both kinds occur, or the test says nothing. */
  ck_assert_msg(overlapping > 100 && accepted > 100, "overlapping %d accepted %d", overlapping, accepted);
}
END_TEST

/* ---- refused: each with a message naming the tensor and the axis ----------------------------- */

START_TEST(test_refused_messages) {
  const int64_t S = 5, H = 3, D = 8;
  struct {
    const char *what;
    int64_t shape[4], strides[4];
    da_status_t want;
    const char *needle;
  } bad[] = {
      {"heads overlap (head stride < dim)", {1, S, H, D}, {S * H * D, H * D, D - 1, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 2 (heads)"},
      {"rows overlap (row stride < a row)", {1, S, H, D}, {S * H * D, H * D - 1, D, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 1 (tokens)"},
      {"batch overlaps tokens", {2, S, H, D}, {S * H * D - 1, H * D, D, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 0 (batch)"},
      {"broadcast heads (stride 0)", {1, S, H, D}, {S * H * D, H * D, 0, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 2 (heads): stride 0"},
      {"two axes with one stride", {1, S, H, D}, {S * H * D, D, D, 1}, DA_ERR_INVALID_ARGUMENT, "overlap"},
      {"negative stride", {1, S, H, D}, {S * H * D, -H * D, D, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 1 (tokens): negative stride"},
      {"last axis strided", {1, S, H, D}, {S * H * D * 2, H * D * 2, D * 2, 2}, DA_ERR_UNSUPPORTED,
       "q: axis 3 (dim): stride 2"},
      {"stride 2^62 (the span overflows)", {1, 2, H, D}, {S * H * D, (int64_t)1 << 62, D, 1},
       DA_ERR_INVALID_ARGUMENT, "q: axis 1 (tokens): stride 4611686018427387904"},
      {"stride 2^62 over 4 rows (int64 overflow)", {1, 4, H, D}, {S * H * D, (int64_t)1 << 62, D, 1},
       DA_ERR_INVALID_ARGUMENT, "q: axis 1 (tokens)"},
      {"INT64_MAX stride", {1, 2, H, D}, {S * H * D, INT64_MAX, D, 1}, DA_ERR_INVALID_ARGUMENT, "q: axis 1 (tokens)"},
      {"span past 2^56 bytes", {1, 2, H, D}, {S * H * D, (int64_t)1 << 55, D, 1}, DA_ERR_INVALID_ARGUMENT,
       "q: axis 1 (tokens)"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    da_error_clear();
    da_status_t st = check4(bad[i].shape, bad[i].strides);
    const char *msg = da_error_message();
    ck_assert_msg(st == bad[i].want, "%s: status %s (%s), expected %s", bad[i].what, da_status_string(st), msg,
                  da_status_string(bad[i].want));
    ck_assert_msg(strstr(msg, bad[i].needle), "%s: message '%s' lacks '%s'", bad[i].what, msg, bad[i].needle);
  }
  /* The documented limit: shape [3][3][1] with strides {3, 4, 1} interleaves without colliding
   * (offsets 0, 3, 4, 6, 7, 8, 10, 11, 14), and is refused like an overlap. */
  const int64_t il_shape[3] = {3, 3, 1}, il_str[3] = {3, 4, 1};
  ck_assert(!brute_overlap(3, il_shape, il_str));
  da_tensor_t t = make(ADDR, 3, il_shape, il_str);
  ck_assert_int_eq(da_tensor_check_strides(&t, 4, 1, "rank 2: ", "k", NULL), DA_ERR_INVALID_ARGUMENT);
  ck_assert_msg(strstr(da_error_message(), "rank 2: k: axis 1 (?)"), "%s", da_error_message());
  /* Without last_contiguous (decode's lse [B][T][H], written element by element), a strided last
   * axis is fine as long as nothing overlaps: [2][3][4] over [2][4][3] storage. */
  const int64_t l_shape[3] = {2, 3, 4}, l_str[3] = {12, 1, 3}, l_bad[3] = {12, 1, 2};
  da_tensor_t l = make(ADDR, 3, l_shape, l_str);
  ck_assert_int_eq(da_tensor_check_strides(&l, 4, 0, "", "lse", NULL), DA_SUCCESS);
  ck_assert_int_eq(da_tensor_check_strides(&l, 4, 1, "", "lse", NULL), DA_ERR_UNSUPPORTED);
  l = make(ADDR, 3, l_shape, l_bad); /* heads stride 2 over tokens stride 1 x 3: overlap */
  ck_assert(brute_overlap(3, l_shape, l_bad));
  ck_assert_int_eq(da_tensor_check_strides(&l, 4, 0, "", "lse", NULL), DA_ERR_INVALID_ARGUMENT);
  /* The end of the address space: a valid shape at an address whose span would wrap. */
  const int64_t sh[4] = {1, S, H, D}, st4[4] = {S * H * D, H * D, D, 1};
  da_tensor_t hi = make((void *)(uintptr_t)(DA_TENSOR_MAX_ADDRESS - 64), 4, sh, st4);
  ck_assert_int_eq(da_tensor_check_strides(&hi, 4, 1, "", "out", AX4), DA_ERR_INVALID_ARGUMENT);
  ck_assert_msg(strstr(da_error_message(), "out: axis"), "%s", da_error_message());
}
END_TEST

/* ---- end to end: the single-rank forward reads a transposed view ------------------------------ */

/* q, k, v, out in [B][H][S][D] storage passed as [B][S][H][D] views (torch's q.transpose(1, 2)),
 * against the float64 reference on the same values. Before the shared check this was refused as
 * "rows overlap". */
START_TEST(test_fwd_transposed_views) {
  const int64_t B = 2, S = 37, H = 4, G = 2, D = 16;
  uint64_t rs = 77;
  da_kparams_t kp;
  memset(&kp, 0, sizeof kp);
  kp.H = (int)H, kp.G = (int)G, kp.D = (int)D, kp.dtype = DA_FLOAT32, kp.scale = (float)(1.0 / sqrt((double)D));
  kp.mask.flags = DA_MASK_CAUSAL;
  float *q = tu_xmalloc((size_t)(B * H * S * D) * 4), *k = tu_xmalloc((size_t)(B * G * S * D) * 4);
  float *v = tu_xmalloc((size_t)(B * G * S * D) * 4), *o = tu_xmalloc((size_t)(B * H * S * D) * 4);
  double *rq = tu_xmalloc((size_t)(S * H * D) * 8), *rk = tu_xmalloc((size_t)(S * G * D) * 8);
  double *rv = tu_xmalloc((size_t)(S * G * D) * 8), *ro = tu_xmalloc((size_t)(S * H * D) * 8);
  double *rl = tu_xmalloc((size_t)(S * H) * 8), *got = tu_xmalloc((size_t)(S * H * D) * 8);
  /* storage index of (b, s, h, d) in [B][heads][S][D] */
#define AT(b, s, h, d, heads) ((((b) * (heads) + (h)) * S + (s)) * D + (d))
  for (int64_t i = 0; i < B * H * S * D; i++) q[i] = (float)(2 * tu_rand01(&rs) - 1), o[i] = NAN;
  for (int64_t i = 0; i < B * G * S * D; i++) k[i] = (float)(2 * tu_rand01(&rs) - 1), v[i] = (float)(2 * tu_rand01(&rs) - 1);
  da_tensor_t tq, tk, tv, to;
  const int64_t qs[4] = {B, S, H, D}, qst[4] = {H * S * D, D, S * D, 1};
  const int64_t ks[4] = {B, S, G, D}, kst[4] = {G * S * D, D, S * D, 1};
  tq = make(q, 4, qs, qst), tk = make(k, 4, ks, kst), tv = make(v, 4, ks, kst), to = make(o, 4, qs, qst);
  da_problem_t pr = DA_PROBLEM_INITIALIZER;
  pr.batch = B, pr.seq = S, pr.heads = H, pr.kv_heads = G, pr.dim = D, pr.mask = DA_MASK_CAUSAL;
  da_context_t *ctx = NULL;
  ck_assert_int_eq(da_context_create(NULL, &ctx), DA_SUCCESS);
  da_status_t st = da_attention_fwd(ctx, &pr, &tq, &tk, &tv, &to, NULL, NULL);
  ck_assert_msg(st == DA_SUCCESS, "transposed views refused: %s", da_last_error(ctx));
  for (int64_t b = 0; b < B; b++) {
    for (int64_t s = 0; s < S; s++)
      for (int64_t d = 0; d < D; d++) {
        for (int64_t h = 0; h < H; h++) rq[(s * H + h) * D + d] = q[AT(b, s, h, d, H)];
        for (int64_t g = 0; g < G; g++)
          rk[(s * G + g) * D + d] = k[AT(b, s, g, d, G)], rv[(s * G + g) * D + d] = v[AT(b, s, g, d, G)];
      }
    ck_assert_int_eq(da_ref_fwd(&kp, rq, da_span(0, 1, S), rk, rv, da_span(0, 1, S), ro, rl), DA_SUCCESS);
    for (int64_t s = 0; s < S; s++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++) got[(s * H + h) * D + d] = o[AT(b, s, h, d, H)];
    TU_CHECK_CLOSE("out", ro, got, S * H * D, H, D, D, 1e-4, "transposed BHSD views");
  }
#undef AT
  da_context_free(ctx);
  free(q), free(k), free(v), free(o), free(rq), free(rk), free(rv), free(ro), free(rl), free(got);
}
END_TEST

int main(void) {
  Suite *s = suite_create("tensor");
  TCase *tc = tcase_create("strides");
  tcase_set_timeout(tc, TU_TIMEOUT);
  tcase_add_test(tc, test_common_layouts);
  tcase_add_loop_test(tc, test_permuted_sliced_accepted, 0, 4);
  tcase_add_loop_test(tc, test_overlap_refused_vs_brute_force, 0, 4);
  tcase_add_test(tc, test_refused_messages);
  tcase_add_test(tc, test_fwd_transposed_views);
  suite_add_tcase(s, tc);
  return tu_run(s);
}
