#!/usr/bin/env bash
# The long chaos soak (issue 17, part 3): 30 jobs of four kinds on three engine
# replicas and eight workers while a seeded schedule SIGKILLs engines and
# workers, restarts NATS and the MongoDB-wire server; checks every job's
# invariants and prints the figures. The short version (6 jobs) runs in
# scripts/test.sh. Knobs: FLAME_SOAK_JOBS, FLAME_SOAK_ROUNDS, FLAME_SOAK_SEED,
# FLAME_SOAK_MINUTES.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-libtorch.sh
bash scripts/services.sh install
cargo build -q --workspace --bins
export FLAME_SOAK_JOBS="${FLAME_SOAK_JOBS:-30}" FLAME_SOAK_MINUTES="${FLAME_SOAK_MINUTES:-30}"
bash scripts/services.sh run cargo test -q -p flame-tests --test tests chaos_soak -- --nocapture
