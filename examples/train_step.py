"""train_step.py: one training step of a causal attention layer whose sequence is split over the
ranks of an MPI job, from Python: NumPy arrays, an mpi4py communicator, the distattn package.
The same layer as examples/train_step.c: forward, loss, backward through the library, the
gradients checked against central finite differences of the whole layer in float64, an SGD step.

    mpirun -np 3 /usr/bin/python3 examples/train_step.py    (any -np; exit code 1 on failure)

The package is found on PYTHONPATH or installed (pip install ./python); the library through
DISTATTN_LIBRARY, the install prefix, or the source tree's build*/lib (docs/library.md).

The layer, for x [S][E]:  q = x Wq, k = x Wk, v = x Wv (H query heads sharing G KV heads of dim D),
o = softmax(q k^T / sqrt(D), causal) v,  y = o Wo,  loss = 1/(2S) sum (y - t)^2.
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

S, E, H, G, D = 203, 32, 4, 2, 16
comm = MPI.COMM_WORLD
rank, nranks = comm.Get_rank(), comm.Get_size()

# The model: weights replicated (same seed on every rank); inputs and targets of all S tokens are
# generated everywhere only because the float64 check needs them: a rank trains on its own rows.
rng = np.random.default_rng(2024)
W = {"Wq": rng.uniform(-1, 1, (E, H * D)) * np.sqrt(3 / E),
     "Wk": rng.uniform(-1, 1, (E, G * D)) * np.sqrt(3 / E),
     "Wv": rng.uniform(-1, 1, (E, G * D)) * np.sqrt(3 / E),
     "Wo": rng.uniform(-1, 1, (H * D, E)) * np.sqrt(3 / (H * D))}
x_all = rng.uniform(-1, 1, (S, E))
t_all = 0.5 * rng.uniform(-1, 1, (S, E))


def loss_f64(W):
    """The whole layer in float64 on one process: the oracle."""
    q = (x_all @ W["Wq"]).reshape(S, H, D)
    k = np.repeat((x_all @ W["Wk"]).reshape(S, G, D), H // G, axis=1)
    v = np.repeat((x_all @ W["Wv"]).reshape(S, G, D), H // G, axis=1)
    s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((S, S), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    o = np.einsum("hij,jhd->ihd", p, v).reshape(S, H * D)
    return 0.5 * np.sum((o @ W["Wo"] - t_all) ** 2) / S


# Once per shape: the plan (collective; every rank passes the same problem). zigzag balances the
# causal work; S = 203 does not divide by P and needs no padding.
plan = distattn.Plan(comm, seq=S, heads=H, kv_heads=G, dim=D, causal=True, algo="zigzag")
pos = plan.positions  # this rank's rows, global positions
x, t = x_all[pos], t_all[pos]


def forward(W):
    """Returns the global loss and what the backward needs."""
    n = len(pos)
    q = (x @ W["Wq"]).astype(np.float32).reshape(n, H, D)  # the kernel takes fp32 (or bf16/fp16)
    k = (x @ W["Wk"]).astype(np.float32).reshape(n, G, D)
    v = (x @ W["Wv"]).astype(np.float32).reshape(n, G, D)
    o, lse = plan.forward(q, k, v)  # collective
    od = o.reshape(n, H * D).astype(np.float64)
    y = od @ W["Wo"]
    loss = comm.allreduce(0.5 * np.sum((y - t) ** 2) / S, op=MPI.SUM)
    return loss, (q, k, v, o, lse, od, y)


def backward(W, saved):
    """dL/dW summed over the ranks (the weights are replicated, as in data parallelism)."""
    q, k, v, o, lse, od, y = saved
    n = len(pos)
    dy = (y - t) / S
    dout = (dy @ W["Wo"].T).astype(np.float32).reshape(n, H, D)
    dq, dk, dv = plan.backward(q, k, v, o, dout, lse)  # collective; dk, dv for this rank's keys
    grads = {"Wo": od.T @ dy,
             "Wq": x.T @ dq.reshape(n, H * D).astype(np.float64),
             "Wk": x.T @ dk.reshape(n, G * D).astype(np.float64),
             "Wv": x.T @ dv.reshape(n, G * D).astype(np.float64)}
    return {name: comm.allreduce(g, op=MPI.SUM) for name, g in grads.items()}


loss0, saved = forward(W)
grad = backward(W, saved)

# The check: 4 entries of each matrix by central differences of the float64 loss, spread over
# the ranks; the error is relative to the matrix's largest gradient (fp32 threshold 1e-4).
checks = []
for name in W:
    quarter = W[name].size // 4
    for j in range(4):  # one entry in each quarter of the matrix
        checks.append((name, j * quarter + (7 * len(checks) + 3) % quarter))
mine = []
for c, (name, i) in enumerate(checks):
    if c % nranks != rank:
        continue
    h, w0 = 1e-5, W[name].flat[i]
    W[name].flat[i] = w0 + h
    lp = loss_f64(W)
    W[name].flat[i] = w0 - h
    lm = loss_f64(W)
    W[name].flat[i] = w0
    fd = (lp - lm) / (2 * h)
    mine.append((c, name, i, grad[name].flat[i], fd, abs(grad[name].flat[i] - fd) / np.abs(grad[name]).max()))
rows = sorted(r for part in comm.allgather(mine) for r in part)
err_loss = abs(loss0 - loss_f64(W)) / abs(loss_f64(W))
err_grad = max(r[5] for r in rows)

# An SGD step: the loss goes down.
lr = 0.5
for name in W:
    W[name] -= lr * grad[name]
loss1, _ = forward(W)

ok = err_loss < 1e-5 and err_grad < 1e-4 and loss1 < loss0
if rank == 0:
    for c, name, i, g, fd, e in rows:
        print(f"d loss / d {name}[{i:4d}] = {g:+.8e}   finite difference {fd:+.8e}   error {e:.1e}"
              f" (checked on rank {c % nranks})")
    print(f"# train_step.py: {nranks} ranks, S = {S} tokens (zigzag, causal), H = {H}, G = {G}, "
          f"D = {D}, E = {E}; {distattn.version()}")
    print(f"# loss {loss0:.8f} (float64 reference: relative error {err_loss:.1e})")
    print(f"# gradients: {len(rows)} entries against float64 finite differences, max error "
          f"{err_grad:.1e} of max |grad|")
    print(f"# after one SGD step (lr {lr}): loss {loss1:.8f} ({'down' if loss1 < loss0 else 'NOT down'})")
    print(f"# {'PASS' if ok else 'FAIL'}")
plan.free()
sys.exit(0 if ok else 1)
