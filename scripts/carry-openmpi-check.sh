#!/usr/bin/env bash
# carry-openmpi-check.sh: prove, on this machine, that the folder scripts/carry-openmpi.sh filled
# works where no Open MPI is installed. Inside a private mount namespace (unshare -m, root) every
# file of the system's Open MPI, PMIx, hwloc and libevent is hidden (bind mounts of an empty
# folder / file over them), and the commands run under `env -i` with only the carried env.sh and a
# folder of a few core tools on PATH (no /usr/bin: it holds the system's mpirun). Then:
#   mpirun -np 2 DISTATTN run ... (verified, # PASS), ldd showing every MPI library from the carried
#   folder, mpicc building and running an MPI program, and CMake configuring and building
#   distattn and a Check test from the carried MPI, Check, hwloc and pkg-config (the system's hidden).
#   scripts/carry-openmpi-check.sh [DEST] [DISTATTN]   (defaults build-carry/openmpi, build/distattn)
# Exit 0 when all pass, 1 otherwise; 77 when unshare is not permitted here.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$(cd "${1:-${DA_CARRIED_MPI:-$ROOT/build-carry/openmpi}}" && pwd) || exit 1
BIN=$(realpath "${2:-$ROOT/build/distattn}")
[ -f "$DEST/env.sh" ] || { echo "no $DEST/env.sh: run scripts/carry-openmpi.sh first" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no program $BIN" >&2; exit 1; }
unshare -m true 2>/dev/null || { echo "unshare -m is not permitted here: skipped" >&2; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tools" "$work/empty"
: > "$work/emptyfile"
for t in sh bash cat head tail grep sed ls env hostname mktemp rm mkdir wc uname ldd gcc cc g++ c++ ld as ar ranlib nm \
         cmake make; do
  p=$(command -v "$t") && ln -s "$(realpath "$p")" "$work/tools/$t"
done
cat > "$work/hello.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
  int r, n;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  int s = 0;
  MPI_Allreduce(&r, &s, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (r == 0) printf("hello from %d ranks, sum of ranks %d\n", n, s);
  MPI_Finalize();
  return s != n * (n - 1) / 2;
}
EOF
cat > "$work/inner.sh" <<EOF
set -u
# The system's Open MPI and its runtime dependencies, hidden:
for f in /usr/bin/mpirun* /usr/bin/mpiexec* /usr/bin/orterun /usr/bin/orted /usr/bin/mpicc* /usr/bin/opal_wrapper \
         /usr/lib/x86_64-linux-gnu/libmpi*.so* /usr/lib/x86_64-linux-gnu/libopen-*.so* \
         /usr/lib/x86_64-linux-gnu/libpmix*.so* /usr/lib/x86_64-linux-gnu/libhwloc*.so* \
         /usr/lib/x86_64-linux-gnu/libevent*.so* /usr/lib/x86_64-linux-gnu/libmca_common*.so* \
         /usr/lib/x86_64-linux-gnu/pkgconfig/{check,hwloc,libsubunit}.pc /usr/lib/x86_64-linux-gnu/libcheck*.a \
         /usr/include/check.h /usr/include/hwloc.h /usr/bin/pkg-config /usr/bin/pkgconf; do
  [ -e "\$f" ] && [ ! -L "\$f" ] && mount --bind "$work/emptyfile" "\$f"
done
for d in /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 /usr/share/openmpi /etc/openmpi \
         /usr/include/x86_64-linux-gnu/openmpi; do
  [ -d "\$d" ] && mount --bind "$work/empty" "\$d"
done
exec env -i HOME=\$HOME TMPDIR=/tmp /bin/bash -c '
  . "$DEST/env.sh"
  export PATH="$DEST/usr/bin:$work/tools"
  echo "## PATH=\$PATH"
  echo "## mpirun: \$(command -v mpirun)"
  echo "## system libmpi hidden: \$(cat /usr/lib/x86_64-linux-gnu/libmpi.so.40 | head -c 4 | wc -c 2>/dev/null || echo 0) bytes readable"
  echo "## ldd $BIN (MPI, PMIx, hwloc, libevent):"
  ldd "$BIN" | grep -E "mpi|open-|pmix|hwloc|event|not found"
  ldd "$BIN" | grep -q "not found" && { echo "FAIL: a library is not found"; exit 1; }
  ldd "$BIN" | grep -E "libmpi|libopen-" | grep -v "$DEST" && { echo "FAIL: MPI from outside the carried folder"; exit 1; }
  echo "## mpirun -np 2 distattn run (carried Open MPI)"
  mpirun -np 2 --bind-to none "$BIN" run --algo zigzag --seq 1001 --heads 4 --kv-heads 2 --dim 32 --mask causal \
    --verify 8 --iters 1 --warmup 0 || { echo "FAIL: mpirun distattn run"; exit 1; }
  echo "## mpicc (carried wrapper, headers and libmpi) and mpirun -np 3"
  mpicc "$work/hello.c" -o "$work/hello" || { echo "FAIL: mpicc"; exit 1; }
  mpirun -np 3 --bind-to none "$work/hello" || { echo "FAIL: mpirun hello"; exit 1; }
  echo "## cmake configure (FindMPI, Check, hwloc from the carried folder) and build test_core + distattn"
  cmake -S "$ROOT" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DDISTATTN_CUDA=OFF > "$work/cmake.log" 2>&1 ||
    { tail -30 "$work/cmake.log"; echo "FAIL: cmake configure"; exit 1; }
  grep -E "Found MPI_C|Found Check|Checking for module .hwloc|  Found hwloc" "$work/cmake.log"
  cmake --build "$work/build" -j 2 --target test_core distattn > "$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log"; echo "FAIL: build"; exit 1; }
  "$work/build/tests/test_core" | tail -1 || { echo "FAIL: test_core"; exit 1; }
  mpirun -np 2 --bind-to none "$work/build/distattn" run --algo ring --seq 300 --heads 2 --dim 16 --verify 4 \
    --iters 1 --warmup 0 | tail -1
  echo "## carried Open MPI: all checks passed"
'
EOF
unshare -m /bin/bash "$work/inner.sh"
