#!/usr/bin/env bash
# Benchmarks (release build) with the test services running.
#   scripts/bench.sh store     event store append/read throughput, SQLite and MongoDB
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
case "${1:-store}" in
  store) bash scripts/services.sh run cargo bench -q -p flame-events --bench store ;;
  *) echo "usage: $0 store" >&2; exit 2 ;;
esac
