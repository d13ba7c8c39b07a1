"""Trainers that misbehave, for tests/tests/python_sdk.rs: each is the
example's numpy trainer with one fault."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python-digits"))

from trainer import DigitsTrainer  # noqa: E402


class Raises(DigitsTrainer):
    def train(self, weights, hp):
        raise ValueError(f"a bad batch in round {hp.round}")


class WrongShape(DigitsTrainer):
    def train(self, weights, hp):
        new, samples, metrics = super().train(weights, hp)
        del new["fc2.bias"]
        return new, samples, metrics


class Hangs(DigitsTrainer):
    def train(self, weights, hp):
        time.sleep(3600)


class Inflates(DigitsTrainer):
    """Claims far more samples than it has, to weigh its update up."""

    def train(self, weights, hp):
        new, samples, metrics = super().train(weights, hp)
        return new, 100_000, metrics
