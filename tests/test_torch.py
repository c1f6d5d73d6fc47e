"""test_torch.py: distattn.torch (the PyTorch op) under mpirun with real torch, against
torch.nn.functional.scaled_dot_product_attention in float64 on the gathered sequence, with a
boolean mask built here from the positions (never from the library). Forward and backward for
every layout, causal / window / packed documents (varlen), GQA, float32 and bfloat16, transposed
and SBHD / BHSD views, a torch.compile'd model (no graph break), a torch ProcessGroup mapped onto
MPI ranks in another order, and the errors (dtype mix, device, shapes that differ across ranks,
an overlapping view, a group that does not map onto MPI). Run by ctest (label python):

    mpirun -np P <venv>/bin/python tests/test_torch.py [test names]

Every test runs on every rank; a failure on any rank fails it on all. Rank 0 prints one line per
test and "N passed, N failed"; exit code 1 on failure.
"""
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from mpi4py import MPI

if os.environ.get("DISTATTN_TEST_INSTALLED") != "1":  # else: the installed wheel is under test
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import distattn  # noqa: E402
import distattn.torch as dt  # noqa: E402
from mpi_runner import Skip, check, run  # noqa: E402 (tests/mpi_runner.py, beside this file)

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# ---- the float64 oracle --------------------------------------------------------------------------
def allowed(S, causal=False, window=0, cu=None):
    """[S][S] boolean: may query position i see key position j."""
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    m = torch.ones(S, S, dtype=torch.bool)
    if causal or window:
        m &= j <= i
    if window:
        m &= i - j < window
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(torch.as_tensor(cu)))
        m &= doc[:, None] == doc[None, :]
    return m


def reference(q, k, v, dout, mask, scale=None):
    """out, dq, dk, dv in float64 through SDPA on [B][S][H][D] tensors (GQA by repeating k, v)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    kk, vv = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                         attn_mask=mask, scale=scale).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def relerr(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def inputs(B, S, H, G, D, dtype, seed):
    """Global q, k, v, dout (the same on every rank), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, amp: (amp * torch.randn(B, S, h, D, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return mk(H, 2.0), mk(G, 1.0), mk(G, 1.0), mk(H, 1.0)


def run_case(B, S, H, G, D, dtype, layout="zigzag", causal=False, window=0, scale=None, seed=1, what=""):
    q, k, v, do = inputs(B, S, H, G, D, dtype, seed)
    mask = allowed(S, causal, window)
    ro, rdq, rdk, rdv = reference(q, k, v, do, mask, scale)
    ql, kl, vl = (dt.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
    out = dt.attention(ql, kl, vl, causal=causal, window=window, softmax_scale=scale, layout=layout)
    check(out.dtype == dtype and out.shape == ql.shape, f"{what}: out {out.dtype} {tuple(out.shape)}")
    out.backward(dt.shard(do, layout=layout))
    tol = TOL[dtype]
    for name, got, ref in (("out", out, ro), ("dq", ql.grad, rdq), ("dk", kl.grad, rdk), ("dv", vl.grad, rdv)):
        e = relerr(got, dt.shard(ref, layout=layout))
        check(e < tol, f"{what} {name}: relative error {e:.2e} >= {tol}")
        check(got.dtype == dtype, f"{what} {name}: dtype {got.dtype}")


# ---- tests ---------------------------------------------------------------------------------------
def installed_package():
    """Under tests/wheel_test.sh: distattn is the installed wheel, with its own library."""
    if os.environ.get("DISTATTN_TEST_INSTALLED") != "1":
        raise Skip("the wheel test runs it (tests/wheel_test.sh)")
    src = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    pkg = os.path.dirname(os.path.realpath(distattn.__file__))
    check(not pkg.startswith(src + os.sep) or "site-packages" in pkg, f"distattn from {pkg}")
    check(os.path.realpath(distattn.library_path) == os.path.join(pkg, "libdistattn.so"),
          f"library {distattn.library_path} is not the package's")
    check("DISTATTN_LIBRARY" not in os.environ, "DISTATTN_LIBRARY is set")


def lazy_attributes():
    """distattn.torch and distattn.attention through the package's lazy __getattr__ (it recursed
    forever once)."""
    check(distattn.torch is dt, "distattn.torch is not the module")
    check(callable(distattn.attention) and distattn.attention.__module__ == "distattn.autograd",
          "distattn.attention")


def shard_roundtrip():
    """shard / unshard invert each other, and the shards cover the sequence once."""
    x = torch.arange(2 * (4 * P + 3) * 3).reshape(2, 4 * P + 3, 3).float()
    for layout in ("zigzag", "contiguous", "striped"):
        xs = dt.shard(x, layout=layout)
        back = dt.unshard(xs, layout=layout)
        check(torch.equal(back, x), f"{layout}: unshard(shard(x)) != x")
        n = comm.allgather(xs.shape[1])
        check(sum(n) == x.shape[1], f"{layout}: local lengths {n}")


def fwd_bwd_layouts_masks():
    """Every layout x no mask / causal / window, GQA 4:2, batch 2, float32."""
    S = 6 * P + 5
    for layout in ("zigzag", "contiguous", "striped"):
        for causal, window in ((False, 0), (True, 0), (False, 5)):
            run_case(2, S, 4, 2, 16, torch.float32, layout, causal, window, seed=11,
                     what=f"{layout} causal={causal} window={window}")


def fwd_bwd_mqa_scale():
    """MQA (one KV head) with an explicit softmax_scale; then a loss whose gradient reaches the op
    as a broadcast (stride-0 axes): out.sum over all but the last axis, weighted."""
    run_case(1, 5 * P + 2, 4, 1, 8, torch.float32, "zigzag", True, 0, scale=0.3, seed=12, what="mqa")
    S = 5 * P + 2
    q, k, v, _ = inputs(1, S, 4, 1, 8, torch.float32, 15)
    w = torch.linspace(-1, 1, 8)
    _, rdq, rdk, _ = reference(q, k, v, w.expand(q.shape), allowed(S, True))
    ql, kl, vl = (dt.shard(t).requires_grad_() for t in (q, k, v))
    (dt.attention(ql, kl, vl, causal=True).sum(dim=(0, 1, 2)) * w).sum().backward()
    check(relerr(ql.grad, dt.shard(rdq)) < 1e-4, "broadcast gradient: dq")
    check(relerr(kl.grad, dt.shard(rdk)) < 1e-4, "broadcast gradient: dk")


def fwd_bwd_bf16():
    """bfloat16 (and float16) in, the same dtype out and in the gradients (fp32 accumulation
    inside)."""
    run_case(2, 6 * P + 3, 4, 2, 16, torch.bfloat16, "zigzag", True, 0, seed=13, what="bf16 causal gqa")
    run_case(1, 6 * P + 3, 2, 2, 16, torch.bfloat16, "contiguous", False, 4, seed=14, what="bf16 window")
    run_case(1, 6 * P + 3, 4, 2, 16, torch.float16, "zigzag", True, 0, seed=16, what="fp16 causal gqa")


def varlen_documents():
    """attention_varlen: packed documents (cu_seqlens) become the document mask."""
    S = 7 * P + 6
    cu = [0, 3, 3 + 2 * P, S - 4, S]
    for causal in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, do = inputs(1, S, 4, 2, 16, dtype, 21)
            ro, rdq, rdk, rdv = reference(q, k, v, do, allowed(S, causal, 0, cu))
            ql, kl, vl = (dt.shard(t[0], dim=0).requires_grad_() for t in (q, k, v))  # [S_local][H][D]
            out = dt.attention_varlen(ql, kl, vl, torch.tensor(cu, dtype=torch.int32), causal=causal)
            out.backward(dt.shard(do[0], dim=0))
            for name, got, ref in (("out", out, ro), ("dq", ql.grad, rdq), ("dk", kl.grad, rdk), ("dv", vl.grad, rdv)):
                e = relerr(got, dt.shard(ref[0], dim=0))
                check(e < TOL[dtype], f"varlen causal={causal} {dtype} {name}: relative error {e:.2e}")


def transposed_views():
    """[B][S][H][D] views of [B][H][S][D] storage (q.transpose(1, 2)), and qkv_format sbhd / bhsd:
    read through their strides, no copy asked of the user."""
    S = 5 * P + 4
    q, k, v, do = inputs(2, S, 4, 2, 16, torch.float32, 31)
    ro, rdq, rdk, rdv = reference(q, k, v, do, allowed(S, True))
    # BHSD storage, passed as BSHD views (the case that was refused as "rows overlap").
    qh, kh, vh = (dt.shard(t, dim=1).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    qv, kv, vv = (t.transpose(1, 2) for t in (qh, kh, vh))
    check(not qv.is_contiguous() and qv.stride(-1) == 1, "the view should be strided")
    out = dt.attention(qv, kv, vv, causal=True)
    out.backward(dt.shard(do, dim=1))
    for name, got, ref in (("out", out, ro), ("dq", qh.grad.transpose(1, 2), rdq),
                           ("dk", kh.grad.transpose(1, 2), rdk), ("dv", vh.grad.transpose(1, 2), rdv)):
        e = relerr(got, dt.shard(ref, dim=1))
        check(e < 1e-4, f"transposed view {name}: relative error {e:.2e}")
    # qkv_format: tensors in SBHD and BHSD order, sharded along their sequence axis.
    for fmt, perm, sdim in (("sbhd", (1, 0, 2, 3), 0), ("bhsd", (0, 2, 1, 3), 2)):
        ql, kl, vl = (dt.shard(t.permute(*perm).contiguous(), dim=sdim).requires_grad_() for t in (q, k, v))
        out = dt.attention(ql, kl, vl, causal=True, qkv_format=fmt)
        check(out.shape == ql.shape, f"{fmt}: out shape {tuple(out.shape)} != {tuple(ql.shape)}")
        out.backward(dt.shard(do.permute(*perm), dim=sdim))
        for name, got, ref in (("out", out, ro), ("dq", ql.grad, rdq), ("dk", kl.grad, rdk), ("dv", vl.grad, rdv)):
            e = relerr(got, dt.shard(ref.permute(*perm), dim=sdim))
            check(e < 1e-4, f"{fmt} {name}: relative error {e:.2e}")


class Block(torch.nn.Module):
    """q/k/v projections, attention, output projection: enough for compile to trace around."""

    def __init__(self, dim, H, G, D, attn):
        super().__init__()
        self.H, self.G, self.D, self.attn = H, G, D, attn
        self.wq = torch.nn.Linear(dim, H * D, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * G * D, bias=False)
        self.wo = torch.nn.Linear(H * D, dim, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.H, self.D)
        k, v = self.wkv(x).view(B, S, 2, self.G, self.D).unbind(2)  # strided views of one buffer
        return self.wo(self.attn(q, k, v).reshape(B, S, self.H * self.D))


def compiled_model():
    """torch.compile(fullgraph=True) of a block calling distattn: no graph break, and the
    loss and weight gradients match the float64 SDPA block on the whole sequence. At P = 2 and 4
    only: tracing costs every rank seconds of CPU, and P = 1 and 3 add no new path through it."""
    if P not in (2, 4) and "compiled_model" not in sys.argv:
        raise Skip("runs at P = 2 and 4 (or when named)")
    import torch._dynamo
    torch.manual_seed(5)
    S, dim = 6 * P + 2, 24
    dist = Block(dim, 4, 2, 8, lambda q, k, v: dt.attention(q, k, v, causal=True))
    ref = Block(dim, 4, 2, 8, None).double()
    ref.load_state_dict(dist.state_dict())
    mask = allowed(S, True)

    def ref_attn(q, k, v):
        kk, vv = (t.repeat_interleave(2, dim=2) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    ref.attn = ref_attn
    x = torch.randn(2, S, dim, generator=torch.Generator().manual_seed(6))
    xl = dt.shard(x)
    # fullgraph=True: any graph break is an error. aot_eager: the graph is traced through the fake
    # implementation and the registered autograd, as inductor would, without compiling C++.
    torch._dynamo.reset()
    cm = torch.compile(dist, fullgraph=True, backend="aot_eager")
    y = cm(xl)
    loss = comm.allreduce(float((y.detach().double() ** 2).sum()))
    (y ** 2).sum().backward()
    yr = ref(x.double())
    lr = (yr ** 2).sum()
    lr.backward()
    lr = lr.item()
    check(abs(loss - lr) <= 1e-5 * abs(lr), f"loss {loss} vs float64 {lr}")
    for (name, p), (_, pr) in zip(dist.named_parameters(), ref.named_parameters()):
        g = torch.from_numpy(comm.allreduce(p.grad.double().numpy()))  # summed over the shards
        e = relerr(g, pr.grad)
        check(e < 1e-4, f"compiled grad {name}: relative error {e:.2e}")


def process_group():
    """A torch ProcessGroup (gloo) whose ranks are the MPI ranks in reverse order: mapped onto MPI
    ranks, the sequence is split by the group's ranks, results as with MPI.COMM_WORLD."""
    import torch.distributed as tdist
    if not tdist.is_initialized():
        port = comm.bcast(_free_port() if rank == 0 else None)
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=P - 1 - rank,
                                 world_size=P)
    pg = tdist.group.WORLD
    S = 5 * P + 3
    q, k, v, do = inputs(1, S, 2, 2, 8, torch.float32, 41)
    ro, rdq, _, _ = reference(q, k, v, do, allowed(S, True))
    ql, kl, vl = (dt.shard(t, group=pg).requires_grad_() for t in (q, k, v))
    out = dt.attention(ql, kl, vl, causal=True, group=pg)
    out.backward(dt.shard(do, group=pg))
    check(relerr(out, dt.shard(ro, group=pg)) < 1e-4, "pg out")
    check(relerr(ql.grad, dt.shard(rdq, group=pg)) < 1e-4, "pg dq")
    full = dt.unshard(out.detach(), group=pg)
    check(relerr(full, ro) < 1e-4, "pg unshard")
    # The shard of torch rank t is the one MPI rank t of a world split would get.
    mine = dt.positions(S, group=pg)
    want = dt.positions(S, group=None)
    want_of_torch_rank = comm.allgather(want)[P - 1 - rank]
    check(torch.equal(mine, want_of_torch_rank), f"positions {mine.tolist()} vs {want_of_torch_rank.tolist()}")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_inputs():
    """Refused with a clear message on every rank, and the next good call still works."""
    S = 4 * P + 2
    q, k, v, _ = inputs(1, S, 4, 2, 8, torch.float32, 51)
    ql, kl, vl = (dt.shard(t) for t in (q, k, v))

    def refused(fn, exc, needle, what):
        try:
            fn()
        except exc as e:
            check(needle in str(e), f"{what}: message '{e}' lacks '{needle}'")
            return
        raise AssertionError(f"{what}: accepted")
    refused(lambda: dt.attention(ql, kl.bfloat16(), vl), TypeError, "share one dtype", "dtype mix")
    refused(lambda: dt.attention(ql.double(), kl.double(), vl.double()), TypeError, "float64", "float64")
    refused(lambda: dt.attention(ql, kl.to("meta"), vl), ValueError, "is on meta", "device")
    refused(lambda: dt.attention(ql, kl[:, :, :1].expand(ql.shape[0], ql.shape[1], 2, 8), vl), Exception,
            "k: axis 2 (heads): stride 0", "broadcast view")
    refused(lambda: dt.attention(ql, kl, vl, layout="diagonal"), ValueError, "layout", "layout")
    refused(lambda: dt.attention(ql, kl, vl, group="world"), TypeError, "group must be", "group type")
    if P > 1:
        # One rank with other heads: every rank raises, naming the field.
        qh = ql[:, :, :2] if rank == 0 else ql
        refused(lambda: dt.attention(qh, kl[:, :, :1] if rank == 0 else kl, vl[:, :, :1] if rank == 0 else vl),
                ValueError, "disagree on heads", "heads across ranks")
        # Rank 0 with one row only: the lengths sum to a sequence whose zigzag split is not that.
        cut = lambda t: t[:, :1] if rank == 0 else t  # noqa: E731
        refused(lambda: dt.attention(cut(ql), cut(kl), cut(vl), causal=True), ValueError,
                "local sequence lengths", "lengths across ranks")
    out = dt.attention(ql, kl, vl, causal=True)
    ro, _, _, _ = reference(q, k, v, torch.zeros_like(q), allowed(S, True))
    check(relerr(out, dt.shard(ro)) < 1e-4, "a good call after the refusals")


def plan_cache():
    """More problems than dt.MAX_PLANS: the oldest plans are freed on every rank alike and made
    again when needed, results unchanged."""
    keep = dt.MAX_PLANS
    dt.MAX_PLANS = 2
    try:
        for S in (3 * P + 1, 3 * P + 2, 3 * P + 3, 3 * P + 1):
            q, k, v, _ = inputs(1, S, 2, 1, 8, torch.float32, 60 + S)
            out = dt.attention(*(dt.shard(t) for t in (q, k, v)), causal=True)
            ro, _, _, _ = reference(q, k, v, torch.zeros_like(q), allowed(S, True))
            check(relerr(out, dt.shard(ro)) < 1e-4, f"S = {S}")
            check(len(dt._plans) <= 2, f"{len(dt._plans)} plans kept")
    finally:
        dt.MAX_PLANS = keep


def unmapped_group():
    """Two processes started without mpirun (each its own MPI job of one rank) joined in a torch
    gloo group: the group does not map onto MPI ranks, and both refuse it with a message."""
    if P != 1:
        raise Skip("runs at P = 1 (it starts its own processes)")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ)
        for key in list(env):  # no trace of this mpirun: each child is an MPI singleton
            if key.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte", "OMPI_MCA_pmix")):
                env.pop(key)
        kids = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--unmapped-child", str(r), d],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in range(2)]
        outs = [kid.communicate(timeout=120)[0] for kid in kids]
    for r, (kid, text) in enumerate(zip(kids, outs)):
        check(kid.returncode == 0 and "REFUSED distattn: the torch ProcessGroup does not map onto one MPI job" in text,
              f"child {r} (rc {kid.returncode}): {text[-2000:]}")


def _unmapped_child(r, d):
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=f"file://{d}/store", rank=r, world_size=2)
    x = torch.randn(1, 8, 2, 8)
    try:
        dt.attention(x, x, x, group=tdist.group.WORLD)
        print("ACCEPTED")
    except ValueError as e:
        print("REFUSED", e)
    tdist.destroy_process_group()


TESTS = [installed_package, lazy_attributes, shard_roundtrip, fwd_bwd_layouts_masks, fwd_bwd_mqa_scale, fwd_bwd_bf16, varlen_documents,
         transposed_views, compiled_model, process_group, bad_inputs, plan_cache, unmapped_group]


def main():
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    return run(TESTS, comm, only, f"# {P} ranks, torch {torch.__version__}, library {distattn.library_path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--unmapped-child":
        _unmapped_child(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    sys.exit(main())
