"""Evaluates a model the platform exported, in PyTorch, on a data file:
prints {"loss": ..., "accuracy": ..., "samples": ...} as JSON.

    evaluate.py MODEL DATA [--state STATE] [--shape 1,8,8] [--loss cross_entropy|mse|bce_with_logits]

MODEL is a TorchScript file (torch.jit.load). With --state, the weights come
from that safetensors file instead (load_state_dict, strict). DATA is a
safetensors file with tensors x and y (class labels) and/or t (numeric targets). Used by the parity tests.
"""
import argparse
import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("data")
p.add_argument("--state")
p.add_argument("--shape", default="")
p.add_argument("--loss", default="cross_entropy")
a = p.parse_args()

torch.set_num_threads(1)
model = torch.jit.load(a.model)
if a.state:
    model.load_state_dict(load_file(a.state), strict=True)
model.eval()
data = load_file(a.data)
x = data["x"]
# Numeric targets (t) when the data has them, else the class labels (y).
y = data["t"] if "t" in data else data["y"]
if a.shape:
    x = x.view(-1, *[int(d) for d in a.shape.split(",")])
with torch.no_grad():
    out = model(x)
    if a.loss == "cross_entropy":
        loss = F.cross_entropy(out, y).item()
        accuracy = (out.argmax(1) == y).float().mean().item()
    elif a.loss == "mse":
        loss, accuracy = F.mse_loss(out, y.float().view_as(out)).item(), None
    else:
        loss, accuracy = F.binary_cross_entropy_with_logits(out, y.float().view_as(out)).item(), None
print(json.dumps({"loss": loss, "accuracy": accuracy, "samples": len(y)}))
