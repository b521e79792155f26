"""timm's geometric ops (rotate, shear, translate) as torch operations on uint8 N x 3 x H x W
batches, in Pillow 13's arithmetic: `Image.transform`'s affine map over pixel centres, its
bilinear / bicubic (a = -1) filters with edge clamping and truncation, and the fill colour
outside the source."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from repro.data.augment_pixel import u8

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


def affine_matrices(name: str, arg: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """The op `name`'s affine matrix for each argument (float64, n x 6, on the CPU)."""
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
    out = u8(v)
    if near.any():  # recompute those pixels in float64, in PIL's order of operations
        sel = near.nonzero(as_tuple=True)
        step = _lerp if interpolation == "bilinear" else _cubic
        dxs = dx.expand(n, h, w, 1)[sel]
        dys = dy.expand(n, h, w, 1)[sel]
        lines = [r[0][sel].double() if len(r) == 1 else
                 step(*(t[sel].double() for t in r), dxs) for r in grid]
        exact = lines[0] if len(lines) == 1 else step(*lines, dys)
        out[sel] = u8(exact)
    out = out.permute(0, 3, 1, 2)
    return torch.where(inside[:, None], out, fill.to(dev).view(1, c, 1, 1))


def geometric(name: str) -> Callable:
    """The op `name` (Rotate, ShearX, ..., TranslateYRel) as an image function."""
    def op(x, arg, hp):
        h, w = x.shape[-2:]
        return affine(x, affine_matrices(name, arg, w, h), hp["fill"], hp["interpolation"])

    op.__name__ = name
    return op
