#!/usr/bin/env python3
"""bench/torch_side.py: distattn's CPU kernels side by side with PyTorch's CPU
scaled_dot_product_attention (its flash kernel) on the same shapes, dtypes and threads, A/B
interleaved in one process tree: per repetition, one `distattn kernel` run (every op of the shape)
then the same ops in torch; medians over the repetitions. Appends one JSON line per (shape, op)
with ratio_torch = torch time / distattn time (> 1: distattn is faster) beside the ratio_sgemm
(fwd, bwd) or ratio_membw (decode) that distattn measured in the same run. Not a test: speed is
reported, never asserted; a wrong distattn result (its float64 check) fails the script.

Usage: bench/torch_side.py [--distattn build/distattn] [--reps 3] [--threads 2] [--json FILE]
                           [--shape "SEQ H G D MASK DTYPE OPS"]...
Run it with a Python that has torch (the venv of the PyTorch issue); without torch it says so
and exits 3 (bench/run.sh then skips it).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_SHAPES = [
    # seq heads kv_heads dim mask dtype ops   (the acceptance shapes of the CPU issue)
    "4K 4 4 128 causal fp32 fwd,bwd",
    "4K 4 4 128 causal bf16 fwd,bwd",
    "4K 4 4 64 none bf16 fwd,bwd",
    "16K 4 4 128 causal bf16 fwd,bwd",
    "16K 4 4 128 causal fp32 fwd,bwd",
    "256K 8 1 128 causal fp32 decode",
    "256K 8 1 128 causal bf16 decode",
]


def parse_size(s):
    m = {"K": 1 << 10, "M": 1 << 20}
    return int(s[:-1]) * m[s[-1].upper()] if s[-1].upper() in m else int(s)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def import_torch(prog, threads):
    """torch with its CPU thread count set, or None (said on stderr) where it is not importable."""
    try:
        import torch
    except ImportError as e:
        print(f"{prog}: torch not importable ({e}): run it with the torch venv's python", file=sys.stderr)
        return None
    torch.set_num_threads(threads)
    return torch


def run_distattn(exe, shape, threads, iters, verify):
    """One `distattn kernel` run of every op of the shape; returns {op: json record}."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tf:
        path = tf.name
    cmd = [exe, "kernel", "--seq", str(shape["seq"]), "--heads", str(shape["H"]), "--kv-heads", str(shape["G"]),
           "--dim", str(shape["D"]), "--mask", shape["mask"], "--dtype", shape["dtype"], "--ops", shape["ops"],
           "--threads", str(threads), "--iters", str(iters), "--warmup", "1", "--verify", str(verify),
           "--json", path]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout)
            raise SystemExit(f"torch_side.py: {' '.join(cmd)} exited {p.returncode}")
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    finally:
        os.unlink(path)
    return {r["op"]: r for r in recs}


def torch_times(torch, shape, ops, iters):
    """Median seconds per op of torch's SDPA on the shape ([1, heads, seq, dim] tensors)."""
    F = torch.nn.functional
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[shape["dtype"]]
    S, H, G, D = shape["seq"], shape["H"], shape["G"], shape["D"]
    causal = shape["mask"] == "causal"
    gen = torch.Generator().manual_seed(1)
    res = {}
    if "fwd" in ops or "bwd" in ops:
        q = (torch.rand(1, H, S, D, generator=gen) * 6 - 3).to(dt).requires_grad_("bwd" in ops)
        k = (torch.rand(1, G, S, D, generator=gen) * 2 - 1).to(dt).requires_grad_("bwd" in ops)
        v = (torch.rand(1, G, S, D, generator=gen) * 2 - 1).to(dt).requires_grad_("bwd" in ops)
        g = (torch.rand(1, H, S, D, generator=gen) * 2 - 1).to(dt)
        kw = {"is_causal": causal, "enable_gqa": G != H}
        if "fwd" in ops:
            ts = []
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, **kw)  # warmup
                for _ in range(iters):
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, **kw)
                    ts.append(time.perf_counter() - t0)
            res["fwd"] = statistics.median(ts)
        if "bwd" in ops:  # the backward alone, as distattn's bwd op (bwd_prep + bwd_block)
            ts = []
            for it in range(iters + 1):
                out = F.scaled_dot_product_attention(q, k, v, **kw)
                t0 = time.perf_counter()
                out.backward(g)
                t = time.perf_counter() - t0
                q.grad = k.grad = v.grad = None
                if it:
                    ts.append(t)
            res["bwd"] = statistics.median(ts)
    if "decode" in ops:  # one query row (the last position) against the whole cache
        q = (torch.rand(1, H, 1, D, generator=gen) * 6 - 3).to(dt)
        k = (torch.rand(1, G, S, D, generator=gen) * 2 - 1).to(dt)
        v = (torch.rand(1, G, S, D, generator=gen) * 2 - 1).to(dt)
        ts = []
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, enable_gqa=G != H)
            for _ in range(iters):
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=G != H)
                ts.append(time.perf_counter() - t0)
        res["decode"] = statistics.median(ts)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distattn", default=os.path.join(os.environ.get("BUILD", "build"), "distattn"))
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians over them)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per op per repetition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="append JSON lines here")
    ap.add_argument("--shape", action="append", help='"SEQ H G D MASK DTYPE OPS" (repeatable)')
    a = ap.parse_args()
    torch = import_torch("torch_side.py", a.threads)
    if torch is None:
        return 3
    shapes = []
    for s in a.shape or DEFAULT_SHAPES:
        seq, H, G, D, mask, dtype, ops = s.split()
        if mask not in ("causal", "none"):
            raise SystemExit(f"torch_side.py: mask {mask}: only causal and none are compared")
        shapes.append({"seq": parse_size(seq), "H": int(H), "G": int(G), "D": int(D), "mask": mask,
                       "dtype": dtype, "ops": ops})
    load0 = os.getloadavg()
    print(f"# distattn vs torch {torch.__version__} CPU SDPA, {a.threads} threads, {a.reps} interleaved reps x "
          f"{a.iters} iters (medians); cpu: {cpu_model()}, {os.cpu_count()} cpus; load at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"# ratio_torch = torch time / distattn time (> 1: distattn faster); ratio_sgemm / ratio_membw: "
          f"distattn against its same-run baseline")
    print(f"# {'op':>6} {'seq':>7} {'H':>3} {'G':>3} {'D':>4} {'mask':>7} {'dtype':>5} {'isa':>16} "
          f"{'distattn_ms':>11} {'torch_ms':>9} {'ratio_torch':>11} {'rate':>8} {'torch_rate':>10} {'ratio_base':>10}")
    out = open(a.json, "a") if a.json else None
    for sh in shapes:
        ops = sh["ops"].split(",")
        da = {op: [] for op in ops}
        to = {op: [] for op in ops}
        recs = {}
        for rep in range(a.reps):
            r = run_distattn(a.distattn, sh, a.threads, a.iters, 16 if rep == 0 else 0)
            for op in ops:
                if r[op].get("wrong", 0):
                    raise SystemExit(f"torch_side.py: distattn {op} {sh}: {r[op]['wrong']} wrong values")
                da[op].append(r[op]["time_s"])
                recs.setdefault(op, []).append(r[op])
            t = torch_times(torch, sh, ops, a.iters)
            for op in ops:
                to[op].append(t[op])
        for op in ops:
            td, tt = statistics.median(da[op]), statistics.median(to[op])
            rec0 = recs[op][0]
            if op == "decode":
                rate, trate = rec0["kv_bytes"] / td * 1e-9, rec0["kv_bytes"] / tt * 1e-9
                base = statistics.median(x["ratio_membw"] for x in recs[op])
            else:
                fl = (4.0 if op == "fwd" else 10.0) * sh["H"] * sh["D"] * rec0["pairs"]
                rate, trate = fl / td * 1e-9, fl / tt * 1e-9
                base = statistics.median(x["ratio_sgemm"] for x in recs[op])
            print(f"  {op:>6} {sh['seq']:>7} {sh['H']:>3} {sh['G']:>3} {sh['D']:>4} {sh['mask']:>7} {sh['dtype']:>5} "
                  f"{rec0.get('isa', '?'):>16} {td * 1e3:>11.2f} {tt * 1e3:>9.2f} {tt / td:>11.3f} {rate:>8.2f} "
                  f"{trate:>10.2f} {base:>10.3f}", flush=True)
            j = {"cmd": "kernel-vs-torch", "op": op, "seq": sh["seq"], "heads": sh["H"], "kv_heads": sh["G"],
                 "dim": sh["D"], "mask": sh["mask"], "dtype": sh["dtype"], "threads": a.threads, "reps": a.reps,
                 "iters": a.iters, "isa": rec0.get("isa"), "distattn_s": td, "torch_s": tt,
                 "ratio_torch": tt / td, "distattn_s_reps": da[op], "torch_s_reps": to[op],
                 "rate": rate, "torch_rate": trate, "rate_unit": "GB/s" if op == "decode" else "GFLOP/s",
                 "ratio_membw" if op == "decode" else "ratio_sgemm": base,
                 "max_rel_err": rec0.get("max_rel_err"), "torch_version": torch.__version__,
                 "cpu": cpu_model(), "ncpu": os.cpu_count(), "git": rec0.get("git"),
                 "load_start": load0[0], "load_end": os.getloadavg()[0]}
            if out:
                out.write(json.dumps(j) + "\n")
                out.flush()
    load1 = os.getloadavg()
    print(f"# load at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
