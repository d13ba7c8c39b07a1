#!/usr/bin/env bash
# Idle resident memory of the two flame-worker builds (run by
# `scripts/bench.sh worker-rss`, inside `scripts/services.sh run` for NATS).
set -euo pipefail
for variant in "flame-worker trainer,aggregator" "flame-worker-aggregator aggregator"; do
  read -r bin roles <<<"$variant"
  "target/release/$bin" --nats "$FLAME_TEST_NATS_URL" --id "rss-$bin" --roles "$roles" 2>/dev/null &
  pid=$!
  sleep 8 # registered, heartbeating, waiting for commands
  rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  size=$(stat -c %s "target/release/$bin")
  torch=$(ldd "target/release/$bin" | grep -c torch || true)
  awk -v b="$bin" -v r="$rss_kb" -v s="$size" -v t="$torch" \
    'BEGIN { printf "%-24s idle RSS %6.1f MB   binary %5.1f MB   libtorch libraries linked: %d\n", b, r / 1024, s / 1048576, t }'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
