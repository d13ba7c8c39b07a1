"""Models as the platform moves them: safetensors with PyTorch's names.

Every float tensor is float32 (parameters, and the buffers the metadata lists
under ``flame.buffers``); counters (BatchNorm's ``num_batches_tracked``) are
int64. Nothing else travels, and nothing that is not finite.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import numpy as np
import safetensors.numpy

#: A model's tensors by name, as numpy arrays.
Weights = Dict[str, np.ndarray]

_BUFFERS = "flame.buffers"


class WeightsError(ValueError):
    """Tensors that cannot be a model, or do not fit the one they should."""


@dataclass
class Model:
    """A decoded model: its tensors, and which float tensors are buffers."""

    tensors: Weights
    buffers: List[str] = field(default_factory=list)


def _metadata(data: bytes) -> Dict[str, str]:
    if len(data) < 8:
        raise WeightsError("not safetensors: shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise WeightsError("not safetensors: the header is longer than the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise WeightsError(f"not safetensors: {e}") from e
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def decode(data: bytes) -> Model:
    """Reads a model blob, checking dtypes and that every float is finite."""
    meta = _metadata(data)
    try:
        tensors = dict(safetensors.numpy.load(data))
    except Exception as e:  # the library raises its own types
        raise WeightsError(f"not safetensors: {e}") from e
    for name, t in tensors.items():
        if t.dtype == np.float32:
            if not np.isfinite(t).all():
                raise WeightsError(f"tensor '{name}' holds a NaN or infinity")
        elif t.dtype != np.int64:
            raise WeightsError(f"tensor '{name}' is {t.dtype}; models travel as float32 and int64")
    buffers = json.loads(meta[_BUFFERS]) if _BUFFERS in meta else []
    return Model(tensors=tensors, buffers=[b for b in buffers if b in tensors])


def encode(model: Model) -> bytes:
    """A model blob: the same bytes for the same tensors."""
    meta = {_BUFFERS: json.dumps(sorted(model.buffers))} if model.buffers else None
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(model.tensors.items())}
    return safetensors.numpy.save(tensors, metadata=meta)


def conform(like: Model, tensors: Mapping[str, object], who: str = "the trainer") -> Model:
    """``tensors`` as a model with exactly ``like``'s names, shapes and
    dtypes (floats cast to float32, counters to int64), or a
    ``WeightsError`` that names the first difference."""
    missing = sorted(set(like.tensors) - set(tensors))
    extra = sorted(set(tensors) - set(like.tensors))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise WeightsError(f"{who} returned other tensors than the global model's: {'; '.join(parts)}")
    out: Weights = {}
    for name, ref in like.tensors.items():
        t = np.asarray(tensors[name])
        if t.shape != ref.shape:
            raise WeightsError(f"{who} returned '{name}' with shape {list(t.shape)}; the global model's is {list(ref.shape)}")
        if ref.dtype == np.int64:
            if not np.issubdtype(t.dtype, np.integer):
                raise WeightsError(f"{who} returned counter '{name}' as {t.dtype}; it is int64")
            out[name] = t.astype(np.int64)
            continue
        if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
            raise WeightsError(f"{who} returned '{name}' as {t.dtype}; it is float32")
        t = t.astype(np.float32)
        if not np.isfinite(t).all():
            raise WeightsError(f"{who} returned '{name}' with a NaN or infinity")
        out[name] = t
    return Model(tensors=out, buffers=list(like.buffers))


def parameters(model: Model) -> List[str]:
    """The names of the trainable tensors (float, not buffers), sorted."""
    return sorted(k for k, v in model.tensors.items() if v.dtype == np.float32 and k not in model.buffers)
