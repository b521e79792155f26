"""FFCV loaders: the fast path for ImageNet (pipelines after ffcv-imagenet).

Pipelines, and the hang they avoid. ffcv 1.0.2 has an open defect (libffcv/ffcv#396):
`Graph.group_operations` never resets its next front, so a CPU pipeline that alternates JIT and
non-JIT stages more than twice — e.g. decoder -> flip -> ToTensor -> ToTorchImage ->
NormalizeImage — spins forever inside `Loader()`. The pipelines here are ordered so that all
JIT stages (decoder, then flip and normalisation) come first and the torch stages (ToTensor,
ToTorchImage) last: one switch, which the graph code handles. On CPU the train flip and the
normalisation are one pass, repro's `FlipNormalize` (repro/data/ffcv_ops.py; measured in
benchmarks/data_loading.py against ffcv's two). On GPU the order is
ffcv-imagenet's (ToDevice before ToTorchImage and the normalisation on the device). The tests
run exactly these pipelines on CPU under a timeout. No patch to ffcv is applied.

Threads. ffcv sets torch's (process-wide) intra-op thread count along with numba's: to 1 when
it is imported, to `num_workers` for every Loader and again from its loader thread at every
epoch. A trainer would silently run on 1 or `num_workers` threads. `import_ffcv()` keeps the
count torch had before the import and narrows ffcv's `Compiler.set_num_threads` to numba's
threads, the ones its pipelines use; every FFCV use in repro goes through it.

Other FFCV behaviour designed around (../shared/FFCV_NOTES.md): batches reuse buffers (the
trainer must copy what it keeps); `drop_last` defaults to True (val sets it False); QUASI_RANDOM
order does not support distributed loading (RANDOM is used under DDP, as ffcv-imagenet does);
every new Loader compiles its pipeline with numba (~10 s for the train pipeline).

The papers' per-image augmentations (RandAugment / AutoAugment, colour jitter, random erasing)
run after FFCV's decode and crop, as batched tensor operations on the training device
(repro.data.augment.TrainTail, which then also does the flip, seeded); repeated augmentation
is an ffcv order (ffcv_ops). FFCV's decoders resize with OpenCV's INTER_AREA, hard-coded in
ffcv 1.0.2: the recipe's `data.interpolation` reaches the auto-augment ops but not the crop, a
deviation the schema declares and `repro.recipe.path_report` lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from repro.data import DataError, Loaders
from repro.data.beton import eval_protocol_of, file_names, protocol, read_sidecar, verify

_PATCHED = False


def import_ffcv():
    """Import ffcv without letting it take over torch's thread count (see module doc)."""
    global _PATCHED
    threads = torch.get_num_threads()
    import ffcv  # noqa: F401  (importing sets torch to 1 thread)
    from ffcv.pipeline.compiler import Compiler

    if not _PATCHED:
        import numba

        def set_num_threads(cls, n):
            cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
            numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

        Compiler.set_num_threads = classmethod(set_num_threads)
        _PATCHED = True
        torch.set_num_threads(threads)


def _open(path: str, split: str) -> int:
    """Number of samples in the .beton at `path`; a one-line DataError if it is not usable."""
    import_ffcv()
    from ffcv.reader import Reader

    how = f"create it with `repro data convert /path/to/imagenet/{split} {path}`"
    if not Path(path).is_file():
        raise DataError(f"{path}: FFCV .beton file not found; {how}")
    verify(path)  # size always, sha256 on first use: damaged data is never read silently
    try:
        reader = Reader(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable FFCV .beton ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); {how}") from None
    missing = {"image", "label"} - set(reader.field_names)
    if missing:
        raise DataError(f"{path}: .beton lacks field(s) {sorted(missing)}; {how}")
    return int(reader.num_samples)


def _tail(mean, std, device: torch.device, hflip: float = 0.0, uint8: bool = False):
    """Flip, normalise, convert to torch: JIT stages first, torch stages last (module doc).

    On CPU the flip and the normalisation are one pass (`FlipNormalize`); on GPU the order is
    ffcv-imagenet's: flip on the CPU, normalise on the device. `uint8`: hand the cropped uint8
    N x 3 x H x W images (on the device) to the device augmentation, which flips (seeded, and
    without FFCV's copy of every image), augments and normalises them
    (repro.data.augment.TrainTail).
    """
    from ffcv.transforms import (
        NormalizeImage,
        RandomHorizontalFlip,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    from repro.data.ffcv_ops import FlipNormalize

    flip = [RandomHorizontalFlip(flip_prob=hflip)] if hflip > 0 else []
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    if uint8:
        return [ToTensor(), *to_device, ToTorchImage()]
    mean = np.array(mean) * 255
    std = np.array(std) * 255
    if device.type == "cuda":
        return flip + [ToTensor(), *to_device, ToTorchImage(),
                       NormalizeImage(mean, std, np.float32)]
    normalize = FlipNormalize(hflip, mean, std) if hflip > 0 else NormalizeImage(
        mean, std, np.float32)
    return [normalize, ToTensor(), ToTorchImage()]


def train_pipeline(res: int, scale, ratio, hflip: float, mean, std, device,
                   uint8: bool = False) -> list:
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder

    return [RandomResizedCropRGBImageDecoder((res, res), scale=tuple(scale),
                                             ratio=tuple(ratio))] + _tail(
        mean, std, torch.device(device), hflip, uint8)


def val_pipeline(res: int, crop_pct: float, mean, std, device, exact: bool = False) -> list:
    """`exact`: the file holds the protocol's images already (an eval-protocol file, see
    repro.data.convert): decode as they are. Otherwise FFCV's centre-crop decoder, whose
    `ratio` is the crop's share of the shorter side (the geometry of resize(res / crop_pct) +
    centre-crop(res)) but which resizes the stored copy with OpenCV's area filter."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, SimpleRGBImageDecoder

    decoder = SimpleRGBImageDecoder() if exact else CenterCropRGBImageDecoder((res, res),
                                                                              ratio=crop_pct)
    return [decoder] + _tail(mean, std, torch.device(device))


def label_pipeline(device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    # Squeeze(1), not Squeeze(): a last batch of one would otherwise lose its batch dimension.
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    if torch.device(device).type == "cuda":
        ops.append(ToDevice(torch.device(device), non_blocking=True))
    return ops


def make_loader(path: str, pipeline: list, *, batch_size: int, workers: int, train: bool,
                distributed: bool, device, seed: int, indices=None, in_memory: bool = True,
                repeated_aug: bool = False, rank: int = 0, world: int = 1):
    """An ffcv Loader over `path` with `pipeline` for images.

    As ffcv-imagenet: training on one process reads in QUASI_RANDOM order (the file's pages in
    a random order, 2 x batch_size of them buffered, samples shuffled within them: a full
    shuffle in effect, with page-sized reads), under DDP in RANDOM order (QUASI_RANDOM is not
    implemented for distributed loading); evaluation reads sequentially. `repeated_aug`: DeiT's
    repeated augmentation on any number of processes (repro.data.order), dealt to this `rank`
    of `world` by the order itself. `in_memory`: read through the OS page cache (a file that
    fits in RAM) rather than ffcv's own page reader.
    """
    import_ffcv()
    from ffcv.loader import Loader, OrderOption

    from repro.data.ffcv_ops import RepeatedAugmentation, SeededQuasiRandom

    if train and repeated_aug:
        order, distributed = OrderOption.RANDOM, False  # replaced below
    elif not train:
        order = OrderOption.SEQUENTIAL
    elif distributed:
        order = OrderOption.RANDOM
    else:
        order = OrderOption.QUASI_RANDOM
    loader = Loader(path, batch_size=batch_size, num_workers=max(1, workers), order=order,
                    os_cache=in_memory, drop_last=train, distributed=distributed, seed=seed,
                    indices=indices, pipelines={"image": pipeline,
                                                "label": label_pipeline(device)})
    # Orders fixed by (seed, epoch) (see ffcv_ops), set after construction: ffcv 1.0.2's Loader
    # rejects TraversalOrder subclasses (it tests isinstance, not issubclass). Its length comes
    # from the first epoch's order, so that is drawn again.
    if train and repeated_aug:
        loader.traversal_order = RepeatedAugmentation(loader, rank, world)
    elif order == OrderOption.QUASI_RANDOM:
        loader.traversal_order = SeededQuasiRandom(loader)
    loader.first_traversal_order = loader.next_traversal_order()
    return loader


class FFCVTrain:
    """Training batches of one epoch, from any batch on (for resume).

    The sample order is fixed by (seed, epoch), and so is the device augmentation (`augment`:
    one seed per (seed, epoch, rank, batch), flips included); FFCV's random crops (and its
    flips, when there is no device augmentation) are drawn in numba threads that no seed
    reaches, so a resumed FFCV run repeats the order and the device augmentation, not the
    crops (the ImageFolder loader is the bitwise-reproducible one).
    Batches reuse buffers, FFCV's and the device augmentation's alike: clone what you keep.
    """

    def __init__(self, loader, augment=None, seed: int = 0, rank: int = 0):
        self.loader, self.augment, self.seed, self.rank = loader, augment, seed, rank

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_batch: int = 0):
        self.loader.next_epoch = epoch  # ffcv advances it on each iter()
        it = iter(self.loader)
        for _ in range(start_batch):  # FFCV cannot start mid-epoch: decode and discard
            next(it)
        if self.augment is None:
            return it
        return self._augmented(it, epoch, start_batch)

    def _augmented(self, batches, epoch: int, start: int):
        from repro.data.augment import batch_seed

        for b, (images, labels) in enumerate(batches, start):
            yield self.augment(images, batch_seed(self.seed, epoch, self.rank, b)), labels

    def __iter__(self):  # each pass is the next epoch, as ffcv's own loader
        return self.epoch(self.loader.next_epoch)


def build(recipe, train_path: str, val_path: str, *, batch_size: int, eval_batch_size: int,
          rank: int, world_size: int, device, seed: int) -> Loaders:
    from repro.data.augment import TrainTail

    d, a, e = recipe.data, recipe.aug, recipe.eval
    n_train, n_val = _open(train_path, "train"), _open(val_path, "val")
    tail = TrainTail(auto_augment=a.auto_augment, color_jitter=a.color_jitter,
                     interpolation=d.interpolation, mean=d.mean, std=d.std, re_prob=a.re_prob,
                     re_mode=a.re_mode, re_count=a.re_count, hflip=d.hflip)
    tail = tail if tail.active else None
    train = make_loader(train_path, train_pipeline(d.resolution, d.scale, d.ratio, d.hflip,
                                                   d.mean, d.std, device,
                                                   uint8=tail is not None),
                        batch_size=batch_size, workers=d.workers, train=True,
                        distributed=world_size > 1, device=device, seed=seed,
                        in_memory=d.in_memory, repeated_aug=d.repeated_aug, rank=rank,
                        world=world_size)
    # Evaluation: exactly the protocol from an eval-protocol file (checked against the recipe),
    # else FFCV's centre crop (a deviation, listed). Disjoint shards, no padding (FFCV's
    # distributed mode would pad).
    want = protocol(e.resolution or d.resolution, e.crop_pct, e.interpolation)
    have = eval_protocol_of(val_path)
    if have is not None and have != want:
        raise DataError(f"{val_path}: written for the eval protocol {_show(have)}, the recipe "
                        f"asks for {_show(want)} (eval.resolution / eval.crop_pct / "
                        f"eval.interpolation); write one with `repro data convert VAL_DIR DIR "
                        f"--eval-protocol {want['resolution']},{want['crop_pct']:g},"
                        f"{want['interpolation']}`")
    val = make_loader(val_path, val_pipeline(want["resolution"], e.crop_pct, d.mean, d.std,
                                             device, exact=have is not None),
                      batch_size=eval_batch_size, workers=d.workers, train=False,
                      distributed=False, device=device, seed=seed,
                      indices=list(range(rank, n_val, world_size)), in_memory=d.in_memory)
    train = FFCVTrain(train, tail, seed, rank)
    side = read_sidecar(train_path) or {}
    num_classes = side.get("num_classes") or recipe.model.num_classes
    return Loaders(train, val, "ffcv", train_path, val_path, num_classes, n_train, n_val,
                   exact_eval=have is not None, val_files=file_names(val_path))


def _show(p: dict) -> str:
    return f"{p['resolution']},{p['crop_pct']:g},{p['interpolation']}"
