"""The papers' auto-augment policies as batched tensor operations, drawn per sample.

The official codes of LeViT, CvT and EarlyConv (and the CoAtNet recipe here) augment with timm's
PIL transforms (`timm/data/auto_augment.py`, timm 1.0.31): RandAugment (`rand-m9-mstd0.5-inc1`,
`rand-n2-m15-mmax15`, ...) or AutoAugment (`v0`, `original`, ...). On the FFCV path those ops run
here instead, after FFCV has decoded, cropped and flipped, on uint8 N x 3 x H x W tensors on the
training device (the GPU on a cluster; the CPU here), before normalisation.

Semantics are timm's, op for op, and each sample draws its own ops, application and magnitudes:

- the policy string is parsed as timm parses it (`n`, `m`, `mstd`, `mmax`, `inc`, `p`, `t` for
  RandAugment; `mstd` for AutoAugment), with timm's op sets (`_RAND_TRANSFORMS`,
  `_RAND_INCREASING_TRANSFORMS` for `inc1`, the weighted set for `tweights`) and policies;
- RandAugment picks `n` ops uniformly with replacement (weighted without replacement for
  `tweights`, as numpy's `choice` does), AutoAugment one sub-policy uniformly; each op then
  applies with its probability, its magnitude gets Gaussian noise (`mstd`; uniform for
  `mstd` > 100) and is clipped to [0, `mmax` or 10], and timm's level functions turn it into the
  op's argument (with the random sign, the int truncations and the `_LEVEL_DENOM` of 10);
- each op reproduces PIL's arithmetic (Pillow 13): `Image.blend`'s float32 blend and truncation
  for colour / contrast / brightness / sharpness, ITU-R 601 luma in fixed point (`L24`), the
  SMOOTH 3x3 filter in float32 with its untouched border, the exact LUTs of `ImageOps`
  (posterize, solarize, invert, equalize, autocontrast), and for the geometric ops
  `Image.transform`'s affine map over pixel centres, its bilinear / bicubic (a = -1) filters in
  float64 with edge clamping and truncation, and the fill colour (timm's `img_mean`: the
  normalisation mean in uint8, (124, 116, 104) for ImageNet) outside the source;
- posterize to 0 bits gives a black image, as Pillow < 13 and TensorFlow do (Pillow 13 raises).

The ops themselves are in repro.data.augment_ops (torch operations; for CPU batches the numba
kernels of repro.data.augment_cpu); this module parses and draws the policies and applies them.
Parity with timm's PIL ops is tested op by op (tests/test_augment.py) and reported in
`reports/augment_parity.md` (benchmarks/augment_parity.py).

Not supported (a clear error): AugMix, and the `3a` sets' GaussianBlur ops, whose PIL
implementation has no exact tensor counterpart here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from repro.data.augment_ops import LEVEL_DENOM, OPS, cpu_kernels, cpu_run

__all__ = ["auto_augment", "Policy", "Layer", "parse_policy", "OPS", "fill_color", "TrainTail",
           "apply_layers", "color_jitter"]


# timm 1.0.31 auto_augment.py: the RandAugment op sets and policies, by name.
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                              "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                              "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                              "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1,
                   "TranslateYRel": 1, "ColorIncreasing": .25, "SharpnessIncreasing": 0.25,
                   "AutoContrast": 0.25, "SolarizeIncreasing": .05, "SolarizeAdd": .05,
                   "ContrastIncreasing": .05, "BrightnessIncreasing": .05, "Equalize": .05,
                   "PosterizeIncreasing": 0.05, "Invert": 0.05}

_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)), (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _research_posterize(policy):
    """timm's `v0r` / `originalr`: the same policies with PosterizeIncreasing."""
    return tuple(tuple(("PosterizeIncreasing" if n.startswith("Posterize") else n, p, m)
                       for n, p, m in sub) for sub in policy)


AA_POLICIES = {"v0": _V0, "v0r": _research_posterize(_V0), "original": _ORIGINAL,
               "originalr": _research_posterize(_ORIGINAL)}


# --------------------------------------------------------------------------------------------
# Policies: parsing timm's strings, drawing per sample.

@dataclass
class Layer:
    """What one layer of the policy drew for a batch: per sample, the op (an index into
    `names`), whether it applies, its clipped magnitude and its argument."""

    names: tuple[str, ...]
    op: torch.Tensor  # int64, n
    applied: torch.Tensor  # bool, n
    magnitude: torch.Tensor  # float64, n (after noise and clipping)
    arg: torch.Tensor  # float64, n (the level function's output; 0 for argument-free ops)

    def __getitem__(self, part: slice) -> Layer:
        """These samples' draws."""
        return Layer(self.names, self.op[part], self.applied[part], self.magnitude[part],
                     self.arg[part])


@dataclass(frozen=True)
class Policy:
    """A parsed timm auto-augment string."""

    spec: str
    kind: str  # "rand" or "auto"
    names: tuple[str, ...]  # rand: the op set; auto: every op name the policy uses
    num_layers: int
    prob: float  # rand: per-op probability
    magnitude: float  # rand: magnitude
    magnitude_std: float
    magnitude_max: float | None
    weights: tuple[float, ...] | None = None  # rand: choice weights (without replacement)
    sub_policies: tuple = ()  # auto: ((name, prob, magnitude), ...) per sub-policy

    def draw(self, n: int, generator: torch.Generator | None = None,
             hparams: dict | None = None) -> list[Layer]:
        """Draw ops, application, magnitudes and arguments for n samples (on the CPU)."""
        g = generator
        hp = hparams or {"translate_const": 100}
        L = self.num_layers
        if self.kind == "rand":
            if self.weights is None:
                op = torch.randint(len(self.names), (n, L), generator=g)
            else:
                w = torch.tensor(self.weights, dtype=torch.float64).expand(n, -1)
                op = torch.multinomial(w, L, replacement=False, generator=g)
            prob = torch.full((n, L), self.prob, dtype=torch.float64)
            mag = torch.full((n, L), float(self.magnitude), dtype=torch.float64)
            names = self.names
        else:
            sub = torch.randint(len(self.sub_policies), (n,), generator=g)
            names = self.names
            index = {name: i for i, name in enumerate(names)}
            table_op = torch.tensor([[index[o[0]] for o in s] for s in self.sub_policies])
            table_p = torch.tensor([[o[1] for o in s] for s in self.sub_policies],
                                   dtype=torch.float64)
            table_m = torch.tensor([[float(o[2]) for o in s] for s in self.sub_policies],
                                   dtype=torch.float64)
            op, prob, mag = table_op[sub], table_p[sub], table_m[sub]
        # timm draws: random() > prob skips; gauss / uniform magnitude noise; random() > 0.5
        # negates. Drawn for every (sample, layer), used where they apply.
        u = torch.rand((n, L), generator=g, dtype=torch.float64)
        applied = ~((prob < 1.0) & (u > prob))
        if self.magnitude_std == math.inf:
            mag = torch.rand((n, L), generator=g, dtype=torch.float64) * mag
        elif self.magnitude_std > 0:
            mag = mag + self.magnitude_std * torch.randn((n, L), generator=g,
                                                         dtype=torch.float64)
        mag = mag.clamp(0.0, self.magnitude_max or LEVEL_DENOM)
        sign = torch.where(torch.rand((n, L), generator=g, dtype=torch.float64) > 0.5, -1.0, 1.0)
        layers = []
        for j in range(L):
            arg = torch.zeros(n, dtype=torch.float64)
            for k, name in enumerate(names):
                sel = op[:, j] == k
                level_fn = OPS[name].level_fn
                if sel.any() and level_fn is not None:
                    arg[sel] = level_fn(mag[sel, j], sign[sel, j], hp)
            layers.append(Layer(names, op[:, j], applied[:, j], mag[:, j], arg))
        return layers


def parse_policy(spec: str) -> Policy:
    """A timm auto-augment string -> Policy; a ValueError naming the part it cannot read."""
    parts = spec.split("-")
    head, rest = parts[0], parts[1:]
    if head == "rand":
        magnitude, num_layers, prob, increasing = int(LEVEL_DENOM), 2, 0.5, False
        mstd, mmax, tset = 0.0, None, None
        for c in rest:
            if c.startswith("t"):
                tset = c[1:]
                continue
            key, val = _split(c, spec)
            if key is None:
                continue
            if key == "mstd":
                mstd = float(val)
                mstd = math.inf if mstd > 100 else mstd
            elif key == "mmax":
                mmax = int(val)
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                magnitude = int(val)
            elif key == "n":
                num_layers = int(val)
            elif key == "p":
                prob = float(val)
            else:
                raise ValueError(f"auto-augment {spec!r}: unknown RandAugment section {c!r}")
        weights = None
        if tset == "weights":
            names, weights = tuple(RAND_WEIGHTED_0), tuple(RAND_WEIGHTED_0.values())
            total = sum(weights)
            weights = tuple(w / total for w in weights)
        elif tset in (None, ""):
            names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        elif tset in ("3a", "3aw"):
            raise ValueError(f"auto-augment {spec!r}: the 3-Augment sets need PIL's Gaussian "
                             "blur, which has no exact tensor counterpart here")
        else:
            names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        return Policy(spec, "rand", tuple(names), num_layers, prob, magnitude, mstd, mmax,
                      weights)
    if head.startswith("augmix"):
        raise ValueError(f"auto-augment {spec!r}: AugMix is not supported on the device path")
    if head not in AA_POLICIES:
        raise ValueError(f"auto-augment {spec!r}: unknown policy {head!r} (rand-..., "
                         f"{', '.join(AA_POLICIES)})")
    mstd = 0.0
    for c in rest:
        key, val = _split(c, spec)
        if key is None:
            continue
        if key != "mstd":
            raise ValueError(f"auto-augment {spec!r}: unknown AutoAugment section {c!r}")
        mstd = float(val)
    subs = AA_POLICIES[head]
    names = tuple(dict.fromkeys(o[0] for s in subs for o in s))
    return Policy(spec, "auto", names, len(subs[0]), 1.0, 0.0, mstd, None, None, subs)


def _split(section: str, spec: str):
    cs = re.split(r"(\d.*)", section)
    if len(cs) < 2:
        return None, None
    return cs[0], cs[1]


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
        return apply_layers(images, self.policy.draw(n, generator, hp), hp)

    def __repr__(self) -> str:
        return f"AutoAugment({self.policy.spec!r}, interpolation={self.interpolation})"


def apply_layers(images: torch.Tensor, layers: list[Layer], hp: dict) -> torch.Tensor:
    """Apply drawn layers to a uint8 N x 3 x H x W batch, in order.

    A CPU batch goes through the kernels of repro.data.augment_cpu image by image, all its ops
    in one call (augment_ops.cpu_run). Otherwise each op runs once per layer, as torch
    operations, on the samples it hit; the batch is held as N x H x W x 3 (channels_last
    memory), so that taking those samples and putting them back are whole-image copies."""
    if cpu_kernels(images, hp) is not None:
        return cpu_run(images, steps(layers), hp)
    x = images.permute(0, 2, 3, 1).contiguous().clone()  # our own copy, channels last
    n, h, w, c = x.shape
    rows = x.view(n, h * w * c)  # index_select over whole rows is a memcpy per image
    dev = x.device
    for layer in layers:
        for k, name in enumerate(layer.names):
            hit = torch.nonzero((layer.op == k) & layer.applied).flatten()
            if hit.numel() == 0:
                continue
            sub = rows.index_select(0, hit.to(dev)).view(-1, h, w, c).permute(0, 3, 1, 2)
            out = OPS[name].fn(sub, layer.arg[hit].to(dev), hp).permute(0, 2, 3, 1)
            for j, i in enumerate(hit.tolist()):  # (index_copy_ is elementwise here)
                x[i].copy_(out[j])
    return x.permute(0, 3, 1, 2)


def steps(layers: list[Layer]) -> list[tuple]:
    """Drawn layers as augment_ops.cpu_run takes them."""
    return [(x.names, x.op, x.applied, x.arg) for x in layers]


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

JITTER_OPS = ("Brightness", "Contrast", "Color")  # torchvision's fn_idx 0, 1, 2 (3, hue, off)


def jitter_layers(n: int, strength: float, generator: torch.Generator | None = None
                  ) -> list[Layer]:
    """torchvision's `ColorJitter(s, s, s)` as timm builds it from a scalar (no hue), drawn per
    sample as four layers: brightness, contrast and saturation factors uniform in
    [max(0, 1 - s), 1 + s], applied in a random order (layer k applies op order[k]; the fourth
    op, hue, is off). On PIL images those are ImageEnhance's Brightness / Contrast / Color, the
    ops of augment_ops."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    order = torch.rand((n, 4), generator=generator).argsort(dim=1)  # randperm(4) per sample
    factors = lo + (hi - lo) * torch.rand((n, 3), generator=generator, dtype=torch.float64)
    layers = []
    for k in range(4):
        op = order[:, k]
        arg = factors.gather(1, op.clamp(max=2)[:, None])[:, 0]
        layers.append(Layer(JITTER_OPS, op, op < 3, arg, arg))
    return layers


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
            return flip, self.policy.policy.draw(n, g, hp)
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
