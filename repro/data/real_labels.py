"""ImageNet-ReaL: the reassessed validation labels of "Are we done with ImageNet?" (Beyer et
al., 2020), google-research/reassessed-imagenet's `real.json`.

The file is a list of 50,000 label lists, one per validation image in sorted file-name order
(`ILSVRC2012_val_00000001.JPEG` first). timm's `RealLabelsImagenet` (timm/data/real_labels.py)
is the reference for the scoring, and this follows it: an image whose list is empty is left out
of the count, and a prediction is right when its class is in the image's list (top-5: when any
of the five is). timm also ships the file (`timm/data/_info/imagenet_real_labels.json`), which
`--real-labels timm` reads.

Here the lists are matched to the images by name, whatever order the validation set is stored
in: an ImageFolder tree keeps them by class, a .beton in its conversion's order (listed in
`<file>.files.txt`). The k-th list goes to the image whose file name (without its folder) is
the k-th in sorted order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from repro.data import DataError

TIMM = "timm"  # --real-labels timm: the copy timm ships


def resolve(path: str | os.PathLike) -> Path:
    """The label file: a path, or `timm` for the copy in timm's package data."""
    if str(path) == TIMM:
        import timm.data

        return Path(timm.data.__file__).parent / "_info" / "imagenet_real_labels.json"
    return Path(path)


class RealLabels:
    """The ReaL label lists of one validation set, indexed like the set."""

    def __init__(self, path: str | os.PathLike, val_files: list[str] | None, where: str):
        self.path = resolve(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: ReaL label file not found (google-research/"
                            "reassessed-imagenet's real.json, or `--real-labels timm`)")
        try:
            lists = json.loads(self.path.read_text())
        except ValueError as e:
            raise DataError(f"{self.path}: not JSON ({e})") from None
        if not isinstance(lists, list) or not all(
                isinstance(x, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                            for c in x) for x in lists):
            raise DataError(f"{self.path}: expected a list of label lists (integers), one per "
                            "validation image in sorted file-name order")
        if val_files is None:
            raise DataError(f"{where}: the validation images' file names are not known, so the "
                            f"ReaL labels cannot be matched to them; convert the validation "
                            "folder again with `repro data convert` (it lists the names in "
                            "<file>.files.txt), or evaluate the folder itself (--data DIR)")
        if len(lists) != len(val_files):
            raise DataError(f"{self.path}: {len(lists)} label lists, but {where} has "
                            f"{len(val_files)} validation images (ReaL labels the 50,000 "
                            "images of ImageNet's validation set)")
        names = [os.path.basename(f) for f in val_files]
        if len(set(names)) != len(names):
            raise DataError(f"{where}: two validation images share a file name, so the ReaL "
                            "labels (matched by name) cannot tell them apart")
        order = sorted(range(len(names)), key=names.__getitem__)
        self.labels: list[list[int]] = [[] for _ in names]
        for k, index in enumerate(order):
            self.labels[index] = lists[k]

    def score(self, predictions) -> dict:
        """top-1/top-5 over the images with a non-empty list, from (index, top-5 classes)
        pairs covering the set once."""
        seen = correct1 = correct5 = count = 0
        for index, top5 in predictions:
            seen += 1
            real = self.labels[index]
            if not real:
                continue
            count += 1
            correct1 += top5[0] in real
            correct5 += any(c in real for c in top5[:5])
        if seen != len(self.labels):
            raise ValueError(f"{seen} predictions for {len(self.labels)} images")
        if count == 0:
            return {"real_top1": float("nan"), "real_top5": float("nan"), "real_count": 0}
        return {"real_top1": 100 * correct1 / count, "real_top5": 100 * correct5 / count,
                "real_count": count}
