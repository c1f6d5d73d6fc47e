#!/usr/bin/env bash
# slurm_test.sh CASE BUILD_DIR SRC_DIR: one `slurm`-label test. Starts the local Slurm of
# slurm/local-cluster.sh (munge, slurmctld, node1 + node2 with 2 fake GPUs each) in a fresh
# state directory, submits the job scripts of slurm/ with `sbatch --wait` from a scratch submit
# directory, checks their outputs and JSON Lines records, and always stops every daemon (the
# cluster's `run` trap; ctest's TIMEOUT is the outer bound). Exit 77 = skipped (not root, or
# Slurm / munge not installed).
set -uo pipefail
CASE=$1 BUILD=$2 SRC=$3
[ "$(id -u)" -eq 0 ] || { echo "skipped: needs root"; exit 77; }
for p in sbatch slurmctld slurmd munged; do
  command -v $p >/dev/null 2>&1 || [ -x /usr/sbin/$p ] || { echo "skipped: $p not installed"; exit 77; }
done
WORK=$(mktemp -d /tmp/distattn-slurm-$CASE.XXXXXX)
chmod 755 "$WORK" # munged (the munge user) must reach its directory inside
export DISTATTN="$BUILD/distattn" DISTATTN_SRC="$SRC"
# Two emulated nodes share one kernel: Open MPI's shared-memory segments would collide.
export OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
export DA_SLURM_CTLD_PORT=${DA_SLURM_CTLD_PORT:-16817}
SMALL="--algo zigzag --seq 1K --heads 2 --kv-heads 1 --dim 32 --mask causal --verify 4 --iters 1 --warmup 0"

cat > "$WORK/case.sh" <<CASE
set -uo pipefail
cd "$WORK/submit"
# diag: the cluster's view, for a job that failed or did not end (to stderr: callers capture ids)
diag() {
  { echo "== squeue"; squeue -a -o '%i %T %r %M %N' 2>&1
    echo "== scontrol show job"; scontrol show job 2>&1 | grep -E 'JobId|JobState|Reason|NodeList|ExitCode|StdOut' | head -40
    echo "== sinfo"; sinfo -N 2>&1
    for f in distattn-*.out distattn-out/*/*.txt; do echo "== \$f"; cat "\$f"; done
    for f in "$WORK"/cluster/slurmctld.log "$WORK"/cluster/slurmd-node*.log; do echo "== \$f (last 25 lines)"; tail -25 "\$f"; done
  } >&2 2>/dev/null
}
fail() { echo "FAIL: \$*"; diag; exit 1; }
# submit ARGS...: sbatch --parsable --wait with a deadline of 45 s (these jobs take 4-13 s here),
# twice inside ctest's 110 s. A job that has neither ended nor failed by then is shown (diag),
# cancelled and submitted once more: CI once killed slurm_hetjob at 110 s without a word, a stall
# that 35 runs here never showed. A job that fails is not retried.
submit() {
  local id rc
  id=\$(timeout 45 sbatch --parsable --wait "\$@"); rc=\$?
  if [ \$rc != 124 ]; then echo "\$id"; return \$rc; fi
  echo "sbatch --wait \$*: job \$id did not end in 45 s; the cluster then:" >&2
  diag
  scancel --full --user=root >/dev/null 2>&1
  for _ in \$(seq 50); do [ -z "\$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  echo "sbatch --wait \$*: submitting once more" >&2
  timeout 45 sbatch --parsable --wait "\$@" || { echo "sbatch --wait \$*: exit \$? (124: no end in 45 s)" >&2; return 1; }
}
# a rank waiting on a lost peer gives up and says so well inside the job's deadline (default 300 s)
export DISTATTN_TIMEOUT=30
# jsonl FILE: every line a whole JSON object; prints the number of records
jsonl() { python3 -c 'import json,sys; n=0
for l in open(sys.argv[1]): json.loads(l); n+=1
print(n)' "\$1" || fail "\$1 holds a line that is not a whole JSON record"; }
field() { python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2])]; print(r.get(sys.argv[3], ""))' "\$@"; }
case "$CASE" in
one_node)
  id=\$(DA_ARGS="$SMALL --backward" submit "$SRC/slurm/one-node.sbatch") || fail "job failed"
  out=distattn-out/\$id
  grep -q "# PASS" \$out/run.txt || fail "no PASS"
  grep -q "SLURM_LOCALID=1 agrees" \$out/run.txt || fail "local rank cross-check"
  [ "\$(jsonl \$out/run.jsonl)" = 1 ] || fail "one record"
  [ "\$(field \$out/run.jsonl 0 SLURM_JOB_ID)" = "\$id" ] || fail "SLURM_JOB_ID"
  [ "\$(field \$out/run.jsonl 0 wrong)" = 0 ] || fail "wrong"
  ;;
multi_node)
  id=\$(DA_ARGS="$SMALL --measure-overlap" submit --gpus-per-task=1 "$SRC/slurm/multi-node.sbatch") || fail "job failed"
  out=distattn-out/\$id
  grep -q "# PASS" \$out/run.txt || fail "no PASS"
  grep -q "/node1 .*gpu 0 (bus id not in the topology)" \$out/run.txt || fail "rank on node1 with its fake GPU"
  grep -q "/node2 " \$out/run.txt || fail "ranks on node2"
  [ "\$(field \$out/run.jsonl 0 SLURM_JOB_NODELIST)" = "node[1-2]" ] || fail "node list"
  [ "\$(field \$out/run.jsonl 0 ranks)" = 4 ] || fail "4 ranks"
  ;;
mpirun)
  id=\$(LAUNCHER=mpirun DA_MPIRUN_ARGS="--oversubscribe --bind-to none" DA_ARGS="$SMALL" \
        submit -N 2 --ntasks-per-node=1 "$SRC/slurm/one-node.sbatch") || fail "job failed"
  out=distattn-out/\$id
  grep -q "# PASS" \$out/run.txt || fail "no PASS"
  grep -q "OMPI_COMM_WORLD_LOCAL_RANK=0 agrees" \$out/run.txt || fail "mpirun local rank"
  ;;
sweep)
  # a complete sweep ends with "done"; one told it is near its time limit ends with "stopped"
  id=\$(DA_NPS="1 2" DA_SEQS="512" DA_ARGS="$SMALL" submit "$SRC/slurm/sweep.sbatch") || fail "sweep failed"
  j=distattn-out/\$id/sweep.jsonl
  [ "\$(jsonl \$j)" = 3 ] || fail "2 records + done"
  [ "\$(field \$j 2 event)" = done ] || fail "done event"
  [ "\$(field \$j 1 ranks)" = 2 ] && [ "\$(field \$j 1 SLURM_JOB_ID)" = "\$id" ] || fail "record fields"
  [ -n "\$(field \$j 1 SLURM_STEP_NODELIST)" ] || fail "step node list"
  id=\$(DA_NPS="1 2 4" DA_SEQS="1K 2K" DA_ARGS="$SMALL" sbatch --parsable "$SRC/slurm/sweep.sbatch")
  j=distattn-out/\$id/sweep.jsonl
  for _ in \$(seq 300); do [ -s \$j ] && break; sleep 0.1; done
  [ -s \$j ] || fail "no first record"
  scancel --batch --signal=USR1 \$id
  for _ in \$(seq 600); do [ -z "\$(squeue -h -j \$id -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  n=\$(jsonl \$j)
  [ "\$(field \$j \$((n - 1)) event)" = stopped ] || fail "stopped event last"
  [ \$n -ge 2 ] && [ \$n -lt 7 ] || fail "stopped early with whole records (\$n lines)"
  echo "sweep stopped after \$((n - 1)) of 6 steps"
  ;;
hetjob)
  "$BUILD/distattn" decode --offload --help 2>&1 | grep -q -- '--role' || { echo "skipped: distattn decode has no --role"; exit 77; }
  id=\$(DA_ARGS="--context 4K --heads 2 --kv-heads 1 --dim 32 --steps 2 --verify 2" \
        submit "$SRC/slurm/offload-hetjob.sbatch") || fail "hetjob failed"
  grep -q "# PASS" distattn-out/\$id/offload.txt || fail "no PASS"
  ;;
*) echo "unknown case $CASE"; exit 2 ;;
esac
echo "ok: $CASE"
CASE
mkdir -p "$WORK/submit"
"$SRC/slurm/local-cluster.sh" run "$WORK/cluster" bash "$WORK/case.sh"
rc=$?
# the cluster's trap has stopped the daemons; check that nothing of it is left
if [ -f "$WORK/cluster/pids" ]; then echo "FAIL: daemons not stopped"; rc=1; fi
[ $rc = 0 ] && rm -rf "$WORK"
exit $rc
