"""Trains a TorchScript module centrally in PyTorch with full-batch SGD, as
the parity test's reference for one-client FedAvg:

    central.py MODEL DATA OUT --steps 3 --lr 0.1 [--shape 1,8,8] [--test-fraction 0.2]

DATA is a safetensors file with x and y; like the platform's loader, the
last round(0.2 * rows) rows are held out and the rest trained on. Writes the
module's state_dict to OUT (safetensors).
"""
import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("data")
p.add_argument("out")
p.add_argument("--steps", type=int, required=True)
p.add_argument("--lr", type=float, required=True)
p.add_argument("--shape", default="")
p.add_argument("--test-fraction", type=float, default=0.2)
a = p.parse_args()

torch.set_num_threads(1)
model = torch.jit.load(a.model)
model.train()
data = load_file(a.data)
x, y = data["x"], data["y"]
train = len(y) - int(len(y) * a.test_fraction + 0.5)  # as Rust rounds: half away from zero
x, y = x[:train], y[:train]
if a.shape:
    x = x.view(-1, *[int(d) for d in a.shape.split(",")])
opt = torch.optim.SGD(model.parameters(), lr=a.lr)
for _ in range(a.steps):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
print(f"trained {a.steps} full-batch steps on {train} rows; last loss {loss.item():.6f}")
