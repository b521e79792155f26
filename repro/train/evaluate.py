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
import time
import types
from pathlib import Path

import torch

from repro import rundir
from repro.data import DataError, build_loaders
from repro.io import atomic_write_json
from repro.measure import positive_int
from repro.recipe import Recipe, RecipeError, load_recipe
from repro.train import distributed
from repro.train.checkpoint import load_strict, read_weights
from repro.train.run import create_model, evaluate_all


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
    run = rundir.Run(path)
    if not run.file("recipe.yaml").is_file():
        raise RecipeError(path, None, "not a run directory (no recipe.yaml in it)")
    recipe = load_recipe(run.file("recipe.yaml"), overrides)  # resolved: overrides included
    recipe.name = run.recipe_name
    return recipe, path


def checkpoint_path(recipe: Recipe, run: Path | None, given: str | None) -> Path:
    """--checkpoint, else the run's last.pt, else the recipe's model.pretrained_file."""
    if given:
        return Path(given)
    if run is not None:
        return rundir.Run(run).last_checkpoint
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
    out = rundir.Run(run_dir).file("eval.json") if run_dir is not None else \
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
