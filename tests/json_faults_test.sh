#!/bin/sh
# json_faults_test.sh EXE MPIRUN CASE: --json records under adverse conditions (issue 19, class 7).
#   locked: another process holds the file's flock for the whole run: rank 0 gives up waiting for
#           it well within the deadline and says the file is locked (exit 1), where it used to
#           block until its peers reported it missing;
#   utf8:   an environment value written into the record (SLURM_JOB_ID) holds bytes that are not
#           UTF-8: the record is still one valid JSON line (U+FFFD in their place).
set -u
EXE=$1 MPIRUN=$2 CASE=$3
W=$(mktemp -d /tmp/da_json_XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() { echo "FAIL $CASE: $*"; cat "$W/err" 2>/dev/null; exit 1; }
case $CASE in
  locked)
    : > "$W/r.jsonl"
    # the holder outlives the run by a few seconds; its output goes nowhere so nobody waits on it
    flock -x "$W/r.jsonl" sleep 10 </dev/null >/dev/null 2>&1 &
    holder=$!
    sleep 0.5
    "$MPIRUN" --oversubscribe --bind-to none --timeout 60 -np 2 "$EXE" run --seq 256 --heads 2 --dim 16 --iters 1 \
      --warmup 0 --verify 2 --timeout 2 --json "$W/r.jsonl" >"$W/out" 2>"$W/err"
    rc=$?
    kill $holder 2>/dev/null
    [ $rc -ne 0 ] || fail "exit 0 although the record was not written"
    grep -q "is locked by another process" "$W/err" || fail "stderr does not say the file is locked"
    if grep -Eq "did not answer|never reached|gave up waiting" "$W/err"; then fail "a rank was reported missing"; fi
    [ ! -s "$W/r.jsonl" ] || fail "something was written through the lock"
    ;;
  utf8)
    SLURM_JOB_ID=$(printf 'job\377\303\251') "$EXE" kernel --seq 64 --dim 16 --heads 1 --iters 1 --warmup 0 --ops fwd \
      --json "$W/r.jsonl" >"$W/out" 2>"$W/err" || fail "kernel failed"
    python3 -c "
import json, sys
lines = open(sys.argv[1], 'rb').read().splitlines()
assert len(lines) == 1, lines
rec = json.loads(lines[0].decode('utf-8'))  # strict: invalid UTF-8 raises
assert rec['SLURM_JOB_ID'] == 'job\ufffd\u00e9', rec['SLURM_JOB_ID']
" "$W/r.jsonl" || fail "the record is not one valid JSON line with U+FFFD for the bad byte"
    ;;
  *) fail "unknown case" ;;
esac
echo "PASS $CASE"
