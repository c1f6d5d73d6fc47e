"""distattn: exact softmax attention over long sequences split across the ranks of an MPI job.

A ctypes binding of libdistattn (include/distattn.h); no compiled extension. Arrays are NumPy
arrays, objects with __array_interface__ / __dlpack__, or torch tensors, never copied. See
docs/library.md.

    import numpy as np, distattn
    from mpi4py import MPI
    plan = distattn.Plan(MPI.COMM_WORLD, seq=S, heads=H, kv_heads=G, dim=D, causal=True,
                         algo="zigzag")
    out, lse = plan.forward(q, k, v)              # this rank's rows: plan.positions
    dq, dk, dv = plan.backward(q, k, v, out, dout, lse)

Single rank: distattn.attention_fwd / attention_bwd / attention_decode. Decode over a distributed
cache: distattn.KVCache, distattn.DecodePlan. With torch importable: distattn.torch (the
PyTorch op: attention / attention_varlen on sharded sequences, shard / unshard, torch.compile
ready) and distattn.attention (a torch.autograd.Function over a Plan, distattn.autograd).
"""
from ._arrays import bf16_to_float32, float32_to_bf16
from ._lib import DistattnError, version
from ._lib import path as library_path
from .core import Context, Problem, attention_bwd, attention_decode, attention_fwd, default_context
from .dist import Comm, DecodePlan, KVCache, Plan

__version__ = "0.1.0"

__all__ = ["Context", "Problem", "Comm", "Plan", "KVCache", "DecodePlan", "DistattnError",
           "attention_fwd", "attention_bwd", "attention_decode", "default_context", "version",
           "library_path", "bf16_to_float32", "float32_to_bf16"]


def __getattr__(name):
    # The torch parts exist only when torch imports; importing them lazily keeps `import distattn`
    # fast for NumPy users. importlib, not `from . import x`: that form asks this very function
    # for the attribute first and recursed forever (RecursionError).
    import importlib
    if name in ("attention", "AttentionFunction", "autograd", "torch"):
        sub = "torch" if name == "torch" else "autograd"
        try:
            mod = importlib.import_module(f"{__name__}.{sub}")
        except ImportError as e:
            raise AttributeError(f"distattn.{name} needs torch ({e})") from None
        return mod if name in ("autograd", "torch") else getattr(mod, name)
    raise AttributeError(f"module 'distattn' has no attribute {name!r}")
