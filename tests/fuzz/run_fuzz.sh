#!/usr/bin/env bash
# run_fuzz.sh: a bounded libFuzzer run (label fuzz). The seed corpus under tests/fuzz/corpus is
# read, never written: new inputs go to a scratch corpus in the build tree. Exit 0 when the run
# ends without a finding; the crash / leak input is left in <workdir> otherwise.
#   run_fuzz.sh <fuzz exe> <seconds> <seed corpus dir> <workdir>
set -euo pipefail
exe=$1 secs=$2 seeds=$3 work=$4
mkdir -p "$work/corpus"
cd "$work"
# -close_fd_mask=3: the parsers print usage and messages to stdout and stderr; libFuzzer's own report
# still comes out. ASan/UBSan options: any report is a finding.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
"$exe" -max_total_time="$secs" -seed=1 -max_len=512 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
       -close_fd_mask=3 -artifact_prefix="$work/" "$work/corpus" "$seeds" 2>&1 | tail -25
