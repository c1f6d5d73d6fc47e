"""test_python.py: the Python binding (python/distattn) under mpirun, against a NumPy float64
implementation of attention written here (forward, backward, decode), for every layout, mask,
GQA, batch, dtype and view kind; plus the ctypes struct layouts against the compiler's, and the
errors. Run by ctest (label python):

    mpirun -np P /usr/bin/python3 tests/test_python.py [--abi <python_abi executable>]

Every test runs on every rank (the calls are collective); a failure on any rank fails the test on
all of them. Rank 0 prints one line per test and "N passed, N failed"; exit code 1 on failure.
"""
import ctypes
import os
import subprocess
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import distattn  # noqa: E402
from distattn import _lib  # noqa: E402
from mpi_runner import Skip, check, run  # noqa: E402 (tests/mpi_runner.py, beside this file)

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
ABI = sys.argv[sys.argv.index("--abi") + 1] if "--abi" in sys.argv else None
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


# ---- the float64 oracle ----------------------------------------------------------------------
def allowed(S, causal=False, window=0, doc_lens=None, q_pos=None):
    """[Sq][S] boolean mask on global positions (q_pos: the query positions, default 0..S-1)."""
    qp = np.arange(S) if q_pos is None else np.asarray(q_pos)
    kp = np.arange(S)
    m = np.ones((len(qp), S), dtype=bool)
    if causal or window:
        m &= kp[None, :] <= qp[:, None]
    if window:
        m &= qp[:, None] - kp[None, :] < window
    if doc_lens is not None:
        doc = np.repeat(np.arange(len(doc_lens)), doc_lens)
        m &= doc[qp][:, None] == doc[kp][None, :]
    return m


def ref_fwd(q, k, v, mask, scale=None):
    """q [Sq][H][D], k, v [S][G][D] (float64) -> out [Sq][H][D], lse [Sq][H]; rows with no key:
    out 0, lse -inf."""
    H, G, D = q.shape[1], k.shape[1], q.shape[2]
    scale = scale or 1 / np.sqrt(D)
    kk, vv = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
    s = np.einsum("ihd,jhd->hij", q, kk) * scale
    s = np.where(mask[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, p / l, 0.0)
        lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(l[..., 0]), -np.inf)
    return np.einsum("hij,jhd->ihd", p, vv), lse.T, p


def ref_bwd(q, k, v, dout, mask, scale=None):
    """dq, dk, dv of sum(out * dout), float64 (GQA: heads of a group summed into their KV head)."""
    H, G, D = q.shape[1], k.shape[1], q.shape[2]
    scale = scale or 1 / np.sqrt(D)
    out, _, p = ref_fwd(q, k, v, mask, scale)
    kk, vv = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
    dvv = np.einsum("hij,ihd->jhd", p, dout)
    dp = np.einsum("ihd,jhd->hij", dout, vv)
    delta = np.einsum("ihd,ihd->hi", dout, out)[..., None]
    ds = p * (dp - delta) * scale
    dq = np.einsum("hij,jhd->ihd", ds, kk)
    dkk = np.einsum("hij,ihd->jhd", ds, q)
    S = k.shape[0]
    return (dq, dkk.reshape(S, G, H // G, D).sum(axis=2), dvv.reshape(S, G, H // G, D).sum(axis=2))


def relerr(x, ref):
    """max |x - ref| / max(max |ref|, 1e-6), finite entries; -inf must match exactly."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    inf = np.isinf(ref)
    if not np.array_equal(np.isinf(x), inf) or (inf.any() and not np.array_equal(x[inf], ref[inf])):
        return np.inf
    if (~inf).sum() == 0:
        return 0.0
    return float(np.abs(x[~inf] - ref[~inf]).max() / max(np.abs(ref[~inf]).max(), 1e-6))


def to_dtype(a, dtype):
    """float64 -> the storage dtype (bfloat16 as raw uint16 bits) and back to float64 as rounded."""
    if dtype == "bfloat16":
        raw = distattn.float32_to_bf16(a.astype(np.float32))
        return raw, distattn.bf16_to_float32(raw).astype(np.float64)
    x = a.astype(dtype)
    return x, x.astype(np.float64)


def as_f64(a, dtype):
    return distattn.bf16_to_float32(a).astype(np.float64) if dtype == "bfloat16" else np.asarray(a, np.float64)


def full_inputs(seed, B, S, H, G, D, dtype="float32"):
    """Inputs of the whole problem, the same on every rank (seeded), in the storage dtype, and
    their rounded float64 values (what the oracle sees)."""
    rng = np.random.default_rng(seed)
    arrs = [rng.standard_normal(shape) for shape in ((B, S, H, D), (B, S, G, D), (B, S, G, D), (B, S, H, D))]
    return [to_dtype(a, dtype) for a in arrs]


# ---- the runner ------------------------------------------------------------------------------
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


# ---- tests -----------------------------------------------------------------------------------
@test
def abi_struct_layouts():
    """Every ctypes struct has the C size and field offsets (tests/python_abi.c)."""
    if not ABI:
        raise Skip("no --abi executable")
    lines = subprocess.run([ABI], check=True, capture_output=True, text=True).stdout.split()
    c = dict(zip(lines[0::2], (int(x) for x in lines[1::2])))
    notes = []
    for name, cls in _lib.STRUCTS.items():
        # Fields appended to the header after the binding was written are tolerated (the binding
        # pads every struct, _lib.init_struct) but reported; anything else must match exactly.
        check(ctypes.sizeof(cls) <= c[name] <= ctypes.sizeof(cls) + _lib._PAD,
              f"{name}: C size {c[name]}, ctypes {ctypes.sizeof(cls)}")
        if c[name] != ctypes.sizeof(cls):
            notes.append(f"{name} has {c[name] - ctypes.sizeof(cls)} bytes of fields the binding does not mirror")
        for field, _ in cls._fields_:
            check(c[f"{name}.{field}"] == getattr(cls, field).offset,
                  f"{name}.{field}: C offset {c[f'{name}.{field}']}, ctypes {getattr(cls, field).offset}")
        nf = sum(1 for key in c if key.startswith(name + "."))
        check(nf == len(cls._fields_), f"{name}: {nf} fields in C, {len(cls._fields_)} in ctypes")
    check(c["DA_NUM_STATUS"] == len(_lib.STATUS_NAMES), "status codes differ")
    check(c["DA_API_VERSION"] == _lib.DA_API_VERSION, "DA_API_VERSION differs")
    check(c["DA_ALGO_ZIGZAG"] == _lib.ALGOS["zigzag"] and c["DA_DECODE_RING"] == _lib.DECODE_ALGOS["ring"],
          "enum values differ")
    if notes and rank == 0:
        print("note: " + "; ".join(notes))


@test
def single_rank_forward_backward():
    """attention_fwd / attention_bwd (no MPI) against the oracle: causal GQA, batch 2."""
    B, S, H, G, D = 2, 77, 4, 2, 32
    (q, qd), (k, kd), (v, vd), (do, dod) = full_inputs(1, B, S, H, G, D)
    out, lse = distattn.attention_fwd(q, k, v, causal=True)
    dq, dk, dv = distattn.attention_bwd(q, k, v, out, do, lse, causal=True)
    mask = allowed(S, causal=True)
    for b in range(B):
        ro, rl, _ = ref_fwd(qd[b], kd[b], vd[b], mask)
        rq, rk, rv = ref_bwd(qd[b], kd[b], vd[b], dod[b], mask)
        for name, x, r in (("out", out[b], ro), ("lse", lse[b], rl), ("dq", dq[b], rq), ("dk", dk[b], rk),
                           ("dv", dv[b], rv)):
            e = relerr(x, r)
            check(e < 1e-4, f"batch {b} {name}: relative error {e:.2e}")


def run_plan(algo, S, H, G, D, B=1, dtype="float32", causal=False, window=0, doc_lens=None, seed=0,
             views=False):
    """Plan forward + backward on this rank's rows, checked against the oracle's rows."""
    plan = distattn.Plan(comm, seq=S, heads=H, kv_heads=G, dim=D, batch=B, dtype=dtype, causal=causal,
                         window=window, doc_lens=doc_lens, algo=algo)
    pos = plan.positions
    check(len(pos) == plan.local_rows, "positions / local_rows disagree")
    all_pos = np.sort(np.concatenate(comm.allgather(pos)))
    check(np.array_equal(all_pos, np.arange(S)), f"{algo}: positions are not a partition of 0..{S - 1}")
    (q, qd), (k, kd), (v, vd), (do, dod) = full_inputs(seed, B, S, H, G, D, dtype)
    sl = (lambda a: a[0][pos]) if B == 1 else (lambda a: a[:, pos])
    ql, kl, vl, dol = (np.ascontiguousarray(sl(a)) for a in (q, k, v, do))
    if views:
        # q, k, v as strided views into one packed [n][H + 2G][D] buffer (a fused QKV projection).
        qkv = np.empty(ql.shape[:-2] + (H + 2 * G, D), dtype=ql.dtype)
        qkv[..., :H, :], qkv[..., H:H + G, :], qkv[..., H + G:, :] = ql, kl, vl
        ql, kl, vl = qkv[..., :H, :], qkv[..., H:H + G, :], qkv[..., H + G:, :]
    out, lse = plan.forward(ql, kl, vl)
    dq, dk, dv = plan.backward(ql, kl, vl, out, dol, lse)
    mask = allowed(S, causal, window, doc_lens)
    tol, worst = TOL[dtype], 0.0
    for b in range(B):
        ro, rl, _ = ref_fwd(qd[b], kd[b], vd[b], mask)
        rq, rk, rv = ref_bwd(qd[b], kd[b], vd[b], dod[b], mask)
        pick = (lambda a: a) if B == 1 else (lambda a: a[b])
        for name, x, r in (("out", pick(out), ro[pos]), ("lse", pick(lse), rl[pos]), ("dq", pick(dq), rq[pos]),
                           ("dk", pick(dk), rk[pos]), ("dv", pick(dv), rv[pos])):
            e = relerr(as_f64(x, dtype) if name != "lse" else x, r)
            worst = max(worst, e)
            check(e < tol, f"{algo} {dtype} batch {b} {name}: relative error {e:.2e} (limit {tol})")
    st = plan.stats()
    check(st["nranks"] == P and st["local_rows"] == len(pos), f"stats: {st['nranks']} ranks, {st['local_rows']} rows")
    plan.free()
    return worst


@test
def plan_layouts_and_masks():
    """Ring, striped, zigzag x none, causal, window, documents; GQA; uneven S = 100 + P - 1."""
    S = 100 + P - 1
    for algo in ("ring", "striped", "zigzag"):
        run_plan(algo, S, 4, 2, 32, causal=True, seed=2)
    run_plan("ring", S, 4, 4, 16, seed=3)
    run_plan("zigzag", S, 4, 1, 32, window=17, seed=4)
    run_plan("striped", S, 2, 1, 32, causal=True, doc_lens=[30, 1, S - 31], seed=5)


@test
def plan_batch_views_and_dtypes():
    """Batch 2, strided views into a packed QKV buffer, float16 and bfloat16 (raw bits)."""
    run_plan("zigzag", 64 + 2 * P, 4, 2, 32, B=2, causal=True, seed=6)
    run_plan("ring", 50 + P, 4, 2, 32, causal=True, views=True, seed=7)
    run_plan("zigzag", 70, 4, 2, 64, dtype="float16", causal=True, seed=8)
    run_plan("striped", 70, 4, 2, 64, dtype="bfloat16", causal=True, seed=9)


class OnlyArrayInterface:
    def __init__(self, a):
        self.__array_interface__ = a.__array_interface__
        self._keep = a


class OnlyDLPack:
    def __init__(self, a):
        self._a = a

    def __dlpack__(self, stream=None):
        return self._a.__dlpack__()

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


@test
def array_protocols():
    """Inputs given as objects with only __array_interface__ or only __dlpack__."""
    S, H, G, D = 40 + P, 2, 1, 32
    plan = distattn.Plan(comm, seq=S, heads=H, kv_heads=G, dim=D, causal=True, algo="zigzag")
    (q, qd), (k, kd), (v, vd), _ = full_inputs(10, 1, S, H, G, D)
    pos = plan.positions
    ql, kl, vl = (np.ascontiguousarray(a[0][pos]) for a in (q, k, v))
    o1, l1 = plan.forward(ql, kl, vl)
    o2, l2 = plan.forward(OnlyArrayInterface(ql), OnlyArrayInterface(kl), OnlyArrayInterface(vl))
    if hasattr(np, "from_dlpack"):
        o3, l3 = plan.forward(OnlyDLPack(ql), OnlyDLPack(kl), OnlyDLPack(vl))
        check(np.array_equal(o1, o3) and np.array_equal(l1, l3), "__dlpack__ inputs gave a different result")
    check(np.array_equal(o1, o2) and np.array_equal(l1, l2), "__array_interface__ inputs gave a different result")
    ro, rl, _ = ref_fwd(qd[0], kd[0], vd[0], allowed(S, causal=True))
    check(relerr(o1, ro[pos]) < 1e-4, "forward against the oracle")
    plan.free()


def run_decode(algo, B, H, G, D, lengths, steps, page, layout="zigzag", topo="flat", root=-1, node_size=0,
               T=1, seed=11):
    """Prefill every sequence from its rows under `layout`, then `steps` decode steps of T tokens;
    each step against the oracle over the whole sequence."""
    cache = distattn.KVCache(comm, batch=B, kv_heads=G, dim=D, page=page, layout=layout)
    dec = distattn.DecodePlan(comm, batch=B, heads=H, kv_heads=G, dim=D, algo=algo, topo=topo, root=root,
                              node_size=node_size)
    rng = np.random.default_rng(seed)
    total = [L + steps * T for L in lengths]
    K = [rng.standard_normal((n, G, D)).astype(np.float32) for n in total]
    V = [rng.standard_normal((n, G, D)).astype(np.float32) for n in total]
    errs, fails = [], []
    for b, L in enumerate(lengths):
        # the rows a Plan with this layout and seq = L would give this rank
        if L > 0:
            p = distattn.Plan(comm, seq=L, heads=G, kv_heads=G, dim=D, algo=layout)
            pos = p.positions
            p.free()
        else:
            pos = np.zeros(0, dtype=np.int64)
        cache.prefill(b, L, np.ascontiguousarray(K[b][pos]), np.ascontiguousarray(V[b][pos]))
        if not np.array_equal(cache.local_positions(b), pos):
            fails.append(f"sequence {b}: cache rows differ from the plan's")
    for s in range(steps):
        start = [L + s * T for L in lengths]
        kn = np.stack([K[b][start[b]:start[b] + T] for b in range(B)])  # [B][T][G][D]
        vn = np.stack([V[b][start[b]:start[b] + T] for b in range(B)])
        q = rng.standard_normal((B, T, H, D)).astype(np.float32)
        if T == 1:
            kn, vn, q = kn[:, 0], vn[:, 0], q[:, 0]
        cache.append(kn, vn)
        out, lse = dec.step(cache, q)
        if root >= 0 and rank != root:
            continue
        for b in range(B):
            n = cache.length(b)
            qb = q[b].reshape(T, H, D).astype(np.float64)
            mask = allowed(n, causal=True, q_pos=np.arange(n - T, n))
            ro, rl, _ = ref_fwd(qb, K[b][:n].astype(np.float64), V[b][:n].astype(np.float64), mask)
            e = max(relerr(out[b].reshape(T, H, D), ro), relerr(lse[b].reshape(T, H), rl))
            if n != start[b] + T:
                e = np.inf
            errs.append((e, s, b))
    worst = max(errs, default=(0.0, 0, 0))
    if worst[0] >= 1e-4:
        fails.append(f"{algo} step {worst[1]} sequence {worst[2]}: relative error {worst[0]:.2e}")
    # every position held exactly once across the ranks, shards within a page of each other
    for b in range(B):
        pos = cache.local_positions(b)
        allp = np.sort(np.concatenate(comm.allgather(pos)))
        if not np.array_equal(allp, np.arange(cache.length(b))):
            fails.append(f"sequence {b}: positions not a partition")
        counts = [len(p) for p in comm.allgather(pos)]
        if max(counts) - min(counts) > page:
            fails.append(f"sequence {b}: shards {counts} differ by more than a page")
    if dec.stats()["nranks"] != P:
        fails.append("decode stats: nranks")
    dec.free()
    cache.free()
    # checked after the last collective call, so a failing rank never leaves the others waiting
    check(not fails, "; ".join(fails))


@test
def decode_tree_and_ring():
    """KVCache prefill (zigzag, striped) + append + DecodePlan tree / ring, GQA, uneven lengths."""
    run_decode("tree", 3, 4, 2, 64, [150, 37, 0], steps=3, page=16)
    run_decode("ring", 2, 4, 1, 32, [90 + P, 5], steps=2, page=8, layout="striped")


@test
def decode_root_two_level_and_multi_token():
    """Tree to a root, two-level tree, T = 2 new tokens per step; the cache's own pages."""
    run_decode("tree", 2, 4, 2, 32, [60, 61], steps=2, page=16, root=P - 1)
    run_decode("tree", 1, 8, 2, 32, [70], steps=2, page=16, topo="two-level", node_size=2, T=2)
    cache = distattn.KVCache(comm, batch=1, kv_heads=2, dim=32, page=16)
    cache.prefill(0, 50)  # pages only
    rows = 0
    for i in range(cache.num_pages(0)):
        k, v, pos = cache.page(0, i)
        k[...] = pos[:, None, None]  # written in place
        rows += len(pos)
    check(rows == cache.local_rows(0), f"pages hold {rows} rows, local_rows says {cache.local_rows(0)}")
    total, held = cache.nbytes()
    check(total >= held == rows * 2 * 2 * 32 * 4, f"nbytes ({total}, {held}) for {rows} rows")
    cache.free()


@test
def errors():
    """Wrong dtype: TypeError before any call. Ranks disagreeing: 'mismatch' on every rank. One
    rank's bad tensor: its own error there, 'remote' on the others."""
    try:
        distattn.Plan(comm, seq=64, heads=2, dim=32).forward(np.zeros((64, 2, 32)), None, None)
        raise AssertionError("float64 q accepted")
    except TypeError as e:
        check("float64" in str(e), f"message: {e}")
    if P == 1:
        return
    try:
        distattn.Plan(comm, seq=64 + (rank == P - 1), heads=2, dim=32)
        raise AssertionError("mismatched plans accepted")
    except distattn.DistattnError as e:
        check(e.name == "mismatch" and "seq" in str(e), f"status {e.name}: {e}")
    plan = distattn.Plan(comm, seq=64, heads=2, kv_heads=1, dim=32)
    n = plan.local_rows
    q = np.zeros((n, 2, 32), np.float32)
    k = np.zeros((n, 1 + (rank == 0), 32), np.float32)  # rank 0 passes G = 2
    try:
        plan.forward(q, k, k)
        raise AssertionError("bad k accepted")
    except distattn.DistattnError as e:
        want = "invalid_argument" if rank == 0 else "remote"
        check(e.name == want, f"rank {rank}: status {e.name}, expected {want}: {e}")
    plan.free()


@test
def misuse():
    """Bad calls raise DistattnError naming the argument, never crash (issue 19, class 1): a thread
    count of 100000, DISTATTN_* garbage, an accessor's bad index (its message in the context's own
    error, not a stale one), and KV-cache page views used after free() (they keep the pages alive)."""
    def raises(fn, name, needle):
        try:
            fn()
        except distattn.DistattnError as e:
            check(e.name == name and needle in str(e), f"status {e.name}: {e} (expected {name}, '{needle}')")
            return
        raise AssertionError(f"accepted; expected {name} with '{needle}'")
    raises(lambda: distattn.Context(threads=100000), "invalid_argument", "nthreads 100000")
    for var, val in (("DISTATTN_TIMEOUT", "0.5"), ("DISTATTN_NTHREADS", "many"), ("DISTATTN_DEBUG_SUBSYS", "BOGUS")):
        os.environ[var] = val
        try:
            raises(lambda: distattn.Context(), "invalid_argument", var)
        finally:
            del os.environ[var]
    # pages of 512 KiB: glibc maps them apart, so freed pages are unmapped and a view that
    # outlived them would fault (as it did), not quietly read stale memory
    cache = distattn.KVCache(comm, kv_heads=1, dim=16, batch=1, page=4096)
    cache.prefill(0, 4096 * P)  # a page per rank, allocated only
    raises(lambda: cache.page(0, 99), "invalid_argument", "no page 99")
    raises(lambda: cache.page(7, 0), "invalid_argument", "no page 0 of sequence 7")
    k, v, pos = cache.page(0, 0)
    k[:] = 3.0
    v[:] = -1.0
    cache.free()
    check(float(k.sum()) == 3.0 * k.size and float(v.sum()) == -1.0 * v.size, "page view changed after free()")
    k[0, 0, 0] = 5.0  # writing is safe too: the pages are released with the last view
    check(len(pos) == k.shape[0], "positions")
    del k, v
    try:
        cache.page(0, 0)
        raise AssertionError("page() after free() accepted")
    except ValueError as e:
        check("freed" in str(e), f"page() after free(): {e}")


@test
def lazy_torch_attributes():
    """distattn.attention / distattn.torch resolve lazily: with torch they are the wrapper and the
    module; without it an AttributeError that names torch (the module __getattr__ once imported
    itself forever: RecursionError)."""
    try:
        import torch  # noqa: F401
        have = True
    except ImportError:
        have = False
    for name in ("attention", "torch", "autograd"):
        try:
            val = getattr(distattn, name)
        except AttributeError as e:
            check(not have and "needs torch" in str(e), f"distattn.{name}: {e}")
            continue
        check(have and val is not None, f"distattn.{name} resolved without torch")
    check(not hasattr(distattn, "no_such_name"), "distattn.no_such_name exists")


@test
def torch_autograd():
    """distattn.attention (torch.autograd.Function) against the oracle, when torch imports."""
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed")
    S, H, G, D = 48 + P, 4, 2, 32
    plan = distattn.Plan(comm, seq=S, heads=H, kv_heads=G, dim=D, causal=True, algo="zigzag")
    (q, qd), (k, kd), (v, vd), (do, dod) = full_inputs(12, 1, S, H, G, D)
    pos = plan.positions
    tq, tk, tv = (torch.tensor(a[0][pos], requires_grad=True) for a in (q, k, v))
    out = distattn.attention(tq, tk, tv, plan)
    out.backward(torch.tensor(do[0][pos]))
    mask = allowed(S, causal=True)
    ro, _, _ = ref_fwd(qd[0], kd[0], vd[0], mask)
    rq, rk, rv = ref_bwd(qd[0], kd[0], vd[0], dod[0], mask)
    for name, x, r in (("out", out, ro), ("dq", tq.grad, rq), ("dk", tk.grad, rk), ("dv", tv.grad, rv)):
        e = relerr(x.detach().numpy(), r[pos])
        check(e < 1e-4, f"torch {name}: relative error {e:.2e}")
    plan.free()


def main():
    only = [a for a in sys.argv[1:] if not a.startswith("-") and a != ABI]
    return run(TESTS, comm, only, f"# {P} ranks, library {distattn.library_path}")


if __name__ == "__main__":
    sys.exit(main())
