#!/usr/bin/env bash
# check-sanitize.sh: the ASan + UBSan build of the unit and MPI tests, the bounded libFuzzer runs
# and valgrind memcheck on the unit tests (issue 10; `make check-sanitize`, `make fuzz`).
# A separate build directory (BUILD_ASAN, default build-asan) configured with clang,
# DISTATTN_SANITIZE=ON and DISTATTN_FUZZ=ON; Open MPI's own leaks are suppressed
# (tests/sanitize/lsan.supp, ../shared/platform.md). Any sanitizer report fails the test it
# came from (halt_on_error / abort_on_error), so a green ctest is a clean run.
#   scripts/check-sanitize.sh [sanitize|fuzz|valgrind|all]   (default: sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
what=${1:-sanitize}
B=${BUILD_ASAN:-build-asan}
JOBS=${JOBS:-2}
export OMPI_CC=clang
if [ ! -f "$B/CMakeCache.txt" ]; then
  CC=clang cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDISTATTN_SANITIZE=ON -DDISTATTN_FUZZ=ON \
    -DDISTATTN_CUDA=OFF >/dev/null
else
  cmake "$B" >/dev/null # regenerate: the test list below is read from this build's ctest files
fi
# The sanitize subset: labels unit and mpi, less the suites too slow under ASan on 2 cores (see below).
SAN_LABELS='unit|mpi'
SAN_EXCLUDE='^(test_core|test_kernels|test_partition|test_ring_np[0-9]+|example_.*)$'
# Only what the selected tests run (the benchmarks, examples and Python library are not needed),
# read from ctest itself: every executable of this build that the selected tests' command lines
# name (directly, as mpirun's program, or as -DEXE=... of a cmake script; a test named after its
# target, whose unbuilt program ctest does not show) and that is a target. A
# test added to tests/ is built here without touching this script (a fixed list went stale:
# test_tensor, test_ulysses and test_ipc were in the subset but never built).
san_targets() {
  local known
  known=$(cmake --build "$B" --target help | sed -n 's/^\.\.\. \([A-Za-z0-9_.-]*\).*/\1/p')
  (cd "$B" && ctest -N --show-only=json-v1 -L "$SAN_LABELS" -E "$SAN_EXCLUDE") | python3 -c '
import json, os, sys
build = os.path.realpath(sys.argv[1]); known = set(sys.argv[2].split())
names = set()
for t in json.load(sys.stdin).get("tests", []):
    if not t.get("command") and t["name"] in known:  # ctest leaves out a program not built yet
        names.add(t["name"])
    for a in t.get("command") or []:
        for part in a.split("="):
            p = os.path.realpath(part) if part.startswith("/") else ""
            if p.startswith(build + "/") and os.path.basename(p) in known:
                names.add(os.path.basename(p))
print(" ".join(sorted(names)))' "$B" "$known"
}
targets=()
case $what in sanitize | all) read -r -a targets <<<"$(san_targets)" ;; esac
case $what in fuzz | all) targets+=(fuzz_args fuzz_mask fuzz_npy) ;; esac
[ ${#targets[@]} -eq 0 ] || { echo "== building ${targets[*]}"; cmake --build "$B" -j "$JOBS" --target "${targets[@]}"; }

# allocator_may_return_null=1: an allocation too large to serve returns NULL, as glibc's malloc does,
# instead of ASan's "requested allocation size exceeds maximum supported size" abort: the tests of
# out-of-memory paths ask for such sizes on purpose (cli_decode_page_oom: a 2 TiB KV page).
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# use_tls=0: LeakSanitizer's tracer crashed at exit ("Tracer caught signal 11", "LeakSanitizer has
# encountered a fatal error") walking a bogus dynamic-TLS entry (DTLS at 0x7ad6, from the
# components Open MPI dlopens), in 4 of 6 runs of test_tree_np5 (docs/reliability.md). Not
# scanning TLS costs nothing here: distattn's only thread-local is the error message text.
export LSAN_OPTIONS="suppressions=$ROOT/tests/sanitize/lsan.supp:fast_unwind_on_malloc=0:print_suppressions=0:use_tls=0"
export OMPI_MCA_mca_base_component_disable_dlclose=1 PMIX_MCA_mca_base_component_disable_dlclose=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# CPU kernels: one thread per process keeps the oversubscribed MPI runs inside their timeouts.
export DISTATTN_NTHREADS=${DISTATTN_NTHREADS:-1}

rc=0
case $what in
  sanitize | all)
    # The representative subset (about 6 min on 2 cores): the unit suites test_ref, test_api,
    # test_kvmap, test_place; every `distattn kernel` / `run` / `decode` / `decode --offload`
    # command line of tests/cli.cmake and tests/mpi.cmake (kernels, ring / striped / zigzag at
    # P = 1..5, tree and ring decode, offload, usage errors); test_tree and test_offload at every P.
    # Left out, as too slow under ASan on 2 cores (1-7 min each) and covered above through the
    # program: test_core, test_kernels, test_partition, test_ring at P = 1..8 (run them by hand
    # with `ctest -R` in the same build when those modules change). Check runs in the process
    # (CK_FORK=no): LeakSanitizer cannot trace a child forked from a multithreaded parent.
    # Reports go to files (one per process, by pid) as well as failing the test: a rank that aborts
    # at exit can lose its last stderr lines when mpirun tears the job down (docs/reliability.md,
    # the cli_decode_ring_np3 abort), and the file keeps them.
    case $B in /*) LOGS=$B/sanitizer-logs ;; *) LOGS=$ROOT/$B/sanitizer-logs ;; esac # ctest passes an absolute B
    rm -rf "$LOGS" && mkdir -p "$LOGS"
    (cd "$B" && ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$LOGS/asan" UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$LOGS/ubsan" \
        LSAN_OPTIONS="$LSAN_OPTIONS:log_path=$LOGS/lsan" CK_FORK=no ctest --output-on-failure --timeout 600 \
        -L "$SAN_LABELS" -E "$SAN_EXCLUDE") || rc=1
    for f in "$LOGS"/*; do
      [ -s "$f" ] || continue
      # A refused huge allocation (allocator_may_return_null above) leaves only this warning: the
      # program's own out-of-memory path, which the test checks, not a finding.
      if ! grep -qv 'WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]* bytes' "$f"; then continue; fi
      echo "== sanitizer report $f"; head -60 "$f"; rc=1
    done ;;&
  fuzz | all)
    (cd "$B" && ctest --output-on-failure -L fuzz) || rc=1 ;;&
  valgrind | all)
    # memcheck on unit suites (Check forks per test: valgrind follows forks, each child is
    # checked and reports its own leaks). A plain gcc build: valgrind and ASan do not mix; AVX2 kernels:
    # valgrind does not decode AVX-512.
    V=${BUILD_VALGRIND:-build-valgrind}
    [ -f "$V/CMakeCache.txt" ] || cmake -S . -B "$V" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    # test_ref (the float64 oracle) and test_kvmap (the KV-cache shard map); the larger suites
    # take 5-10 min each under memcheck on 2 cores.
    cmake --build "$V" -j "$JOBS" --target test_ref test_kvmap
    for t in test_ref test_kvmap; do
      echo "== valgrind memcheck: $t"
      OMP_NUM_THREADS=1 DISTATTN_CPU_ISA=avx2 valgrind --trace-children=no --quiet --error-exitcode=99 --leak-check=full \
        --errors-for-leak-kinds=definite --track-origins=no "$V/tests/$t" >/tmp/valgrind-$t.log 2>&1 \
        && echo "   clean" || { echo "   FAILED (see /tmp/valgrind-$t.log)"; tail -30 /tmp/valgrind-$t.log; rc=1; }
    done ;;
esac
exit $rc
