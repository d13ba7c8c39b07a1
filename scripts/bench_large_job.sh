#!/usr/bin/env bash
# A job whose model is about 1 GB, through the whole distributed path: flame-engine
# (SecantusDB and NATS from scripts/services.sh), an aggregator built without libtorch
# and FLAME_BENCH_TRAINERS (default 2) trainers, each a process of its own. The model
# is an MLP of 64 -> H -> H -> 10 on the digits (H = FLAME_BENCH_HIDDEN, default
# 16384: 270M parameters, 1.08 GB as safetensors); one round of one epoch on a few
# dozen digits per trainer (how fast a 1 GB MLP learns is not the point). Prints the
# job's wall time, each process's peak RSS (VmHWM) against the model's size, and what
# the download folders and the JetStream store hold at the end.
# FLAME_BENCH_VIRTUAL=C runs the trainers as one `flame-worker --virtual N` process
# that runs C of them at a time (each still a registered worker that reads the
# global model and writes its update through the object store): ten trainers of a
# 1 GB model, each needing two models' worth while it trains, do not fit beside one
# another on a 24 GB machine, but ten in turn do.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ "${1:-}" != inner ]; then
    bash scripts/setup-libtorch.sh
    bash scripts/services.sh install
    cargo build -q --release -p flame-workers --no-default-features --bin flame-worker
    cp target/release/flame-worker target/release/flame-worker-aggregator
    cargo build -q --release -p flame-workers --bin flame-worker
    cargo build -q --release -p flame-engine --bin flame-engine
    exec bash scripts/services.sh run bash "$0" inner
fi

trainers="${FLAME_BENCH_TRAINERS:-2}"
hidden="${FLAME_BENCH_HIDDEN:-16384}"
at_once="${FLAME_BENCH_VIRTUAL:-}"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
suffix=$(date +%s%N | tail -c 9)

mkdir -p "$work/job"
python3 scripts/digits_job.py "$work/job" "$trainers" 50 \
    "{\"rounds\": 1, \"epochs\": 1, \"hidden\": [$hidden, $hidden], \"learningRate\": 0.01, \"roundTimeout\": 7200}"
model_mb=$(python3 -c "h=$hidden; print(f'{(64*h + h + h*h + h + h*10 + 10) * 4 / 1e6:.1f}')")
how="each a process"
[ -n "$at_once" ] && how="virtual workers of one process, $at_once at a time"
echo "model: MLP 64 -> $hidden -> $hidden -> 10, $model_mb MB; $trainers trainers ($how), 1 round"

start_worker() { # program id roles [more flags]
    "$1" --nats "$FLAME_TEST_NATS_URL" --id "$2-$suffix" --roles "$3" --download-dir "$work/dl-$2" \
        --data-root "$work/job" "${@:4}" > "$work/$2.log" 2>&1 &
    pids+=($!)
    eval "pid_$2=$!"
}
start_worker target/release/flame-worker-aggregator agg aggregator
if [ -n "$at_once" ]; then
    start_worker target/release/flame-worker fleet trainer --virtual "$trainers" --concurrency "$at_once"
    until grep -q "virtual workers ready" "$work/fleet.log"; do
        kill -0 "$pid_fleet" 2>/dev/null || { echo "the virtual trainers stopped:"; tail -5 "$work/fleet.log"; exit 1; }
        sleep 0.2
    done
else
    for i in $(seq 0 $((trainers - 1))); do start_worker target/release/flame-worker "t$i" trainer; done
fi
s=$(date +%s.%N)
RUST_LOG=warn /usr/bin/time -f "%M" -o "$work/engine.rss" target/release/flame-engine run --mongo "$FLAME_TEST_MONGO_URI" \
    --db "bench_large_$suffix" --nats "$FLAME_TEST_NATS_URL" --job "$work/job" > "$work/summary.json" 2> "$work/engine.err" \
    || { echo "flame-engine failed:"; tail -20 "$work/engine.err"; tail -5 "$work"/*.log; exit 1; }
wall=$(python3 -c "print(f'{$(date +%s.%N) - $s:.1f}')")
python3 -c "import json; j = json.load(open('$work/summary.json')); print(f\"job {j['state']} in $wall s, {j['rounds_completed']} round(s), final model {j['final_model'][:16]}...\")"
# MB of 10^6 bytes, as the model's size (VmHWM and time's %M are in KiB).
rss() { awk '/VmHWM/ { printf "%.0f", $2 * 1024 / 1e6 }' "/proc/$1/status"; }
row() { printf "%-34s %8s MB  %5.1f models\n" "$1" "$2" "$(python3 -c "print($2 / max($model_mb, 0.1))")"; }
echo "peak RSS (model: $model_mb MB)"
row "flame-engine" "$(( $(cat "$work/engine.rss") * 1024 / 1000000 ))"
row "aggregator (no libtorch)" "$(rss "$pid_agg")"
if [ -n "$at_once" ]; then
    row "$trainers trainers, $at_once at a time" "$(rss "$pid_fleet")"
    echo "  commands done by the virtual trainers: $(grep 'command done' "$work/fleet.log" | grep -c 'failed=false' || true) (failed: $(grep 'command done' "$work/fleet.log" | grep -c 'failed=true' || true))"
else
    for i in $(seq 0 $((trainers - 1))); do v="pid_t$i"; row "trainer t$i" "$(rss "${!v}")"; done
fi
nats_port="${FLAME_TEST_NATS_URL##*:}"
nats_pid=$(ss -ltnpH "sport = :$nats_port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)
[ -n "$nats_pid" ] && row "nats-server (JetStream on disk)" "$(rss "$nats_pid")"
folded=$(grep -o 'updates=[0-9]*' "$work/agg.log" | tail -n 1 || true)
[ -n "$folded" ] && echo "the aggregator's fold: ${folded#updates=} updates from files"
echo "files left in the download folders: $(find "$work"/dl-* -type f ! -name .flame-worker.lock 2>/dev/null | wc -l) ($(du -sh "$work"/dl-* 2>/dev/null | awk '{print $1}' | paste -sd' '))"
