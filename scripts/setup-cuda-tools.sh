#!/usr/bin/env bash
# setup-cuda-tools.sh: the CUDA binary inspector (cuobjdump) the CUDA build gates read
# (tests/cuda.cmake: resource budgets and SASS). The toolkit here (NVIDIA's wheels) ships without it;
# PyPI's nvidia-cuda-cuobjdump (13.2+ reads the 13.0 objects) goes into a venv outside the tree:
# $HOME/.cache/distattn/venv-tools. Idempotent; does nothing on a machine without nvcc.
set -euo pipefail
VENV="${DISTATTN_TOOLS_VENV:-$HOME/.cache/distattn/venv-tools}"
NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  echo "setup-cuda-tools: no nvcc: the CUDA gates are not configured, nothing to install"
  exit 0
fi
# cuobjdump -sass runs nvdisasm, a separate wheel.
have() { find "$VENV" -name "$1" -type f -perm -u+x 2>/dev/null | head -1; }
if [ -n "$(have cuobjdump)" ] && [ -n "$(have nvdisasm)" ]; then
  echo "setup-cuda-tools: cuobjdump and nvdisasm present in $VENV"
  exit 0
fi
echo "setup-cuda-tools: installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into $VENV"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "nvidia-cuda-cuobjdump>=13.2" "nvidia-cuda-nvdisasm>=13.2"
for tool in cuobjdump nvdisasm; do
  if [ -z "$(have $tool)" ]; then
    echo "setup-cuda-tools: the wheels installed but no $tool binary in $VENV" >&2
    exit 1
  fi
done
"$(have cuobjdump)" --version | tail -1
