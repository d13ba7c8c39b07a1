"""Writes model.pt: a small PyTorch CNN with BatchNorm for the 8x8 digits,
saved as TorchScript for the platform to train.

    .deps/torch/bin/python examples/torchscript-digits/make_model.py

(scripts/torch-venv.sh installs PyTorch into .deps/torch.) Any nn.Module
that torch.jit.script (or torch.jit.trace) accepts will do: the platform
trains the file's parameters from the weights it holds, and its state_dict
names are the names in every model blob and in `flamectl model get`.
"""
import os

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


torch.manual_seed(0)
model = torch.jit.script(DigitsCNN())
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.pt")
model.save(out)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, "
      f"{len(list(model.buffers()))} buffers")
