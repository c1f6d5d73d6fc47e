"""decode_loop.py: generation with the KV cache spread over the ranks of an MPI job, from Python
(the same flow as examples/decode_loop.c). A distributed prefill (Plan.forward, zigzag) leaves each
rank its own k/v rows; they go into the paged cache as they are (KVCache.prefill with the same
layout, no message); every step appends the new token's k/v (KVCache.append: local, each page to one
rank) and runs one decode step (DecodePlan.step: the split-KV kernel on every shard and one fused
reduction). Each step is checked against float64 attention over the whole sequence.

    mpirun -np 3 /usr/bin/python3 examples/decode_loop.py [tree|ring] [steps]
"""
import os
import sys

import numpy as np
from mpi4py import MPI

try:
    import distattn
except ImportError:  # run from the source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import distattn

B, H, G, D, PROMPT, PAGE = 2, 8, 2, 64, 300, 32
algo = sys.argv[1] if len(sys.argv) > 1 else "tree"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
comm = MPI.COMM_WORLD
rank, nranks = comm.Get_rank(), comm.Get_size()

# The "model": every token's k and v from a seeded generator, the same on every rank (so every
# rank can check against the whole sequence; a rank only ever hands the library its own rows).
rng = np.random.default_rng(7)
total = PROMPT + steps
K = rng.uniform(-1, 1, (B, total, G, D)).astype(np.float32)
V = rng.uniform(-1, 1, (B, total, G, D)).astype(np.float32)
Qp = rng.uniform(-1, 1, (B, PROMPT, H, D)).astype(np.float32)

# 1. Prefill: causal attention over the prompts, each rank its zigzag rows.
plan = distattn.Plan(comm, seq=PROMPT, batch=B, heads=H, kv_heads=G, dim=D, causal=True, algo="zigzag")
pos = plan.positions
k_loc, v_loc = np.ascontiguousarray(K[:, pos]), np.ascontiguousarray(V[:, pos])
out_prompt, _ = plan.forward(np.ascontiguousarray(Qp[:, pos]), k_loc, v_loc)

# 2. The cache, with the prefill's layout: the rows go into this rank's pages as they are.
cache = distattn.KVCache(comm, batch=B, kv_heads=G, dim=D, page=PAGE, layout="zigzag")
for b in range(B):
    cache.prefill(b, PROMPT, k_loc[b], v_loc[b])
assert np.array_equal(cache.local_positions(0), pos)

# 3. The decode plan and the loop: the new query depends on the previous step's output.
dec = distattn.DecodePlan(comm, batch=B, heads=H, kv_heads=G, dim=D, algo=algo)
out = np.zeros((B, H, D), np.float32)
worst = 0.0
if rank == 0:
    print(f"# decode_loop.py: {nranks} ranks, {algo}, B = {B}, H = {H}, G = {G}, D = {D}, prompt {PROMPT}, page {PAGE}")
    print(f"{'step':>5} {'length':>8} {'step_ms':>10} {'bytes':>10} {'max_rel_err':>11}")
for t in range(steps):
    p = PROMPT + t  # the new token's position
    q = (0.5 * out + 0.5 * rng.uniform(-1, 1, (B, H, D))).astype(np.float32)
    cache.append(K[:, p], V[:, p])  # [B][G][D]: one token per sequence, local
    out, lse = dec.step(cache, q)   # collective; every rank gets out [B][H][D], lse [B][H]
    err = 0.0
    for b in range(B):
        kk = np.repeat(K[b, :p + 1].astype(np.float64), H // G, axis=1)  # [len][H][D]
        vv = np.repeat(V[b, :p + 1].astype(np.float64), H // G, axis=1)
        s = np.einsum("hd,jhd->hj", q[b].astype(np.float64), kk) / np.sqrt(D)
        m = s.max(axis=1, keepdims=True)
        w = np.exp(s - m)
        ref = np.einsum("hj,jhd->hd", w, vv) / w.sum(axis=1, keepdims=True)
        ref_lse = m[:, 0] + np.log(w.sum(axis=1))
        err = max(err, np.abs(out[b] - ref).max() / np.abs(ref).max(),
                  (np.abs(lse[b] - ref_lse) / np.maximum(1, np.abs(ref_lse))).max())
    err = comm.allreduce(err, op=MPI.MAX)
    worst = max(worst, err)
    st = dec.stats()
    sent = comm.allreduce(st["bytes_sent"], op=MPI.SUM)
    if rank == 0:
        print(f"{t:5d} {cache.length(0):8d} {st['step_s'] * 1e3:10.3f} {sent:10d} {err:11.1e}")
held = cache.nbytes()[1]
if rank == 0:
    print(f"# rank 0 holds {cache.local_rows(0)} of {cache.length(0)} rows of sequence 0 ({held / 1024:.1f} KiB of k/v)")
    print(f"# max relative error {worst:.1e} against float64")
    print(f"# {'PASS' if worst < 1e-4 else 'FAIL'}")
for h in (dec, cache, plan):
    h.free()
sys.exit(0 if worst < 1e-4 else 1)
