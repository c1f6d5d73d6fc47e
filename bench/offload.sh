#!/usr/bin/env bash
# bench/offload.sh: offloaded decode (1 compute + 1 memory rank, docs/offload.md) against the same
# loop decoded locally on the compute rank (--baseline), at contexts 4K..256K, in one run each:
# tokens/s with and without offload, the overhead, and network bytes / KV bytes read beside
# Lamina's 2/L. JSON Lines into bench/results/offload-<host>.jsonl, the table on stdout. Part of
# `make bench` (OFFLOAD_SKIP=1 skips it). Both ranks share this machine's cores, so the overlap
# the micro-batch pipeline buys is the scheduler's as much as the protocol's.
set -uo pipefail
BUILD=${BUILD:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
EXE=${DISTATTN:-$BUILD/distattn}
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${BENCH_OFFLOAD_JSON:-$HERE/results/offload-$HOST.jsonl}
MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpirun.openmpi || echo mpirun)}
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
status=0
rows=()
for ctx in ${OFFLOAD_CONTEXTS:-4K 16K 64K 256K}; do
  A="--context $ctx --heads 8 --kv-heads 1 --dim 128 --batch 2 --layers 2 --microbatches 2 --layer-compute 5"
  A="$A --steps 8 --verify 2 --baseline --json $OUT"
  # shellcheck disable=SC2086
  line=$(timeout 600 "$MPIRUN" --oversubscribe --bind-to none -np 1 "$EXE" decode --offload --role compute $A : \
           -np 1 "$EXE" decode --offload --role memory $A 2>&1)
  rc=$?
  [ $rc -eq 0 ] || { echo "$line" >&2; echo "bench/offload.sh: context $ctx exited $rc" >&2; status=1; continue; }
  rec=$(tail -n 1 "$OUT")
  rows+=("$(python3 - "$rec" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
off, loc = r["tokens_per_s"], r["tokens_per_s_local"]
print("%8d %10.1f %10.1f %9.3f %11.2e %11.2e %6d" % (r["context"], off, loc, loc / off - 1 if off > 0 else float("nan"),
      r["net_over_kv"], r["lamina_2_over_L"], r["wrong"]))
PY
)")
done
echo "# offload (1 compute + 1 memory) vs local decode; overhead = tok/s_local / tok/s_offload - 1"
printf '# %8s %10s %10s %9s %11s %11s %6s\n' context tok/s_off tok/s_loc overhead net/kv 2/L wrong
printf '  %s\n' "${rows[@]}"
echo "# results appended to $OUT"
exit $status
