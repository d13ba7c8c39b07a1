#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs libtorch and the test
# services if missing, builds once, starts NATS + SecantusDB on free loopback
# ports, runs every test, stops the services, and ends with one line
# "tests: N passed, N failed" (also left in target/test-summary.txt).
# It also installs PyTorch into .deps/torch for the parity tests (about
# 4.7 GB; FLAME_SKIP_TORCH=1 skips them).
#
# FLAME_CHECK_PATHS=1 (CI sets it) runs the tests as a fresh clone would
# (FLAME_EXAMPLES empty: no comparison with Flame's fixtures beside the
# repository) under strace, and fails if any test read a path outside the
# repository that a fresh clone does not have (scripts/check-paths.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
# PyTorch for the parity tests (the platform's models loaded and trained in
# PyTorch). FLAME_SKIP_TORCH=1 leaves it out: those tests then say they were skipped.
if [ -z "${FLAME_SKIP_TORCH:-}" ]; then
    FLAME_TORCH_PYTHON="$(bash scripts/torch-venv.sh)"
    export FLAME_TORCH_PYTHON
    # The Python SDK beside PyTorch, for the PyTorch trainer of examples/python-digits.
    bash scripts/sdk-venv.sh "$(dirname "$(dirname "$FLAME_TORCH_PYTHON")")" > /dev/null
fi
# The Python SDK as a user installs it (pip install ./sdk/python in a fresh
# venv), for the conformance suite and the jobs with Python trainers.
FLAME_SDK_BIN="$(bash scripts/sdk-venv.sh)"
export FLAME_SDK_BIN
# Google's dp-accounting, the reference the privacy accountant is checked against.
FLAME_DP_PYTHON="$(bash scripts/dp-venv.sh)"
export FLAME_DP_PYTHON
# A real MLflow tracking server, which the MLflow projection's tests start and read back.
FLAME_MLFLOW_BIN="$(bash scripts/mlflow-venv.sh)"
export FLAME_MLFLOW_BIN
# Headless Chromium and chromedriver, for the dashboard's test.
FLAME_CHROMEDRIVER="$(bash scripts/browser.sh)"
export FLAME_CHROMEDRIVER
# The aggregator-only worker (no libtorch) for the tests that use it; then the
# full build (test binaries and the binaries they start share it), which
# relinks the usual flame-worker.
cargo build -p flame-workers --no-default-features --bin flame-worker --quiet
cp target/debug/flame-worker target/debug/flame-worker-aggregator
cargo build --workspace --bins --tests --quiet
mkdir -p target
log="target/test-output.txt"
trace=()
if [ -n "${FLAME_CHECK_PATHS:-}" ]; then
    if ! command -v strace > /dev/null; then
        echo "test.sh: FLAME_CHECK_PATHS needs strace (apt-get install strace)" >&2
        exit 1
    fi
    export FLAME_EXAMPLES=""
    trace=(strace -f --seccomp-bpf -qq -y -e trace=%file -o target/test-paths.trace)
fi
rc=0
bash scripts/services.sh run "${trace[@]}" cargo test --workspace --lib --bins --tests --quiet -- --test-threads=2 "$@" 2>&1 | tee "$log" || rc=$?
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "tests: %d passed, %d failed\n", p, f }' "$log")
# Checks that could not run here say so (e.g. the comparison with Flame's fixtures in a clone).
grep -o '^skipped: .*\|[.]skipped: .*' "$log" | sed 's/^[.]*//' || true
if [ -n "${FLAME_CHECK_PATHS:-}" ]; then
    python3 scripts/check-paths.py target/test-paths.trace "$root" || rc=1
    rm -f target/test-paths.trace
fi
echo "$summary" | tee target/test-summary.txt
exit "$rc"
