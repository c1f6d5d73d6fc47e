#!/usr/bin/env bash
# fault_matrix.sh: the fault matrix of issue 19 (label fault, tests/fault.cmake). Each cell is
# CMD:SIG:POINT: world rank 1 of a P = 3 job sends itself SIGSTOP or SIGKILL when it first reaches
# POINT (the test hook DISTATTN_TEST_FAULT, launcher/fault.h). The cell passes when the job ends
# within --timeout (3 s) + 10 s of the fault, with a non-zero exit that is not mpirun's hang guard
# (110), and stderr names rank 1 (other than in the hook's own line). Cells run CONCURRENCY at a
# time: a stopped job mostly waits, so they overlap well on 2 cores.
#   fault_matrix.sh <distattn> <mpirun> <concurrency> CELL...
# CMD: run | decode | offload (1 compute rank, 2 memory ranks, MPMD). POINT: a hook point, or
# "step": the first forward with the fault 1.5 s later, while the other ranks are inside a long
# compute step (run: KV sub-blocks of 16K tokens, each step tens of seconds on 2 cores, longer
# than the whole bound: only a deadline that does not wait for the step can pass).
set -u
EXE=$1 MPIRUN=$2 CONC=$3
shift 3
T=3 LIMIT=13 VICTIM=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export DISTATTN_NTHREADS=1
dir=$(mktemp -d /tmp/distattn-fmatrix.XXXXXX)
trap 'rm -rf "$dir"' EXIT

cell() { # CMD SIG POINT -> exit status 0 (pass) or 1, a report in $dir/CELL.log
  local cmd=$1 sig=$2 point=$3 name="$1:$2:$3" d="$dir/$1-$2-$3"
  mkdir -p "$d"
  local hook="$VICTIM:$point:$sig" args=()
  [ "$point" = step ] && hook="$VICTIM:forward:$sig:1.5"
  local run=(run --seq 2K --heads 4 --dim 64 --iters 2 --warmup 0 --verify 4 --backward --timeout $T)
  case $cmd:$point in
    run:step) run=(run --seq 48K --heads 4 --dim 64 --iters 1 --warmup 0 --verify 0 --algo ring --block 16K
                   --timeout $T) ;;
    run:output | run:input) ;;
  esac
  case $cmd in
    run)
      args=(-np 3 "$EXE" "${run[@]}")
      case $point in
        output) args+=(--output "$d") ;;
        input) args+=(--input "$d" --verify 0)
               python3 - "$d" <<'PY' || return 1
import struct, sys
def npy(path, shape):  # a little float32 .npy of zeros (the numbers do not matter here)
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % (tuple(shape),)
    hdr += " " * (63 - (10 + len(hdr)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode())
        f.write(b"\0" * (4 * shape[0] * shape[1] * shape[2]))
for n in ("q", "k", "v", "dout"):
    npy(f"{sys.argv[1]}/{n}.npy", (2048, 4, 64))
PY
               ;;
      esac ;;
    decode)
      args=(-np 3 "$EXE" decode --algo tree --context 16K --heads 4 --kv-heads 2 --dim 64 --steps 50 --verify 4
            --timeout $T) ;;
    offload)
      local oa=(--context 8K --heads 4 --kv-heads 2 --dim 64 --batch 1 --layers 2 --microbatches 1 --steps 20
                --verify 2 --timeout $T)
      args=(-np 1 "$EXE" decode --offload --role compute "${oa[@]}" : -np 2 "$EXE" decode --offload --role memory
            "${oa[@]}") ;;
  esac
  # mpirun's own --timeout is the hang guard behind ours (exit 110 after 60 s)
  DISTATTN_TEST_FAULT=$hook "$MPIRUN" --bind-to none --timeout 60 -x DISTATTN_TEST_FAULT -x DISTATTN_NTHREADS \
    "${args[@]}" >"$d/out" 2>"$d/err" &
  local mp=$! ended=0
  for _ in $(seq 1 650); do # 65 s
    kill -0 $mp 2>/dev/null || { ended=1; break; }
    sleep 0.1
  done
  local tend; tend=$(date +%s.%N)
  local vpid; vpid=$(sed -n 's/.*DISTATTN_TEST_FAULT: .*(pid \([0-9]*\), wall.*/\1/p' "$d/err" | head -1)
  if [ $ended = 0 ]; then
    [ -n "$vpid" ] && kill -CONT "$vpid" 2>/dev/null
    kill -TERM $mp 2>/dev/null; sleep 2; kill -KILL $mp 2>/dev/null
  fi
  wait $mp; local rc=$?
  [ -n "$vpid" ] && { kill -CONT "$vpid" 2>/dev/null; kill -KILL "$vpid" 2>/dev/null; }
  local wall; wall=$(sed -n 's/.*DISTATTN_TEST_FAULT: .*wall \([0-9.]*\)).*/\1/p' "$d/err" | head -1)
  local fail=0 el=?
  {
    if [ -z "$wall" ]; then
      echo "FAIL $name: rank $VICTIM never reached the point (exit $rc)"; fail=1
    else
      el=$(awk -v a="$tend" -v b="$wall" 'BEGIN { printf "%.1f", a - b }')
      [ $ended = 1 ] || { echo "FAIL $name: the job did not end within 65 s"; fail=1; }
      awk -v e="$el" -v l=$LIMIT 'BEGIN { exit !(e > l) }' && { echo "FAIL $name: ended ${el} s after the fault > $LIMIT s"; fail=1; }
    fi
    [ "$rc" != 0 ] || { echo "FAIL $name: exit code 0"; fail=1; }
    [ "$rc" != 110 ] || { echo "FAIL $name: ended by mpirun's hang guard (exit 110)"; fail=1; }
    grep -v DISTATTN_TEST_FAULT "$d/err" | grep -Eq "rank $VICTIM( |,|$)|ranks ([0-9]+, )*$VICTIM\b" ||
      { echo "FAIL $name: stderr does not name rank $VICTIM"; fail=1; }
    [ $fail = 0 ] && echo "ok   $name: exit $rc, ${el} s after the fault (limit $LIMIT s)"
    if [ $fail = 1 ] || [ -n "${FAULT_MATRIX_VERBOSE:-}" ]; then echo "---- stderr of $name ----"; cat "$d/err"; echo "---- stdout (tail) ----"; tail -5 "$d/out"; fi
  } >"$d.log" 2>&1
  return $fail
}

t0=$(date +%s)
pids=() names=()
for c in "$@"; do
  IFS=: read -r cmd sig point <<<"$c"
  while [ "$(jobs -rp | wc -l)" -ge "$CONC" ]; do sleep 0.2; done
  cell "$cmd" "$sig" "$point" &
  pids+=($!) names+=("$cmd-$sig-$point")
done
fails=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || fails=$((fails + 1))
  cat "$dir/${names[$i]}.log"
done
echo "fault_matrix: ${#pids[@]} cells, $fails failed, $(( $(date +%s) - t0 )) s"
[ $fails = 0 ]
