#!/bin/sh
# check.sh: install this build into a temporary prefix with `make install PREFIX=...`, then build
# tests/install/consumer.c OUTSIDE the tree against the installed files only -- pkg-config
# (shared, then --static) and find_package(distattn) -- and run each under mpirun; check that the
# installed library exports exactly the functions of include/distattn.h.
# usage: check.sh <build dir> <source dir> <mpirun> <cmake> <make> <cc>
set -eu
BUILD=$1 SRC=$2 MPIRUN=$3 CMAKE=$4 MAKE=$5 CC=$6
TMP=$(mktemp -d "${TMPDIR:-/tmp}/distattn-install.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PREFIX=$TMP/prefix
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== make install PREFIX=$PREFIX"
"$MAKE" -s -C "$SRC" install BUILD="$BUILD" PREFIX="$PREFIX" JOBS=1 > "$TMP/install.log" 2>&1 ||
  { cat "$TMP/install.log"; fail "make install"; }
for f in include/distattn.h lib/libdistattn.so lib/libdistattn.a lib/pkgconfig/distattn.pc \
         lib/cmake/distattn/distattnConfig.cmake lib/cmake/distattn/distattnTargets.cmake bin/distattn; do
  [ -e "$PREFIX/$f" ] || fail "$f not installed"
done

echo "== exported symbols"
nm -D --defined-only "$PREFIX/lib/libdistattn.so" | awk '$2 ~ /^[TtWDBR]$/ {print $3}' | sort > "$TMP/exported"
sed -e 's@/\*.*\*/@@g' "$BUILD/distattn.map" | grep -o 'da_[a-z0-9_]*' | sort > "$TMP/declared"
grep -v '^da_' "$TMP/exported" && fail "symbols without the da_ prefix are exported"
diff "$TMP/declared" "$TMP/exported" || fail "exported symbols differ from the header's functions"
echo "$(wc -l < "$TMP/exported") functions exported, all declared in distattn.h"

mkdir "$TMP/src"
cp "$SRC/tests/install/consumer.c" "$SRC/tests/install/CMakeLists.txt" "$TMP/src/"
cd "$TMP/src"
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
run() { "$MPIRUN" --oversubscribe --bind-to none --timeout 60 -np 2 "$@" || fail "$* under mpirun"; }

echo "== pkg-config: $(pkg-config --cflags --libs distattn)"
# shellcheck disable=SC2046
"$CC" -std=c11 -O2 consumer.c -o consumer_pc $(pkg-config --cflags --libs distattn) -lm \
  -Wl,-rpath,"$(pkg-config --variable=libdir distattn)"
ldd ./consumer_pc | grep -q "$PREFIX/lib/libdistattn.so" || fail "consumer_pc does not load the installed library"
run ./consumer_pc

echo "== pkg-config --static"
# libdistattn.a by path (with -ldistattn the linker would take the .so), then the libraries it needs
LIBS=$(pkg-config --static --libs distattn | sed 's/-ldistattn\b//')
# shellcheck disable=SC2086
"$CC" -std=c11 -O2 consumer.c -o consumer_pc_static $(pkg-config --cflags distattn) "$PREFIX/lib/libdistattn.a" $LIBS -lm
ldd ./consumer_pc_static | grep -q libdistattn && fail "the static build links libdistattn.so"
run ./consumer_pc_static

echo "== find_package(distattn)"
"$CMAKE" -S . -B build -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release > cmake.log 2>&1 ||
  { cat cmake.log; fail "configuring the find_package consumer"; }
"$CMAKE" --build build > build.log 2>&1 || { cat build.log; fail "building the find_package consumer"; }
run ./build/consumer_shared
run ./build/consumer_static
echo "== the python package without a library inside, in a venv: the library found through pkg-config"
# (The wheel, which carries its own library, is tests/wheel_test.sh; here the package's search
# order is under test: a copy of python/distattn finds the library `make install` put in PREFIX.)
PY=${DISTATTN_PYTHON:-/usr/bin/python3}
if "$PY" -c "import numpy, mpi4py, venv" > /dev/null 2>&1; then
  "$PY" -m venv --without-pip --system-site-packages "$TMP/venv" > /dev/null
  SITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp -r "$SRC/python/distattn" "$SITE/"
  rm -f "$SITE"/distattn/libdistattn.so*
  cat > forward.py << 'PYEOF'
import numpy as np, distattn
from mpi4py import MPI
plan = distattn.Plan(MPI.COMM_WORLD, seq=50, heads=2, dim=32, causal=True, algo="striped")
v = np.ones((plan.local_rows, 2, 32), np.float32)
out, lse = plan.forward(np.ones((plan.local_rows, 2, 32), np.float32), v, v)
assert np.allclose(out, 1.0) and np.allclose(lse, np.log(plan.positions + 1)[:, None] + 32 ** 0.5)
if MPI.COMM_WORLD.rank == 0:
    print("python: distattn from", distattn.__file__.rsplit("/", 2)[0], "library", distattn.library_path, "ok")
PYEOF
  (unset DISTATTN_LIBRARY PYTHONPATH; cd "$TMP" && run "$TMP/venv/bin/python" src/forward.py) | tee py.log
  grep -q "library $PREFIX/lib/libdistattn.so ok" py.log || fail "the installed package did not use the installed library"
else
  echo "skipped: $PY lacks numpy, mpi4py or venv (python3-venv)"
fi
echo "install check: PASS"
