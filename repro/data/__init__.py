"""Data: FFCV .beton files (ImageNet's fast path), torchvision ImageFolder (the baseline and the
fallback), and the built-in `digits` set that lets the whole pipeline run offline.

Both loaders yield the same contract: `(images, labels)` with images float32, normalised,
N x 3 x H x W in channels_last memory format, and labels int64 of shape N.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import UserError


class DataError(UserError, ValueError):
    """A data problem as one line: which path, what is wrong, how to fix it."""


def ffcv_available() -> bool:
    """True when FFCV imports (it needs OpenCV and libjpeg-turbo from the system)."""
    return importlib.util.find_spec("ffcv") is not None


def cache_dir() -> Path:
    """Where built-in datasets are written: ${REPRO_CACHE:-~/.cache/repro}."""
    return Path(os.environ.get("REPRO_CACHE") or Path.home() / ".cache" / "repro")


@dataclass
class Loaders:
    """A recipe's train and val loaders, and what a report needs to know about them."""

    train: Any
    val: Any
    format: str  # "ffcv" or "folder"
    train_path: str
    val_path: str
    num_classes: int
    train_images: int
    val_images: int
    exact_eval: bool  # the evaluation images are exactly the recipe's eval protocol's
    # From the schema (repro.recipe.path_report), filled in by build_loaders:
    not_applied: list[str] = field(default_factory=list)  # recipe keys this path cannot apply
    deviations: list[str] = field(default_factory=list)  # applied differently, and how
    # The validation images' names in dataset order (relative to the folder, or as the .beton's
    # conversion listed them; None when it did not): ImageNet-ReaL's labels follow them.
    val_files: list[str] | None = None


def resolve_paths(recipe) -> tuple[str, str]:
    """The train and val paths a recipe reads, building the built-in set if needed."""
    d = recipe.data
    if d.dataset == "digits":
        from repro.data import builtin

        paths = builtin.ensure_digits(size=d.resolution)
        return (str(paths.train_beton), str(paths.val_beton)) if d.format == "ffcv" else \
            (str(paths.train_dir), str(paths.val_dir))
    for key, path in (("data.train_path", d.train_path), ("data.val_path", d.val_path)):
        if not path:
            raise DataError(f"{recipe.path}: {key} is not set (a .beton file or an ImageFolder "
                            f"directory)")
    return d.train_path, d.val_path


def build_loaders(recipe, *, batch_size: int, eval_batch_size: int | None = None,
                  rank: int = 0, world_size: int = 1, device: str = "cpu",
                  seed: int = 0) -> Loaders:
    """Train and val loaders for this rank (data.format picks FFCV or ImageFolder).

    `train.epoch(e, start_batch)` iterates epoch `e` from a batch on (resume); `val` holds this
    rank's disjoint shard of the validation set (no padding: summed counts are exact).
    """
    train_path, val_path = resolve_paths(recipe)
    eval_batch_size = eval_batch_size or recipe.eval.batch_size
    if recipe.data.format == "ffcv":
        if not ffcv_available():
            raise DataError("data.format is ffcv but FFCV is not installed: `make install`, "
                            "or pip install -e '.[ffcv]' after apt-get install libopencv-dev "
                            "libturbojpeg0-dev pkg-config; or set data.format=folder")
        from repro.data import ffcv as backend
    else:
        from repro.data import folder as backend
    from repro.recipe import path_report

    loaders = backend.build(recipe, train_path, val_path, batch_size=batch_size,
                            eval_batch_size=eval_batch_size, rank=rank, world_size=world_size,
                            device=device, seed=seed)
    loaders.not_applied, loaders.deviations = path_report(recipe, loaders.format,
                                                          exact_eval=loaders.exact_eval)
    return loaders
