#!/usr/bin/env python3
"""bench/torch_cputime.py: the torch side of bench/cpu_cputime.c: PyTorch's CPU
scaled_dot_product_attention on one thread, timed in thread CPU time (time.thread_time), best of
N, same shape ([1, 1, SEQ, D] fp32, inputs uniform in [-1, 1]) and the same FLOP counts (forward
4 D per allowed (q, k) pair, backward 10 D), so that the two are comparable on a loaded machine
where wall times are not. Prints one JSON line. Not a test.

Usage: bench/torch_cputime.py SEQ D causal|none [reps]   (with the torch venv's python)
"""
import json
import sys
import time

import torch


def main():
    S, D, mask = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    causal = mask == "causal"
    torch.set_num_threads(1)  # intra-op work then runs on this thread: its CPU time is the op's
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(1)
    q, k, v, g = ((torch.rand(1, 1, S, D, generator=gen) * 2 - 1) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    tf = tb = float("inf")
    for _ in range(reps + 1):  # the first round warms up
        with torch.no_grad():
            t0 = time.thread_time()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t1 = time.thread_time()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        t2 = time.thread_time()
        out.backward(g)
        t3 = time.thread_time()
        q.grad = k.grad = v.grad = None
        tf, tb = min(tf, t1 - t0), min(tb, t3 - t2)
    pairs = S * (S + 1) / 2 if causal else S * S
    print(json.dumps({"impl": "torch " + torch.__version__, "seq": S, "dim": D, "mask": mask, "reps": reps,
                      "fwd_ms": round(tf * 1e3, 2), "bwd_ms": round(tb * 1e3, 2),
                      "fwd_gflops": round(4 * D * pairs / tf * 1e-9, 1),
                      "bwd_gflops": round(10 * D * pairs / tb * 1e-9, 1),
                      "fwdbwd_gflops": round(14 * D * pairs / (tf + tb) * 1e-9, 1)}))


if __name__ == "__main__":
    main()
