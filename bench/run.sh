#!/usr/bin/env bash
# bench/run.sh: `make bench`. Runs `distattn kernel` on the acceptance shape and a few neighbours
# (bf16, D = 64, GQA, non-causal), prints each table and appends one JSON line per op to
# bench/results/kernel-<host>.jsonl. Speed is reported, never asserted; a wrong result (exit 1)
# or an unsupported shape (exit 2) makes the script fail after every configuration has run.
set -uo pipefail
BUILD=${BUILD:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
EXE=${DISTATTN:-$BUILD/distattn}
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${BENCH_JSON:-$HERE/results/kernel-$HOST.jsonl}
ITERS=${ITERS:-5}
mkdir -p "$(dirname "$OUT")"
[ -x "$EXE" ] || { echo "bench/run.sh: $EXE not found (build first, or set BUILD)" >&2; exit 2; }
# The sgemm baseline must be OpenBLAS's fastest path: on AVX-512 CPUs that is its SkylakeX core,
# which OpenBLAS does not pick by itself on AMD. distattn re-executes itself with it when
# OPENBLAS_CORETYPE is unset; an inherited OPENBLAS_CORETYPE (some environments export Haswell)
# would win, so the benchmark sets it here. BENCH_KEEP_CORETYPE=1 keeps the caller's choice.
if [ -z "${BENCH_KEEP_CORETYPE:-}" ] && grep -q avx512f /proc/cpuinfo 2>/dev/null; then
  export OPENBLAS_CORETYPE=SkylakeX
fi

configs=(
  "--seq 4K --heads 4 --dim 128 --mask causal --dtype fp32"               # acceptance shape
  "--seq 4K --heads 4 --dim 128 --mask causal --dtype bf16"
  "--seq 4K --heads 4 --dim 64 --mask causal --dtype fp32"
  "--seq 4K --heads 8 --kv-heads 2 --dim 128 --mask causal --dtype fp32"  # GQA 4:1
  "--seq 4K --heads 4 --dim 128 --mask none --dtype fp32"
  "--seq 16K --heads 4 --dim 128 --mask causal --dtype fp32 --ops fwd,decode"
)
status=0
for c in "${configs[@]}"; do
  # shellcheck disable=SC2086
  "$EXE" kernel $c --iters "$ITERS" --json "$OUT" "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "bench/run.sh: distattn kernel $c exited $rc" >&2
    status=1
  fi
  echo
done
echo "# results appended to $OUT"

# ---- side by side with PyTorch's CPU SDPA (issue 22) --------------------------------------------
# When torch is importable (the venv of the PyTorch issue, or TORCH_PYTHON), bench/torch_side.py
# runs distattn and torch's scaled_dot_product_attention on the same shapes and threads, A/B
# interleaved (BENCH_TORCH_REPS repetitions, medians), and appends ratio_torch beside ratio_sgemm
# to bench/results/kernel-torch-<host>.jsonl. TORCH_SKIP=1 skips it.
TORCH_PY=${TORCH_PYTHON:-/root/.cache/distattn/venv-torch/bin/python}
if [ -z "${TORCH_SKIP:-}" ] && [ -x "$TORCH_PY" ] && "$TORCH_PY" -c 'import torch' 2>/dev/null; then
  echo
  "$TORCH_PY" "$HERE/torch_side.py" --distattn "$EXE" --reps "${BENCH_TORCH_REPS:-3}" \
    --threads "${BENCH_TORCH_THREADS:-2}" --json "$HERE/results/kernel-torch-$HOST.jsonl" || status=1
else
  echo "# torch not importable with $TORCH_PY: no side-by-side run (set TORCH_PYTHON)"
fi

# ---- tree vs ring decode (docs/decode.md) ------------------------------------------------------
# `distattn decode` at P = 2, 4, 8 with the tree (one fused MPI reduction of the (o, lse)
# partials) and the ring baseline (the query and the partials travel P-1 dependent hops, each rank
# decoding its shard on arrival); latency = median step, max over ranks. Two contexts: 256K
# (the shard decodes dominate, so the ring pays P of them in a row) and 4K (the combine dominates:
# log P reduction rounds against P-1 hops). One run each; the ratio ring / tree is printed and
# every run appended to bench/results/decode-<host>.jsonl. Ranks are oversubscribed on small
# machines (P > cores): the tree's parallel decodes then share the cores, which caps its gain.
MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpirun.openmpi || echo mpirun)}
DOUT=${BENCH_DECODE_JSON:-$HERE/results/decode-$HOST.jsonl}
DSTEPS=${DECODE_STEPS:-20}
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
dshape="--heads 8 --kv-heads 1 --dim 128 --batch 1 --steps $DSTEPS --warmup 2"
summary=()
for ctx in 256K 4K; do
  for P in 2 4 8; do
    med=()
    for algo in tree ring; do
      # shellcheck disable=SC2086
      line=$("$MPIRUN" --oversubscribe --bind-to none -np "$P" "$EXE" decode --algo "$algo" --context "$ctx" \
               $dshape --verify 1 --json "$DOUT" 2>&1)
      rc=$?
      echo "$line"
      if [ $rc -ne 0 ]; then
        echo "bench/run.sh: distattn decode --algo $algo --context $ctx (P = $P) exited $rc" >&2
        status=1
      fi
      # the table row: med_ms is column 10
      med+=("$(echo "$line" | grep -v '^#' | awk 'NF >= 20 {print $10; exit}')")
    done
    ratio=$(awk -v t="${med[0]}" -v r="${med[1]}" 'BEGIN { if (t > 0) printf "%.2f", r / t; else print "-" }')
    summary+=("$(printf '%8s %5s %10s %10s %8s' "$ctx" "$P" "${med[0]:--}" "${med[1]:--}" "$ratio")")
  done
done
echo "# tree vs ring decode: median step latency (ms), ratio = ring / tree"
printf '# %8s %5s %10s %10s %8s\n' context ranks tree_ms ring_ms ratio
printf '  %s\n' "${summary[@]}"
echo "# decode results appended to $DOUT"

# Offloaded decode against local decode at 4K..256K (docs/offload.md): bench/offload.sh, JSON Lines
# into bench/results/offload-<host>.jsonl. OFFLOAD_SKIP=1 skips it.
if [ -z "${OFFLOAD_SKIP:-}" ]; then
  echo
  BUILD="$BUILD" DISTATTN="$EXE" "$HERE/offload.sh" || status=1
fi

# The distributed figures of issue 3 (ring / zigzag at P = 2: efficiency vs the single-rank
# kernel, overlap under the test link hook, zigzag over ring), all from one run of bench/ring.sh:
# JSON Lines + a markdown summary in bench/results/ring-<host>.{jsonl,md}. RING_SKIP=1 skips them.
if [ -z "${RING_SKIP:-}" ]; then
  echo
  BUILD="$BUILD" DISTATTN="$EXE" "$HERE/ring.sh" || status=1
fi

# ulysses and hybrid (issue 20) next to zigzag at P = 4, as ratios measured in one run of
# bench/ulysses.sh: JSON Lines + a markdown table in bench/results/ulysses-<host>.{jsonl,md}.
# ULYSSES_SKIP=1 skips them.
if [ -z "${ULYSSES_SKIP:-}" ]; then
  echo
  BUILD="$BUILD" DISTATTN="$EXE" "$HERE/ulysses.sh" || status=1
fi
exit $status
