"""dist: distributed attention over MPI (da_comm_*, da_plan_*) and decode over a distributed
paged KV cache (da_kvcache_*, da_decode_*), with an mpi4py communicator.

Every call marked collective must be made by every rank of the communicator, in the same order.
A failure on any rank raises DistattnError on every rank (status "remote" on the ranks that did
not fail themselves), never a hang: waits give up after the timeout (default 300 s,
DISTATTN_TIMEOUT). Objects own their C handle: free() them (or use `with`) on every rank; when
garbage collected they are freed too, which is safe in practice (the frees release MPI handles
without messages in Open MPI, and do nothing with MPI after MPI_Finalize).
"""
import ctypes
from ctypes import POINTER, byref, c_double, c_int, c_int64, c_size_t, c_void_p

import numpy as np

from . import _arrays, _lib
from ._lib import check
from .core import Problem, _Handle, _lse, _out, default_context


def _need_mpi():
    if not _lib.HAVE_MPI:
        raise RuntimeError(f"distattn: {_lib.path} was built without MPI: no distributed API")


def _mpi_comm_arg(comm):
    """(ctypes type, value) of the MPI_Comm behind an mpi4py communicator (or a raw handle, an
    int). Open MPI's MPI_Comm is a pointer, MPICH's an int: the size tells which."""
    if isinstance(comm, int):
        return c_void_p, comm
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("distattn: the distributed API takes an mpi4py communicator "
                          "(apt install python3-mpi4py, or pip install mpi4py)") from e
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"distattn: expected an mpi4py communicator, got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("distattn: the communicator is MPI.COMM_NULL")
    size = MPI._sizeof(MPI.Comm)
    ctype = {4: c_int, 8: c_void_p}.get(size)
    if ctype is None:
        raise RuntimeError(f"distattn: MPI_Comm of {size} bytes is not supported")
    return ctype, MPI._handleof(comm)


class Comm(_Handle):
    """A distattn communicator (da_comm_t): a private duplicate of the caller's MPI communicator
    plus a context. Collective. comm: an mpi4py communicator (default MPI.COMM_WORLD) or the
    integer value of an MPI_Comm; ctx: a Context (default: this thread's); timeout: seconds the
    ranks wait for each other while it is made (0 = DISTATTN_TIMEOUT or 300): a rank that never
    calls it makes the others raise DistattnError "timeout" after that long."""
    _free_fn = "da_comm_free"

    def __init__(self, comm=None, ctx=None, *, timeout=0.0):
        super().__init__()
        _need_mpi()
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        ctype, value = _mpi_comm_arg(comm)
        fn = _lib.lib.da_comm_create_config
        fn.restype = c_int
        fn.argtypes = [c_void_p, ctype, POINTER(_lib.CommConfig), POINTER(c_void_p)]
        self.ctx = ctx or default_context()
        cfg = _lib.init_struct(_lib.CommConfig, timeout=float(timeout))
        check(fn(self.ctx.handle, ctype(value), byref(cfg), byref(self._h)), self.ctx.handle, "da_comm_create")

    @property
    def rank(self):
        return _lib.lib.da_comm_rank(self.handle)

    @property
    def size(self):
        return _lib.lib.da_comm_size(self.handle)

    def _check(self, st, call):
        check(st, self.ctx.handle, call)


def _stats_dict(s, arrays=()):
    d = {}
    for name, _ in s._fields_:
        if name in ("size", "version"):
            continue
        val = getattr(s, name)
        if name in arrays:
            n = s.nsteps
            val = [val[i] for i in range(n)] if val else []
        d[name] = val
    return d


class Plan(_Handle):
    """A distributed attention plan (da_plan_t). Collective.

    seq: the global sequence length; heads, kv_heads (default heads), dim, batch; dtype
    ("float32", "bfloat16", "float16"); the mask: causal, window, doc_lens; scale. algo: "ring"
    (contiguous shards), "striped" or "zigzag" (balanced under a causal mask), "ulysses" (all-to-all
    of heads for tokens; heads % ranks == 0, docs/ulysses.md). block: KV sub-block
    in tokens (0 = automatic), transport ("mpi", or "self" on one rank), timeout in seconds.

    Each rank passes its LOCAL rows: q and out [B][n][H][D] (or [n][H][D] when batch is 1), k and v
    [B][n][G][D], with n = plan.local_rows and local row i at global position plan.positions[i]."""
    _free_fn = "da_plan_free"

    def __init__(self, comm, *, seq, heads, dim, kv_heads=None, batch=1, dtype="float32",
                 causal=False, window=0, doc_lens=None, scale=None, algo="ring", block=0,
                 transport=None, timeout=0.0):
        super().__init__()
        if not isinstance(comm, Comm):
            comm = Comm(comm)
        self.comm = comm
        self.problem = Problem(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads or heads,
                               dim=dim, dtype=dtype, causal=causal, window=window,
                               doc_lens=doc_lens, scale=scale)
        if algo not in _lib.PLAN_ALGOS:
            raise ValueError(f"distattn: algo {algo!r} (ring, striped, zigzag, ulysses)")
        self._transport = transport.encode() if transport else None
        cfg = _lib.init_struct(_lib.PlanConfig, algo=_lib.PLAN_ALGOS[algo], block=int(block),
                               transport=self._transport, timeout=float(timeout))
        comm._check(_lib.lib.da_plan_create(comm.handle, self.problem.ref, byref(cfg), byref(self._h)),
                    "da_plan_create")
        self.batch, self.seq, self.heads = int(batch), int(seq), int(heads)
        self.kv_heads, self.dim = int(kv_heads or heads), int(dim)
        self.dtype = self.problem.dtype
        self._positions = None

    @property
    def local_rows(self):
        """This rank's number of rows n (local)."""
        return int(_lib.lib.da_plan_local_rows(self.handle))

    @property
    def positions(self):
        """The global positions of this rank's rows, in local order (int64 [n], local)."""
        if self._positions is None:
            n = self.local_rows
            pos = np.empty(max(n, 1), dtype=np.int64)
            self.comm._check(_lib.lib.da_plan_local_positions(
                self.handle, pos.ctypes.data_as(POINTER(c_int64)), n), "da_plan_local_positions")
            self._positions = pos[:n]
            self._positions.flags.writeable = False
        return self._positions

    def local_shape(self, kind="q"):
        """Shape of this rank's q/out ("q"), k/v ("kv") or lse ("lse") arrays."""
        n = self.local_rows
        lead = (self.batch, n) if self.batch > 1 else (n,)
        return {"q": lead + (self.heads, self.dim), "kv": lead + (self.kv_heads, self.dim),
                "lse": lead + (self.heads,)}[kind]

    def forward(self, q, k, v, out=None, lse=None, return_lse=True):
        """Forward over the local rows (collective). Returns (out, lse); lse [B][n][H] float32 is
        what backward needs."""
        code = self.dtype
        qv, kv, vv = (_arrays.view(q, "q", code), _arrays.view(k, "k", code),
                      _arrays.view(v, "v", code))
        out, ov = _out(out, "out", tuple(qv.shape), code, q)
        lse, lv = _lse(lse, tuple(qv.shape[:-1]), q, return_lse)
        self.comm._check(_lib.lib.da_plan_fwd(self.handle, byref(qv.t), byref(kv.t), byref(vv.t),
                                              byref(ov.t), _arrays.ptr(lv), None), "da_plan_fwd")
        return out, lse

    def backward(self, q, k, v, out, dout, lse, dq=None, dk=None, dv=None):
        """Backward over the local rows (collective): returns (dq, dk, dv) for this rank's own
        queries and keys, overwritten (not accumulated), fp32 accumulation across every step."""
        code = self.dtype
        qv, kv, vv = (_arrays.view(q, "q", code), _arrays.view(k, "k", code),
                      _arrays.view(v, "v", code))
        ov, dov = _arrays.view(out, "out", code), _arrays.view(dout, "dout", code)
        lv = _arrays.view(lse, "lse", _lib.DA_FLOAT32)
        dq, dqv = _out(dq, "dq", tuple(qv.shape), code, q)
        dk, dkv = _out(dk, "dk", tuple(kv.shape), code, k)
        dv, dvv = _out(dv, "dv", tuple(vv.shape), code, v)
        self.comm._check(_lib.lib.da_plan_bwd(self.handle, byref(qv.t), byref(kv.t), byref(vv.t),
                                              byref(ov.t), byref(dov.t), byref(lv.t), byref(dqv.t),
                                              byref(dkv.t), byref(dvv.t), None), "da_plan_bwd")
        return dq, dk, dv

    def set_mode(self, mode):
        """'run' (default), 'compute-only' or 'comm-only' (benchmarks only: wrong results)."""
        self.comm._check(_lib.lib.da_plan_set_mode(self.handle, _lib.PLAN_MODES[mode]),
                         "da_plan_set_mode")

    def stats(self):
        """This rank's figures of the last forward / backward (da_plan_stats_t) as a dict."""
        s = _lib.init_struct(_lib.PlanStats, output=True)
        self.comm._check(_lib.lib.da_plan_stats(self.handle, byref(s)), "da_plan_stats")
        return _stats_dict(s, arrays=("fwd_step_compute_s", "fwd_step_wait_s", "bwd_step_compute_s",
                                      "bwd_step_wait_s", "fwd_step_bytes", "bwd_step_bytes"))


class _CacheMemory:
    """The C handle of a KV cache, owned by the KVCache and by every page view of it: the pages
    are released (da_kvcache_free) when the last of them lets go, so a view used after
    KVCache.free() still reads the cache's memory instead of freed memory (a segfault before).
    It holds the Comm too: a handle is freed before the one it was made from."""

    def __init__(self, h, comm):
        self.h, self.comm = h, comm

    def __del__(self):
        if self.h:
            _lib.lib.da_kvcache_free(self.h)
            self.h = None


class KVCache(_Handle):
    """A KV cache spread over the ranks in pages (da_kvcache_t). Collective.

    batch sequences of rows [kv_heads][dim] in dtype; page: tokens per page (0 = 256); layout of
    a prefill: "ring" (contiguous), "striped" or "zigzag", as the Plan that produced it; weights:
    per-rank capacity weights (None = equal)."""
    _free_fn = "da_kvcache_free"

    def __init__(self, comm, *, kv_heads, dim, batch=1, dtype="float32", page=0, layout="ring",
                 weights=None, timeout=0.0):
        super().__init__()
        if not isinstance(comm, Comm):
            comm = Comm(comm)
        self.comm = comm
        self.problem = Problem(batch=batch, seq=1, heads=kv_heads, kv_heads=kv_heads, dim=dim,
                               dtype=dtype)
        if layout not in _lib.ALGOS:
            raise ValueError(f"distattn: layout {layout!r} (ring, striped, zigzag)")
        w = None
        if weights is not None:
            w = np.ascontiguousarray(weights, dtype=np.float64)
            if w.shape != (comm.size,):
                raise ValueError(f"distattn: weights has {w.size} entries for {comm.size} ranks")
        cfg = _lib.init_struct(_lib.KVCacheConfig, page=int(page), layout=_lib.ALGOS[layout],
                               timeout=float(timeout))
        if w is not None:
            cfg.weights = w.ctypes.data_as(POINTER(c_double))
        comm._check(_lib.lib.da_kvcache_create(comm.handle, self.problem.ref, byref(cfg),
                                               byref(self._h)), "da_kvcache_create")
        self._mem = _CacheMemory(c_void_p(self._h.value), comm)
        self.batch, self.kv_heads, self.dim = int(batch), int(kv_heads), int(dim)
        self.dtype = self.problem.dtype

    def free(self):
        """Let go of the cache (collective): released now, or, while page views of it are
        alive, when the last of them is."""
        if getattr(self, "_h", None):
            self._h = c_void_p()
            self._mem = None  # the last reference frees it (CPython: at once when no view holds it)

    def prefill(self, b, length, k=None, v=None):
        """Fill the empty sequence b with positions 0 .. length-1 (collective). k, v: this rank's
        rows [n][G][D] in local order (what a Plan with the same layout and seq = length holds);
        None: allocate the pages only (fill them through page())."""
        code = self.dtype
        kv, vv = _arrays.view(k, "k", code), _arrays.view(v, "v", code)
        self.comm._check(_lib.lib.da_kvcache_prefill(self.handle, int(b), int(length),
                                                     _arrays.ptr(kv), _arrays.ptr(vv)),
                         "da_kvcache_prefill")

    def append(self, k=None, v=None, ntok=None):
        """Append tokens to every sequence (local: no message; every rank passes the same ntok and
        rows). k, v: [B][T][G][D] (or [B][G][D], one token each). ntok: tokens per sequence
        (default T for every sequence; required when k and v are None)."""
        code = self.dtype
        kv, vv = _arrays.view(k, "k", code), _arrays.view(v, "v", code)
        if ntok is None:
            if kv is None:
                raise ValueError("distattn: append without k/v needs ntok")
            T = kv.shape[1] if len(kv.shape) == 4 else 1
            ntok = [T] * self.batch
        nt = np.ascontiguousarray(ntok, dtype=np.int64)
        if nt.shape != (self.batch,):
            raise ValueError(f"distattn: ntok has {nt.size} entries for {self.batch} sequences")
        self.comm._check(_lib.lib.da_kvcache_append(self.handle, nt.ctypes.data_as(POINTER(c_int64)),
                                                    _arrays.ptr(kv), _arrays.ptr(vv)),
                         "da_kvcache_append")

    def length(self, b=0):
        return int(_lib.lib.da_kvcache_length(self.handle, int(b)))

    def local_rows(self, b=0):
        return int(_lib.lib.da_kvcache_local_rows(self.handle, int(b)))

    def local_positions(self, b=0):
        n = self.local_rows(b)
        pos = np.empty(max(n, 1), dtype=np.int64)
        self.comm._check(_lib.lib.da_kvcache_local_positions(
            self.handle, int(b), pos.ctypes.data_as(POINTER(c_int64)), n), "da_kvcache_local_positions")
        return pos[:n]

    def num_pages(self, b=0):
        return int(_lib.lib.da_kvcache_num_pages(self.handle, int(b)))

    def page(self, b, i):
        """Page i of this rank's pages of sequence b: (k, v, positions) where k and v are NumPy
        views [count][G][D] of the cache's own memory (writing them fills the cache in place; they keep
        the pages alive, even past free()) and positions the global positions of their rows."""
        pg = _lib.init_struct(_lib.KVCachePage)
        self.comm._check(_lib.lib.da_kvcache_get_page(self.handle, int(b), int(i), byref(pg)),
                         "da_kvcache_get_page")
        dt = _arrays.numpy_dtype(self.dtype)
        G, D, n = self.kv_heads, self.dim, int(pg.count)

        def arr(p, ld):
            if n == 0 or not p:
                return np.empty((0, G, D), dtype=dt)
            nbytes = ((n - 1) * ld + G * D) * dt.itemsize
            buf = (ctypes.c_char * nbytes).from_address(p)
            buf._owner = self._mem  # the view (through its base, buf) keeps the pages alive
            a = np.frombuffer(buf, dtype=dt)
            return np.lib.stride_tricks.as_strided(a, shape=(n, G, D),
                                                   strides=(ld * dt.itemsize, D * dt.itemsize,
                                                            dt.itemsize))
        positions = pg.start + pg.stride * np.arange(n, dtype=np.int64)
        return arr(pg.k, pg.ldk), arr(pg.v, pg.ldv), positions

    def nbytes(self):
        """(allocated page bytes, bytes of the rows held) on this rank."""
        rows = c_size_t()
        total = _lib.lib.da_kvcache_bytes(self.handle, byref(rows))
        return int(total), int(rows.value)


class DecodePlan(_Handle):
    """A decode plan (da_decode_plan_t). Collective. heads, kv_heads, dim, batch, dtype, window,
    scale as the model's; algo "tree" (one fused reduction) or "ring" (the baseline); topo "flat" or
    "two-level"; root -1 (every rank gets the output) or a rank; node_size for two-level."""
    _free_fn = "da_decode_plan_free"

    def __init__(self, comm, *, heads, dim, kv_heads=None, batch=1, dtype="float32", window=0,
                 scale=None, algo="tree", topo="flat", root=-1, node_size=0, transport=None,
                 timeout=0.0):
        super().__init__()
        if not isinstance(comm, Comm):
            comm = Comm(comm)
        self.comm = comm
        self.problem = Problem(batch=batch, seq=1, heads=heads, kv_heads=kv_heads or heads,
                               dim=dim, dtype=dtype, window=window, scale=scale)
        if algo not in _lib.DECODE_ALGOS or topo not in _lib.TOPOS:
            raise ValueError(f"distattn: decode algo {algo!r} (tree, ring), topo {topo!r} (flat, two-level)")
        self._transport = transport.encode() if transport else None
        cfg = _lib.init_struct(_lib.DecodeConfig, algo=_lib.DECODE_ALGOS[algo], topo=_lib.TOPOS[topo],
                               root=int(root), node_size=int(node_size), transport=self._transport,
                               timeout=float(timeout))
        comm._check(_lib.lib.da_decode_plan_create(comm.handle, self.problem.ref, byref(cfg),
                                                   byref(self._h)), "da_decode_plan_create")
        self.root = int(root)
        self.dtype = self.problem.dtype

    def step(self, cache, q, out=None, lse=None, return_lse=True):
        """One decode step (collective): q [B][T][H][D] (or [B][H][D]) holds the T newest tokens of
        every sequence (their k/v already appended), the same on every rank. Returns (out, lse),
        written on every rank (root = -1) or only on the root (elsewhere they are left as they
        were: unspecified when allocated here)."""
        code = self.dtype
        qv = _arrays.view(q, "q", code)
        out, ov = _out(out, "out", tuple(qv.shape), code, q)
        lse, lv = _lse(lse, tuple(qv.shape[:-1]), q, return_lse)
        self.comm._check(_lib.lib.da_decode_step(self.handle, cache.handle, byref(qv.t), byref(ov.t),
                                                 _arrays.ptr(lv), None), "da_decode_step")
        return out, lse

    def stats(self):
        """This rank's figures of the last step (da_decode_stats_t) as a dict."""
        s = _lib.init_struct(_lib.DecodeStats, output=True)
        self.comm._check(_lib.lib.da_decode_plan_stats(self.handle, byref(s)), "da_decode_plan_stats")
        return _stats_dict(s)


__all__ = ["Comm", "Plan", "KVCache", "DecodePlan"]
