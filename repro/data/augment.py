"""The papers' auto-augment policies as batched tensor operations, drawn per sample.

The official codes of LeViT, CvT and EarlyConv (and the CoAtNet recipe here) augment with timm's
PIL transforms (`timm/data/auto_augment.py`, timm 1.0.31): RandAugment (`rand-m9-mstd0.5-inc1`,
`rand-n2-m15-mmax15`, ...) or AutoAugment (`v0`, `original`, ...). On the FFCV path those ops run
here instead, after FFCV has decoded, cropped and flipped, on uint8 N x 3 x H x W tensors on the
training device (the GPU on a cluster; the CPU here), before normalisation.

Semantics are timm's, op for op, and each sample draws its own ops, application and magnitudes:

- the policy string is parsed as timm parses it, with timm's op sets and policies
  (repro.recipe.policy);
- each sample draws its ops, their application, magnitudes and signs as timm does
  (repro.data.augment_layers);
- each op reproduces PIL's arithmetic (Pillow 13): `Image.blend`'s float32 blend and truncation
  for colour / contrast / brightness / sharpness, ITU-R 601 luma in fixed point (`L24`), the
  SMOOTH 3x3 filter in float32 with its untouched border, the exact LUTs of `ImageOps`
  (posterize, solarize, invert, equalize, autocontrast), and for the geometric ops
  `Image.transform`'s affine map over pixel centres, its bilinear / bicubic (a = -1) filters in
  float64 with edge clamping and truncation, and the fill colour (timm's `img_mean`: the
  normalisation mean in uint8, (124, 116, 104) for ImageNet) outside the source;
- posterize to 0 bits gives a black image, as Pillow < 13 and TensorFlow do (Pillow 13 raises).

The ops are named in repro.data.augment_ops (torch operations in augment_pixel and
augment_affine; for CPU batches the numba kernels of repro.data.augment_cpu). This module holds
what the loaders use: `auto_augment`, `color_jitter` and `TrainTail`, the whole training tail
after FFCV. Parity with timm's PIL ops is tested op by op (tests/test_augment.py) and reported in
`reports/augment_parity.md` (benchmarks/augment_parity.py).

Not supported (a clear error): AugMix, and the `3a` sets' GaussianBlur ops, whose PIL
implementation has no exact tensor counterpart here.
"""

from __future__ import annotations

import torch

from repro.data.augment_layers import Layer, apply_layers, jitter_layers, policy_layers, steps
from repro.data.augment_ops import cpu_kernels, cpu_run
from repro.recipe.policy import Policy, parse_policy

__all__ = ["auto_augment", "AutoAugment", "fill_color", "color_jitter", "TrainTail",
           "batch_seed"]


def fill_color(mean) -> tuple[int, ...]:
    """timm's `img_mean` for the auto-augment ops: the normalisation mean in uint8."""
    return tuple(min(255, round(255 * m)) for m in mean)


class AutoAugment:
    """A policy applied to uint8 N x 3 x H x W batches, drawn independently per sample."""

    def __init__(self, policy: Policy, *, interpolation: str, mean, translate_pct: float = 0.45,
                 backend: str = "auto"):
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation {interpolation!r}: bilinear or bicubic")
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r}: auto (numba kernels for CPU batches when "
                             "numba is installed, torch ops otherwise) or torch")
        self.backend = backend
        self.policy = policy
        self.interpolation = interpolation
        self.fill = torch.tensor(fill_color(mean), dtype=torch.uint8)
        self.translate_pct = translate_pct

    def hparams(self, h: int, w: int, device) -> dict:
        return {"translate_const": int(min(h, w) * 0.45), "translate_pct": self.translate_pct,
                "fill": self.fill.to(device), "interpolation": self.interpolation,
                "backend": self.backend}

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"auto_augment takes uint8 N x 3 x H x W images, got "
                            f"{images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        hp = self.hparams(h, w, images.device)
        return apply_layers(images, policy_layers(self.policy, n, generator, hp), hp)

    def __repr__(self) -> str:
        return f"AutoAugment({self.policy.spec!r}, interpolation={self.interpolation})"


def auto_augment(spec: str, *, interpolation: str, mean, backend: str = "auto") -> AutoAugment:
    """The timm auto-augment policy `spec` as a batched, per-sample tensor transform.

    The returned callable maps a uint8 N x 3 x H x W tensor (any device) to one of the same
    shape; pass `generator` (a CPU torch.Generator) to make the draws reproducible.
    `interpolation` is the recipe's (timm passes the train interpolation to the geometric ops)
    and `mean` the normalisation mean in [0, 1] (the fill colour is derived from it as timm
    does). `backend`: "auto" runs CPU batches through the numba kernels of
    repro.data.augment_cpu when numba is installed (same results), "torch" always uses torch
    operations (what a GPU runs).
    """
    return AutoAugment(parse_policy(spec), interpolation=interpolation, mean=mean,
                       backend=backend)


# --------------------------------------------------------------------------------------------
# Colour jitter and the whole training tail after FFCV.

def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Colour jitter of strength s (see jitter_layers) on a uint8 N x 3 x H x W batch."""
    return apply_layers(x, jitter_layers(x.shape[0], strength, generator), {})


class TrainTail:
    """timm's training transforms after the crop, on a batch on the training device: the
    horizontal flip (`hflip`), the auto-augment policy (or colour jitter, which timm turns off
    when a policy is set) on uint8, then ToTensor + Normalize (x / 255, - mean, / std, float32,
    as torchvision computes them), then timm's own `RandomErasing` on the normalised batch.
    Drawn per sample, from one seed per batch: a batch's augmentation, flips included, is a
    pure function of that seed.

    On the CPU (numba kernels, repro.data.augment_cpu) the batch is drawn once, then split
    between the calling thread and `cpu_workers - 1` helper threads, the kernels releasing the
    GIL: a consumer thread alone cannot keep up with FFCV's loader threads (measured: 96 % of
    the epoch spent in the augmentation on one thread). Each image is flipped, augmented and
    normalised in one pass through cache-sized scratch images; FFCV's own flip, a copy of every
    image, cost ~0.15 ms of CPU per image here. The float32 output cycles through `buffers`
    reused batches, as FFCV's own batches do (a fresh 38 MB batch costs ~10k page faults): a
    batch stays valid until `buffers` more are made; clone what you keep. `backend`: "auto"
    (the kernels for CPU batches when numba is installed) or "torch" (torch operations
    everywhere, what a GPU runs; the same values)."""

    def __init__(self, *, auto_augment: str | None, color_jitter: float | None,
                 interpolation: str, mean, std, re_prob: float, re_mode: str, re_count: int,
                 hflip: float = 0.0, buffers: int = 2, cpu_workers: int | None = None,
                 backend: str = "auto"):
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r}: auto or torch")
        self.policy = None
        if auto_augment:
            self.policy = AutoAugment(parse_policy(auto_augment), interpolation=interpolation,
                                      mean=mean, backend=backend)
        self.jitter = color_jitter if (color_jitter and not auto_augment) else None
        self.hflip = hflip
        self.backend = backend
        self.interpolation = interpolation
        self.fill = torch.tensor(fill_color(mean), dtype=torch.uint8)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.erasing = (re_prob, re_mode, re_count) if re_prob > 0 else None
        self._erasers: dict = {}
        self.buffers = buffers
        if cpu_workers is None:  # the cores this process may use, up to 8
            import os

            cpu_workers = min(8, len(os.sched_getaffinity(0)))
        self.cpu_workers = cpu_workers
        self._pool = None
        self._ring: list[torch.Tensor] = []
        self._next = 0

    @property
    def active(self) -> bool:
        """Whether there is more to do than FFCV's one-pass flip and normalisation."""
        return bool(self.policy or self.jitter or self.erasing)

    def _output(self, shape) -> torch.Tensor:
        """The next of `buffers` reused float32 CPU outputs of this shape."""
        if not self._ring or self._ring[0].shape != shape:
            self._ring, self._next = [], 0
        if len(self._ring) < self.buffers:
            self._ring.append(torch.empty(shape, dtype=torch.float32))
        out = self._ring[self._next % len(self._ring)]
        self._next += 1
        return out

    def _table(self) -> torch.Tensor:
        """The 3 x 256 float32 values of each uint8 level after ToTensor + Normalize, computed
        by the same torch operations as the batch would be."""
        levels = torch.arange(256, dtype=torch.float32).expand(1, 3, 256)
        return levels.div(255).sub_(self.mean.view(1, 3, 1)).div_(self.std.view(1, 3, 1))[0]

    def hparams(self, h: int, w: int, device) -> dict:
        if self.policy is not None:
            return self.policy.hparams(h, w, device)
        return {"fill": self.fill.to(device), "interpolation": self.interpolation,
                "backend": self.backend}

    def draw(self, n: int, g: torch.Generator, hp: dict) -> tuple[torch.Tensor, list[Layer]]:
        """A batch's flips (bool, n) and layers (the policy's, or colour jitter's)."""
        flip = (torch.rand(n, generator=g) < self.hflip if self.hflip > 0
                else torch.zeros(n, dtype=torch.bool))
        if self.policy is not None:
            return flip, policy_layers(self.policy.policy, n, g, hp)
        if self.jitter is not None:
            return flip, jitter_layers(n, self.jitter, g)
        return flip, []

    def _cpu(self, images: torch.Tensor, flip: torch.Tensor, layers: list[Layer],
             hp: dict) -> torch.Tensor:
        """Flip, layers and normalisation of a CPU batch in the kernels of
        repro.data.augment_cpu, in parts on `cpu_workers` threads (the same result as in one
        part: every op is per sample)."""
        from concurrent.futures import ThreadPoolExecutor

        n, c, h, w = images.shape
        out = self._output((n, h, w, c))
        table = self._table()
        workers = self.cpu_workers if n >= 2 * self.cpu_workers else 1
        bounds = [n * i // workers for i in range(workers + 1)]

        def part(i):
            s = slice(bounds[i], bounds[i + 1])
            cpu_run(images[s], steps([layer[s] for layer in layers]), hp, table, out[s],
                    flip[s])

        if workers > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpu_workers - 1,
                                            thread_name_prefix="repro-augment")
        helpers = [self._pool.submit(part, i) for i in range(1, workers)]
        part(0)
        for f in helpers:
            f.result()
        return out.permute(0, 3, 1, 2)

    def _eraser(self, device):
        from timm.data.random_erasing import RandomErasing

        key = str(device)
        if key not in self._erasers:
            p, mode, count = self.erasing
            self._erasers[key] = RandomErasing(p, mode=mode, max_count=count, device=device)
        return self._erasers[key]

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        n, _, h, w = images.shape
        dev = images.device
        hp = self.hparams(h, w, dev)
        flip, layers = self.draw(n, g, hp)
        if cpu_kernels(images, hp) is not None:
            out = self._cpu(images, flip, layers, hp)
        else:
            x = images
            if bool(flip.any()):
                x = torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
            x = apply_layers(x, layers, hp)
            out = x.to(torch.float32).div_(255).sub_(self.mean.to(dev)).div_(self.std.to(dev))
            out = out.contiguous(memory_format=torch.channels_last)
        if self.erasing is not None:
            # timm's RandomErasing draws from Python's `random` and torch's generator: both are
            # seeded for this batch and restored afterwards.
            import random

            state = random.getstate()
            devices = [dev] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                random.seed(seed)
                torch.manual_seed(seed)
                out = self._eraser(dev)(out)
            random.setstate(state)
        return out


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The augmentation seed of one training batch (any function of these four will do; this
    one keeps them apart for any realistic run)."""
    return (((seed * 1_000_003 + epoch) * 65_537 + rank) * 2_147_483_629 + batch) % 2**63
