#!/usr/bin/env bash
# Installs the Debian 12 packages kvx builds and tests with. Idempotent and quiet:
# prints one line when it installs, nothing when everything is already there, and
# fails loudly (non-zero exit, apt's own message) when a package cannot be had.
set -euo pipefail

packages=(
  bazel-bootstrap bazel-rules-java bazel-platforms
  g++ clang libclang-rt-dev
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
  libfabric-dev libfabric-bin
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "kvx setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "kvx setup: apt-get failed (see above)" >&2
  exit 1
fi
rm -f "$log"
