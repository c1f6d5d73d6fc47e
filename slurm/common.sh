# common.sh: what every distattn job script shares (sourced, not run): where the program is,
# how ranks are launched (srun --mpi=pmix by default, mpirun inside the allocation with
# LAUNCHER=mpirun), where outputs go (the submit directory, one folder per job id), and the
# time-limit handler that stops a job cleanly when Slurm sends the --signal it asked for.
#
# Environment (all optional): DISTATTN (the program; default $DISTATTN_SRC/build/distattn),
# DISTATTN_SRC (the source tree; default the submit directory), LAUNCHER=srun|mpirun,
# DA_SRUN_ARGS / DA_MPIRUN_ARGS (extra launcher options), DISTATTN_OUT (default
# $SLURM_SUBMIT_DIR/distattn-out; the job writes to $DISTATTN_OUT/$SLURM_JOB_ID).

: "${SLURM_JOB_ID:?run the distattn job scripts under sbatch}"
DISTATTN_SRC=${DISTATTN_SRC:-$SLURM_SUBMIT_DIR}
DISTATTN=${DISTATTN:-$DISTATTN_SRC/build/distattn}
LAUNCHER=${LAUNCHER:-srun}
OUT=${DISTATTN_OUT:-$SLURM_SUBMIT_DIR/distattn-out}/$SLURM_JOB_ID
mkdir -p "$OUT"
[ -x "$DISTATTN" ] || { echo "distattn job: no program at $DISTATTN (set DISTATTN)" >&2; exit 2; }
# Open MPI as root (containers, the local test cluster) must be told it is fine.
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

echo "# job $SLURM_JOB_ID on $SLURM_JOB_NODELIST ($SLURM_JOB_NUM_NODES nodes, ${SLURM_NTASKS:-?} tasks)," \
     "launcher $LAUNCHER, outputs in $OUT"

# da_launch NP [launcher options --] PROGRAM ARGS...: NP ranks of PROGRAM over the allocation.
# Runs in the background and waits, so the shell can take the time-limit signal meanwhile.
da_launch() {
  local np=$1; shift
  local extra=()
  if [ "${1:-}" = "--opts" ]; then shift; while [ "$1" != "--" ]; do extra+=("$1"); shift; done; shift; fi
  case "$LAUNCHER" in
    srun) srun --mpi=pmix -n "$np" ${DA_SRUN_ARGS:-} "${extra[@]}" "$@" & ;;
    mpirun)
      local mpirun; mpirun=$(command -v mpirun || command -v mpirun.openmpi)
      # ranks on other nodes get only the variables named with -x
      local xs=(); [ -n "${DISTATTN_JSON_KEY:-}" ] && xs=(-x DISTATTN_JSON_KEY)
      "$mpirun" -np "$np" ${DA_MPIRUN_ARGS:-} "${xs[@]}" "$@" & ;;
    *) echo "distattn job: LAUNCHER=$LAUNCHER is not srun or mpirun" >&2; return 2 ;;
  esac
  DA_STEP_PID=$!
  local rc=0
  # wait returns early (> 128) when a trapped signal arrives: keep waiting for the step itself
  while :; do
    wait "$DA_STEP_PID" && rc=0 || rc=$?
    kill -0 "$DA_STEP_PID" 2>/dev/null || break
  done
  DA_STEP_PID=
  return $rc
}

# Time limit: submit with --signal=B:USR1@SECONDS (the scripts do). The handler lets the running
# step finish (each record is appended whole by one write, so a file never holds a half record),
# starts no new step, and appends a final {"event":"stopped",...} record; DA_KILL_ON_SIGNAL=1 ends
# the running step at once instead (it then writes no record at all).
DA_STOP=0
da_on_signal() {
  DA_STOP=1
  echo "# job $SLURM_JOB_ID: signal near the time limit: stopping after the current step" >&2
  if [ "${DA_KILL_ON_SIGNAL:-0}" = 1 ] && [ -n "${DA_STEP_PID:-}" ]; then kill -TERM "$DA_STEP_PID" 2>/dev/null || true; fi
}
trap da_on_signal USR1 TERM

# da_event FILE EVENT K=V...: one JSON record (strings only) for bookkeeping events.
da_event() {
  local f=$1 ev=$2; shift 2
  local s="{\"event\":\"$ev\",\"SLURM_JOB_ID\":\"$SLURM_JOB_ID\",\"SLURM_JOB_NODELIST\":\"$SLURM_JOB_NODELIST\""
  for kv in "$@"; do s="$s,\"${kv%%=*}\":\"${kv#*=}\""; done
  printf '%s}\n' "$s" >> "$f"
}

# da_recorded FILE KEY: true when FILE already holds a whole record of the configuration KEY
# (`distattn ... --json FILE` run with DISTATTN_JSON_KEY=KEY writes "key":"KEY" as the last field
# of its record, launcher/report.c). A record cut short has no closing brace and does not count.
da_recorded() {
  local f=$1 k=$2
  [ -f "$f" ] || return 1
  k=${k//\\/\\\\}; k=${k//\"/\\\"}
  # through the environment: awk -v would undo the JSON escapes
  DA_KEY_TAIL="\"key\":\"$k\"}" awk 'BEGIN { s = ENVIRON["DA_KEY_TAIL"] }
    length($0) >= length(s) && substr($0, length($0) - length(s) + 1) == s { found = 1; exit }
    END { exit !found }' "$f"
}
