"""Writes the digits example as a job folder with N trainers, each on a slice
of the digits (slice i % OF of OF), and the hyperparameters given as JSON.

usage: python3 scripts/digits_job.py OUT N OF '{"rounds": 1, ...}' [SOURCE]

SOURCE (default builtin://digits) is what the slices are taken from, e.g. a
CSV file of the digits under OUT ("digits.csv"), to read through the file path.
"""
import json
import os
import sys

out, n, of, hyper = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
source = sys.argv[5] if len(sys.argv) > 5 else "builtin://digits"
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "digits-two-tier")
for f in ("job.json", "schema.json"):
    with open(os.path.join(src, f)) as i, open(os.path.join(out, f), "w") as o:
        o.write(i.read())
with open(os.path.join(src, "modelSpec.json")) as f:
    spec = json.load(f)
spec["hyperparameters"].update(hyper)
with open(os.path.join(out, "modelSpec.json"), "w") as f:
    json.dump(spec, f)
refs = []
for i in range(n):
    ref = f"d{i}.json"
    refs.append(ref)
    with open(os.path.join(out, ref), "w") as f:
        json.dump({"name": ref, "url": f"{source}?part={i % of}&of={of}", "realm": "default"}, f)
with open(os.path.join(out, "dataSpec.json"), "w") as f:
    json.dump([{"role": "trainer", "datasetGroups": {"default": refs}}], f)
