"""A trainer in plain numpy: a 64-32-10 MLP on the digits, written by hand.

Any framework fits behind the same three methods (PyTorch, JAX,
scikit-learn): the platform sees only the weights, by PyTorch's names.
"""

import numpy as np

from flame_sdk import Hyperparameters, Trainer, load_npz


def forward(w, x):
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    return h, h @ w["fc2.weight"].T + w["fc2.bias"]


def cross_entropy(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, p


class DigitsTrainer(Trainer):
    def load_data(self, dataset: str) -> None:
        x, y, xt, yt = load_npz(dataset)
        self.x, self.y = x.reshape(len(x), -1), y
        self.x_test, self.y_test = xt.reshape(len(xt), -1), yt

    def size(self) -> int:
        return len(self.x)

    def train(self, weights, hp: Hyperparameters):
        w = {k: v.astype(np.float64) for k, v in weights.items()}
        start = {k: v.copy() for k, v in w.items()}
        rng = np.random.default_rng(hp.seed)
        losses = []
        for _ in range(hp.epochs):
            order = rng.permutation(len(self.x))
            for i in range(0, len(order), hp.batch_size):
                idx = order[i : i + hp.batch_size]
                x, y = self.x[idx], self.y[idx]
                h, logits = forward(w, x)
                loss, p = cross_entropy(logits, y)
                losses.append(loss)
                d = p
                d[np.arange(len(y)), y] -= 1.0
                d /= len(y)
                grads = {"fc2.weight": d.T @ h, "fc2.bias": d.sum(axis=0)}
                dh = (d @ w["fc2.weight"]) * (h > 0)
                grads["fc1.weight"] = dh.T @ x
                grads["fc1.bias"] = dh.sum(axis=0)
                for k in w:
                    # FedProx (hp.mu > 0) pulls towards the global model.
                    w[k] -= hp.learning_rate * (grads[k] + hp.mu * (w[k] - start[k]))
        return {k: v.astype(np.float32) for k, v in w.items()}, len(self.x), {"loss": float(np.mean(losses))}

    def evaluate(self, weights):
        _, logits = forward(weights, self.x_test)
        loss, p = cross_entropy(logits, self.y_test)
        accuracy = float((p.argmax(axis=1) == self.y_test).mean())
        return {"loss": loss, "accuracy": accuracy, "test_samples": float(len(self.y_test))}
