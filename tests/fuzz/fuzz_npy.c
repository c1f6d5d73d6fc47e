/* fuzz_npy.c: libFuzzer target for the .npy header parser (core/npy.c): da_npy_header_size and
 * da_npy_parse on arbitrary bytes, then the writer on what was accepted, and the writer's header
 * parsed back to the same shape and type. Any input: no crash, no leak, no undefined behaviour,
 * a refusal always carries a message. Built with DISTATTN_FUZZ=ON under clang. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[256];
  int64_t total = 0;
  memset(err, 0, sizeof err);
  int rc = da_npy_header_size(data, size, &total, err, sizeof err);
  if (rc < 0 && !err[0]) abort();
  if (rc == 0 && (total < 10 || total > DA_NPY_MAX_HEADER)) abort();
  da_npy_header_t h;
  err[0] = '\0';
  if (da_npy_parse(data, size, &h, err, sizeof err) != 0) {
    if (!err[0] || !memchr(err, '\0', sizeof err)) abort(); /* a refusal must come with a message */
    return 0;
  }
  if (rc != 0 || h.data_offset != total || (size_t)h.data_offset > size) abort();
  if (h.ndim < 0 || h.ndim > DA_NPY_MAX_NDIM || h.count < 0) abort();
  int64_t c = 1;
  for (int i = 0; i < h.ndim; i++) {
    if (h.shape[i] < 0) abort();
    c *= h.shape[i]; /* cannot overflow: the parser checked the product */
  }
  if (c != h.count) abort();
  char s[DA_NPY_MAX_NDIM * 24];
  da_npy_shape_str(h.ndim, h.shape, s, sizeof s);
  /* write what was read (descr as given) and read it back */
  unsigned char *b = malloc(4096);
  if (!b) return 0;
  int64_t n = da_npy_header_write(b, 4096, h.descr, h.ndim, h.shape);
  if (n > 0) {
    da_npy_header_t g;
    if (n % 64 || da_npy_parse(b, (size_t)n, &g, err, sizeof err) != 0) abort();
    if (g.ndim != h.ndim || g.count != h.count || g.type != h.type || g.fortran_order) abort();
    for (int i = 0; i < h.ndim; i++)
      if (g.shape[i] != h.shape[i]) abort();
  }
  free(b);
  return 0;
}
