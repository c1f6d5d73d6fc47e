/* layout.c: token layouts (contiguous, striped, zigzag, weighted): which global positions each
 * rank owns, the inverse map, and the layout invariant checker. Pure arithmetic on (S, P):
 * no MPI, no tensors; the ring schedule built on top of it lives in schedule.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "partition.h"

/* Above this length da_layout_check verifies ownership by arithmetic only (plus boundary
 * samples) instead of marking every position: the exhaustive pass costs S bytes and O(S log P). */
#define DA_LAYOUT_EXHAUSTIVE_MAX ((int64_t)1 << 20)

static int64_t i64min(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t i64max(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- zigzag chunks ----------------------------------------------------------------------------
 * 2P chunks of S/(2P) tokens; the rem = S mod 2P extra tokens go one per chunk, first to the
 * low chunks 0..min(rem,P)-1 (the first chunk of ranks 0, 1, ...), then to the high chunks
 * 2P-e2..2P-1 (the second chunk of ranks 0, 1, ...). Chunk sizes still differ by at most one and
 * stay in position order, but ranks now differ by at most one token in total instead of two
 * (giving extras to chunks 0..rem-1 would hand rank 0 both extras before rank P-1 got any). */
typedef struct {
  int64_t q, e1, e2, nch; /* base chunk size, extras in the low and high halves, 2P */
} zz_t;

static zz_t zz_of(int64_t S, int P) {
  zz_t z;
  z.nch = 2 * (int64_t)P;
  z.q = S / z.nch;
  int64_t rem = S % z.nch;
  z.e1 = i64min(rem, P);
  z.e2 = rem - z.e1;
  return z;
}
static int64_t zz_start(zz_t z, int64_t c) {
  return c * z.q + i64min(c, z.e1) + i64max(0, c - (z.nch - z.e2));
}
static int64_t zz_len(zz_t z, int64_t c) { return zz_start(z, c + 1) - zz_start(z, c); }

/* Largest index i in [0, n) with a[i] <= pos, given a nondecreasing and a[0] <= pos. Ranks or
 * chunks with no tokens share their start with the next one, so "largest" lands on the one that
 * actually holds pos. */
static int64_t upper_index(const int64_t *a, int64_t n, int64_t pos) {
  int64_t lo = 0, hi = n; /* a[lo] <= pos, answer in [lo, hi) */
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* ---- names ------------------------------------------------------------------------------------ */
const char *da_layout_name(da_layout_kind_t kind) {
  switch (kind) {
    case DA_LAYOUT_CONTIGUOUS: return "contiguous";
    case DA_LAYOUT_STRIPED: return "striped";
    case DA_LAYOUT_ZIGZAG: return "zigzag";
    case DA_LAYOUT_WEIGHTED: return "weighted";
  }
  return "unknown";
}

int da_layout_parse(const char *s) {
  if (!s) return -1;
  if (!strcmp(s, "ring") || !strcmp(s, "contiguous")) return DA_LAYOUT_CONTIGUOUS;
  if (!strcmp(s, "striped")) return DA_LAYOUT_STRIPED;
  if (!strcmp(s, "zigzag")) return DA_LAYOUT_ZIGZAG;
  if (!strcmp(s, "weighted")) return DA_LAYOUT_WEIGHTED;
  return -1;
}

/* ---- init / free ------------------------------------------------------------------------------ */

/* Largest-remainder (Hamilton) apportionment of S tokens over P ranks by weight: every rank gets
 * floor or ceil of its exact quota S*w/sum(w), and the sum is exactly S. Ties go to the lower
 * rank so every process computes the same layout. long double keeps the quotas exact enough for
 * S up to 2^40 and weights spanning many orders of magnitude. */
typedef struct { long double frac; int r; } rem_t;
static int rem_cmp(const void *a, const void *b) {
  const rem_t *x = a, *y = b;
  if (x->frac != y->frac) return x->frac > y->frac ? -1 : 1;
  return x->r - y->r;
}

static da_status_t weighted_counts(int64_t S, int P, const double *w, int64_t *counts) {
  long double W = 0;
  for (int r = 0; r < P; r++) W += w[r];
  if (!isfinite((double)W) || W <= 0)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: weights sum to %Lg (must be finite, > 0)", W);
  rem_t *rm = malloc(sizeof *rm * (size_t)P);
  if (!rm) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "layout: %d remainders", P);
  int64_t sum = 0;
  for (int r = 0; r < P; r++) {
    long double quota = (long double)S * ((long double)w[r] / W);
    long double fl = floorl(quota);
    if (fl > (long double)S) fl = (long double)S;
    counts[r] = (int64_t)fl;
    rm[r].frac = quota - fl;
    rm[r].r = r;
    sum += counts[r];
  }
  qsort(rm, (size_t)P, sizeof *rm, rem_cmp);
  /* Normally 0 <= S - sum < P; the loops also absorb any rounding excess either way. */
  for (int64_t i = 0; sum < S; i = (i + 1) % P, sum++) counts[rm[i].r]++;
  for (int64_t i = P - 1; sum > S; i = (i + P - 1) % P)
    if (counts[rm[i].r] > 0) counts[rm[i].r]--, sum--;
  free(rm);
  return DA_SUCCESS;
}

da_status_t da_layout_init(da_layout_t *L, da_layout_kind_t kind, int64_t seq, int nranks,
                           const double *weights) {
  if (!L) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: NULL layout");
  memset(L, 0, sizeof *L);
  if ((int)kind < DA_LAYOUT_CONTIGUOUS || (int)kind > DA_LAYOUT_WEIGHTED)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: unknown kind %d", (int)kind);
  if (seq < 1)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: seq %lld must be >= 1", (long long)seq);
  if (nranks < 1) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: nranks %d must be >= 1", nranks);
  if (kind == DA_LAYOUT_WEIGHTED) {
    if (!weights) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout: weighted layout needs weights");
    for (int r = 0; r < nranks; r++)
      if (!(weights[r] > 0) || !isfinite(weights[r]))
        return DA_ERR(DA_ERR_INVALID_ARGUMENT,
                      "layout: weight of rank %d is %g (must be positive and finite)", r, weights[r]);
  }

  da_status_t st = DA_SUCCESS;
  size_t n = (size_t)nranks;
  int64_t *counts = da_malloc(n * sizeof *counts, 64);
  int64_t *starts = da_malloc(n * sizeof *starts, 64);
  double *w = NULL;
  if (!counts || !starts) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "layout: counts for %d ranks", nranks);
    goto fail_alloc;
  }
  const int64_t P = nranks, base = seq / P, rem = seq % P;
  switch (kind) {
    case DA_LAYOUT_CONTIGUOUS:
      /* The first S mod P ranks hold one extra token: shards differ by at most one. */
      for (int64_t r = 0, at = 0; r < P; r++) {
        counts[r] = base + (r < rem);
        starts[r] = at;
        at += counts[r];
      }
      break;
    case DA_LAYOUT_STRIPED:
      /* Positions r, r+P, ...: rank r has ceil((S - r) / P) of them. */
      for (int64_t r = 0; r < P; r++) {
        counts[r] = base + (r < rem);
        starts[r] = r; /* first position when it owns any */
      }
      break;
    case DA_LAYOUT_ZIGZAG: {
      zz_t z = zz_of(seq, nranks);
      for (int64_t r = 0; r < P; r++) {
        counts[r] = zz_len(z, r) + zz_len(z, z.nch - 1 - r);
        starts[r] = zz_start(z, r);
      }
      break;
    }
    case DA_LAYOUT_WEIGHTED:
      w = da_malloc(n * sizeof *w, 64);
      if (!w) {
        st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "layout: weights for %d ranks", nranks);
        goto fail_alloc;
      }
      memcpy(w, weights, n * sizeof *w);
      DA_CHECK_GOTO(weighted_counts(seq, nranks, w, counts), st, fail_alloc);
      for (int64_t r = 0, at = 0; r < P; r++) {
        starts[r] = at;
        at += counts[r];
      }
      break;
  }
  L->kind = kind;
  L->seq = seq;
  L->nranks = nranks;
  L->weights = w;
  L->counts = counts;
  L->starts = starts;
  return DA_SUCCESS;

fail_alloc:
  da_free(w);
  da_free(starts);
  da_free(counts);
  return st;
}

void da_layout_free(da_layout_t *L) {
  if (!L) return;
  /* weights is the private copy made by init (NULL for the other kinds). */
  da_free((void *)(uintptr_t)L->weights);
  da_free(L->counts);
  da_free(L->starts);
  memset(L, 0, sizeof *L);
}

/* ---- queries ---------------------------------------------------------------------------------- */
int da_layout_segments(const da_layout_t *L, int r, da_span_t segs[DA_LAYOUT_MAX_SEGS]) {
  if (!L || !L->counts || r < 0 || r >= L->nranks || L->counts[r] == 0) return 0;
  switch (L->kind) {
    case DA_LAYOUT_CONTIGUOUS:
    case DA_LAYOUT_WEIGHTED:
      segs[0] = da_span(L->starts[r], 1, L->counts[r]);
      return 1;
    case DA_LAYOUT_STRIPED:
      segs[0] = da_span(r, L->nranks, L->counts[r]);
      return 1;
    case DA_LAYOUT_ZIGZAG: {
      /* Empty chunks (S < 2P) are left out, so every returned segment holds tokens. */
      zz_t z = zz_of(L->seq, L->nranks);
      int ns = 0;
      int64_t c[2] = {r, z.nch - 1 - r};
      for (int i = 0; i < 2; i++) {
        int64_t len = zz_len(z, c[i]);
        if (len > 0) segs[ns++] = da_span(zz_start(z, c[i]), 1, len);
      }
      return ns;
    }
  }
  return 0;
}

int64_t da_layout_count(const da_layout_t *L, int r) {
  if (!L || !L->counts || r < 0 || r >= L->nranks) return 0;
  return L->counts[r];
}

int64_t da_layout_max_count(const da_layout_t *L) {
  int64_t mx = 0;
  if (!L || !L->counts) return 0;
  for (int r = 0; r < L->nranks; r++) mx = i64max(mx, L->counts[r]);
  return mx;
}

int da_layout_owner(const da_layout_t *L, int64_t pos, int64_t *local_row) {
  if (local_row) *local_row = -1;
  if (!L || !L->counts || pos < 0 || pos >= L->seq) return -1;
  const int64_t P = L->nranks;
  int64_t r = 0, row = 0;
  switch (L->kind) {
    case DA_LAYOUT_CONTIGUOUS: {
      /* Closed form: the first rem ranks hold base+1 tokens, the rest base. */
      int64_t base = L->seq / P, rem = L->seq % P, big = rem * (base + 1);
      if (pos < big) r = pos / (base + 1), row = pos % (base + 1);
      else r = rem + (pos - big) / base, row = (pos - big) % base; /* base > 0 here */
      break;
    }
    case DA_LAYOUT_WEIGHTED:
      r = upper_index(L->starts, P, pos);
      row = pos - L->starts[r];
      break;
    case DA_LAYOUT_STRIPED:
      r = pos % P;
      row = pos / P;
      break;
    case DA_LAYOUT_ZIGZAG: {
      zz_t z = zz_of(L->seq, L->nranks);
      int64_t lo = 0, hi = z.nch; /* largest chunk c with zz_start(c) <= pos */
      while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (zz_start(z, mid) <= pos) lo = mid;
        else hi = mid;
      }
      if (lo < P) r = lo, row = pos - zz_start(z, lo);
      else r = z.nch - 1 - lo, row = zz_len(z, r) + pos - zz_start(z, lo);
      break;
    }
  }
  if (local_row) *local_row = row;
  return (int)r;
}

/* Global position of local row `row` of rank r (the forward map da_layout_owner inverts); -1 when
 * out of range. */
static int64_t layout_position(const da_layout_t *L, int r, int64_t row) {
  da_span_t segs[DA_LAYOUT_MAX_SEGS];
  int ns = da_layout_segments(L, r, segs);
  for (int i = 0; i < ns; i++) {
    if (row >= 0 && row < segs[i].count) return da_span_at(segs[i], row);
    row -= segs[i].count;
  }
  return -1;
}

/* ---- checker ---------------------------------------------------------------------------------- */
typedef struct { int64_t start, count; } run_t;
static int run_cmp(const void *a, const void *b) {
  const run_t *x = a, *y = b;
  return (x->start > y->start) - (x->start < y->start);
}

/* Ownership by arithmetic: stride-1 segments must tile [0, S) when sorted; stride-P segments must
 * be distinct residue classes, each complete. Costs O(P log P) whatever S is. */
static da_status_t check_cover_arith(const da_layout_t *L) {
  const int64_t S = L->seq, P = L->nranks;
  da_status_t st = DA_SUCCESS;
  run_t *runs = malloc(sizeof *runs * (size_t)(P * DA_LAYOUT_MAX_SEGS));
  unsigned char *resid = calloc((size_t)P, 1);
  if (!runs || !resid) {
    st = DA_ERR(DA_ERR_OUT_OF_MEMORY, "layout check: %lld runs", (long long)P);
    goto done;
  }
  int64_t nrun = 0, nstrided = 0;
  for (int r = 0; r < P; r++) {
    da_span_t segs[DA_LAYOUT_MAX_SEGS];
    int ns = da_layout_segments(L, r, segs);
    for (int i = 0; i < ns; i++) {
      if (segs[i].stride == 1) {
        runs[nrun].start = segs[i].start;
        runs[nrun++].count = segs[i].count;
      } else if (segs[i].stride == P && segs[i].start < P) {
        int64_t c = segs[i].start;
        if (resid[c]) {
          st = DA_ERR(DA_ERR_INTERNAL, "layout check: residue %lld mod %lld owned twice",
                      (long long)c, (long long)P);
          goto done;
        }
        resid[c] = 1;
        nstrided += segs[i].count;
        if (segs[i].count != (S - c + P - 1) / P) {
          st = DA_ERR(DA_ERR_INTERNAL, "layout check: rank %d owns %lld of the %lld positions "
                      "= %lld mod %lld", r, (long long)segs[i].count,
                      (long long)((S - c + P - 1) / P), (long long)c, (long long)P);
          goto done;
        }
      } else {
        st = DA_ERR(DA_ERR_INTERNAL, "layout check: rank %d segment %d (start %lld stride %lld) "
                    "has no arithmetic check", r, i, (long long)segs[i].start,
                    (long long)segs[i].stride);
        goto done;
      }
    }
  }
  if (nrun && nstrided) {
    st = DA_ERR(DA_ERR_INTERNAL, "layout check: mixed stride-1 and strided segments");
    goto done;
  }
  if (nstrided) {
    if (nstrided != S) st = DA_ERR(DA_ERR_INTERNAL, "layout check: residues cover %lld of %lld",
                                   (long long)nstrided, (long long)S);
    goto done;
  }
  qsort(runs, (size_t)nrun, sizeof *runs, run_cmp);
  int64_t at = 0;
  for (int64_t i = 0; i < nrun; i++) {
    if (runs[i].start != at) {
      st = DA_ERR(DA_ERR_INTERNAL, "layout check: position %lld %s", (long long)i64min(at, runs[i].start),
                  runs[i].start > at ? "owned by no rank" : "owned twice");
      goto done;
    }
    at += runs[i].count;
  }
  if (at != S)
    st = DA_ERR(DA_ERR_INTERNAL, "layout check: runs cover [0, %lld), seq is %lld", (long long)at,
                (long long)S);
done:
  free(resid);
  free(runs);
  return st;
}

/* Owner/local-row round trip of one position. */
static da_status_t check_round_trip(const da_layout_t *L, int64_t pos) {
  int64_t row;
  int r = da_layout_owner(L, pos, &row);
  if (r < 0 || r >= L->nranks || row < 0 || row >= L->counts[r] || layout_position(L, r, row) != pos)
    return DA_ERR(DA_ERR_INTERNAL, "layout check: owner(%lld) = rank %d row %lld does not map back",
                  (long long)pos, r, (long long)row);
  return DA_SUCCESS;
}

da_status_t da_layout_check(const da_layout_t *L) {
  if (!L || !L->counts || !L->starts)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout check: layout not initialized");
  const int64_t S = L->seq, P = L->nranks;
  if (S < 1 || P < 1)
    return DA_ERR(DA_ERR_INTERNAL, "layout check: seq %lld, nranks %lld", (long long)S, (long long)P);

  /* Counts: segments agree with counts[], segments are increasing and inside [0, S). */
  int64_t total = 0, mx = 0, mn = INT64_MAX;
  for (int r = 0; r < P; r++) {
    da_span_t segs[DA_LAYOUT_MAX_SEGS];
    int ns = da_layout_segments(L, r, segs);
    int64_t sum = 0;
    for (int i = 0; i < ns; i++) {
      da_span_t g = segs[i];
      if (g.count < 1 || g.stride < 1 || g.start < 0 || da_span_last(g) >= S ||
          (i > 0 && g.start <= da_span_last(segs[i - 1])))
        return DA_ERR(DA_ERR_INTERNAL, "layout check: rank %d segment %d (start %lld stride %lld "
                      "count %lld) is empty, outside [0, %lld) or out of order", r, i,
                      (long long)g.start, (long long)g.stride, (long long)g.count, (long long)S);
      sum += g.count;
    }
    if (sum != L->counts[r] || da_layout_count(L, r) != sum)
      return DA_ERR(DA_ERR_INTERNAL, "layout check: rank %d segments hold %lld tokens, count says %lld",
                    r, (long long)sum, (long long)L->counts[r]);
    total += sum;
    mx = i64max(mx, sum);
    mn = i64min(mn, sum);
  }
  if (total != S)
    return DA_ERR(DA_ERR_INTERNAL, "layout check: ranks hold %lld tokens, seq is %lld",
                  (long long)total, (long long)S);
  if (mx != da_layout_max_count(L))
    return DA_ERR(DA_ERR_INTERNAL, "layout check: max count %lld, da_layout_max_count says %lld",
                  (long long)mx, (long long)da_layout_max_count(L));

  /* Ownership: arithmetic always; exhaustive marking and round trips when S is small; the
   * round trip on every segment boundary always (where off-by-ones live). */
  DA_CHECK(check_cover_arith(L));
  if (S <= DA_LAYOUT_EXHAUSTIVE_MAX) {
    unsigned char *seen = calloc((size_t)S, 1);
    if (!seen) return DA_ERR(DA_ERR_OUT_OF_MEMORY, "layout check: %lld bytes", (long long)S);
    da_status_t st = DA_SUCCESS;
    for (int r = 0; r < P && st == DA_SUCCESS; r++) {
      da_span_t segs[DA_LAYOUT_MAX_SEGS];
      int ns = da_layout_segments(L, r, segs);
      for (int i = 0; i < ns && st == DA_SUCCESS; i++)
        for (int64_t j = 0; j < segs[i].count; j++) {
          int64_t pos = da_span_at(segs[i], j);
          if (seen[pos]++) {
            st = DA_ERR(DA_ERR_INTERNAL, "layout check: position %lld owned twice (rank %d)",
                        (long long)pos, r);
            break;
          }
        }
    }
    for (int64_t pos = 0; pos < S && st == DA_SUCCESS; pos++) {
      if (!seen[pos]) st = DA_ERR(DA_ERR_INTERNAL, "layout check: position %lld owned by no rank",
                                  (long long)pos);
      else st = check_round_trip(L, pos);
    }
    free(seen);
    DA_CHECK(st);
  } else {
    for (int r = 0; r < P; r++) {
      da_span_t segs[DA_LAYOUT_MAX_SEGS];
      int ns = da_layout_segments(L, r, segs);
      for (int i = 0; i < ns; i++) {
        DA_CHECK(check_round_trip(L, segs[i].start));
        DA_CHECK(check_round_trip(L, da_span_last(segs[i])));
        DA_CHECK(check_round_trip(L, da_span_at(segs[i], segs[i].count / 2)));
      }
    }
  }

  /* Balance: the three balanced kinds promise shards within one token of each other (zigzag's
   * extras are spread so that a rank never gets a second one before every rank has one);
   * weighted promises floor or ceil of each rank's exact quota. */
  if (L->kind == DA_LAYOUT_WEIGHTED) {
    if (!L->weights) return DA_ERR(DA_ERR_INVALID_ARGUMENT, "layout check: weighted, no weights");
    long double W = 0;
    for (int r = 0; r < P; r++) W += L->weights[r];
    for (int r = 0; r < P; r++) {
      long double quota = (long double)S * ((long double)L->weights[r] / W);
      if (fabsl((long double)L->counts[r] - quota) >= 1.0L + 1e-9L * (long double)S)
        return DA_ERR(DA_ERR_INTERNAL, "layout check: rank %d holds %lld tokens, quota %.3Lf", r,
                      (long long)L->counts[r], quota);
    }
  } else if (mx - mn > 1) {
    return DA_ERR(DA_ERR_INTERNAL, "layout check: %s shards range from %lld to %lld tokens",
                  da_layout_name(L->kind), (long long)mn, (long long)mx);
  }
  if (L->kind == DA_LAYOUT_ZIGZAG) {
    zz_t z = zz_of(S, L->nranks);
    for (int64_t c = 0; c < z.nch; c++)
      if (zz_len(z, c) != z.q && zz_len(z, c) != z.q + 1)
        return DA_ERR(DA_ERR_INTERNAL, "layout check: zigzag chunk %lld has %lld tokens (base %lld)",
                      (long long)c, (long long)zz_len(z, c), (long long)z.q);
  }
  return DA_SUCCESS;
}
