#!/bin/bash
# agree_test.sh: ranks given different command lines (issue 19, class 4). Usage:
#   agree_test.sh EXE MPIRUN sweep run|decode|offload   every option of the command's table, in process
#   agree_test.sh EXE MPIRUN mpmd CASE                  one real MPMD launch (command, iters, help)
# A sweep launches 2 ranks once: for each option the binary (DISTATTN_TEST_AGREE_SWEEP=1) gives rank 1
# another valid value and runs the real agreement; it prints a line per option and fails on any that
# is not refused naming it (per-rank options: not accepted). The MPMD cases check exit 2 and the
# message on every rank.
set -u
EXE=$1 MPIRUN=$2 MODE=$3 CASE=$4
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 DISTATTN_NTHREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1
mpi=("$MPIRUN" --oversubscribe --bind-to none --timeout 60)
fail() { echo "FAIL: $*"; echo "--- stdout"; cat "$work/out"; echo "--- stderr"; cat "$work/err"; exit 1; }

if [ "$MODE" = sweep ]; then
  case $CASE in
    run) args=(run --seq 64 --heads 2 --dim 16) ;;
    decode) args=(decode --context 64 --heads 2 --dim 16) ;;
    offload) args=(decode --offload --role compute --context 64 --heads 2 --dim 16) ;;
    *) echo "unknown command $CASE"; exit 2 ;;
  esac
  DISTATTN_TEST_AGREE_SWEEP=1 "${mpi[@]}" -np 2 "$EXE" "${args[@]}" >"$work/out" 2>"$work/err"
  rc=$?
  cat "$work/out"
  [ $rc -eq 0 ] || fail "sweep of $CASE: exit $rc"
  # the summary must have checked options (a table that went missing would check none)
  grep -Eq "agree sweep: .*: [1-9][0-9]* options checked, [0-9]+ skipped, 0 failed" "$work/out" || fail "no summary"
  echo PASS
  exit 0
fi

base=(--seq 64 --heads 2 --dim 16 --iters 1 --warmup 0 --verify 2)
case $CASE in
  command) launch=(-np 1 "$EXE" run "${base[@]}" : -np 1 "$EXE" decode --context 64 --heads 2 --dim 16)
           want="ranks disagree on the command: 'run' on rank 0; 'decode' on rank 1" ;;
  iters) launch=(-np 1 "$EXE" run "${base[@]}" --iters 2 : -np 2 "$EXE" run "${base[@]}" --iters 3)
         want="ranks disagree on --iters: 2 on rank 0; 3 on ranks 1-2" ;;
  help) launch=(-np 1 "$EXE" run "${base[@]}" : -np 1 "$EXE" run "${base[@]}" --help)
        want="ranks disagree on --help: given on rank\(s\) 1, not on rank\(s\) 0" ;;
  offload) launch=(-np 1 "$EXE" decode --offload --role compute --context 64 --heads 2 --dim 16 --steps 2
                   : -np 1 "$EXE" decode --offload --role memory --context 64 --heads 2 --dim 16 --steps 3)
           want="ranks disagree on --steps: 2 on rank 0; 3 on rank 1" ;;
  *) echo "unknown case $CASE"; exit 2 ;;
esac
np=$(printf '%s\n' "${launch[@]}" | grep -A1 -x -- -np | grep -vx -- -np | grep -vx -- -- | paste -sd+ | bc)
start=$(date +%s.%N)
"${mpi[@]}" "${launch[@]}" >"$work/out" 2>"$work/err"
rc=$?
secs=$(echo "$(date +%s.%N) - $start" | bc)
[ $rc -eq 2 ] || fail "$CASE: exit $rc, expected 2"
for ((r = 0; r < np; r++)); do
  grep -Eq "rank $r: $want" "$work/err" || fail "$CASE: rank $r does not say '$want'"
done
grep -q "# PASS\|# FAIL" "$work/out" && fail "$CASE: results printed"
echo "ok $CASE: exit 2 in ${secs} s, every one of $np ranks: $(grep -m1 -E "$want" "$work/err")"
echo PASS
