#!/usr/bin/env bash
# README.md's "Integrating an engine" code block must be readme_example.cc's text
# between its README-BEGIN and README-END markers, character for character, so the
# README shows code that compiles and runs (readme_example_test).
set -euo pipefail
example=$1
readme=$2
expected=$(sed -n '/\/\/ README-BEGIN/,/\/\/ README-END/p' "$example" | sed '1d;$d')
first=$(printf '%s\n' "$expected" | head -1)
# The README block from the example's first line to the closing fence.
actual=$(awk -v first="$first" '
  inside && /^```/ { exit }
  inside { print }
  !inside && $0 == first { inside = 1; print }
' "$readme")
if [ "$actual" != "$expected" ]; then
  diff <(printf '%s\n' "$expected") <(printf '%s\n' "$actual") || true
  echo "README.md's example differs from transfer/transceiver/readme_example.cc"
  exit 1
fi
echo "README example in sync"
