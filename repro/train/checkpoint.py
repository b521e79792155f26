"""Checkpoints that survive a kill at any moment, and resume that reaches the same weights.

`save()` writes to a temporary file in the same directory, fsyncs it and renames it over the old
one: a reader sees the previous checkpoint or the new one, never half of either. Everything a
bitwise resume needs is inside: model, EMA, optimizer, scheduler, scaler, run state (epoch,
step, position in the epoch) and every rank's RNG states. RNG states are stored as tensors and
lists so that `torch.load(weights_only=True)` can read the file (no pickled code).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from repro.io import atomic_write_bytes


def rng_state() -> dict:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Serialise in memory, then write atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save()` (tensors and plain data only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_weights(path: str | os.PathLike, what: str) -> dict:
    """A state dict from a local weights file (ours, timm's or an official release).

    Accepts a bare state dict or one nested under 'model', 'state_dict' or 'model_ema'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} weights file not found (no downloads: put the "
                                "file there first)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in obj.items()}
