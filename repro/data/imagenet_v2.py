"""ImageNetV2 (Recht et al., 2019): a new test set drawn like ImageNet's validation set, 10,000
images. Its `matched-frequency` release (imagenetv2-matched-frequency-format-val) is a folder of
class folders named by class index, `0` .. `999`.

Those names are integers, and are read as integers: torchvision's ImageFolder sorts folder names
as strings and numbers them in that order, which puts `10` before `2` and mislabels 990 of the
1000 classes. Images are evaluated with the recipe's own folder-path protocol (timm's eval
transform: resize the shorter side to res / crop_pct, centre crop), sharded like the
validation set (disjoint, no padding: summed counts are exact).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from repro.data import DataError


class IntegerClassFolder(ImageFolder):
    """An ImageFolder whose class folders are named by class index."""

    num_classes: int | None = None  # set before construction by `dataset`

    def find_classes(self, directory):
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        if not names:
            raise DataError(f"{directory}: no class folders (ImageNetV2's matched-frequency "
                            "release has one per class, named 0 .. 999)")
        bad = [n for n in names if not n.isdigit() or
               (self.num_classes is not None and int(n) >= self.num_classes)]
        if bad:
            raise DataError(f"{directory}: class folder {bad[0]!r} is not a class index "
                            f"0 .. {(self.num_classes or 1000) - 1} (ImageNetV2 names its class "
                            "folders by index)")
        classes = sorted(names, key=int)
        return classes, {name: int(name) for name in classes}


def dataset(path: str | os.PathLike, transform, num_classes: int) -> IntegerClassFolder:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: ImageNetV2 folder not found (the matched-frequency release, "
                        "class folders 0 .. 999)")
    cls = type("IntegerClassFolder", (IntegerClassFolder,), {"num_classes": num_classes})
    try:
        return cls(str(path), transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"{path}: {' '.join(str(e).split())}") from None


def loader(recipe, path: str | os.PathLike, *, num_classes: int, batch_size: int, rank: int,
           world_size: int, workers: int, device) -> DataLoader:
    """This rank's shard of the ImageNetV2 folder, with the recipe's evaluation transform."""
    from repro.data.folder import val_transform

    ds = dataset(path, val_transform(recipe), num_classes)
    shard = Subset(ds, range(rank, len(ds), world_size))
    return DataLoader(shard, batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda")
