#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs libtorch and the test
# services if missing, builds once, starts NATS + SecantusDB on free loopback
# ports, runs every test, and stops the services.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
# Test binaries and the binaries they start share one build.
cargo build --workspace --bins --tests --quiet
bash scripts/services.sh run cargo test --workspace --quiet -- --test-threads=2 "$@"
