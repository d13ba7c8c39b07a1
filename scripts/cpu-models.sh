#!/usr/bin/env bash
# Reproducibility across CPU models: runs the digits examples on this CPU and
# under qemu's user-mode emulation of other x86-64 CPU models (Intel and AMD,
# with and without AVX2/FMA), with native and with portable kernels, and
# prints each run's final model digest. With portable kernels every CPU model
# should end at the same digest (tests/tests/embedded.rs pins it); natively
# they differ in the last bits. Installs qemu-user if it is missing (root).
#   bash scripts/cpu-models.sh [example ...]   (default: digits-two-tier digits-cnn)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
command -v qemu-x86_64 > /dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user; }
bash scripts/setup-libtorch.sh
cargo build -q -p flamectl
examples=("$@")
[ ${#examples[@]} -gt 0 ] || examples=(digits-two-tier digits-cnn)
cpus=(host Nehalem Haswell Skylake-Client EPYC-Rome max)
# Set here rather than left to `--kernels portable`, which would start
# flamectl again outside the emulator (it must match PORTABLE_ENV in workers/src/kernels.rs).
portable=(ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41)
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
digest() {
    local cpu=$1 example=$2 kernels=$3
    local env=()
    [ "$kernels" = portable ] && env=("${portable[@]}")
    local run=(target/debug/flamectl run "examples/$example" -o json --kernels "$kernels" --data-dir "$data/run")
    [ "$cpu" = host ] || run=(qemu-x86_64 -cpu "$cpu" "${run[@]}")
    rm -rf "$data/run"
    env "${env[@]}" "${run[@]}" 2> /dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["final_model"][:16])'
}
printf '%-16s %-15s %-17s %s\n' example cpu native portable
for example in "${examples[@]}"; do
    for cpu in "${cpus[@]}"; do
        printf '%-16s %-15s %-17s %s\n' "$example" "$cpu" "$(digest "$cpu" "$example" native)" "$(digest "$cpu" "$example" portable)"
    done
done | tee "$data/table"
python3 - "$data/table" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
for ex in dict.fromkeys(r[0] for r in rows):
    mine = [r for r in rows if r[0] == ex]
    print(f"{ex}: {len({r[2] for r in mine})} native digest(s), {len({r[3] for r in mine})} portable digest(s) over {len(mine)} CPU models")
PY
