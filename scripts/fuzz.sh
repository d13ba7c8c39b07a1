#!/usr/bin/env bash
# Fuzzes with cargo fuzz for a bounded time each (default 60 s): the definition
# parser, checks, expansion and planner (target `definition`), and what crosses
# the wire, commands, reports applied to a running job, model blobs (target
# `protocol`). Installs cargo-fuzz if missing.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --locked
# libFuzzer's instrumentation needs nightly flags: use a nightly toolchain
# when one is installed, else let the stable compiler accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
  sanitizer=address
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
  sanitizer=none
fi
mkdir -p corpus/definition corpus/protocol
# The fuzz target is outside the workspace: a compile error in it (our code)
# fails here, before a libFuzzer build that a machine may be unable to do.
cargo check --quiet
# A machine that cannot build libFuzzer targets at all is reported, not failed;
# a crash found by the fuzzer always fails.
for target in definition protocol; do
  if ! cargo "${toolchain[@]}" fuzz build --sanitizer "$sanitizer" "$target" >build.log 2>&1; then
    tail -n 20 build.log >&2
    echo "fuzz: the fuzz target $target could not be built on this machine (see above); fuzzing skipped" >&2
    exit 0
  fi
  echo "fuzz: $target for ${seconds} s"
  cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" seeds -- \
    -max_total_time="$seconds" -max_len=8192 -print_final_stats=1 2>&1 | tail -n 15
done
