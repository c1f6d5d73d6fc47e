#!/usr/bin/env bash
# setup-torch.sh: the Python environment of the torch tests (label python): a venv outside the
# tree, cached across builds, holding torch (PyPI's wheel: the CUDA build, about 2.8 GB to
# download, which runs on the CPU), numpy, mpi4py and scikit-build-core (the wheel's build
# backend, so the wheel test builds without reaching the index). Called by `make setup`.
#   DISTATTN_TORCH_VENV   where the venv lives (default ~/.cache/distattn/venv-torch)
# Idempotent: a venv whose packages are all present is left alone in about a second. When the
# package index cannot be reached, it says so loudly, writes <venv>.unreachable (the torch tests
# then skip, printing why) and exits 0; any other failure is an error.
set -euo pipefail
VENV="${DISTATTN_TORCH_VENV:-$HOME/.cache/distattn/venv-torch}"
MARK="$VENV.unreachable"
PY=/usr/bin/python3
MODS=(torch numpy mpi4py scikit_build_core)
PKGS=(torch numpy mpi4py "scikit-build-core>=0.10")

present() { # every module findable, without importing torch (seconds)
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "${MODS[@]}" <<'EOF'
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
EOF
}

if present; then
  rm -f "$MARK"
  echo "setup-torch: $VENV has ${MODS[*]}"
  exit 0
fi

# Reachability first, so a machine without network skips instead of failing halfway.
INDEX="${PIP_INDEX_URL:-https://pypi.org/simple}"
if ! "$PY" - "$INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=20).read(1)
except Exception as e:
    print(f"  {e}")
    sys.exit(1)
EOF
then
  mkdir -p "$(dirname "$MARK")"
  echo "unreachable: $INDEX ($(date -u +%FT%TZ))" > "$MARK"
  echo "################################################################################"
  echo "setup-torch: the package index $INDEX cannot be reached: torch is NOT installed and"
  echo "setup-torch: the torch tests (label python) will be SKIPPED. Rerun scripts/setup-torch.sh"
  echo "setup-torch: with network access to test the PyTorch op."
  echo "################################################################################"
  exit 0
fi
rm -f "$MARK"

echo "setup-torch: installing ${PKGS[*]} into $VENV (torch is about 2.8 GB: minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}"
present || { echo "setup-torch: installed, but ${MODS[*]} are not all importable from $VENV" >&2; exit 1; }
echo "setup-torch: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
