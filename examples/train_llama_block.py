"""train_llama_block.py: a small Llama-style language model (embedding, one block of RMSNorm, RoPE,
grouped-query attention through distattn, SwiGLU MLP, output head) trained for 20 AdamW steps with
its sequence split over the ranks of an MPI job in zigzag order (context parallelism: weights
replicated, every rank holds its own tokens, gradients summed over the ranks). Each step's loss is
compared with a single-process run of the same model in float64 whose attention is
torch.nn.functional.scaled_dot_product_attention on the whole sequence.

    pip install ./python                           # the wheel holds libdistattn
    mpirun -np 4 python examples/train_llama_block.py [--compile] [--steps N]

Prints one line per step (the distributed loss, the float64 loss, their relative difference) and
"# PASS" when every step agrees within 1e-5 relative; exit code 1 otherwise. --compile runs the
distributed model through torch.compile(fullgraph=True): any graph break is an error.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

try:
    import distattn.torch as dt
except ImportError:  # run from the source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import distattn.torch as dt

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 61, 64, 4, 2, 16, 128
SEQ, BATCH, LR = 120, 2, 3e-3
TOL = 1e-5


def rope(x, pos):
    """Rotary position embedding of x [B][n][h][D] at the global positions pos [n]: positions must
    be the tokens' own, which is why a sharded run asks distattn.torch.positions for them."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = pos.to(torch.float64)[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype)[None, :, None, :], ang.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Model(torch.nn.Module):
    """attention(q, k, v) is distattn's op (sharded run) or SDPA (the float64 reference)."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.norm1, self.norm2, self.norm_out = RMSNorm(DIM), RMSNorm(DIM), RMSNorm(DIM)
        self.wq = torch.nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = torch.nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.w_gate = torch.nn.Linear(DIM, HIDDEN, bias=False)
        self.w_up = torch.nn.Linear(DIM, HIDDEN, bias=False)
        self.w_down = torch.nn.Linear(HIDDEN, DIM, bias=False)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, pos):
        B, n = tokens.shape
        x = self.emb(tokens)
        h = self.norm1(x)
        q = rope(self.wq(h).view(B, n, HEADS, HEAD_DIM), pos)
        k = rope(self.wk(h).view(B, n, KV_HEADS, HEAD_DIM), pos)
        v = self.wv(h).view(B, n, KV_HEADS, HEAD_DIM)
        x = x + self.wo(self.attention(q, k, v).reshape(B, n, HEADS * HEAD_DIM))
        h = self.norm2(x)
        x = x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))
        return self.head(self.norm_out(x))


def sdpa_attention(q, k, v):
    """The reference: causal SDPA over the whole sequence, k and v repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the sharded model")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, nranks = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)

    # Same seed everywhere: identical weights on every rank and the same token stream.
    torch.manual_seed(0)
    model = Model(lambda q, k, v: dt.attention(q, k, v, causal=True, layout="zigzag"))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (args.steps, BATCH, SEQ + 1), generator=g)

    # This rank's tokens: zigzag shards of the inputs, their positions (for RoPE) and targets.
    pos = dt.positions(SEQ, layout="zigzag")
    run = torch.compile(model, fullgraph=True, backend=args.backend) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    # The float64 reference on one process (rank 0), the same initial weights.
    if rank == 0:
        ref = Model(sdpa_attention).double()
        ref.load_state_dict(model.state_dict())
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
        full_pos = torch.arange(SEQ)

    ok = True
    if rank == 0:
        print(f"# {nranks} ranks, sequence {SEQ} x batch {BATCH} in zigzag shards, model dim {DIM}, "
              f"heads {HEADS} (kv {KV_HEADS}), {args.steps} AdamW steps{', compiled' if args.compile else ''}")
        print(f"# {'step':>4s} {'loss (distattn)':>18s} {'loss (float64)':>18s} {'rel diff':>9s}")
    for step in range(args.steps):
        inp, tgt = tokens[step, :, :-1], tokens[step, :, 1:]
        logits = run(inp.index_select(1, pos), pos)
        # Mean over the whole sequence: each rank sums its tokens' losses, divided by all tokens.
        local = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.index_select(1, pos).reshape(-1),
                                reduction="sum") / (BATCH * SEQ)
        opt.zero_grad(set_to_none=False)
        local.backward()
        # Context parallelism: the gradient is the sum of the ranks' contributions.
        for p in model.parameters():
            buf = p.grad.numpy()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        loss = comm.allreduce(local.item(), op=MPI.SUM)
        opt.step()
        if rank == 0:
            rl = F.cross_entropy(ref(inp, full_pos).reshape(-1, VOCAB), tgt.reshape(-1))
            ref_opt.zero_grad()
            rl.backward()
            ref_opt.step()
            rel = abs(loss - rl.item()) / abs(rl.item())
            good = rel <= TOL and math.isfinite(loss)
            ok &= good
            print(f"  {step:4d} {loss:18.12f} {rl.item():18.12f} {rel:9.2e}{'' if good else '  FAIL'}", flush=True)
    ok = comm.bcast(ok)
    if rank == 0:
        print("# PASS" if ok else f"# FAIL: a loss differs from the float64 run by more than {TOL:g} relative")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
