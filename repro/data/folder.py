"""torchvision ImageFolder loaders: the baseline FFCV is measured against, and the fallback.

Transforms are timm's (`timm.data.create_transform`): RandomResizedCrop with the recipe's scale,
ratio and interpolation, flip, the recipe's RandAugment/AutoAugment, colour jitter and random
erasing for training; resize to resolution / crop_pct and centre crop for evaluation. The
output contract is FFCV's: float32 images in channels_last memory format, int64 labels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from repro.data import DataError, Loaders


class ChannelsLast:
    """Wrap a DataLoader so batches match the FFCV loader's layout."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.contiguous(memory_format=torch.channels_last), labels


def _dataset(path: str, split: str, transform) -> ImageFolder:
    if not Path(path).is_dir():
        raise DataError(f"{path}: ImageFolder directory not found (one folder per class, e.g. "
                        f"ImageNet's {split}/); or point data.{split}_path at a .beton and set "
                        "data.format=ffcv")
    try:
        return ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path}: not a usable ImageFolder ({' '.join(str(e).split())})") \
            from None


def train_transform(recipe):
    d, a = recipe.data, recipe.aug
    return create_transform(
        d.resolution, is_training=True, scale=tuple(d.scale), ratio=tuple(d.ratio),
        hflip=d.hflip, vflip=0.0, color_jitter=a.color_jitter, auto_augment=a.auto_augment,
        interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std),
        re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count)


def val_transform(recipe):
    d, e = recipe.data, recipe.eval
    return create_transform(e.resolution or d.resolution, is_training=False,
                            interpolation=e.interpolation, crop_pct=e.crop_pct,
                            mean=tuple(d.mean), std=tuple(d.std))


def build(recipe, train_path: str, val_path: str, *, batch_size: int, eval_batch_size: int,
          distributed: bool, device, seed: int) -> Loaders:
    train_ds = _dataset(train_path, "train", train_transform(recipe))
    val_ds = _dataset(val_path, "val", val_transform(recipe))
    workers = recipe.data.workers
    pin = torch.device(device).type == "cuda"
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    if distributed:
        train_sampler = DistributedSampler(train_ds, shuffle=True, seed=seed, drop_last=True)
        train = DataLoader(train_ds, batch_size, sampler=train_sampler, drop_last=True, **common)
        val_sampler = DistributedSampler(val_ds, shuffle=False, drop_last=False)
        val = DataLoader(val_ds, eval_batch_size, sampler=val_sampler, **common)
    else:
        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(train_ds, batch_size, shuffle=True, drop_last=True, generator=gen,
                           **common)
        val = DataLoader(val_ds, eval_batch_size, shuffle=False, **common)
    return Loaders(ChannelsLast(train), ChannelsLast(val), "folder", train_path, val_path,
                   len(train_ds.classes), len(train_ds), len(val_ds), [])
