#!/usr/bin/env bash
# Runs the real kvx_keygen: a pair with the right modes whatever the umask, JSON on
# stdout, never replacing a key, one line on stderr and exit 1 on errors.
set -uo pipefail

keygen="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/kvx_keygen"
tmp="$(mktemp -d "${TEST_TMPDIR:-/tmp}/keygen.XXXXXX")"
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# expect_error NAME STDERR_PATTERN ARGS...
expect_error() {
  local name="$1" pattern="$2"
  shift 2
  "${keygen}" "$@" >"${tmp}/out" 2>"${tmp}/err"
  local rc=$?
  [ "${rc}" -eq 1 ] || fail "${name}: exit ${rc}, want 1"
  [ -s "${tmp}/out" ] && fail "${name}: stdout not empty: $(cat "${tmp}/out")"
  [ "$(wc -l <"${tmp}/err")" -eq 1 ] || fail "${name}: stderr is not one line: $(cat "${tmp}/err")"
  grep -q -- "${pattern}" "${tmp}/err" || fail "${name}: stderr lacks ${pattern}: $(cat "${tmp}/err")"
}

mkdir "${tmp}/keys"
(umask 000 && "${keygen}" --out_dir="${tmp}/keys" --name=decode-0 >"${tmp}/out" 2>"${tmp}/err")
rc=$?
[ "${rc}" -eq 0 ] || fail "first pair: exit ${rc}: $(cat "${tmp}/err")"
[ "$(stat -c %a "${tmp}/keys/decode-0.secret")" = 600 ] ||
  fail "secret mode $(stat -c %a "${tmp}/keys/decode-0.secret"), want 600"
[ "$(stat -c %a "${tmp}/keys/decode-0.pub")" = 644 ] ||
  fail "public mode $(stat -c %a "${tmp}/keys/decode-0.pub"), want 644"
public="$(grep -v '^#' "${tmp}/keys/decode-0.pub")"
[ "${#public}" -eq 40 ] || fail "public key is not 40 characters: ${public}"
grep -q -F -- "\"public_key\": \"${public}\"" "${tmp}/out" ||
  fail "stdout lacks the public key: $(cat "${tmp}/out")"
grep -q -F -- "\"secret_key_file\": \"${tmp}/keys/decode-0.secret\"" "${tmp}/out" ||
  fail "stdout lacks the secret key file: $(cat "${tmp}/out")"
grep -q -F -- "$(grep -v '^#' "${tmp}/keys/decode-0.secret")" "${tmp}/out" &&
  fail "stdout holds the secret key"

before="$(cat "${tmp}/keys/decode-0.secret")"
expect_error "existing key" "ALREADY_EXISTS" --out_dir="${tmp}/keys" --name=decode-0
[ "$(cat "${tmp}/keys/decode-0.secret")" = "${before}" ] || fail "existing secret replaced"

# bazel run: a relative --out_dir is the user's working directory's.
(cd / && BUILD_WORKING_DIRECTORY="${tmp}" "${keygen}" --out_dir=keys --name=prefill-0 \
  >"${tmp}/out" 2>"${tmp}/err") || fail "relative out_dir: $(cat "${tmp}/err")"
[ -f "${tmp}/keys/prefill-0.secret" ] || fail "relative out_dir: no ${tmp}/keys/prefill-0.secret"

expect_error "no flags" "required"
expect_error "no name" "required" --out_dir="${tmp}/keys"
expect_error "path in name" "INVALID_ARGUMENT" --out_dir="${tmp}/keys" --name=../x
expect_error "missing dir" "NOT_FOUND" --out_dir="${tmp}/nowhere" --name=x

[ "${failures}" -eq 0 ] || exit 1
echo PASS
