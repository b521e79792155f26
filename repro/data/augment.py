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

Parity with timm's PIL ops is tested op by op (tests/test_augment.py) and reported in
`reports/augment_parity.md` (benchmarks/augment_parity.py).

Not supported (a clear error): AugMix, and the `3a` sets' GaussianBlur ops, whose PIL
implementation has no exact tensor counterpart here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["auto_augment", "Policy", "Layer", "parse_policy", "OPS", "fill_color"]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM

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
# Level functions: timm's `LEVEL_TO_ARG`, vectorised over float64 magnitudes. `sign` is -1 where
# timm's `_randomly_negate` negated the value (random() > 0.5), else +1.

def _lv(level):
    return level / LEVEL_DENOM


def _rotate_arg(level, sign, hp):
    return (_lv(level) * 30.0) * sign


def _enhance_arg(level, sign, hp):
    return _lv(level) * 1.8 + 0.1


def _enhance_increasing_arg(level, sign, hp):
    return torch.clamp(1.0 + (_lv(level) * 0.9) * sign, min=0.1)


def _shear_arg(level, sign, hp):
    return (_lv(level) * 0.3) * sign


def _translate_abs_arg(level, sign, hp):
    return (_lv(level) * float(hp["translate_const"])) * sign


def _translate_rel_arg(level, sign, hp):
    return (_lv(level) * hp.get("translate_pct", 0.45)) * sign


def _posterize_arg(level, sign, hp):
    return torch.trunc(_lv(level) * 4)


def _posterize_increasing_arg(level, sign, hp):
    return 4 - _posterize_arg(level, sign, hp)


def _posterize_original_arg(level, sign, hp):
    return _posterize_arg(level, sign, hp) + 4


def _solarize_arg(level, sign, hp):
    return torch.clamp(torch.trunc(_lv(level) * 256), max=256)


def _solarize_increasing_arg(level, sign, hp):
    return 256 - _solarize_arg(level, sign, hp)


def _solarize_add_arg(level, sign, hp):
    return torch.clamp(torch.trunc(_lv(level) * 110), max=128)


# --------------------------------------------------------------------------------------------
# The ops, on uint8 n x 3 x H x W tensors with one float64 argument per sample (shape n).

def _kernels(x: torch.Tensor, hp: dict | None):
    """repro.data.augment_cpu for a CPU batch (one fused pass per op instead of one pass per
    torch operation), unless hp asks for the torch ops (`backend: torch`) or numba is absent."""
    if x.device.type != "cpu" or (hp or {}).get("backend") == "torch":
        return None
    try:
        from repro.data import augment_cpu
    except ImportError:  # numba comes with the ffcv extra
        return None
    return augment_cpu


def _nhwc(x: torch.Tensor):
    """n x 3 x H x W -> its n x H x W x 3 numpy view (a copy only if not channels_last)."""
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _kernel_out(x: torch.Tensor):
    """A fresh channels_last n x 3 x H x W uint8 tensor and its n x H x W x 3 numpy view."""
    n, c, h, w = x.shape
    out = torch.empty((n, h, w, c), dtype=torch.uint8)
    return out.permute(0, 3, 1, 2), out.numpy()


def _lut(x: torch.Tensor, lut: torch.Tensor, hp: dict | None = None) -> torch.Tensor:
    """Apply a per-sample, per-channel 256-entry uint8 table (n x 3 x 256) to x."""
    k = _kernels(x, hp)
    if k is not None:
        out, view = _kernel_out(x)
        k.lut(_nhwc(x), lut.contiguous().numpy(), view)
        return out
    n, c = x.shape[:2]
    offset = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1, 1)
    return lut.reshape(-1)[x.long() + offset]


def _u8(v: torch.Tensor) -> torch.Tensor:
    """C's `(UINT8)v` after PIL's clip to [0, 255]: truncation toward zero."""
    return v.clamp(0, 255).trunc().to(torch.uint8)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`Image.blend(degenerate, x, factor)`: in1 + alpha * (in2 - in1) in float32 (C float),
    clipped and truncated (ImagingBlend)."""
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    return _u8(d + alpha * (x.to(torch.float32) - d))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """RGB -> L as Pillow converts (Convert.c rgb2l: fixed point L24 >> 16), int32, n x H x W."""
    x = x.to(torch.int32)
    return (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16


def auto_contrast(x, arg, hp):
    flat = x.flatten(2)
    lo, hi = flat.amin(2).double(), flat.amax(2).double()  # n x 3
    # 255 / span as a true division (a Python scalar over a tensor would take the reciprocal).
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    offset = -lo * scale
    ix = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = _u8(torch.trunc(ix * scale[..., None] + offset[..., None]))
    identity = ix.to(torch.uint8).expand_as(lut)
    lut = torch.where((hi <= lo)[..., None], identity, lut)
    return _lut(x, lut, hp)


def equalize(x, arg, hp):
    n, c = x.shape[:2]
    k = _kernels(x, hp)
    if k is not None:
        hist = torch.zeros((n, c, 256), dtype=torch.int64)
        k.histogram(_nhwc(x), hist.numpy())
    else:
        offset = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1)
        hist = torch.bincount((x.flatten(2).long() + offset).reshape(-1),
                              minlength=n * c * 256).view(n, c, 256)
    nonzero = hist > 0
    last = 255 - nonzero.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)  # last used level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255).to(torch.uint8)
    keep = (nonzero.sum(-1, keepdim=True) <= 1) | (step == 0)
    identity = torch.arange(256, device=x.device, dtype=torch.uint8).expand_as(lut)
    return _lut(x, torch.where(keep, identity, lut), hp)


def invert(x, arg, hp):
    return 255 - x


def posterize(x, arg, hp):
    # ImageOps.posterize's mask; 0 bits -> 0 (black), as Pillow < 13 and TensorFlow give.
    bits = arg.to(torch.int64).clamp(0, 8)
    mask = ((~((1 << (8 - bits)) - 1)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def _table_op(x, hp, table_fn, direct_fn):
    """A pointwise op: through a per-sample table (n x 3 x 256) by the CPU kernel, else
    directly with torch operations."""
    if _kernels(x, hp) is not None:
        levels = torch.arange(256, dtype=torch.int16).view(1, 1, 256)
        return _lut(x, table_fn(levels).to(torch.uint8).expand(x.shape[0], x.shape[1], 256),
                    hp)
    return direct_fn(x.to(torch.int16)).to(torch.uint8)


def solarize(x, arg, hp):
    thresh = arg.to(torch.int16).view(-1, 1, 1).to(x.device)

    def fn(v):  # ImageOps.solarize's table: v if v < threshold else 255 - v
        t = thresh.view(-1, *([1] * (v.dim() - 1)))
        return torch.where(v < t, v, 255 - v)

    return _table_op(x, hp, fn, fn)


def solarize_add(x, arg, hp):
    add = arg.to(torch.int16).to(x.device)

    def fn(v):  # timm's solarize_add table: min(255, v + add) below 128, else v
        a = add.view(-1, *([1] * (v.dim() - 1)))
        return torch.where(v < 128, (v + a).clamp(max=255), v)

    return _table_op(x, hp, fn, fn)


def color(x, arg, hp):
    k = _kernels(x, hp)
    if k is not None:
        out, view = _kernel_out(x)
        k.color(_nhwc(x), arg.to(torch.float32).numpy(), view)
        return out
    grey = _luma(x).to(torch.uint8)[:, None].expand_as(x)
    return _blend(grey, x, arg)


def _blend_level(level: torch.Tensor, x, arg, hp):
    """Blend with a constant degenerate image per sample (uint8 level, shape n)."""
    k = _kernels(x, hp)
    if k is not None:
        out, view = _kernel_out(x)
        k.blend_const(level.to(torch.uint8).numpy(), _nhwc(x), arg.to(torch.float32).numpy(),
                      view)
        return out
    return _blend(level.to(torch.uint8).view(-1, 1, 1, 1).expand_as(x), x, arg)


def contrast(x, arg, hp):
    k = _kernels(x, hp)
    if k is not None:
        n, _, h, w = x.shape
        luma = torch.empty((n, h, w), dtype=torch.uint8)
        k.luma(_nhwc(x), luma.numpy())
        luma = luma.flatten(1)
    else:
        luma = _luma(x).flatten(1)
    # ImageStat's mean of the L histogram, in double, rounded as int(mean + 0.5).
    mean = torch.floor(luma.sum(1, dtype=torch.int64).double() / luma.shape[1] + 0.5)
    return _blend_level(mean, x, arg, hp)


def brightness(x, arg, hp):
    return _blend_level(torch.zeros(x.shape[0], device=x.device), x, arg, hp)


# ImageFilter.SMOOTH, (1 1 1 / 1 5 1 / 1 1 1) / 13, divided in float32 as _imaging.c does.
_K1 = torch.tensor(1.0, dtype=torch.float32) / 13
_K5 = torch.tensor(5.0, dtype=torch.float32) / 13


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """`ImageFilter.SMOOTH` as Filter.c's ImagingFilter3x3 computes it: float32, the rows summed
    as ((a*k0 + b*k1) + c*k2), below / centre / above in that order onto 0.5, truncated; the
    one-pixel border copied."""
    f = x.to(torch.float32)
    k1, k5 = _K1.to(x.device), _K5.to(x.device)

    def row(r, centre):
        left, mid, right = r[..., :-2], r[..., 1:-1], r[..., 2:]
        return (left * k1 + mid * (k5 if centre else k1)) + right * k1

    ss = 0.5 + row(f[:, :, 2:], False)
    ss = ss + row(f[:, :, 1:-1], True)
    ss = ss + row(f[:, :, :-2], False)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _u8(ss)
    return out


def sharpness(x, arg, hp):
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.clone()  # PIL's filter returns a copy of images smaller than the kernel
    k = _kernels(x, hp)
    if k is not None:
        out, view = _kernel_out(x)
        k.sharpness(_nhwc(x), arg.to(torch.float32).numpy(), _K1.numpy(), _K5.numpy(), view)
        return out
    return _blend(_smooth(x), x, arg)


# Geometric ops: PIL's reverse affine map (destination pixel centre -> source point).

def _rotate_matrix(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """`Image.rotate(degrees)`'s matrix, computed as Pillow does (angle % 360, rounded to 15
    decimals, about the centre (w / 2, h / 2))."""
    angle = -math.radians(degrees % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return tuple(m)


def _matrices(name: str, arg: torch.Tensor, w: int, h: int) -> torch.Tensor:
    a = arg.detach().cpu().to(torch.float64)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if name == "Rotate":
        return torch.tensor([_rotate_matrix(float(d), w, h) for d in a], dtype=torch.float64)
    rows = {
        "ShearX": (one, a, zero, zero, one, zero),
        "ShearY": (one, zero, zero, a, one, zero),
        "TranslateX": (one, zero, a, zero, one, zero),
        "TranslateY": (one, zero, zero, zero, one, a),
        "TranslateXRel": (one, zero, a * w, zero, one, zero),
        "TranslateYRel": (one, zero, zero, zero, one, a * h),
    }[name]
    return torch.stack(rows, dim=1)


def _cubic(v1, v2, v3, v4, d):
    """Geometry.c's BICUBIC macro (a = -1), in its order of operations."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


def _lerp(a, b, d):
    """Geometry.c's BILINEAR macro: a + (b - a) * d."""
    return a + (b - a) * d


# Interpolated values are computed in float32 as weighted sums of the taps and truncated; where a
# float32 value lies this close to an integer (its error is far below: ~1e-4 on 0-255 data), that
# pixel is recomputed in float64 in PIL's own order of operations, so the result is PIL's exactly.
_NEAR = {"bilinear": 2e-3, "bicubic": 1e-2}


def _weights(interpolation: str, d: torch.Tensor) -> list[torch.Tensor]:
    """The taps' weights at fractional offset d: (1 - d, d), or the a = -1 cubic's four."""
    if interpolation == "bilinear":
        return [1 - d, d]
    d2, d3 = d * d, d * d * d
    return [-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2]


def _packed(x: torch.Tensor) -> torch.Tensor:
    """n x 3 x H x W uint8 -> n x (H*W) int32, one RGB0 pixel per element (gathered once for all
    three channels)."""
    n, c, h, w = x.shape
    p = torch.zeros((n, h, w, 4), dtype=torch.uint8, device=x.device)
    p[..., :c] = x.permute(0, 2, 3, 1)
    return p.view(torch.int32).view(n, h * w)


def _source(k0, k1, k2, xo, yo):
    """PIL's `a0 * xin + a1 * yin + a2` in float64, with the terms whose coefficient is 0 for
    every sample left out (exactly the same values; the result keeps only the axes it varies
    along, so a translation costs one row of coordinates, not a whole image)."""
    u = k0 * xo if bool((k0 != 0).any()) else None
    if bool((k1 != 0).any()):
        u = k1 * yo if u is None else u + k1 * yo
    return k2.expand(-1, 1, 1) if u is None else u + k2


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor,
           interpolation: str, backend: dict | None = None) -> torch.Tensor:
    """`Image.transform(size, AFFINE, m, resample, fillcolor=fill)` per sample.

    Destination pixel (i, j) samples the source at m applied to its centre (i + 0.5, j + 0.5)
    (Geometry.c affine_transform, float64); a point outside [0, W) x [0, H) keeps the fill
    colour; inside, the bilinear or bicubic filter reads edge-clamped neighbours and truncates
    (bilinear_filter32RGB, bicubic_filter32RGB). Where the map leaves y alone for every sample
    (shear / translate in x) each destination row reads its own source row, PIL's filter then
    weighing the other rows by exactly 0, so only one direction is tapped; likewise for x.
    """
    if interpolation not in _NEAR:
        raise ValueError(f"interpolation {interpolation!r}: bilinear or bicubic")
    k = _kernels(x, backend)
    if k is not None:
        out, view = _kernel_out(x)
        k.affine(_nhwc(x), matrices.to(torch.float64).contiguous().numpy(),
                 fill.cpu().numpy(), interpolation == "bicubic", view)
        return out
    n, c, h, w = x.shape
    dev = x.device
    m = matrices.to(dev, torch.float64).view(n, 6, 1, 1)
    yo = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    xo = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    mf = m.flatten(1)
    along_x = bool(((mf[:, 3] == 0) & (mf[:, 4] == 1) & (mf[:, 5] == 0)).all())
    along_y = bool(((mf[:, 0] == 1) & (mf[:, 1] == 0) & (mf[:, 2] == 0)).all())
    xin = xo.expand(n, 1, w) if along_y else _source(m[:, 0], m[:, 1], m[:, 2], xo, yo)
    yin = yo.expand(n, h, 1) if along_x else _source(m[:, 3], m[:, 4], m[:, 5], xo, yo)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)  # n x H x W
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]  # n x (H|1) x (W|1) x 1
    x0, y0 = x0.long(), y0.long()
    src = _packed(x)
    taps = (0, 1) if interpolation == "bilinear" else (-1, 0, 1, 2)
    ty = (0,) if along_x else taps
    tx = (0,) if along_y else taps

    def tap(oy, ox):  # n x H x W x c uint8: the clamped neighbour (oy, ox) of each sample point
        idx = (y0 + oy).clamp_(0, h - 1).mul_(w) + (x0 + ox).clamp_(0, w - 1)
        idx = idx.expand(n, h, w).reshape(n, h * w)
        return src.gather(1, idx).view(torch.uint8).view(n, h, w, 4)[..., :c]

    grid = [[tap(oy, ox) for ox in tx] for oy in ty]
    wx = _weights(interpolation, dx.float()) if len(tx) > 1 else [None]
    wy = _weights(interpolation, dy.float()) if len(ty) > 1 else [None]
    v = None
    for row, w_y in zip(grid, wy, strict=True):
        line = None
        for t, w_x in zip(row, wx, strict=True):
            term = t.float() if w_x is None else t.float().mul_(w_x)
            line = term if line is None else line.add_(term)
        line = line if w_y is None else line.mul_(w_y)
        v = line if v is None else v.add_(line)
    near = ((v - v.round()).abs_() < _NEAR[interpolation]).any(-1)  # n x H x W
    out = _u8(v)
    if near.any():  # recompute those pixels in float64, in PIL's order of operations
        sel = near.nonzero(as_tuple=True)
        step = _lerp if interpolation == "bilinear" else _cubic
        dxs = dx.expand(n, h, w, 1)[sel]
        dys = dy.expand(n, h, w, 1)[sel]
        lines = [r[0][sel].double() if len(r) == 1 else
                 step(*(t[sel].double() for t in r), dxs) for r in grid]
        exact = lines[0] if len(lines) == 1 else step(*lines, dys)
        out[sel] = _u8(exact)
    out = out.permute(0, 3, 1, 2)
    return torch.where(inside[:, None], out, fill.to(dev).view(1, c, 1, 1))


def _geometric(name: str) -> Callable:
    def op(x, arg, hp):
        h, w = x.shape[-2:]
        return affine(x, _matrices(name, arg, w, h), hp["fill"], hp["interpolation"], hp)

    op.__name__ = name
    return op


@dataclass(frozen=True)
class Op:
    """One of timm's named ops: the image function and its level -> argument function."""

    name: str
    fn: Callable
    level_fn: Callable | None


def _op(name, fn, level_fn=None):
    return name, Op(name, fn, level_fn)


OPS: dict[str, Op] = dict([
    _op("AutoContrast", auto_contrast), _op("Equalize", equalize), _op("Invert", invert),
    _op("Rotate", _geometric("Rotate"), _rotate_arg),
    _op("Posterize", posterize, _posterize_arg),
    _op("PosterizeIncreasing", posterize, _posterize_increasing_arg),
    _op("PosterizeOriginal", posterize, _posterize_original_arg),
    _op("Solarize", solarize, _solarize_arg),
    _op("SolarizeIncreasing", solarize, _solarize_increasing_arg),
    _op("SolarizeAdd", solarize_add, _solarize_add_arg),
    _op("Color", color, _enhance_arg), _op("ColorIncreasing", color, _enhance_increasing_arg),
    _op("Contrast", contrast, _enhance_arg),
    _op("ContrastIncreasing", contrast, _enhance_increasing_arg),
    _op("Brightness", brightness, _enhance_arg),
    _op("BrightnessIncreasing", brightness, _enhance_increasing_arg),
    _op("Sharpness", sharpness, _enhance_arg),
    _op("SharpnessIncreasing", sharpness, _enhance_increasing_arg),
    _op("ShearX", _geometric("ShearX"), _shear_arg),
    _op("ShearY", _geometric("ShearY"), _shear_arg),
    _op("TranslateX", _geometric("TranslateX"), _translate_abs_arg),
    _op("TranslateY", _geometric("TranslateY"), _translate_abs_arg),
    _op("TranslateXRel", _geometric("TranslateXRel"), _translate_rel_arg),
    _op("TranslateYRel", _geometric("TranslateYRel"), _translate_rel_arg),
])
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
          "TranslateYRel", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing"}  # the level functions that call _randomly_negate


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
        layers = self.policy.draw(n, generator, hp)
        return self.apply(images, layers, hp)

    def apply(self, images: torch.Tensor, layers: list[Layer], hp: dict) -> torch.Tensor:
        """Apply drawn layers in order; each op runs once per layer on the samples it hit.

        The batch is held as N x H x W x 3 (channels_last memory), so that taking the samples
        an op hits and putting them back are whole-image copies."""
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
    """torchvision's `ColorJitter(s, s, s)` as timm builds it from a scalar (no hue), per sample:
    brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], applied in a
    random order; on PIL images those are ImageEnhance's Brightness / Contrast / Color, which
    the ops above reproduce."""
    n = x.shape[0]
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    order = torch.rand((n, 4), generator=generator).argsort(dim=1)  # randperm(4) per sample
    factors = lo + (hi - lo) * torch.rand((n, 3), generator=generator, dtype=torch.float64)
    fns = (brightness, contrast, color)  # torchvision's fn_idx 0, 1, 2 (3, hue, is off)
    x = x.clone()
    for k in range(4):
        for f, fn in enumerate(fns):
            hit = torch.nonzero(order[:, k] == f).flatten()
            if hit.numel():
                idx = hit.to(x.device)
                x[idx] = fn(x[idx], factors[hit, f].to(x.device), None)
    return x


class TrainTail:
    """timm's training transforms after the crop and flip, on a batch on the training device:
    the auto-augment policy (or colour jitter, which timm turns off when a policy is set) on
    uint8, then ToTensor + Normalize (x / 255, - mean, / std, float32, as torchvision computes
    them), then timm's own `RandomErasing` on the normalised batch. Drawn per sample, from one
    seed per batch: a batch's augmentation is a pure function of that seed.

    On the CPU the numba kernels run serially on the calling thread (see repro.data.
    augment_cpu), and the float32 output cycles through `buffers` reused batches, as FFCV's own
    batches do (a fresh 38 MB batch costs ~10k page faults): a batch stays valid until
    `buffers` more are made; clone what you keep."""

    def __init__(self, *, auto_augment: str | None, color_jitter: float | None,
                 interpolation: str, mean, std, re_prob: float, re_mode: str, re_count: int,
                 buffers: int = 2):
        self.policy = None
        if auto_augment:
            self.policy = AutoAugment(parse_policy(auto_augment), interpolation=interpolation,
                                      mean=mean)
        self.jitter = color_jitter if (color_jitter and not auto_augment) else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.erasing = (re_prob, re_mode, re_count) if re_prob > 0 else None
        self._erasers: dict = {}
        self.buffers = buffers
        self._ring: list[torch.Tensor] = []
        self._next = 0

    def _output(self, shape) -> torch.Tensor:
        """The next of `buffers` reused float32 CPU outputs of this shape."""
        if not self._ring or self._ring[0].shape != shape:
            self._ring, self._next = [], 0
        if len(self._ring) < self.buffers:
            self._ring.append(torch.empty(shape, dtype=torch.float32))
        out = self._ring[self._next % len(self._ring)]
        self._next += 1
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ToTensor + Normalize: x / 255, - mean, / std in float32, channels_last. On the CPU
        by a lookup in the 256 values those same torch operations give (one pass)."""
        dev = x.device
        k = _kernels(x, {})
        if k is not None:
            levels = torch.arange(256, dtype=torch.float32).expand(1, 3, 256)
            table = levels.div(255).sub_(self.mean.view(1, 3, 1)).div_(self.std.view(1, 3, 1))
            n, c, h, w = x.shape
            out = self._output((n, h, w, c))
            k.normalize(_nhwc(x), table[0].contiguous().numpy(), out.numpy())
            return out.permute(0, 3, 1, 2)
        out = x.to(torch.float32).div_(255).sub_(self.mean.to(dev)).div_(self.std.to(dev))
        return out.contiguous(memory_format=torch.channels_last)

    @property
    def active(self) -> bool:
        return bool(self.policy or self.jitter or self.erasing)

    def _eraser(self, device):
        from timm.data.random_erasing import RandomErasing

        key = str(device)
        if key not in self._erasers:
            p, mode, count = self.erasing
            self._erasers[key] = RandomErasing(p, mode=mode, max_count=count, device=device)
        return self._erasers[key]

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = images
        if self.policy is not None:
            x = self.policy(x, g)
        elif self.jitter is not None:
            x = color_jitter(x, self.jitter, g)
        out = self.normalize(x)
        dev = out.device
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
