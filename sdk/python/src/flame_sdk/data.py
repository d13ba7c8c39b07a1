"""Dataset URLs as jobs give them to trainers, and a loader for NumPy archives.

A job's dataset URL is a path (made absolute against the job folder) or a
``scheme://`` URL, with an optional query: ``/data/digits.npz?part=0&of=3``.
Your ``load_data`` may read it any way it likes; these helpers cover the
common case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple
from urllib.parse import parse_qsl

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A dataset URL taken apart."""

    #: The path (``file:`` prefix removed) or the URL before ``?``.
    path: str
    #: The query's fields (``part``, ``of``, ``split``, ...).
    query: Dict[str, str]

    @classmethod
    def parse(cls, url: str) -> "Dataset":
        base, _, q = url.partition("?")
        if base.startswith("file://"):
            base = base[len("file://") :]
        elif base.startswith("file:"):
            base = base[len("file:") :]
        return cls(path=base, query=dict(parse_qsl(q)))

    @property
    def part(self) -> Tuple[int, int]:
        """``(part, of)`` from the query; ``(0, 1)`` for the whole dataset."""
        part, of = int(self.query.get("part", 0)), int(self.query.get("of", 1))
        if of < 1 or not 0 <= part < of:
            raise ValueError(f"need 0 <= part < of, got part={part} of={of}")
        return part, of


def load_npz(url: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, x_test, y_test)`` from an ``.npz`` archive with arrays ``x``,
    ``y`` and optionally ``x_test``, ``y_test`` (else the last 20% of rows are
    held out), the archive layout the Rust workers read. With ``part=I&of=N``
    the training rows are dealt round-robin (row ``r`` to part ``r % N``); the
    test rows stay whole."""
    d = Dataset.parse(url)
    with np.load(d.path) as z:
        if "x" not in z or "y" not in z:
            raise ValueError(f"{d.path}: the archive needs arrays 'x' and 'y' (np.savez(path, x=x, y=y))")
        x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
        if "x_test" in z and "y_test" in z:
            xt, yt = z["x_test"].astype(np.float32), z["y_test"].astype(np.int64)
        else:
            cut = len(x) - int(round(len(x) * 0.2))
            x, y, xt, yt = x[:cut], y[:cut], x[cut:], y[cut:]
    part, of = d.part
    return x[part::of], y[part::of], xt, yt
