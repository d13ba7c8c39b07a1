#!/usr/bin/env bash
# Runs this example on one machine with nothing started by hand: a NATS
# server on a free loopback port (from .deps/venv, installed once), three
# Python trainers (flame-py-worker from .deps/sdk, `pip install ./sdk/python`
# into a fresh venv), and `flamectl run --nats`, whose in-process Rust worker
# aggregates. Everything it started stops when it ends. Extra arguments go to
# flamectl run (e.g. -o json).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/examples/python-digits"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
sdk="$(bash scripts/sdk-venv.sh)"
cargo build -q -p flamectl
tmp="$(mktemp -d -t flame-python-digits.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
port=$(.deps/venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.deps/venv/bin/nats-server -a 127.0.0.1 -p "$port" -js -sd "$tmp/js" >"$tmp/nats.log" 2>&1 &
pids+=($!)
nats="nats://127.0.0.1:$port"
for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
for site in 1 2 3; do
    FLAME_SDK_LOG=WARNING "$sdk/flame-py-worker" --nats "$nats" --id "py-site$site" --realm "default/site$site" \
        --trainer "$here/trainer.py:DigitsTrainer" 2>"$tmp/site$site.log" &
    pids+=($!)
done
target/debug/flamectl run "$here" --nats "$nats" "$@"
