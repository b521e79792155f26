"""`repro eval`: top-1/top-5 of a checkpoint under a recipe's evaluation protocol.

The protocol is the recipe's (`eval.resolution`, `eval.crop_pct`, `eval.interpolation`: they
move top-1 by tenths of a point, so they are recorded beside the numbers), the data come from
`repro.data.build_loaders` (FFCV or ImageFolder) and the counting is the trainer's own
(`repro.train.loop.evaluate`: exact counts, summed over ranks), so a run's checkpoint gives the
numbers its `results.json` holds. Weights are read from local files only: our checkpoints
(`{"model", "ema"}`), timm state dicts and training checkpoints (`state_dict`,
`state_dict_ema`), official releases (CvT's `.pth`, DDP's `module.` prefixes) and
`.safetensors`. They load strictly: a mismatch is one line naming the first missing, unexpected
and wrongly shaped keys. Official LeViT releases are renamed to timm's names (repro.models.levit)
and pycls checkpoints (`model_state`, `ema_state`) are read.

Beside top-1 on the validation set: ImageNet-ReaL (`--real-labels real.json`, matched to the
validation images by file name, repro.data.real_labels) and ImageNetV2 (`--v2 DIR`, class folders
read as integers, repro.data.imagenet_v2), for the raw and the EMA weights alike. `--row
paper/ROW --checkpoint FILE` evaluates a paper's released weights under the row's recipe and
records them, with the file's sha256 and `--source`, under
`<output_dir>/_released/<paper>/<row>/eval.json`, which `repro report` sets beside the paper.
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
from repro.data import DataError, build_loaders, imagenet_v2
from repro.data.beton import digest
from repro.data.real_labels import RealLabels
from repro.io import atomic_write_json
from repro.measure import positive_int
from repro.recipe import Recipe, RecipeError, load_recipe
from repro.train import distributed
from repro.train.checkpoint import load_strict, read_weights
from repro.train.loop import evaluate
from repro.train.run import create_model, evaluate_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repro eval",
        description="Top-1/top-5 of a checkpoint (raw and EMA) with the recipe's evaluation "
        "protocol (eval.resolution, eval.crop_pct, eval.interpolation).")
    p.add_argument("target", metavar="RECIPE|RUN_DIR", nargs="?",
                   help="a recipe YAML, or a run directory (its recipe.yaml and "
                   "checkpoints/last.pt); not with --row")
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
    p.add_argument("--real-labels", default=None, metavar="REAL_JSON",
                   help="also score ImageNet-ReaL: google-research/reassessed-imagenet's "
                   "real.json (or `timm`, the copy timm ships); matched to the validation "
                   "images by file name")
    p.add_argument("--v2", default=None, metavar="DIR",
                   help="also score ImageNetV2: its matched-frequency folder (class folders "
                   "0..999), with the recipe's folder-path evaluation transform")
    p.add_argument("--row", default=None, metavar="PAPER/ROW",
                   help="evaluate a paper's released weights (--checkpoint) under that row's "
                   "recipe; recorded under <output_dir>/_released/<paper>/<row>/")
    p.add_argument("--source", default=None, metavar="URL|TEXT",
                   help="with --row: where the weights file came from (recorded)")
    return p


def run_cli(argv: list[str]) -> int:
    """`repro eval`: evaluate, print the one-line result, write eval.json; the exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.row is not None and args.target is not None and "=" in args.target:
        args.overrides, args.target = [args.target, *args.overrides], None  # all overrides
    if (args.target is None) == (args.row is None):
        parser.error("give a recipe or run directory, or --row PAPER/ROW (one of them)")
    if args.row is not None and not args.checkpoint:
        parser.error("--row evaluates released weights: give them with --checkpoint FILE")
    if args.source is not None and args.row is None:
        parser.error("--source records where released weights came from: use it with --row")
    released = None
    if args.row is not None:
        recipe, run = recipe_of_row(args.row, args.overrides), None
        released = {"row": recipe.row_id, "source": args.source}
    else:
        recipe, run = resolve_target(args.target, args.overrides)
    ckpt = checkpoint_path(recipe, run, args.checkpoint)
    set_data(recipe, data=args.data, fmt=args.format, batch=args.batch)
    record = evaluate_checkpoint(recipe, ckpt, run_dir=run, real_labels=args.real_labels,
                                 v2=args.v2, released=released)
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


def recipes_dir() -> Path:
    """The recipes/ folder of this checkout (the package is installed from it, editable)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def recipe_of_row(row_id: str, overrides: list[str]) -> Recipe:
    """The recipe that reproduces paper row `row_id` (`levit/LeViT-256`)."""
    from repro import papers

    row = papers.get_row(row_id)  # a one-line error, with suggestions, for an unknown row
    wanted = f"{row['paper']}/{row['row']}".lower()
    for path in sorted(recipes_dir().glob("*.yaml")):
        recipe = load_recipe(path, overrides)
        if (recipe.row_id or "").lower() == wanted:
            return recipe
    reason = papers.not_reproducible(row)
    raise RecipeError(recipes_dir(), None, f"no recipe reproduces row {row_id}"
                      + (f" (not reproducible: {reason})" if reason else ""))


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
                        run_dir: Path | None = None, real_labels: str | None = None,
                        v2: str | None = None, released: dict | None = None) -> dict | None:
    """Evaluate a weights file (raw and EMA), write eval.json; its record (None on ranks > 0).
    `released`: {"row", "source"} of a paper's released weights (see the module doc)."""
    env = distributed.setup(recipe.train.device)
    try:
        return _evaluate(recipe, Path(checkpoint), run_dir, env, real_labels, v2, released)
    finally:
        distributed.teardown()


def _gather(obj, env) -> list:
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _evaluate(recipe: Recipe, checkpoint: Path, run_dir: Path | None, env,
              real_labels: str | None = None, v2: str | None = None,
              released: dict | None = None) -> dict | None:
    t, e = recipe.train, recipe.eval
    weights = read_weights(checkpoint)  # before any data or model: a bad path fails fast
    if v2 is not None:
        imagenet_v2.dataset(v2, None, recipe.model.num_classes)  # its folder names, up front
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

    real = RealLabels(real_labels, loaders.val_files, loaders.val_path) \
        if real_labels is not None else None

    started = time.perf_counter()
    predictions = {} if real is not None else None
    results = evaluate_all(model, ema, loaders, env, t, predictions)  # the trainer's own
    for prefix, chunks in (predictions or {}).items():
        local = torch.cat(chunks).tolist() if chunks else []
        parts = _gather(local, env)  # rank r holds images r, r + world, r + 2 world, ...
        pairs = ((r + j * env.world_size, top5) for r, part in enumerate(parts)
                 for j, top5 in enumerate(part))
        results.update({f"{prefix}/{k}": v for k, v in real.score(pairs).items()})
    v2_images = None
    if v2 is not None:
        batches = imagenet_v2.loader(recipe, v2, num_classes=recipe.model.num_classes,
                                     batch_size=e.batch_size, rank=env.rank,
                                     world_size=env.world_size, workers=recipe.data.workers,
                                     device=env.device)
        v2_images = len(batches.dataset.dataset)
        for prefix, m in (("eval", model), ("eval_ema", ema.module if ema else None)):
            if m is not None:
                r = evaluate(m, batches, env, amp=t.amp, channels_last=t.channels_last)
                results.update({f"{prefix}/v2_top1": r["top1"], f"{prefix}/v2_top5": r["top5"],
                                f"{prefix}/v2_count": r["count"]})
    seconds = time.perf_counter() - started
    if not env.is_main:
        return None
    if released is not None:
        out = rundir.released_dir(recipe.train.output_dir, recipe.row_id) / "eval.json"
    elif run_dir is not None:
        out = rundir.Run(run_dir).file("eval.json")
    else:
        out = checkpoint.with_name(checkpoint.stem + ".eval.json")
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
        "real_labels": str(real.path) if real is not None else None,
        "v2": {"path": str(v2), "images": v2_images} if v2 is not None else None,
        **results,
        "output": str(out),
    }
    if released is not None:
        record["released"] = {**released, "file": checkpoint.name,
                              "sha256": digest(checkpoint)}
    atomic_write_json(out, record)
    return record


def summary(record: dict) -> str:
    """The one-line result."""
    p, d = record["protocol"], record["data"]
    text = (f"{record['model']} {record['checkpoint']}: top-1 {record['eval/top1']:.2f}, "
            f"top-5 {record['eval/top5']:.2f}")
    for key, label in (("eval/real_top1", "ReaL top-1"), ("eval/v2_top1", "V2 top-1")):
        if key in record:
            text += f", {label} {record[key]:.2f}"
    if record["ema"]:
        text += f"; EMA top-1 {record['eval_ema/top1']:.2f}, top-5 {record['eval_ema/top5']:.2f}"
    return (f"{text}  ({record['eval/count']} images, {d['format']}, {p['resolution']} px, "
            f"crop {p['crop_pct']}, {p['interpolation']}) -> {record['output']}")
