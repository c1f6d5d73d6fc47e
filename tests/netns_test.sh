#!/usr/bin/env bash
# netns_test.sh BUILD_DIR [HOSTS] [RATE]: `distattn run` across emulated hosts. HOSTS (2-4)
# network namespaces, each with its own host name (unshare --uts) and a veth link, shaped with
# tbf to RATE (default 1gbit), into a bridge that lives in a namespace of its own: traffic stays
# between this test's namespaces. mpirun starts in host 1 and reaches the others through
# --mca plm_rsh_agent (a script doing `ip netns exec`). The run must verify (# PASS), place ranks
# on every host and report its overlap under the shaped links. Every namespace (and every process
# in one) is removed on exit. Exit 77 = skipped (not root, or namespaces not permitted).
set -uo pipefail
BUILD=$1 N=${2:-3} RATE=${3:-1gbit}
[ "$(id -u)" -eq 0 ] || { echo "skipped: needs root"; exit 77; }
command -v ip >/dev/null && command -v tc >/dev/null && command -v unshare >/dev/null ||
  { echo "skipped: iproute2 / unshare missing"; exit 77; }
MPIRUN=$(command -v mpirun || command -v mpirun.openmpi)
P=da$$ # names: ${P}h1.. (hosts), ${P}br (bridge namespace); interface names stay under 15 chars
WORK=$(mktemp -d /tmp/distattn-netns.XXXXXX)
created=()
cleanup() {
  for ns in "${created[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for ns in "${created[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

if ! ip netns add ${P}br 2>/dev/null; then echo "skipped: network namespaces not permitted"; exit 77; fi
created+=(${P}br)
ip -n ${P}br link add br0 type bridge && ip -n ${P}br link set br0 up && ip -n ${P}br link set lo up || exit 1
hosts=""
for i in $(seq "$N"); do
  ns=${P}h$i
  ip netns add $ns || exit 1
  created+=($ns)
  ip link add ${P}v$i type veth peer name ${P}p$i || exit 1
  ip link set ${P}v$i netns $ns && ip link set ${P}p$i netns ${P}br || exit 1
  ip -n $ns link set ${P}v$i name eth0
  ip -n $ns addr add 10.77.0.$i/24 dev eth0
  ip -n $ns link set eth0 up && ip -n $ns link set lo up
  ip -n ${P}br link set ${P}p$i master br0 && ip -n ${P}br link set ${P}p$i up
  # shape both directions of the host's link
  ip netns exec $ns tc qdisc add dev eth0 root tbf rate $RATE burst 256kb latency 100ms || exit 1
  ip netns exec ${P}br tc qdisc add dev ${P}p$i root tbf rate $RATE burst 256kb latency 100ms || exit 1
  echo "h$i slots=1" >> "$WORK/hosts"
  hosts="$hosts h$i"
done
# the agent mpirun calls as `agent HOST command...`: run it in that host's namespace and name
cat > "$WORK/agent" <<AGENT
#!/bin/sh
h=\$1; shift
exec ip netns exec ${P}\$h unshare --uts sh -c "hostname \$h; \$*"
AGENT
chmod +x "$WORK/agent"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mca="--mca plm_rsh_agent $WORK/agent --mca btl self,tcp --mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0"
run="$MPIRUN --timeout 100 --hostfile $WORK/hosts -np $N $mca --bind-to none $BUILD/distattn run --algo zigzag --seq 4K \
  --heads 4 --kv-heads 2 --dim 64 --mask causal --verify 4 --iters 2 --warmup 1 --threads 1 --measure-overlap --json $WORK/r.jsonl"
ip netns exec ${P}h1 unshare --uts sh -c "hostname h1; $run" > "$WORK/out.txt" 2>&1
rc=$?
cat "$WORK/out.txt"
[ $rc = 0 ] || { echo "FAIL: mpirun exit $rc"; exit 1; }
grep -q "^# PASS" "$WORK/out.txt" || { echo "FAIL: no PASS"; exit 1; }
for h in $hosts; do grep -Eq "^#  rank +[0-9]+  host $h " "$WORK/out.txt" || { echo "FAIL: no rank on $h"; exit 1; }; done
grep -q "^# overlap: compute-only" "$WORK/out.txt" || { echo "FAIL: no overlap line"; exit 1; }
grep -q "\"hosts\":\"h1,h2" "$WORK/r.jsonl" || { echo "FAIL: hosts in the record"; exit 1; }
echo "ok: $N hosts, links $RATE"
