#!/usr/bin/env bash
# sweep_resume_test.sh: an interrupted sweep resumes without duplicates (label fault, issue 10).
# Runs slurm/sweep.sbatch directly under bash with LAUNCHER=mpirun (no Slurm needed: the job
# variables are set by hand), 6 configurations (ranks 1 2 3 x seq 256 512). It is interrupted
# twice mid-sweep -- SIGTERM with DA_KILL_ON_SIGNAL=1 (the running step is ended, the job stops)
# and SIGKILL of the job and its step (a node lost, a preemption) -- and run again each time;
# the third run must finish. Then every line of the file parses as JSON, every configuration has
# exactly one record, and the runs after the first skipped what was recorded. Also: a record
# is appended whole or not at all (an unterminated line left by another writer is closed first;
# a write cut short by RLIMIT_FSIZE is truncated back and reported).
#   sweep_resume_test.sh <distattn> <source dir>
set -u
EXE=$1 SRC=$2
MPIRUN=$(command -v mpirun || command -v mpirun.openmpi) || { echo "skipped: no mpirun"; exit 77; }
command -v python3 >/dev/null || { echo "skipped: no python3"; exit 77; }
W=$(mktemp -d /tmp/distattn-sweep.XXXXXX)
export DA_SWEEP_TEST_MARK=$W # in the environment of everything this test starts
# Processes this test started that may outlive a SIGKILLed job (ranks in their own process
# groups): found by the mark, ended by pid, as Slurm's cgroup would end them with the job.
kill_marked() {
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}; p=${p%/environ}
    [ "$p" = $$ ] || [ "$p" = "$BASHPID" ] && continue
    { tr '\0' '\n' <"$e"; } 2>/dev/null | grep -qx "DA_SWEEP_TEST_MARK=$W" && kill -KILL "$p" 2>/dev/null
  done
  return 0
}
trap 'kill_marked; rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export SLURM_JOB_ID=4711 SLURM_SUBMIT_DIR=$W SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES=1
export DISTATTN=$EXE DISTATTN_SRC=$SRC LAUNCHER=mpirun DA_MPIRUN_ARGS="--oversubscribe --bind-to none --timeout 60"
export DA_NPS="1 2 3" DA_SEQS="256 512"
export DA_ARGS="--algo zigzag --heads 2 --kv-heads 1 --dim 32 --mask causal --verify 2 --iters 40 --warmup 0"
J=$W/distattn-out/$SLURM_JOB_ID/sweep.jsonl
fail() { echo "FAIL: $*"; [ -f "$J" ] && { echo "---- $J"; cat "$J"; }; exit 1; }
records() { local n; n=$(grep -c '"cmd":"run"' "$J" 2>/dev/null); echo "${n:-0}"; }

# run_until N SIG: start the sweep in its own process group, send SIG once N records are in (or
# the sweep ended), wait for it; prints the sweep's own summary line.
run_until() {
  local n=$1 sig=$2
  setsid bash "$SRC/slurm/sweep.sbatch" >"$W/sweep.out" 2>"$W/sweep.err" &
  local pid=$!
  for _ in $(seq 600); do
    [ "$(records)" -ge "$n" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 $pid 2>/dev/null; then
    sleep 0.3 # into the next step
    case $sig in
      TERM) kill -TERM $pid ;;
      KILL) kill -KILL -- -$pid ;;
    esac
  fi
  for _ in $(seq 600); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  wait $pid 2>/dev/null
  grep '^# sweep' "$W/sweep.out" || echo "(no summary: killed)"
}

echo "== run 1: SIGTERM after 2 records (DA_KILL_ON_SIGNAL=1 ends the running step)"
DA_KILL_ON_SIGNAL=1 run_until 2 TERM
r1=$(records)
grep -q '"event":"stopped"' "$J" || fail "run 1 did not record its stop"
[ "$r1" -ge 2 ] && [ "$r1" -lt 6 ] || fail "run 1 stopped with $r1 records (expected 2..5)"
echo "== run 2: SIGKILL of the job and its step after $((r1 + 1)) records"
run_until $((r1 + 1)) KILL
kill_marked
sleep 0.5
r2=$(records)
[ "$r2" -gt "$r1" ] || fail "run 2 recorded nothing new"
echo "== run 3: to the end"
run_until 99 none
grep -q "already recorded" "$W/sweep.out" || fail "run 3 printed no summary"
sk=$(sed -n 's/.* \([0-9]*\) already recorded.*/\1/p' "$W/sweep.out")
[ "$sk" = "$r2" ] || fail "run 3 skipped $sk configurations, $r2 were recorded"
python3 - "$J" <<'EOF' || fail "records"
import collections, json, sys
recs = []
for i, line in enumerate(open(sys.argv[1]), 1):
    try:
        recs.append(json.loads(line))
    except ValueError:
        sys.exit(f"line {i} is not a whole JSON record: {line!r}")
runs = [r for r in recs if r.get("cmd") == "run"]
seen = collections.Counter((r["ranks"], r["seq"]) for r in runs)
want = {(p, s) for p in (1, 2, 3) for s in (256, 512)}
if set(seen) != want:
    sys.exit(f"configurations recorded: {sorted(seen)}, expected {sorted(want)}")
dup = {k: v for k, v in seen.items() if v != 1}
if dup:
    sys.exit(f"recorded more than once: {dup}")
keys = collections.Counter(r.get("key") for r in runs)
if len(keys) != 6 or any(v != 1 for v in keys.values()):
    sys.exit(f"keys: {keys}")
bad = [r for r in runs if r["wrong"] != 0]
if bad:
    sys.exit(f"wrong results: {bad}")
events = [r["event"] for r in recs if "event" in r]
if events[-1] != "done":
    sys.exit(f"events: {events}")
print(f"{len(runs)} records, one per configuration; events {events}")
EOF

echo "== whole records: an unterminated line before ours, then a write cut short"
F=$W/append.jsonl
printf '{"cmd":"run","cut":' >"$F"
DISTATTN_JSON_KEY=k1 "$EXE" kernel --seq 64 --heads 1 --dim 32 --ops fwd --iters 1 --warmup 0 --verify 1 --json "$F" \
  >/dev/null 2>"$W/k1.err" || fail "kernel run: $(cat "$W/k1.err")"
[ "$(sed -n 1p "$F")" = '{"cmd":"run","cut":' ] || fail "the unterminated line was not closed on its own"
sed -n 2p "$F" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); assert r["key"] == "k1"' \
  || fail "the record after an unterminated line is not whole"
head -c 1000 /dev/zero | tr '\0' 'x' | sed 's/^/{"pad":"/; s/$/"}/' >"$F" # 1009 bytes, one whole line
before=$(md5sum <"$F")
( trap '' XFSZ; ulimit -f 1; exec "$EXE" kernel --seq 64 --heads 1 --dim 32 --ops fwd --iters 1 --warmup 0 --verify 1 \
    --json "$F" ) >/dev/null 2>"$W/k2.err"
rc=$?
[ $rc != 0 ] || fail "a write cut short exited 0"
grep -q "the partial record was removed" "$W/k2.err" || fail "no report of the short write: $(cat "$W/k2.err")"
[ "$(md5sum <"$F")" = "$before" ] || fail "the file changed after a short write: $(tail -c 200 "$F")"
echo "PASS"
