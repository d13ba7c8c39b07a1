"""Writes model.pt: a small PyTorch CNN with BatchNorm for the 8x8 digits,
saved as TorchScript for the platform to train; and digits.npz, the UCI
digits as [N, 1, 8, 8] float32 images (x, y; x_test, y_test), the data as a
PyTorch user would have it.

    .deps/torch/bin/python examples/torchscript-digits/make_model.py

(scripts/torch-venv.sh installs PyTorch into .deps/torch.) Any nn.Module
that torch.jit.script (or torch.jit.trace) accepts will do: the platform
trains the file's parameters from the weights it holds, and its state_dict
names are the names in every model blob and in `flamectl model get`.
"""
import gzip
import os

import numpy as np
import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


here = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)
model = torch.jit.script(DigitsCNN())
out = os.path.join(here, "model.pt")
model.save(out)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, "
      f"{len(list(model.buffers()))} buffers")

# The digits bundled with the platform (64 pixels of 0..16, then the label), shuffled once,
# 20% held out; every site's dataset takes its part of the training rows (digits.npz?part=I&of=3).
csv = os.path.join(here, "..", "..", "workers", "data", "digits.csv.gz")
rows = np.loadtxt(gzip.open(csv, "rt"), delimiter=",", dtype=np.float32)
rows = rows[np.random.default_rng(0).permutation(len(rows))]
x, y = (rows[:, :64] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32), rows[:, 64].astype(np.int64)
test = round(len(rows) * 0.2)
np.savez_compressed(os.path.join(here, "digits.npz"), x=x[test:], y=y[test:], x_test=x[:test], y_test=y[:test])
print(f"wrote digits.npz: {len(rows) - test} training and {test} test images of shape {x.shape[1:]}")
