#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs libtorch and the test
# services if missing, builds once, starts NATS + SecantusDB on free loopback
# ports, runs every test, stops the services, and ends with one line
# "tests: N passed, N failed" (also left in target/test-summary.txt).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
# The aggregator-only worker (no libtorch) for the tests that use it; then the
# full build (test binaries and the binaries they start share it), which
# relinks the usual flame-worker.
cargo build -p flame-workers --no-default-features --bin flame-worker --quiet
cp target/debug/flame-worker target/debug/flame-worker-aggregator
cargo build --workspace --bins --tests --quiet
mkdir -p target
log="target/test-output.txt"
rc=0
bash scripts/services.sh run cargo test --workspace --lib --bins --tests --quiet -- --test-threads=2 "$@" 2>&1 | tee "$log" || rc=$?
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "tests: %d passed, %d failed\n", p, f }' "$log")
echo "$summary" | tee target/test-summary.txt
exit "$rc"
