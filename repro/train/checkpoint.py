"""Checkpoints that survive a kill at any moment, resume that reaches the same weights, and the
one reader of weights files (ours, timm's, official releases) for resume, `model.pretrained_file`,
the distillation teacher and `repro eval`.

`save()` writes to a temporary file in the same directory, fsyncs it and renames it over the old
one: a reader sees the previous checkpoint or the new one, never half of either. Everything a
bitwise resume needs is inside: model, EMA, optimizer, scheduler, scaler, run state (epoch,
step, position in the epoch) and every rank's RNG states. RNG states are stored as tensors and
lists so that `torch.load(weights_only=True)` can read the file (no pickled code).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from repro.errors import UserError
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


NO_RESUME = ("No earlier checkpoint is kept to resume from (best.pt holds weights only, for "
             "`repro eval`): relaunch with a new run id")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save()` (tensors and plain data only, never code); a file
    that cannot be read so is a one-line WeightsError naming it and the ways on."""
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the reader fails on a damaged file in many ways
        raise WeightsError(path, f"unreadable checkpoint ({_reason(e)}): it is damaged or not "
                           f"a checkpoint. {NO_RESUME}") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise WeightsError(path, f"not a repro checkpoint (no 'model' entry). {NO_RESUME}")
    return ck


def non_finite(state: dict) -> list[str]:
    """The floating-point tensors of a state dict holding NaN or infinity."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)
            and v.is_floating_point() and not torch.isfinite(v).all()]


def snapshot(s, state_dict: dict, rngs: list[dict], world_size: int) -> dict:
    """What a checkpoint holds, from a training setup `s` (`repro.train.run.Setup`)."""
    return {
        "model": s.unwrapped.state_dict(),
        "ema": s.ema.state_dict() if s.ema is not None else None,
        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
        "scaler": s.step.scaler.state_dict() if s.step.scaler is not None else None,
        "state": state_dict, "rng": rngs, "world_size": world_size,
    }


def resume(path: Path, s, state, rank: int) -> bool:
    """Restore setup `s`, run state `state` and this rank's RNG from the checkpoint at `path`;
    False when there is none (a new run)."""
    if not path.exists():
        return False
    ck = load(path)
    s.unwrapped.load_state_dict(ck["model"])
    if s.ema is not None and ck.get("ema") is not None:
        s.ema.load_state_dict(ck["ema"])
    s.optimizer.load_state_dict(ck["optimizer"])
    s.scheduler.load_state_dict(ck["scheduler"])
    if s.step.scaler is not None and ck.get("scaler"):
        s.step.scaler.load_state_dict(ck["scaler"])
    state.load_state_dict(ck["state"])
    rng = ck["rng"]
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return True


def load_file_into(model: torch.nn.Module, path: str | Path, what: str) -> list[str]:
    """Load a weights file's model state into `model`, strictly (see `load_strict`)."""
    return load_strict(model, read_weights(path, what).model, path=path, what=what)


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read, or whose keys or shapes do not fit the model."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")


# Where a checkpoint file keeps its weights, in the order they are looked for.
MODEL_KEYS = ("model", "state_dict", "model_state")  # ours, DeiT/LeViT; timm's train; pycls
EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state")  # ours; timm; DeiT; pycls
# Prefixes that wrappers add to every key: DDP and ModelEma (`module.`), torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOW_KEYS = 3  # keys named in a mismatch error


@dataclass
class Weights:
    """The state dicts found in a checkpoint file, keys already unwrapped."""

    model: dict
    ema: dict | None
    layout: str  # where they were found, e.g. "model + ema", "state dict"
    notes: list[str] = field(default_factory=list)  # key mappings applied


def read_weights(path: str | Path, what: str = "checkpoint") -> Weights:
    """The model (and EMA) state dicts of a local weights file, wrapper prefixes removed;
    `what` names the file in the error when it is absent (e.g. `model.pretrained_file`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found (no downloads: put the weights "
                                "file there first)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            # timm's training checkpoints carry their argparse Namespace; nothing else is
            # unpickled (weights_only).
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler fails on a foreign file in many ways
            raise WeightsError(path, f"not a readable weights file ({_reason(e)})") \
                from None
    if not isinstance(obj, dict):
        raise WeightsError(path, f"not a state dict or checkpoint (a {type(obj).__name__})")
    found = [k for k in MODEL_KEYS if isinstance(obj.get(k), dict)]
    if found:
        model, layout = obj[found[0]], found[0]
    elif _is_state_dict(obj):
        model, layout = obj, "state dict"
    else:
        keys = ", ".join(list(map(str, obj))[:6])
        raise WeightsError(path, f"no model weights found (top-level keys: {keys}; "
                          f"expected a state dict or one under {' / '.join(MODEL_KEYS)})")
    ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
    ema = obj[ema_key] if ema_key else None
    if ema_key:
        layout += f" + {ema_key}"
    notes: list[str] = []
    weights = Weights(unwrap(model, notes), unwrap(ema, notes) if ema else None, layout)
    weights.notes = sorted(set(notes))
    return weights


def _reason(e: Exception) -> str:
    """One line of a load error: weights_only's 'Unsupported global' line when there is one.
    torch's advice to load with weights_only=False (running the file's code) is never passed
    on: these files may come from anywhere."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    pickled = [line for line in lines if "Unsupported global" in line]
    if pickled:
        return f"it holds pickled Python objects; {pickled[0].split('. Please')[0]}"
    lines = [line for line in lines if "weights_only" not in line]
    first = lines[0].split(". ")[0][:200] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _is_state_dict(obj: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values()) and \
        not any(isinstance(v, dict) for v in obj.values())


def unwrap(state: dict, notes: list[str]) -> dict:
    """Tensors only, with DDP/EMA (`module.`) and torch.compile (`_orig_mod.`) prefixes off."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    notes.append(f"stripped '{prefix}'")
                    stripped = True
        out[key] = value
    return out


def load_strict(model: torch.nn.Module, state: dict, *, path, what: str = "model",
                name: str | None = None) -> list[str]:
    """Load `state` into `model` with every key and shape matching, else one WeightsError line.

    When keys differ, the model family's timm `checkpoint_filter_fn` (e.g. LeViT's, which drops
    the official files' `attention_bias_idxs`) is tried, then the suite's renaming of official
    releases that timm names differently (`repro.models.official_layout`: LeViT's), before
    giving up. Returns the notes of any mapping applied.
    """
    expected = model.state_dict()
    notes: list[str] = []
    if problems(expected, state):
        for note, rename in _renamings(model, path, what):
            renamed = rename(dict(state))
            if renamed is not None and not problems(expected, renamed[0]):
                state = renamed[0]
                notes.append(renamed[1] or note)
                break
    mismatch = problems(expected, state)
    if mismatch:
        raise WeightsError(path, f"{what} weights do not match model "
                                 f"{name or type(model).__name__}: {mismatch}")
    # Checkpoints from before BatchNorm counted its batches lack the counter: keep the model's.
    absent = [k for k in expected if k not in state]
    if absent:
        state = {**state, **{k: expected[k] for k in absent}}
        notes.append(f"{len(absent)} num_batches_tracked buffers absent, kept at their defaults")
    model.load_state_dict(state, strict=True)
    return notes


def _renamings(model: torch.nn.Module, path, what: str):
    """(note, rename) pairs to try in turn; rename(state) gives (state, note or None) or None."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        def timm_filter(state):
            try:
                out = filter_fn(state, model)
            except Exception:  # a filter that cannot read these keys: report the original
                return None
            return (out, None) if isinstance(out, dict) else None

        yield f"{module.__name__}.checkpoint_filter_fn", timm_filter

    def official(state):
        from repro.models import official_layout

        try:
            return official_layout(state, model)
        except ValueError as e:  # an official release with a key the mapping cannot place
            raise WeightsError(path, f"{what} weights: {e}") from None

    yield "official names", official


def problems(expected: dict, state: dict) -> str:
    """'' when `state` fits `expected`; else what does not, briefly."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape (file vs model)", shapes)):
        if keys:
            more = ", ..." if len(keys) > SHOW_KEYS else ""
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:SHOW_KEYS])}{more})")
    return "; ".join(parts)
