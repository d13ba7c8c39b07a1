"""Flame for Rust's Python SDK: write a trainer (and, if you like, an
aggregator) in Python and run it as a worker that joins federated-learning
jobs over NATS.

    from flame_sdk import Trainer, Hyperparameters

    class MyTrainer(Trainer):
        def load_data(self, dataset): ...
        def train(self, weights, hp): ... return weights, samples, {"loss": loss}
        def evaluate(self, weights): ... return {"loss": loss, "accuracy": acc}

    $ flame-py-worker --nats nats://host:4222 --id site-1 --realm default/site1 --trainer my_module:MyTrainer
"""

from .cli import serve
from .data import Dataset, load_npz
from .protocol import VERSION
from .trainer import Aggregator, FedAvg, Hyperparameters, Metrics, Trainer, Unsupported, Update
from .weights import Model, Weights
from .worker import IdTaken, Worker

__all__ = [
    "VERSION",
    "Aggregator",
    "Dataset",
    "FedAvg",
    "Hyperparameters",
    "IdTaken",
    "Metrics",
    "Model",
    "Trainer",
    "Unsupported",
    "Update",
    "Weights",
    "Worker",
    "load_npz",
    "serve",
]
