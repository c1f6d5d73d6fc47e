#!/usr/bin/env python3
"""sweep.py: scaling studies of distattn's real drivers under SimGrid SMPI (docs/scaling.md).

Runs distattn-sim (sim/Makefile) under smpirun on generated platforms (sim/mkplatform.py), puts
`distattn plan` (the closed-form model) beside every simulated point, writes JSON Lines and PNG
plots.

  sweep.py --build BUILD --out DIR [--quick] [--jobs N]   the study (make sim), N points at once
  sweep.py --build BUILD --check                 the label-sim test: a few small runs vs the model
  sweep.py --build BUILD --out DIR --study1m [--maxp P]   issue 20's study: 1M tokens, H = 32, G = 8,
                        ring / zigzag / ulysses / hybrid and the compute floor on h100 and h100rail
  sweep.py --build BUILD --out DIR --study1m --remodel    only the model columns and plots again

Exit 77 when smpicc/smpirun are missing (ctest: skipped).
"""
import argparse, json, math, os, shutil, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMPI_CFG = ["--cfg=smpi/simulate-computation:no", "--cfg=smpi/privatization:no",
            "--cfg=smpi/test:1e-8", "--cfg=smpi/wtime:0",
            "--cfg=smpi/display-timing:no", "--log=root.thres:critical",
            # SMPI's communicator constructor broadcasts an id; the selector's SMP-aware bcast would
            # first allgather every rank's host over a ring (P^2 messages per MPI_Comm_dup).
            "--cfg=smpi/bcast:binomial_tree",
            # Recursive doubling for every allreduce (tree decode's, the plans' agreement), as the
            # model assumes: SMPI's "ompi" selector falls to reduce + bcast for 16 KB over more ranks
            # than elements (4.7x slower at 128 ranks).
            "--cfg=smpi/allreduce:rdb",
            # Plain links: no TCP window, no piecewise factors fitted to an Ethernet cluster.
            "--cfg=smpi/bw-factor:0:1", "--cfg=smpi/lat-factor:0:1", "--cfg=network/TCP-gamma:0",
            "--cfg=network/crosstraffic:0",
            # Collective algorithms as Open MPI picks them (recursive doubling for small allreduce).
            "--cfg=smpi/coll-selector:ompi"]
# Kernel rates of the simulated devices (sim/sim.h) and `distattn plan --machine` presets.
CALIB = {
    "h100": dict(fwd=600, bwd=450, mem=3000, call=10),
    "h100rail": dict(fwd=600, bwd=450, mem=3000, call=10),  # the same GPUs, one NIC each
    "a100": dict(fwd=190, bwd=150, mem=1800, call=10),
}


def need_tools():
    if not shutil.which("smpicc") or not shutil.which("smpirun"):
        print("smpicc/smpirun not found (Debian: libsimgrid-dev): skipped")
        sys.exit(77)


def build_sim(build):
    out = os.path.join(build, "sim")
    subprocess.run(["make", "-s", "-C", HERE, "O=" + out], check=True)
    return os.path.join(out, "distattn-sim")


PLATFORM_LOCK = threading.Lock()
PLATFORMS = set()


def platform(kind, ranks, work):
    """Platform XML and hostfile for `ranks` GPUs (whole nodes), written once per run (so an
    edited mkplatform.py is never shadowed by an old file), shared by concurrent points."""
    nodes = max(1, math.ceil(ranks / 8))
    xml = os.path.join(work, f"{kind}-{nodes}.xml")
    hosts = os.path.join(work, f"{kind}-{nodes}.hosts")
    with PLATFORM_LOCK:
        if xml not in PLATFORMS:
            with open(xml, "w") as f:
                subprocess.run([sys.executable, os.path.join(HERE, "mkplatform.py"), kind, str(nodes), "--hostfile",
                                hosts], stdout=f, check=True)
            PLATFORMS.add(xml)
    return xml, hosts


class NotInBuild(Exception):
    """distattn-sim exited 3: the algorithm asked for is not in this library build."""


def simulate(exe, work, kind, ranks, args, timeout=900):
    """One smpirun: the JSON record of rank 0, with the host's wall and CPU seconds for it."""
    xml, hosts = platform(kind, ranks, work)
    c = CALIB[kind]
    cmd = (["smpirun", "-np", str(ranks), "-platform", xml, "-hostfile", hosts] + SMPI_CFG +
           [exe] + args + ["--calib", kind, "--fwd-tflops", str(c["fwd"]), "--bwd-tflops", str(c["bwd"]),
                           "--mem-gbps", str(c["mem"]), "--call-us", str(c["call"])])
    # SMPI's nonblocking collectives are linear algorithms (latency grows with P, unlike Open MPI's
    # libnbc): tree decode uses its blocking-allreduce variant here, which SMPI runs like Open MPI.
    # DISTATTN_WAIT_BLOCKING: the transport waits in MPI_Wait and uses blocking collectives instead
    # of polling MPI_Test (each poll is a context switch of the simulator, its injected time would
    # blur the finish, and SMPI's nonblocking collectives cost P^2 host work). Simulated ranks own
    # no real memory (sim_alloc.c): no memory budget applies.
    env = dict(os.environ, DISTATTN_DECODE_BLOCKING="1", DISTATTN_WAIT_BLOCKING="1", DISTATTN_MEM_BUDGET="off")
    # The point's own host seconds (wall, CPU): points run concurrently, so not os.times().
    tfile = os.path.join(work, f"time.{os.getpid()}.{threading.get_ident()}")
    timed = ["/usr/bin/time", "-f", "%e %U %S", "-o", tfile] if os.path.exists("/usr/bin/time") else []
    r = subprocess.run(timed + cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if "driver not in this build" in r.stderr:
        raise NotInBuild(r.stderr.strip().splitlines()[0])
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rec = json.loads(lines[-1])
    if timed:
        wall, user, system = (float(x) for x in open(tfile).read().split()[-3:])
        os.remove(tfile)
        rec["host_wall_s"], rec["host_cpu_s"] = wall, round(user + system, 2)
    rec["machine"] = kind
    return rec


def model(build, kind, ranks, args):
    """`distattn plan` for the same problem: the JSON record of the one algorithm asked for."""
    exe = os.path.join(build, "distattn")
    tmp = os.path.join(build, "sim", f"plan.{os.getpid()}.{threading.get_ident()}.jsonl")
    if os.path.exists(tmp):
        os.remove(tmp)
    subprocess.run([exe, "plan", "--machine", kind, "--ranks", str(ranks), "--json", tmp] + args,
                   check=True, capture_output=True)
    recs = [json.loads(l) for l in open(tmp)]
    os.remove(tmp)
    return recs


def ring_point(build, exe, work, kind, ranks, algo, seq, heads=32, kv=32, dim=128, bwd=False, block=0):
    a = ["--seq", str(seq), "--heads", str(heads), "--kv-heads", str(kv), "--dim", str(dim), "--mask", "causal"]
    sa = a + ["--algo", algo] + (["--backward"] if bwd else []) + (["--block", str(block)] if block else [])
    rec = simulate(exe, work, kind, ranks, sa)
    m = model(build, kind, ranks, a + ["--algo", algo, "--block", str(rec["block"])] + (["--backward"] if bwd else []))[0]
    rec["model_total_s"] = m["total_s"]
    rec["model_err"] = rec["total_s"] / m["total_s"] - 1
    rec["model_exposed_s"] = m["comm_exposed_s"]
    return rec


def decode_point(build, exe, work, kind, ranks, algo, context, heads=32, kv=8, dim=128):
    a = ["--heads", str(heads), "--kv-heads", str(kv), "--dim", str(dim)]
    rec = simulate(exe, work, kind, ranks, a + ["--decode", algo, "--context", str(context), "--steps", "3"])
    m = [r for r in model(build, kind, ranks, a + ["--seq", str(context), "--decode", "--algo", "ring"])
         if r["cmd"] == "plan-decode"][0]
    rec["model_step_s"] = m["tree_s" if algo == "tree" else "ring_s"]
    rec["model_err"] = rec["step_median_s"] / rec["model_step_s"] - 1
    return rec


def check(build):
    """Label-sim test: the real ring / zigzag drivers at 8 (one node), 16 (two nodes, transfer-bound)
    and 128 ranks against the closed-form model, within 15%."""
    exe = build_sim(build)
    work = os.path.join(build, "sim", "check")
    os.makedirs(work, exist_ok=True)
    worst, bad = 0.0, 0
    cases = [("h100", 8, "ring", 64 * 1024, False), ("h100", 8, "zigzag", 64 * 1024, True),
             ("h100", 16, "striped", 64 * 1024, False), ("h100", 16, "ring", 32 * 1024, True),
             ("h100", 128, "zigzag", 1024 * 1024, False)]  # 16 nodes, under a second of host time
    for kind, P, algo, seq, bwd in cases:
        r = ring_point(build, exe, work, kind, P, algo, seq, heads=8, kv=8, dim=128, bwd=bwd)
        ok = abs(r["model_err"]) <= 0.15
        worst = max(worst, abs(r["model_err"]))
        bad += not ok
        print(f"{algo:8s} P={P:3d} S={seq:7d} {'fwd+bwd' if bwd else 'fwd':7s} sim {r['total_s']:.4e} s  "
              f"model {r['model_total_s']:.4e} s  err {100 * r['model_err']:+.1f}%  {'ok' if ok else 'FAIL'}")
    # Ulysses (all-to-all) on both platforms at 16 ranks (two nodes), and the hybrid where this
    # build has its driver (otherwise reported as not run, which is not a failure).
    a = ["--seq", str(64 * 1024), "--heads", "32", "--kv-heads", "8", "--dim", "128", "--mask", "causal"]
    for kind, algo, U in (("h100", "ulysses", 0), ("h100rail", "ulysses", 0), ("h100rail", "hybrid", 8)):
        extra = ["--algo", algo] + (["--ulysses", str(U)] if U else [])
        try:
            r = simulate(exe, work, kind, 16, a + extra + (["--layout", "zigzag"] if U else []))
        except NotInBuild as e:
            print(f"{algo:8s} P= 16 S=  65536 fwd     {kind}: not run ({e})")
            continue
        m = model(build, kind, 16, a + extra)[0]
        err = r["total_s"] / m["total_s"] - 1
        ok = abs(err) <= 0.15
        worst = max(worst, abs(err))
        bad += not ok
        print(f"{algo:8s} P= 16 S=  65536 fwd     sim {r['total_s']:.4e} s  model {m['total_s']:.4e} s  "
              f"err {100 * err:+.1f}%  {kind}{' U=%d' % U if U else ''}  {'ok' if ok else 'FAIL'}")
    for algo in ("tree", "ring"):
        r = decode_point(build, exe, work, "h100", 16, algo, 256 * 1024)
        ok = abs(r["model_err"]) <= 0.15
        worst = max(worst, abs(r["model_err"]))
        bad += not ok
        print(f"decode {algo:4s} P= 16 ctx 256K sim {r['step_median_s']:.4e} s  model {r['model_step_s']:.4e} s  "
              f"err {100 * r['model_err']:+.1f}%  {'ok' if ok else 'FAIL'}")
    print(f"# worst |sim/model - 1| = {100 * worst:.1f}% (limit 15%)")
    print("# FAIL" if bad else "# PASS")
    return 1 if bad else 0


def plots(recs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fw = [r for r in recs if r.get("study") in ("weak", "strong")]
    for study in ("weak", "strong"):
        pts = [r for r in fw if r["study"] == study]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for algo, mk in (("ring", "o"), ("striped", "s"), ("zigzag", "^")):
            p = sorted((r["ranks"], r["total_s"], r["model_total_s"]) for r in pts if r["algo"] == algo)
            if not p:
                continue
            l, = ax.plot([x[0] for x in p], [x[1] for x in p], marker=mk, label=f"{algo} (simulated)")
            ax.plot([x[0] for x in p], [x[2] for x in p], ls=":", color=l.get_color(), label=f"{algo} (model)")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("ranks (H100 GPUs, 8 per node)")
        ax.set_ylabel("causal forward time (s)")
        per = pts[0]["seq"] // pts[0]["ranks"]
        ax.set_title("weak scaling: %dK tokens per rank" % (per // 1024) if study == "weak"
                     else "strong scaling: %dK tokens" % (pts[0]["seq"] // 1024))
        ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(out, f"{study}.png"), dpi=110), plt.close(fig)
    dec = [r for r in recs if r.get("cmd") == "sim-decode"]
    if dec:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for algo, mk in (("tree", "o"), ("ring", "s")):
            p = sorted((r["ranks"], r["step_median_s"], r["model_step_s"]) for r in dec if r["algo"] == algo)
            l, = ax.plot([x[0] for x in p], [1e3 * x[1] for x in p], marker=mk, label=f"{algo} decode (simulated)")
            ax.plot([x[0] for x in p], [1e3 * x[2] for x in p], ls=":", color=l.get_color(), label=f"{algo} (model)")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("ranks (H100 GPUs)"), ax.set_ylabel("decode step latency (ms)")
        ax.set_title("one token, %dK-token context" % (dec[0]["context"] // 1024))
        ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(out, "decode.png"), dpi=110), plt.close(fig)


def study(build, out, quick, jobs):
    exe = build_sim(build)
    work = os.path.join(build, "sim", "work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "sweep.jsonl")
    maxp = 64 if quick else 1024
    ranks = [p for p in (8, 16, 32, 64, 128, 256, 512, 1024) if p <= maxp]
    # (host cost estimate, study, function, args): the estimate orders the queue, largest first, so
    # the two workers finish together. A ring costs the host about P^2 rank-steps.
    tasks = []
    # Striped vs Ring, causal, 256K tokens on 8 A100s, H = G = 32 (Striped Attention: 1.45x end to end).
    for algo in ("ring", "striped", "zigzag"):
        tasks.append((64, "a100-256k", ring_point, ("a100", 8, algo, 256 * 1024), dict(bwd=True)))
    # Weak scaling: 16K tokens per rank (128K at 8 ranks .. 16M at 1024), one KV sub-block per shard
    # (--block 16K: the automatic quarter-shard sub-blocks would quadruple the zigzag's kernel calls,
    # each a simulator event, for the same simulated time within 0.5%: docs/scaling.md).
    # Strong: 1M tokens, automatic sub-blocks.
    for P in ranks:
        for algo in ("ring", "striped", "zigzag"):
            tasks.append((P * P, "weak", ring_point, ("h100", P, algo, 16 * 1024 * P), dict(block=16 * 1024)))
            tasks.append((P * P, "strong", ring_point, ("h100", P, algo, 1024 * 1024), {}))
    # Decode: one token against a 1M-token context, GQA 32/8.
    for P in ranks:
        for algo in ("tree", "ring"):
            tasks.append((P, "decode", decode_point, ("h100", P, algo, 1024 * 1024), {}))
    tasks.sort(key=lambda t: -t[0])

    def run(t):
        _, study_name, fn, args, kw = t
        r = fn(build, exe, work, *args, **kw)
        r["study"] = study_name
        print(json.dumps({k: r[k] for k in r if k in ("study", "algo", "ranks", "seq", "context", "total_s",
                                                       "step_median_s", "model_err", "host_wall_s", "host_cpu_s")}),
              flush=True)
        return r

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        recs = list(pool.map(run, tasks))
    wall = time.time() - t0
    order = {"a100-256k": 0, "weak": 1, "strong": 2, "decode": 3}
    recs.sort(key=lambda r: (order[r["study"]], r["ranks"], r["algo"]))
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    plots(recs, out)
    errs = [abs(r["model_err"]) for r in recs]
    cpu = sum(r.get("host_cpu_s", 0) for r in recs)
    print(f"# {len(recs)} points, worst |sim/model - 1| = {100 * max(errs):.1f}%; "
          f"{wall:.0f} s wall for the points ({jobs} at a time), {cpu:.0f} s of host CPU in smpirun")


# Issue 20's study: a 1M-token causal prefill (forward), H = 32 query heads, G = 8 KV heads, D = 128,
# bf16, from 8 to 1024 H100s on the one-uplink platform (h100) and the rail-optimized one (h100rail).
S1M = dict(seq=1024 * 1024, heads=32, kv=8, dim=128)
HYBRID_U = (8, 32)  # Ulysses degrees of the hybrid rows: one node, and the head-count limit H / G * G = 32


def floor_s(kind, ranks, seq=S1M["seq"], heads=S1M["heads"], dim=S1M["dim"]):
    """The compute floor: the causal forward's FLOPs, 4 * H * D * S (S + 1) / 2, spread evenly over P
    devices at the kernel rate the simulator charges (CALIB: 600 TFLOP/s forward, FA3-class)."""
    return 4.0 * heads * dim * seq * (seq + 1) / 2 / (ranks * CALIB[kind]["fwd"] * 1e12)


def model_args(algo, U=0):
    a = ["--seq", str(S1M["seq"]), "--heads", str(S1M["heads"]), "--kv-heads", str(S1M["kv"]),
         "--dim", str(S1M["dim"]), "--mask", "causal", "--algo", algo]
    return a + (["--ulysses", str(U)] if algo == "hybrid" else [])


def point_1m(build, exe, work, kind, ranks, algo, U=0):
    """One point of the 1M study: simulated, or a row saying why not ("refused" by the plan, or
    "not run" when the binary lacks the driver). The model and the floor are added later."""
    base = dict(study="s1m", machine=kind, algo=algo, ranks=ranks, seq=S1M["seq"], heads=S1M["heads"],
                kv_heads=S1M["kv"], dim=S1M["dim"], ulysses=U if algo == "hybrid" else (ranks if algo == "ulysses" else 0))
    a = ["--seq", str(S1M["seq"]), "--heads", str(S1M["heads"]), "--kv-heads", str(S1M["kv"]), "--dim",
         str(S1M["dim"]), "--mask", "causal", "--algo", algo] + (["--ulysses", str(U), "--layout", "zigzag"]
                                                                  if algo == "hybrid" else [])
    try:
        rec = simulate(exe, work, kind, ranks, a)
    except NotInBuild as e:
        return dict(base, status="not run: driver not in this build", detail=str(e))
    except RuntimeError as e:
        msg = str(e)
        if "cannot be split" in msg or "must split evenly" in msg:
            why = [l for l in msg.splitlines() if "ulysses:" in l]
            return dict(base, status="refused: head count", detail=(why[0] if why else msg)[-300:])
        raise
    rec.update(base)
    rec["status"] = "simulated"
    return rec


def add_models(build, recs):
    for r in recs:
        r["floor_s"] = floor_s(r["machine"], r["ranks"])
        try:
            m = model(build, r["machine"], r["ranks"], model_args(r["algo"], r.get("ulysses", 0)))[0]
            r["model_total_s"] = m["total_s"]
            r["model_err"] = r["total_s"] / m["total_s"] - 1 if r.get("status") == "simulated" else None
        except (subprocess.CalledProcessError, IndexError, KeyError, OSError):
            r["model_total_s"], r["model_err"] = None, None


def plots_1m(recs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, kind, title in ((axs[0], "h100", "one 400 Gb/s uplink per node (h100)"),
                            (axs[1], "h100rail", "one 400 Gb/s NIC per GPU, rail-optimized (h100rail)")):
        pts = [r for r in recs if r["machine"] == kind]
        series = [("ring", 0, "o"), ("zigzag", 0, "^"), ("ulysses", 0, "s")] + [("hybrid", u, "D") for u in HYBRID_U]
        for algo, U, mk in series:
            sim = sorted((r["ranks"], r["total_s"]) for r in pts if r["algo"] == algo and r.get("ulysses", 0) in (U, r["ranks"] if algo == "ulysses" else U)
                         and r["status"] == "simulated")
            mod = sorted((r["ranks"], r["model_total_s"]) for r in pts if r["algo"] == algo
                         and (algo != "hybrid" or r.get("ulysses") == U) and r.get("model_total_s")
                         and not r["status"].startswith("refused"))
            name = algo if algo != "hybrid" else f"hybrid U={U}"
            color = None
            if sim:
                l, = ax.plot([x[0] for x in sim], [x[1] for x in sim], marker=mk, label=f"{name} (simulated)")
                color = l.get_color()
            if mod:
                ax.plot([x[0] for x in mod], [x[1] for x in mod], ls=":", marker=mk, mfc="none", color=color,
                        label=f"{name} (model{'' if sim else ', not simulated'})")
        fl = sorted({(r["ranks"], r["floor_s"]) for r in pts})
        ax.plot([x[0] for x in fl], [x[1] for x in fl], color="k", ls="--", label="compute floor")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("ranks (H100 GPUs, 8 per node)"), ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axs[0].set_ylabel("causal forward, 1M tokens (s)")
    axs[1].legend(fontsize=7)
    fig.suptitle("1M tokens, H = 32, G = 8, D = 128, bf16, causal", fontsize=11)
    fig.tight_layout(), fig.savefig(os.path.join(out, "study1m.png"), dpi=110), plt.close(fig)


def study_1m(build, out, jobs, maxp, remodel, hybrid_only=False):
    path = os.path.join(out, "study1m.jsonl")
    kept = []  # --hybrid-only: the recorded rows of the other algorithms, kept as they are
    if hybrid_only:
        kept = [r for r in (json.loads(l) for l in open(path)) if r["algo"] != "hybrid"]
    if remodel:
        recs = [json.loads(l) for l in open(path)]
    else:
        exe = build_sim(build)
        work = os.path.join(build, "sim", "work1m")
        os.makedirs(work, exist_ok=True)
        os.makedirs(out, exist_ok=True)
        ranks = [p for p in (8, 16, 32, 64, 128, 256, 512, 1024) if p <= maxp]
        tasks = []
        for kind in ("h100", "h100rail"):
            for P in ranks:
                for algo in ("ring", "zigzag") if not hybrid_only else ():
                    tasks.append((P * P, (kind, P, algo)))
                # Ulysses alone: H % P == 0 up to P = 32; at 64 the plan's refusal is recorded (run:
                # cheap) and the larger P listed with it without running.
                if P <= 64 and not hybrid_only:
                    tasks.append((P, (kind, P, "ulysses")))
                for U in HYBRID_U:
                    if U < P:
                        tasks.append(((P // U) ** 2 * U, (kind, P, "hybrid", U)))
        tasks.sort(key=lambda t: -t[0])
        hybrid_missing = []

        def run(t):
            args = t[1]
            if args[2] == "hybrid" and hybrid_missing:
                return dict(hybrid_missing[0], ranks=args[1], machine=args[0], ulysses=args[3])
            r = point_1m(build, exe, work, *args)
            if args[2] == "hybrid" and r["status"].startswith("not run"):
                hybrid_missing.append(r)
            print(json.dumps({k: r.get(k) for k in ("machine", "algo", "ranks", "ulysses", "status", "total_s",
                                                    "host_wall_s", "host_cpu_s")}), flush=True)
            return r

        t0 = time.time()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            recs = kept + list(pool.map(run, tasks))
        for kind in ("h100", "h100rail"):
            ref = [r for r in recs if r["machine"] == kind and r["algo"] == "ulysses" and r["ranks"] == 64]
            for P in ranks if not hybrid_only else ():
                if P > 64 and ref and ref[0]["status"].startswith("refused"):
                    recs.append(dict(ref[0], ranks=P, ulysses=P, detail=f"as at 64 ranks: H = 32 < P = {P}"))
        print(f"# {len(recs)} rows, {time.time() - t0:.0f} s wall ({jobs} at a time), "
              f"{sum(r.get('host_cpu_s', 0) for r in recs):.0f} s of smpirun CPU")
    add_models(build, recs)
    recs.sort(key=lambda r: (r["machine"], r["ranks"], r["algo"], r.get("ulysses", 0)))
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    plots_1m(recs, out)
    for r in recs:
        t = r.get("total_s")
        print(f"{r['machine']:9s} P={r['ranks']:5d} {r['algo']:8s} U={r.get('ulysses', 0):3d} "
              f"{'%.4e s' % t if t else '-':>12s} model {'%.4e' % r['model_total_s'] if r.get('model_total_s') else '-':>10s} "
              f"floor {r['floor_s']:.4e}  {r['status']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out", default=os.path.join(ROOT, "sim", "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--study1m", action="store_true", help="issue 20's 1M-token study (study1m.jsonl, study1m.png)")
    ap.add_argument("--remodel", action="store_true", help="with --study1m: model columns and plots only")
    ap.add_argument("--hybrid-only", action="store_true",
                    help="with --study1m: run the hybrid rows again, keep the file's other rows")
    ap.add_argument("--maxp", type=int, default=1024, help="with --study1m: largest rank count")
    ap.add_argument("--jobs", type=int, default=2, help="points simulated at once (default 2: the cores)")
    a = ap.parse_args()
    need_tools()
    if a.plots_only:
        plots([json.loads(l) for l in open(os.path.join(a.out, "sweep.jsonl"))], a.out)
        return 0
    if a.check:
        return check(os.path.abspath(a.build))
    if a.study1m:
        study_1m(os.path.abspath(a.build), os.path.abspath(a.out), a.jobs, a.maxp, a.remodel, a.hybrid_only)
        return 0
    study(os.path.abspath(a.build), os.path.abspath(a.out), a.quick, a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
