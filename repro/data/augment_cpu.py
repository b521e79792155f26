"""CPU kernels (numba) for the costliest ops of repro.data.augment.

On a GPU the ops run as torch operations (repro.data.augment). On the CPU, a chain of eager
torch operations makes one pass over the batch per operation, and the geometric ops take tens of
passes; these kernels make one, per pixel, with PIL's own arithmetic in PIL's order (the C code
of Pillow's Geometry.c and Blend.c transcribed as loops), so they are exact by construction and
tested against PIL exactly as the torch ops are. numba comes with FFCV (the `ffcv` extra); without
it the torch ops run on the CPU too.

Images are uint8 N x H x W x 3 (the channels_last memory of N x 3 x H x W tensors). The kernels
are serial and release the GIL: repro.data.augment.TrainTail splits a batch between threads
itself (numba's own parallel loops cost 60 % more CPU for 6 % less wall time, measured on the
DeiT block, CPU taken from FFCV's loader threads).
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def affine(src, matrices, fill, bicubic, out):  # pragma: no cover (compiled)
    """Geometry.c ImagingGenericTransform with affine_transform and bilinear_filter32RGB /
    bicubic_filter32RGB, per sample, for RGB; `out` starts as anything (every pixel is
    written)."""
    n, h, w, _ = src.shape
    rows = src.reshape(n, h, w * 3)
    dst = out.reshape(n, h, w * 3)
    f0, f1, f2 = fill[0], fill[1], fill[2]
    for i in range(n):
        a0, a1, a2 = matrices[i, 0], matrices[i, 1], matrices[i, 2]
        a3, a4, a5 = matrices[i, 3], matrices[i, 4], matrices[i, 5]
        img = rows[i]
        for y in range(h):
            yo = y + 0.5
            o = dst[i, y]
            for x in range(w):
                xo = x + 0.5
                xin = a0 * xo + a1 * yo + a2
                yin = a3 * xo + a4 * yo + a5
                j = 3 * x
                if xin < 0.0 or xin >= w or yin < 0.0 or yin >= h:
                    o[j], o[j + 1], o[j + 2] = f0, f1, f2
                    continue
                xs = xin - 0.5
                ys = yin - 0.5
                fx = math.floor(xs)
                fy = math.floor(ys)
                dx = xs - fx
                dy = ys - fy
                xi = int(fx)
                yi = int(fy)
                if not bicubic:
                    c0 = 3 * min(max(xi, 0), w - 1)
                    c1 = 3 * min(max(xi + 1, 0), w - 1)
                    top = img[min(max(yi, 0), h - 1)]
                    bottom = img[yi + 1] if 0 <= yi + 1 < h else top
                    for b in range(3):
                        p = float(top[c0 + b])
                        v1 = p + (float(top[c1 + b]) - p) * dx
                        q = float(bottom[c0 + b])
                        v2 = q + (float(bottom[c1 + b]) - q) * dx
                        o[j + b] = np.uint8(int(v1 + (v2 - v1) * dy))
                    continue
                xi -= 1
                yi -= 1
                c0 = 3 * min(max(xi, 0), w - 1)
                c1 = 3 * min(max(xi + 1, 0), w - 1)
                c2 = 3 * min(max(xi + 2, 0), w - 1)
                c3 = 3 * min(max(xi + 3, 0), w - 1)
                # Rows as BICUBIC_BODY reads them: the first clamped, each later one the one
                # before it where it falls outside the image.
                ry0 = min(max(yi, 0), h - 1)
                ry1 = yi + 1 if 0 <= yi + 1 < h else ry0
                for b in range(3):
                    v2 = _cubic_row(img[ry1], c0 + b, c1 + b, c2 + b, c3 + b, dx)
                    if dy == 0.0:  # the cubic at 0 is its second value, exactly
                        o[j + b] = _clip8(v2)
                        continue
                    ry2 = yi + 2 if 0 <= yi + 2 < h else ry1
                    ry3 = yi + 3 if 0 <= yi + 3 < h else ry2
                    v1 = _cubic_row(img[ry0], c0 + b, c1 + b, c2 + b, c3 + b, dx)
                    v3 = _cubic_row(img[ry2], c0 + b, c1 + b, c2 + b, c3 + b, dx)
                    v4 = _cubic_row(img[ry3], c0 + b, c1 + b, c2 + b, c3 + b, dx)
                    o[j + b] = _clip8(_cubic(v1, v2, v3, v4, dy))


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic_row(row, k0, k1, k2, k3, dx):  # pragma: no cover (compiled)
    if dx == 0.0:  # shears and translations in y: the cubic at 0 is its second value
        return float(row[k1])
    return _cubic(float(row[k0]), float(row[k1]), float(row[k2]), float(row[k3]), dx)


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic(v1, v2, v3, v4, d):  # pragma: no cover (compiled)
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


@numba.njit(cache=True, nogil=True)
def blend_const(level, src, alpha, out):  # pragma: no cover (compiled)
    """Blend.c ImagingBlend with a constant degenerate image per sample (contrast's grey,
    brightness's black): in1 + alpha * (in2 - in1) in float32, clipped and truncated."""
    n, h, w, c = src.shape
    flat_src = src.reshape(n, h, w * c)
    flat_out = out.reshape(n, h, w * c)
    for job in range(n * h):
        i = job // h
        y = job % h
        a = alpha[i]
        d = np.float32(level[i])
        row, dst = flat_src[i, y], flat_out[i, y]
        for j in range(w * c):
            dst[j] = _clip8(d + a * (np.float32(row[j]) - d))


@numba.njit(cache=True, nogil=True, inline="always")
def _clip8(t):  # pragma: no cover (compiled)
    """PIL's clip to [0, 255] and C's truncating (UINT8) cast, branch-free."""
    return np.uint8(min(max(t, 0.0), 255.0))


@numba.njit(cache=True, nogil=True)
def luma(src, out):  # pragma: no cover (compiled)
    """Convert.c rgb2l: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16, N x H x W."""
    n, h, w, _ = src.shape
    for job in range(n * h):
        i = job // h
        y = job % h
        for x in range(w):
            v = (np.int32(src[i, y, x, 0]) * 19595 + np.int32(src[i, y, x, 1]) * 38470
                 + np.int32(src[i, y, x, 2]) * 7471 + 0x8000)
            out[i, y, x] = np.uint8(v >> 16)


@numba.njit(cache=True, nogil=True)
def color(src, alpha, out):  # pragma: no cover (compiled)
    """ImageEnhance.Color: blend of the L-converted image (replicated) and the image."""
    n, h, w, c = src.shape
    for job in range(n * h):
        i = job // h
        y = job % h
        a = alpha[i]
        for x in range(w):
            v = (np.int32(src[i, y, x, 0]) * 19595 + np.int32(src[i, y, x, 1]) * 38470
                 + np.int32(src[i, y, x, 2]) * 7471 + 0x8000) >> 16
            d = np.float32(v)
            for b in range(c):
                t = d + a * (np.float32(src[i, y, x, b]) - d)
                out[i, y, x, b] = _clip8(t)


@numba.njit(cache=True, nogil=True)
def sharpness(src, alpha, k1, k5, out):  # pragma: no cover (compiled)
    """ImageEnhance.Sharpness: blend of ImageFilter.SMOOTH (Filter.c ImagingFilter3x3, float32,
    rows below / centre / above summed onto 0.5, truncated; the border copied) and the image
    (whose border, blended with itself, stays as it is)."""
    n, h, w, c = src.shape
    flat = src.reshape(n, h, w * c)
    dst = out.reshape(n, h, w * c)
    for job in range(n * h):
        i = job // h
        y = job % h
        a = alpha[i]
        if y == 0 or y == h - 1:
            dst[i, y, :] = flat[i, y, :]
            continue
        up, mid, down = flat[i, y - 1], flat[i, y], flat[i, y + 1]
        row = dst[i, y]
        for j in range(c):
            row[j] = mid[j]
            row[(w - 1) * c + j] = mid[(w - 1) * c + j]
        for j in range(c, (w - 1) * c):
            ss = np.float32(0.5)
            ss += (np.float32(down[j - c]) * k1 + np.float32(down[j]) * k1) + np.float32(
                down[j + c]) * k1
            ss += (np.float32(mid[j - c]) * k1 + np.float32(mid[j]) * k5) + np.float32(
                mid[j + c]) * k1
            ss += (np.float32(up[j - c]) * k1 + np.float32(up[j]) * k1) + np.float32(
                up[j + c]) * k1
            d = np.float32(_clip8(ss))
            row[j] = _clip8(d + a * (np.float32(mid[j]) - d))


@numba.njit(cache=True, nogil=True)
def lut(src, table, out):  # pragma: no cover (compiled)
    """out[i, y, x, b] = table[i, b, src[i, y, x, b]]."""
    n, h, w, c = src.shape
    for job in range(n * h):
        i = job // h
        y = job % h
        for x in range(w):
            for b in range(c):
                out[i, y, x, b] = table[i, b, src[i, y, x, b]]


@numba.njit(cache=True, nogil=True)
def histogram(src, out):  # pragma: no cover (compiled)
    """Per sample and channel, the 256-bin histogram (int64, N x 3 x 256)."""
    n, h, w, c = src.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                for b in range(c):
                    out[i, b, src[i, y, x, b]] += 1


@numba.njit(cache=True, nogil=True)
def normalize(src, table, out):  # pragma: no cover (compiled)
    """out[..., b] = table[b, src[..., b]] for RGB pixels (float32): normalisation by lookup
    in the 256 values per channel that the torch operations give."""
    n, h, w, c = src.shape
    flat = src.reshape(n * h, w * c)
    dst = out.reshape(n * h, w * c)
    for r in range(n * h):
        row, o = flat[r], dst[r]
        for x in range(w):
            j = 3 * x
            o[j] = table[0, row[j]]
            o[j + 1] = table[1, row[j + 1]]
            o[j + 2] = table[2, row[j + 2]]
