/* npyio.h: `distattn run --input DIR / --output DIR`: q/k/v/dout .npy files read, and out/lse/dq/
 * dk/dv written, collectively with MPI-IO, each rank touching only its layout's rows through a
 * file view (no rank ever holds the full sequence); the header checks every rank agrees on; the
 * temporary-then-rename protocol of the outputs; a row source for streaming verification.
 * Every function here is collective over MPI_COMM_WORLD unless it says otherwise, and returns
 * the same code on every rank: 0, 2 (bad input: the message names the file and the field) or 1
 * (an I/O failure). Messages go into err, the same text on every rank. */
#ifndef DA_NPYIO_H
#define DA_NPYIO_H

#include <stddef.h>
#include <stdint.h>
#include "npy.h"

enum { DA_NPYIO_Q, DA_NPYIO_K, DA_NPYIO_V, DA_NPYIO_DOUT, DA_NPYIO_NIN };

/* What the input files say, once checked. */
typedef struct da_npy_inputs {
  int nfiles;       /* 3, or 4 with dout */
  int batched;      /* the files are [B, S, H, D] (else [S, H, D], B = 1) */
  int64_t B, S, H, G, D;
  int dtype;        /* DA_FLOAT32 / DA_BFLOAT16 / DA_FLOAT16 */
  char path[DA_NPYIO_NIN][4096];
  int64_t data_offset[DA_NPYIO_NIN];
} da_npy_inputs_t;

/* Values given on the command line that the files must agree with (-1 = not given). */
typedef struct da_npy_expect {
  int64_t B, S, H, G, D;
  int dtype;
} da_npy_expect_t;

/* Check q.npy, k.npy, v.npy (and dout.npy when backward) in dir: readable on every rank, header,
 * descr ('<f4' fp32, '<u2' bf16 bits, '<f2' fp16; little-endian), C order, [S,H,D] or [B,S,H,D],
 * the file size against header + shape, the files against each other (q vs dout shapes, k vs v,
 * S, B, D, H % G, dtype) and against `want`. */
int da_npyio_inspect(const char *dir, int backward, const da_npy_expect_t *want, da_npy_inputs_t *in, char *err,
                     size_t errlen);

/* Read rows pos[0..n) (increasing) of every batch element of a [B][S][row] file into buf
 * [B][n][row] (rowbytes bytes per row), with one MPI_File_read_all through a view built from
 * the positions: a contiguous run is one block, a striped shard one vector of stride P rows, a
 * zigzag shard two blocks; the batch is an outer level of extent S rows. */
int da_npyio_read(const char *path, int64_t data_offset, int64_t B, int64_t S, int64_t rowbytes, const int64_t *pos,
                  int64_t n, void *buf, char *err, size_t errlen);

/* The output directory exists and is writable on every rank, and none of the n output names
 * in it is taken by a directory or anything else a rename cannot replace (refused before the
 * run: exit 2). */
int da_npyio_check_dir(const char *dir, const char *const *names, int n, char *err, size_t errlen);

enum { DA_NPYIO_MAXOUT = 8 };

/* One output file: name ("out.npy"), descr, shape of the whole array, and this rank's rows
 * [B][n][row] in buf. */
typedef struct da_npy_out {
  const char *name;
  const char *descr;
  int ndim;
  int64_t shape[4];
  int64_t rowbytes;
  const void *buf;
} da_npy_out_t;

/* Write every file of outs[0..nout) (at most DA_NPYIO_MAXOUT) into dir as one set, replaced as a
 * whole or not at all (docs/launcher.md, "Outputs"):
 * 1. each file to a temporary name (".NAME.TAG.tmp", TAG = rank 0's pid and clock): rank 0 writes
 *    the header and every rank its rows with MPI_File_write_all through the same views as
 *    da_npyio_read; synced (MPI_File_sync) and closed, each error counted; then every rank reads
 *    its rows back and compares them, rank 0 the header and the file size (a full disk that an
 *    MPI-IO driver does not report shows here);
 * 2. rank 0 commits: a marker ".distattn-commit.TAG" lists the temporaries and backups; every
 *    existing final file is kept as ".NAME.TAG.old" (a hard link), the temporaries are renamed
 *    in order, a failed rename puts the old set back; then backups and marker are removed.
 * Any failure: every temporary removed, the final names untouched, the same error on every rank.
 * SIGINT / SIGTERM / SIGHUP / SIGQUIT before the commit remove this process's temporaries; during
 * the commit they are held until it is over. A process killed outright (SIGKILL) inside the
 * commit leaves the marker, which the next --output into dir names and clears. */
int da_npyio_write(const char *dir, int nout, const da_npy_out_t *outs, int64_t B, int64_t S, const int64_t *pos,
                   int64_t n, char *err, size_t errlen);

/* Streaming rows for verification: this rank opens the input files alone (MPI_COMM_SELF) and
 * reads rows on demand in bounded chunks with independent MPI_File_read_at; nothing collective.
 * da_npyio_source_row has the signature of da_vprob_t.rows. */
typedef struct da_npyio_source da_npyio_source_t;
da_npyio_source_t *da_npyio_source_open(const da_npy_inputs_t *in, char *err, size_t errlen);
int da_npyio_source_row(void *src, uint32_t tensor, int64_t b, int64_t pos, int heads, double *dst);
void da_npyio_source_close(da_npyio_source_t *src);

/* The .npy descr of a storage dtype: "<f4", "<u2" (bf16 bits), "<f2". */
const char *da_npyio_descr(int dtype);

#endif /* DA_NPYIO_H */
