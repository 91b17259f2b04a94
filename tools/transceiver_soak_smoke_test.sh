#!/usr/bin/env bash
# Runs `transceiver demo --soak` briefly, as CI's longer soak does, over libfabric
# tcp (two child processes): every fault kind once at least (8 batches), every byte
# checked, resources drained. Checks its contract: exit 0, a table, and a last line
# that is a JSON document saying ok, with every fault armed and hitting. Then a bad
# soak flag must exit 2 with nothing on stdout.
set -euo pipefail
tool="$1"
# The tool links ZeroMQ, which ThreadSanitizer cannot see into (//testing:tsan_options
# explains); harmless elsewhere.
export TSAN_OPTIONS="${TSAN_OPTIONS:-}:ignore_noninstrumented_modules=1"
batch=40
status=0
out="$("$tool" demo --soak --seconds=5 --soak_batch_requests=$batch --max_prompt=1024 \
       --soak_request_timeout_s=2 --soak_report_interval_s=5 --run_timeout_s=240)" || status=$?
echo "$out"
[ "$status" -eq 0 ] || { echo "FAIL: the soak exited $status" >&2; exit 1; }
grep -q "result: OK" <<<"$out" || { echo "FAIL: no 'result: OK'" >&2; exit 1; }
python3 - "$(tail -n 1 <<<"$out")" "$batch" <<'PY'
import json, sys
doc, batch = json.loads(sys.argv[1]), int(sys.argv[2])
assert doc["command"] == "soak" and doc["ok"] is True and doc["drained"] is True, doc
assert doc["problems"] == [], doc["problems"]
assert doc["transport"] == "tcp", doc["transport"]
assert doc["batches"] >= 8 and doc["fault_batches"] == doc["batches"] // 2, doc
assert doc["requests"] == doc["batches"] * batch, doc
assert doc["succeeded"] + doc["cancelled"] + doc["failed"] == doc["requests"], doc
assert doc["bytes_verified"] > 0 and doc["bytes_moved"] > 0, doc
for kind in ("write", "delay", "drop", "reconnect"):
    assert doc["faults"][kind]["armed"] >= 1, (kind, doc["faults"])
for kind in ("write", "delay", "drop"):
    assert doc["faults"][kind]["transfers"] >= 1, (kind, doc["faults"])
for side in ("context", "generation"):
    s = doc[side]
    assert s["peak_rss_kb"] > 0, s
    for gauge in ("sessions", "live_requests", "remembered_cancels", "transfers"):
        assert s["end"][gauge] == 0, (side, gauge, s["end"])
    assert s["end"]["regions"] == s["warmup"]["regions"] > 0, s
    assert s["end"]["peers"] == s["warmup"]["peers"] > 0, s
PY

set +e
out="$("$tool" demo --soak --soak_faults=meteor 2>/dev/null)"
status=$?
set -e
if [ "$status" -ne 2 ] || [ -n "$out" ]; then
  echo "FAIL: an unknown fault must exit 2 with an empty stdout (got $status, '$out')" >&2
  exit 1
fi
echo "PASS"
