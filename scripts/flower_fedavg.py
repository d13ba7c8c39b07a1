"""Times Flower's numpy FedAvg (`flwr.server.strategy.aggregate.aggregate`) on
K updates of P f32 parameters in 4 layers, as workers/benches/aggregate.rs
does for ours. Prints one JSON object: seconds per run and their median.

Usage: python flower_fedavg.py K P RUNS
"""

import json
import statistics
import sys
import time

import numpy as np
from flwr.server.strategy.aggregate import aggregate


def main() -> None:
    k, p, runs = (int(a) for a in sys.argv[1:4])
    rng = np.random.default_rng(1)
    sizes = [p // 4] * 3 + [p - 3 * (p // 4)]
    results = [
        ([rng.standard_normal(n, dtype=np.float32) for n in sizes], int(rng.integers(50, 500)))
        for _ in range(k)
    ]
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        out = aggregate(results)
        seconds.append(time.perf_counter() - started)
        assert sum(a.size for a in out) == p
    print(json.dumps({"k": k, "p": p, "seconds": seconds, "median_s": statistics.median(seconds)}))


if __name__ == "__main__":
    main()
