#!/usr/bin/env bash
# Benchmarks (release build) with the test services running.
#   scripts/bench.sh store     event store append/read throughput, SQLite and MongoDB
#   scripts/bench.sh rounds    engine overhead per round, 100 and 1,000 simulated workers on NATS
#   scripts/bench.sh flower    FedAvg vs Flower's numpy FedAvg and a memory-bandwidth baseline (flwr in .deps/flower)
#   scripts/bench.sh drift     FedAvg vs SCAFFOLD vs FedDyn on label-skewed digits (scripts/drift.sh)
#   scripts/bench.sh worker-rss  idle resident memory of flame-worker, full and aggregator-only (no libtorch) release builds
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
  worker-rss)
    cargo build -q --release -p flame-workers --no-default-features --bin flame-worker
    cp target/release/flame-worker target/release/flame-worker-aggregator
    cargo build -q --release -p flame-workers --bin flame-worker
    bash scripts/services.sh run bash scripts/worker-rss.sh ;;
  drift) bash scripts/drift.sh ;;
  *) echo "usage: $0 store|rounds|flower|drift|worker-rss" >&2; exit 2 ;;
esac
