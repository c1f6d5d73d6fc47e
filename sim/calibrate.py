#!/usr/bin/env python3
"""calibrate.py: the simulator against real MPI runs on this machine (docs/scaling.md, make sim-calibrate).

1. Measures this machine: `distattn kernel --json` (one thread: forward, backward GFLOP/s at the
   shard's shape, the decode's GB/s at the context shard's) and a ping-pong between two MPI ranks
   (sim/pingpong.c: latency, bandwidth).
2. Writes a platform of this machine for P ranks: one simulated host per rank, each with a
   private split-duplex link at the ping-pong's rate and half its latency (a transfer crosses two),
   so any two ranks are one measured hop apart, one simulated host per core: ranks beyond the cores
   share them (SimGrid's CPU sharing: two ranks computing at once on a core get half each).
3. Runs the same problems for real (`mpirun -np P distattn run|decode --json`) and simulated
   (distattn-sim with those rates on that platform), and `distattn plan` with the same numbers.
4. Writes sim/results/calibration.jsonl and prints the table for docs/scaling.md.

  calibrate.py --build BUILD [--out DIR] [--ranks 2,4] [--repeat N]
"""
import argparse, json, os, shutil, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sweep  # noqa: E402  (SMPI options, build, simulate)

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
MPIRUN = shutil.which("mpirun.openmpi") or shutil.which("mpirun") or "mpirun"
MPICC = shutil.which("mpicc.openmpi") or shutil.which("mpicc") or "mpicc"
H, G, D, DT = 8, 8, 128, "bf16"  # prefill problems (decode: H = 32, G = 8)


def jsonl(path):
    return [json.loads(l) for l in open(path) if l.startswith("{")]


def mpirun(np_, args, timeout=600):
    cmd = [MPIRUN, "-np", str(np_), "--oversubscribe", "--bind-to", "none", "--timeout", str(timeout)] + args
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def kernel(build, work, seq, heads, kv, ops):
    f = os.path.join(work, f"kernel-{seq}-{heads}.jsonl")
    if os.path.exists(f):
        os.remove(f)
    subprocess.run([os.path.join(build, "distattn"), "kernel", "--seq", str(seq), "--heads", str(heads), "--kv-heads",
                    str(kv), "--dim", str(D), "--dtype", DT, "--mask", "none", "--threads", "1", "--iters", "5",
                    "--verify", "0", "--ops", ops, "--json", f], check=True, capture_output=True)
    return {r["op"]: r for r in jsonl(f)}


def measure(build, work, block, ctx):
    """One-thread kernel rates at the driver's call shape (block x block keys, no mask: the ring's
    calls are KV sub-blocks of `block` tokens), the decode's read rate at a context shard of ctx
    tokens (H = 32, G = 8), and the ping-pong."""
    # The rate of one call over a sub-block's shape: fixed costs are folded into it
    # (a fit of call + work / rate over two sizes came out negative or milliseconds on this
    # machine: the rate itself moves with the shape, through the caches).
    k = kernel(build, work, block, H, G, "fwd,bwd")
    c = {"fwd_gflops": k["fwd"]["gflops"], "bwd_gflops": k["bwd"]["gflops"], "fwd_call_us": 0.0}
    c["mem_gbps"] = kernel(build, work, ctx, 32, 8, "decode")["decode"]["gbps"]
    pp = os.path.join(build, "sim", "pingpong")
    subprocess.run([MPICC, "-O2", "-o", pp, os.path.join(HERE, "pingpong.c")], check=True)
    c.update({k: v for k, v in jsonl_text(mpirun(2, [pp]))[0].items() if k in ("lat_us", "gbps")})
    c["cores"] = os.cpu_count()
    return c


def jsonl_text(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def local_platform(work, P, c):
    """This machine: one simulated host per core, each a private split-duplex link of the ping-pong's
    rate and half its latency into one switch (shared memory: no other constraint), and a loopback
    of the same rate between ranks on one core. Ranks are dealt to the cores in turn: ranks on a
    core share its speed while they compute at once, as the OS shares it (SimGrid's CPU model),
    and one alone gets all of it (a rank blocked in MPI yields its core)."""
    cores = min(P, c["cores"])
    xml = os.path.join(work, f"local-{P}.xml")
    hosts = os.path.join(work, f"local-{P}.hosts")
    with open(xml, "w") as f:
        f.write('<?xml version="1.0"?>\n<!DOCTYPE platform SYSTEM "https://simgrid.org/simgrid.dtd">\n'
                f'<!-- this machine, {P} ranks on {cores} cores, measured by sim/calibrate.py -->\n'
                '<platform version="4.1">\n'
                f'<cluster id="local" prefix="core-" suffix="" radical="0-{cores - 1}" speed="1Gf" '
                f'bw="{c["gbps"]:.3f}GBps" lat="{c["lat_us"] / 2:.3f}us" sharing_policy="SPLITDUPLEX" '
                f'loopback_bw="{c["gbps"]:.3f}GBps" loopback_lat="{c["lat_us"]:.3f}us"/>\n'
                '</platform>\n')
    with open(hosts, "w") as f:
        f.write("\n".join(f"core-{i % cores}" for i in range(P)) + "\n")
    return xml, hosts


def simulate(exe, work, P, c, args):
    xml, hosts = local_platform(work, P, c)
    cmd = (["smpirun", "-np", str(P), "-platform", xml, "-hostfile", hosts] + sweep.SMPI_CFG + [exe] + args +
           ["--calib", "local", "--fwd-tflops", str(c["fwd_gflops"] / 1e3), "--bwd-tflops", str(c["bwd_gflops"] / 1e3),
            "--mem-gbps", str(c["mem_gbps"]), "--call-us", str(c["fwd_call_us"])])
    env = dict(os.environ, DISTATTN_DECODE_BLOCKING="1", DISTATTN_WAIT_BLOCKING="1", DISTATTN_MEM_BUDGET="off")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    recs = jsonl_text(r.stdout)
    if r.returncode != 0 or not recs:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return recs[-1]


def model(build, P, c, args):
    share = min(1.0, c["cores"] / P)
    out = subprocess.run([os.path.join(build, "distattn"), "plan", "--machine", "cpu", "--ranks", str(P),
                          "--fwd-tflops", str(c["fwd_gflops"] * share / 1e3),
                          "--bwd-tflops", str(c["bwd_gflops"] * share / 1e3), "--mem-gbps", str(c["mem_gbps"] * share),
                          "--call-us", str(c["fwd_call_us"] / share), "--link-gbps", str(c["gbps"]),
                          "--link-us", str(c["lat_us"]), "--node", str(max(P, 2)), "--json", "/dev/stdout"] + args,
                         check=True, capture_output=True, text=True).stdout
    return jsonl_text(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(os.path.dirname(HERE), "build"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--seq", default="8K", help="prefill tokens (all ranks)")
    ap.add_argument("--context", default="128K", help="decode context tokens")
    ap.add_argument("--repeat", type=int, default=3, help="real runs per problem (the median is compared)")
    a = ap.parse_args()
    sweep.need_tools()
    build, out = os.path.abspath(a.build), os.path.abspath(a.out)
    exe = sweep.build_sim(build)
    work = os.path.join(build, "sim", "calib")
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    ranks = [int(x) for x in a.ranks.split(",")]
    seq = int(a.seq[:-1]) * 1024 if a.seq[-1] in "kK" else int(a.seq)
    ctx = int(a.context[:-1]) * 1024 if a.context[-1] in "kK" else int(a.context)
    # The driver's automatic KV sub-block: a quarter of the shard, at least 1024 (comm/plan.c).
    block = max(1024, -(-(seq // min(ranks) // 4) // 64) * 64)
    c = measure(build, work, block, ctx // min(ranks))
    print("# this machine: " + json.dumps(c), flush=True)
    recs = []
    prob = ["--heads", str(H), "--kv-heads", str(G), "--dim", str(D), "--dtype", DT, "--mask", "causal"]
    for P in ranks:
        for algo, bwd in (("ring", False), ("zigzag", False), ("zigzag", True)):
            f = os.path.join(work, "real.jsonl")
            if os.path.exists(f):
                os.remove(f)
            extra = ["--backward"] if bwd else []
            for _ in range(a.repeat):
                mpirun(P, [os.path.join(build, "distattn"), "run", "--algo", algo, "--seq", str(seq), "--verify", "0",
                           "--iters", "3", "--json", f] + prob + extra)
            runs = sorted(jsonl(f), key=lambda r: r["fwd_s"] + (r["bwd_s"] or 0))
            real = runs[len(runs) // 2]
            spread = [runs[0]["fwd_s"] + (runs[0]["bwd_s"] or 0), runs[-1]["fwd_s"] + (runs[-1]["bwd_s"] or 0)]
            sim = simulate(exe, work, P, c, ["--algo", algo, "--seq", str(seq), "--block", str(real["block"])] +
                           prob + extra)
            mod = model(build, P, c, ["--algo", algo, "--seq", str(seq), "--block", str(real["block"]),
                                      "--heads", str(H), "--kv-heads", str(G), "--dim", str(D), "--dtype", DT] + extra)
            rt = real["fwd_s"] + (real["bwd_s"] or 0)
            recs.append(dict(case=f"{algo} {'fwd+bwd' if bwd else 'fwd'}", ranks=P, seq=seq, real_s=rt, real_range_s=spread,
                             sim_s=sim["total_s"], model_s=mod[0]["total_s"], err=sim["total_s"] / rt - 1,
                             real=real, sim=sim))
            print(json.dumps({k: recs[-1][k] for k in ("case", "ranks", "real_s", "sim_s", "model_s", "err")}),
                  flush=True)
        for algo in ("tree", "ring"):
            f = os.path.join(work, "real.jsonl")
            if os.path.exists(f):
                os.remove(f)
            dp = ["--heads", "32", "--kv-heads", "8", "--dim", str(D), "--dtype", DT]
            for _ in range(a.repeat):
                mpirun(P, [os.path.join(build, "distattn"), "decode", "--algo", algo, "--context", str(ctx), "--steps",
                           "8", "--verify", "0", "--json", f] + dp)
            runs = sorted(jsonl(f), key=lambda r: r["step_median_s"])
            real = runs[len(runs) // 2]
            spread = [runs[0]["step_median_s"], runs[-1]["step_median_s"]]
            sim = simulate(exe, work, P, c, ["--decode", algo, "--context", str(ctx), "--steps", "8"] + dp)
            rt = real["step_median_s"]
            recs.append(dict(case=f"decode {algo}", ranks=P, seq=ctx, real_s=rt, real_range_s=spread,
                             sim_s=sim["step_median_s"],
                             model_s=None, err=sim["step_median_s"] / rt - 1, real=real, sim=sim))
            print(json.dumps({k: recs[-1][k] for k in ("case", "ranks", "real_s", "sim_s", "err")}), flush=True)
    with open(os.path.join(out, "calibration.jsonl"), "w") as f:
        f.write(json.dumps(dict(cmd="calibration-machine", **c)) + "\n")
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"\n| case | ranks | real (median of {a.repeat} runs; min - max) | simulated | sim / real - 1 | model |\n"
          "|---|---|---|---|---|---|")
    for r in recs:
        m = f"{r['model_s'] * 1e3:.1f} ms" if r["model_s"] else "-"
        lo, hi = r["real_range_s"]
        print(f"| {r['case']} | {r['ranks']} | {r['real_s'] * 1e3:.1f} ms ({lo * 1e3:.1f} - {hi * 1e3:.1f}) | "
              f"{r['sim_s'] * 1e3:.1f} ms | {100 * r['err']:+.1f}% | {m} |")
    print(f"# {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
