/* test_npy.c: Check suite of the .npy header parser and writer (core/npy.c). Valid headers are
 * written out by hand here, byte for byte as NumPy 1.x/2.x writes them (format 1.0, 2.0, 3.0), not
 * produced by the code under test; malformed ones each change one thing and expect the message
 * to name the field. Fork mode: a crash on a bad header is a failed test, not a dead suite. */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "npy.h"
#include "test_run.h"

/* A header of format major.0 around dict, padded to a 64-byte multiple as NumPy does. */
static size_t mk(unsigned char *b, int major, const char *dict) {
  const size_t pre = major == 1 ? 10 : 12, k = strlen(dict);
  const size_t total = (pre + k + 1 + 63) / 64 * 64, hl = total - pre;
  memcpy(b, "\x93NUMPY", 6);
  b[6] = (unsigned char)major, b[7] = 0;
  b[8] = hl & 0xff, b[9] = hl >> 8 & 0xff;
  if (pre == 12) b[10] = hl >> 16 & 0xff, b[11] = hl >> 24 & 0xff;
  memcpy(b + pre, dict, k);
  memset(b + pre + k, ' ', total - pre - k - 1);
  b[total - 1] = '\n';
  return total;
}

static int parse(const char *dict, int major, da_npy_header_t *h, char *err) {
  unsigned char b[4096];
  size_t n = mk(b, major, dict);
  return da_npy_parse(b, n, h, err, 256);
}

/* The dict must be refused with a message containing `want`. */
static void refused(const char *dict, const char *want) {
  da_npy_header_t h;
  char err[256] = "";
  ck_assert_msg(parse(dict, 1, &h, err) == -1, "accepted: %s", dict);
  ck_assert_msg(strstr(err, want) != NULL, "%s: message '%s' lacks '%s'", dict, err, want);
}

START_TEST(test_v1_numpy_bytes) {
  /* np.save(f, np.zeros((1001, 4, 64), np.float32)): exactly these 128 header bytes */
  da_npy_header_t h;
  char err[256];
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': False, 'shape': (1001, 4, 64), }", 1, &h, err), 0);
  ck_assert_int_eq(h.major, 1);
  ck_assert_int_eq(h.minor, 0);
  ck_assert_str_eq(h.descr, "<f4");
  ck_assert_int_eq(h.type, DA_NPY_F4);
  ck_assert_int_eq(h.big_endian, 0);
  ck_assert_int_eq(h.fortran_order, 0);
  ck_assert_int_eq(h.ndim, 3);
  ck_assert_int_eq(h.shape[0], 1001);
  ck_assert_int_eq(h.shape[1], 4);
  ck_assert_int_eq(h.shape[2], 64);
  ck_assert_int_eq(h.count, 1001 * 4 * 64);
  ck_assert_int_eq(h.item_size, 4);
  ck_assert_int_eq(h.data_offset, 128);
}
END_TEST

START_TEST(test_v2_v3_and_forms) {
  da_npy_header_t h;
  char err[256];
  /* 2.0: 32-bit length; double quotes, no trailing comma, other key order, extra blanks */
  ck_assert_int_eq(parse("{ \"shape\" : ( 2 , 3 , 5 , 7 ) ,\"descr\":\"<u2\",'fortran_order':False}", 2, &h, err), 0);
  ck_assert_int_eq(h.major, 2);
  ck_assert_int_eq(h.type, DA_NPY_U2);
  ck_assert_int_eq(h.ndim, 4);
  ck_assert_int_eq(h.count, 210);
  ck_assert_int_eq(h.data_offset, 128);
  ck_assert_int_eq(parse("{'descr': '<f2', 'fortran_order': False, 'shape': (9,), }", 3, &h, err), 0);
  ck_assert_int_eq(h.major, 3);
  ck_assert_int_eq(h.type, DA_NPY_F2);
  ck_assert_int_eq(h.item_size, 2);
  ck_assert_int_eq(h.ndim, 1);
  /* a scalar, Python 2 longs, an empty dimension */
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 1, &h, err), 0);
  ck_assert_int_eq(h.ndim, 0);
  ck_assert_int_eq(h.count, 1);
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 4L), }", 1, &h, err), 0);
  ck_assert_int_eq(h.shape[1], 4);
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }", 1, &h, err), 0);
  ck_assert_int_eq(h.count, 0);
}
END_TEST

START_TEST(test_parsed_but_unsupported) {
  /* accepted by the parser, reported to the caller to refuse: byte order, layout, type */
  da_npy_header_t h;
  char err[256];
  ck_assert_int_eq(parse("{'descr': '>f4', 'fortran_order': False, 'shape': (4, 2, 8), }", 1, &h, err), 0);
  ck_assert_int_eq(h.big_endian, 1);
  ck_assert_int_eq(h.type, DA_NPY_OTHER);
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': True, 'shape': (4, 2, 8), }", 1, &h, err), 0);
  ck_assert_int_eq(h.fortran_order, 1);
  ck_assert_int_eq(parse("{'descr': '<f8', 'fortran_order': False, 'shape': (4, 2, 8), }", 1, &h, err), 0);
  ck_assert_int_eq(h.type, DA_NPY_OTHER);
  ck_assert_int_eq(h.item_size, 8);
  ck_assert_int_eq(parse("{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }", 1, &h, err), 0);
  ck_assert_int_eq(h.big_endian, 0);
  ck_assert_int_eq(h.item_size, 1);
}
END_TEST

START_TEST(test_malformed_dicts) {
  refused("{'descr': '<f4', 'fortran_order': False, }", "missing key 'shape'");
  refused("{'fortran_order': False, 'shape': (1,), }", "missing key 'descr'");
  refused("{'descr': '<f4', 'shape': (1,), }", "missing key 'fortran_order'");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", "unexpected key 'x'");
  refused("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", "'descr' given twice");
  refused("{'descr': 4, 'fortran_order': False, 'shape': (1,)}", "'descr': expected a quoted string");
  refused("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}", "structured dtype");
  refused("{'descr': '<f4', 'fortran_order': yes, 'shape': (1,)}", "'fortran_order': expected True or False");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (3, -4)}", "'shape': dimension 1 is negative");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (5)}", "'shape': (5) is not a tuple");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': [5, 4]}", "'shape': expected a tuple");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (5 4)}", "'shape': expected ',' or ')'");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (5, x)}", "'shape': expected a non-negative integer");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}", "overflows int64");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296)}", "count overflows");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 1073741824, 4)}", "data size overflows");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,"
          "1,1,1,1,1,1,1)}", "more than 32 dimensions");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", "expected ',' or '}'");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x", "unexpected byte 0x78 after the dict");
  refused("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (1,)}", "unsupported character");
  refused("{'descr: '<f4', 'fortran_order': False, 'shape': (1,)}", "expected ':'");
  refused("{'descr' '<f4', 'fortran_order': False, 'shape': (1,)}", "'descr': expected ':'");
  refused("{'descr': '<f4' 'fortran_order': False, 'shape': (1,)}", "expected ',' or '}'");
  refused("('descr', '<f4')", "expected '{'");
  refused("", "expected '{'");
  refused("{'descr': '<f4, 'fortran_order': False, 'shape': (1,)}", "");
}
END_TEST

START_TEST(test_malformed_prefix) {
  unsigned char b[256];
  da_npy_header_t h;
  char err[256];
  int64_t total = 0;
  size_t n = mk(b, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }");
  /* bad magic */
  b[1] = 'n';
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "magic"));
  ck_assert_int_eq(da_npy_header_size(b, 3, &total, err, sizeof err), -1);
  b[1] = 'N';
  /* a short prefix needs more bytes; a short buffer is truncated */
  ck_assert_int_eq(da_npy_header_size(b, 4, &total, err, sizeof err), 1);
  ck_assert_int_eq(da_npy_header_size(b, 10, &total, err, sizeof err), 0);
  ck_assert_int_eq(total, 128);
  ck_assert_int_eq(da_npy_parse(b, 63, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "truncated"));
  ck_assert_int_eq(da_npy_parse(b, 7, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "truncated"));
  /* versions */
  b[6] = 4;
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "format 4.0"));
  b[6] = 1, b[7] = 1;
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "format 1.1"));
  b[6] = 0, b[7] = 0;
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  /* a 2.0 header claiming 4 GiB */
  n = mk(b, 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }");
  b[11] = 0xff;
  ck_assert_int_eq(da_npy_header_size(b, n, &total, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "header length"));
  /* 1.0 claiming more than the buffer holds */
  n = mk(b, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }");
  b[9] = 1;
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "truncated"));
  /* an embedded NUL inside the padding */
  n = mk(b, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }");
  b[n - 3] = 0;
  ck_assert_int_eq(da_npy_parse(b, n, &h, err, sizeof err), -1);
  ck_assert_ptr_nonnull(strstr(err, "0x00"));
}
END_TEST

START_TEST(test_write_roundtrip) {
  unsigned char b[4096];
  da_npy_header_t h;
  char err[256];
  const int64_t s4[4] = {2, 1001, 4, 64}, s1[1] = {7};
  int64_t n = da_npy_header_write(b, sizeof b, "<u2", 4, s4);
  ck_assert_int_eq(n % 64, 0);
  ck_assert_int_eq(b[6], 1);
  ck_assert_int_eq(b[n - 1], '\n');
  ck_assert_int_eq(da_npy_parse(b, (size_t)n, &h, err, sizeof err), 0);
  ck_assert_int_eq(h.data_offset, n);
  ck_assert_int_eq(h.type, DA_NPY_U2);
  ck_assert_int_eq(h.ndim, 4);
  for (int i = 0; i < 4; i++) ck_assert_int_eq(h.shape[i], s4[i]);
  /* NumPy's repr of a 1-tuple has the comma; this is the exact text np.save writes */
  n = da_npy_header_write(b, sizeof b, "<f4", 1, s1);
  ck_assert_int_eq(n, 128);
  ck_assert(!memcmp(b + 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (7,), }", 57));
  ck_assert_int_eq(da_npy_parse(b, (size_t)n, &h, err, sizeof err), 0);
  ck_assert_int_eq(h.shape[0], 7);
  ck_assert_int_eq(da_npy_header_write(b, 32, "<f4", 1, s1), -1);
  const int64_t neg[1] = {-1};
  ck_assert_int_eq(da_npy_header_write(b, sizeof b, "<f4", 1, neg), -1);
  char s[64];
  ck_assert_str_eq(da_npy_shape_str(3, s4 + 1, s, sizeof s), "[1001, 4, 64]");
}
END_TEST

/* Every single-byte change of a valid header either parses to something self-consistent or is
 * refused with a message; never a crash (fork mode) or an unterminated message. */
START_TEST(test_every_byte_mutated) {
  unsigned char b[256], m[256];
  const size_t n = mk(b, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1001, 4, 64), }");
  static const unsigned char vals[] = {0, 1, ' ', '\'', '"', '(', ')', ',', ':', '{', '}', '-', '9', 'L', 0x93, 0xff};
  for (size_t i = 0; i < n; i++)
    for (size_t v = 0; v < sizeof vals; v++) {
      memcpy(m, b, n);
      m[i] = vals[v];
      da_npy_header_t h;
      char err[128];
      memset(err, 'x', sizeof err);
      if (da_npy_parse(m, n, &h, err, sizeof err) == 0) {
        ck_assert(h.ndim >= 0 && h.ndim <= DA_NPY_MAX_NDIM);
        ck_assert(h.data_offset <= (int64_t)n);
      } else {
        ck_assert(memchr(err, '\0', sizeof err) != NULL && err[0] != '\0');
      }
    }
}
END_TEST

static Suite *npy_suite(void) {
  Suite *s = suite_create("npy");
  TCase *tc = tcase_create("header");
  tcase_add_test(tc, test_v1_numpy_bytes);
  tcase_add_test(tc, test_v2_v3_and_forms);
  tcase_add_test(tc, test_parsed_but_unsupported);
  tcase_add_test(tc, test_malformed_dicts);
  tcase_add_test(tc, test_malformed_prefix);
  tcase_add_test(tc, test_write_roundtrip);
  tcase_add_test(tc, test_every_byte_mutated);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  return tu_run(npy_suite());
}
