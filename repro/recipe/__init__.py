"""Recipes: typed, validated, overridable YAML descriptions of one paper row's training run.

A recipe file is data only, read by the typed-YAML engine `repro.config` (`_base_` inheritance,
`${ENV}` interpolation, dotted overrides such as `optim.lr=5e-4`, one-line errors naming the file
and the key) against the schema in `repro.recipe.schema`. This module adds what is particular
to recipes: canonical detection (which scientific keys differ from the file), checks across
keys, `--smoke` as a recipe transform, what each data path applies (`path_report`), and the
values that follow from a recipe (per-GPU batch, accumulation steps, effective lr, warm-up
steps), computed by `derive()`, never written by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from repro import config
from repro.config import ConfigError, get_dotted, parse_override
from repro.recipe.schema import IMAGENET_TRAIN_IMAGES, Recipe

__all__ = [
    "Recipe",
    "RecipeError",
    "Derived",
    "load_recipe",
    "parse_override",
    "derive",
    "field_docs",
    "path_report",
    "smoke_overrides",
    "add_arguments",
    "scientific_changes",
    "DATA_PATHS",
    "IMAGENET_TRAIN_IMAGES",
]

RecipeError = ConfigError  # a recipe problem, as one line: `FILE: KEY: what is wrong`
DATA_PATHS = ("ffcv", "folder")
_PATH_SECTIONS = ("data", "aug", "eval")  # the keys whose meaning depends on the data path
SMOKE_RESOLUTION = 64


def field_docs() -> dict[str, str]:
    """Dotted key -> its one-line documentation (for `--help` style listings)."""
    return {k: f.metadata.get("doc", "") for k, f in config.all_keys(Recipe).items()}


def path_report(recipe: Recipe, fmt: str | None = None, *, exact_eval: bool = False
                ) -> tuple[list[str], list[str]]:
    """(not applied, deviations) of `recipe` on data path `fmt` (default: its own), from the
    schema's field metadata: keys the path cannot apply, and keys it applies differently from
    the official code, each as `key=value` (deviations with how). Keys at an inert value are
    never listed; `exact_eval`: the evaluation file reproduces the eval protocol exactly."""
    fmt = fmt or recipe.data.format
    not_applied, deviations = [], []
    for key, f in config.all_keys(Recipe).items():
        meta = f.metadata
        if key.split(".")[0] not in _PATH_SECTIONS or meta.get("only") not in (None, fmt):
            continue
        value = get_dotted(recipe, key)
        if value in meta.get("inert", ()) or (exact_eval and key.startswith("eval.")):
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("\n...").strip()
        if fmt in meta.get("not_on", {}):
            not_applied.append(f"{key}={shown}")
        if fmt in meta.get("deviates_on", {}):
            deviations.append(f"{key}={shown} ({meta['deviates_on'][fmt]})")
    return not_applied, deviations


def _cross_checks(r: Recipe, prov: dict, file):
    """Checks that involve more than one key."""
    def err(key, msg):
        return RecipeError(prov.get(key, file), key, msg)

    if r.schedule.min_lr is not None and r.schedule.min_lr_ratio is not None:
        raise err("schedule.min_lr_ratio", "set schedule.min_lr or schedule.min_lr_ratio, not both")
    if r.schedule.warmup_lr_ratio is not None and "schedule.warmup_lr" in prov:
        raise err("schedule.warmup_lr_ratio",
                  "set schedule.warmup_lr or schedule.warmup_lr_ratio, not both")
    if r.distill.type != "none" and not r.distill.teacher:
        raise err("distill.teacher", f"distill.type is {r.distill.type!r} but no teacher is named")
    if r.data.dataset == "imagenet" and r.data.train_images is None:
        raise err("data.train_images", "required for imagenet (1281167 for ImageNet-1K); "
                  "null is for imagenet21k, whose split is made at conversion")
    if bool(r.paper) != bool(r.row):
        key = "row" if r.paper else "paper"
        raise err(key, "paper and row are given together (a row is addressed as paper/row)")
    if r.paper and r.row:
        from repro import papers  # the recipe's target must exist in the tables

        try:
            papers.get_row(f"{r.paper}/{r.row}")
        except papers.PaperTableError as e:
            raise err("row", str(e)) from None


def add_arguments(parser, example: str, overrides_help: str) -> None:
    """A command's recipe arguments: RECIPE, dotted overrides, and --smoke."""
    parser.add_argument("recipe", help=f"recipe YAML, e.g. {example}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=overrides_help)
    parser.add_argument("--smoke", action="store_true",
                        help="the recipe's model and optimisation, a few steps on the built-in "
                        f"digits at {SMOKE_RESOLUTION} px: check a recipe before queueing it")


def smoke_overrides() -> list[str]:
    """`--smoke`: the recipe's model and optimisation, a few steps on the built-in data at a
    small resolution, to check a recipe on a laptop before queueing it."""
    res = SMOKE_RESOLUTION
    return ["data.dataset=digits", f"data.resolution={res}", f"eval.resolution={res}",
            "data.train_images=null", "data.batch_size=8", "train.global_batch=16",
            "eval.batch_size=64", "model.num_classes=10", "train.max_steps=4",
            "train.log_every_steps=1", "data.workers=2", "train.amp=none",
            "train.compile=false", "train.device=cpu"]


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                smoke: bool = False) -> Recipe:
    """Read, merge, interpolate, override and validate a recipe file. `smoke`: the `--smoke`
    transform, its overrides applied first so that the user's win."""
    overrides = [*smoke_overrides(), *overrides] if smoke else list(overrides)
    tree, from_file, prov = config.read(path, Recipe, overrides, what="recipe file")
    file = str(path)
    recipe = config.build(Recipe, tree, prov, file)
    _cross_checks(recipe, prov, file)
    recipe.name = os.path.splitext(os.path.basename(file))[0]
    recipe.path = file
    recipe.overrides = overrides
    recipe.non_canonical_keys = _changed_scientific(from_file, recipe)
    return recipe


def _changed_scientific(from_file: dict, recipe: Recipe) -> list[str]:
    """Scientific keys whose value differs from what the recipe file alone gives."""
    try:
        original = config.build(Recipe, from_file, {}, recipe.path)
    except RecipeError:
        # The file alone may be invalid only because an override completes it: then every
        # overridden key counts as a change.
        return sorted({parse_override(o)[0] for o in recipe.overrides})
    return scientific_changes(original, recipe)


def scientific_changes(a: Recipe, b: Recipe) -> list[str]:
    """The scientific keys (what a run trains) whose values differ between two recipes."""
    return [key for key, f in config.all_keys(Recipe).items()
            if f.metadata.get("scientific", True) and get_dotted(a, key) != get_dotted(b, key)]


# --------------------------------------------------------------------------------------------
# Derived values

@dataclass(frozen=True)
class Derived:
    """Values that follow from a recipe and a world size; shown by --dry-run, used by train."""

    world_size: int
    global_batch: int
    per_device_batch: int  # images each device contributes to one optimizer step
    micro_batch: int  # images per forward/backward pass
    accum_steps: int  # forward/backward passes per optimizer step
    lr: float  # effective peak learning rate
    min_lr: float
    warmup_lr: float  # the learning rate warm-up starts from
    steps_per_epoch: int | None
    total_steps: int | None  # of the full schedule (train.max_steps stops a run earlier)
    warmup_steps: int | None


def derive(recipe: Recipe, world_size: int, train_images: int | None = None) -> Derived:
    """Per-device batch, accumulation and schedule lengths for `world_size` processes.

    The global batch is kept exactly: each device takes global_batch / world_size images per
    step, in the fewest equal micro-batches no larger than `data.batch_size`.
    """
    gb = recipe.train.global_batch
    if world_size < 1:
        raise RecipeError(recipe.path, "launch", f"world size must be >= 1, got {world_size}")
    if gb % world_size:
        raise RecipeError(recipe.path, "train.global_batch",
                          f"{gb} is not divisible by world size {world_size}")
    share = gb // world_size
    accum = -(-share // recipe.data.batch_size)
    while share % accum:
        accum += 1
    lr = recipe.optim.lr
    if recipe.optim.lr_batch:
        lr = lr * gb / recipe.optim.lr_batch
    s = recipe.schedule
    min_lr = s.min_lr if s.min_lr is not None else lr * (s.min_lr_ratio or 0.0)
    warmup_lr = s.warmup_lr if s.warmup_lr_ratio is None else lr * s.warmup_lr_ratio
    n = train_images or recipe.data.train_images
    if n and recipe.data.repeated_aug:
        n = n // 256 * 256  # RASampler's epoch (repro.data.order.repeated_aug_length)
    steps = n // gb if n else None  # the train loader drops the last partial batch
    if steps == 0:
        raise RecipeError(recipe.path, "train.global_batch",
                          f"{gb} is larger than the training set ({n} images)")
    total = steps * s.epochs if steps else None  # the schedule's length; max_steps truncates
    if s.warmup_steps is not None:
        warm = s.warmup_steps
    else:
        warm = round(s.warmup_epochs * steps) if steps else None
    return Derived(world_size, gb, share, share // accum, accum, lr, min_lr, warmup_lr, steps,
                   total, warm)
