"""Training sample orders, each a pure function of (seed, epoch), shared by both loaders.

`epoch_order` is a plain shuffle split across ranks. `repeated_aug_order` is DeiT's repeated
augmentation (facebookresearch/deit `samplers.py: RASampler`, which LeViT's `main.py` uses):

- the epoch's permutation, each index repeated 3 times in a row, padded from its start to a
  multiple of the world size, and dealt to the ranks in turn (rank r takes positions
  r, r + world, ...), so consecutive copies of one image land on different ranks;
- each rank keeps only its first floor(floor(N / 256) * 256 / world) positions: an epoch is
  still about N samples over all ranks (so about a third of the images, each seen 3 times,
  differently augmented).

On one process LeViT's `main.py` still uses RASampler (`if True:  # args.distributed:`) with a
world of 1: the 3 copies of an image are then consecutive, in the same batch. That is what
happens here too. One difference, stated: LeViT calls `set_epoch` only when distributed, so a
single-process LeViT run repeats epoch 0's order every epoch; here the order always follows the
epoch, as in the paper's 32-GPU runs.

DeiT seeds the permutation with the epoch alone; here with (seed, epoch), so seeds differ. Each
position also gets its own augmentation seed, so the copies of an image are augmented
differently (and a resumed run repeats them exactly).
"""

from __future__ import annotations

import torch

REPEATS = 3  # RASampler's fixed repeat count
RA_MULTIPLE = 256  # RASampler: floor(len(dataset) // 256 * 256 / num_replicas) per rank


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, positions) for this rank: an equal share of the epoch's permutation (the tail
    that does not divide by the world size is dropped, as DDP samplers do). A position numbers
    the sample within the epoch over all ranks (it seeds the sample's augmentation)."""
    per_rank = n // world
    positions = torch.arange(rank, per_rank * world, world)
    return permutation(n, seed, epoch)[positions], positions


def repeated_aug_length(n: int, world: int) -> int:
    """Samples per rank per epoch under repeated augmentation (RASampler's num_selected)."""
    return n // RA_MULTIPLE * RA_MULTIPLE // world


def repeated_aug_order(n: int, seed: int, epoch: int, rank: int, world: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, positions) for this rank under RASampler's semantics (module doc)."""
    repeated = permutation(n, seed, epoch).repeat_interleave(REPEATS)
    total = -(-n * REPEATS // world) * world  # ceil(3N / world) * world
    positions = torch.arange(rank, total, world)[:repeated_aug_length(n, world)]
    return repeated[positions % repeated.numel()], positions


def train_order(n: int, seed: int, epoch: int, rank: int, world: int, repeated_aug: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (indices, positions) for one training epoch."""
    fn = repeated_aug_order if repeated_aug else epoch_order
    return fn(n, seed, epoch, rank, world)


def samples_per_rank(n: int, world: int, repeated_aug: bool) -> int:
    return repeated_aug_length(n, world) if repeated_aug else n // world
