"""`repro eval`: top-1/top-5 of a checkpoint under a recipe's evaluation protocol.

The protocol is the recipe's (`eval.resolution`, `eval.crop_pct`, `eval.interpolation`: they
move top-1 by tenths of a point, so they are recorded beside the numbers), the data come from
`repro.data.build_loaders` (FFCV or ImageFolder) and the counting is the trainer's own
(`repro.train.loop.evaluate`: exact counts, summed over ranks), so a run's checkpoint gives the
numbers its `results.json` holds. Weights are read from local files only: our checkpoints
(`{"model", "ema"}`), timm state dicts and training checkpoints (`state_dict`,
`state_dict_ema`), official releases (CvT's `.pth`, DDP's `module.` prefixes) and
`.safetensors`. They load strictly: a mismatch is one line naming the first missing, unexpected
and wrongly shaped keys.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.data import DataError, build_loaders
from repro.io import atomic_write_json
from repro.measure import positive_int
from repro.recipe import Recipe, RecipeError, load_recipe
from repro.train import distributed
from repro.train.run import create_model, evaluate_all

# Where a checkpoint file keeps its weights, in the order they are looked for.
MODEL_KEYS = ("model", "state_dict")  # ours, DeiT/LeViT official; timm's train script
EMA_KEYS = ("ema", "state_dict_ema", "model_ema")  # ours (ModelEmaV3); timm; DeiT
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repro eval",
        description="Top-1/top-5 of a checkpoint (raw and EMA) with the recipe's evaluation "
        "protocol (eval.resolution, eval.crop_pct, eval.interpolation).")
    p.add_argument("target", metavar="RECIPE|RUN_DIR",
                   help="a recipe YAML, or a run directory (its recipe.yaml and "
                   "checkpoints/last.pt)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. eval.crop_pct=0.9 eval.resolution=256")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file: ours, timm's or an official release (default: the run's "
                   "checkpoints/last.pt, or the recipe's model.pretrained_file)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="validation .beton file or ImageFolder directory (replaces data.val_path)")
    p.add_argument("--format", choices=("ffcv", "folder"), default=None,
                   help="data format (default: the recipe's; with --data, from the path)")
    p.add_argument("--batch", type=positive_int, default=None, metavar="B",
                   help="evaluation batch per device (default: eval.batch_size)")
    return p


def run_cli(argv: list[str]) -> int:
    """`repro eval`: evaluate, print the one-line result, write eval.json; the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    recipe, run = resolve_target(args.target, args.overrides)
    ckpt = checkpoint_path(recipe, run, args.checkpoint)
    set_data(recipe, data=args.data, fmt=args.format, batch=args.batch)
    record = evaluate_checkpoint(recipe, ckpt, run_dir=run)
    if record is not None:
        print(summary(record))
    return 0


def resolve_target(target: str, overrides: list[str]) -> tuple[Recipe, Path | None]:
    """The recipe to evaluate with, and the run directory when `target` is one."""
    path = Path(target)
    if not path.is_dir():
        return load_recipe(path, overrides), None
    if not (path / "recipe.yaml").is_file():
        raise RecipeError(path, None, "not a run directory (no recipe.yaml in it)")
    recipe = load_recipe(path / "recipe.yaml", overrides)  # resolved: overrides included
    recipe.name = path.parent.name  # runs/<recipe>/<run-id>
    return recipe, path


def checkpoint_path(recipe: Recipe, run: Path | None, given: str | None) -> Path:
    """--checkpoint, else the run's last.pt, else the recipe's model.pretrained_file."""
    if given:
        return Path(given)
    if run is not None:
        return run / "checkpoints" / "last.pt"
    if recipe.model.pretrained_file:
        return Path(recipe.model.pretrained_file)
    raise RecipeError(recipe.path, None, "no checkpoint to evaluate: pass --checkpoint PATH "
                      "(or set model.pretrained_file)")


def set_data(recipe: Recipe, *, data: str | None = None, fmt: str | None = None,
             batch: int | None = None) -> None:
    """Point the recipe at the validation data; evaluation reads no training data."""
    d = recipe.data
    if fmt:
        d.format = fmt
    if data:
        path = Path(data)
        if not path.exists():
            raise DataError(f"{path}: validation data not found (a .beton file or an "
                            "ImageFolder directory)")
        d.dataset = "imagenet"
        d.format = fmt or ("folder" if path.is_dir() else "ffcv")
        d.val_path = str(path)
    if batch:
        recipe.eval.batch_size = batch
    if d.dataset != "digits":
        if not d.val_path:
            raise DataError(f"{recipe.path}: data.val_path is not set: pass --data PATH (a "
                            "validation .beton file or ImageFolder directory)")
        d.train_path = d.val_path  # build_loaders builds a train loader too; never iterated


def read_weights(path: str | Path) -> Weights:
    """The model (and EMA) state dicts of a local weights file, wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (no downloads: put the weights "
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
            raise RecipeError(path, None, f"not a readable weights file ({_reason(e)})") \
                from None
    if not isinstance(obj, dict):
        raise RecipeError(path, None, f"not a state dict or checkpoint (a {type(obj).__name__})")
    found = [k for k in MODEL_KEYS if isinstance(obj.get(k), dict)]
    if found:
        model, layout = obj[found[0]], found[0]
    elif _is_state_dict(obj):
        model, layout = obj, "state dict"
    else:
        keys = ", ".join(list(map(str, obj))[:6])
        raise RecipeError(path, None, f"no model weights found (top-level keys: {keys}; "
                          f"expected a state dict or one under {' / '.join(MODEL_KEYS)})")
    ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
    ema = obj[ema_key] if ema_key else None
    if ema_key:
        layout += f" + {ema_key}"
    notes: list[str] = []
    weights = Weights(_unwrap(model, notes), _unwrap(ema, notes) if ema else None, layout)
    weights.notes = sorted(set(notes))
    return weights


def _reason(e: Exception) -> str:
    """One line of a load error: weights_only's 'Unsupported global' line when there is one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    pickled = [line for line in lines if "Unsupported global" in line]
    if pickled:
        return f"it holds pickled Python objects; {pickled[0]}"
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _is_state_dict(obj: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values()) and \
        not any(isinstance(v, dict) for v in obj.values())


def _unwrap(state: dict, notes: list[str]) -> dict:
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
    """Load `state` into `model` with every key and shape matching, else one RecipeError line.

    When keys differ, the model family's timm `checkpoint_filter_fn` (e.g. LeViT's, which drops
    the official files' `attention_bias_idxs`) is tried before giving up. Returns the notes of
    any mapping applied.
    """
    expected = model.state_dict()
    notes: list[str] = []
    if _problems(expected, state):
        module = sys.modules.get(type(model).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                filtered = filter_fn(dict(state), model)
            except Exception:  # a filter that cannot read these keys: report the original
                filtered = None
            if isinstance(filtered, dict) and not _problems(expected, filtered):
                state = filtered
                notes.append(f"{module.__name__}.checkpoint_filter_fn")
    problems = _problems(expected, state)
    if problems:
        raise RecipeError(path, None, f"{what} weights do not match model "
                          f"{name or type(model).__name__}: {problems}")
    # Checkpoints from before BatchNorm counted its batches lack the counter: keep the model's.
    absent = [k for k in expected if k not in state]
    if absent:
        state = {**state, **{k: expected[k] for k in absent}}
        notes.append(f"{len(absent)} num_batches_tracked buffers absent, kept at their defaults")
    model.load_state_dict(state, strict=True)
    return notes


def _problems(expected: dict, state: dict) -> str:
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


def evaluate_checkpoint(recipe: Recipe, checkpoint: str | Path, *,
                        run_dir: Path | None = None) -> dict | None:
    """Evaluate a weights file (raw and EMA), write eval.json; its record (None on ranks > 0)."""
    env = distributed.setup(recipe.train.device)
    try:
        return _evaluate(recipe, Path(checkpoint), run_dir, env)
    finally:
        distributed.teardown()


def _evaluate(recipe: Recipe, checkpoint: Path, run_dir: Path | None, env) -> dict | None:
    t, e = recipe.train, recipe.eval
    weights = read_weights(checkpoint)  # before any data or model: a bad path fails fast
    loaders = build_loaders(recipe, batch_size=recipe.data.batch_size,
                            eval_batch_size=e.batch_size, rank=env.rank,
                            world_size=env.world_size, device=str(env.device), seed=t.seed)
    if recipe.model.num_classes != loaders.num_classes:
        raise RecipeError(recipe.path, "model.num_classes",
                          f"{recipe.model.num_classes} but the data have {loaders.num_classes} "
                          "classes")
    recipe.model.pretrained_file = None  # the weights evaluated are the checkpoint's
    model = create_model(recipe, loaders.num_classes)
    notes = list(weights.notes)
    notes += load_strict(model, weights.model, path=checkpoint, name=recipe.model.name)
    ema = None
    if weights.ema is not None:
        ema_model = copy.deepcopy(model)
        notes += load_strict(ema_model, weights.ema, path=checkpoint, what="EMA",
                             name=recipe.model.name)
        ema = types.SimpleNamespace(module=ema_model)  # as timm's ModelEma holds it
    for m in (model, ema.module if ema else None):
        if m is not None:
            m.to(env.device)
            if t.channels_last:
                m.to(memory_format=torch.channels_last)

    started = time.perf_counter()
    results = evaluate_all(model, ema, loaders, env, t)  # the trainer's final evaluation
    seconds = time.perf_counter() - started
    if not env.is_main:
        return None
    out = run_dir / "eval.json" if run_dir is not None else \
        checkpoint.with_name(checkpoint.stem + ".eval.json")
    record = {
        "schema_version": 1,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "recipe": recipe.path, "name": recipe.name, "run_dir": str(run_dir) if run_dir else None,
        "model": recipe.model.name, "overrides": recipe.overrides,
        "checkpoint": str(checkpoint), "checkpoint_layout": weights.layout,
        "key_mapping": sorted(set(notes)), "ema": ema is not None,
        "protocol": {"resolution": e.resolution or recipe.data.resolution,
                     "crop_pct": e.crop_pct, "interpolation": e.interpolation},
        "data": {"format": loaders.format, "val_path": loaders.val_path,
                 "val_images": loaders.val_images, "num_classes": loaders.num_classes},
        "batch_size": e.batch_size, "device": str(env.device), "world_size": env.world_size,
        "amp": t.amp, "channels_last": t.channels_last, "eval_time_s": seconds,
        **results,
        "output": str(out),
    }
    atomic_write_json(out, record)
    return record


def summary(record: dict) -> str:
    """The one-line result."""
    p, d = record["protocol"], record["data"]
    text = (f"{record['model']} {record['checkpoint']}: top-1 {record['eval/top1']:.2f}, "
            f"top-5 {record['eval/top5']:.2f}")
    if record["ema"]:
        text += f"; EMA top-1 {record['eval_ema/top1']:.2f}, top-5 {record['eval_ema/top5']:.2f}"
    return (f"{text}  ({record['eval/count']} images, {d['format']}, {p['resolution']} px, "
            f"crop {p['crop_pct']}, {p['interpolation']}) -> {record['output']}")
