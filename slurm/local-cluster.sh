#!/usr/bin/env bash
# local-cluster.sh: a real Slurm on this one machine for the `slurm` tests and for trying the
# job scripts: munged (as the munge user), slurmctld and two slurmd as node1 and node2 (both on
# 127.0.0.1, ports 17001-17002), 2 fake GPUs per node as gres (character devices). Everything
# lives under one state directory and everything started is stopped by `stop` (or by `run`'s trap).
#
#   slurm/local-cluster.sh start DIR       start; prints `export SLURM_CONF=DIR/slurm.conf`
#   slurm/local-cluster.sh stop DIR        scontrol shutdown, then the recorded pids, munged last
#   slurm/local-cluster.sh run DIR CMD...  start, run CMD with SLURM_CONF set, always stop
#
# Needs root (slurmd) and the Debian packages slurm-wlm, munge, libpmix-dev. Exit 77 when they
# or root are missing, so ctest reports the tests as skipped rather than failed.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,12p' "$0" >&2; exit 2; }
CTLD_PORT=${DA_SLURM_CTLD_PORT:-16817}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
sbin() { if command -v "$1" >/dev/null 2>&1; then command -v "$1"; else echo "/usr/sbin/$1"; fi; }

start() {
  if [ "$(id -u)" -ne 0 ]; then echo "local-cluster: needs root (slurmd)" >&2; exit 77; fi
  for p in munged slurmctld slurmd sbatch scontrol; do
    have $p || { echo "local-cluster: $p missing (apt-get install slurm-wlm munge)" >&2; exit 77; }
  done
  id munge >/dev/null 2>&1 || { echo "local-cluster: no munge user" >&2; exit 77; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  mkdir -p "$dir/munge" "$dir/state" "$dir/dev" "$dir/tmp-node1" "$dir/tmp-node2" "$dir/spool-node1" "$dir/spool-node2"
  chmod 755 "$dir"
  : > "$dir/pids"
  # munge: its own key and socket, owned by the munge user (munged refuses to run as root)
  if [ ! -f "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$dir/munge"; chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
  runuser -u munge -- "$(sbin munged)" --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    --force
  for _ in $(seq 50); do [ -s "$dir/munge/munged.pid" ] && break; sleep 0.1; done
  echo "munged $(cat "$dir/munge/munged.pid")" >> "$dir/pids"
  # fake GPUs: /dev/null-like character devices; --gpus-per-task then sets CUDA_VISIBLE_DEVICES
  for g in 0 1; do [ -e "$dir/dev/fakegpu$g" ] || mknod "$dir/dev/fakegpu$g" c 1 3; done
  cat > "$dir/slurm.conf" <<CONF
# written by slurm/local-cluster.sh: two emulated nodes on one machine
ClusterName=distattn
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
TmpFS=$dir/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# heterogeneous jobs are started only by the backfill scheduler: a 1 s cycle (default 30 s)
SchedulerParameters=bf_interval=1
MpiDefault=pmix
GresTypes=gpu
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=10
KillWait=5
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=UNLIMITED State=UP OverSubscribe=YES
CONF
  cat > "$dir/gres.conf" <<CONF
Name=gpu File=$dir/dev/fakegpu[0-1]
CONF
  export SLURM_CONF="$dir/slurm.conf"
  "$(sbin slurmctld)" -i
  for _ in $(seq 50); do [ -s "$dir/slurmctld.pid" ] && break; sleep 0.1; done
  echo "slurmctld $(cat "$dir/slurmctld.pid")" >> "$dir/pids"
  for n in node1 node2; do
    "$(sbin slurmd)" -N $n
    for _ in $(seq 50); do [ -s "$dir/slurmd-$n.pid" ] && break; sleep 0.1; done
    echo "slurmd-$n $(cat "$dir/slurmd-$n.pid")" >> "$dir/pids"
  done
  # ready when both nodes are idle (30 s at most)
  for _ in $(seq 150); do
    if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle')" = 2 ]; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  echo "local-cluster: nodes did not come up:" >&2
  sinfo -N >&2 || true
  tail -5 "$dir/slurmctld.log" "$dir"/slurmd-node*.log >&2 || true
  return 1
}

stop() {
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF="$dir/slurm.conf"
  if [ -f "$dir/slurm.conf" ] && [ -f "$dir/pids" ]; then
    # jobs first (their scripts and steps belong to slurmd's children), then the daemons
    timeout 5 scancel --full --quiet --user=root >/dev/null 2>&1 || true
    for _ in $(seq 30); do
      [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  # then every pid this script recorded (and only those), slurm daemons first, munged last
  if [ -f "$dir/pids" ]; then
    for _ in $(seq 50); do
      alive=0
      while read -r name pid; do
        [ "$name" = munged ] && continue
        kill -0 "$pid" 2>/dev/null && alive=1
      done < "$dir/pids"
      [ $alive = 0 ] && break
      sleep 0.1
    done
    while read -r name pid; do
      [ "$name" = munged ] && continue
      kill -0 "$pid" 2>/dev/null && { kill -TERM "$pid" 2>/dev/null; sleep 0.5; kill -KILL "$pid" 2>/dev/null || true; }
    done < "$dir/pids"
    while read -r name pid; do
      [ "$name" = munged ] && { kill -TERM "$pid" 2>/dev/null || true; }
    done < "$dir/pids"
    rm -f "$dir/pids"
  fi
  # Whatever a job left behind (a batch script, srun, a rank) carries this cluster's SLURM_CONF in
  # its environment: end those processes, and only those (never this script itself).
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}; p=${p%/environ}
    [ "$p" = $$ ] && continue
    if { tr '\0' '\n' < "$e"; } 2>/dev/null | grep -qx "SLURM_CONF=$dir/slurm.conf"; then
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  run)
    shift 2
    trap 'stop' EXIT
    trap 'exit 143' INT TERM
    start >/dev/null
    export SLURM_CONF="$(cd "$dir" && pwd)/slurm.conf"
    "$@"
    ;;
  *) echo "local-cluster: unknown command '$cmd' (start | stop | run)" >&2; exit 2 ;;
esac
