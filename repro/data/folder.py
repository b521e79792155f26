"""torchvision ImageFolder loaders: the baseline FFCV is measured against, and the fallback.

Transforms are timm's (`timm.data.create_transform`): RandomResizedCrop with the recipe's scale,
ratio and interpolation, flip, the recipe's RandAugment/AutoAugment, colour jitter and random
erasing for training; resize to resolution / crop_pct and centre crop for evaluation. The
output contract is FFCV's: float32 images in channels_last memory format, int64 labels.

Training is exactly reproducible, resumes included: the sample order of an epoch comes from
(seed, epoch) alone, and each sample's augmentation from (seed, epoch, index), whatever the
number of workers and wherever a run was interrupted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder

from repro.data import DataError, Loaders, order
from repro.data.tree import image_tree


def _channels_last(batches):
    for images, labels in batches:
        yield images.contiguous(memory_format=torch.channels_last), labels


class _EpochOrder(Sampler):
    """This rank's share of the epoch's order (repro.data.order: a shuffle, or repeated
    augmentation), as (index, sample seed) pairs; the seed follows the sample's position in the
    epoch, so the repeated copies of an image are augmented differently."""

    def __init__(self, n: int, seed: int, rank: int, world: int, repeated_aug: bool):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.repeated_aug = repeated_aug
        self.per_rank = order.samples_per_rank(n, world, repeated_aug)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        indices, positions = order.train_order(self.n, self.seed, self.epoch, self.rank,
                                               self.world, self.repeated_aug)
        base = order.epoch_seed(self.seed, self.epoch) * 10_000_019
        for i, p in zip(indices[self.start:].tolist(), positions[self.start:].tolist(),
                        strict=True):
            yield i, (base + p) % 2**63


class _Seeded(Dataset):
    """Apply the wrapped dataset's random transforms under a per-sample seed."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            # The CPU generator only: `torch.manual_seed` would also queue a CUDA seeding that
            # records a stack trace per call (3 ms a sample) for transforms that run on the CPU.
            torch.default_generator.manual_seed(seed)
            out = self.base[index]
        random.setstate(py)
        np.random.set_state(npy)
        return out


class FolderTrain:
    """Training batches of one epoch, from any batch on (for resume)."""

    def __init__(self, ds: ImageFolder, batch_size: int, workers: int, seed: int, rank: int,
                 world: int, pin: bool, repeated_aug: bool = False):
        self.order = _EpochOrder(len(ds), seed, rank, world, repeated_aug)
        # Workers can persist across epochs: each sample's seed travels with its index. The
        # loader draws its workers' base seed from its own generator, never from the global
        # torch RNG that dropout and drop path use (a resumed run would draw it mid-epoch).
        self.loader = DataLoader(_Seeded(ds), batch_size, sampler=self.order, drop_last=True,
                                 num_workers=workers, pin_memory=pin,
                                 persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size
        self.next_epoch = 0

    def __len__(self) -> int:
        return self.order.per_rank // self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0):
        self.order.epoch, self.order.start = epoch, start_batch * self.batch_size
        self.next_epoch = epoch + 1
        return _channels_last(self.loader)

    def __iter__(self):  # as FFCV's loader: each pass is the next epoch
        return self.epoch(self.next_epoch)


class FolderVal:
    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _channels_last(self.loader)


def _dataset(path: str, split: str, transform) -> ImageFolder:
    if not Path(path).is_dir():
        raise DataError(f"{path}: ImageFolder directory not found (one folder per class, e.g. "
                        f"ImageNet's {split}/); or point data.{split}_path at a .beton and set "
                        "data.format=ffcv")
    try:
        return SafeImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path}: not a usable ImageFolder ({' '.join(str(e).split())})") \
            from None


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder over repro.data.tree's walk: symlink loops are not followed
    and no image gets two labels."""

    def find_classes(self, directory):
        classes, _ = image_tree(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        return image_tree(directory)[1]


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 and TensorFlow do
    (Pillow 13's ImageOps.posterize raises ValueError for 0 bits, which timm's
    `_posterize_increasing_level_to_arg` asks for at magnitude 10 and `v0`'s Posterize at
    magnitude 2)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _with_posterize_fix(transform):
    """Point every posterize op of timm's RandAugment / AutoAugment in `transform` at
    `_posterize`; everything else stays timm's."""
    from timm.data import auto_augment as taa

    for t in getattr(transform, "transforms", []):
        ops = getattr(t, "ops", None) or [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is taa.posterize:
                op.aug_fn = _posterize
    return transform


def train_transform(recipe):
    d, a = recipe.data, recipe.aug
    return _with_posterize_fix(create_transform(
        d.resolution, is_training=True, scale=tuple(d.scale), ratio=tuple(d.ratio),
        hflip=d.hflip, vflip=0.0, color_jitter=a.color_jitter, auto_augment=a.auto_augment,
        interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std),
        re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count))


def eval_resize_crop(res: int, crop_pct: float, interpolation: str):
    """The PIL part of timm's eval transform (resize the shorter side to floor(res / crop_pct),
    centre-crop res): what `val_transform` applies before ToTensor and Normalize."""
    from torchvision import transforms

    full = create_transform(res, is_training=False, interpolation=interpolation,
                            crop_pct=crop_pct)
    pil = [t for t in full.transforms if isinstance(t, (transforms.Resize,
                                                        transforms.CenterCrop))]
    assert len(pil) == 2, full  # timm's "center" crop mode: Resize then CenterCrop
    return transforms.Compose(pil)


def val_transform(recipe):
    d, e = recipe.data, recipe.eval
    return create_transform(e.resolution or d.resolution, is_training=False,
                            interpolation=e.interpolation, crop_pct=e.crop_pct,
                            mean=tuple(d.mean), std=tuple(d.std))


def build(recipe, train_path: str, val_path: str, *, batch_size: int, eval_batch_size: int,
          rank: int, world_size: int, device, seed: int) -> Loaders:
    train_ds = _dataset(train_path, "train", train_transform(recipe))
    val_ds = _dataset(val_path, "val", val_transform(recipe))
    workers = recipe.data.workers
    pin = torch.device(device).type == "cuda"
    train = FolderTrain(train_ds, batch_size, workers, seed, rank, world_size, pin,
                        recipe.data.repeated_aug)
    # Evaluation: disjoint shards, no padding, so summed counts are exact.
    shard = Subset(val_ds, range(rank, len(val_ds), world_size))
    val = FolderVal(DataLoader(shard, eval_batch_size, shuffle=False, num_workers=workers,
                               pin_memory=pin, generator=torch.Generator().manual_seed(seed)))
    return Loaders(train, val, "folder", train_path, val_path, len(train_ds.classes),
                   len(train_ds), len(val_ds), exact_eval=True,
                   val_files=[os.path.relpath(p, val_path) for p, _ in val_ds.samples])
