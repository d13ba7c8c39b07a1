"""What a user writes: a trainer (Flame's ``load_data``, ``train``,
``evaluate``) and, if the platform's aggregators do not fit, an aggregator."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .weights import Weights

#: Figures a trainer reports (``loss``, ``accuracy``, ...).
Metrics = Dict[str, float]


class Unsupported(Exception):
    """The job asks for something this trainer or aggregator does not do."""


@dataclass(frozen=True)
class Hyperparameters:
    """What one ``train`` command asks for (the job's compiled settings)."""

    epochs: int
    batch_size: int
    learning_rate: float
    #: The command's seed: the same seed, the same data order.
    seed: int
    #: The round the update is for.
    round: int
    #: ``cross_entropy``, ``mse`` or ``bce_with_logits``.
    loss: str = "cross_entropy"
    #: ``{"sort": "sgd", "momentum", "weight_decay"}`` or ``{"sort": "adam", ...}``.
    optimizer: Dict[str, Any] = field(default_factory=lambda: {"sort": "sgd", "momentum": 0.0, "weight_decay": 0.0})
    #: What to minimise besides the loss: ``{"kind": "plain"}`` or ``{"kind": "proximal", "mu"}`` (FedProx).
    objective: Dict[str, Any] = field(default_factory=lambda: {"kind": "plain"})
    #: The whole ``training`` object of the command, for anything else.
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def mu(self) -> float:
        """FedProx's proximal weight: add ``mu/2 ||w - w_global||^2`` to the loss (0 otherwise)."""
        return float(self.objective.get("mu", 0.0)) if self.objective.get("kind") == "proximal" else 0.0

    @classmethod
    def from_command(cls, body: Dict[str, Any], seed: int, round: int) -> "Hyperparameters":
        t = body.get("training") or {}
        optimizer = t.get("optimizer") or {"sort": "sgd", "momentum": 0.0, "weight_decay": 0.0}
        return cls(
            epochs=int(t.get("epochs", 1)),
            batch_size=int(t.get("batch_size", 32)),
            learning_rate=float(t.get("learning_rate", 0.01)),
            seed=seed,
            round=round,
            loss=str(t.get("loss", "cross_entropy")),
            optimizer=dict(optimizer),
            objective=dict(body.get("objective") or {"kind": "plain"}),
            raw=dict(t),
        )


class Trainer(abc.ABC):
    """One trainer per dataset: the SDK makes one (no arguments) for each
    dataset URL a job gives this worker, calls ``load_data`` once, then
    ``train`` every round and ``evaluate`` when the job asks (``evalEvery``).

    Weights are ``dict[str, numpy.ndarray]`` with PyTorch's names
    (``model.state_dict()``): return the same names and shapes you were given.
    """

    @abc.abstractmethod
    def load_data(self, dataset: str) -> None:
        """Load this task's data. ``dataset`` is the URL the job names for it
        (``/abs/path/file.npz?part=0&of=3``; see ``flame_sdk.data``)."""

    @abc.abstractmethod
    def train(self, weights: Weights, hyperparameters: Hyperparameters) -> Tuple[Weights, int, Metrics]:
        """Train from the global model; return the new weights, the number of
        training samples behind them, and figures (``loss``, ...)."""

    def evaluate(self, weights: Weights) -> Metrics:
        """Figures of a global model on this task's held-out data (``loss``,
        ``accuracy``, ``test_samples``)."""
        raise Unsupported(f"{type(self).__name__} does not evaluate: define evaluate(weights) for federated evaluation")

    def size(self) -> Optional[int]:
        """How many training rows `load_data` found. Reported at deployment,
        it bounds the samples an update of this task may claim; None (the
        default) leaves the claims unbounded."""
        return None

    def initialize(self) -> Weights:
        """The initial model, for jobs whose initial weights come from the
        trainer's code rather than a file (a Python aggregator's ``init_model``)."""
        raise Unsupported(f"{type(self).__name__} has no initialize(): give the job its initial weights as a file")


@dataclass
class Update:
    """A trainer's update as an aggregator sees it."""

    task_id: str
    digest: str
    weights: Weights
    samples: int
    #: Asynchronous jobs: global models made since the one it trained from.
    staleness: int = 0


class Aggregator(abc.ABC):
    """A server rule in Python. ``optimizer`` is the command's
    ``{"kind": ..., ...}``; ``state`` the rule's tensors from the last round
    (momentum, moments), if it keeps any. Return the new global model's
    tensors (all of the global model's names) and the new state or None."""

    @abc.abstractmethod
    def aggregate(
        self, global_weights: Weights, updates: List[Update], optimizer: Dict[str, Any], state: Optional[Weights]
    ) -> Tuple[Weights, Optional[Weights]]:
        ...


class FedAvg(Aggregator):
    """The sample-weighted mean (FedAvg; FedProx's server is the same).
    Counters (int64) take the largest value. Other rules raise ``Unsupported``:
    run a Rust ``flame-worker`` as the aggregator for them."""

    RULES = ("fedavg", "fedprox")

    def aggregate(
        self, global_weights: Weights, updates: List[Update], optimizer: Dict[str, Any], state: Optional[Weights]
    ) -> Tuple[Weights, Optional[Weights]]:
        kind = optimizer.get("kind")
        if kind not in self.RULES:
            raise Unsupported(
                f"this Python aggregator implements {', '.join(self.RULES)}, not '{kind}': "
                "run a Rust flame-worker as the aggregator, or pass --aggregator module:Class"
            )
        total = float(sum(u.samples for u in updates))
        if total <= 0:
            raise ValueError("the updates hold no samples to weigh them by")
        out: Weights = {}
        for name, ref in global_weights.items():
            if ref.dtype == np.int64:
                out[name] = np.max(np.stack([u.weights[name] for u in updates]), axis=0)
                continue
            acc = np.zeros(ref.shape, dtype=np.float64)
            for u in updates:
                acc += (u.samples / total) * u.weights[name].astype(np.float64)
            out[name] = acc.astype(np.float32)
        return out, None
