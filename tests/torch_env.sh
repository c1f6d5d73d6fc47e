#!/bin/sh
# torch_env.sh: runs a torch test (label python) once the torch venv is there. A venv that is
# missing because scripts/setup-torch.sh could not reach the package index (it leaves
# <venv>.unreachable) is a loud skip (exit 77); missing for any other reason it is a failure.
#   torch_env.sh <venv python> <command...>
PY=$1
shift
VENV=$(dirname "$(dirname "$PY")")
if ! "$PY" -c "import torch, mpi4py, numpy" 2>/dev/null; then
  if [ -f "$VENV.unreachable" ]; then
    echo "################################################################################"
    echo "SKIPPED: torch is not installed in $VENV: the package index could not be reached"
    echo "($(cat "$VENV.unreachable")). Rerun scripts/setup-torch.sh with network access."
    echo "################################################################################"
    exit 77
  fi
  echo "FAIL: $PY cannot import torch, mpi4py and numpy: run scripts/setup-torch.sh (make setup-torch)"
  exit 1
fi
exec "$@"
