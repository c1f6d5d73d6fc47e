/* tensor.c: da_tensor_check_strides (core/tensor.h), the layout check of every tensor a caller
 * passes in. It looks at strides and the address span only; shapes, dtypes and devices are
 * checked by the caller, which knows what each axis means. */
#include <stdio.h>
#include "core.h"
#include "tensor.h"

static const char *axis_name(const char *const *axes, int i) { return axes && axes[i] ? axes[i] : "?"; }

/* 1 + sum (shape[i] - 1) * stride[i] over the axes of more than one element, in elements, or -1
 * when it overflows int64 (every term is >= 0 here: negative strides were refused before). */
static int64_t extent_elems(const da_tensor_t *t) {
  int64_t ext = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] <= 1) continue;
    int64_t term;
    if (da_mul_i64(t->shape[i] - 1, t->strides[i], &term) || da_add_i64(ext, term, &ext)) return -1;
  }
  return ext;
}

da_status_t da_tensor_check_strides(const da_tensor_t *t, size_t esz, int last_contiguous, const char *who,
                                    const char *name, const char *const *axes) {
  if (!who) who = "";
  if (!t || t->ndim < 1 || t->ndim > 4)
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: ndim %d (1 to 4)", who, name, t ? t->ndim : 0);
  for (int i = 0; i < t->ndim; i++)
    if (t->shape[i] < 0)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: axis %d (%s): shape %lld < 0", who, name, i,
                    axis_name(axes, i), (long long)t->shape[i]);
  for (int i = 0; i < t->ndim; i++)
    if (t->shape[i] == 0) return DA_SUCCESS; /* no element: nothing is addressed */
  const int last = t->ndim - 1;
  if (last_contiguous && t->shape[last] > 1 && t->strides[last] != 1)
    return DA_ERR(DA_ERR_UNSUPPORTED, "%s%s: axis %d (%s): stride %lld; the last axis must be contiguous (stride 1)",
                  who, name, last, axis_name(axes, last), (long long)t->strides[last]);
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] <= 1) continue; /* its stride never moves the address */
    if (t->strides[i] < 0)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: axis %d (%s): negative stride %lld (reversed views are not "
                    "supported)", who, name, i, axis_name(axes, i), (long long)t->strides[i]);
    if (t->strides[i] == 0)
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: axis %d (%s): stride 0 over %lld elements: they overlap (a "
                    "broadcast view; materialize it first)", who, name, i, axis_name(axes, i),
                    (long long)t->shape[i]);
  }
  /* The span must exist before the nesting walk below adds strides up. */
  const int64_t ext = extent_elems(t);
  const uint64_t base = (uint64_t)(uintptr_t)t->data;
  size_t bytes = 0;
  if (ext < 0 || da_mul_size((size_t)ext, esz, &bytes) || base > DA_TENSOR_MAX_ADDRESS ||
      bytes > DA_TENSOR_MAX_ADDRESS - base) {
    int big = 0; /* the axis whose stride carries the span out, for the message */
    for (int i = 1; i < t->ndim; i++)
      if (t->shape[i] > 1 && (t->shape[big] <= 1 || t->strides[i] > t->strides[big])) big = i;
    return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: axis %d (%s): stride %lld over %lld elements reaches past any "
                  "address (the span of the tensor overflows 2^56 bytes)", who, name, big, axis_name(axes, big),
                  (long long)t->strides[big], (long long)t->shape[big]);
  }
  /* Nesting: visit the axes by increasing stride; each must step over everything below it. */
  int order[4], n = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] <= 1) continue;
    int j = n++;
    for (; j > 0 && t->strides[order[j - 1]] > t->strides[i]; j--) order[j] = order[j - 1];
    order[j] = i;
  }
  int64_t below = 1; /* extent, in elements, of the axes visited so far (one element at first) */
  for (int j = 0; j < n; j++) {
    const int i = order[j];
    if (t->strides[i] < below) {
      const int k = order[j - 1]; /* j > 0: the first axis meets below == 1 <= its stride */
      return DA_ERR(DA_ERR_INVALID_ARGUMENT, "%s%s: axis %d (%s): stride %lld is inside the extent %lld of the "
                    "axes below it (axis %d (%s): stride %lld x %lld elements): the axes overlap", who, name, i,
                    axis_name(axes, i), (long long)t->strides[i], (long long)below, k, axis_name(axes, k),
                    (long long)t->strides[k], (long long)t->shape[k]);
    }
    below += (t->shape[i] - 1) * t->strides[i];
  }
  return DA_SUCCESS;
}
