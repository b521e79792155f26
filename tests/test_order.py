"""Training sample orders: DeiT's repeated augmentation (facebookresearch/deit `samplers.py`,
RASampler, as LeViT's main.py runs it) on both loaders, under 2-process gloo DDP; the plain
shuffle; both pure functions of (seed, epoch)."""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from repro.data import build_loaders, ffcv_available, order
from repro.recipe import derive, load_recipe

N = 600  # > 2 x 256: RASampler keeps floor(N / 256) * 256 = 512 samples an epoch


def rasampler_reference(n: int, perm: list[int], rank: int, world: int) -> list[int]:
    """RASampler.__iter__ stated from its definition (DeiT samplers.py): each index of the
    epoch's permutation 3 times in a row, padded from the start to ceil(3n / world) * world,
    every world-th from `rank`, the first floor(n // 256 * 256 / world) of them."""
    num_samples = math.ceil(n * 3.0 / world)
    total = num_samples * world
    indices = [i for i in perm for _ in range(3)]
    indices += indices[:total - len(indices)]
    return indices[rank:total:world][:math.floor(n // 256 * 256 / world)]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_repeated_aug_order_is_rasampler(world):
    perm = order.permutation(N, 5, 2).tolist()
    for rank in range(world):
        idx, pos = order.repeated_aug_order(N, 5, 2, rank, world)
        assert idx.tolist() == rasampler_reference(N, perm, rank, world)
        assert len(idx) == order.repeated_aug_length(N, world) == 512 // world
        assert len(set(pos.tolist())) == len(pos)  # every copy its own augmentation seed


def test_repeated_copies_land_on_different_ranks_and_epochs_reshuffle():
    shares = [order.repeated_aug_order(N, 0, 0, r, 3)[0].tolist() for r in range(3)]
    # With 3 ranks the 3 copies of an image go one to each rank, at the same step.
    for a, b, c in zip(*shares, strict=True):
        assert a == b == c
    one = order.repeated_aug_order(N, 0, 0, 0, 1)[0].tolist()
    assert one[:3] == [one[0]] * 3  # one process: the copies are consecutive (LeViT main.py)
    assert Counter(one).most_common(1)[0][1] == 3 and len(set(one)) == 512 // 3 + 1
    assert one != order.repeated_aug_order(N, 0, 1, 0, 1)[0].tolist()  # a new order each epoch
    assert one == order.repeated_aug_order(N, 0, 0, 0, 1)[0].tolist()  # fixed by (seed, epoch)
    assert one != order.repeated_aug_order(N, 1, 0, 0, 1)[0].tolist()  # and by seed


def test_schedule_length_follows_the_repeated_aug_epoch(tmp_path):
    r = load_recipe("recipes/levit_256.yaml")
    d = derive(r, 32)
    assert d.steps_per_epoch == 1_281_167 // 256 * 256 // 8192 == 156
    r = load_recipe("recipes/levit_256.yaml", ["data.repeated_aug=false"])
    assert derive(r, 32).steps_per_epoch == 1_281_167 // 8192


# --------------------------------------------------------------------------------------------
# Both loaders under 2-process gloo: labels are the sample indices, so each rank's epoch can be
# read back and compared with the order.

@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    """N tiny images whose label is their index, as an ImageFolder and as a .beton."""
    root = tmp_path_factory.mktemp("numbered")
    for i in range(N):
        (root / "folder" / f"c{i:04d}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (i % 256, i // 256, 0)).save(root / "folder" / f"c{i:04d}/a.png")
    if ffcv_available():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

        class Numbered:
            def __len__(self):
                return N

            def __getitem__(self, i):
                return np.full((8, 8, 3), i % 256, np.uint8), i

        DatasetWriter(str(root / "n.beton"), {"image": RGBImageField(), "label": IntField()},
                      num_workers=1).from_indexed_dataset(Numbered())
    return root


def _recipe(root: Path, fmt: str) -> Path:
    path = root / f"{fmt}.yaml"
    data = root / ("folder" if fmt == "folder" else "n.beton")
    path.write_text(textwrap.dedent(f"""
        model: {{name: vit_c_nano, num_classes: {N}}}
        data: {{format: {fmt}, train_path: {data}, val_path: {data}, train_images: {N},
                resolution: 8, workers: 1, repeated_aug: true, hflip: 0.0,
                scale: [1.0, 1.0], ratio: [1.0, 1.0]}}
        aug: {{auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25}}
        optim: {{lr: 1.0e-3}}
        schedule: {{epochs: 1}}
        train: {{global_batch: 64, seed: 3}}
    """))
    return path


def _rank(rank: int, world: int, init: str, recipe: str, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    r = load_recipe(recipe)
    loaders = build_loaders(r, batch_size=32, rank=rank, world_size=world, seed=3)
    labels = torch.cat([y.clone() for _, y in loaders.train.epoch(1)])
    torch.save({"labels": labels, "len": len(loaders.train),
                "steps": derive(r, world, train_images=loaders.train_images).steps_per_epoch},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["folder", "ffcv"])
def test_both_loaders_deal_repeated_aug_under_two_process_gloo(numbered, tmp_path, fmt):
    if fmt == "ffcv" and not ffcv_available() and os.environ.get("CI") != "true":
        pytest.skip("FFCV not installed")
    recipe = _recipe(numbered, fmt)
    mp.spawn(_rank, args=(2, f"file://{tmp_path}/store", str(recipe), str(tmp_path)),
             nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank, g in enumerate(got):
        expected = order.repeated_aug_order(N, 3, 1, rank, 2)[0].tolist()
        assert g["labels"].tolist() == expected  # this rank's share, in order
        assert g["len"] == 256 // 32 and g["steps"] == 512 // 64  # derive() agrees
    both = got[0]["labels"].tolist() + got[1]["labels"].tolist()
    assert max(Counter(both).values()) == 3  # each image up to 3 times, over the ranks
    split = [i for i in set(both) if i in got[0]["labels"].tolist()
             and i in got[1]["labels"].tolist()]
    assert len(split) > 100  # copies of one image are dealt to both ranks
