#!/usr/bin/env bash
# gpu-ring-check.sh: the prepared device check of the device-memory ring (issue 18), for one lent
# H100/H200, at most 8 minutes there. On the one GPU, through cuda-ipc (ranks sharing the GPU):
#   1. ring, striped and zigzag at P = 2, 4, 8, forward and backward, verified in float64 on
#      sampled rows (`distattn run --device cuda --transport cuda-ipc --backward`); then one P = 4
#      case over `--transport mpi` (cuda-mpi: every message staged through pinned host buffers);
#   2. a 1M-token causal prefill (bf16, D 128, H 8, G 8) split 8 ways (zigzag), verified on sampled
#      rows, with --measure-overlap;
#   3. the same problem as ONE monolithic call of the CUDA kernel on the same GPU (da_gpu_ring_mono);
#      the ratio split / monolithic and the split run's overlap go to the summary;
#   4. step 2 again under MPS, when nvidia-cuda-mps-control is there and the 8 minutes allow it: a
#      measurement beside the verdict (without MPS the 8 contexts take turns on the GPU).
# Everything to $OUT: gpu-ring-check.log, ring.jsonl (every distattn run record), mono.jsonl,
# summary.json. Open MPI is not installed on the GPU machine: a carried one is used from
# $DA_CARRIED_MPI (default build-carry/openmpi under the repository root; scripts/carry-openmpi.sh
# fills it), either a prefix layout (bin/, lib/) or Debian packages extracted with dpkg -x
# (usr/bin/, usr/lib/x86_64-linux-gnu/); this script sets PATH, LD_LIBRARY_PATH and OPAL_PREFIX.
# The build needs no Check: it configures with DISTATTN_TESTS=OFF and DISTATTN_OPENBLAS=OFF and
# builds distattn and da_gpu_ring_mono only (or reuses $DISTATTN_GPU_BUILD when both are there: a
# build carried from here, configured the same way). Libraries the programs need that the loader
# cannot find (NCCL lives in PyTorch's wheels there) are looked for and put on LD_LIBRARY_PATH; if
# one is still missing the script builds there instead.
# Exit: 0 every step passed, 77 no GPU here (checked first, before building), 1 a step failed.
# DA_RING_CHECK_PROBE_ONLY=1 stops after the GPU probe (0 with a GPU): what `make test` runs.
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results/gpu-ring-check-$(date -u +%Y%m%dT%H%M%SZ)}
BUILD=${DISTATTN_GPU_BUILD:-$ROOT/build-gpu-ring}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
LOG=$OUT/gpu-ring-check.log
exec > >(tee -a "$LOG") 2>&1
step() { echo "## $(date -u +%H:%M:%S) $*"; }
failed=0
fail() { echo "FAILED: $*"; failed=1; }

step "GPU probe"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "no GPU here (nvidia-smi lists none): nothing to check (exit 77)"
  exit 77
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
[ "${DA_RING_CHECK_PROBE_ONLY:-0}" = 1 ] && { echo "probe only: stopping"; exit 0; }

step "carried Open MPI"
M=${DA_CARRIED_MPI:-$ROOT/build-carry/openmpi}
if [ -f "$M/env.sh" ]; then # scripts/carry-openmpi.sh's folder: PATH, libraries, OPAL_PREFIX, no ssh
  . "$M/env.sh"
elif [ -x "$M/bin/mpirun" ]; then
  export OPAL_PREFIX=$M PATH=$M/bin:$PATH LD_LIBRARY_PATH=$M/lib:${LD_LIBRARY_PATH:-}
elif [ -d "$M/usr/bin" ]; then
  export OPAL_PREFIX=$M/usr PATH=$M/usr/bin:$PATH
  export LD_LIBRARY_PATH=$M/usr/lib/x86_64-linux-gnu:$M/usr/lib/x86_64-linux-gnu/openmpi/lib:${LD_LIBRARY_PATH:-}
fi
MPIRUN=$(command -v mpirun || command -v mpirun.openmpi || true)
[ -n "$MPIRUN" ] || { echo "no mpirun: carry Open MPI to $M (scripts/carry-openmpi.sh)"; exit 1; }
echo "mpirun: $MPIRUN ($("$MPIRUN" --version 2>&1 | head -1))"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI=("$MPIRUN" --oversubscribe --bind-to none --mca btl self,vader -x PATH -x LD_LIBRARY_PATH -x OPAL_PREFIX)

step "build in $BUILD"
export PATH=$PATH:/usr/local/cuda/bin
DA=$BUILD/distattn
MONO=$BUILD/da_gpu_ring_mono
# Configure and build distattn and da_gpu_ring_mono in $1: no tests and no OpenBLAS (neither Check
# nor OpenBLAS is on the GPU machine; OpenBLAS only serves `distattn kernel`'s sgemm ratio).
build_here() {
  cmake -S "$ROOT" -B "$1" -DCMAKE_BUILD_TYPE=Release -DDISTATTN_CUDA=ON -DDISTATTN_TESTS=OFF \
    -DDISTATTN_OPENBLAS=OFF > "$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; echo "configure failed"; exit 1; }
  cmake --build "$1" -j "$JOBS" --target distattn da_gpu_ring_mono > "$OUT/build.log" 2>&1 ||
    { tail -30 "$OUT/build.log"; echo "build failed"; exit 1; }
}
# The shared libraries the dynamic loader cannot find for the given programs.
missing_libs() { ldd "$@" 2>/dev/null | awk '/not found/ {print $1}' | sort -u; }
# A build carried from another machine links libraries this one may keep elsewhere (NCCL comes
# with PyTorch's wheels there, site-packages/nvidia/nccl/lib, not in the toolkit's folder). Each
# missing library is looked for in the toolkit's folders, the wheels' nvidia/*/lib folders, then
# under /usr and /opt; its folder goes on LD_LIBRARY_PATH (mpirun passes it on with -x). Returns 1
# when one stays missing.
resolve_libs() {
  local lib hit d dirs
  dirs=$(ls -d /usr/local/cuda*/lib* /usr/local/cuda*/targets/*/lib 2>/dev/null
         python3 -c 'import glob, site; [print(d) for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")]' \
           2>/dev/null)
  for lib in $(missing_libs "$@"); do
    hit=""
    for d in $dirs; do [ -e "$d/$lib" ] && { hit=$d/$lib; break; }; done
    [ -n "$hit" ] || hit=$(timeout 60 find /usr /opt -name "$lib" -print -quit 2>/dev/null)
    if [ -n "$hit" ]; then
      export LD_LIBRARY_PATH=$(dirname "$hit")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      echo "$lib: not on the loader's path; using $hit"
    else
      echo "$lib: not on this machine"
    fi
  done
  [ -z "$(missing_libs "$@")" ]
}
if [ ! -x "$DA" ] || [ ! -x "$MONO" ]; then build_here "$BUILD"; fi
[ -x "$DA" ] || DA=$(find "$BUILD" -name distattn -type f -perm -u+x | head -1)
if ! resolve_libs "$DA" "$MONO"; then
  echo "the programs in $BUILD need libraries this machine lacks (built elsewhere?): building here instead"
  BUILD=$ROOT/build-gpu-ring-here DA=$ROOT/build-gpu-ring-here/distattn MONO=$ROOT/build-gpu-ring-here/da_gpu_ring_mono
  build_here "$BUILD"
  resolve_libs "$DA" "$MONO" || { ldd "$DA" "$MONO"; echo "libraries still missing: cannot run"; exit 1; }
fi
echo "distattn: $DA; mono: $MONO"
ldd "$DA" | grep -E "nccl|libmpi|hwloc|cuda|openblas" || true

JSON=$OUT/ring.jsonl
: > "$JSON"
step "1. ring, striped, zigzag at P = 2, 4, 8 on one GPU through cuda-ipc, fwd + bwd, verified"
for P in 2 4 8; do
  for A in ring striped zigzag; do
    timeout 120 "${MPI[@]}" -np $P "$DA" run --device cuda --transport cuda-ipc --algo $A \
      --seq $((16384 + P - 1)) --heads 8 --kv-heads 2 --dim 128 --dtype bf16 --mask causal --backward \
      --verify 8 --iters 2 --warmup 1 --timeout 60 --json "$JSON" || fail "$A at P = $P"
  done
done

step "1b. zigzag at P = 4 over --transport mpi (cuda-mpi: staged through pinned host buffers), fwd + bwd, verified"
timeout 120 "${MPI[@]}" -np 4 "$DA" run --device cuda --transport mpi --algo zigzag \
  --seq $((16384 + 3)) --heads 8 --kv-heads 2 --dim 128 --dtype bf16 --mask causal --backward \
  --verify 8 --iters 2 --warmup 1 --timeout 60 --json "$JSON" || fail "zigzag at P = 4 over mpi (staged)"

step "2. 1M-token causal prefill split 8 ways (zigzag, bf16, D 128, H 8, G 8), verified, overlap measured"
BIG=(run --device cuda --transport cuda-ipc --algo zigzag --seq 1M --heads 8 --kv-heads 8 --dim 128 --dtype bf16
     --mask causal --verify 2 --iters 2 --warmup 1 --measure-overlap --timeout 200)
t_big=$SECONDS
timeout 300 "${MPI[@]}" -np 8 "$DA" "${BIG[@]}" --json "$JSON" || fail "1M prefill split 8 ways"
t_big=$((SECONDS - t_big))

step "3. the same problem in one monolithic call of the CUDA kernel"
timeout 120 "$MONO" --seq 1048576 --heads 8 --kv-heads 8 --dim 128 --dtype bf16 --iters 2 | tee "$OUT/mono.jsonl" ||
  fail "monolithic call"

# Without MPS the 8 processes' contexts take turns on the GPU: one rank's copy never runs beside
# another rank's kernel (within a rank, copy and kernel do overlap). With MPS they may. A second
# measurement, not part of the verdict, and only when the check still ends within its 8 minutes.
step "4. the 1M prefill again under MPS, when there is time (not part of the verdict)"
MPSJSON=$OUT/mps.jsonl
if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  echo "no nvidia-cuda-mps-control here: skipped"
elif [ $((SECONDS + t_big + 30)) -gt 450 ]; then
  echo "skipped: ${SECONDS} s used, the split run took ${t_big} s, and the check must end within 480 s"
else
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/distattn-mps-pipe CUDA_MPS_LOG_DIRECTORY=$OUT/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    timeout $((t_big + 60)) "${MPI[@]}" -x CUDA_MPS_PIPE_DIRECTORY -x CUDA_MPS_LOG_DIRECTORY -np 8 "$DA" "${BIG[@]}" \
      --json "$MPSJSON" || echo "the MPS run failed (not part of the verdict)"
    echo quit | nvidia-cuda-mps-control
    trap - EXIT
  else
    echo "nvidia-cuda-mps-control -d failed: skipped"
  fi
fi

step "summary"
python3 - "$JSON" "$OUT/mono.jsonl" "$DEVICE" "$MPSJSON" > "$OUT/summary.json" <<'PY' || fail "summary"
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
mono = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
big = [r for r in runs if r.get("seq") == 1048576]
out = {"device": sys.argv[3], "runs": len(runs), "wrong": sum(r.get("wrong", 0) for r in runs),
       "small": [{k: r.get(k) for k in ("algo", "ranks", "seq", "transport", "fwd_s", "bwd_s", "wrong",
                                         "peak_device_bytes", "peak_pinned_bytes")}
                 for r in runs if r.get("seq") != 1048576]}
if big and mono:
    b, m = big[-1], mono[-1]
    out.update({"seq": 1048576, "split_fwd_s": b["fwd_s"], "mono_fwd_s": m["fwd_s"],
                "ratio_split_over_mono": b["fwd_s"] / m["fwd_s"], "overlap": b.get("overlap"),
                "t_compute_only_s": b.get("t_compute_only_s"), "t_comm_only_s": b.get("t_comm_only_s"),
                "big_wrong": b.get("wrong"), "peak_device_bytes": b.get("peak_device_bytes"),
                "mono_tflops": m.get("tflops")})
try:
    mps = [json.loads(l) for l in open(sys.argv[4]) if l.startswith("{")]
except OSError:
    mps = []
if mps and mono:
    x = mps[-1]
    out.update({"mps_split_fwd_s": x["fwd_s"], "mps_ratio_split_over_mono": x["fwd_s"] / mono[-1]["fwd_s"],
                "mps_overlap": x.get("overlap"), "mps_wrong": x.get("wrong")})
print(json.dumps(out))
PY
cat "$OUT/summary.json"
grep -q '"mps_wrong": [1-9]' "$OUT/summary.json" && fail "wrong rows in the MPS run (a result, whatever the timing)"
step "done (failed=$failed); results in $OUT"
exit $failed
