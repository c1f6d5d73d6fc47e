#!/usr/bin/env bash
# setup-deps.sh: install the Debian packages distattn builds and tests with, only those missing.
# Idempotent: prints "all present" and does nothing when everything is installed.
set -euo pipefail
PKGS=(build-essential cmake pkg-config libopenmpi-dev openmpi-bin libhwloc-dev hwloc check
      libopenblas-dev)
# Extra packages for later test labels are appended by their owners (slurm, sim, sanitizers).
EXTRA_FILE="$(dirname "$0")/extra-packages.txt"
if [ -f "$EXTRA_FILE" ]; then
  while read -r p; do [ -n "$p" ] && [ "${p#\#}" = "$p" ] && PKGS+=("$p"); done < "$EXTRA_FILE"
fi
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
echo "setup-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
