#!/usr/bin/env bash
# Rounds at many clients (release build): for each N in FLAME_BENCH_CLIENTS
# (default "10 20 100 1000 10000"), a fresh NATS server (JetStream), one
# `flame-worker --virtual N` process holding the N trainers, and
# `flamectl run --nats` driving a digits job of N trainers (the aggregator in
# flamectl's process, events in SQLite). Every command and report goes
# through JetStream, every model through the object store. Prints, per N:
# how long the fleet took to register, the median ms per round (RoundStarted
# to RoundAggregated, rounds 2..R), the whole job's wall time and the
# fleet's peak RSS.
# Then, for each N in FLAME_BENCH_FLOWER (default "10 20"; empty: skipped),
# Flower 1.42's deployment engine on the same machine: one SuperLink, N
# SuperNodes (processes), and a Flower App whose ClientApp returns what it
# was sent (scripts/flower_deploy; flwr in .deps/flower), timing each round
# in its ServerApp; prints the median ms per round (rounds 2..R) and the
# ratio to ours at the same N.
# FLAME_BENCH_CONCURRENCY (default 64) is the fleet's --concurrency: commands
# running at once in it (64 made 1,000-client rounds 1.5x faster than 16,
# docs/benchmarks.md).
# FLAME_BENCH_DATA=csv has the trainers read the digits from a CSV file in the
# job's folder (a file each trainer parses, or the fleet parses once: see
# FLAME_DATASETS_IN_MEMORY_MB) instead of the built-in copy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
cargo build -q --release -p flamectl
# FLAME_BENCH_WORKER: a flame-worker built already (to compare two builds in one session).
worker="${FLAME_BENCH_WORKER:-}"
if [ -z "$worker" ]; then
    cargo build -q --release -p flame-workers --bin flame-worker
    worker="$root/target/release/flame-worker"
fi
ctl="$root/target/release/flamectl"
nats_bin="$root/.deps/venv/bin/nats-server"
rounds="${FLAME_BENCH_ROUNDS:-6}"
work=$(mktemp -d)
real_home="$HOME"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

declare -A ours
for n in ${FLAME_BENCH_CLIENTS-10 20 100 1000 10000}; do
    dir="$work/n$n"
    mkdir -p "$dir/js" "$dir/job"
    # The digits job with N trainers on slices of the digits (at most 500
    # distinct slices: beyond that, clients share them, each slice >= 2 rows).
    source=builtin://digits
    if [ "${FLAME_BENCH_DATA:-}" = csv ]; then
        # The pixels scaled to 0..1 as the built-in copy is; the label last.
        gzip -dc workers/data/digits.csv.gz | awk -F, -v OFS=, '{ for (i = 1; i < NF; i++) $i = $i / 16; print }' > "$dir/job/digits.csv"
        source=digits.csv
    fi
    python3 scripts/digits_job.py "$dir/job" "$n" "$(( n < 500 ? n : 500 ))" "{\"rounds\": $rounds, \"epochs\": 1}" "$source"
    port=$(free_port)
    "$nats_bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/js" > "$dir/nats.log" 2>&1 &
    pids+=($!)
    url="nats://127.0.0.1:$port"
    for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    s=$(date +%s.%N)
    RUST_LOG="warn,flame_workers::fleet=info" "$worker" --nats "$url" --id sim --virtual "$n" --roles trainer \
        --concurrency "${FLAME_BENCH_CONCURRENCY:-64}" --data-root "$dir/job" > "$dir/fleet.log" 2>&1 &
    fleet=$!
    pids+=($fleet)
    until grep -q "virtual workers ready" "$dir/fleet.log"; do
        kill -0 "$fleet" 2>/dev/null || { cat "$dir/fleet.log"; exit 1; }
        sleep 0.2
    done
    ready=$(python3 -c "print(f'{$(date +%s.%N) - $s:.1f}')")
    s=$(date +%s.%N)
    RUST_LOG="${FLAME_BENCH_LOG:-warn}" /usr/bin/time -f "ctl_cpu=%U+%S" -o "$dir/ctl.time" "$ctl" run "$dir/job" --nats "$url" --data-dir "$dir/data" -o json \
        > "$dir/run.json" 2> "$dir/run.err" || { echo "flamectl run failed ($dir/run.err):"; tail -20 "$dir/run.err"; tail -5 "$dir/fleet.log"; [ -n "${FLAME_BENCH_KEEP:-}" ] && cp -r "$dir" "$FLAME_BENCH_KEEP/"; exit 1; }
    ctl_cpu=$(python3 -c "import re; u, s = re.search(r'ctl_cpu=([\d.]+)\+([\d.]+)', open('$dir/ctl.time').read()).groups(); print(f'{float(u) + float(s):.1f}')")
    wall=$(python3 -c "print(f'{$(date +%s.%N) - $s:.1f}')")
    rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$fleet/status")
    # CPU seconds the fleet and the NATS server used over the whole run (flamectl's are in run.err's timing below).
    cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat"; }
    fleet_cpu=$(cpu "$fleet"); nats_cpu=$(cpu "${pids[-2]}")
    kill "$fleet" 2>/dev/null || true
    wait "$fleet" 2>/dev/null || true
    kill "${pids[-2]}" 2>/dev/null || true
    line=$(python3 - "$dir/data/events.db" "$n" "$ready" "$wall" "$rss" "$fleet_cpu" "$nats_cpu" "$ctl_cpu" <<'PY'
import datetime, json, sqlite3, statistics, sys
db, n, ready, wall, rss, fleet_cpu, nats_cpu, ctl_cpu = sys.argv[1:]
con = sqlite3.connect(db)
started, aggregated = {}, {}
for kind, payload, at in con.execute("SELECT event_type, payload, recorded_at FROM events WHERE event_type IN ('RoundStarted', 'RoundAggregated')"):
    r = json.loads(payload)["round"]
    t = datetime.datetime.fromisoformat(at).timestamp()
    (started if kind == "RoundStarted" else aggregated)[r] = t
ms = [1000 * (aggregated[r] - started[r]) for r in sorted(aggregated) if r >= 2 and r in started]
print(f"flame clients={n} ms_per_round={statistics.median(ms):.1f} (min {min(ms):.1f}, max {max(ms):.1f}, rounds 2..{max(aggregated)}) fleet_ready_s={ready} job_wall_s={wall} fleet_peak_rss_mb={rss} cpu_s: fleet={fleet_cpu} nats={nats_cpu} flamectl={ctl_cpu}")
PY
)
    echo "$line"
    ours[$n]=$(echo "$line" | sed -n 's/.*ms_per_round=\([0-9.]*\).*/\1/p')
    [ -n "${FLAME_BENCH_KEEP:-}" ] && cp -r "$dir" "$FLAME_BENCH_KEEP/"
    rm -rf "$dir"
done

flower_nodes="${FLAME_BENCH_FLOWER-10 20}"
[ -n "$flower_nodes" ] || exit 0
if [ ! -x .deps/flower/bin/flwr ] || ! .deps/flower/bin/python -c 'import flwr, numpy' 2>/dev/null; then
    python3 -m venv .deps/flower
    .deps/flower/bin/pip install -q "flwr==1.42.*" numpy
fi
flower_rounds="${FLAME_BENCH_FLOWER_ROUNDS:-4}"
for n in $flower_nodes; do
    dir="$work/flower$n"
    mkdir -p "$dir/home/.flwr"
    cp -r scripts/flower_deploy "$dir/app"
    port=$(free_port)
    printf '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$port" > "$dir/home/.flwr/config.toml"
    export HOME="$dir/home" PATH="$root/.deps/flower/bin:$PATH"
    flower-superlink --insecure --port "$port" > "$dir/superlink.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    for i in $(seq 0 $((n - 1))); do
        flower-supernode --insecure --superlink "127.0.0.1:$port" --port "$(free_port)" --node-config "partition-id=$i num-partitions=$n" \
            > "$dir/node$i.log" 2>&1 &
        pids+=($!)
    done
    # The ServerApp appends its round lines to rounds.txt: the bench waits for them there
    # (for at most FLAME_BENCH_FLOWER_WAIT seconds), not on `flwr run --stream`'s log,
    # which may reconnect under load and miss them while the rounds go on.
    : > "$dir/rounds.txt"
    (cd "$dir/app" && flwr run . bench --run-config "num-nodes=$n num-server-rounds=$flower_rounds out-file=\"$dir/rounds.txt\"" --stream) > "$dir/run.log" 2>&1 || true
    waited=0
    while [ "$(grep -c flower_round= "$dir/rounds.txt")" -lt "$flower_rounds" ] && [ "$waited" -lt "${FLAME_BENCH_FLOWER_WAIT:-1200}" ]; do
        sleep 5; waited=$((waited + 5))
    done
    python3 - "$dir/rounds.txt" "$n" "${ours[$n]:-}" "$dir/run.log" <<'PY'
import re, statistics, sys
log, n, ours, run_log = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ms = {int(r): float(m) for r, m, k in re.findall(r"flower_round=(\d+) ms=([\d.]+) replies=(\d+)", open(log).read()) if int(k) == int(n)}
later = [m for r, m in ms.items() if r >= 2]
if not later:
    sys.exit(f"Flower with {n} SuperNodes finished no round after the first with every reply; rounds: {open(log).read()!r}; see {run_log}:\n" + open(run_log).read()[-3000:])
med = statistics.median(later)
ratio = f" ratio={med / float(ours):.0f}x (Flower / flame at {n} clients)" if ours else ""
print(f"flower supernodes={n} ms_per_round={med:.0f} (min {min(later):.0f}, max {max(later):.0f}, rounds 2..{max(ms)}){ratio}")
PY
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pids=()
    pkill -f "flwr-serverapp|flwr-clientapp|flower-superexec" 2>/dev/null || true
    export HOME="$real_home"
done
