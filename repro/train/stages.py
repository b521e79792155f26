"""Stages: a recipe that starts from another recipe's trained weights (`init.from`, `init.run`).

A fine-tune (CoAtNet at 384 from its 224 run, a 21K-pretrained model on ImageNet-1K) names the
recipe it continues. The parent is that recipe's complete, canonical run with the child's seed,
found under the child's `train.output_dir`, or the run `init.run` pins. Its EMA (or raw)
weights are loaded into the child's model:

- resolution-dependent tensors are adapted by the model family's own timm function, as timm
  does when it loads weights at another size: ViT's `pos_embed` (`resample_abs_pos_embed`, in
  `vision_transformer.checkpoint_filter_fn`), CoAtNet's relative-position tables
  (`resize_rel_pos_bias_table`, in `maxxvit.checkpoint_filter_fn`);
- a classifier whose class count differs (21K -> 1K) is left at the child's fresh
  initialisation, as the papers re-initialise the head;
- anything else that does not fit is a one-line error.

A parent run that is incomplete or non-canonical makes the child non-canonical.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro import rundir
from repro.recipe import Recipe, RecipeError, load_recipe
from repro.train import checkpoint


def parent_path(recipe: Recipe) -> Path | None:
    """The parent recipe's file (`init.from`, relative to the recipe that names it)."""
    name = recipe.init.from_recipe
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(recipe.path).parent / path


def parent_recipe(recipe: Recipe, smoke: bool = False) -> Recipe | None:
    """The parent recipe as the child runs it: the child's seed and output directory."""
    path = parent_path(recipe)
    if path is None:
        return None
    if not path.is_file():
        raise RecipeError(recipe.path, "init.from", f"{path}: no such recipe")
    return load_recipe(path, [f"train.seed={recipe.train.seed}",
                              f"train.output_dir={recipe.train.output_dir}"], smoke=smoke)


def chain(recipe: Recipe, smoke: bool = False) -> list[Recipe]:
    """The recipe's ancestors, the first stage first (not the recipe itself)."""
    out: list[Recipe] = []
    seen = {Path(recipe.path).resolve()}
    parent = parent_recipe(recipe, smoke)
    while parent is not None:
        where = Path(parent.path).resolve()
        if where in seen:
            raise RecipeError(recipe.path, "init.from", f"the stages loop back to {where}")
        seen.add(where)
        out.insert(0, parent)
        parent = parent_recipe(parent, smoke)
    return out


@dataclass
class Parent:
    """The run a child starts from, and whether it is one a canonical child may use."""

    run: rundir.Run
    complete: bool
    canonical: bool

    @property
    def good(self) -> bool:
        return self.complete and self.canonical

    def describe(self) -> str:
        state = "complete, canonical" if self.good else ", ".join(
            w for w, ok in (("incomplete", self.complete), ("non-canonical", self.canonical))
            if not ok)
        return f"{self.run.path} ({state})"


def find_parent(recipe: Recipe, smoke: bool = False) -> Parent | None:
    """The pinned parent run (`init.run`), or the parent recipe's latest complete canonical
    run with this seed (a smoke child takes a smoke parent that ran its steps); None when
    there is none yet."""
    if recipe.init.run:
        run = rundir.Run(recipe.init.run)
        if not run.last_checkpoint.exists():
            raise RecipeError(recipe.path, "init.run",
                              f"{run.path}: no checkpoints/last.pt to start from")
        r = run.results()
        return Parent(run, bool(r and r.complete), bool(r and r.canonical and not r.smoke))
    parent = parent_recipe(recipe, smoke)
    if parent is None:
        return None
    found = []
    for run in rundir.find_runs(Path(parent.train.output_dir) / parent.name,
                                markers=("results.json",)):
        r = run.results()
        # A smoke run always stops at its train.max_steps ("incomplete"): that is its end.
        ended = r.complete or (smoke and r.status == "incomplete")
        if (ended and r.seed == recipe.train.seed and r.smoke == smoke
                and (r.canonical or smoke) and run.last_checkpoint.exists()):
            found.append((run.file("results.json").stat().st_mtime, str(run.path), run))
    if not found:
        return None
    return Parent(max(found)[2], True, True)


def missing(recipe: Recipe, smoke: bool = False) -> list[Recipe]:
    """The ancestor stages that must run before `recipe` can start, first stage first: walking
    back from the recipe, every stage up to the nearest one with a run to start from (a
    complete later stage spares the earlier ones)."""
    stages = [*chain(recipe, smoke), recipe]
    out: list[Recipe] = []
    for i in range(len(stages) - 1, 0, -1):
        if stages[i].init.run or find_parent(stages[i], smoke) is not None:
            break
        out.insert(0, stages[i - 1])
    return out


@dataclass
class Loaded:
    """What starting from a parent did, for launch.json and results.json."""

    parent: Parent
    weights: str
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"from": self.parent.run.path.parent.name, "run": str(self.parent.run.path),
                "weights": self.weights, "parent_complete": self.parent.complete,
                "parent_canonical": self.parent.canonical, "adapted": self.notes}


def start_from_parent(model: torch.nn.Module, recipe: Recipe, smoke: bool = False
                      ) -> Loaded | None:
    """Load the parent's weights into `model` (module doc); None for a first stage."""
    if not (recipe.init.from_recipe or recipe.init.run):
        return None
    parent = find_parent(recipe, smoke)
    if parent is None:
        raise RecipeError(recipe.path, "init.from",
                          f"no complete run of {parent_path(recipe)} with seed "
                          f"{recipe.train.seed} under {recipe.train.output_dir}: `repro launch "
                          f"{recipe.path}` runs the missing stages first")
    ck = checkpoint.load(parent.run.last_checkpoint)
    which = recipe.init.weights
    if which == "ema" and not ck.get("ema"):
        raise RecipeError(recipe.path, "init.weights",
                          f"ema, but {parent.run.path} kept no EMA (its train.ema is null): "
                          "set init.weights=raw")
    notes: list[str] = []
    state = checkpoint.unwrap(ck["ema"] if which == "ema" else ck["model"], notes)
    notes += adapt(model, state, parent.run.last_checkpoint)
    return Loaded(parent, which, sorted(set(notes)))


def adapt(model: torch.nn.Module, state: dict, path) -> list[str]:
    """Load `state` into `model`: resolution-dependent tensors resampled by the family's timm
    filter, a classifier of another class count left at its initialisation; returns notes."""
    notes = []
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    expected = model.state_dict()
    if filter_fn is not None and any(k in expected and v.shape != expected[k].shape
                                     for k, v in state.items()):
        state = filter_fn(dict(state), model)
        notes.append(f"resized by {type(model).__module__}.checkpoint_filter_fn")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    keep, fresh = {}, []
    for k, v in state.items():
        if k in expected and v.shape != expected[k].shape and \
                any(k.startswith(h + ".") for h in heads):
            fresh.append(k)
            continue
        keep[k] = v
    if fresh:
        notes.append(f"classifier re-initialised (class count differs): {', '.join(fresh)}")
    # The re-initialised head stands in as the child's own tensors: anything else must fit.
    mismatch = checkpoint.problems(expected, {**keep, **{k: expected[k] for k in fresh}})
    if mismatch:
        raise checkpoint.WeightsError(path, "the parent's weights do not fit the child's model "
                                      f"{type(model).__name__}: {mismatch}")
    model.load_state_dict({**expected, **keep}, strict=True)
    return notes
