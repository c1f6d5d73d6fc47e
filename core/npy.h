/* npy.h: the NumPy .npy header, read (format versions 1.0, 2.0, 3.0) and written (1.0, or 2.0 when
 * the header would not fit 1.0's 16-bit length), from and into byte buffers. No I/O and no MPI:
 * launcher/npyio.c does the MPI-IO, and tests/fuzz/fuzz_npy.c feeds this parser arbitrary bytes.
 * The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (S, H, D), }
 * (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html). */
#ifndef DA_NPY_H
#define DA_NPY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DA_NPY_MAX_NDIM 32          /* NumPy's own limit */
#define DA_NPY_PREFIX 12            /* bytes needed to know the header's length (v2/v3; v1 needs 10) */
#define DA_NPY_MAX_HEADER (1 << 20) /* larger headers are refused: no real array needs one */

/* Element types distattn reads and writes. bf16 has no NumPy dtype: it travels as its raw bits,
 * uint16 '<u2' (what torch's tensor.view(torch.uint16).numpy() gives). */
typedef enum da_npy_type {
  DA_NPY_OTHER = 0, /* anything else: descr names it */
  DA_NPY_F4,        /* '<f4' float32 */
  DA_NPY_F2,        /* '<f2' float16 */
  DA_NPY_U2,        /* '<u2' uint16 (bf16 bits) */
} da_npy_type_t;

typedef struct da_npy_header {
  int major, minor;                  /* format version */
  char descr[32];                    /* as written, e.g. "<f4" (cut at 31 bytes) */
  da_npy_type_t type;                /* DA_NPY_OTHER when descr is none of the three above */
  int big_endian;                    /* descr starts with '>' (or '!') and has more than one byte */
  int fortran_order;
  int ndim;
  int64_t shape[DA_NPY_MAX_NDIM];
  int64_t count;                     /* product of shape (1 for ndim 0) */
  int64_t item_size;                 /* bytes per element from descr's digits (0 if unknown) */
  int64_t data_offset;               /* where the array's bytes start */
} da_npy_header_t;

/* The total header length (magic through padding = the data offset) from the first len bytes.
 * Returns 0 and sets *total; 1 if more bytes are needed (DA_NPY_PREFIX are always enough);
 * -1 with a message in err if this is not a .npy header (bad magic, unknown version, a header
 * longer than DA_NPY_MAX_HEADER). */
int da_npy_header_size(const void *buf, size_t len, int64_t *total, char *err, size_t errlen);

/* Parse a whole header (len >= the total from da_npy_header_size; extra bytes are ignored).
 * Returns 0 and fills *h, or -1 with a message naming the field in err ("'shape': -3 is
 * negative", "missing key 'descr'"). The dict must hold exactly the three keys; descr must be a
 * simple type string (structured dtypes are refused); shape entries must be non-negative and
 * their product must fit int64 bytes. Accepting a header says nothing about whether distattn
 * supports the type, the byte order or the layout: the caller checks type, big_endian,
 * fortran_order and ndim and says which is wrong. */
int da_npy_parse(const void *buf, size_t len, da_npy_header_t *h, char *err, size_t errlen);

/* Write a header for an array of type descr ("<f4", "<u2", ...), C order, with the given shape,
 * into buf (capacity cap). The dict is padded with spaces and a final '\n' so the data starts at
 * a multiple of 64 bytes. Version 1.0, or 2.0 when the header is longer than 65535 bytes.
 * Returns the header length (= data offset), or -1 if cap is too small or the shape invalid. */
int64_t da_npy_header_write(void *buf, size_t cap, const char *descr, int ndim, const int64_t *shape);

/* "[1001, 4, 64]" into out (for messages). */
const char *da_npy_shape_str(int ndim, const int64_t *shape, char *out, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* DA_NPY_H */
