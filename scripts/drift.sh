#!/usr/bin/env bash
# Client drift on label-skewed data: runs examples/scaffold-digits (four
# trainers, Dirichlet(0.2) label skew) with FedAvg, SCAFFOLD and FedDyn (the
# same data, model, seeds and rounds; only the optimizer differs) through
# `flamectl run`, and prints each round's test accuracy and loss side by side.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build -q --release -p flamectl
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for opt in fedavg scaffold feddyn; do
  cp -r examples/scaffold-digits "$work/$opt"
  python3 - "$work/$opt/modelSpec.json" "$opt" <<'PY'
import json, sys
path, opt = sys.argv[1], sys.argv[2]
spec = json.load(open(path))
spec["optimizer"] = {"sort": opt, "kwargs": {"alpha": 0.01} if opt == "feddyn" else {}}
json.dump(spec, open(path, "w"))
PY
  target/release/flamectl run "$work/$opt" -o json --data-dir "$work/data-$opt" > "$work/$opt.json"
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
runs = {o: json.load(open(f"{work}/{o}.json")) for o in ["fedavg", "scaffold", "feddyn"]}
print("| round | FedAvg acc | SCAFFOLD acc | FedDyn acc | FedAvg loss | SCAFFOLD loss | FedDyn loss |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for i in range(len(runs["fedavg"]["rounds"])):
    m = [runs[o]["rounds"][i]["metrics"] for o in runs]
    print(f"| {i + 1} | " + " | ".join(f"{x['accuracy']:.4f}" for x in m) + " | " + " | ".join(f"{x['loss']:.4f}" for x in m) + " |")
PY
