#!/usr/bin/env python3
"""test_npy_io.py: `distattn run --input DIR --output DIR` against NumPy (issue 8, and the .npy
rows of issue 10). NumPy writes q/k/v/dout with np.save, mpirun runs distattn at P ranks, and the
outputs read back with np.load are compared with this script's own float64 attention of the same
(rounded) inputs: out, lse, and dq/dk/dv with --backward. Bad-input cases each build one broken
directory and expect exit 2 (or 1) with the file and the field named on stderr, nothing written.

  test_npy_io.py --exe build/distattn --mpirun mpirun --work DIR roundtrip
  test_npy_io.py --exe build/distattn --mpirun mpirun --work DIR bad CASE
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

try:
    import numpy as np
except ImportError:  # only on a machine without python3-numpy: skipped, and says why
    print("numpy is not installed for %s (apt install python3-numpy): skipped" % sys.executable)
    sys.exit(77)


# ---- inputs ----

def to_bf16_bits(x):
    """float32 -> bf16 bits (uint16), round to nearest even, as torch and distattn do."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def make(rng, shape, dtype):
    """(array to save, its exact float64 values)"""
    x = rng.uniform(-1, 1, size=shape).astype(np.float32)
    if dtype == "fp32":
        return x, x.astype(np.float64)
    if dtype == "fp16":
        h = x.astype(np.float16)
        return h, h.astype(np.float64)
    b = to_bf16_bits(x)
    return b, from_bf16_bits(b).astype(np.float64)


def load_values(a, dtype):
    if dtype == "bf16":
        assert a.dtype == np.uint16, a.dtype
        return from_bf16_bits(a).astype(np.float64)
    return a.astype(np.float64)


# ---- the float64 reference ----

def attention(q, k, v, dout, causal):
    """q [B,S,H,D], k/v [B,S,G,D] float64: out, lse [B,S,H], and dq, dk, dv when dout is given."""
    B, S, H, D = q.shape
    G = k.shape[2]
    rep = H // G
    scale = 1.0 / np.sqrt(D)
    kk = np.repeat(k, rep, axis=2)  # [B,S,H,D]
    vv = np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if causal:
        s = np.where(np.tril(np.ones((S, S), bool))[None, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p /= l
    lse = (m + np.log(l))[..., 0].transpose(0, 2, 1)  # [B,S,H]
    out = np.einsum("bhqk,bkhd->bqhd", p, vv)
    if dout is None:
        return out, lse, None
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vv)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
    dkh = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dvh = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dk = dkh.reshape(B, S, G, rep, D).sum(3)
    dv = dvh.reshape(B, S, G, rep, D).sum(3)
    return out, lse, (dq, dk, dv)


# ---- running distattn ----

def run(a, np_, args, env=None, timeout=100):
    cmd = [a.mpirun, "--oversubscribe", "--bind-to", "none", "--timeout", str(timeout - 10), "-np", str(np_),
           a.exe, "run"] + args
    e = dict(os.environ)
    e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
              "DISTATTN_NTHREADS": "1"})
    if env:
        e.update(env)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=e)
    return p.returncode, p.stdout, p.stderr, " ".join(cmd)


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def roundtrip_case(a, name, algo, S, B, H, G, D, dtype, causal, backward, seed):
    rng = np.random.default_rng(seed)
    d = os.path.join(a.work, name)
    din, dout_dir = os.path.join(d, "in"), os.path.join(d, "out")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(din)
    os.makedirs(dout_dir)
    lead = (B,) if B > 1 else ()
    exact = {}
    for t, heads in (("q", H), ("k", G), ("v", G)) + ((("dout", H),) if backward else ()):
        arr, val = make(rng, lead + (S, heads, D), dtype)
        np.save(os.path.join(din, t + ".npy"), arr)
        exact[t] = val if B > 1 else val[None]
    args = ["--algo", algo, "--input", din, "--output", dout_dir, "--mask", "causal" if causal else "none",
            "--iters", "1", "--warmup", "0", "--verify", "3"]
    if backward:
        args.append("--backward")
    rc, out, err, cmd = run(a, 3, args)
    if rc != 0 or "# PASS" not in out:
        fail("%s: %s: exit %d\nstdout:\n%s\nstderr:\n%s" % (name, cmd, rc, out, err))
    ref_out, ref_lse, grads = attention(exact["q"], exact["k"], exact["v"], exact.get("dout"), causal)
    tol = 1e-4 if dtype == "fp32" else 2e-2
    worst = []

    def check(fname, ref, exp_dtype, exp_shape):
        a_ = np.load(os.path.join(dout_dir, fname))
        if a_.dtype != np.dtype(exp_dtype) or a_.shape != exp_shape:
            fail("%s: %s: dtype %s shape %s, expected %s %s" % (name, fname, a_.dtype, a_.shape, exp_dtype, exp_shape))
        with open(os.path.join(dout_dir, fname), "rb") as f:
            ver = np.lib.format.read_magic(f)
        if ver != (1, 0):
            fail("%s: %s: format %s, expected 1.0" % (name, fname, ver))
        x = load_values(a_, dtype if fname != "lse.npy" else "fp32")
        if B == 1:
            x = x[None]
        scale = max(np.abs(ref).max(), 1e-6) if fname != "lse.npy" else max(np.abs(ref).max(), 1.0)
        rel = np.abs(x - ref).max() / scale
        worst.append("%s %.2e" % (fname, rel))
        if not rel <= tol:
            fail("%s: %s: max |x - ref| / max |ref| = %.3g over the tolerance %g" % (name, fname, rel, tol))

    store = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2"}[dtype]
    check("out.npy", ref_out, store, lead + (S, H, D))
    check("lse.npy", ref_lse, "<f4", lead + (S, H))
    if backward:
        check("dq.npy", grads[0], store, lead + (S, H, D))
        check("dk.npy", grads[1], store, lead + (S, G, D))
        check("dv.npy", grads[2], store, lead + (S, G, D))
    left = [f for f in os.listdir(dout_dir) if f.startswith(".")]
    if left:
        fail("%s: temporaries left in %s: %s" % (name, dout_dir, left))
    print("ok  %-28s %s S=%d B=%d H=%d G=%d D=%d %s %s%s: %s" % (name, algo, S, B, H, G, D, dtype,
          "causal" if causal else "none", " +bwd" if backward else "", ", ".join(worst)))
    shutil.rmtree(d, ignore_errors=True)


def roundtrip(a):
    # every layout at P = 3, an uneven length, GQA, each dtype, both masks, batch 2 once,
    # forward and backward
    roundtrip_case(a, "ring_fp32_causal_gqa_bwd", "ring", 1001, 1, 4, 2, 32, "fp32", True, True, 1)
    roundtrip_case(a, "striped_bf16_none_mqa_bwd", "striped", 1001, 1, 4, 1, 16, "bf16", False, True, 2)
    roundtrip_case(a, "zigzag_fp16_causal_b2_bwd", "zigzag", 301, 2, 2, 2, 64, "fp16", True, True, 3)
    roundtrip_case(a, "zigzag_fp32_none_fwd", "zigzag", 1001, 1, 6, 3, 16, "fp32", False, False, 4)
    roundtrip_case(a, "ring_bf16_causal_b2_fwd", "ring", 257, 2, 2, 1, 32, "bf16", True, False, 5)
    roundtrip_case(a, "striped_fp32_causal_fwd", "striped", 1000, 1, 2, 2, 32, "fp32", True, False, 6)


# ---- bad inputs ----

def good_dir(a, d, S=40, H=4, G=2, D=16, dtype=np.float32, dout=False):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for t, heads in (("q", H), ("k", G), ("v", G)) + ((("dout", H),) if dout else ()):
        np.save(os.path.join(d, t + ".npy"), rng.uniform(-1, 1, (S, heads, D)).astype(dtype))


def patch(path, fn):
    with open(path, "rb") as f:
        b = bytearray(f.read())
    b = fn(b)
    with open(path, "wb") as f:
        f.write(b)


def bad(a, case):
    d = os.path.join(a.work, "bad_" + case)
    shutil.rmtree(d, ignore_errors=True)
    din, dout_dir = os.path.join(d, "in"), os.path.join(d, "out")
    good_dir(a, din)
    os.makedirs(dout_dir)
    base = ["--algo", "zigzag", "--input", din, "--iters", "1", "--warmup", "0", "--verify", "2"]
    args, rc_want, err_re, env = base, 2, None, None
    np_ = 3
    if case == "missing":
        os.remove(os.path.join(din, "v.npy"))
        err_re = r"v\.npy: cannot read .*/v\.npy: No such file or directory"
    elif case == "missing_dout":
        args = base + ["--backward"]
        err_re = r"dout\.npy: cannot read .*No such file.*--backward with --input reads dout\.npy"
    elif case == "is_dir":  # issue 19: a directory used to read as "header: truncated"
        os.remove(os.path.join(din, "q.npy"))
        os.makedirs(os.path.join(din, "q.npy"))
        err_re = r"q\.npy: .*/q\.npy is a directory, not a regular file"
    elif case == "magic":
        patch(os.path.join(din, "k.npy"), lambda b: b"\x93NUMPZ" + b[6:])
        err_re = r"k\.npy: magic: not a \.npy file"
    elif case == "truncated":
        patch(os.path.join(din, "q.npy"), lambda b: b[:-100])
        err_re = r"q\.npy: file size: [0-9]+ bytes, but header \(128\) \+ shape \[40, 4, 16\] of '<f4' need [0-9]+ \(truncated\)"
    elif case == "oversized":
        patch(os.path.join(din, "q.npy"), lambda b: b + b"\0" * 8)
        err_re = r"q\.npy: file size: .*\(8 extra bytes\)"
    elif case == "dtype":
        np.save(os.path.join(din, "k.npy"), np.zeros((40, 2, 16), np.float64))
        err_re = r"k\.npy: descr '<f8': dtype not supported"
    elif case == "dtype_mismatch":
        np.save(os.path.join(din, "v.npy"), np.zeros((40, 2, 16), np.float16))
        err_re = r"v\.npy: descr '<f2' differs from q\.npy's '<f4'"
    elif case == "dtype_flag":
        args = base + ["--dtype", "bf16"]
        err_re = r"q\.npy: descr '<f4' \(fp32\) differs from --dtype bf16"
    elif case == "big_endian":
        np.save(os.path.join(din, "q.npy"), np.zeros((40, 4, 16), ">f4"))
        err_re = r"q\.npy: descr '>f4': big-endian data is not supported"
    elif case == "fortran":
        np.save(os.path.join(din, "q.npy"), np.asfortranarray(np.zeros((40, 4, 16), np.float32)))
        err_re = r"q\.npy: fortran_order: True is not supported"
    elif case == "seq_mismatch":
        np.save(os.path.join(din, "k.npy"), np.zeros((39, 2, 16), np.float32))
        err_re = r"k\.npy: shape \[39, 2, 16\]: sequence 39 differs from q\.npy's 40"
    elif case == "seq_flag":
        args = base + ["--seq", "41"]
        err_re = r"q\.npy: shape \[40, 4, 16\]: sequence 40 differs from --seq 41"
    elif case == "gqa":
        np.save(os.path.join(din, "k.npy"), np.zeros((40, 3, 16), np.float32))
        np.save(os.path.join(din, "v.npy"), np.zeros((40, 3, 16), np.float32))
        err_re = r"k\.npy: shape \[40, 3, 16\]: its 3 KV heads do not divide q\.npy's 4 heads"
    elif case == "ndim":
        np.save(os.path.join(din, "q.npy"), np.zeros((40, 64), np.float32))
        err_re = r"q\.npy: shape \[40, 64\]: 2 dimensions, expected \[S, H, D\] or \[B, S, H, D\]"
    elif case == "fifo":
        # a FIFO would block the reader's open until a writer came: refused before anyone opens it
        os.remove(os.path.join(din, "k.npy"))
        os.mkfifo(os.path.join(din, "k.npy"))
        err_re = r"k\.npy: .*/k\.npy is a FIFO, not a regular file"
    elif case == "device":
        # a device never ends (/dev/zero): refused the same way
        os.remove(os.path.join(din, "v.npy"))
        os.symlink("/dev/zero", os.path.join(din, "v.npy"))
        err_re = r"v\.npy: .*/v\.npy is a character device, not a regular file"
    elif case == "out_missing":
        args = base + ["--output", os.path.join(d, "nonexistent")]
        err_re = r"--output .*/nonexistent: No such file or directory"
    elif case == "out_not_writable":
        os.chmod(dout_dir, 0o555)
        args = base + ["--output", dout_dir]
        if os.geteuid() == 0:  # root writes anyway: use a path that is a file, not a directory
            args = base + ["--output", os.path.join(din, "q.npy")]
            err_re = r"--output .*/q\.npy: not a directory"
        else:
            err_re = r"--output .*: not writable"
    elif case == "no_clobber":
        # a failure while writing (the test hook fails rank 1's write) leaves the existing
        # out.npy as it was and no temporary behind; exit 1 (an I/O failure, not bad input)
        sentinel = np.arange(7, dtype=np.float32)
        np.save(os.path.join(dout_dir, "out.npy"), sentinel)
        before = open(os.path.join(dout_dir, "out.npy"), "rb").read()
        args = base + ["--output", dout_dir]
        env = {"DISTATTN_TEST_IO_FAIL": "1"}
        rc_want, err_re = 1, r"on rank 1: out\.npy: writing .*DISTATTN_TEST_IO_FAIL.*nothing written under the final names"
    elif case == "no_clobber_bad_input":
        np.save(os.path.join(dout_dir, "out.npy"), np.arange(7, dtype=np.float32))
        before = open(os.path.join(dout_dir, "out.npy"), "rb").read()
        np.save(os.path.join(din, "k.npy"), np.zeros((39, 2, 16), np.float32))
        args = base + ["--output", dout_dir]
        err_re = r"k\.npy: shape \[39, 2, 16\]: sequence 39 differs"
    else:
        fail("unknown case " + case)
    rc, out, err, cmd = run(a, np_, args, env=env, timeout=60)
    if rc != rc_want:
        fail("%s: %s: exit %d, expected %d\nstdout:\n%s\nstderr:\n%s" % (case, cmd, rc, rc_want, out, err))
    # every rank says it (ranks are numbered in the message)
    lines = [l for l in err.splitlines() if re.search(err_re, l)]
    ranks = {int(m.group(1)) for l in lines for m in [re.search(r"rank ([0-9]+):", l)] if m}
    if not lines or ranks != set(range(np_)):
        fail("%s: stderr has '%s' from ranks %s, expected every rank of %d\nstderr:\n%s" % (case, err_re, sorted(ranks),
             np_, err))
    if "# PASS" in out or "# FAIL" in out:
        fail("%s: results printed for a refused run\n%s" % (case, out))
    if case.startswith("no_clobber"):
        after = open(os.path.join(dout_dir, "out.npy"), "rb").read()
        if after != before:
            fail("%s: the existing out.npy was changed" % case)
        if sorted(os.listdir(dout_dir)) != ["out.npy"]:
            fail("%s: %s holds %s, expected only out.npy" % (case, dout_dir, sorted(os.listdir(dout_dir))))
    os.chmod(dout_dir, 0o755)
    print("ok  %s: exit %d, every rank: %s" % (case, rc, lines[0].strip()))
    shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True)
    ap.add_argument("--mpirun", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("what", choices=["roundtrip", "bad"])
    ap.add_argument("case", nargs="?")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.what == "roundtrip":
        roundtrip(a)
    else:
        bad(a, a.case)
    print("PASS")


if __name__ == "__main__":
    main()
