#!/usr/bin/env bash
# Smoke test for a Google Benchmark binary: runs each benchmark briefly and fails
# when the binary fails or a benchmark reports an error.
# Usage: benchmark_smoke_test.sh BENCHMARK_BINARY [EXTRA_FLAGS...]
set -euo pipefail
binary="$1"
shift
out="$("${binary}" --benchmark_min_time=0.01 "$@" 2>&1)"
echo "${out}"
if grep -q "ERROR OCCURRED" <<<"${out}"; then
  echo "FAIL: a benchmark reported an error" >&2
  exit 1
fi
