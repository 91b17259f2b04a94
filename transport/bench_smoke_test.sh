#!/bin/sh
# Runs //transport:bench briefly for every provider and mode so it does not rot.
set -eu
bench="$1"
tiny="--sizes=4096,65536 --bytes_per_size=1048576 --buffer_bytes=4194304 --scatter_count=16 --repeat=1"
"$bench" --provider=loopback $tiny
"$bench" --provider=tcp $tiny
"$bench" --provider=tcp --mode=baseline $tiny
if "$bench" --provider=shm $tiny >/dev/null 2>&1; then
  "$bench" --provider=shm --mode=baseline $tiny
else
  echo "shm unavailable here, skipped: $("$bench" --provider=shm $tiny 2>&1 | tail -1)"
fi
