# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it use what it sets
# bench/lib.sh: what the distributed benchmark scripts (bench/ring.sh, bench/ulysses.sh) share,
# sourced by them, never run: the settings every one of them reads, the checks and temporary
# folder of a run, the JSON Lines and awk helpers, and the description of the machine. Not a
# framework: each script still says what it measures and writes its own records.

# Read at source time (env): BUILD (build), DISTATTN (the program; $BUILD/distattn), MPIRUN.
# Sets ROOT (the repository), EXE, MPIRUN, HOST, and lets mpirun run as root.
BUILD=${BUILD:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXE=${DISTATTN:-$BUILD/distattn}
MPIRUN=${MPIRUN:-$(command -v mpirun.openmpi || command -v mpirun)}
HOST=$(hostname -s 2>/dev/null || hostname)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# bench_start NAME: exit 2 (NAME says why) without the program or mpirun; create the folders of
# $OUT and $MD; set TMP (a folder removed at exit), RUN_ID (tags every record of this run) and
# LOAD0 (the load average before the runs).
bench_start() {
  [ -x "$EXE" ] || { echo "$1: $EXE not found (build first, or set BUILD)" >&2; exit 2; }
  [ -n "$MPIRUN" ] || { echo "$1: no mpirun" >&2; exit 2; }
  mkdir -p "$(dirname "$OUT")" "$(dirname "$MD")"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-$HOST-$$
  LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
}

# jget FILE KEY [LINE]: the value of "KEY" in JSON Lines record LINE (default 1) of FILE.
jget() {
  awk -v key="\"$2\":" -v want="${3:-1}" 'NR == want {
    i = index($0, key); if (!i) { print "null"; exit }
    s = substr($0, i + length(key))
    if (substr(s, 1, 1) == "\"") { s = substr(s, 2); print substr(s, 1, index(s, "\"") - 1) }
    else { match(s, /^[^,}]*/); print substr(s, 1, RLENGTH) }
  }' "$1"
}
# calc EXPR: EXPR evaluated by awk, 4 significant digits ("null" when it is not a number).
calc() { awk "BEGIN { x = $1; if (x != x) print \"null\"; else printf \"%.4g\n\", x }"; }
# median of numbers (one per argument; "null" ignored).
median() { printf '%s\n' "$@" | grep -v null | sort -g | awk '{ x[NR] = $1 } END { if (!NR) print "null"; else if (NR % 2) print x[(NR + 1) / 2]; else print (x[NR / 2] + x[NR / 2 + 1]) / 2 }'; }
# list A B C: "[A,B,C]" (a JSON array of numbers).
list() { local IFS=,; echo "[$*]"; }

# bench_machine: set cpu, ncpu, topo (sockets, cores, threads), mpiv (mpirun's version line), git
# (the tree's revision) and date (now, UTC) for the summary record and the markdown.
bench_machine() {
  cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
  ncpu=$(nproc 2>/dev/null)
  topo=$(lscpu 2>/dev/null | awk -F: '/^Socket\(s\)|^Core\(s\) per socket|^Thread\(s\) per core/ { gsub(/^ +/, "", $2); printf "%s%s %s", sep, $2, $1; sep = ", " }')
  mpiv=$("$MPIRUN" --version 2>/dev/null | head -1)
  git=$(git -C "$ROOT" describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
}
