"""The PyTorch side of `scripts/bench.sh torchscript`: trains a TorchScript
module with PyTorch's own loop (one thread, SGD with momentum 0.9, learning
rate 0.05, shuffled minibatches, cross-entropy) on an .npz file's training
rows (the first 80%, or x/y when x_test is given), as the worker does, and
prints `loop=python samples_per_s=... seconds=...`.

    bench_torchscript.py MODEL.pt DATA.npz EPOCHS BATCH
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

model_path, data_path, epochs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
model = torch.jit.load(model_path)
model.train()
d = np.load(data_path)
x, y = torch.from_numpy(d["x"].astype(np.float32)), torch.from_numpy(d["y"].astype(np.int64))
if "x_test" not in d:
    cut = len(y) - int(len(y) * 0.2 + 0.5)
    x, y = x[:cut], y[:cut]
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(1)
start = time.perf_counter()
for _ in range(epochs):
    order = torch.randperm(len(y), generator=g)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = order[i : i + batch]
        bx, by = x.index_select(0, idx), y.index_select(0, idx)
        opt.zero_grad()
        loss = F.cross_entropy(model(bx), by)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
seconds = time.perf_counter() - start
print(f"loop=python samples_per_s={len(y) * epochs / seconds:.1f} seconds={seconds:.3f} loss={total / len(y):.4f}")
