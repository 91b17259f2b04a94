#!/usr/bin/env bash
# fuzz_seeds_test.sh GENERATOR: the generated seeds checked in under
# transfer/*_fuzzer_corpus (seed_*, hostile_*) are byte for byte what GENERATOR
# (//transfer:fuzz_seeds) writes now, and none is left over from an older one.
set -euo pipefail
out=$TEST_TMPDIR/seeds
corpora="protocol_fuzzer_corpus rank_info_fuzzer_corpus session_fuzzer_corpus"
for corpus in $corpora; do mkdir -p "$out/$corpus"; done
"$1" "$out" >/dev/null
status=0
for corpus in $corpora; do
  for generated in "$out/$corpus"/*; do
    name=$(basename "$generated")
    if ! cmp -s "$generated" "transfer/$corpus/$name"; then
      echo "stale or missing: transfer/$corpus/$name"
      status=1
    fi
  done
  for checked_in in "transfer/$corpus"/seed_* "transfer/$corpus"/hostile_*; do
    [ -e "$checked_in" ] || continue
    if [ ! -e "$out/$corpus/$(basename "$checked_in")" ]; then
      echo "no longer generated: $checked_in"
      status=1
    fi
  done
done
if [ "$status" -ne 0 ]; then
  echo "regenerate them: bazel run //transfer:fuzz_seeds -- \"\$PWD/transfer\""
fi
exit "$status"
