"""Writes the regression example: model.pt, a small PyTorch MLP with one
output saved as TorchScript, and a table of 1,500 rows (8 numeric features
and a price) as table.csv (with a header) and table.parquet; sites 1 and 3
read the Parquet file, site 2 the CSV, each its part of the rows.

    .deps/torch/bin/python examples/torchscript-regression/make_model.py
"""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

here = os.path.dirname(os.path.abspath(__file__))


class Regressor(nn.Module):
    def __init__(self, features: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


torch.manual_seed(0)
model = torch.jit.script(Regressor())
model.save(os.path.join(here, "model.pt"))

# A made-up housing table: standardized features, a price that depends on them
# non-linearly, plus noise.
rng = np.random.default_rng(0)
n = 1500
x = rng.standard_normal((n, 8)).astype(np.float32)
price = 2.0 + 1.5 * x[:, 0] - 0.8 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + np.tanh(x[:, 4]) + 0.1 * rng.standard_normal(n)
names = ["income", "age", "rooms", "bedrooms", "population", "occupancy", "latitude", "longitude"]
columns = {name: x[:, i] for i, name in enumerate(names)}
columns["price"] = price.astype(np.float32)
with open(os.path.join(here, "table.csv"), "w") as f:
    f.write(",".join(columns) + "\n")
    for r in range(n):
        f.write(",".join(f"{columns[c][r]:.6f}" for c in columns) + "\n")
pq.write_table(pa.table(columns), os.path.join(here, "table.parquet"))
print(f"wrote model.pt ({sum(p.numel() for p in model.parameters())} parameters), table.csv and table.parquet ({n} rows)")
