/* test_cuda_fwd_tsan.cpp: the forward, decode and row kernels of the CUDA backend run threaded
 * (one std::thread per CUDA thread) under ThreadSanitizer: the cp.async double buffer, the
 * barriers between the stages, the quad shuffles and the decode's shared-memory merge must leave
 * no data race (a report fails the test through TSAN_OPTIONS=halt_on_error=1). The results are
 * also held against float64 (the full case sweep is test_kernels_simt's; this is the race check).
 * Small on purpose: threads are slow. Exit 1 on a wrong result. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vector>
#include "cuda_backend.h"
#include "dtype.h"
#include "ref.h"

static int bad = 0;

static void check(const char *what, double err, double tol) {
  printf("# %s: max error %.3g (tolerance %.3g)\n", what, err, tol);
  if (!(err <= tol)) bad = 1;
}

int main() {
  const da_kernels_t *kt = &da_kernels_cuda_simt;
  const int H = 2, G = 1, D = 64, dt = DA_BFLOAT16;
  const int64_t S = 150, ldq = H * D + 3, ldk = G * D + 8; /* odd q rows (element loads), aligned k/v (cp.async) */
  int64_t cu[3] = {0, 70, S};
  da_kparams_t p = {};
  p.H = H, p.G = G, p.D = D, p.scale = 0.125f, p.dtype = (da_dtype_t)dt;
  p.mask.flags = DA_MASK_CAUSAL | DA_MASK_DOC, p.mask.ndocs = 2, p.mask.cu_seqlens = cu;
  std::vector<uint16_t> q(S * ldq), k(S * ldk), v(S * ldk);
  std::vector<double> rq(S * H * D), rk(S * G * D), rv(S * G * D), ro(S * H * D), rl(S * H);
  srand((unsigned)time(NULL));
  for (int64_t i = 0; i < S; i++)
    for (int e = 0; e < H * D; e++) {
      float x = da_round_to(dt, 2.0f * (rand() / (float)RAND_MAX * 2 - 1));
      da_store_f32(q.data(), dt, i * ldq + e, x), rq[i * H * D + e] = x;
      if (e < G * D) {
        x = da_round_to(dt, rand() / (float)RAND_MAX * 2 - 1);
        da_store_f32(k.data(), dt, i * ldk + e, x), rk[i * G * D + e] = x;
        x = da_round_to(dt, rand() / (float)RAND_MAX * 2 - 1);
        da_store_f32(v.data(), dt, i * ldk + e, x), rv[i * G * D + e] = x;
      }
    }
  const da_span_t sp = da_span(0, 1, S);
  da_ref_fwd(&p, rq.data(), sp, rk.data(), rv.data(), sp, ro.data(), rl.data());

  /* forward: two key blocks folded into one state (both tiles of each go through the pipeline) */
  std::vector<float> o(S * H * D), m(S * H), l(S * H), lse(S * H);
  std::vector<uint16_t> out(S * H * D);
  da_fwd_state_t st = {o.data(), m.data(), l.data(), S};
  if (kt->state_init(&p, &st, NULL) || kt->fwd_block(&p, q.data(), ldq, sp, k.data(), ldk, v.data(), ldk, da_span(0, 1, 100), &st, NULL) ||
      kt->fwd_block(&p, q.data(), ldq, sp, k.data() + 100 * ldk, ldk, v.data() + 100 * ldk, ldk, da_span(100, 1, S - 100), &st, NULL) ||
      kt->fwd_finish(&p, &st, out.data(), (da_dtype_t)dt, H * D, lse.data(), NULL)) {
    printf("forward failed: %s\n", da_error_message());
    return 1;
  }
  double e = 0, el = 0;
  for (int64_t i = 0; i < S * H * D; i++) e = fmax(e, fabs(da_load_f32(out.data(), dt, i) - ro[i]));
  for (int64_t i = 0; i < S * H; i++) el = fmax(el, fabs(lse[i] - rl[i]) / (1 + fabs(rl[i])));
  check("fwd out", e, 2e-2);
  check("fwd lse", el, 2e-3);

  /* decode of the last 2 rows against the keys as two pages */
  da_kvpage_t pg[2] = {{k.data(), v.data(), ldk, ldk, da_span(0, 1, 90)},
                       {k.data() + 90 * ldk, v.data() + 90 * ldk, ldk, ldk, da_span(90, 1, S - 90)}};
  std::vector<float> dout(2 * H * D), dl(2 * H);
  if (kt->decode(&p, q.data() + (S - 2) * ldq, ldq, da_span(S - 2, 1, 2), pg, 2, dout.data(), dl.data(), NULL)) {
    printf("decode failed: %s\n", da_error_message());
    return 1;
  }
  e = 0;
  for (int64_t i = 0; i < 2 * H * D; i++) e = fmax(e, fabs(dout[i] - ro[(S - 2) * H * D + i]));
  check("decode out", e, 2e-2);

  /* merge of the two halves' partials is covered by test_kernels_simt; here the row kernels race-check */
  std::vector<float> delta(S * H);
  if (kt->bwd_prep(&p, S, out.data(), H * D, out.data(), H * D, delta.data(), NULL) ||
      kt->merge(&p, S, o.data(), lse.data(), o.data(), lse.data(), NULL)) {
    printf("row kernels failed: %s\n", da_error_message());
    return 1;
  }
  printf("# %s\n", bad ? "FAILED" : "ok");
  return bad;
}
