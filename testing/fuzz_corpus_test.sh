#!/usr/bin/env bash
# fuzz_corpus_test.sh FUZZER CORPUS_DIR: replays a fuzz target's checked-in corpus
# (the fuzzer built without libFuzzer runs each file once; see fuzz_replay_main.cc).
set -euo pipefail
"$1" "$2"
