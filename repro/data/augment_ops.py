"""timm's auto-augment ops (timm 1.0.31 `timm/data/auto_augment.py`) on uint8 N x 3 x H x W
batches, each reproducing Pillow 13's arithmetic (see repro.data.augment for the list), as torch
operations (what a GPU runs) or, for CPU batches, through the numba kernels of
repro.data.augment_cpu. Each op takes the batch, one float64 argument per sample and the
policy's hparams; `OPS` maps timm's op names to the image function and its level function."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM

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

def cpu_kernels(x: torch.Tensor, hp: dict | None):
    """repro.data.augment_cpu for a CPU batch (one fused pass per op instead of one pass per
    torch operation), unless hp asks for the torch ops (`backend: torch`) or numba is absent."""
    if x.device.type != "cpu" or (hp or {}).get("backend") == "torch":
        return None
    try:
        from repro.data import augment_cpu
    except ImportError:  # numba comes with the ffcv extra
        return None
    return augment_cpu


def nhwc(x: torch.Tensor):
    """n x 3 x H x W -> its n x H x W x 3 numpy view (a copy only if not channels_last)."""
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample, per-channel 256-entry uint8 table (n x 3 x 256) to x."""
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
           interpolation: str) -> torch.Tensor:
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
        return affine(x, _matrices(name, arg, w, h), hp["fill"], hp["interpolation"])

    op.__name__ = name
    return op


@dataclass(frozen=True)
class Op:
    """One of timm's named ops: the image function (CPU batches through the kernels of
    repro.data.augment_cpu, unless hp says `backend: torch` or numba is absent; torch
    operations otherwise), its level -> argument function, its torch implementation and its
    kind (which kernel step runs it: repro.data.augment_cpu.KINDS)."""

    name: str
    torch_fn: Callable
    level_fn: Callable | None
    kind: str

    def fn(self, x: torch.Tensor, arg: torch.Tensor, hp: dict | None) -> torch.Tensor:
        """The op on the uint8 batch x, one float64 argument per sample."""
        if cpu_kernels(x, hp) is not None:
            n = x.shape[0]
            return cpu_run(x, [((self.name,), torch.zeros(n, dtype=torch.int64),
                                torch.ones(n, dtype=torch.bool), arg)], hp)
        return self.torch_fn(x, arg, hp)


def _op(name, fn, kind, level_fn=None):
    return name, Op(name, fn, level_fn, kind)


OPS: dict[str, Op] = dict([
    _op("AutoContrast", auto_contrast, "autocontrast"), _op("Equalize", equalize, "equalize"),
    _op("Invert", invert, "table"),
    _op("Rotate", _geometric("Rotate"), "affine", _rotate_arg),
    _op("Posterize", posterize, "table", _posterize_arg),
    _op("PosterizeIncreasing", posterize, "table", _posterize_increasing_arg),
    _op("PosterizeOriginal", posterize, "table", _posterize_original_arg),
    _op("Solarize", solarize, "table", _solarize_arg),
    _op("SolarizeIncreasing", solarize, "table", _solarize_increasing_arg),
    _op("SolarizeAdd", solarize_add, "table", _solarize_add_arg),
    _op("Color", color, "color", _enhance_arg),
    _op("ColorIncreasing", color, "color", _enhance_increasing_arg),
    _op("Contrast", contrast, "contrast", _enhance_arg),
    _op("ContrastIncreasing", contrast, "contrast", _enhance_increasing_arg),
    _op("Brightness", brightness, "brightness", _enhance_arg),
    _op("BrightnessIncreasing", brightness, "brightness", _enhance_increasing_arg),
    _op("Sharpness", sharpness, "sharpness", _enhance_arg),
    _op("SharpnessIncreasing", sharpness, "sharpness", _enhance_increasing_arg),
    _op("ShearX", _geometric("ShearX"), "affine", _shear_arg),
    _op("ShearY", _geometric("ShearY"), "affine", _shear_arg),
    _op("TranslateX", _geometric("TranslateX"), "affine", _translate_abs_arg),
    _op("TranslateY", _geometric("TranslateY"), "affine", _translate_abs_arg),
    _op("TranslateXRel", _geometric("TranslateXRel"), "affine", _translate_rel_arg),
    _op("TranslateYRel", _geometric("TranslateYRel"), "affine", _translate_rel_arg),
])
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
          "TranslateYRel", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing"}  # the level functions that call _randomly_negate


# --------------------------------------------------------------------------------------------
# CPU batches: the whole chain of drawn ops, and the normalisation, in one kernel call.

def cpu_run(x: torch.Tensor, layers, hp: dict | None, norm: torch.Tensor | None = None,
            out: torch.Tensor | None = None, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Apply `layers` to the CPU batch x (uint8 n x 3 x H x W) with repro.data.augment_cpu.run:
    each layer is (op names, op index per sample, applied per sample, argument per sample),
    applied in order, after mirroring the samples where `flip` (bool, n) is set. Returns uint8
    n x 3 x H x W (channels_last); or, with `norm` (the 3 x 256 float32 values of each level
    after normalisation), float32 through that table, into `out` (n x H x W x 3) when given."""
    from repro.data import augment_cpu as k

    n, c, h, w = x.shape
    hp = hp or {}
    L = len(layers)
    codes = torch.zeros((n, L), dtype=torch.int64)
    matrices = torch.zeros((n, L, 6), dtype=torch.float64)
    alphas = torch.zeros((n, L), dtype=torch.float32)
    tables = torch.zeros((n, L, c, 256), dtype=torch.uint8)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256)
    for j, (names, op, applied, arg) in enumerate(layers):
        for i, name in enumerate(names):
            hit = torch.nonzero((op == i) & applied).flatten()
            if hit.numel() == 0:
                continue
            spec, a = OPS[name], arg[hit].cpu()
            codes[hit, j] = k.KINDS[spec.kind]
            if spec.kind == "affine":
                matrices[hit, j] = _matrices(name, a, w, h)
            elif spec.kind == "table":  # a pointwise op is its table: the op on every level
                tables[hit, j] = spec.torch_fn(levels.expand(len(hit), c, 1, 256), a, hp)[:, :, 0]
            else:
                alphas[hit, j] = a.to(torch.float32)
    fill = hp.get("fill")
    fill = torch.zeros(c, dtype=torch.uint8) if fill is None else fill.cpu()
    bicubic = hp.get("interpolation", "bicubic") == "bicubic"
    if norm is None:
        out8 = torch.empty((n, h, w, c), dtype=torch.uint8)
        out32 = torch.empty((0, h, w, c), dtype=torch.float32)
    else:
        out8 = torch.empty((0, h, w, c), dtype=torch.uint8)
        out32 = torch.empty((n, h, w, c), dtype=torch.float32) if out is None else out
    flip = torch.zeros(n, dtype=torch.bool) if flip is None else flip.cpu()
    k.run(nhwc(x), flip.numpy(), codes.numpy(), matrices.numpy(), alphas.numpy(), tables.numpy(),
          fill.numpy(), bicubic, _K1.numpy()[()], _K5.numpy()[()],
          (norm if norm is not None else torch.zeros((c, 256))).contiguous().numpy(),
          out8.numpy(), out32.numpy())
    return (out8 if norm is None else out32).permute(0, 3, 1, 2)
