#!/usr/bin/env bash
# A large model to many readers through the JetStream object store vs a plain
# loopback TCP copy of the same bytes (transport/examples/broadcast.rs), on a
# NATS server of its own whose JetStream data is removed afterwards.
#   FLAME_BENCH_MIB (default 1024)   model size
#   FLAME_BENCH_READERS (default 10) readers at once
#   FLAME_BENCH_BROADCAST_BIN        a broadcast example built already (then
#                                    nothing is built: for a machine without
#                                    Rust, with it and nats-server carried)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nats_bin="${FLAME_TEST_NATS_BIN:-$root/.deps/venv/bin/nats-server}"
bin="${FLAME_BENCH_BROADCAST_BIN:-}"
if [ -z "$bin" ]; then
    cargo build -q --release -p flame-transport --example broadcast
    bin=target/release/examples/broadcast
fi
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The server's default max_payload (1 MiB): the object store's chunks are 128 KiB.
"$nats_bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/js" > "$dir/nats.log" 2>&1 &
nats=$!
trap 'kill $nats 2>/dev/null; wait $nats 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
FLAME_BENCH_NATS_PID=$nats "$bin" "nats://127.0.0.1:$port" "${FLAME_BENCH_MIB:-1024}" "${FLAME_BENCH_READERS:-10}"
echo "nats-server peak RSS: $(awk '/VmHWM/ {printf "%.0f MB", $2/1024}' /proc/$nats/status)"
