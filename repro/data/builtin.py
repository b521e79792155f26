"""The built-in `digits` dataset: scikit-learn's 1,797 real handwritten digits (8x8 grey, shipped
inside scikit-learn), upsampled to RGB, split deterministically, written once as an ImageFolder
and as FFCV .beton files under ${REPRO_CACHE:-~/.cache/repro}, and reused afterwards.

It is small enough for a CPU and real enough to learn: the quickstart and the tests run the
whole pipeline — FFCV conversion and loading, training, evaluation — on it, offline.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from repro.data import cache_dir

VAL_FRACTION = 0.2
SPLIT_SEED = 0
FORMAT_VERSION = 2  # bump when the files written here change (2: .beton name lists)


@dataclass(frozen=True)
class DigitsPaths:
    root: Path
    train_dir: Path
    val_dir: Path
    train_beton: Path
    val_beton: Path


def _paths(root: Path) -> DigitsPaths:
    return DigitsPaths(root, root / "train", root / "val", root / "train.beton",
                       root / "val.beton")


def digits_arrays(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 RGB (N, size, size, 3) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # sklearn's values are 0..16
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))
                   for g in grey])
    return np.repeat(up[..., None], 3, axis=-1), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/val split that is the same on every machine."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=VAL_FRACTION, stratify=labels,
                                  random_state=SPLIT_SEED)
    return np.sort(train), np.sort(val)


def ensure_digits(size: int = 32, cache: str | os.PathLike | None = None,
                  with_beton: bool | None = None) -> DigitsPaths:
    """Build the set on first use (atomically: a temporary directory renamed at the end).

    Builders take turns (an exclusive lock beside the set): the processes of an array of jobs,
    or the ranks of a run, that start on a fresh machine together build it once, and no builder
    replaces a set that another process may already be reading."""
    import fcntl

    from repro.data import ffcv_available

    with_beton = ffcv_available() if with_beton is None else with_beton
    root = Path(cache or cache_dir()) / f"digits-{size}px-v{FORMAT_VERSION}"
    paths = _paths(root)

    def built() -> bool:
        return (root / "meta.json").exists() and (not with_beton or paths.train_beton.exists())

    if built():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if built():  # another process built it while this one waited
            return paths
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write(_paths(tmp), size, with_beton)
            if root.exists():  # an earlier build without .beton files
                shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
            if with_beton:  # the conversion records name the temporary directory: point home
                from repro.data.beton import read_sidecar, sidecar_path
                from repro.io import atomic_write_json

                for split_dir, beton in ((paths.train_dir, paths.train_beton),
                                         (paths.val_dir, paths.val_beton)):
                    atomic_write_json(sidecar_path(beton),
                                      {**read_sidecar(beton), "source": str(split_dir)})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write(p: DigitsPaths, size: int, with_beton: bool) -> None:
    images, labels = digits_arrays(size)
    train_idx, val_idx = split_indices(labels)
    for split_dir, idx in ((p.train_dir, train_idx), (p.val_dir, val_idx)):
        for i in idx:
            d = split_dir / str(labels[i])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(d / f"{i:04d}.png")  # lossless
    if with_beton:
        from repro.data.convert import convert

        # Raw (uncompressed) storage keeps the files identical on every machine.
        for split_dir, beton in ((p.train_dir, p.train_beton), (p.val_dir, p.val_beton)):
            convert(split_dir, beton, max_res=None, compress_prob=0.0, quality=90,
                    workers=min(2, os.cpu_count() or 1), progress=False)
    meta = {"dataset": "digits", "source": "sklearn.datasets.load_digits", "size": size,
            "train": len(train_idx), "val": len(val_idx), "classes": 10,
            "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED,
            "format_version": FORMAT_VERSION}
    (p.root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
