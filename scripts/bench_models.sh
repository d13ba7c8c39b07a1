#!/usr/bin/env bash
# What the log makes possible, timed (release build, embedded mode):
# - verify --models and whatif (median) on a 100-round digits job (3 trainers);
# - contributions on 5-round digits jobs of 3, 6, 8 and 12 trainers (exact
#   Shapley up to 6 trainers a round, GTG-Shapley above): models aggregated
#   and evaluated, and seconds.
# Each timing is the median of 3 runs. Prints one line per figure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build -q --release -p flamectl
ctl="$root/target/release/flamectl"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A digits job folder with `trainers` trainers and `rounds` rounds.
make_job() {
    local dir=$1 trainers=$2 rounds=$3
    mkdir -p "$dir"
    cp examples/digits-two-tier/{job.json,schema.json} "$dir/"
    python3 - "$dir" "$trainers" "$rounds" <<'PY'
import json, sys, pathlib
d, n, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
spec = json.load(open("examples/digits-two-tier/modelSpec.json"))
spec["hyperparameters"]["rounds"] = rounds
json.dump(spec, open(d / "modelSpec.json", "w"))
data = json.load(open("examples/digits-two-tier/dataSpec.json"))
group = next(iter(data[0]["datasetGroups"]))
files = []
for i in range(n):
    name = f"dataset{i + 1}.json"
    json.dump({"name": f"digits part {i + 1} of {n}", "url": f"builtin://digits?part={i}&of={n}", "realm": "default"}, open(d / name, "w"))
    files.append(name)
data[0]["datasetGroups"][group] = files
json.dump(data, open(d / "dataSpec.json", "w"))
PY
}

median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.2f}")' "$@"; }
timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }; e=$(date +%s.%N); python3 -c "print($e - $s)"; }

make_job "$work/j100" 3 100
"$ctl" run "$work/j100" --data-dir "$work/d100" -o json > "$work/run100.json"
job=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job_id"])' "$work/run100.json")
run_s=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["elapsed_s"], 2))' "$work/run100.json")
src=(--store "sqlite:$work/d100/events.db" --blobs "$work/d100/blobs")
v=(); w=()
for i in 1 2 3; do
    v+=("$(timed "$ctl" verify "$job" --models "${src[@]}")")
    w+=("$(timed "$ctl" whatif "$job" --optimizer median "${src[@]}")")
done
echo "100-round job (3 trainers): run ${run_s} s; verify --models $(median "${v[@]}") s; whatif --optimizer median (with evaluation) $(median "${w[@]}") s"

for n in 3 6 8 12; do
    make_job "$work/c$n" "$n" 5
    "$ctl" run "$work/c$n" --data-dir "$work/dc$n" -o json > "$work/c$n.json"
    job=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job_id"])' "$work/c$n.json")
    t=()
    for i in 1 2 3; do
        t+=("$(timed "$ctl" contributions "$job" --store "sqlite:$work/dc$n/events.db" --blobs "$work/dc$n/blobs")")
    done
    evals=$(grep -o "[0-9]* models aggregated and evaluated ([0-9]* permutations" "$work/err" | head -1)
    echo "contributions, $n trainers, 5 rounds: $(median "${t[@]}") s; $evals sampled)"
done
