#!/usr/bin/env bash
# Builds the CUDA kernels, runs the kernels' tests (the GPU ones included) and
# the kernel benchmark on this machine's GPU, and prints the figures. Needs an
# NVIDIA driver, the CUDA toolkit ($CUDA_PATH, else /usr/local/cuda), Bazel and
# the Debian packages of tools/setup.sh; says which is missing and stops.
#
#   bash kernels/gpu_check.sh                  # from anywhere in the repository
#   OUT=/some/dir bash kernels/gpu_check.sh    # also keep logs and JSON there
#
# Exit status: 0 everything ran and passed; 1 a build, a test or a benchmark
# failed, or the GPU tests skipped; 2 a prerequisite is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

cuda="${CUDA_PATH:-/usr/local/cuda}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
say() { echo "gpu_check: $*" >&2; }

missing=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
else
  say "nvidia-smi not found: no NVIDIA driver on this machine?"
  missing=1
fi
if [ -x "$cuda/bin/nvcc" ]; then
  "$cuda/bin/nvcc" --version | tail -n 2
else
  say "no nvcc at $cuda/bin/nvcc: set CUDA_PATH to the toolkit (without it the kernels build as a stub and the GPU tests skip)"
  missing=1
fi
if ! command -v bazel >/dev/null; then
  say "bazel not found: on Debian 12, 'bash tools/setup.sh' installs it and the libraries kvx needs (apt-get)"
  missing=1
fi
[ "$missing" -eq 0 ] || exit 2

flags=(-c opt "--repo_env=CUDA_PATH=$cuda")

echo "== build //kernels/... (nvcc for sm_80 and sm_90)"
bazel build "${flags[@]}" //kernels/... || { say "build failed"; exit 1; }

echo "== test //kernels/... (host reference, kernel bodies on the CPU, GPU tests)"
bazel test "${flags[@]}" --cache_test_results=no --test_output=errors //kernels/...
test_status=$?
gpu_log="$(bazel info "${flags[@]}" bazel-testlogs 2>/dev/null)/kernels/kernels_gpu_test/test.log"
cp "$gpu_log" "$out/kernels_gpu_test.log" 2>/dev/null
grep -E '^\[ +(OK|SKIPPED|FAILED) +\]' "$gpu_log"
if grep -q '^\[  SKIPPED \]' "$gpu_log"; then
  say "the GPU tests skipped: $(grep -m1 'no CUDA device' "$gpu_log")"
  test_status=1
fi

echo "== benchmark //kernels:kernels_benchmark"
bazel run "${flags[@]}" //kernels:kernels_benchmark -- \
  --benchmark_min_time=0.2 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_out="$out/kernels_benchmark.json" --benchmark_out_format=json \
  | tee "$out/kernels_benchmark.txt"
bench_status=${PIPESTATUS[0]}
grep -q "ERROR OCCURRED" "$out/kernels_benchmark.txt" && bench_status=1

# The issue's target: gather at 16 KiB fragments >= 80% of cudaMemcpy D2D.
if command -v python3 >/dev/null; then
  python3 - "$out/kernels_benchmark.json" <<'EOF'
import json, sys
rates = {b["run_name"]: b["bytes_per_second"] for b in json.load(open(sys.argv[1]))["benchmarks"]
         if b.get("aggregate_name") == "median" and "bytes_per_second" in b}
memcpy = rates.get("BM_CudaMemcpyD2D/bytes:67108864/manual_time")
for name in ("BM_CudaGather/fragment_bytes:16384/manual_time",
             "BM_CudaScatter/fragment_bytes:16384/manual_time"):
    if memcpy and name in rates:
        print("%s: %.1f GB/s = %.0f%% of cudaMemcpy D2D %.1f GB/s (target 80%%)"
              % (name, rates[name] / 1e9, 100 * rates[name] / memcpy, memcpy / 1e9))
EOF
fi

echo "== logs and JSON in $out"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
