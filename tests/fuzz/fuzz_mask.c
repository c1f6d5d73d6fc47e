/* fuzz_mask.c: libFuzzer target for the --mask spec parser (da_mask_parse, launcher/args.c) and
 * the mask functions that consume what it accepts (core/mask.c): check against the documents'
 * total length, describe, count allowed pairs and classify tiles on a small grid, and compare
 * da_mask_allows with the row ranges. Any input: no crash, no leak, no undefined behaviour, and
 * the parsed mask agrees with itself. Built with DISTATTN_FUZZ=ON under clang. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "args.h"
#include "core.h"
#include "mask.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 8192) return 0;
  char *spec = malloc(size + 1);
  if (!spec) return 0;
  memcpy(spec, data, size);
  spec[size] = '\0';
  da_mask_spec_t m = {0};
  char err[256];
  if (da_mask_parse(spec, &m, err, sizeof err) == 0) {
    char text[512];
    da_mask_describe(&m.mask, text, sizeof text);
    const int64_t seq = (m.mask.flags & DA_MASK_DOC) ? m.mask.cu_seqlens[m.mask.ndocs] : 64;
    if (da_mask_check(&m.mask, seq) == DA_SUCCESS && seq <= 4096) {
      /* the pair count over the whole square equals the sum of da_mask_allows */
      const int64_t n = seq < 48 ? seq : 48;
      int64_t count = 0;
      for (int64_t q = 0; q < n; q++) {
        int64_t lo, hi;
        da_mask_row_range(&m.mask, q, 0, n - 1, &lo, &hi);
        for (int64_t k = 0; k < n; k++) {
          int a = da_mask_allows(&m.mask, q, k);
          count += a;
          if (a && (k < lo || k > hi)) abort(); /* an allowed key outside the row's range */
        }
      }
      if (da_mask_count_pairs(&m.mask, da_span(0, 1, n), da_span(0, 1, n)) != count) abort();
      da_mask_classify(&m.mask, 0, n - 1, 0, n - 1);
    }
  } else if (!memchr(err, '\0', sizeof err) || !err[0]) {
    abort(); /* a refusal must come with a message */
  }
  da_mask_spec_free(&m);
  free(spec);
  return 0;
}
