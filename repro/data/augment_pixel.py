"""timm's colour and tone ops (timm 1.0.31 `timm/data/auto_augment.py`) as torch operations on
uint8 N x 3 x H x W batches, in Pillow 13's arithmetic: `Image.blend`'s float32 blend and
truncation (colour, contrast, brightness, sharpness), ITU-R 601 luma in fixed point, the SMOOTH
filter in float32, and the exact tables of `ImageOps` (posterize, solarize, invert, equalize,
autocontrast). Each op takes the batch, one float64 argument per sample and the policy's hparams."""

from __future__ import annotations

import torch


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample, per-channel 256-entry uint8 table (n x 3 x 256) to x."""
    n, c = x.shape[:2]
    offset = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1, 1)
    return lut.reshape(-1)[x.long() + offset]


def u8(v: torch.Tensor) -> torch.Tensor:
    """C's `(UINT8)v` after PIL's clip to [0, 255]: truncation toward zero."""
    return v.clamp(0, 255).trunc().to(torch.uint8)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`Image.blend(degenerate, x, factor)`: in1 + alpha * (in2 - in1) in float32 (C float),
    clipped and truncated (ImagingBlend)."""
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    return u8(d + alpha * (x.to(torch.float32) - d))


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
    lut = u8(torch.trunc(ix * scale[..., None] + offset[..., None]))
    identity = ix.to(torch.uint8).expand_as(lut)
    lut = torch.where((hi <= lo)[..., None], identity, lut)
    return _lut(x, lut)


def equalize(x, arg, hp):
    n, c = x.shape[:2]
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
    return _lut(x, torch.where(keep, identity, lut))


def invert(x, arg, hp):
    return 255 - x


def posterize(x, arg, hp):
    # ImageOps.posterize's mask; 0 bits -> 0 (black), as Pillow < 13 and TensorFlow give.
    bits = arg.to(torch.int64).clamp(0, 8)
    mask = ((~((1 << (8 - bits)) - 1)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def solarize(x, arg, hp):
    # ImageOps.solarize's table: v if v < threshold else 255 - v
    v = x.to(torch.int16)
    t = arg.to(torch.int16).view(-1, 1, 1, 1).to(x.device)
    return torch.where(v < t, v, 255 - v).to(torch.uint8)


def solarize_add(x, arg, hp):
    # timm's solarize_add table: min(255, v + add) below 128, else v
    v = x.to(torch.int16)
    a = arg.to(torch.int16).view(-1, 1, 1, 1).to(x.device)
    return torch.where(v < 128, (v + a).clamp(max=255), v).to(torch.uint8)


def color(x, arg, hp):
    grey = _luma(x).to(torch.uint8)[:, None].expand_as(x)
    return _blend(grey, x, arg)


def _blend_level(level: torch.Tensor, x, arg):
    """Blend with a constant degenerate image per sample (uint8 level, shape n)."""
    return _blend(level.to(torch.uint8).view(-1, 1, 1, 1).expand_as(x), x, arg)


def contrast(x, arg, hp):
    luma = _luma(x).flatten(1)
    # ImageStat's mean of the L histogram, in double, rounded as int(mean + 0.5).
    mean = torch.floor(luma.sum(1, dtype=torch.int64).double() / luma.shape[1] + 0.5)
    return _blend_level(mean, x, arg)


def brightness(x, arg, hp):
    return _blend_level(torch.zeros(x.shape[0], device=x.device), x, arg)


# ImageFilter.SMOOTH, (1 1 1 / 1 5 1 / 1 1 1) / 13, divided in float32 as _imaging.c does.
SMOOTH_K1 = torch.tensor(1.0, dtype=torch.float32) / 13
SMOOTH_K5 = torch.tensor(5.0, dtype=torch.float32) / 13


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """`ImageFilter.SMOOTH` as Filter.c's ImagingFilter3x3 computes it: float32, the rows summed
    as ((a*k0 + b*k1) + c*k2), below / centre / above in that order onto 0.5, truncated; the
    one-pixel border copied."""
    f = x.to(torch.float32)
    k1, k5 = SMOOTH_K1.to(x.device), SMOOTH_K5.to(x.device)

    def row(r, centre):
        left, mid, right = r[..., :-2], r[..., 1:-1], r[..., 2:]
        return (left * k1 + mid * (k5 if centre else k1)) + right * k1

    ss = 0.5 + row(f[:, :, 2:], False)
    ss = ss + row(f[:, :, 1:-1], True)
    ss = ss + row(f[:, :, :-2], False)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = u8(ss)
    return out


def sharpness(x, arg, hp):
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.clone()  # PIL's filter returns a copy of images smaller than the kernel
    return _blend(_smooth(x), x, arg)
