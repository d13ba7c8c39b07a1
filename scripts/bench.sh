#!/usr/bin/env bash
# Benchmarks (release build) with the test services running.
#   scripts/bench.sh store     event store append/read throughput, SQLite and MongoDB
#   scripts/bench.sh kill      how long MongoDB appends and global reads stall after a writer is SIGKILLed mid-append
#   scripts/bench.sh rounds    engine overhead per round, 100 and 1,000 simulated workers on NATS (a consumer each, then in groups of 500)
#   scripts/bench.sh flower    FedAvg vs Flower's numpy FedAvg and a memory-bandwidth baseline (flwr in .deps/flower)
#   scripts/bench.sh drift     FedAvg vs SCAFFOLD vs FedDyn on label-skewed digits (scripts/drift.sh)
#   scripts/bench.sh kernels   training time and result, native vs portable CPU kernels (5 runs each, alternating)
#   scripts/bench.sh torchscript  training throughput of a TorchScript module: the worker's loop vs PyTorch's Python loop (5 runs each, alternating)
#   scripts/bench.sh worker-rss  idle resident memory of flame-worker, full and aggregator-only (no libtorch) release builds
#   scripts/bench.sh python    per-round overhead and idle memory of Python trainers (flame-py-worker) vs Rust ones, same job
#   scripts/bench.sh models    verify --models and whatif on a 100-round job; contributions (Shapley) cost vs trainers
#   scripts/bench.sh observe   what --mlflow and --otlp add to a 20-round job's wall time (scripts/bench_observe.sh)
#   scripts/bench.sh aggregate-memory  peak RSS of an aggregator: FedAvg of 10 and 100 updates of 10M params and 4 of 100M (from their bytes, and from files); median and Krum of 100 x 10M, on disk and in memory
#   scripts/bench.sh broadcast  a 1 GB model to 10 readers through the object store vs a loopback TCP copy (into memory, and into memory and a file): throughput, peak RSS (scripts/bench_broadcast.sh)
#   scripts/bench.sh large-job  a job of a 1 GB model through engine, aggregator and trainers, each a process: peak RSS of each (scripts/bench_large_job.sh)
#   scripts/bench.sh clients   ms per round at 10 to 10,000 clients (flame-worker --virtual, real NATS) and Flower's deployment engine at 10 and 20 (scripts/bench_clients.sh)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
case "${1:-store}" in
  store) bash scripts/services.sh run cargo bench -q -p flame-stores --bench store ;;
  kill) bash scripts/services.sh run cargo bench -q -p flame-stores --bench kill ;;
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
  python) bash scripts/bench_python.sh ;;
  models) bash scripts/bench_models.sh ;;
  observe) bash scripts/bench_observe.sh ;;
  clients) bash scripts/bench_clients.sh ;;
  broadcast) bash scripts/bench_broadcast.sh ;;
  large-job) bash scripts/bench_large_job.sh ;;
  aggregate-memory)
    cargo build -q --release -p flame-workers --no-default-features --bench aggregate_memory
    bench=$(ls -t target/release/deps/aggregate_memory-* | grep -v '\.d$' | head -n 1)
    # FedAvg folds; median and Krum hold every update: on disk over 1,024 MB (the default), in memory with 8,000;
    # SCAFFOLD and FedDyn fold each update with its trainer's state, FedBuff with its base model (20 and 60 updates: flat).
    for run in "10 10000000" "100 10000000" "4 100000000" "4 100000000 fedavg 0" \
      "100 10000000 median" "100 10000000 median 8000" "100 10000000 krum" "100 10000000 krum 8000" \
      "20 10000000 scaffold" "60 10000000 scaffold" "20 10000000 feddyn" "20 10000000 fedbuff" "60 10000000 fedbuff"; do
      "$bench" $run
    done ;;
  kernels)
    cargo build -q --release -p flame-workers --bench kernels
    bench=$(ls -t target/release/deps/kernels-* | grep -v '\.d$' | head -n 1)
    for i in 1 2 3 4 5; do
      for k in native portable; do FLAME_KERNELS=$k "$bench"; done
    done | tee target/bench-kernels.txt
    python3 - target/bench-kernels.txt <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f = dict(kv.split("=", 1) for kv in line.split())
    runs.setdefault((f["model"], f["kernels"]), []).append((float(f["seconds"]), f["digest"]))
for model in sorted({m for m, _ in runs}):
    n, p = runs[(model, "native")], runs[(model, "portable")]
    mn, mp = statistics.median(s for s, _ in n), statistics.median(s for s, _ in p)
    same = lambda r: len({d for _, d in r}) == 1
    print(f"{model}: native {mn:.3f} s, portable {mp:.3f} s (x{mp / mn:.2f}); digests stable across runs: native {same(n)}, portable {same(p)}")
PY
    ;;
  torchscript)
    # The example's CNN with BatchNorm on its digits images, 20 epochs of batch 32 per run.
    py="$(bash scripts/torch-venv.sh)"
    cargo build -q --release -p flame-workers --bench torchscript
    bench=$(ls -t target/release/deps/torchscript-* | grep -v '\.d$' | head -n 1)
    ex=examples/torchscript-digits
    for i in 1 2 3 4 5; do
      "$bench" "$ex/model.pt" "$ex/digits.npz" 20 32
      "$py" scripts/bench_torchscript.py "$ex/model.pt" "$ex/digits.npz" 20 32
    done | tee target/bench-torchscript.txt
    python3 - target/bench-torchscript.txt <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f = dict(kv.split("=", 1) for kv in line.split())
    runs.setdefault(f["loop"], []).append(float(f["samples_per_s"]))
r, p = statistics.median(runs["rust"]), statistics.median(runs["python"])
print(f"worker (tch) {r:.0f} samples/s, PyTorch's Python loop {p:.0f} samples/s: ratio {r / p:.2f} (medians of {len(runs['rust'])} alternating runs)")
PY
    ;;
  *) echo "usage: $0 store|kill|rounds|flower|drift|kernels|torchscript|worker-rss|python|models|observe|aggregate-memory|broadcast|large-job|clients" >&2; exit 2 ;;
esac
