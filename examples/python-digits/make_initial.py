"""Writes initial.safetensors: the MLP's starting weights (PyTorch's
nn.Linear initialisation, uniform in +-1/sqrt(fan_in), seeded)."""

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(7)
weights = {}
for name, (out, inp) in {"fc1": (32, 64), "fc2": (10, 32)}.items():
    bound = 1.0 / np.sqrt(inp)
    weights[f"{name}.weight"] = rng.uniform(-bound, bound, (out, inp)).astype(np.float32)
    weights[f"{name}.bias"] = rng.uniform(-bound, bound, (out,)).astype(np.float32)
save_file(weights, "initial.safetensors")
