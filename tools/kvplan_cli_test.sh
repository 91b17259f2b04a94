#!/usr/bin/env bash
# Runs the real kvplan binary: exit codes, stdout only on success, one line on
# stderr on failure, --help exits 0, input from stdin, "-" and a file.
set -uo pipefail

kvplan="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/kvplan"
example="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/examples/transfer_example.json"
fragments_example="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/examples/fragments_example.json"
tmp="${TEST_TMPDIR:-$(mktemp -d)}"
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# expect_ok NAME STDOUT_PATTERN ARGS... (stdin from $input)
expect_ok() {
  local name="$1" pattern="$2"
  shift 2
  printf '%s' "${input}" | "${kvplan}" "$@" >"${tmp}/out" 2>"${tmp}/err"
  local rc=$?
  [ "${rc}" -eq 0 ] || fail "${name}: exit ${rc}, stderr: $(cat "${tmp}/err")"
  [ -s "${tmp}/err" ] && fail "${name}: stderr not empty: $(cat "${tmp}/err")"
  grep -q -- "${pattern}" "${tmp}/out" || fail "${name}: stdout lacks ${pattern}: $(cat "${tmp}/out")"
}

# expect_error NAME STDERR_PATTERN ARGS... (stdin from $input)
expect_error() {
  local name="$1" pattern="$2"
  shift 2
  printf '%s' "${input}" | "${kvplan}" "$@" >"${tmp}/out" 2>"${tmp}/err"
  local rc=$?
  [ "${rc}" -eq 1 ] || fail "${name}: exit ${rc}, want 1"
  [ -s "${tmp}/out" ] && fail "${name}: stdout not empty: $(cat "${tmp}/out")"
  [ "$(wc -l <"${tmp}/err")" -eq 1 ] || fail "${name}: stderr is not one line: $(cat "${tmp}/err")"
  # One line for every reader: printable ASCII only (no \v, U+0085, U+2028).
  LC_ALL=C grep -q '[^ -~]' "${tmp}/err" && fail "${name}: stderr holds unprintable bytes: $(od -c "${tmp}/err" | head -3)"
  grep -q -- "${pattern}" "${tmp}/err" || fail "${name}: stderr lacks ${pattern}: $(cat "${tmp}/err")"
}

input='{"tokens_per_block": 8, "src": [10, 11, 12, 13], "dst": [22, 23], "src_start_token": 0, "dst_start_token": 16}'
expect_ok "align from stdin" '^{"src":\[12,13\],"dst":\[22,23\]}$' align
expect_ok "align from -" '"dst":\[22,23\]' align -
printf '%s' "${input}" >"${tmp}/align.json"
expect_ok "align from a file" '"src":\[12,13\]' align "${tmp}/align.json"
(cd "${tmp}" && BUILD_WORKING_DIRECTORY="${tmp}" "${kvplan}" align align.json >"${tmp}/out" 2>&1) ||
  fail "relative file under BUILD_WORKING_DIRECTORY: $(cat "${tmp}/out")"

input=''
expect_ok "transfer example" '"totals":{"total_blocks":64,"moved":28,"skipped_cached":12,"skipped_window":24' \
  transfer "${example}"
# TP2 -> TP4, 6 of 10 blocks move: per pair 6 blocks x 8 layers x K,V runs of 2 heads.
expect_ok "fragments example" '"totals":{"rank_pairs":4,"fragments_before_coalescing":384,"fragments_after_coalescing":384,"bytes":6291456}' \
  fragments "${fragments_example}"

input='{"tokens_per_block": 8, "prompt_len": 32, "windows": [null], "src": [[1, 2, 3, 4]], "dst": [[5, 6, 7, 8, 9, 10]]}'
expect_error "destination surplus of two" 'kvplan: pair: destination block list longer than its suffix' pair
input='{"tokens_per_block": 8, "prompt_len": 32, "windows": [null], "src": [[1, 2, 3, 4]], "dst": [[5, 6, 7, 8, 9]]}'
expect_ok "destination surplus of one" '"dst":\[5,6,7,8\]' pair
input='{"tokens_per_block": 8,'
expect_error "malformed JSON" 'kvplan: align: malformed JSON' align
input='{"tokens_per_block": -8}'
expect_error "negative tokens_per_block" 'tokens_per_block' align
input='{"tokens_per_block": 8, "prompt_len": 32, "token_range": [16, 16], "windows": [], "src": [], "dst": []}'
expect_error "empty token range" 'token_range' pair
input='{}'
expect_error "unknown command" 'unknown command: plan' plan
expect_error "missing command" 'missing command'
expect_error "unreadable file" 'cannot read' align "${tmp}/does-not-exist.json"
expect_error "two files" 'too many arguments' align a.json b.json

# Regression: issue 8, finding 6: untrusted text on the command line, and Abseil's
# built-in flags, which kvplan does not parse.
input='{}'
expect_error "newline in the command" 'unknown command: al\\nign' $'al\nign'
expect_error "newline in the file name" 'cannot read .*x\\ny.json' align "${tmp}/x"$'\n'"y.json"
expect_error "--only_check_args" 'unknown flag: --only_check_args' --only_check_args align
expect_error "--flagfile" 'unknown flag: --flagfile=/etc/passwd' --flagfile=/etc/passwd align
expect_error "--version" 'unknown flag: --version' --version
for flag in --helpon=kvplan --helpmatch=kvplan --helpfull -h; do
  "${kvplan}" "${flag}" >"${tmp}/out" 2>"${tmp}/err" || fail "${flag}: exit $?"
  [ -s "${tmp}/err" ] && fail "${flag}: stderr not empty"
  grep -q '^  fragments ' "${tmp}/out" || fail "${flag}: no usage on stdout"
done
printf '%s' '{"tokens_per_block": 8, "src": [], "dst": [], "src_start_token": 0, "dst_start_token": 0}' >"${tmp}/dash.json"
input=''
expect_ok "-- ends the options" '"src":\[\]' align -- "${tmp}/dash.json"

# Regression: issue 8, findings 1, 7 and 8.
input='{"tokens_per_block": 1e400}'
expect_error "number past double range" 'number overflow parsing' align
input=''
expect_error "unbounded input" 'input larger than max_bytes=16777216: /dev/zero' align /dev/zero
printf '{"tokens_per_block": 8, "src": [1], "dst": [2], "src_start_token": 0, "dst_start_token": 0}\0garbage' >"${tmp}/nul.json"
expect_error "NUL byte" 'NUL byte at offset=91' align "${tmp}/nul.json"

"${kvplan}" --help >"${tmp}/out" 2>"${tmp}/err" || fail "--help: exit $?"
grep -q 'transfer_example.json' "${tmp}/out" || fail "--help lacks the example"
grep -q 'fragments_example.json' "${tmp}/out" || fail "--help lacks the fragments example"
for command in align pair slice transfer fragments; do
  grep -q "^  ${command} " "${tmp}/out" || fail "--help lacks ${command}"
done

if [ "${failures}" -ne 0 ]; then
  echo "${failures} failure(s)" >&2
  exit 1
fi
echo PASS
