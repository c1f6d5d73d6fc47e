#!/bin/sh
# wheel_test.sh: the Python wheel as a new user gets it. Builds it from python/ with its own
# backend (scikit-build-core runs this project's CMake; the build folder <build>/wheel is kept so
# a rerun is incremental), installs it into a fresh venv, and from a folder outside the tree,
# with DISTATTN_LIBRARY and PYTHONPATH unset, imports it (the library must be the one inside the
# package) and runs tests/test_torch.py's core cases under mpirun -np 2. Label python.
#   wheel_test.sh <torch venv python> <source dir> <build dir> <mpirun>
# torch, numpy and mpi4py come from the torch venv through a .pth file (not reinstalled: 2.8 GB);
# distattn comes only from the wheel.
set -eu
TORCH_PY=$1 SRC=$2 BUILD=$3 MPIRUN=$4
WORK=$(mktemp -d "${TMPDIR:-/tmp}/distattn-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
unset DISTATTN_LIBRARY PYTHONPATH
t0=$(date +%s)

echo "== wheel: pip wheel $SRC/python (scikit-build-core, build folder $BUILD/wheel)"
# --no-build-isolation: the backend comes from the torch venv (scripts/setup-torch.sh), so the
# test needs no network; the user's `pip install ./python` fetches it instead.
"$TORCH_PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --config-settings=build-dir="$BUILD/wheel" -w "$WORK/dist" "$SRC/python"
WHEEL=$(ls "$WORK"/dist/distattn-*.whl)
echo "   $(basename "$WHEEL") ($(( $(date +%s) - t0 )) s)"
"$TORCH_PY" -m zipfile -l "$WHEEL" | grep -q "distattn/libdistattn.so" || {
  echo "FAIL: the wheel holds no distattn/libdistattn.so"; exit 1; }

echo "== a fresh venv, the wheel installed into it"
/usr/bin/python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$WHEEL"
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$TORCH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/torch-venv.pth"

echo "== imported from another folder, nothing set"
mkdir "$WORK/elsewhere"
cp "$SRC/tests/test_torch.py" "$SRC/tests/mpi_runner.py" "$WORK/elsewhere/"
cd "$WORK/elsewhere"
"$WORK/venv/bin/python" - "$SITE" <<'EOF'
import os, sys
import distattn
site = sys.argv[1]
pkg = os.path.dirname(distattn.__file__)
assert pkg == os.path.join(site, "distattn"), f"distattn imported from {pkg}, not the venv"
assert distattn.library_path == os.path.join(pkg, "libdistattn.so"), \
    f"library {distattn.library_path}, not the one inside the package"
print(f"   distattn {distattn.version()} from {pkg}")
print(f"   library  {distattn.library_path}")
EOF

echo "== under mpirun -np 2: tests/test_torch.py (core cases) against the installed package"
DISTATTN_TEST_INSTALLED=1 "$MPIRUN" --oversubscribe --bind-to none --timeout 300 -np 2 "$WORK/venv/bin/python" \
  test_torch.py installed_package fwd_bwd_layouts_masks varlen_documents transposed_views bad_inputs
echo "== wheel test: $(( $(date +%s) - t0 )) s"
