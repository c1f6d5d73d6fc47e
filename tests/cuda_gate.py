#!/usr/bin/env python3
"""cuda_gate.py: the build gates of the CUDA backend, read from the nvcc-built library with cuobjdump
(no GPU needed). Called by ctest (tests/cuda.cmake):

  cuda_gate.py resources LIB SRCDIR  every kernel of LIB against its `// budget:` line in SRCDIR
  cuda_gate.py sass LIB SRCDIR       the tensor-core instructions really are in the sm_80 SASS
  cuda_gate.py selftest LIB SRCDIR   the two checks above refuse planted violations

A budget line, next to the kernel in a .cu or .cuh file:
  // budget: <kernel> sm_80 REG<=N SHARED<=N
<kernel> is the kernel's name without template arguments or parameters (it covers every
instantiation) or its exact mangled name. SHARED is static shared memory (dynamic shared memory is
sized at launch). Every kernel needs a line for sm_80; lines for other archs are checked when present
(on sm_90a cuobjdump's SHARED includes the 1 KiB per block the system reserves there: a kernel with
no static shared memory shows SHARED:1024).
STACK and LOCAL must be 0 on every arch (no spills, no local memory).

cuobjdump comes from PyPI's nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm in a venv outside the tree
(scripts/setup-cuda-tools.sh, run by `make setup`): $DA_CUOBJDUMP, else
$DISTATTN_TOOLS_VENV or $HOME/.cache/distattn/venv-tools, else PATH. Missing tools fail the test.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

REQUIRED_SASS_SM80 = [
    ("HMMA.16816.F32.BF16", r"\bHMMA\.16816\.F32\.BF16\b"),
    ("HMMA.16816.F32 (fp16)", r"\bHMMA\.16816\.F32(?!\.BF16)\b"),
    ("LDSM.16.M88.4", r"\bLDSM\.16\.M88\.4\b"),
    ("LDGSTS", r"\bLDGSTS\b"),
]


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def find_tool(name):
    env = os.environ.get("DA_" + name.upper())
    if env:
        return env
    venv = os.environ.get("DISTATTN_TOOLS_VENV",
                          os.path.join(os.path.expanduser("~"), ".cache", "distattn", "venv-tools"))
    hits = sorted(glob.glob(os.path.join(venv, "**", "bin", name), recursive=True))
    if hits:
        return hits[0]
    return shutil.which(name)


def cuobjdump(args, lib):
    tool = find_tool("cuobjdump")
    if not tool:
        fail("cuobjdump not found (run `make setup`: scripts/setup-cuda-tools.sh installs PyPI "
             "nvidia-cuda-cuobjdump into $HOME/.cache/distattn/venv-tools)")
    env = dict(os.environ)
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([tool] + args + [lib], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        fail("%s %s %s: exit %d\n%s" % (tool, " ".join(args), lib, r.returncode, r.stderr))
    return r.stdout


def demangle(names):
    if not names:
        return {}
    tool = shutil.which("c++filt")
    if not tool:
        fail("c++filt (binutils) not found: kernel names cannot be matched to their budget lines")
    r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines()))


def base_name(demangled):
    """`void ns::da_fwd_kernel<64, __nv_bfloat16>(da_fwd_args)` -> `da_fwd_kernel`."""
    s = demangled
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # the name ends at the first top-level '<' or '('
        if ch in "<(" and depth == 0:
            cut = i
            break
    s = s[:cut].strip()
    return re.split(r"[\s:]+", s)[-1]


def parse_resources(text):
    """[(arch, mangled, {REG, STACK, SHARED, LOCAL})] from --dump-resource-usage output."""
    out, arch = [], None
    fn = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn and arch:
            out.append((arch, fn, dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))))
            fn = None
    return out


def parse_budgets(srcdir):
    """{(name, arch): (REG, SHARED, where)} from the `// budget:` lines of the .cu / .cuh files."""
    budgets, errors = {}, []
    files = sorted(glob.glob(os.path.join(srcdir, "*.cu")) + glob.glob(os.path.join(srcdir, "*.cuh")))
    for path in files:
        with open(path) as f:
            for no, line in enumerate(f, 1):
                if "// budget:" not in line:
                    continue
                where = "%s:%d" % (os.path.basename(path), no)
                m = re.search(r"// budget:\s*(\S+)\s+(sm_\w+)\s+REG<=(\d+)\s+SHARED<=(\d+)\s*$", line)
                if not m:
                    errors.append("%s: unreadable budget line: %s" % (where, line.strip()))
                    continue
                key = (m.group(1), m.group(2))
                if key in budgets:
                    errors.append("%s: second budget for %s %s (first at %s)" % (where, key[0], key[1],
                                                                                budgets[key][2]))
                budgets[key] = (int(m.group(3)), int(m.group(4)), where)
    return budgets, errors


def shown_name(demangled):
    """`void da_fwd_kernel<64, __nv_bfloat16>(da_fwd_args)` -> `da_fwd_kernel<64, __nv_bfloat16>`."""
    s = re.sub(r"^void\s+", "", demangled)
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return s[:i]
    return s


def check_resources(res, budgets):
    """Returns (table rows, violations)."""
    names = demangle(sorted({fn for _, fn, _ in res}))
    rows, bad = [], []
    if not res:
        bad.append("no kernels found in the library")
    for arch, fn, r in res:
        base = base_name(names.get(fn, fn))
        b = budgets.get((fn, arch)) or budgets.get((base, arch))
        label = "%s %s" % (arch, names.get(fn, fn))
        if r["STACK"] or r["LOCAL"]:
            bad.append("%s: STACK %d LOCAL %d (must be 0)" % (label, r["STACK"], r["LOCAL"]))
        if b is None:
            if arch == "sm_80":
                bad.append("%s: no `// budget: %s sm_80 REG<=N SHARED<=N` line" % (label, base))
            rows.append("%-6s %-44s REG %3d     SHARED %6d        STACK %d LOCAL %d" %
                        (arch, shown_name(names.get(fn, fn)), r["REG"], r["SHARED"], r["STACK"], r["LOCAL"]))
            continue
        if r["REG"] > b[0]:
            bad.append("%s: REG %d over its budget %d (%s)" % (label, r["REG"], b[0], b[2]))
        if r["SHARED"] > b[1]:
            bad.append("%s: SHARED %d over its budget %d (%s)" % (label, r["SHARED"], b[1], b[2]))
        rows.append("%-6s %-44s REG %3d/%-3d SHARED %6d/%-6d STACK %d LOCAL %d" %
                    (arch, shown_name(names.get(fn, fn)), r["REG"], b[0], r["SHARED"], b[1], r["STACK"], r["LOCAL"]))
    return rows, bad


def sass_sections(text):
    """{arch: sass text} from cuobjdump -sass output."""
    out, arch = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        if arch:
            out.setdefault(arch, []).append(line)
    return {a: "\n".join(v) for a, v in out.items()}


def check_sass(sections, need_hgmma):
    bad, counts = [], []
    sm80 = sections.get("sm_80", "")
    if not sm80:
        bad.append("no sm_80 code in the library")
    for label, pat in REQUIRED_SASS_SM80:
        n = len(re.findall(pat, sm80))
        counts.append("sm_80 %-24s %d" % (label, n))
        if n == 0:
            bad.append("sm_80 SASS has no %s" % label)
    if "sm_90a" not in sections:
        bad.append("no sm_90a code in the library")
    n = len(re.findall(r"\bHGMMA\b", sections.get("sm_90a", "")))
    counts.append("sm_90a %-23s %d%s" % ("HGMMA", n, "" if need_hgmma else " (no wgmma in the sources)"))
    if need_hgmma and n == 0:
        bad.append("the sources use wgmma but the sm_90a SASS has no HGMMA (compiled out by an arch guard?)")
    return counts, bad


def sources_use_wgmma(srcdir):
    for path in glob.glob(os.path.join(srcdir, "*.cu")) + glob.glob(os.path.join(srcdir, "*.cuh")):
        with open(path) as f:
            if re.search(r"\bwgmma\.", f.read()):
                return True
    return False


def cmd_resources(lib, srcdir):
    res = parse_resources(cuobjdump(["--dump-resource-usage"], lib))
    budgets, errors = parse_budgets(srcdir)
    rows, bad = check_resources(res, budgets)
    print("\n".join(rows))
    bad = errors + bad
    if bad:
        fail("%d violation(s):\n  %s" % (len(bad), "\n  ".join(bad)))
    print("resources: %d kernel entries within budget, no stack, no local memory" % len(res))


def cmd_sass(lib, srcdir):
    counts, bad = check_sass(sass_sections(cuobjdump(["-sass"], lib)), sources_use_wgmma(srcdir))
    print("\n".join(counts))
    if bad:
        fail("\n  ".join(bad))
    print("sass: the tensor-core path is in the sm_80 code")


def cmd_selftest(lib, srcdir):
    """The checks must refuse planted violations, on the real library's output."""
    res = parse_resources(cuobjdump(["--dump-resource-usage"], lib))
    if not res:
        fail("selftest: no kernels in the library")
    budgets, _ = parse_budgets(srcdir)
    names = demangle(sorted({fn for _, fn, _ in res}))
    arch, fn, r = next(x for x in res if x[0] == "sm_80")
    base = base_name(names.get(fn, fn))
    problems = []
    # 1. a budget one register below the kernel's use
    tight = dict(budgets)
    for name in (base, fn):  # whichever form the kernel's budget line uses
        tight[(name, "sm_80")] = (r["REG"] - 1, 1 << 30, "planted")
    if not any("over its budget" in b for b in check_resources(res, tight)[1]):
        problems.append("a REG budget below use was accepted")
    # 2. the kernel's budget line removed
    missing = {k: v for k, v in budgets.items() if k[0] != base and k[0] != fn}
    if not any("no `// budget:" in b for b in check_resources(res, missing)[1]):
        problems.append("a kernel without a budget line was accepted")
    # 3. local memory
    spilled = [(a, f, dict(x, LOCAL=8) if f == fn else x) for a, f, x in res]
    if not any("LOCAL 8" in b for b in check_resources(spilled, budgets)[1]):
        problems.append("LOCAL > 0 was accepted")
    # 4. SASS without LDGSTS, and wgmma sources without HGMMA
    sections = sass_sections(cuobjdump(["-sass"], lib))
    stripped = {a: re.sub(r"\bLDGSTS\b", "LDG", t) for a, t in sections.items()}
    if not any("LDGSTS" in b for b in check_sass(stripped, False)[1]):
        problems.append("SASS without LDGSTS was accepted")
    if not any("HGMMA" in b for b in check_sass({a: re.sub(r"\bHGMMA\b", "X", t) for a, t in sections.items()}, True)[1]):
        problems.append("wgmma sources without HGMMA were accepted")
    # 5. the build gate itself: da_cuda's compiler and flags (written by kernels/cuda/CMakeLists.txt)
    #    accept a clean kernel and refuse one that spills / uses local memory
    problems += check_ptxas_gate(os.path.join(os.path.dirname(os.path.abspath(lib)), "gate-flags.txt"))
    if problems:
        fail("selftest: " + "; ".join(problems))
    print("selftest: planted over-budget, missing budget, LOCAL>0, missing LDGSTS, missing HGMMA and a "
          "spilling kernel are all refused (probe kernel %s)" % base)


PLANT_CLEAN = "__global__ void probe(float *o) { o[threadIdx.x] *= 2.0f; }\n"
# 64 live floats per thread under a 64-register cap (launch bounds 1024 x 1): spills for sure, and
# the dynamically indexed array lives in local memory.
PLANT_SPILL = r"""
__global__ void __launch_bounds__(1024, 1) probe(float *o, int n, int j) {
  float a[64];
  for (int i = 0; i < 64; i++) a[i] = o[i * n];
  float s = 0;
  for (int i = 0; i < 64; i++)
    for (int k = 0; k < 64; k++) s += a[i] * a[k] * o[i + k];
  o[threadIdx.x] = s + a[j & 63];
}
"""


def check_ptxas_gate(flags_file):
    import tempfile
    if not os.path.exists(flags_file):
        return ["%s missing (da_cuda's gate flags)" % flags_file]
    with open(flags_file) as f:
        lines = [x for x in f.read().splitlines() if x]
    nvcc, flags = lines[0], lines[1:]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, src, want_ok in (("clean", PLANT_CLEAN, True), ("spill", PLANT_SPILL, False)):
            cu = os.path.join(d, name + ".cu")
            with open(cu, "w") as f:
                f.write(src)
            r = subprocess.run([nvcc, "-c", cu, "-o", os.path.join(d, name + ".o")] + flags,
                               capture_output=True, text=True)
            if want_ok and r.returncode != 0:
                out.append("the gate flags refuse a clean kernel: %s" % r.stderr[-500:])
            if not want_ok and (r.returncode == 0 or not re.search(r"spill|Local memory", r.stderr)):
                out.append("the gate flags accepted a spilling kernel (exit %d)" % r.returncode)
    return out


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("resources", "sass", "selftest"):
        print(__doc__)
        sys.exit(2)
    {"resources": cmd_resources, "sass": cmd_sass, "selftest": cmd_selftest}[sys.argv[1]](sys.argv[2], sys.argv[3])


if __name__ == "__main__":
    main()
