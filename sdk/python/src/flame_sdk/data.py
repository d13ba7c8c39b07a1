"""Dataset URLs as jobs give them to trainers, and a loader for NumPy archives.

A job's dataset URL is a path (made absolute against the job folder) or a
``scheme://`` URL, with an optional query: ``/data/digits.npz?part=0&of=3``.
Your ``load_data`` may read it any way it likes; these helpers cover the
common case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
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


class Refused(Exception):
    """A dataset URL this worker will not read."""


class DataRoots:
    """The folders a worker reads datasets from (its owner's `--data-root`).

    A job's dataset path resolves inside one of them or is refused: absolute
    paths elsewhere, '..', symlinks that point out; the refusal reads the
    same whether or not the path exists. `builtin://` and other `scheme://`
    URLs pass as they are (nothing on this disk).
    """

    def __init__(self, dirs: Optional[Sequence[str]]) -> None:
        self.roots: Optional[List[str]] = None
        if dirs is not None:
            roots = []
            for d in dirs:
                real = os.path.realpath(d)
                if not os.path.isdir(real):
                    raise ValueError(f"data root '{d}' is not a folder")
                roots.append(real)
            if not roots:
                raise ValueError("give at least one data root")
            self.roots = roots

    def _inside(self, path: str) -> bool:
        assert self.roots is not None
        return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots)

    def resolve(self, url: str) -> str:
        if self.roots is None:
            return url
        scheme, sep, _ = url.partition("://")
        if sep and scheme != "file":
            return url
        rest = url[len("file://") :] if url.startswith("file://") else url[len("file:") :] if url.startswith("file:") else url
        path, _, query = rest.partition("?")
        where = ", ".join(self.roots)
        if not path:
            raise Refused(f"dataset '{url}': names no file")
        if ".." in path.split("/"):
            raise Refused(f"dataset '{url}': a dataset path may not climb out with '..': name it inside the worker's data roots")
        outside = Refused(
            f"dataset '{url}': is not under this worker's data roots ({where}): its owner shares datasets there (--data-root)"
        )
        if os.path.isabs(path):
            if not self._inside(os.path.normpath(path)):
                raise outside
            candidates = [path]
        else:
            candidates = [os.path.join(r, path) for r in self.roots]
        for c in candidates:
            if os.path.exists(c):
                real = os.path.realpath(c)
                if self._inside(real):
                    return real + (f"?{query}" if query else "")
                raise outside
        if os.path.isabs(path):
            raise outside
        raise Refused(f"dataset '{url}': no such file under this worker's data roots ({where})")

