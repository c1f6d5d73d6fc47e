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
#include <dirent.h>
#include <signal.h>
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
static const char *file_kind(mode_t m) {
  return S_ISDIR(m) ? "a directory" : S_ISFIFO(m) ? "a FIFO" : S_ISCHR(m) ? "a character device"
         : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" : "not a regular file";
}

static int read_header(const char *path, const char *name, da_npy_header_t *h, int64_t *fsize, char *err, size_t n) {
  /* Only regular files: opening a FIFO for reading waits for a writer, and a device never ends;
   * either would hang every rank before any deadline applies. Refused before the open, and the
   * open cannot block (O_NONBLOCK) should the path change in between (checked again below). */
  struct stat st;
  if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
    return say(err, n, "%s: %s is %s, not a regular file", name, path, file_kind(st.st_mode));
  int fd = open(path, O_RDONLY | O_NONBLOCK);
  if (fd < 0) return say(err, n, "%s: cannot open %s: %s", name, path, strerror(errno));
  unsigned char *buf = NULL;
  int rc = 1;
  if (fstat(fd, &st)) {
    say(err, n, "%s: cannot stat %s: %s", name, path, strerror(errno));
    goto out;
  }
  if (!S_ISREG(st.st_mode)) {
    say(err, n, "%s: %s is %s, not a regular file", name, path, file_kind(st.st_mode));
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
    struct stat st;
    if (access(in->path[f], R_OK))
      rc = say(err, errlen, "%s: cannot read %s: %s%s", in_names[f], in->path[f], strerror(errno),
               f == DA_NPYIO_DOUT ? " (--backward with --input reads dout.npy)" : "");
    else if (stat(in->path[f], &st) == 0 && !S_ISREG(st.st_mode)) /* a FIFO would block MPI_File_open */
      rc = say(err, errlen, "%s: %s is %s, not a regular file", in_names[f], in->path[f], file_kind(st.st_mode));
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

/* ---- outputs: a set replaced as a whole or not at all ---- */

/* The commit marker of a set being renamed into dir: its temporaries and backups, one per line. */
#define COMMIT_PREFIX ".distattn-commit."

static void recover_all(const char *dir);

int da_npyio_check_dir(const char *dir, const char *const *names, int n, char *err, size_t errlen) {
  struct stat st;
  int rc = 0;
  if (stat(dir, &st)) rc = say(err, errlen, "--output %s: %s", dir, strerror(errno));
  else if (!S_ISDIR(st.st_mode)) rc = say(err, errlen, "--output %s: not a directory", dir);
  else if (access(dir, W_OK | X_OK)) rc = say(err, errlen, "--output %s: not writable: %s", dir, strerror(errno));
  /* an output name taken by a directory (or anything but a regular file) would make the last
   * rename fail after the whole run: refused now */
  for (int f = 0; f < n && !rc; f++) {
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, names[f]);
    if (lstat(p, &st) == 0 && S_ISLNK(st.st_mode) && stat(p, &st) != 0) continue; /* a dangling link is replaced */
    if (stat(p, &st) == 0 && !S_ISREG(st.st_mode))
      rc = say(err, errlen, "--output %s: %s exists and is %s, not a file the run can replace", dir, names[f],
               S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (!rc && rank == 0) recover_all(dir);
  return agree(rc ? 2 : 0, err, errlen);
}

/* DISTATTN_TEST_IO_FAIL=R: rank R reports a write failure after writing (the test hook that
 * proves a failed job leaves the final names alone and no temporaries behind). */
static int test_io_fail(int rank) {
  const char *s = getenv("DISTATTN_TEST_IO_FAIL");
  return s && *s && atoi(s) == rank;
}

/* DISTATTN_TEST_OUTPUT_PAUSE=write:S|commit:S (test aid): stop S seconds once every temporary is
 * written and checked (write), or in the commit between the first and the second rename (commit,
 * rank 0), saying so on stderr, so a test can send a signal at that point. */
static void test_pause(const char *where, int rank) {
  const char *s = getenv("DISTATTN_TEST_OUTPUT_PAUSE");
  size_t n = strlen(where);
  if (!s || strncmp(s, where, n) || s[n] != ':') return;
  double secs = atof(s + n + 1), t0 = MPI_Wtime();
  fprintf(stderr, "distattn: rank %d: output: paused at %s for %g s (DISTATTN_TEST_OUTPUT_PAUSE)\n", rank, where, secs);
  fflush(stderr);
  while (MPI_Wtime() - t0 < secs) usleep(10000); /* a signal handler may cut a sleep short: loop */
}

/* ---- signals while the set is written ----
 * Until the commit starts, a SIGINT / SIGTERM / SIGHUP / SIGQUIT removes this process's
 * temporaries and then takes its usual course (the job ends; the old set is untouched). Once the
 * commit has started it is held until the commit is over (the new set is whole), then taken.
 * The state moves 0 (writing) -> 1 (committing) or 0 -> 2 (a handler is cleaning up) with one
 * atomic compare-and-swap, so the handler, on whichever thread it runs, and the commit never both
 * go: a handler that wins stops the commit, a commit that wins makes the handler wait. */
static const int out_sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
enum { NSIGS = sizeof out_sigs / sizeof *out_sigs };
static struct sigaction out_old[NSIGS];
static char (*volatile sig_tmp)[4096];
static volatile sig_atomic_t sig_ntmp, sig_state, sig_pending;

static void out_restore_signals(void) {
  for (int i = 0; i < NSIGS; i++) sigaction(out_sigs[i], &out_old[i], NULL);
}

static void out_on_signal(int sig) {
  int expect = 0;
  if (__atomic_compare_exchange_n(&sig_state, &expect, 2, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    for (int f = 0; f < sig_ntmp; f++) unlink(sig_tmp[f]);
  } else if (expect == 1) { /* committing: held until the set is whole */
    sig_pending = sig;
    return;
  }
  out_restore_signals();
  raise(sig); /* taken after this handler returns, the usual way */
}

static void out_catch_signals(char (*tmp)[4096]) {
  sig_tmp = tmp, sig_ntmp = 0, sig_state = 0, sig_pending = 0;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = out_on_signal;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < NSIGS; i++) sigaddset(&sa.sa_mask, out_sigs[i]);
  for (int i = 0; i < NSIGS; i++) sigaction(out_sigs[i], &sa, &out_old[i]);
}

/* After the set: the usual handlers back, and a signal held during the commit taken now. */
static void out_release_signals(void) {
  __atomic_store_n(&sig_state, 3, __ATOMIC_SEQ_CST);
  out_restore_signals();
  sig_ntmp = 0;
  if (sig_pending) raise(sig_pending);
}

/* ---- one file: temporary, header, rows, checks ---- */

/* Every rank checks what it wrote: its rows read back through the same view equal its buffer
 * (a write that failed without an error -- a full disk under some MPI-IO drivers -- leaves a hole
 * or a short file that reads back as zeros or nothing); rank 0 checks the header and the size. */
static int check_written(const char *path, const da_npy_out_t *o, const unsigned char *hdr, int64_t hl, int64_t B,
                         int64_t S, MPI_Datatype row, MPI_Datatype view, int count, char *err, size_t errlen) {
  int rank = 0, rc = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char m[MPI_MAX_ERROR_STRING];
  const size_t bytes = (size_t)count * (size_t)o->rowbytes;
  void *back = malloc(bytes ? bytes : 1);
  if (!back) rc = say(err, errlen, "%s: out of memory reading %zu bytes back from %s", o->name, bytes, path);
  if ((rc = agree(rc, err, errlen)) != 0) return free(back), rc;
  MPI_File fh;
  int e = MPI_File_open(MPI_COMM_WORLD, path, MPI_MODE_RDONLY, MPI_INFO_NULL, &fh);
  if (e != MPI_SUCCESS) {
    mpi_msg(e, m, sizeof m);
    rc = say(err, errlen, "%s: reopening %s to check it: %s", o->name, path, m);
  }
  if ((rc = agree(rc, err, errlen)) != 0) return free(back), rc;
  MPI_Status st;
  e = MPI_File_set_view(fh, (MPI_Offset)hl, MPI_BYTE, view, "native", MPI_INFO_NULL);
  if (e == MPI_SUCCESS) e = MPI_File_read_all(fh, back, count, row, &st);
  int got = 0;
  if (e == MPI_SUCCESS) MPI_Get_count(&st, row, &got);
  if (e != MPI_SUCCESS) {
    mpi_msg(e, m, sizeof m);
    rc = say(err, errlen, "%s: reading %s back: %s", o->name, path, m);
  } else if (got != count || memcmp(back, o->buf, bytes)) {
    rc = say(err, errlen, "%s: %s does not hold what was written (%d of %d rows read back%s): disk full or a failed "
             "write", o->name, path, got, count, got == count ? ", different bytes" : "");
  }
  MPI_File_close(&fh);
  if (!rc && rank == 0) {
    unsigned char h[4096];
    struct stat sb;
    const int64_t want = hl + B * S * o->rowbytes;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || fstat(fd, &sb)) rc = say(err, errlen, "%s: checking %s: %s", o->name, path, strerror(errno));
    else if ((int64_t)sb.st_size != want)
      rc = say(err, errlen, "%s: %s has %lld bytes, expected %lld (header %lld + %lld rows of %lld): disk full or a "
               "failed write", o->name, path, (long long)sb.st_size, (long long)want, (long long)hl,
               (long long)(B * S), (long long)o->rowbytes);
    else if (pread(fd, h, (size_t)hl, 0) != (ssize_t)hl || memcmp(h, hdr, (size_t)hl))
      rc = say(err, errlen, "%s: the header of %s does not read back as written", o->name, path);
    if (fd >= 0) close(fd);
  }
  free(back);
  return agree(rc, err, errlen);
}

/* Write one file to its temporary name tmp: rank 0 the header, every rank its rows through its
 * view, synced and closed (each step's error counts), then checked (check_written). *made is set
 * once the temporary exists. */
static int write_one(const char *tmp, const da_npy_out_t *o, int64_t B, int64_t S, const int64_t *pos, int64_t n,
                     int count, int *made, char *err, size_t errlen) {
  int rank = 0, rc = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char m[MPI_MAX_ERROR_STRING];
  unsigned char hdr[4096];
  const int64_t hl = da_npy_header_write(hdr, sizeof hdr, o->descr, o->ndim, o->shape);
  MPI_Datatype row, view = MPI_DATATYPE_NULL;
  MPI_Type_contiguous((int)o->rowbytes, MPI_BYTE, &row);
  MPI_Type_commit(&row);
  if (hl < 0 || make_view(B, S, o->rowbytes, pos, n, row, &view)) rc = say(err, errlen, "%s: internal: header or view", o->name);
  if ((rc = agree(rc, err, errlen)) != 0) {
    MPI_Type_free(&row);
    return rc;
  }
  MPI_File fh;
  MPI_Info info = io_info();
  int e = MPI_File_open(MPI_COMM_WORLD, tmp, MPI_MODE_CREATE | MPI_MODE_EXCL | MPI_MODE_WRONLY, info, &fh);
  MPI_Info_free(&info);
  if (e != MPI_SUCCESS) {
    mpi_msg(e, m, sizeof m);
    rc = say(err, errlen, "%s: creating %s: %s", o->name, tmp, m);
  }
  if ((rc = agree(rc, err, errlen)) == 0) {
    *made = 1;
    MPI_Status st;
    if (rank == 0) {
      e = MPI_File_write_at(fh, 0, hdr, (int)hl, MPI_BYTE, &st);
      if (e != MPI_SUCCESS) {
        mpi_msg(e, m, sizeof m);
        rc = say(err, errlen, "%s: writing the header of %s: %s", o->name, tmp, m);
      }
    }
    e = MPI_File_set_view(fh, (MPI_Offset)hl, MPI_BYTE, view, "native", MPI_INFO_NULL);
    if (e == MPI_SUCCESS) e = MPI_File_write_all(fh, o->buf, count, row, &st);
    if (e != MPI_SUCCESS && !rc) {
      mpi_msg(e, m, sizeof m);
      rc = say(err, errlen, "%s: writing %lld rows to %s: %s", o->name, (long long)(B * n), tmp, m);
    } else if (e == MPI_SUCCESS && !rc) {
      int put = 0;
      MPI_Get_count(&st, row, &put);
      if (put != count) rc = say(err, errlen, "%s: wrote %d of %d rows to %s", o->name, put, count, tmp);
    }
    if (!rc && test_io_fail(rank))
      rc = say(err, errlen, "%s: writing %s: DISTATTN_TEST_IO_FAIL (test hook: a simulated write error)", o->name, tmp);
    e = MPI_File_sync(fh); /* collective: the data on the disk, deferred errors (a full disk) now */
    if (e != MPI_SUCCESS && !rc) {
      mpi_msg(e, m, sizeof m);
      rc = say(err, errlen, "%s: syncing %s: %s", o->name, tmp, m);
    }
    e = MPI_File_close(&fh);
    if (e != MPI_SUCCESS && !rc) {
      mpi_msg(e, m, sizeof m);
      rc = say(err, errlen, "%s: closing %s: %s", o->name, tmp, m);
    }
    rc = agree(rc, err, errlen);
    if (!rc) rc = check_written(tmp, o, hdr, hl, B, S, row, view, count, err, errlen);
  }
  MPI_Type_free(&view);
  MPI_Type_free(&row);
  return rc;
}

/* ---- the commit (rank 0) ---- */

static void sync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd >= 0) fsync(fd), close(fd);
}

/* The marker (journal) of a commit: one line per file, "TMP<tab>FINAL<tab>BAK" (BAK "-" when there
 * was no old file), after a comment line. While it exists the set may mix two runs. */
static int write_marker(const char *marker, const char *dir, int nout, char (*tmp)[4096], char (*fin)[4096],
                        char (*bak)[4096], const int *had, char *err, size_t errlen) {
  FILE *mf = fopen(marker, "wx");
  int rc = 0;
  if (!mf) return say(err, errlen, "writing the commit marker %s: %s", marker, strerror(errno));
  fprintf(mf, "# distattn --output: the files of %s were being replaced; while this file exists they may mix "
              "two runs (the next --output into it restores the old set)\n", dir);
  for (int f = 0; f < nout; f++) fprintf(mf, "%s\t%s\t%s\n", tmp[f], fin[f], had[f] ? bak[f] : "-");
  if (fflush(mf) || fsync(fileno(mf))) rc = say(err, errlen, "writing the commit marker %s: %s", marker, strerror(errno));
  if (fclose(mf) && !rc) rc = say(err, errlen, "closing the commit marker %s: %s", marker, strerror(errno));
  if (rc) unlink(marker);
  sync_dir(dir);
  return rc;
}

/* Rename every temporary over its final name, as one step as far as POSIX allows:
 * 1. every existing final file is kept as a backup (a hard link: the final name never goes away);
 * 2. the marker lists every (temporary, final, backup) and is synced;
 * 3. the temporaries are renamed in order (signals are held meanwhile: out_on_signal);
 * 4. the backups go, then the marker.
 * A failed rename puts the old set back (the renamed ones removed or their backups renamed back).
 * A process killed between 2 and 4 leaves the marker: da_npyio_check_dir of the next run into dir
 * restores the old set from it (recover). 0, or 1 with the reason in err. */
static int commit(const char *dir, int nout, const da_npy_out_t *outs, char (*tmp)[4096], char (*fin)[4096],
                  char (*bak)[4096], const char *tag, int rank, char *err, size_t errlen) {
  char marker[4200];
  snprintf(marker, sizeof marker, "%s/" COMMIT_PREFIX "%s", dir, tag);
  int had[DA_NPYIO_MAXOUT] = {0}, rc = 0, done = 0;
  for (int f = 0; f < nout && !rc; f++)
    if (access(fin[f], F_OK) == 0) {
      if (link(fin[f], bak[f]) == 0) had[f] = 1;
      else rc = say(err, errlen, "%s: keeping %s as %s: %s (a file system without hard links cannot replace a set "
                    "atomically)", outs[f].name, fin[f], bak[f], strerror(errno));
    }
  if (!rc) rc = write_marker(marker, dir, nout, tmp, fin, bak, had, err, errlen);
  for (int f = 0; f < nout && !rc; f++) {
    if (rename(tmp[f], fin[f])) {
      rc = say(err, errlen, "%s: renaming %s to %s: %s", outs[f].name, tmp[f], fin[f], strerror(errno));
      break;
    }
    done = f + 1;
    if (f == 0) test_pause("commit", rank);
  }
  if (rc) /* back to the old set: the renamed ones, in reverse */
    for (int f = done - 1; f >= 0; f--) {
      if (had[f]) rename(bak[f], fin[f]);
      else unlink(fin[f]);
    }
  for (int f = 0; f < nout; f++) {
    unlink(tmp[f]); /* the renamed ones are gone already: ENOENT */
    if (had[f]) unlink(bak[f]); /* after a rollback the renamed-back ones are gone already */
  }
  sync_dir(dir);
  unlink(marker);
  sync_dir(dir);
  return rc;
}

/* A marker left by a run killed inside its commit: put the old set back. While every backup it
 * lists still exists and a temporary is left, the renames were half done: each final that was
 * renamed (its temporary gone) gets its backup back, or is removed when there was no old file.
 * Once a backup is missing (step 4 had begun) or every temporary is gone, every rename was done:
 * the new set is kept and only the leftovers are removed. Rank 0; says what
 * it did on stderr. */
static void recover(const char *dir, const char *marker) {
  FILE *f = fopen(marker, "r");
  static char line[13000], t[DA_NPYIO_MAXOUT][4096], fi[DA_NPYIO_MAXOUT][4096], b[DA_NPYIO_MAXOUT][4096];
  int n = 0, backups_whole = 1, renamed = 0;
  while (f && n < DA_NPYIO_MAXOUT && fgets(line, sizeof line, f)) {
    if (line[0] == '#') continue;
    line[strcspn(line, "\n")] = '\0';
    char *save = NULL, *a = strtok_r(line, "\t", &save), *c = strtok_r(NULL, "\t", &save), *d = strtok_r(NULL, "\t", &save);
    if (!a || !c || !d) continue;
    snprintf(t[n], sizeof t[n], "%s", a), snprintf(fi[n], sizeof fi[n], "%s", c), snprintf(b[n], sizeof b[n], "%s", d);
    if (strcmp(b[n], "-") && access(b[n], F_OK)) backups_whole = 0;
    n++;
  }
  if (f) fclose(f);
  int moved[DA_NPYIO_MAXOUT];
  for (int i = 0; i < n; i++) renamed += moved[i] = access(t[i], F_OK) != 0; /* temporary gone: renamed */
  /* every temporary renamed: the new set is whole, keep it (the run died in its clean-up) */
  const int back = backups_whole && renamed < n;
  for (int i = 0; i < n; i++) {
    if (back && moved[i]) {
      if (strcmp(b[i], "-")) rename(b[i], fi[i]);
      else unlink(fi[i]);
    }
    unlink(t[i]);
    if (strcmp(b[i], "-")) unlink(b[i]);
  }
  sync_dir(dir);
  unlink(marker);
  sync_dir(dir);
  fprintf(stderr, "distattn run: --output %s: %s: an earlier run was killed while replacing its outputs (%d of %d "
          "renamed): %s\n", dir, strrchr(marker, '/') + 1, renamed, n,
          back ? "the old set is restored" : "its new set was complete; leftovers removed");
}

/* Every marker of dir (rank 0). */
static void recover_all(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  static char found[8][4200];
  int nf = 0;
  for (struct dirent *e; (e = readdir(d)) != NULL && nf < 8;)
    if (!strncmp(e->d_name, COMMIT_PREFIX, strlen(COMMIT_PREFIX)))
      snprintf(found[nf++], sizeof found[0], "%s/%s", dir, e->d_name);
  closedir(d);
  for (int i = 0; i < nf; i++) recover(dir, found[i]);
}

int da_npyio_write(const char *dir, int nout, const da_npy_out_t *outs, int64_t B, int64_t S, const int64_t *pos,
                   int64_t n, char *err, size_t errlen) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (nout > DA_NPYIO_MAXOUT) return agree(say(err, errlen, "internal: %d outputs", nout), err, errlen);
  /* one tag for the job: rank 0's pid and clock, so two jobs writing into one directory differ */
  long long tag_v[2] = {(long long)getpid(), (long long)(MPI_Wtime() * 1e6)};
  MPI_Bcast(tag_v, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  char tag[64];
  snprintf(tag, sizeof tag, "%lld-%llx", tag_v[0], tag_v[1]);
  int count = 0, rc = 0;
  if ((rc = agree(rows_count(B, n, "outputs", &count, err, errlen) ? 2 : 0, err, errlen)) != 0) return rc;
  char (*tmp)[4096] = calloc((size_t)nout, sizeof *tmp), (*fin)[4096] = calloc((size_t)nout, sizeof *fin);
  char (*bak)[4096] = calloc((size_t)nout, sizeof *bak);
  if (!tmp || !fin || !bak) rc = say(err, errlen, "out of memory");
  if ((rc = agree(rc, err, errlen)) != 0) {
    free(tmp), free(fin), free(bak);
    return rc;
  }
  for (int f = 0; f < nout; f++) {
    snprintf(tmp[f], sizeof tmp[f], "%s/.%s.%s.tmp", dir, outs[f].name, tag);
    snprintf(fin[f], sizeof fin[f], "%s/%s", dir, outs[f].name);
    snprintf(bak[f], sizeof bak[f], "%s/.%s.%s.old", dir, outs[f].name, tag);
  }
  out_catch_signals(tmp);
  /* 1. every temporary written, synced, closed and read back by every rank */
  for (int f = 0; f < nout && !rc; f++) {
    int made = 0;
    rc = write_one(tmp[f], &outs[f], B, S, pos, n, count, &made, err, errlen);
    if (made && rank == 0) sig_ntmp = f + 1; /* rank 0 owns the names: only it removes them */
  }
  if (!rc) test_pause("write", rank);
  /* 2. rank 0 renames them into place; every rank holds signals until the verdict, so a ^C to the
   * job does not end a rank whose death would make the launcher kill rank 0 inside the commit */
  int expect = 0;
  if (!rc && !__atomic_compare_exchange_n(&sig_state, &expect, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    rc = say(err, errlen, "interrupted by a signal before the commit");
  rc = agree(rc, err, errlen);
  if (!rc && rank == 0) rc = commit(dir, nout, outs, tmp, fin, bak, tag, rank, err, errlen);
  rc = agree(rc, err, errlen);
  if (rc && rank == 0)
    for (int f = 0; f < sig_ntmp; f++) unlink(tmp[f]); /* nothing under the final names changed */
  MPI_Barrier(MPI_COMM_WORLD);
  out_release_signals();
  free(tmp), free(fin), free(bak);
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
