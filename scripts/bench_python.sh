#!/usr/bin/env bash
# Per-round overhead of Python trainers (flame-py-worker) vs Rust trainers
# (flame-worker) on the same tiny job, and their idle memory (run by
# `scripts/bench.sh python`). The job: the built-in MLP 64-32-10 on 3 tiny
# shards of the digits (48 rows each, 1 epoch), 20 rounds, the Rust aggregator
# inside `flamectl run --nats`; only the trainers differ. 3 runs of each,
# alternating, each on a fresh NATS server; per run the median of rounds 2-20.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
sdk="$(bash scripts/sdk-venv.sh)"
cargo build -q --release -p flamectl -p flame-workers --bin flamectl --bin flame-worker
tmp="$(mktemp -d -t flame-bench-python.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
job="$tmp/job"
mkdir -p "$job"
cp examples/python-digits/{job.json,schema.json,dataSpec.json} "$job/"
npz="$root/examples/torchscript-digits/digits.npz"
for i in 1 2 3; do
  sed "s#\"url\": \"../torchscript-digits/digits.npz?part=[0-9]&of=3\"#\"url\": \"$npz?part=$((i - 1))\&of=30\"#" \
    examples/python-digits/dataset$i.json > "$job/dataset$i.json"
done
cat > "$job/modelSpec.json" <<'JSON'
{
  "baseModel": { "name": "mlp" },
  "optimizer": { "sort": "fedavg", "kwargs": {} },
  "selector": { "sort": "default", "kwargs": {} },
  "hyperparameters": { "rounds": 20, "epochs": 1, "batchSize": 32, "learningRate": 0.1, "hidden": [32], "seed": 1 }
}
JSON
free_port() { .deps/venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_nats() {
  local port; port=$(free_port)
  rm -rf "$tmp/js"
  .deps/venv/bin/nats-server -a 127.0.0.1 -p "$port" -js -sd "$tmp/js" > /dev/null 2>&1 &
  nats_pid=$!
  nats="nats://127.0.0.1:$port"
  for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}
worker() { # kind id site
  if [ "$1" = rust ]; then
    RUST_LOG=error target/release/flame-worker --nats "$nats" --id "$2" --roles trainer --realm "default/site$3" &
  else
    FLAME_SDK_LOG=ERROR "$sdk/flame-py-worker" --nats "$nats" --id "$2" --realm "default/site$3" \
      --trainer "$root/examples/python-digits/trainer.py:DigitsTrainer" &
  fi
}
out="$root/target/bench-python.txt"
: > "$out"
for run in 1 2 3; do
  for kind in rust python; do
    start_nats
    pids=()
    for site in 1 2 3; do worker "$kind" "$kind-$run-$site" "$site"; pids+=($!); done
    sleep 2
    RUST_LOG=error target/release/flamectl run "$job" --nats "$nats" --data-dir "$tmp/data-$kind-$run" -o json > "$tmp/summary.json"
    python3 - "$tmp/summary.json" "$kind" <<'PY' | tee -a "$out"
import json, statistics, sys
s = json.load(open(sys.argv[1]))
assert s["state"] == "completed", s
from datetime import datetime
def t(x): return datetime.fromisoformat(x.replace("Z", "+00:00"))
secs = [(t(r["closed_at"]) - t(r["started_at"])).total_seconds() for r in s["rounds"]][1:]
print(f"kind={sys.argv[2]} median_round_s={statistics.median(secs):.4f} rounds={len(secs)} accuracy={s['metrics'].get('accuracy', 0):.4f}")
PY
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    kill "$nats_pid"; wait "$nats_pid" 2>/dev/null || true
  done
done
# Idle memory: registered, heartbeating, no job, read 8 s after start.
start_nats
for kind in rust python; do
  worker "$kind" "idle-$kind" 1
  pid=$!
  sleep 8
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  # flame-py-worker is a console script: its process is the Python interpreter.
  echo "kind=$kind idle_rss_mb=$(awk -v r="$rss" 'BEGIN { printf "%.1f", r / 1024 }')" | tee -a "$out"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
done
python3 - "$out" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in open(sys.argv[1])]
med = {k: statistics.median(float(r["median_round_s"]) for r in rows if r.get("kind") == k and "median_round_s" in r) for k in ("rust", "python")}
print(f"per round (median of 3 runs' medians): Rust trainers {med['rust'] * 1000:.1f} ms, Python trainers {med['python'] * 1000:.1f} ms (x{med['python'] / med['rust']:.2f})")
PY
