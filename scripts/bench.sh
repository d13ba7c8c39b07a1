#!/usr/bin/env bash
# Benchmarks (release build) with the test services running.
#   scripts/bench.sh store     event store append/read throughput, SQLite and MongoDB
#   scripts/bench.sh rounds    engine overhead per round, 100 and 1,000 simulated workers on NATS
#   scripts/bench.sh flower    FedAvg vs Flower's numpy FedAvg and a memory-bandwidth baseline (flwr in .deps/flower)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
case "${1:-store}" in
  store) bash scripts/services.sh run cargo bench -q -p flame-events --bench store ;;
  rounds) bash scripts/services.sh run cargo bench -q -p flame-engine --bench rounds ;;
  flower)
    # Flower is installed for this benchmark only, in its own venv.
    if [ ! -x .deps/flower/bin/python ] || ! .deps/flower/bin/python -c 'import flwr' 2>/dev/null; then
      python3 -m venv .deps/flower
      .deps/flower/bin/pip install -q flwr numpy
    fi
    FLOWER_PYTHON="$root/.deps/flower/bin/python" cargo bench -q -p flame-workers --bench aggregate ;;
  *) echo "usage: $0 store|rounds|flower" >&2; exit 2 ;;
esac
