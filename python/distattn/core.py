"""core: contexts, the problem description and single-rank attention (no MPI needed).

Shapes follow include/distattn.h: q and out are [B][S][H][D] (or [S][H][D]), k and v are
[B][S][G][D], lse is [B][S][H] float32. Any strides, last axis contiguous. Outputs are allocated
(NumPy, or torch like the inputs) unless passed in, and are overwritten.
"""
import threading
from ctypes import POINTER, byref, c_int64, c_void_p

import numpy as np

from . import _arrays, _lib
from ._lib import check


class _Handle:
    """Owns one C handle (_free_fn names the C function that frees it); free() is idempotent.
    The base of Context here and of dist's Comm, Plan, KVCache and DecodePlan."""
    _free_fn = None
    _noun = None  # what handle says was freed; None: "this <class name>"

    def __init__(self):
        self._h = c_void_p()

    @property
    def handle(self):
        if not self._h:
            raise ValueError(f"distattn: {self._noun or 'this ' + type(self).__name__} was freed")
        return self._h

    def free(self):
        """Free the handle (collective for plans, caches and communicators)."""
        if getattr(self, "_h", None):
            getattr(_lib.lib, self._free_fn)(self._h)
            self._h = c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


class Context(_Handle):
    """A backend choice and thread count, plus the last detailed error (da_context_t). Not
    thread-safe: use one per thread (the functions below default to one per thread).

    threads: CPU kernel threads, 0 = the cores this process is bound to (or DISTATTN_NTHREADS).
    device: "cpu" or "cuda"."""
    _free_fn = "da_context_free"
    _noun = "the context"

    def __init__(self, threads=0, device="cpu"):
        dev = {"cpu": _lib.DA_DEVICE_CPU, "cuda": _lib.DA_DEVICE_CUDA}.get(device)
        if dev is None:
            raise ValueError(f"distattn: device {device!r} (cpu or cuda)")
        threads = int(threads)
        if not -2**31 <= threads < 2**31:  # ctypes would wrap it silently; the library bounds it
            raise ValueError(f"distattn: threads {threads} is out of range")
        cfg = _lib.init_struct(_lib.Config, device=dev, nthreads=threads)
        h = c_void_p()
        check(_lib.lib.da_context_create(byref(cfg), byref(h)), None, "da_context_create")
        self._h = h
        self.device = device

    def last_error(self):
        return _lib.lib.da_last_error(self._h).decode(errors="replace") if self._h else ""


_local = threading.local()


def default_context():
    """This thread's context (CPU, default threads), created on first use."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        ctx = _local.ctx = Context()
    return ctx


class Problem:
    """The da_problem_t of a call, and the document boundaries it points to.

    causal: k_pos <= q_pos. window: W > 0 keeps 0 <= q_pos - k_pos < W (implies causal).
    doc_lens: lengths of packed documents (attention within a document only). scale: softmax
    scale, None = 1/sqrt(D)."""

    def __init__(self, *, batch=1, seq=0, heads, kv_heads=None, dim, dtype="float32",
                 causal=False, window=0, doc_lens=None, scale=None, block_q=0, block_k=0):
        mask = _lib.DA_MASK_NONE
        if causal:
            mask |= _lib.DA_MASK_CAUSAL
        if window:
            if window < 0:
                raise ValueError(f"distattn: window {window} must be > 0")
            mask |= _lib.DA_MASK_WINDOW
        self.cu = None
        ndocs = 0
        if doc_lens is not None:
            lens = np.asarray(doc_lens, dtype=np.int64).reshape(-1)
            self.cu = np.ascontiguousarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
            ndocs = len(lens)
            mask |= _lib.DA_MASK_DOC
        self.dtype = _arrays.dtype_code(dtype)
        self.c = _lib.init_struct(
            _lib.Problem, batch=int(batch), seq=int(seq), heads=int(heads),
            kv_heads=int(kv_heads or 0), dim=int(dim), mask=mask, window=int(window or 0),
            ndocs=ndocs, dtype=self.dtype, scale=float(scale or 0.0), block_q=int(block_q),
            block_k=int(block_k))
        if self.cu is not None:
            self.c.cu_seqlens = self.cu.ctypes.data_as(POINTER(c_int64))

    @property
    def ref(self):
        return byref(self.c)


def _split_shape(v, name, kind):
    """(B, S, heads, D) of a [B][S][h][D] or [S][h][D] view."""
    s = v.shape
    if len(s) == 4:
        return s
    if len(s) == 3:
        return (1,) + tuple(s)
    raise ValueError(f"distattn: {name} has shape {tuple(s)}; expected [B][S][{kind}][D] or [S][{kind}][D]")


def _out(x, name, shape, code, like):
    if x is None:
        x = _arrays.empty_like_spec(shape, code, like)
    return x, _arrays.view(x, name, code, writable=True)


def _lse(x, shape, like, want):
    if not want and x is None:
        return None, None
    if x is None:
        x = _arrays.empty_like_spec(shape, _lib.DA_FLOAT32, like)
    return x, _arrays.lse_view(x)


def attention_fwd(q, k, v, *, causal=False, window=0, doc_lens=None, scale=None, out=None,
                  lse=None, return_lse=True, ctx=None):
    """Single-rank attention. q [B][S][H][D] (or [S][H][D]); k, v [B][S][G][D]; the dtype of q
    (float32, float16, bfloat16) is the problem's. Returns (out, lse), lse [B][S][H] float32 (None
    when return_lse is False and no lse was passed). Rows whose mask allows no key: out 0, lse -inf."""
    ctx = ctx or default_context()
    qv = _arrays.view(q, "q")
    code = qv.t.dtype
    kv, vv = _arrays.view(k, "k", code), _arrays.view(v, "v", code)
    B, S, H, D = _split_shape(qv, "q", "H")
    G = _split_shape(kv, "k", "G")[2]
    prob = Problem(batch=B, seq=S, heads=H, kv_heads=G, dim=D, dtype=code, causal=causal,
                   window=window, doc_lens=doc_lens, scale=scale)
    out, ov = _out(out, "out", tuple(qv.shape), code, q)
    lse, lv = _lse(lse, tuple(qv.shape[:-1]), q, return_lse)
    check(_lib.lib.da_attention_fwd(ctx.handle, prob.ref, byref(qv.t), byref(kv.t), byref(vv.t),
                                    byref(ov.t), _arrays.ptr(lv), None), ctx.handle, "da_attention_fwd")
    return out, lse


def attention_bwd(q, k, v, out, dout, lse, *, causal=False, window=0, doc_lens=None, scale=None,
                  dq=None, dk=None, dv=None, ctx=None):
    """Single-rank backward: the inputs of the forward plus its out and lse, and dout (like out).
    Returns (dq, dk, dv) shaped like q, k, v (overwritten, not accumulated)."""
    ctx = ctx or default_context()
    qv = _arrays.view(q, "q")
    code = qv.t.dtype
    kv, vv = _arrays.view(k, "k", code), _arrays.view(v, "v", code)
    ov, dov = _arrays.view(out, "out", code), _arrays.view(dout, "dout", code)
    lv = _arrays.view(lse, "lse", _lib.DA_FLOAT32)
    B, S, H, D = _split_shape(qv, "q", "H")
    G = _split_shape(kv, "k", "G")[2]
    prob = Problem(batch=B, seq=S, heads=H, kv_heads=G, dim=D, dtype=code, causal=causal,
                   window=window, doc_lens=doc_lens, scale=scale)
    dq, dqv = _out(dq, "dq", tuple(qv.shape), code, q)
    dk, dkv = _out(dk, "dk", tuple(kv.shape), code, k)
    dv, dvv = _out(dv, "dv", tuple(vv.shape), code, v)
    check(_lib.lib.da_attention_bwd(ctx.handle, prob.ref, byref(qv.t), byref(kv.t), byref(vv.t),
                                    byref(ov.t), byref(dov.t), byref(lv.t), byref(dqv.t),
                                    byref(dkv.t), byref(dvv.t), None), ctx.handle, "da_attention_bwd")
    return dq, dk, dv


def attention_decode(q, k, v, *, window=0, scale=None, out=None, lse=None, return_lse=True, ctx=None):
    """Single-rank decode: q [B][T][H][D] holds the T newest tokens, at positions S-T .. S-1 of the
    cache k, v [B][S][G][D] (their own k/v included), causal among themselves. Returns (out, lse)."""
    ctx = ctx or default_context()
    qv = _arrays.view(q, "q")
    code = qv.t.dtype
    kv, vv = _arrays.view(k, "k", code), _arrays.view(v, "v", code)
    B, T, H, D = _split_shape(qv, "q", "H")
    _, S, G, _ = _split_shape(kv, "k", "G")
    prob = Problem(batch=B, seq=S, heads=H, kv_heads=G, dim=D, dtype=code, causal=True,
                   window=window, scale=scale)
    out, ov = _out(out, "out", tuple(qv.shape), code, q)
    lse, lv = _lse(lse, tuple(qv.shape[:-1]), q, return_lse)
    check(_lib.lib.da_attention_decode(ctx.handle, prob.ref, byref(qv.t), byref(kv.t), byref(vv.t),
                                       byref(ov.t), _arrays.ptr(lv), None), ctx.handle,
          "da_attention_decode")
    return out, lse


__all__ = ["Context", "Problem", "default_context", "attention_fwd", "attention_bwd",
           "attention_decode"]
