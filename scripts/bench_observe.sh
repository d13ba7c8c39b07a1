#!/usr/bin/env bash
# What the observability projections cost a job (release build, embedded
# mode): a 20-round digits job run plain, with --mlflow (a real MLflow
# server, SQLite backend) and with --otlp (a stub OTLP receiver that only
# answers 200), 5 runs each, alternating. Prints the median wall time of each
# and the ratios to the plain run, then how long MLflow took to hold the
# job's run with its model registered after the job's last event.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
cargo build -q --release -p flamectl
ctl="$root/target/release/flamectl"
mlflow="$(bash scripts/mlflow-venv.sh)"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mport=$(free_port)
setsid "$mlflow" server --host 127.0.0.1 --port "$mport" --workers 1 --backend-store-uri "sqlite:///$work/mlflow.db" \
    --artifacts-destination "$work/artifacts" > "$work/mlflow.log" 2>&1 &
pids+=($!)
disown
oport=$(free_port)
python3 - "$oport" > /dev/null 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
disown
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$mport/health" > /dev/null && break; sleep 0.5; done

job="$work/job"
mkdir -p "$job"
cp examples/digits-two-tier/*.json "$job/"
python3 - "$job/modelSpec.json" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1])); spec["hyperparameters"]["rounds"] = 20; json.dump(spec, open(sys.argv[1], "w"))
PY

median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.2f}")' "$@"; }
timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }; e=$(date +%s.%N); python3 -c "print($e - $s)"; }
plain=(); with_mlflow=(); with_otlp=()
for i in 1 2 3 4 5; do
    plain+=("$(timed "$ctl" run "$job" --data-dir "$work/p$i")")
    with_mlflow+=("$(timed "$ctl" run "$job" --data-dir "$work/m$i" --mlflow "http://127.0.0.1:$mport")")
    with_otlp+=("$(timed "$ctl" run "$job" --data-dir "$work/o$i" --otlp "http://127.0.0.1:$oport")")
done
p=$(median "${plain[@]}"); m=$(median "${with_mlflow[@]}"); o=$(median "${with_otlp[@]}")
echo "20-round digits job, median of 5: plain ${p} s, --mlflow ${m} s ($(python3 -c "print(f'{$m/$p:.2f}')")x), --otlp ${o} s ($(python3 -c "print(f'{$o/$p:.2f}')")x)"
# A rebuild of one job's run from its log (nothing new to write): the cost of catching up.
s=$(date +%s.%N)
"$ctl" mlflow --url "http://127.0.0.1:$mport" --rebuild --store "sqlite:$work/m1/events.db" --blobs "$work/m1/blobs" 2> /dev/null
e=$(date +%s.%N)
echo "flamectl mlflow --rebuild of one 20-round job already in MLflow: $(python3 -c "print(f'{$e - $s:.2f}')") s"
