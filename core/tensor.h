/* tensor.h: the one check of a caller's tensor layout, shared by every path that takes a
 * da_tensor_t (single-rank calls in kernels/api.c, the ring plan in comm/plan.c, decode in
 * comm/tree.c and comm/kvcache.c). Shapes are the callers' business (they know what each axis
 * means); this decides whether the strides address every element once, inside a span of memory
 * that exists. No MPI, no CUDA. */
#ifndef DA_TENSOR_H
#define DA_TENSOR_H

#include <stddef.h>
#include <stdint.h>
#include "distattn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The last byte a tensor may reach, as an offset from address 0: 2^56, the user half of the
 * largest virtual address space of a 64-bit platform (x86-64 with 5-level paging; aarch64 uses
 * 52 bits). A stride that puts an element past it cannot point into real memory, and keeping
 * every span below it means no int64 element offset or size_t byte offset computed by the
 * kernels can overflow. */
#define DA_TENSOR_MAX_ADDRESS ((uint64_t)1 << 56)

/* Check the strides of t (shape already validated by the caller), elements of esz bytes:
 *  - with last_contiguous, the last axis has stride 1 unless it has a single element
 *    (DA_ERR_UNSUPPORTED: the kernels read rows as vectors; an lse [B][S][H] written element by
 *    element, as decode does, needs no such rule);
 *  - no axis of more than one element has a negative or zero stride;
 *  - the span data .. data + extent * esz stays below DA_TENSOR_MAX_ADDRESS, computed without
 *    overflow (a stride of 2^62 is refused here, not wrapped around);
 *  - the axes nest: taken by increasing stride, each stride is at least the extent of the axes
 *    below it. Every permutation (transpose) and positive-step slice of a dense array nests, so
 *    BSHD, SBHD and BHSD views, padded rows and packed-QKV slices are all accepted; two elements
 *    at one address never are. (Axes that interleave without colliding, like shape [3][3] with
 *    strides {3, 4}, are refused too: no framework produces them, and telling them apart from
 *    real overlap in general is a subset-sum problem.)
 * Axes of one element and tensors with no element are never refused for their strides.
 * who: prefix of the message ("" or "rank 3: "); name: the tensor ("q", "lse", ...); axes: a
 * name per axis ("batch", "tokens", "heads", "dim"), or NULL. On failure the message names the
 * tensor, the axis and the numbers. */
da_status_t da_tensor_check_strides(const da_tensor_t *t, size_t esz, int last_contiguous, const char *who,
                                    const char *name, const char *const *axes);

#ifdef __cplusplus
}
#endif
#endif /* DA_TENSOR_H */
