#!/usr/bin/env bash
# Runs `transceiver demo` briefly, as the README's main command does, over libfabric
# tcp (two child processes) and over loopback (one process), and checks its
# contract: exit 0, a table, and a last line that is a JSON document saying ok with
# no failed request; once more with CurveZMQ on (--curve_keys, keys from kvx_keygen).
# Then a bad flag or a missing key must exit 2 with nothing on stdout.
set -euo pipefail
tool="$1"
keygen="$2"
# The tool links ZeroMQ, which ThreadSanitizer cannot see into (//testing:tsan_options
# explains); harmless elsewhere.
export TSAN_OPTIONS="${TSAN_OPTIONS:-}:ignore_noninstrumented_modules=1"
small=(--requests=24 --max_prompt=512 --cancel_rate=0.2 --chunk_rate=0.3 --progress=false
       --request_timeout_s=30 --run_timeout_s=120)

check() {
  local name="$1" out="$2"
  echo "=== $name"
  echo "$out"
  grep -q "result: OK" <<<"$out" || { echo "FAIL: $name: no 'result: OK'" >&2; exit 1; }
  local json
  json="$(tail -n 1 <<<"$out")"
  python3 - "$json" <<'PY'
import json, sys
doc = json.loads(sys.argv[1])
assert doc["command"] == "demo", doc["command"]
assert doc["ok"] is True
for side in ("context", "generation"):
    s = doc[side]
    assert s["failed"] == 0 and s["mismatches"] == 0 and s["late_writes"] == 0, s
    assert s["succeeded"] + s["cancelled"] == s["requests"] == 24, s
assert doc["generation"]["bytes_checked"] > 0
PY
}

check "tcp, TP2 -> TP1 (defaults)" "$("$tool" demo "${small[@]}")"
check "loopback, TP1 PP2 -> TP2" \
  "$("$tool" demo --transport=loopback --context_tp=1 --context_pp=2 --context_layers_per_pp=3,1 \
     --generation_tp=2 "${small[@]}")"

keys="$TEST_TMPDIR/curve_keys"
mkdir -p "$keys"
for name in prefill decode; do "$keygen" --out_dir="$keys" --name="$name" >/dev/null; done
check "tcp with CurveZMQ, TP2 -> TP1" "$("$tool" demo --curve_keys="$keys" "${small[@]}")"

# must_refuse WHY FLAGS...: exit 2 with nothing on stdout, before any request.
must_refuse() {
  local why="$1" out status
  shift
  set +e
  out="$("$tool" demo "$@" 2>/dev/null)"
  status=$?
  set -e
  if [ "$status" -ne 2 ] || [ -n "$out" ]; then
    echo "FAIL: $why must exit 2 with an empty stdout (got $status, '$out')" >&2
    exit 1
  fi
}
must_refuse "an unsupported shape" --context_tp=3
rm "$keys/decode.secret"
must_refuse "a missing secret key" --curve_keys="$keys" "${small[@]}"
echo "PASS"
