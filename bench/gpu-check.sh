#!/usr/bin/env bash
# gpu-check.sh: the one prepared device check of the CUDA backend (issue 17), for a lent H100/H200
# (at most 8 minutes there). It builds the backend (or reuses $DISTATTN_GPU_BUILD), then on the GPU:
# runs ctest label gpu (test_kernels_gpu: the kernel-table cases on hardware, which also confirms
# the SIMT emulation), compute-sanitizer memcheck / racecheck / synccheck on small cases
# (da_gpu_bench --check), and the benchmark of forward, backward and decode beside PyTorch's SDPA
# flash and cuDNN backends on the same shapes in the same run, with decode held against a same-run
# device-to-device copy. Everything goes to $OUT: gpu-check.log, distattn.jsonl, torch.jsonl,
# gpu-check.jsonl (both), summary.txt.
# Without a GPU (the build machines) it runs up to the point where it needs one and exits 77.
# Exit status: 0 all steps passed, 77 no GPU, 1 a step failed (the log says which).
# Needs Check to build the test binaries: the machine's own, or the carried one (DA_CARRIED_MPI).
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
BUILD=${DISTATTN_GPU_BUILD:-$ROOT/build-gpu}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
exec > >(tee -a "$LOG") 2>&1
step() { echo "## $(date -u +%H:%M:%S) $*"; }
failed=0
fail() { echo "FAILED: $*"; failed=1; }

step "build in $BUILD ($JOBS jobs)"
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "no nvcc: cannot build the CUDA backend"; exit 1
fi
export PATH=$PATH:/usr/local/cuda/bin
# The test binaries need Check (libcheck), which the GPU machine lacks: take it, with Open MPI, from
# the folder scripts/carry-openmpi.sh filled ($DA_CARRIED_MPI, default build-carry/openmpi; the
# device call names it in `carry`). Without either, the build stops here saying so.
if ! pkg-config --exists check 2>/dev/null; then
  CARRIED=${DA_CARRIED_MPI:-$ROOT/build-carry/openmpi}
  if [ -f "$CARRIED/env.sh" ]; then
    . "$CARRIED/env.sh"
    echo "Check and Open MPI from the carried folder $DA_CARRIED_MPI"
  else
    echo "no Check (libcheck) here and no carried folder $CARRIED: run scripts/carry-openmpi.sh on the build"
    echo "machine and name build-carry/openmpi in the device call's carry"; exit 1
  fi
fi
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDISTATTN_CUDA=ON > "$OUT/cmake.log" 2>&1 ||
  { tail -20 "$OUT/cmake.log"; echo "configure failed"; exit 1; }
grep "CUDA backend" "$OUT/cmake.log"
cmake --build "$BUILD" -j "$JOBS" --target test_kernels_gpu da_gpu_bench > "$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; echo "build failed"; exit 1; }
BENCH=$BUILD/tests/da_gpu_bench
echo "built: $BENCH, $BUILD/tests/test_kernels_gpu"

step "device"
"$BENCH" --probe
rc=$?
if [ $rc -eq 77 ]; then
  echo "no usable GPU here: stopping before the GPU steps (exit 77)"
  exit 77
fi
[ $rc -eq 0 ] || { echo "device probe failed ($rc)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

step "ctest -L gpu"
ctest --test-dir "$BUILD" -L gpu --output-on-failure --timeout 300 || fail "ctest -L gpu"

step "compute-sanitizer (small cases)"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$CS" ]; then
  for tool in memcheck racecheck synccheck; do
    echo "# $tool"
    "$CS" --tool "$tool" --error-exitcode 9 "$BENCH" --check || fail "compute-sanitizer $tool"
  done
else
  fail "compute-sanitizer not found"
fi

step "benchmark: distattn"
"$BENCH" | tee "$OUT/distattn.jsonl" || fail "da_gpu_bench"
step "benchmark: torch SDPA (flash, cuDNN)"
PY=${DISTATTN_PYTHON:-}
if [ -z "$PY" ]; then
  for c in "$HOME/.cache/distattn/venv-torch/bin/python" python3; do
    if "$c" -c "import torch" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
if [ -n "$PY" ]; then
  "$PY" "$ROOT/bench/gpu_bench.py" | tee "$OUT/torch.jsonl" || fail "gpu_bench.py"
else
  fail "no python with torch"
  : > "$OUT/torch.jsonl"
fi
cat "$OUT/distattn.jsonl" "$OUT/torch.jsonl" | grep '^{' > "$OUT/gpu-check.jsonl"
step "summary"
python3 "$ROOT/bench/gpu_bench.py" --summary "$OUT/distattn.jsonl" "$OUT/torch.jsonl" | tee "$OUT/summary.txt"
step "done (failed=$failed); results in $OUT"
exit $failed
