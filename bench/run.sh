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
# distattn re-executes itself with OPENBLAS_CORETYPE=SkylakeX on AVX-512 machines where OpenBLAS
# would pick a slower path; set OPENBLAS_CORETYPE here only to override that choice.

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
exit $status
