"""_arrays: turns the caller's arrays into da_tensor_t descriptors without copying.

Accepted: NumPy arrays; any object with __array_interface__ (viewed through NumPy); any object
with __dlpack__ on the CPU (NumPy's from_dlpack); torch tensors directly (their data pointer and
strides, so bfloat16 and CUDA tensors need no NumPy). The element type must be the problem's:
float32, float16 or bfloat16 (ml_dtypes.bfloat16, torch.bfloat16, or uint16 arrays holding the
raw bits). Nothing is ever converted or copied: a wrong dtype, or strides that are not a whole
number of elements, is a TypeError / ValueError naming the argument.
"""
import ctypes

import numpy as np

from . import _lib

DTYPES = {"float32": _lib.DA_FLOAT32, "fp32": _lib.DA_FLOAT32, "bfloat16": _lib.DA_BFLOAT16,
          "bf16": _lib.DA_BFLOAT16, "float16": _lib.DA_FLOAT16, "fp16": _lib.DA_FLOAT16}
DTYPE_NAMES = {_lib.DA_FLOAT32: "float32", _lib.DA_BFLOAT16: "bfloat16", _lib.DA_FLOAT16: "float16"}


def dtype_code(dtype):
    """A da_dtype_t from a name ('float32', 'bf16', ...), a NumPy dtype or a torch dtype."""
    if isinstance(dtype, int):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name in DTYPES:
        return DTYPES[name]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        pass
    if name in DTYPES:
        return DTYPES[name]
    raise TypeError(f"distattn: dtype {dtype!r} is not supported (float32, bfloat16, float16)")


def numpy_dtype(code):
    """The NumPy dtype that holds a da_dtype_t: float32, float16, and for bfloat16
    ml_dtypes.bfloat16 when installed, else uint16 (the raw bits; see bf16_to_float32)."""
    if code == _lib.DA_FLOAT32:
        return np.dtype(np.float32)
    if code == _lib.DA_FLOAT16:
        return np.dtype(np.float16)
    try:
        import ml_dtypes  # noqa: F401  (optional)
        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return np.dtype(np.uint16)


def _code_of_numpy(dt, want):
    if dt == np.float32:
        return _lib.DA_FLOAT32
    if dt == np.float16:
        return _lib.DA_FLOAT16
    if dt.name == "bfloat16" and dt.itemsize == 2:
        return _lib.DA_BFLOAT16
    if dt in (np.uint16, np.int16) and want == _lib.DA_BFLOAT16:
        return _lib.DA_BFLOAT16  # raw bfloat16 bits
    return None


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


class View:
    """A da_tensor_t over the caller's memory, and the object that keeps that memory alive."""

    __slots__ = ("t", "owner", "shape", "array")

    def __init__(self, t, owner, shape, array=None):
        self.t, self.owner, self.shape, self.array = t, owner, shape, array


def _fill(ptr, code, device, device_id, shape, strides, name):
    if not 1 <= len(shape) <= 4:
        raise ValueError(f"distattn: {name} has {len(shape)} dimensions (1 to 4 supported)")
    # The stride of an axis of length 1 (or of any axis of an empty array) never moves the address:
    # NumPy leaves such strides arbitrary (0 for empty arrays), the library checks them, so they
    # are given their contiguous values.
    strides, packed = list(strides), 1
    empty = any(n == 0 for n in shape)
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] <= 1 or empty:
            strides[i] = packed
        packed *= max(int(shape[i]), 1)
    t = _lib.Tensor()
    t.data, t.dtype, t.device, t.device_id, t.ndim = ptr, code, device, device_id, len(shape)
    for i, (n, s) in enumerate(zip(shape, strides)):
        t.shape[i], t.strides[i] = int(n), int(s)
    return t


def view(x, name, dtype=None, writable=False):
    """A View of x. dtype: the da_dtype_t the problem expects (None: taken from x)."""
    if x is None:
        return None
    want = None if dtype is None else dtype_code(dtype)
    if _is_torch(x):
        code = dtype_code(x.dtype) if str(x.dtype).replace("torch.", "") in DTYPES else None
        if code is None or (want is not None and code != want):
            raise TypeError(f"distattn: {name} is {x.dtype}, expected "
                            f"{DTYPE_NAMES.get(want, 'float32, bfloat16 or float16')}")
        if writable and x.requires_grad and x.is_leaf:
            raise ValueError(f"distattn: {name} is a leaf tensor that requires grad; pass a "
                             "tensor the library may overwrite")
        dev = _lib.DA_DEVICE_CUDA if x.device.type == "cuda" else _lib.DA_DEVICE_CPU
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"distattn: {name} is on {x.device}; CPU or CUDA tensors only")
        return View(_fill(x.data_ptr(), code, dev, x.device.index or 0, tuple(x.shape), x.stride(),
                          name), x, tuple(x.shape))
    if isinstance(x, np.ndarray):
        a = x
    elif hasattr(x, "__array_interface__") or hasattr(x, "__array_struct__"):
        a = np.asarray(x)
    elif hasattr(x, "__dlpack__"):
        a = np.from_dlpack(x)
    else:
        raise TypeError(f"distattn: {name} ({type(x).__name__}) is not an array: pass a NumPy array "
                        "or an object with __array_interface__ or __dlpack__")
    code = _code_of_numpy(a.dtype, want)
    if code is None or (want is not None and code != want):
        raise TypeError(f"distattn: {name} has dtype {a.dtype}, expected "
                        f"{DTYPE_NAMES.get(want, 'float32, bfloat16 or float16')} (the library never "
                        "converts: use .astype(...))")
    if writable and not a.flags.writeable:
        raise ValueError(f"distattn: {name} is read-only")
    item = a.dtype.itemsize
    if any(s % item for s in a.strides):
        raise ValueError(f"distattn: {name} has strides {a.strides} bytes, not whole elements")
    strides = tuple(s // item for s in a.strides)
    return View(_fill(a.ctypes.data, code, _lib.DA_DEVICE_CPU, 0, a.shape, strides, name), a,
                a.shape, a)


def lse_view(x, name="lse"):
    """lse is always float32, whatever the problem's dtype."""
    return view(x, name, _lib.DA_FLOAT32, writable=True)


def empty_like_spec(shape, code, like=None):
    """A new output array: a torch tensor when the inputs were torch tensors (same device),
    else NumPy."""
    if like is not None and _is_torch(like):
        import torch
        tdt = {_lib.DA_FLOAT32: torch.float32, _lib.DA_FLOAT16: torch.float16,
               _lib.DA_BFLOAT16: torch.bfloat16}[code]
        return torch.empty(shape, dtype=tdt, device=like.device)
    return np.empty(shape, dtype=numpy_dtype(code))


def ptr(v):
    return None if v is None else ctypes.byref(v.t)


# ---- bfloat16 helpers for NumPy without ml_dtypes ----------------------------------------------
def float32_to_bf16(a):
    """float32 array -> uint16 array of bfloat16 bits, rounded to nearest even (NaN stays NaN)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_to_float32(a):
    """uint16 array of bfloat16 bits (or an ml_dtypes.bfloat16 array) -> float32 array."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)
