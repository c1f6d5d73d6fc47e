"""distattn.torch: exact attention over a sequence sharded across the ranks of an MPI job, as a
PyTorch op (torch.library.custom_op with a fake implementation and autograd, so torch.compile
traces models that call it without a graph break).

    import distattn.torch as dt
    x_local = dt.shard(x, dim=1)                             # this rank's rows, zigzag order
    out = dt.attention(q, k, v, causal=True)                 # q [B][S_local][H][D], k, v [B][S_local][G][D]
    out = dt.attention_varlen(q, k, v, cu_seqlens, causal=True)  # packed documents: [S_local][H][D]
    y = dt.unshard(out, dim=1)                               # the whole sequence, on every rank

It replaces ring-flash-attention's `zigzag_ring_flash_attn_func(q, k, v, causal=True, group=pg)`
(README.md, "PyTorch"). Each rank passes its local rows in the order `shard` produces; the
global sequence length is the sum of the ranks' local lengths. The dtype is the tensors' own
(float32, bfloat16 or float16; q, k, v alike); the output has q's dtype, gradients those of q,
k, v. Tensors are read through their strides (qkv_format "bshd", "sbhd" or "bhsd", or any view
whose axes nest); only a last axis that is not contiguous is copied, as flash-attn does.

group: None (MPI.COMM_WORLD), an mpi4py communicator, or a torch.distributed ProcessGroup whose
processes are ranks of one MPI job (started by mpirun or srun): its ranks are mapped onto MPI
ranks once, at first use, and a group that does not map is refused on every member.
Every call is collective over the group: all its ranks call with the same shapes and options,
checked at every call (a mismatch is a ValueError on every rank, never a hang). Under
torch.compile the group is resolved once, while tracing, and becomes a constant of the graph.
"""
import hashlib
import math
import os
import struct
import threading
from typing import Optional

import numpy as np
import torch

from .dist import Comm, Plan

__all__ = ["attention", "attention_varlen", "shard", "unshard", "positions", "register_group"]

_LAYOUTS = ("zigzag", "contiguous", "ring", "striped")
_FORMATS = {"bshd": (0, 1, 2, 3), "sbhd": (1, 0, 2, 3), "bhsd": (0, 2, 1, 3)}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()


# ---- groups ----------------------------------------------------------------------------------
class _Group:
    """An MPI communicator behind a user's group, with its distattn Comm (created once)."""

    def __init__(self, mpi_comm, what):
        self.mpi = mpi_comm
        self.what = what
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self._comm = None

    @property
    def comm(self):
        if self._comm is None:
            self._comm = Comm(self.mpi)
        return self._comm


_groups = {}      # key -> _Group; key 0 is MPI.COMM_WORLD
_group_keys = {}  # id(user group object) -> (key, user group object: kept alive so ids stay unique)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("distattn.torch needs mpi4py (pip install mpi4py, or apt install "
                          "python3-mpi4py)") from e
    return MPI


def _map_process_group(pg):
    """An MPI communicator holding the processes of torch ProcessGroup pg, in pg's rank order.
    The members exchange their MPI identity over pg itself (so only they take part), then check
    that they are distinct ranks of one MPI job before any MPI call spans them."""
    import torch.distributed as tdist
    MPI = _mpi()
    if not tdist.is_available() or not tdist.is_initialized():
        raise ValueError("distattn: group is a torch ProcessGroup but torch.distributed is not "
                         "initialized (init_process_group first)")
    job = os.environ.get("PMIX_NAMESPACE") or os.environ.get("OMPI_MCA_ess_base_jobid") or \
        ":".join(os.environ.get(v, "") for v in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
    me = (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), job)
    ids = [None] * tdist.get_world_size(pg)
    tdist.all_gather_object(ids, me, group=pg)
    ranks = [r for r, _, _ in ids]
    same_job = len({(s, j) for _, s, j in ids}) == 1
    if not same_job or len(set(ranks)) != len(ranks):
        raise ValueError(
            "distattn: the torch ProcessGroup does not map onto one MPI job: its ranks are, as "
            "(MPI rank, MPI world size, job) " + ", ".join(map(str, ids)) + ". Start every "
            "process with one mpirun (or srun) and pass a group of its ranks, or pass an mpi4py "
            "communicator")
    sub = MPI.COMM_WORLD.Create_group(MPI.COMM_WORLD.Get_group().Incl(ranks))
    return _Group(sub, f"torch group of MPI ranks {ranks}")


@torch._dynamo.assume_constant_result
def _group_key(group):
    # Under torch.compile this runs once while tracing and its int becomes a constant of the
    # graph, so the op sees no Python object it cannot trace.
    return register_group(group)


def register_group(group):
    """The integer key of group (None, an mpi4py communicator, a torch ProcessGroup, or a key),
    mapping it onto MPI at first use. Collective over the group's members the first time.
    attention() calls it itself; call it beforehand to pass the key inside a torch.compile'd
    model (an int is a constant to the compiler, a group object may not be)."""
    with _lock:
        if group is None or (isinstance(group, int) and group == 0):
            if 0 not in _groups:
                _groups[0] = _Group(_mpi().COMM_WORLD, "MPI.COMM_WORLD")
            return 0
        if isinstance(group, int):
            if group not in _groups:
                raise ValueError(f"distattn: group key {group} was not registered")
            return group
        hit = _group_keys.get(id(group))
        if hit is not None and hit[1] is group:
            return hit[0]
        MPI = _mpi()
        if isinstance(group, MPI.Comm):
            if group == MPI.COMM_NULL:
                raise ValueError("distattn: group is MPI.COMM_NULL")
            g = _Group(group, "mpi4py communicator")
        elif type(group).__name__ == "ProcessGroup" or hasattr(group, "rank") and hasattr(group, "size") \
                and "torch" in type(group).__module__:
            g = _map_process_group(group)
        else:
            raise TypeError(f"distattn: group must be None, an mpi4py communicator or a torch "
                            f"ProcessGroup, not {type(group).__name__}")
        key = len(_groups) + 1
        _groups[key] = g
        _group_keys[id(group)] = (key, group)
        return key


# ---- plans -------------------------------------------------------------------------------------
_plans = {}  # (group key, problem tuple) -> Plan, oldest first
# Plans hold buffers sized for their problem; a run whose sequence length varies would keep one
# per length. The oldest goes past this many. Every rank makes the same calls in the same order,
# so every rank frees the same plan at the same call (a free is collective).
MAX_PLANS = 16


def _check_same(g, row, names):
    """Every rank of g passes the same problem: row (int64 values) is gathered from all ranks and
    compared; a difference raises on every rank, naming the field and the ranks' values."""
    mine = np.asarray(row, dtype=np.int64)
    rows = np.empty((g.size, mine.size), dtype=np.int64)
    g.mpi.Allgather(mine, rows)
    for j, name in enumerate(names):
        if name is not None and (rows[:, j] != rows[0, j]).any():
            raise ValueError(f"distattn: ranks of the {g.what} disagree on {name}: "
                             f"{rows[:, j].tolist()} (rank order); every rank must call with the "
                             "same shapes and options")
    return rows


def _layout_name(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"distattn: layout {layout!r}: one of zigzag, contiguous, striped")
    return "ring" if layout == "contiguous" else layout


def _plan(gkey, q, k, v, causal, window, scale, layout, cu):
    """The plan of this call (created collectively at first use), after checking that every rank
    passes the same problem and that this rank's rows are the count the layout gives it."""
    g = _groups[gkey]
    B, n, H, D = q.shape
    G = k.shape[2]
    layout = _layout_name(layout)
    cu_t = tuple(int(c) for c in cu.tolist()) if cu is not None else ()
    cu_hash = int.from_bytes(hashlib.sha1(repr(cu_t).encode()).digest()[:7], "little")
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    row = [B, H, G, D, _DTYPES[q.dtype], int(causal), int(window), scale_bits,
           _LAYOUTS.index(layout), cu_hash, n]
    names = ["batch", "heads", "kv heads", "head dim", "dtype", "causal", "window", "softmax_scale",
             "layout", "cu_seqlens", None]
    rows = _check_same(g, row, names)
    S = int(rows[:, -1].sum())
    key = (gkey, B, S, H, G, D, q.dtype, bool(causal), int(window), float(scale), layout, cu_t)
    p = _plans.get(key)
    if p is None:
        if cu_t and (cu_t[0] != 0 or cu_t[-1] != S or any(b < a for a, b in zip(cu_t, cu_t[1:]))):
            raise ValueError(f"distattn: cu_seqlens {list(cu_t)} must rise from 0 to the global "
                             f"sequence length {S} (the sum of the ranks' local lengths)")
        p = Plan(g.comm, seq=S, heads=H, kv_heads=G, dim=D, batch=B,
                 dtype=str(q.dtype).replace("torch.", ""), causal=causal, window=window,
                 doc_lens=np.diff(cu_t) if cu_t else None, scale=scale or None, algo=layout)
        # Every rank must hold the rows the layout gives it; agreed on so all ranks raise.
        counts = np.empty(g.size, dtype=np.int64)
        g.mpi.Allgather(np.asarray([p.local_rows], dtype=np.int64), counts)
        if (counts != rows[:, -1]).any():
            p.free()
            raise ValueError(f"distattn: local sequence lengths {rows[:, -1].tolist()} (rank order) "
                             f"are not the {layout} split of {S} tokens over {g.size} ranks "
                             f"({counts.tolist()}): build the local tensors with distattn.torch.shard")
        _plans[key] = p
        while len(_plans) > MAX_PLANS:
            _plans.pop(next(iter(_plans))).free()
    return p


def _check_inputs(q, k, v, what, shapes=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"distattn: {name} is a {type(t).__name__}, not a torch tensor")
        if t.dim() != 4:
            raise ValueError(f"distattn: {name} has shape {tuple(t.shape)}; {what}")
        if t.device.type != "cpu":
            raise ValueError(f"distattn: {name} is on {t.device}; this distattn build runs its "
                             "attention on the CPU (move the tensors with .cpu())")
        if t.dtype not in _DTYPES:
            raise TypeError(f"distattn: {name} is {t.dtype}; float32, bfloat16 or float16")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"distattn: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not shapes:
        return
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"distattn: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected q [B][S][H][D] and k, v [B][S][G][D]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"distattn: {q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                         "kv heads")


def _last_contiguous(t):
    # The kernels read rows of D elements as vectors: only a strided last axis is copied.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ---- the op --------------------------------------------------------------------------------------
@torch.library.custom_op("distattn::attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
         group: int, causal: bool, window: int, scale: float, layout: str
         ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    p = _plan(group, q, k, v, causal, window, scale, layout, cu_seqlens)
    return p.forward(q, k, v)


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, group, causal, window, scale, layout):
    B, n, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, n, H), dtype=torch.float32)


@torch.library.custom_op("distattn::attention_bwd", mutates_args=())
def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
         lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], group: int, causal: bool, window: int,
         scale: float, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    p = _plan(group, q, k, v, causal, window, scale, layout, cu_seqlens)
    return p.backward(q, k, v, out, dout, lse)


@_bwd.register_fake
def _bwd_fake(q, k, v, out, dout, lse, cu_seqlens, group, causal, window, scale, layout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu, group, causal, window, scale, layout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.opts = (group, causal, window, scale, layout)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    # The incoming gradient is often a broadcast (out.sum(...) gives stride-0 axes), which the
    # library refuses as overlapping: it is materialized (a no-op when already dense).
    dout = dout.to(out.dtype).contiguous()
    dq, dk, dv = _bwd(q, k, v, out, dout, lse, cu, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- the functions users call --------------------------------------------------------------------
def _to_bshd(t, qkv_format):
    perm = _FORMATS.get(qkv_format)
    if perm is None:
        raise ValueError(f"distattn: qkv_format {qkv_format!r}: bshd, sbhd or bhsd")
    return t.permute(*perm) if t.dim() == 4 else t


def _from_bshd(t, qkv_format):
    perm = _FORMATS[qkv_format]
    inv = [perm.index(i) for i in range(4)]
    return t.permute(*inv)


def attention(q, k, v, causal=False, window=0, softmax_scale=None, group=None, layout="zigzag",
              qkv_format="bshd", return_lse=False):
    """Attention of this rank's queries against the keys of the whole sequence.

    q: [B][S_local][H][D], k and v: [B][S_local][G][D] (H a multiple of G: GQA / MQA), this rank's
    rows of the sequence in the order of `layout` ("zigzag" (default), "contiguous", "striped"),
    as shard() makes them. qkv_format "sbhd" or "bhsd" takes tensors in that axis order (views,
    no copy) and returns out in it. causal: key position <= query position; window W > 0: keys
    W - 1 positions back at most (implies causal); softmax_scale: default 1/sqrt(D). Returns out
    like q (and lse [B][S_local][H] float32 with return_lse). Differentiable in q, k, v."""
    key = _group_key(group)
    _check_inputs(q, k, v, f"expected 4 axes ({qkv_format})", shapes=False)
    qb, kb, vb = (_to_bshd(t, qkv_format) for t in (q, k, v))
    _check_inputs(qb, kb, vb, "expected q [B][S][H][D] and k, v [B][S][G][D]")
    window = int(window or 0)
    if window < 0:
        raise ValueError(f"distattn: window {window} must be >= 0 (0: none)")
    scale = float(softmax_scale) if softmax_scale is not None else 0.0
    if softmax_scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"distattn: softmax_scale {softmax_scale} must be positive and finite")
    _layout_name(layout)
    out, lse = _fwd(qb, kb, vb, None, key, bool(causal), window, scale, layout)
    out = _from_bshd(out, qkv_format)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens, causal=False, window=0, softmax_scale=None, group=None,
                     layout="zigzag", return_lse=False):
    """Attention over packed documents, flash_attn_varlen_func's form: cu_seqlens (a tensor or a
    list, the same on every rank) holds the cumulative lengths [0, l0, l0 + l1, ..., S] of the
    documents packed into the global sequence of S tokens; a query sees only keys of its own
    document (and the causal / window mask). q [S_local][H][D], k and v [S_local][G][D] (or with
    a leading batch axis of 1): this rank's rows of the packed sequence in `layout` order."""
    key = _group_key(group)
    flat = q.dim() == 3
    if flat:
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    _check_inputs(q, k, v, "expected [S_local][H][D] (or [1][S_local][H][D])")
    if q.shape[0] != 1:
        raise ValueError(f"distattn: attention_varlen takes one packed sequence (batch 1), got {q.shape[0]}")
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64, device="cpu").reshape(-1)
    if cu.numel() < 2:
        raise ValueError("distattn: cu_seqlens needs at least two entries (0 and S)")
    window = int(window or 0)
    if window < 0:
        raise ValueError(f"distattn: window {window} must be >= 0 (0: none)")
    scale = float(softmax_scale) if softmax_scale is not None else 0.0
    _layout_name(layout)
    out, lse = _fwd(q, k, v, cu, key, bool(causal), window, scale, layout)
    if flat:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


# ---- sharding helpers ----------------------------------------------------------------------------
_positions = {}


def positions(seq_len, group=None, layout="zigzag"):
    """The global positions (int64 tensor) of this rank's rows when a sequence of seq_len tokens is
    split over the group in `layout` (the order attention() expects). Collective the first time
    for a (group, seq_len, layout)."""
    key = register_group(group)
    lay = _layout_name(layout)
    pk = (key, int(seq_len), lay)
    pos = _positions.get(pk)
    if pos is None:
        # The split depends on the length, the ranks and the layout only: a one-head plan tells.
        g = _groups[key]
        p = Plan(g.comm, seq=int(seq_len), heads=1, dim=1, algo=lay)
        pos = _positions[pk] = torch.from_numpy(np.array(p.positions, dtype=np.int64))
        p.free()
    return pos


def shard(x, group=None, layout="zigzag", dim=1):
    """This rank's rows of x (the whole sequence, the same on every rank) along axis dim, in the
    order attention() expects. Differentiable (an index_select)."""
    pos = positions(x.shape[dim], group, layout)
    return x.index_select(dim, pos.to(x.device))


def unshard(x, group=None, layout="zigzag", dim=1):
    """The inverse of shard: every rank's local rows gathered into the whole sequence along dim,
    on every rank (collective). Not differentiable (for results and checks)."""
    key = register_group(group)
    g = _groups[key]
    parts = g.mpi.allgather(x.detach().cpu())
    S = sum(p.shape[dim] for p in parts)
    full = x.new_empty(x.shape[:dim] + (S,) + x.shape[dim + 1:])
    # The positions of every rank: gathered, since a rank knows only its own.
    pos = g.mpi.allgather(positions(S, key, layout).numpy())
    for p, idx in zip(parts, pos):
        full.index_copy_(dim, torch.from_numpy(idx).to(x.device), p.to(x.device))
    return full
