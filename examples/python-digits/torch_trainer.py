"""The same trainer in PyTorch: the model is an nn.Module, the weights go in
and out through its state_dict (PyTorch's names are the platform's)."""

import numpy as np
import torch
from torch import nn

from flame_sdk import Hyperparameters, Trainer, load_npz


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TorchDigitsTrainer(Trainer):
    def load_data(self, dataset: str) -> None:
        x, y, xt, yt = load_npz(dataset)
        self.x, self.y = torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y)
        self.x_test, self.y_test = torch.from_numpy(xt.reshape(len(xt), -1)), torch.from_numpy(yt)
        self.model = Net()

    def load(self, weights) -> None:
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})

    def size(self) -> int:
        return len(self.x)

    def train(self, weights, hp: Hyperparameters):
        self.load(weights)
        start = [p.detach().clone() for p in self.model.parameters()]
        opt = torch.optim.SGD(
            self.model.parameters(),
            lr=hp.learning_rate,
            momentum=float(hp.optimizer.get("momentum", 0.0)),
            weight_decay=float(hp.optimizer.get("weight_decay", 0.0)),
        )
        generator = torch.Generator().manual_seed(hp.seed)
        losses = []
        self.model.train()
        for _ in range(hp.epochs):
            for idx in torch.randperm(len(self.x), generator=generator).split(hp.batch_size):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
                if hp.mu > 0:  # FedProx
                    loss = loss + hp.mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(self.model.parameters(), start))
                loss.backward()
                opt.step()
                losses.append(loss.item())
        state = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
        return state, len(self.x), {"loss": float(np.mean(losses))}

    def evaluate(self, weights):
        self.load(weights)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.x_test)
            loss = nn.functional.cross_entropy(logits, self.y_test).item()
            accuracy = (logits.argmax(dim=1) == self.y_test).float().mean().item()
        return {"loss": loss, "accuracy": accuracy, "test_samples": float(len(self.y_test))}
