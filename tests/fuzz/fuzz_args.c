/* fuzz_args.c: libFuzzer target for the `distattn` option parser (launcher/args.c) and the size
 * parser under it (da_parse_size): the input is split at NUL and newline bytes into argv words
 * and parsed against a table with one option of every type. Whatever the words, the parser must
 * return OK, HELP or USAGE without a crash, a leak or undefined behaviour, and the values it
 * accepts must lie in their ranges. Built with DISTATTN_FUZZ=ON under clang (tests/fuzz.cmake). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "args.h"
#include "core.h"

static const char *const algos[] = {"ring", "striped", "zigzag", NULL};
static const char *const ops[] = {"fwd", "bwd", "decode", NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 4096) return 0;
  char *buf = malloc(size + 1);
  if (!buf) return 0;
  memcpy(buf, data, size);
  buf[size] = '\0';
  char *argv[258];
  int argc = 0;
  argv[argc++] = "fuzz";
  for (char *p = buf; p <= buf + size && argc < 257;) {
    char *e = p;
    while (e < buf + size && *e && *e != '\n') e++;
    *e = '\0';
    argv[argc++] = p;
    p = e + 1;
  }
  argv[argc] = NULL;

  int64_t seq = 4096, heads = 0, block = 0;
  double timeout = 0;
  const char *json = NULL;
  int flag = 0, algo = 2;
  unsigned set = 1;
  da_mask_spec_t mask = {0};
  da_opt_t opts[] = {
      {.name = "seq", .type = DA_OPT_SIZE, .dest = &seq, .min = 1, .max = (int64_t)1 << 40},
      {.name = "heads", .type = DA_OPT_INT, .dest = &heads, .min = 1, .max = 1024},
      {.name = "block", .type = DA_OPT_SIZE, .dest = &block},
      {.name = "timeout", .type = DA_OPT_DOUBLE, .dest = &timeout, .dmin = 0, .dmax = 1e6},
      {.name = "json", .type = DA_OPT_STRING, .dest = &json},
      {.name = "backward", .type = DA_OPT_FLAG, .dest = &flag},
      {.name = "algo", .type = DA_OPT_ENUM, .dest = &algo, .choices = algos},
      {.name = "ops", .type = DA_OPT_SET, .dest = &set, .choices = ops},
      {.name = "mask", .type = DA_OPT_MASK, .dest = &mask, .alias = "m"},
      {0},
  };
  da_cmdspec_t cmd = {.name = "fuzz", .summary = "fuzz target", .opts = opts};
  /* messages and usage go to stderr: run with -close_fd_mask=3 to keep the log readable */
  int rc = da_args_parse(&cmd, argc, argv);
  if (rc == DA_ARGS_OK) {
    if (seq < 1 || seq > ((int64_t)1 << 40) || (heads && (heads < 1 || heads > 1024)) || block < 0 ||
        !(timeout >= 0 && timeout <= 1e6) || algo < 0 || algo > 2 || set > 7)
      abort(); /* a value outside its declared range was accepted */
    char text[256];
    for (da_opt_t *o = opts; o->name; o++) da_args_format(o, text, sizeof text);
    if (mask.mask.flags & DA_MASK_DOC) da_mask_check(&mask.mask, mask.mask.cu_seqlens[mask.mask.ndocs]);
  } else if (rc != DA_ARGS_HELP && rc != DA_ARGS_USAGE) {
    abort();
  }
  /* the size parser on every word alone */
  for (int i = 1; i < argc; i++) {
    int64_t v;
    if (da_parse_size(argv[i], &v) == 0 && v < 0) abort();
  }
  da_mask_spec_free(&mask);
  free(buf);
  return 0;
}
