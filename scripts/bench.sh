#!/usr/bin/env bash
# Benchmarks (release build) with the test services running.
#   scripts/bench.sh store     event store append/read throughput, SQLite and MongoDB
#   scripts/bench.sh rounds    engine overhead per round, 100 and 1,000 simulated workers on NATS
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
case "${1:-store}" in
  store) bash scripts/services.sh run cargo bench -q -p flame-events --bench store ;;
  rounds) bash scripts/services.sh run cargo bench -q -p flame-engine --bench rounds ;;
  *) echo "usage: $0 store|rounds" >&2; exit 2 ;;
esac
