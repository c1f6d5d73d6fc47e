/* kvmap.c: the shard map of the distributed paged KV cache (see kvmap.h): prefill layout, owner
 * of each appended page, replay and the balance checker. Arithmetic on token counts only; the
 * pages themselves live in comm/kvcache.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvmap.h"

da_status_t da_kvmap_init(da_kvmap_t *m, int nranks, int64_t page, da_layout_kind_t kind, const double *weights) {
  memset(m, 0, sizeof *m);
  if (nranks < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: %d ranks", nranks);
  if (page < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: page = %lld tokens must be >= 1", (long long)page);
  if (!weights && (kind != DA_LAYOUT_CONTIGUOUS && kind != DA_LAYOUT_STRIPED && kind != DA_LAYOUT_ZIGZAG))
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: prefill layout %s needs weights (or use contiguous, "
                  "striped, zigzag)", da_layout_name(kind));
  double sum = 0;
  if (weights) {
    for (int r = 0; r < nranks; r++) {
      if (!(weights[r] > 0) || !isfinite(weights[r]))
        return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: weight of rank %d is %g, must be positive and finite", r,
                      weights[r]);
      sum += weights[r];
    }
    if (!isfinite(sum)) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: weights sum to infinity");
  }
  m->share = malloc((size_t)nranks * sizeof *m->share);
  m->weights = weights ? malloc((size_t)nranks * sizeof *m->weights) : NULL;
  if (!m->share || (weights && !m->weights)) {
    da_kvmap_free(m);
    return DA_ERR(DA_ERR_OUT_OF_MEMORY, "kv cache map");
  }
  for (int r = 0; r < nranks; r++) m->share[r] = weights ? weights[r] / sum : 1.0 / nranks;
  if (weights) memcpy(m->weights, weights, (size_t)nranks * sizeof *m->weights);
  m->nranks = nranks;
  m->page = page;
  m->weighted = weights != NULL;
  m->kind = weights ? DA_LAYOUT_WEIGHTED : kind;
  return DA_SUCCESS;
}

void da_kvmap_free(da_kvmap_t *m) {
  if (!m) return;
  free(m->share);
  free(m->weights);
  m->share = m->weights = NULL;
}

da_status_t da_kvmap_prefill_layout(const da_kvmap_t *m, int64_t L0, da_layout_t *L) {
  return da_layout_init(L, m->kind, L0, m->nranks, m->weights);
}

int da_kvmap_next_owner(const da_kvmap_t *m, const int64_t *tokens, int64_t len) {
  const int P = m->nranks;
  int best = 0;
  if (!m->weighted) {
    /* Fewest tokens first: the spread max - min never exceeds one page (the new page lands on the
     * minimum, so it ends at most a page above the old minimum, and the new minimum is no lower). */
    for (int r = 1; r < P; r++)
      if (tokens[r] < tokens[best]) best = r;
    return best;
  }
  /* Earliest deadline among the eligible ranks. In page units, rank r's deficit is
   * d_r = (share_r * len - tokens_r) / page; taking this page keeps it below one page ahead iff
   * d_r + share_r > 0 (eligible); left out, its deficit reaches one page after (1 - d_r) / share_r
   * more pages (deadline). The deficits sum to 0 and the shares to 1, so some rank is eligible. */
  const double pg = (double)m->page;
  double best_key = INFINITY;
  best = -1;
  int fallback = 0;
  double fb_val = -INFINITY;
  for (int r = 0; r < P; r++) {
    double d = (m->share[r] * (double)len - (double)tokens[r]) / pg, e = d + m->share[r];
    if (e > fb_val) fb_val = e, fallback = r;
    if (!(e > 0)) continue;
    double key = (1.0 - d) / m->share[r];
    if (key < best_key) best_key = key, best = r;
  }
  return best >= 0 ? best : fallback; /* fallback only against rounding: the largest e */
}

da_status_t da_kvmap_replay(const da_kvmap_t *m, int64_t L0, int64_t len, int64_t *tokens, int *owners) {
  const int P = m->nranks;
  if (L0 < 0 || len < L0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "kv cache map: prefill %lld, length %lld", (long long)L0, (long long)len);
  memset(tokens, 0, (size_t)P * sizeof *tokens);
  if (L0 > 0) {
    da_layout_t L;
    DA_CHECK(da_kvmap_prefill_layout(m, L0, &L));
    for (int r = 0; r < P; r++) tokens[r] = da_layout_count(&L, r);
    da_layout_free(&L);
  }
  int64_t j = 0;
  for (int64_t pos = L0; pos < len; pos += m->page, j++) {
    int o = da_kvmap_next_owner(m, tokens, pos);
    int64_t n = len - pos < m->page ? len - pos : m->page;
    tokens[o] += n;
    if (owners) owners[j] = o;
  }
  return DA_SUCCESS;
}

int da_kvmap_owner(const da_kvmap_t *m, const da_layout_t *prefill, int64_t L0, const int *owners, int64_t pos) {
  if (pos < L0) return da_layout_owner(prefill, pos, NULL);
  return owners[(pos - L0) / m->page];
}

da_status_t da_kvmap_check(const da_kvmap_t *m, int64_t L0, int64_t len, const int64_t *tokens) {
  const int P = m->nranks;
  int64_t sum = 0, mn = INT64_MAX, mx = INT64_MIN;
  int rmn = 0, rmx = 0;
  for (int r = 0; r < P; r++) {
    if (tokens[r] < 0)
      return DA_ERR(DA_ERR_INTERNAL, "kv cache map: rank %d holds %lld tokens", r, (long long)tokens[r]);
    sum += tokens[r];
    if (tokens[r] < mn) mn = tokens[r], rmn = r;
    if (tokens[r] > mx) mx = tokens[r], rmx = r;
  }
  if (sum != len)
    return DA_ERR(DA_ERR_INTERNAL, "kv cache map: ranks hold %lld tokens, the sequence has %lld (prefill %lld)",
                  (long long)sum, (long long)len, (long long)L0);
  if (!m->weighted) {
    if (mx - mn > m->page)
      return DA_ERR(DA_ERR_INTERNAL, "kv cache map: rank %d holds %lld tokens, rank %d %lld: more than one page (%lld) "
                    "apart (length %lld, prefill %lld)", rmx, (long long)mx, rmn, (long long)mn, (long long)m->page,
                    (long long)len, (long long)L0);
    return DA_SUCCESS;
  }
  const double bound = (double)m->page + 1.0 + 1e-9 * (double)len;
  for (int r = 0; r < P; r++) {
    double dev = (double)tokens[r] - m->share[r] * (double)len;
    if (fabs(dev) > bound)
      return DA_ERR(DA_ERR_INTERNAL, "kv cache map: rank %d holds %lld tokens, its quota is %.2f (share %.4f of %lld): "
                    "off by more than a page (%lld) plus one", r, (long long)tokens[r], m->share[r] * (double)len,
                    m->share[r], (long long)len, (long long)m->page);
  }
  return DA_SUCCESS;
}
