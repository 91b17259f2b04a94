#!/usr/bin/env bash
# Runs //tools:transceiver_benchmark briefly (tiny sizes and counts) over tcp and
# loopback, so it does not rot: it must exit 0 and end with its JSON document.
set -euo pipefail
bench="$1"
export TSAN_OPTIONS="${TSAN_OPTIONS:-}:ignore_noninstrumented_modules=1"
tiny=(--sizes=1048576,2097152 --iters=2 --overhead_requests=20 --rate_requests=200 --window=16
      --verify)
for transport in tcp loopback; do
  out="$("$bench" --transport="$transport" "${tiny[@]}")"
  echo "$out"
  python3 - "$(tail -n 1 <<<"$out")" <<'PY'
import json, sys
doc = json.loads(sys.argv[1])
assert len(doc["bandwidth"]) == 2 and all(r["median_gbps"] > 0 for r in doc["bandwidth"]), doc
assert doc["overhead"]["e2e_us"] > 0 and doc["overhead"]["zmq_round_trip_us"] > 0, doc
assert doc["rate"]["requests_per_second"] > 0, doc
if doc["transport"] == "tcp":
    assert all(r["transport_bench_gbps"] > 0 for r in doc["bandwidth"]), doc
PY
done
echo PASS
