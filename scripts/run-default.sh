#!/usr/bin/env bash
# run-default.sh: the default distributed job of `make run` on this CPU-only machine: a causal,
# GQA, zigzag-partitioned attention forward + backward over 4 MPI ranks, every rank verifying
# sampled rows of its own output and gradients against float64, no rank holding the sequence.
set -euo pipefail
BUILD=${BUILD:-build}
MPIRUN=${MPIRUN:-$(command -v mpirun.openmpi || command -v mpirun)}
NP=${NP:-4}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# More ranks than cores: Open MPI refuses to bind when oversubscribed.
exec "$MPIRUN" --oversubscribe --bind-to none --timeout 600 -np "$NP" \
  "$BUILD/distattn" run --algo zigzag --seq 16K --heads 8 --kv-heads 2 --dim 64 --mask causal \
  --backward --verify 16 --iters 3 --warmup 1 "$@"
