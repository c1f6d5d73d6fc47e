/* frag.cuh: the per-lane index rules of mma.sync m16n8k16 (16-bit inputs, fp32 accumulators) and
 * of the ldmatrix loads that feed it, as DA_HD functions: the kernels use them to compute addresses
 * and store indices, the host tests hold them against the PTX ISA's fragment tables, and the SIMT
 * emulation of mma (ptx.cuh) uses them to gather the warp's fragments. No data movement here. */
#ifndef DA_CUDA_FRAG_CUH
#define DA_CUDA_FRAG_CUH

#include "compat.cuh"

/* A (row, col) position inside a tile. */
struct da_rc {
  int row, col;
};

/* ---- mma.sync.aligned.m16n8k16.row.col (PTX ISA "Matrix Fragments for mma.m16n8k16") ----
 * groupID = lane / 4, threadID_in_group = lane % 4. Element e of a fragment is half (e % 2) of
 * register e / 2: the low 16 bits hold the even element. */

/* A is 16 x 16 (M x K), row major: 8 elements in 4 registers a[0..3]. Registers 0 and 2 cover rows
 * groupID, 1 and 3 rows groupID + 8; registers 2 and 3 cover columns 8..15. */
DA_HD da_rc da_frag_a(int lane, int e) {
  int g = lane >> 2, t = lane & 3;
  return {g + ((e >> 1) & 1) * 8, t * 2 + (e & 1) + (e >> 2) * 8};
}

/* B is 16 x 8 (K x N), "col": 4 elements in 2 registers b[0..1]; row = k, col = n. b[1] covers
 * k 8..15. */
DA_HD da_rc da_frag_b(int lane, int e) {
  int g = lane >> 2, t = lane & 3;
  return {t * 2 + (e & 1) + (e >> 1) * 8, g};
}

/* C and D are 16 x 8 (M x N) fp32: 4 elements c[0..3]; c[2], c[3] are rows groupID + 8. */
DA_HD da_rc da_frag_c(int lane, int e) {
  int g = lane >> 2, t = lane & 3;
  return {g + (e >> 1) * 8, t * 2 + (e & 1)};
}

/* ---- ldmatrix (PTX ISA "ldmatrix"): lane t supplies the address of row t % 8 of 8x8 matrix t / 8;
 * r[i] receives matrix i, lane t holding its row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1 (with
 * .trans: column t / 4, rows 2 (t % 4) and 2 (t % 4) + 1). x2 reads the addresses of lanes 0-15.
 * Each rule below says which (row, col) of a 16-bit tile the lane must point at (every row start
 * is 16-byte aligned) so the registers come out as the named fragments. */

/* x4 from a row-major [m][k] 16 x 16 tile: r[0..3] = the A fragment a[0..3]. */
DA_HD da_rc da_ldsm_x4_a(int lane) { return {lane & 15, (lane >> 4) * 8}; }

/* x4 from an [n][k] tile (B stored transposed, e.g. K rows for S = Q K^T), 16 n by 16 k:
 * r[0..1] = the B fragment of n 0..7, r[2..3] = the B fragment of n 8..15. */
DA_HD da_rc da_ldsm_x4_b(int lane) { return {(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8}; }

/* x4 .trans from a [k][n] tile (B stored row-major, e.g. V rows for O = P V), 16 k by 16 n:
 * r[0..1] = the B fragment of n 0..7, r[2..3] = the B fragment of n 8..15. */
DA_HD da_rc da_ldsm_x4_bt(int lane) { return {lane & 15, (lane >> 4) * 8}; }

/* x2 from an [n][k] tile, 8 n by 16 k: r[0..1] = the B fragment. Lanes 16-31 may point anywhere
 * valid; the rule gives them the same rows as lanes 0-15. */
DA_HD da_rc da_ldsm_x2_b(int lane) { return {lane & 7, ((lane >> 3) & 1) * 8}; }

/* x2 .trans from a [k][n] tile, 16 k by 8 n: r[0..1] = the B fragment. */
DA_HD da_rc da_ldsm_x2_bt(int lane) { return {lane & 15, 0}; }

/* ---- shared-memory tile layout ----
 * Rows of ld 16-bit elements; a row is read in 16-byte chunks (8 elements). With the XOR swizzle,
 * chunk c of row r is stored at chunk da_swizzle(r, c): the 8 rows an ldmatrix matrix reads then
 * fall in 8 different 16-byte bank groups (no bank conflict) for any ld that is a multiple of 64
 * elements (128 bytes). The swizzle permutes chunks inside each aligned group of 8, so a row stays
 * a row. */
DA_HD int da_swizzle(int row, int chunk) { return chunk ^ (row & 7); }

/* Element offset of (row, col) in a tile of row stride ld (elements); swz selects the swizzle
 * (then ld % 64 == 0). col % 8 is kept inside its chunk, so a 16-byte aligned column stays one. */
DA_HD int da_tile_off(int row, int col, int ld, bool swz) {
  int c = swz ? (da_swizzle(row, col >> 3) << 3) | (col & 7) : col;
  return row * ld + c;
}

#endif /* DA_CUDA_FRAG_CUH */
