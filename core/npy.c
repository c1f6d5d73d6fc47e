/* npy.c: the .npy header parser and writer (see npy.h). A small recursive-descent reader of the
 * one Python literal NumPy writes, strict about everything it does not need: any byte outside
 * the grammar is an error naming its offset, so a corrupt file is refused here rather than
 * producing a wrong shape later. Pure: no I/O, no allocation, no globals. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "npy.h"

static const unsigned char npy_magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

static int fail(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t n, const char *fmt, ...) {
  if (err && n) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
  }
  return -1;
}

int da_npy_header_size(const void *buf, size_t len, int64_t *total, char *err, size_t errlen) {
  const unsigned char *b = buf;
  size_t m = len < 6 ? len : 6;
  if (memcmp(b, npy_magic, m)) return fail(err, errlen, "magic: not a .npy file (no \\x93NUMPY at the start)");
  if (len < 10) return 1;
  if (b[6] < 1 || b[6] > 3 || b[7] != 0)
    return fail(err, errlen, "version: format %u.%u is not 1.0, 2.0 or 3.0", b[6], b[7]);
  int64_t hl;
  if (b[6] == 1) {
    hl = 10 + ((int64_t)b[8] | (int64_t)b[9] << 8);
  } else {
    if (len < 12) return 1;
    hl = 12 + ((int64_t)b[8] | (int64_t)b[9] << 8 | (int64_t)b[10] << 16 | (int64_t)b[11] << 24);
  }
  if (hl > DA_NPY_MAX_HEADER)
    return fail(err, errlen, "header length: %lld bytes is over the %d this reader accepts", (long long)hl,
                DA_NPY_MAX_HEADER);
  *total = hl;
  return 0;
}

/* ---- the dict literal ---- */

typedef struct cursor {
  const char *p, *end, *start;
  char *err;
  size_t errlen;
} cursor_t;

static void skip_ws(cursor_t *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static long off(const cursor_t *c) { return (long)(c->p - c->start); }

/* A quoted string without escapes into out (cut at n - 1 bytes). */
static int parse_string(cursor_t *c, char *out, size_t n, const char *what) {
  if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
    return fail(c->err, c->errlen, "%s: expected a quoted string at header byte %ld", what, off(c));
  const char q = *c->p++;
  size_t k = 0;
  while (c->p < c->end && *c->p != q) {
    if (*c->p == '\\' || *c->p == '\n' || *c->p == '\0')
      return fail(c->err, c->errlen, "%s: unsupported character in a string at header byte %ld", what, off(c));
    if (k + 1 < n) out[k++] = *c->p;
    c->p++;
  }
  if (c->p >= c->end) return fail(c->err, c->errlen, "%s: unterminated string", what);
  c->p++;
  out[k] = '\0';
  return 0;
}

static int parse_bool(cursor_t *c, int *v) {
  if (c->end - c->p >= 4 && !memcmp(c->p, "True", 4)) *v = 1, c->p += 4;
  else if (c->end - c->p >= 5 && !memcmp(c->p, "False", 5)) *v = 0, c->p += 5;
  else return fail(c->err, c->errlen, "'fortran_order': expected True or False at header byte %ld", off(c));
  return 0;
}

/* A shape tuple: (), (n,), (a, b, ...) with an optional trailing comma; Python 2's 'L' suffix
 * is accepted as NumPy does. */
static int parse_shape(cursor_t *c, da_npy_header_t *h) {
  if (c->p >= c->end || *c->p != '(')
    return fail(c->err, c->errlen, "'shape': expected a tuple '(' at header byte %ld", off(c));
  c->p++;
  int nd = 0, comma = 0;
  for (;;) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ')') {
      c->p++;
      break;
    }
    if (nd > 0 && !comma) return fail(c->err, c->errlen, "'shape': expected ',' or ')' at header byte %ld", off(c));
    if (c->p < c->end && *c->p == '-') return fail(c->err, c->errlen, "'shape': dimension %d is negative", nd);
    if (c->p >= c->end || *c->p < '0' || *c->p > '9')
      return fail(c->err, c->errlen, "'shape': expected a non-negative integer at header byte %ld", off(c));
    int64_t v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
      if (v > (INT64_MAX - 9) / 10) return fail(c->err, c->errlen, "'shape': dimension %d overflows int64", nd);
      v = v * 10 + (*c->p++ - '0');
    }
    if (c->p < c->end && *c->p == 'L') c->p++;
    if (nd == DA_NPY_MAX_NDIM) return fail(c->err, c->errlen, "'shape': more than %d dimensions", DA_NPY_MAX_NDIM);
    h->shape[nd++] = v;
    skip_ws(c);
    comma = c->p < c->end && *c->p == ',';
    if (comma) c->p++;
  }
  if (nd == 1 && !comma) return fail(c->err, c->errlen, "'shape': (%lld) is not a tuple (write (%lld,))",
                                     (long long)h->shape[0], (long long)h->shape[0]);
  h->ndim = nd;
  return 0;
}

/* descr: an optional byte-order mark, a kind letter and an item size ("<f4", "|u1", ">i8"). */
static void classify(da_npy_header_t *h) {
  const char *d = h->descr;
  h->type = DA_NPY_OTHER;
  h->item_size = 0;
  h->big_endian = 0;
  const char *k = d;
  if (*k == '<' || *k == '>' || *k == '|' || *k == '=' || *k == '!') k++;
  if (*k >= 'A' && *k <= 'z') {
    int64_t sz = 0;
    const char *s = k + 1;
    while (*s >= '0' && *s <= '9' && sz < 1000000) sz = sz * 10 + (*s++ - '0');
    if (!*s) h->item_size = sz;
  }
  h->big_endian = (d[0] == '>' || d[0] == '!') && h->item_size > 1;
  if (!strcmp(d, "<f4")) h->type = DA_NPY_F4;
  else if (!strcmp(d, "<f2")) h->type = DA_NPY_F2;
  else if (!strcmp(d, "<u2")) h->type = DA_NPY_U2;
}

int da_npy_parse(const void *buf, size_t len, da_npy_header_t *out, char *err, size_t errlen) {
  int64_t total = 0;
  int rc = da_npy_header_size(buf, len, &total, err, errlen);
  if (rc > 0 || (rc == 0 && (size_t)total > len))
    return fail(err, errlen, "header: truncated (%zu bytes, the header needs %lld)", len, (long long)(rc ? 12 : total));
  if (rc < 0) return -1;
  const unsigned char *b = buf;
  const int64_t pre = b[6] == 1 ? 10 : 12;
  da_npy_header_t h;
  memset(&h, 0, sizeof h);
  h.major = b[6], h.minor = b[7], h.data_offset = total;
  cursor_t c = {.p = (const char *)b + pre, .end = (const char *)b + total, .start = (const char *)b + pre,
                .err = err, .errlen = errlen};
  skip_ws(&c);
  if (c.p >= c.end || *c.p != '{') return fail(err, errlen, "header: expected '{' at header byte %ld", off(&c));
  c.p++;
  int seen[3] = {0, 0, 0}, comma = 1;
  for (;;) {
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') {
      c.p++;
      break;
    }
    if (!comma) return fail(err, errlen, "header: expected ',' or '}' at header byte %ld", off(&c));
    char key[32];
    if (parse_string(&c, key, sizeof key, "header key")) return -1;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != ':') return fail(err, errlen, "'%s': expected ':' at header byte %ld", key, off(&c));
    c.p++;
    skip_ws(&c);
    int which = !strcmp(key, "descr") ? 0 : !strcmp(key, "fortran_order") ? 1 : !strcmp(key, "shape") ? 2 : -1;
    if (which < 0) return fail(err, errlen, "header: unexpected key '%s' (a .npy header has descr, fortran_order, shape)", key);
    if (seen[which]++) return fail(err, errlen, "header: key '%s' given twice", key);
    if (which == 0) {
      if (c.p < c.end && *c.p == '[')
        return fail(err, errlen, "'descr': a structured dtype (a list of fields) is not supported");
      if (parse_string(&c, h.descr, sizeof h.descr, "'descr'")) return -1;
    } else if (which == 1) {
      if (parse_bool(&c, &h.fortran_order)) return -1;
    } else if (parse_shape(&c, &h)) {
      return -1;
    }
    skip_ws(&c);
    comma = c.p < c.end && *c.p == ',';
    if (comma) c.p++;
  }
  skip_ws(&c);
  if (c.p != c.end) return fail(err, errlen, "header: unexpected byte 0x%02x after the dict at header byte %ld",
                                (unsigned char)*c.p, off(&c));
  static const char *const names[3] = {"descr", "fortran_order", "shape"};
  for (int i = 0; i < 3; i++)
    if (!seen[i]) return fail(err, errlen, "header: missing key '%s'", names[i]);
  classify(&h);
  h.count = 1;
  for (int i = 0; i < h.ndim; i++)
    if (__builtin_mul_overflow(h.count, h.shape[i], &h.count)) return fail(err, errlen, "'shape': element count overflows int64");
  int64_t bytes;
  if (__builtin_mul_overflow(h.count, h.item_size, &bytes) || __builtin_add_overflow(bytes, total, &bytes))
    return fail(err, errlen, "'shape': the data size overflows int64");
  *out = h;
  return 0;
}

const char *da_npy_shape_str(int ndim, const int64_t *shape, char *out, size_t n) {
  size_t k = 0;
  if (n == 0) return out;
  out[0] = '\0';
  k += (size_t)snprintf(out, n, "[");
  for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(out + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
  if (k < n) snprintf(out + k, n - k, "]");
  return out;
}

int64_t da_npy_header_write(void *buf, size_t cap, const char *descr, int ndim, const int64_t *shape) {
  if (ndim < 0 || ndim > DA_NPY_MAX_NDIM || !descr || strlen(descr) > 30) return -1;
  for (const char *d = descr; *d; d++)
    if (*d < ' ' || *d > '~' || *d == '\'' || *d == '\\') return -1; /* must stay one plain quoted string */
  char dict[64 + DA_NPY_MAX_NDIM * 24];
  int k = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return -1;
    k += snprintf(dict + k, sizeof dict - (size_t)k, "%s%lld", i ? ", " : "", (long long)shape[i]);
  }
  k += snprintf(dict + k, sizeof dict - (size_t)k, "%s), }", ndim == 1 ? "," : "");
  /* version 1.0 holds a 16-bit length; pad (spaces, then '\n') so the data is 64-byte aligned */
  int64_t pre = 10, total = (pre + k + 1 + 63) / 64 * 64;
  if (total - pre > 65535) pre = 12, total = (pre + k + 1 + 63) / 64 * 64;
  if ((size_t)total > cap) return -1;
  unsigned char *b = buf;
  memcpy(b, npy_magic, 6);
  b[6] = pre == 10 ? 1 : 2, b[7] = 0;
  const int64_t hl = total - pre;
  b[8] = (unsigned char)(hl & 0xff), b[9] = (unsigned char)(hl >> 8 & 0xff);
  if (pre == 12) b[10] = (unsigned char)(hl >> 16 & 0xff), b[11] = (unsigned char)(hl >> 24 & 0xff);
  memcpy(b + pre, dict, (size_t)k);
  memset(b + pre + k, ' ', (size_t)(total - pre - k - 1));
  b[total - 1] = '\n';
  return total;
}
