#!/usr/bin/env bash
# bench/ulysses.sh: ulysses and hybrid (issue 20) next to zigzag at P = 4, all measured in one run
# of this script, on one causal GQA shape (one kernel thread per rank):
#   zigzag   the ring across 4 ranks (causal balance by zigzag)
#   ulysses  the all-to-all of heads for tokens over 4 ranks (H/4 heads each, whole sequence)
#   hybrid   Ulysses inside groups of 2 ranks, a zigzag ring across the 2 groups (2 x 2)
# The figure is each algorithm's forward+backward wall time over zigzag's, taken within a
# repetition (the three run back to back) and the median over BENCH_UL_REPEAT repetitions; also
# the exposed communication time (comm_exposed_s: the all-to-alls are all exposed, the ring's waits
# only where a transfer outlasts its compute) and the bytes sent per call. On a machine with fewer
# cores than ranks the ranks are oversubscribed (the machine is described in the summary), so the
# ratios measure the algorithms' overheads (packing, all-to-all copies, exposed waits) on shared
# cores, not a network. Appends every raw record plus one summary record to
# bench/results/ulysses-<host>.jsonl and writes bench/results/ulysses-<host>.md. Speed is reported,
# never asserted: the exit code is non-zero only when a run fails or a result is wrong.
# Called by bench/run.sh (`make bench`); alone: BUILD=build bench/ulysses.sh. Settings (env):
# BENCH_UL_SEQ (4K), BENCH_UL_HEADS (8), BENCH_UL_KV (2), BENCH_UL_DIM (64), BENCH_UL_ITERS (2),
# BENCH_UL_REPEAT (3), BENCH_UL_JSON, BENCH_UL_MD (output paths), MPIRUN.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
OUT=${BENCH_UL_JSON:-$HERE/results/ulysses-$HOST.jsonl}
MD=${BENCH_UL_MD:-$HERE/results/ulysses-$HOST.md}
SEQ=${BENCH_UL_SEQ:-4K} HEADS=${BENCH_UL_HEADS:-8} KV=${BENCH_UL_KV:-2} DIM=${BENCH_UL_DIM:-64}
ITERS=${BENCH_UL_ITERS:-2} REPEAT=${BENCH_UL_REPEAT:-3}
P=4
bench_start bench/ulysses.sh
SHAPE=(--seq "$SEQ" --heads "$HEADS" --kv-heads "$KV" --dim "$DIM" --mask causal --dtype fp32)
MPI=("$MPIRUN" --oversubscribe --bind-to none --timeout 900 -np "$P")
RUN=(run "${SHAPE[@]}" --backward --threads 1 --iters "$ITERS" --warmup 1 --verify 8)
ALGOS=(zigzag ulysses hybrid)
declare -A ARGS=([zigzag]="--algo zigzag" [ulysses]="--algo ulysses" [hybrid]="--algo hybrid --ulysses 2 --layout zigzag")
status=0

declare -A T EXP MB RATIO
for a in "${ALGOS[@]}"; do T[$a]="" EXP[$a]="" MB[$a]="" RATIO[$a]=""; done
for rep in $(seq 1 "$REPEAT"); do
  for a in "${ALGOS[@]}"; do
    echo "# ---- [$rep/$REPEAT] $a: ${ARGS[$a]}"
    # shellcheck disable=SC2086
    "${MPI[@]}" "$EXE" "${RUN[@]}" ${ARGS[$a]} --json "$TMP/$a$rep.jsonl" | grep -v '^#  '
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "bench/ulysses.sh: $a exited $rc" >&2; status=1; }
    echo
    f="$TMP/$a$rep.jsonl"
    T[$a]+=" $(calc "$(jget "$f" fwd_s) + $(jget "$f" bwd_s)")"
    EXP[$a]+=" $(jget "$f" comm_exposed_s)"
    MB[$a]+=" $(calc "$(jget "$f" comm_bytes) / 1048576")"
  done
  z=$(echo "${T[zigzag]}" | awk '{print $NF}')
  for a in "${ALGOS[@]}"; do
    t=$(echo "${T[$a]}" | awk '{print $NF}')
    RATIO[$a]+=" $(calc "$t / $z")"
  done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
wrong=0
for f in "$TMP"/*.jsonl; do
  w=$(jget "$f" wrong)
  [ "$w" = 0 ] || { wrong=1; status=1; }
done

# ---- machine ----
bench_machine

# ---- records: every raw one tagged with the run, then the summary ----
for f in "$TMP"/*.jsonl; do
  part=$(basename "$f" .jsonl)
  while IFS= read -r line; do
    printf '{"bench":"ulysses","bench_run":"%s","part":"%s",%s\n' "$RUN_ID" "$part" "${line#\{}" >> "$OUT"
  done < "$f"
done
rows=""
for a in "${ALGOS[@]}"; do
  # shellcheck disable=SC2086
  t=$(median ${T[$a]}) e=$(median ${EXP[$a]}) m=$(median ${MB[$a]}) r=$(median ${RATIO[$a]})
  # shellcheck disable=SC2086
  printf '{"bench":"ulysses","bench_run":"%s","part":"summary","algo":"%s","args":"%s","date":"%s","git":"%s","host":"%s","cpu":"%s","cores":%s,"mpi":"%s","ranks":%s,"seq":"%s","heads":%s,"kv_heads":%s,"dim":%s,"mask":"causal","dtype":"fp32","threads_per_rank":1,"iters":%s,"repeat":%s,"fwd_bwd_s":%s,"ratio_to_zigzag":%s,"ratio_each":%s,"comm_exposed_s":%s,"comm_mib":%s,"wrong":%s,"load_before":"%s","load_after":"%s"}\n' \
    "$RUN_ID" "$a" "${ARGS[$a]}" "$date" "$git" "$HOST" "$cpu" "$ncpu" "$mpiv" "$P" "$SEQ" "$HEADS" "$KV" "$DIM" \
    "$ITERS" "$REPEAT" "$t" "$r" "$(list ${RATIO[$a]})" "$e" "$m" "$wrong" "$LOAD0" "$LOAD1" >> "$OUT"
  # shellcheck disable=SC2086
  rows+="| $a | \`${ARGS[$a]}\` | $t | $r | $(list ${RATIO[$a]}) | $e | $m |"$'\n'
done

cat > "$MD" <<EOF
# ulysses and hybrid next to zigzag at P = $P ($date)

Produced by \`bench/ulysses.sh\` (part of \`make bench\`); every number below comes from one run of it
(\`bench_run\` = \`$RUN_ID\` in \`$(basename "$OUT")\`). Definitions: docs/ulysses.md.

| machine | |
|---|---|
| CPU | $cpu, $ncpu online CPUs ($topo) |
| MPI | $mpiv, $P ranks on one host (\`--oversubscribe --bind-to none\`), shared-memory transport |
| git | $git |
| load average (1/5/15 min) | before: $LOAD0; after: $LOAD1 (the machine is shared; timings swing with it) |

Shape: \`--seq $SEQ --heads $HEADS --kv-heads $KV --dim $DIM --mask causal --dtype fp32 --backward\`,
one kernel thread per rank, median of $ITERS iterations after one warm-up; zigzag, ulysses and
hybrid ran $REPEAT times back to back, each ratio taken within a repetition, the table showing
the medians. With $P ranks on $ncpu CPUs the ranks share cores: the ratios weigh each
algorithm's extra work and exposed waits on shared cores, not a network's bandwidth.

| algo | arguments | fwd+bwd s (median) | / zigzag | / zigzag per repetition | exposed comm s | sent per call, all ranks (MiB) |
|---|---|---|---|---|---|---|
$rows
Wrong results in the verified runs: $wrong.
EOF
echo "# ulysses / hybrid vs zigzag at P = $P: see $MD"
printf '%s' "$rows"
echo "# appended to $OUT"
exit $status
