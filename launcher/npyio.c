/* npyio.c: .npy inputs and outputs of `distattn run` over MPI-IO (see npyio.h). Rank 0 reads and
 * checks the headers and broadcasts one verdict, so every rank prints the same message and no
 * rank goes on alone; the data moves with collective MPI_File_read_all / write_all through file
 * views of the rank's own rows, straight into and out of its shard buffers. Not a library layer:
 * messages are for the command line. */
#define _GNU_SOURCE
#include <mpi.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "distattn.h"
#include "dtype.h"
#include "npyio.h"
#include "rng.h"

static const char *const in_names[DA_NPYIO_NIN] = {"q.npy", "k.npy", "v.npy", "dout.npy"};
static const char *const dtype_names[] = {"fp32", "bf16", "fp16"};
static const char *const dtype_descr[] = {"<f4", "<u2", "<f2"};

static int say(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int say(char *err, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
  return 1;
}

static void mpi_msg(int code, char *buf, size_t n) {
  char s[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, s, &len) != MPI_SUCCESS) snprintf(s, sizeof s, "MPI error %d", code);
  snprintf(buf, n, "%s", s);
}

/* Collective: rc is the worst of every rank's rc; when it is not 0, the lowest rank with that
 * code sends its message to all (prefixed with its rank when it is not rank 0). */
static int agree(int rc, char *err, size_t errlen) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int worst = rc;
  MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (!worst) return 0;
  int who = rc == worst ? rank : size;
  MPI_Allreduce(MPI_IN_PLACE, &who, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  char msg[1024];
  if (rank == who) snprintf(msg, sizeof msg, "%s", err);
  MPI_Bcast(msg, sizeof msg, MPI_CHAR, who, MPI_COMM_WORLD);
  if (who) snprintf(err, errlen, "on rank %d: %s", who, msg);
  else snprintf(err, errlen, "%s", msg);
  return worst;
}

/* ---- headers ---- */

/* Rank 0: read and parse one header with plain reads (a few hundred bytes), and its file size. */
static int read_header(const char *path, const char *name, da_npy_header_t *h, int64_t *fsize, char *err, size_t n) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return say(err, n, "%s: cannot open %s: %s", name, path, strerror(errno));
  struct stat st;
  unsigned char *buf = NULL;
  int rc = 1;
  if (fstat(fd, &st)) {
    say(err, n, "%s: cannot stat %s: %s", name, path, strerror(errno));
    goto out;
  }
  if (!S_ISREG(st.st_mode)) { /* a directory opens and reads as "truncated": name what it is */
    say(err, n, "%s: %s is %s, not a .npy file", name, path,
        S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device"
        : S_ISBLK(st.st_mode) ? "a block device" : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file");
    goto out;
  }
  *fsize = (int64_t)st.st_size;
  unsigned char pre[DA_NPY_PREFIX];
  ssize_t got = pread(fd, pre, sizeof pre, 0);
  int64_t total = 0;
  char perr[256];
  int hs = da_npy_header_size(pre, got > 0 ? (size_t)got : 0, &total, perr, sizeof perr);
  if (hs < 0) {
    say(err, n, "%s: %s", name, perr);
    goto out;
  }
  if (hs > 0 || total > *fsize) {
    say(err, n, "%s: header: truncated (the file has %lld bytes)", name, (long long)*fsize);
    goto out;
  }
  buf = malloc((size_t)total);
  if (!buf) {
    say(err, n, "%s: out of memory for a %lld-byte header", name, (long long)total);
    goto out;
  }
  if (pread(fd, buf, (size_t)total, 0) != (ssize_t)total) {
    say(err, n, "%s: header: cannot read %lld bytes: %s", name, (long long)total, strerror(errno));
    goto out;
  }
  if (da_npy_parse(buf, (size_t)total, h, perr, sizeof perr)) {
    say(err, n, "%s: %s", name, perr);
    goto out;
  }
  rc = 0;
out:
  free(buf);
  close(fd);
  return rc;
}

static int npy_dtype(const da_npy_header_t *h) {
  return h->type == DA_NPY_F4 ? DA_FLOAT32 : h->type == DA_NPY_U2 ? DA_BFLOAT16 : h->type == DA_NPY_F2 ? DA_FLOAT16 : -1;
}

/* Rank 0: every check of one file alone. */
static int check_one(const char *name, const da_npy_header_t *h, int64_t fsize, char *err, size_t n) {
  char s[256];
  da_npy_shape_str(h->ndim, h->shape, s, sizeof s);
  if (h->type == DA_NPY_OTHER && h->big_endian)
    return say(err, n, "%s: descr '%s': big-endian data is not supported (save it little-endian: "
               "a.astype(a.dtype.newbyteorder('<')))", name, h->descr);
  if (h->type == DA_NPY_OTHER)
    return say(err, n, "%s: descr '%s': dtype not supported (fp32 '<f4', bf16 as uint16 '<u2', fp16 '<f2')", name,
               h->descr);
  if (h->fortran_order)
    return say(err, n, "%s: fortran_order: True is not supported (save a C-ordered array: np.ascontiguousarray)",
               name);
  if (h->ndim != 3 && h->ndim != 4)
    return say(err, n, "%s: shape %s: %d dimensions, expected [S, H, D] or [B, S, H, D]", name, s, h->ndim);
  for (int i = 0; i < h->ndim; i++)
    if (h->shape[i] == 0) return say(err, n, "%s: shape %s: dimension %d is empty", name, s, i);
  const int64_t want = h->data_offset + h->count * h->item_size;
  if (fsize < want)
    return say(err, n, "%s: file size: %lld bytes, but header (%lld) + shape %s of '%s' need %lld (truncated)", name,
               (long long)fsize, (long long)h->data_offset, s, h->descr, (long long)want);
  if (fsize > want)
    return say(err, n, "%s: file size: %lld bytes, but header (%lld) + shape %s of '%s' need %lld (%lld extra bytes)",
               name, (long long)fsize, (long long)h->data_offset, s, h->descr, (long long)want,
               (long long)(fsize - want));
  return 0;
}

/* Rank 0: the files against each other and against the command line. */
static int check_all(int nf, const da_npy_header_t *h, const da_npy_expect_t *w, da_npy_inputs_t *in, char *err,
                     size_t n) {
  char s[DA_NPYIO_NIN][256];
  for (int f = 0; f < nf; f++) da_npy_shape_str(h[f].ndim, h[f].shape, s[f], sizeof s[f]);
  const int o = h[0].ndim - 3; /* 1 with a batch axis */
  for (int f = 1; f < nf; f++) {
    const char *nm = in_names[f];
    if (strcmp(h[f].descr, h[0].descr))
      return say(err, n, "%s: descr '%s' differs from q.npy's '%s'", nm, h[f].descr, h[0].descr);
    if (h[f].ndim != h[0].ndim)
      return say(err, n, "%s: shape %s: %d dimensions, q.npy %s has %d", nm, s[f], h[f].ndim, s[0], h[0].ndim);
    if (o && h[f].shape[0] != h[0].shape[0])
      return say(err, n, "%s: shape %s: batch %lld differs from q.npy's %lld", nm, s[f], (long long)h[f].shape[0],
                 (long long)h[0].shape[0]);
    if (h[f].shape[o] != h[0].shape[o])
      return say(err, n, "%s: shape %s: sequence %lld differs from q.npy's %lld", nm, s[f], (long long)h[f].shape[o],
                 (long long)h[0].shape[o]);
    if (h[f].shape[o + 2] != h[0].shape[o + 2])
      return say(err, n, "%s: shape %s: head dim %lld differs from q.npy's %lld", nm, s[f],
                 (long long)h[f].shape[o + 2], (long long)h[0].shape[o + 2]);
  }
  if (h[2].shape[o + 1] != h[1].shape[o + 1])
    return say(err, n, "v.npy: shape %s: %lld KV heads differ from k.npy's %lld", s[2], (long long)h[2].shape[o + 1],
               (long long)h[1].shape[o + 1]);
  const int64_t H = h[0].shape[o + 1], G = h[1].shape[o + 1];
  if (H % G)
    return say(err, n, "k.npy: shape %s: its %lld KV heads do not divide q.npy's %lld heads (GQA needs H %% G == 0)",
               s[1], (long long)G, (long long)H);
  if (nf > DA_NPYIO_DOUT && h[3].shape[o + 1] != H)
    return say(err, n, "dout.npy: shape %s: %lld heads differ from q.npy's %lld", s[3], (long long)h[3].shape[o + 1],
               (long long)H);
  in->nfiles = nf, in->batched = o;
  in->B = o ? h[0].shape[0] : 1, in->S = h[0].shape[o], in->H = H, in->G = G, in->D = h[0].shape[o + 2];
  in->dtype = npy_dtype(&h[0]);
  for (int f = 0; f < nf; f++) in->data_offset[f] = h[f].data_offset;
  struct { const char *what, *flag; int64_t file, given; } c[5] = {
      {"sequence", "--seq", in->S, w->S},     {"heads", "--heads", in->H, w->H}, {"KV heads", "--kv-heads", in->G, w->G},
      {"head dim", "--dim", in->D, w->D}, {"batch", "--batch", in->B, w->B}};
  for (int i = 0; i < 5; i++)
    if (c[i].given >= 0 && c[i].given != c[i].file)
      return say(err, n, "%s: shape %s: %s %lld%s differs from %s %lld", i == 2 ? "k.npy" : "q.npy",
                 s[i == 2 ? 1 : 0], c[i].what, (long long)c[i].file, i == 4 && !o ? " (no batch axis)" : "", c[i].flag,
                 (long long)c[i].given);
  if (w->dtype >= 0 && w->dtype != in->dtype)
    return say(err, n, "q.npy: descr '%s' (%s) differs from --dtype %s", h[0].descr, dtype_names[in->dtype],
               dtype_names[w->dtype]);
  return 0;
}

int da_npyio_inspect(const char *dir, int backward, const da_npy_expect_t *want, da_npy_inputs_t *in, char *err,
                     size_t errlen) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  memset(in, 0, sizeof *in);
  const int nf = backward ? 4 : 3;
  int rc = 0;
  /* every rank must be able to read every file (ranks on other nodes see other file systems) */
  for (int f = 0; f < nf && !rc; f++) {
    snprintf(in->path[f], sizeof in->path[f], "%s/%s", dir, in_names[f]);
    if (access(in->path[f], R_OK))
      rc = say(err, errlen, "%s: cannot read %s: %s%s", in_names[f], in->path[f], strerror(errno),
               f == DA_NPYIO_DOUT ? " (--backward with --input reads dout.npy)" : "");
  }
  if ((rc = agree(rc ? 2 : 0, err, errlen)) != 0) return rc;
  struct {
    int rc;
    char msg[1024];
    da_npy_inputs_t in;
  } *v = calloc(1, sizeof *v);
  if (!v) return agree(say(err, errlen, "out of memory"), err, errlen);
  if (rank == 0) {
    da_npy_header_t h[DA_NPYIO_NIN];
    int64_t fsize[DA_NPYIO_NIN];
    for (int f = 0; f < nf && !v->rc; f++)
      if (read_header(in->path[f], in_names[f], &h[f], &fsize[f], v->msg, sizeof v->msg) ||
          check_one(in_names[f], &h[f], fsize[f], v->msg, sizeof v->msg))
        v->rc = 2;
    if (!v->rc && check_all(nf, h, want, in, v->msg, sizeof v->msg)) v->rc = 2;
    v->in = *in;
  }
  MPI_Bcast(v, (int)sizeof *v, MPI_BYTE, 0, MPI_COMM_WORLD);
  rc = v->rc;
  if (rc) snprintf(err, errlen, "%s", v->msg);
  else *in = v->in;
  free(v);
  return rc;
}

/* ---- views ---- */

/* The file type of rows pos[0..n) of every batch element, in row units of `row`: positions
 * compressed greedily into arithmetic runs (start, stride, count), each an hvector of stride
 * `stride` rows (a contiguous run has stride 1), placed by byte displacement in one struct whose
 * extent is resized to S rows, repeated B times. Byte displacements are MPI_Aint, so files over
 * 2 GiB work; counts stay inside int (a run is split at 2^30 rows). */
static int make_view(int64_t B, int64_t S, int64_t rowbytes, const int64_t *pos, int64_t n, MPI_Datatype row,
                     MPI_Datatype *out) {
  int64_t cap = n > 0 ? n : 1, nseg = 0;
  MPI_Aint *disp = malloc((size_t)cap * sizeof *disp);
  MPI_Datatype *types = malloc((size_t)cap * sizeof *types);
  int *ones = malloc((size_t)cap * sizeof *ones);
  int rc = (!disp || !types || !ones) ? -1 : 0;
  for (int64_t i = 0; i < n && !rc;) {
    int64_t stride = i + 1 < n ? pos[i + 1] - pos[i] : 1, cnt = 1;
    if (stride <= 0) {
      rc = -1; /* positions must increase: a file view never goes back */
      break;
    }
    while (i + cnt < n && cnt < (1 << 30) && pos[i + cnt] - pos[i + cnt - 1] == stride) cnt++;
    disp[nseg] = (MPI_Aint)(pos[i] * rowbytes);
    ones[nseg] = 1;
    if (cnt == 1) MPI_Type_dup(row, &types[nseg]);
    else MPI_Type_create_hvector((int)cnt, 1, (MPI_Aint)(stride * rowbytes), row, &types[nseg]);
    nseg++;
    i += cnt;
  }
  if (!rc && nseg > INT_MAX) rc = -1;
  MPI_Datatype one = MPI_DATATYPE_NULL, res = MPI_DATATYPE_NULL;
  if (!rc) {
    if (nseg == 0) MPI_Type_contiguous(0, MPI_BYTE, &one);
    else MPI_Type_create_struct((int)nseg, ones, disp, types, &one);
    MPI_Type_create_resized(one, 0, (MPI_Aint)(S * rowbytes), &res);
    MPI_Type_contiguous((int)B, res, out);
    MPI_Type_commit(out);
    MPI_Type_free(&one);
    MPI_Type_free(&res);
  }
  for (int64_t s = 0; s < nseg; s++) MPI_Type_free(&types[s]);
  free(disp), free(types), free(ones);
  return rc;
}

/* Hint: ask ROMIO/OMPIO for collective buffering on reads and writes (harmless where unknown). */
static MPI_Info io_info(void) {
  MPI_Info info;
  MPI_Info_create(&info);
  MPI_Info_set(info, "romio_cb_read", "automatic");
  MPI_Info_set(info, "romio_cb_write", "automatic");
  return info;
}

/* The rows of this rank as a count of `row` (int for MPI): refused collectively when over. */
static int rows_count(int64_t B, int64_t n, const char *name, int *count, char *err, size_t errlen) {
  const int64_t rows = B * n;
  *count = rows > INT_MAX ? 0 : (int)rows;
  return rows > INT_MAX ? say(err, errlen, "%s: %lld rows on one rank are more than one MPI call moves (2^31 - 1): "
                              "use more ranks", name, (long long)rows) : 0;
}

int da_npyio_read(const char *path, int64_t data_offset, int64_t B, int64_t S, int64_t rowbytes, const int64_t *pos,
                  int64_t n, void *buf, char *err, size_t errlen) {
  const char *name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
  int count = 0, rc = rows_count(B, n, name, &count, err, errlen);
  if ((rc = agree(rc ? 2 : 0, err, errlen)) != 0) return rc;
  MPI_Datatype row, view = MPI_DATATYPE_NULL;
  MPI_Type_contiguous((int)rowbytes, MPI_BYTE, &row); /* rowbytes = H*D*es <= 2^30 (option ranges) */
  MPI_Type_commit(&row);
  if (make_view(B, S, rowbytes, pos, n, row, &view)) rc = say(err, errlen, "%s: local positions do not increase", name);
  if ((rc = agree(rc, err, errlen)) != 0) {
    MPI_Type_free(&row);
    return rc;
  }
  MPI_File fh;
  MPI_Info info = io_info();
  int e = MPI_File_open(MPI_COMM_WORLD, path, MPI_MODE_RDONLY, info, &fh);
  MPI_Info_free(&info);
  char m[MPI_MAX_ERROR_STRING];
  if (e != MPI_SUCCESS) {
    mpi_msg(e, m, sizeof m);
    rc = say(err, errlen, "%s: MPI_File_open %s: %s", name, path, m);
  }
  if ((rc = agree(rc, err, errlen)) == 0) {
    e = MPI_File_set_view(fh, (MPI_Offset)data_offset, MPI_BYTE, view, "native", MPI_INFO_NULL);
    MPI_Status st;
    if (e == MPI_SUCCESS) e = MPI_File_read_all(fh, buf, count, row, &st);
    if (e != MPI_SUCCESS) {
      mpi_msg(e, m, sizeof m);
      rc = say(err, errlen, "%s: reading %lld rows: %s", name, (long long)(B * n), m);
    } else {
      int got = 0;
      MPI_Get_count(&st, row, &got);
      if (got != count)
        rc = say(err, errlen, "%s: read %d of %d rows (the file changed or was cut short after its check)", name, got,
                 count);
    }
    MPI_File_close(&fh);
    rc = agree(rc, err, errlen);
  }
  MPI_Type_free(&view);
  MPI_Type_free(&row);
  return rc;
}

/* ---- outputs ---- */

int da_npyio_check_dir(const char *dir, char *err, size_t errlen) {
  struct stat st;
  int rc = 0;
  if (stat(dir, &st)) rc = say(err, errlen, "--output %s: %s", dir, strerror(errno));
  else if (!S_ISDIR(st.st_mode)) rc = say(err, errlen, "--output %s: not a directory", dir);
  else if (access(dir, W_OK | X_OK)) rc = say(err, errlen, "--output %s: not writable: %s", dir, strerror(errno));
  return agree(rc ? 2 : 0, err, errlen);
}

/* DISTATTN_TEST_IO_FAIL=R: rank R reports a write failure after writing (the test hook that
 * proves a failed job leaves the final names alone and no temporaries behind). */
static int test_io_fail(int rank) {
  const char *s = getenv("DISTATTN_TEST_IO_FAIL");
  return s && *s && atoi(s) == rank;
}

int da_npyio_write(const char *dir, int nout, const da_npy_out_t *outs, int64_t B, int64_t S, const int64_t *pos,
                   int64_t n, char *err, size_t errlen) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int tag = (int)getpid(), count = 0, rc = 0;
  MPI_Bcast(&tag, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if ((rc = agree(rows_count(B, n, "outputs", &count, err, errlen) ? 2 : 0, err, errlen)) != 0) return rc;
  char (*tmp)[4096] = calloc((size_t)nout, sizeof *tmp), (*fin)[4096] = calloc((size_t)nout, sizeof *fin);
  if (!tmp || !fin) rc = say(err, errlen, "out of memory");
  if ((rc = agree(rc, err, errlen)) != 0) {
    free(tmp), free(fin);
    return rc;
  }
  int made = 0; /* temporaries created so far (rank 0 removes them on failure) */
  char m[MPI_MAX_ERROR_STRING];
  for (int f = 0; f < nout && !rc; f++) {
    const da_npy_out_t *o = &outs[f];
    snprintf(tmp[f], sizeof tmp[f], "%s/.%s.%d.tmp", dir, o->name, tag);
    snprintf(fin[f], sizeof fin[f], "%s/%s", dir, o->name);
    unsigned char hdr[4096];
    const int64_t hl = da_npy_header_write(hdr, sizeof hdr, o->descr, o->ndim, o->shape);
    MPI_Datatype row, view = MPI_DATATYPE_NULL;
    MPI_Type_contiguous((int)o->rowbytes, MPI_BYTE, &row);
    MPI_Type_commit(&row);
    if (hl < 0 || make_view(B, S, o->rowbytes, pos, n, row, &view)) rc = say(err, errlen, "%s: internal: header or view", o->name);
    if ((rc = agree(rc, err, errlen)) != 0) {
      MPI_Type_free(&row);
      break;
    }
    MPI_File fh;
    MPI_Info info = io_info();
    int e = MPI_File_open(MPI_COMM_WORLD, tmp[f], MPI_MODE_CREATE | MPI_MODE_EXCL | MPI_MODE_WRONLY, info, &fh);
    MPI_Info_free(&info);
    if (e != MPI_SUCCESS) {
      mpi_msg(e, m, sizeof m);
      rc = say(err, errlen, "%s: creating %s: %s", o->name, tmp[f], m);
    }
    if ((rc = agree(rc, err, errlen)) == 0) {
      made = f + 1;
      MPI_Status st;
      if (rank == 0) {
        e = MPI_File_write_at(fh, 0, hdr, (int)hl, MPI_BYTE, &st);
        if (e != MPI_SUCCESS) {
          mpi_msg(e, m, sizeof m);
          rc = say(err, errlen, "%s: writing the header of %s: %s", o->name, tmp[f], m);
        }
      }
      e = MPI_File_set_view(fh, (MPI_Offset)hl, MPI_BYTE, view, "native", MPI_INFO_NULL);
      if (e == MPI_SUCCESS) e = MPI_File_write_all(fh, o->buf, count, row, &st);
      if (e != MPI_SUCCESS && !rc) {
        mpi_msg(e, m, sizeof m);
        rc = say(err, errlen, "%s: writing %lld rows to %s: %s", o->name, (long long)(B * n), tmp[f], m);
      } else if (e == MPI_SUCCESS && !rc) {
        int put = 0;
        MPI_Get_count(&st, row, &put);
        if (put != count) rc = say(err, errlen, "%s: wrote %d of %d rows to %s", o->name, put, count, tmp[f]);
      }
      if (!rc && test_io_fail(rank))
        rc = say(err, errlen, "%s: writing %s: DISTATTN_TEST_IO_FAIL (test hook: a simulated write error)", o->name,
                 tmp[f]);
      e = MPI_File_close(&fh);
      if (e != MPI_SUCCESS && !rc) {
        mpi_msg(e, m, sizeof m);
        rc = say(err, errlen, "%s: closing %s: %s", o->name, tmp[f], m);
      }
      rc = agree(rc, err, errlen);
    }
    MPI_Type_free(&view);
    MPI_Type_free(&row);
  }
  /* every rank wrote and closed every file: rank 0 gives them their names */
  if (!rc && rank == 0)
    for (int f = 0; f < nout && !rc; f++)
      if (rename(tmp[f], fin[f]))
        rc = say(err, errlen, "%s: renaming %s to %s: %s (%d of %d outputs renamed)", outs[f].name, tmp[f], fin[f],
                  strerror(errno), f, nout);
  rc = agree(rc, err, errlen);
  if (rc && rank == 0)
    for (int f = 0; f < made; f++) unlink(tmp[f]); /* the renamed ones are gone already: ENOENT */
  MPI_Barrier(MPI_COMM_WORLD);
  free(tmp), free(fin);
  return rc;
}

/* ---- streaming rows for verification ---- */

struct da_npyio_source {
  const da_npy_inputs_t *in;
  MPI_File fh[DA_NPYIO_NIN];
  int open[DA_NPYIO_NIN];
  void *chunk[DA_NPYIO_NIN];
  int64_t cb[DA_NPYIO_NIN], c0[DA_NPYIO_NIN], cn[DA_NPYIO_NIN], rows_per_chunk[DA_NPYIO_NIN];
};

da_npyio_source_t *da_npyio_source_open(const da_npy_inputs_t *in, char *err, size_t errlen) {
  da_npyio_source_t *s = calloc(1, sizeof *s);
  if (!s) return say(err, errlen, "out of memory"), NULL;
  s->in = in;
  const int64_t es = in->dtype == DA_FLOAT32 ? 4 : 2;
  for (int f = 0; f < in->nfiles; f++) {
    const int64_t rowbytes = (f == DA_NPYIO_K || f == DA_NPYIO_V ? in->G : in->H) * in->D * es;
    int64_t r = (16 << 20) / rowbytes; /* at most 16 MiB per tensor, 256 rows */
    s->rows_per_chunk[f] = r < 1 ? 1 : r > 256 ? 256 : r;
    s->chunk[f] = malloc((size_t)(s->rows_per_chunk[f] * rowbytes));
    s->cn[f] = 0;
    int e = s->chunk[f] ? MPI_File_open(MPI_COMM_SELF, in->path[f], MPI_MODE_RDONLY, MPI_INFO_NULL, &s->fh[f]) : -1;
    if (e != MPI_SUCCESS) {
      char m[MPI_MAX_ERROR_STRING] = "out of memory";
      if (e != -1) mpi_msg(e, m, sizeof m);
      say(err, errlen, "%s: opening for verification: %s", in_names[f], m);
      da_npyio_source_close(s);
      return NULL;
    }
    s->open[f] = 1;
  }
  return s;
}

int da_npyio_source_row(void *src, uint32_t tensor, int64_t b, int64_t pos, int heads, double *dst) {
  da_npyio_source_t *s = src;
  const da_npy_inputs_t *in = s->in;
  const int f = tensor == DA_RNG_Q ? DA_NPYIO_Q : tensor == DA_RNG_K ? DA_NPYIO_K : tensor == DA_RNG_V ? DA_NPYIO_V
                : tensor == DA_RNG_DOUT ? DA_NPYIO_DOUT : -1;
  if (f < 0 || f >= in->nfiles || !s->open[f] || pos < 0 || pos >= in->S || b < 0 || b >= in->B) return -1;
  const int64_t es = in->dtype == DA_FLOAT32 ? 4 : 2, elems = (int64_t)heads * in->D, rowbytes = elems * es;
  if (!(s->cn[f] > 0 && s->cb[f] == b && pos >= s->c0[f] && pos < s->c0[f] + s->cn[f])) {
    int64_t nr = in->S - pos < s->rows_per_chunk[f] ? in->S - pos : s->rows_per_chunk[f];
    MPI_Status st;
    MPI_Offset off = (MPI_Offset)in->data_offset[f] + (MPI_Offset)(b * in->S + pos) * rowbytes;
    MPI_Datatype row;
    MPI_Type_contiguous((int)rowbytes, MPI_BYTE, &row);
    MPI_Type_commit(&row);
    int e = MPI_File_read_at(s->fh[f], off, s->chunk[f], (int)nr, row, &st), got = 0;
    if (e == MPI_SUCCESS) MPI_Get_count(&st, row, &got);
    MPI_Type_free(&row);
    if (e != MPI_SUCCESS || got != nr) {
      s->cn[f] = 0;
      return -1;
    }
    s->cb[f] = b, s->c0[f] = pos, s->cn[f] = nr;
  }
  const char *p = (const char *)s->chunk[f] + (pos - s->c0[f]) * rowbytes;
  for (int64_t j = 0; j < elems; j++) dst[j] = da_load_f32(p, in->dtype, j);
  return 0;
}

void da_npyio_source_close(da_npyio_source_t *s) {
  if (!s) return;
  for (int f = 0; f < DA_NPYIO_NIN; f++) {
    if (s->open[f]) MPI_File_close(&s->fh[f]);
    free(s->chunk[f]);
  }
  free(s);
}

const char *da_npyio_descr(int dtype) { return dtype >= 0 && dtype < 3 ? dtype_descr[dtype] : "?"; }
