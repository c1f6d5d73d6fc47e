#!/usr/bin/env python3
"""bench/cpu_acceptance.py: the acceptance of the CPU kernel issue (22) as one run on one machine:
every criterion measured, compared with its threshold, and reported PASS or FAIL.

Prefill, per shape (seq 4K and 16K, D 64 and 128, causal and none; 4 heads): each repetition runs
`distattn kernel` in fp32 and in bf16 (fwd and bwd), then torch's CPU SDPA in fp32 and in bf16
(bench/torch_side.py's runs), so all four sides of a ratio come from the same minutes. Medians
over the repetitions. Criteria, forward and forward+backward (the sum of the two medians):
  bf16 >= 1.5x distattn's own fp32, bf16 >= 1.3x torch's bf16, fp32 >= 1.1x (fwd) and 1.2x
  (fwd+bwd) torch's fp32.
Decode, 256K context, D 128, 1, 4 and 8 query heads per KV head (--kv-heads KV heads, 1 by
default: 256 MiB of fp32 cache), fp32 and bf16, 1 and 2 threads: `distattn kernel --ops decode`,
whose ratio_membw is the decode's read rate over a same-run streaming read of the same bytes
with the same threads; median >= 0.8.

Speed is reported, never asserted by a test: this is a benchmark (not in `make test`). Exit 0 when
every criterion passes, 1 when one fails, 2 when a run failed (a wrong distattn value stops it),
3 without torch. The bf16 criteria are about the levels with bf16 products (amx: AMX tiles,
avx512bf16: vdpbf16ps): on a CPU without them the bf16 kernels widen to fp32; the table says which
ISA level ran.

Usage (the torch venv's python):
  bench/cpu_acceptance.py [--distattn build/distattn] [--reps 3] [--iters 3] [--json FILE]
                          [--seqs 4K,16K] [--dims 64,128] [--masks causal,none] [--kv-heads 1]
                          [--no-prefill] [--no-decode]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_side import cpu_model, import_torch, parse_size, run_distattn, torch_times  # noqa: E402

BF16_OVER_FP32 = 1.5
BF16_OVER_TORCH = 1.3
FP32_FWD_OVER_TORCH = 1.1
FP32_FWDBWD_OVER_TORCH = 1.2
DECODE_OVER_STREAM = 0.8
# Prefill: (what, the other side (side, dtype), distattn's dtype, thresholds for fwd and fwd+bwd);
# the ratio is the other side's time over distattn's.
PREFILL_CRITERIA = (
    ("bf16 {} over own fp32", ("da", "fp32"), "bf16", (BF16_OVER_FP32, BF16_OVER_FP32)),
    ("bf16 {} over torch bf16", ("torch", "bf16"), "bf16", (BF16_OVER_TORCH, BF16_OVER_TORCH)),
    ("fp32 {} over torch fp32", ("torch", "fp32"), "fp32", (FP32_FWD_OVER_TORCH, FP32_FWDBWD_OVER_TORCH)),
)


def prefill(torch, a, seq, D, mask, crit, out):
    """One prefill shape: the four sides, interleaved per repetition; appends criteria rows."""
    sh = {d: {"seq": seq, "H": 4, "G": 4, "D": D, "mask": mask, "dtype": d, "ops": "fwd,bwd"} for d in ("fp32", "bf16")}
    t = {(side, d, op): [] for side in ("da", "torch") for d in sh for op in ("fwd", "bwd")}
    isa = {}
    for rep in range(a.reps):
        for d in sh:
            r = run_distattn(a.distattn, sh[d], a.threads, a.iters, 16 if rep == 0 else 0)
            for op in ("fwd", "bwd"):
                if r[op].get("wrong", 0):
                    raise SystemExit(f"cpu_acceptance.py: distattn {op} {sh[d]}: {r[op]['wrong']} wrong values")
                t[("da", d, op)].append(r[op]["time_s"])
                isa[d] = r[op].get("isa", "?")
        for d in sh:
            tt = torch_times(torch, sh[d], ["fwd", "bwd"], a.iters)
            for op in ("fwd", "bwd"):
                t[("torch", d, op)].append(tt[op])
    m = {k: statistics.median(v) for k, v in t.items()}
    name = f"{seq // 1024}K D{D} {mask}"
    if out:
        out.write(json.dumps({"cmd": "cpu-acceptance-prefill", "seq": seq, "heads": 4, "dim": D, "mask": mask,
                              "threads": a.threads, "reps": a.reps, "iters": a.iters, "isa": isa,
                              "median_s": {"/".join(k): v for k, v in m.items()},
                              "reps_s": {"/".join(k): v for k, v in t.items()}}) + "\n")
        out.flush()

    def time_of(side, d, ops):
        return sum(m[(side, d, op)] for op in ops)

    for what, other, d, need in PREFILL_CRITERIA:
        for label, ops, thr in (("fwd", ("fwd",), need[0]), ("fwd+bwd", ("fwd", "bwd"), need[1])):
            crit.append((name, f"{what.format(label)} [{isa[d]}]", time_of(*other, ops) / time_of("da", d, ops), thr))


def decode(a, group, dtype, threads, crit, out):
    """One decode configuration: the median ratio_membw over the repetitions."""
    sh = {"seq": parse_size("256K"), "H": group * a.kv_heads, "G": a.kv_heads, "D": 128, "mask": "causal",
          "dtype": dtype, "ops": "decode"}
    recs = []
    for rep in range(a.reps):
        r = run_distattn(a.distattn, sh, threads, a.iters, 16 if rep == 0 else 0)["decode"]
        if r.get("wrong", 0):
            raise SystemExit(f"cpu_acceptance.py: distattn decode {sh}: {r['wrong']} wrong values")
        recs.append(r)
    ratio = statistics.median(x["ratio_membw"] for x in recs)
    if out:
        out.write(json.dumps({"cmd": "cpu-acceptance-decode", "seq": sh["seq"], "heads": sh["H"], "kv_heads": sh["G"],
                              "dim": 128, "dtype": dtype, "threads": threads, "reps": a.reps, "iters": a.iters,
                              "isa": recs[0].get("isa"), "ratio_membw": ratio,
                              "ratio_membw_reps": [x["ratio_membw"] for x in recs]}) + "\n")
        out.flush()
    crit.append((f"decode 256K D128 {sh['H']}:{sh['G']} {dtype}",
                 f"{threads} thread{'s' if threads > 1 else ''}: read rate over stream [{recs[0].get('isa', '?')}]",
                 ratio, DECODE_OVER_STREAM))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distattn", default=os.path.join(os.environ.get("BUILD", "build"), "distattn"))
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians over them)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per op per run")
    ap.add_argument("--threads", type=int, default=2, help="threads of the prefill runs (decode runs 1 and 2)")
    ap.add_argument("--json", default=None, help="append JSON lines here (the runs' medians and the verdicts)")
    ap.add_argument("--seqs", default="4K,16K")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--masks", default="causal,none")
    ap.add_argument("--kv-heads", type=int, default=1, help="KV heads of the decode cache (query heads: 1, 4, 8 per)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    a = ap.parse_args()
    torch = import_torch("cpu_acceptance.py", a.threads)
    if torch is None:
        return 3
    if not os.access(a.distattn, os.X_OK):
        print(f"cpu_acceptance.py: {a.distattn} is not an executable (build first, or --distattn)", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    t0 = time.time()
    print(f"# issue 22 acceptance on {cpu_model()} ({os.cpu_count()} cpus), torch {torch.__version__}, "
          f"{a.reps} interleaved reps x {a.iters} iters (medians); load at start {load0[0]:.2f}", flush=True)
    out = open(a.json, "a") if a.json else None
    crit = []
    try:
        if not a.no_prefill:
            for seq in (parse_size(s) for s in a.seqs.split(",")):
                for D in (int(d) for d in a.dims.split(",")):
                    for mask in a.masks.split(","):
                        prefill(torch, a, seq, D, mask, crit, out)
                        print(f"# {seq // 1024}K D{D} {mask}: done at {time.time() - t0:.0f} s", flush=True)
        if not a.no_decode:
            for group in (1, 4, 8):
                for dtype in ("fp32", "bf16"):
                    for threads in (1, 2):
                        decode(a, group, dtype, threads, crit, out)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(f"# {'shape':<24} {'criterion':<56} {'measured':>8} {'needs':>6} verdict")
    for shape, what, val, need in crit:
        print(f"  {shape:<24} {what:<56} {val:>8.3f} {need:>6.2f} {'PASS' if val >= need else 'FAIL'}")
    npass = sum(1 for c in crit if c[2] >= c[3])
    print(f"# {npass} of {len(crit)} criteria pass; load at end {os.getloadavg()[0]:.2f}; {time.time() - t0:.0f} s")
    if out:
        out.write(json.dumps({"cmd": "cpu-acceptance-verdict", "cpu": cpu_model(), "torch_version": torch.__version__,
                              "pass": npass, "criteria": len(crit),
                              "rows": [{"shape": s, "criterion": w, "measured": v, "needs": n, "pass": v >= n}
                                       for s, w, v, n in crit]}) + "\n")
        out.close()
    return 0 if npass == len(crit) else 1


if __name__ == "__main__":
    sys.exit(main())
