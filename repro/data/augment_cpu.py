"""CPU kernels (numba) for repro.data.augment: a whole policy and the normalisation in one pass
per image.

On a GPU the ops run as torch operations (repro.data.augment_ops). On the CPU a chain of eager
torch operations makes one pass over the batch per operation, and the geometric ops take tens of
passes. Here `run` takes each image through the ops its sample drew, one after another in two
small scratch images that stay in cache, and writes the result once (uint8, or float32 through
the normalisation table). Each op is PIL's arithmetic in PIL's order (the C code of Pillow's
Geometry.c, Blend.c, Filter.c, Convert.c and ImageOps' tables transcribed as loops), so the
kernels are exact by construction; they are tested against PIL exactly as the torch ops are.
numba comes with FFCV (the `ffcv` extra); without it the torch ops run on the CPU too.

Images are uint8 H x W x 3 (the channels_last memory of 3 x H x W tensors). The kernels are
serial and release the GIL: repro.data.augment.TrainTail splits a batch between threads itself
(numba's own parallel loops cost 60 % more CPU for 6 % less wall time, measured on the DeiT
block, CPU taken from FFCV's loader threads).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# What a (sample, layer) step does: the op kinds of repro.data.augment_ops.Op.kind.
SKIP, AFFINE, TABLE, CONTRAST, BRIGHTNESS, COLOR, SHARPNESS, EQUALIZE, AUTOCONTRAST = range(9)
KINDS = {"affine": AFFINE, "table": TABLE, "contrast": CONTRAST, "brightness": BRIGHTNESS,
         "color": COLOR, "sharpness": SHARPNESS, "equalize": EQUALIZE,
         "autocontrast": AUTOCONTRAST}


@numba.njit(cache=True, nogil=True)
def run(src, flip, codes, matrices, alphas, tables, fill, bicubic, k1, k5, norm, out8,
        out32):  # pragma: no cover (compiled)
    """Per image i of src (n x H x W x 3 uint8): mirrored left-right where flip[i], then the
    steps codes[i, l] in layer order, each with its matrix (AFFINE, n x L x 6), factor (blends,
    n x L float32) or table (TABLE, n x L x 3 x 256 uint8); then the result into out8[i]
    (uint8) or, where out8 is empty, into out32[i] through the normalisation table norm
    (3 x 256 float32)."""
    n, h, w, _ = src.shape
    scratch = np.empty((2, h, w, 3), np.uint8)
    hist = np.empty((3, 256), np.int64)
    table = np.empty((3, 256), np.uint8)
    for i in range(n):
        cur = src[i]
        t = 0
        if flip[i]:
            _mirror(cur, scratch[t])
            cur = scratch[t]
            t ^= 1
        for layer in range(codes.shape[1]):
            code = codes[i, layer]
            if code == SKIP:
                continue
            dst = scratch[t]
            t ^= 1
            a = alphas[i, layer]
            if code == AFFINE:
                affine1(cur, matrices[i, layer], fill, bicubic, dst)
            elif code == TABLE:
                lut1(cur, tables[i, layer], dst)
            elif code == CONTRAST:
                blend_const1(cur, _luma_mean(cur), a, dst)
            elif code == BRIGHTNESS:
                blend_const1(cur, np.float32(0.0), a, dst)
            elif code == COLOR:
                color1(cur, a, dst)
            elif code == SHARPNESS:
                sharpness1(cur, a, k1, k5, dst)
            elif code == EQUALIZE:
                _histogram(cur, hist)
                _equalize_table(hist, table)
                lut1(cur, table, dst)
            else:  # AUTOCONTRAST
                _histogram(cur, hist)
                _autocontrast_table(hist, table)
                lut1(cur, table, dst)
            cur = dst
        if out8.shape[0] == n:
            _copy(cur, out8[i])
        else:
            lut1(cur, norm, out32[i])  # the normalisation is a lookup too (float32 table)


@numba.njit(cache=True, nogil=True)
def _mirror(img, out):  # pragma: no cover (compiled)
    """out = img mirrored left-right (PIL's FLIP_LEFT_RIGHT, as timm's RandomHorizontalFlip)."""
    h, w, _ = img.shape
    for y in range(h):
        src, dst = img[y], out[y]
        for x in range(w):
            dst[x, 0] = src[w - 1 - x, 0]
            dst[x, 1] = src[w - 1 - x, 1]
            dst[x, 2] = src[w - 1 - x, 2]


@numba.njit(cache=True, nogil=True)
def _copy(img, out):  # pragma: no cover (compiled)
    src = img.reshape(-1)
    dst = out.reshape(-1)
    for j in range(src.shape[0]):
        dst[j] = src[j]


@numba.njit(cache=True, nogil=True)
def affine1(img, m, fill, bicubic, out):  # pragma: no cover (compiled)
    """Geometry.c ImagingGenericTransform with affine_transform and bilinear_filter32RGB /
    bicubic_filter32RGB, for one RGB image; every pixel of `out` is written.

    Row by row, in three passes that the compiler can vectorise: the source point of each
    destination pixel centre (PIL's double arithmetic) and where its neighbours start; the
    neighbours' pixels gathered from a packed copy of the image (RGB in one int32) with a
    two-pixel border repeating its edge, which is how the filters clamp (Geometry.c clamps
    columns to the image and takes, for a row outside it, the row before; for source points
    inside the image both are the nearest edge row or column); then PIL's filter one channel
    at a time, or the fill colour outside the source. A map that leaves y alone (shears and
    translations in x) puts every source point on its own row (dy = 0), and one that leaves x
    alone on its own column (dx = 0); PIL's filter then weighs the other rows (columns) by
    exactly 0, so they are not gathered: the same values."""
    h, w, _ = img.shape
    wp = w + 4
    padded = np.empty((h + 4) * wp, np.int32)
    for r in range(h + 4):
        src = img[min(max(r - 2, 0), h - 1)]
        row = padded[r * wp:(r + 1) * wp]
        for c in range(w):
            row[c + 2] = _pack(src[c, 0], src[c, 1], src[c, 2])
        row[0] = row[1] = row[2]
        row[w + 3] = row[w + 2] = row[w + 1]
    fillp = _pack(fill[0], fill[1], fill[2])
    a0, a1, a2, a3, a4, a5 = m[0], m[1], m[2], m[3], m[4], m[5]
    along_x = a3 == 0.0 and a4 == 1.0 and a5 == 0.0  # yin = y + 0.5 exactly
    along_y = a0 == 1.0 and a1 == 0.0 and a2 == 0.0 and not along_x  # xin = x + 0.5 exactly
    k = 4 if bicubic else 2  # neighbours per axis
    nx = 1 if along_y else k
    ny = 1 if along_x else k
    first = k // 2 - 1  # bicubic's neighbours start one before the point's own pixel
    dxs = np.empty(w)
    dys = np.empty(w)
    inside = np.empty(w, np.bool_)
    base = np.empty(w, np.int64)
    taps = np.empty((k * k, w), np.int32)
    res = np.empty(w, np.int32)
    dst = out.reshape(h, w * 3)
    for y in range(h):
        yo = y + 0.5
        for x in range(w):
            xo = x + 0.5
            xin = a0 * xo + a1 * yo + a2
            yin = a3 * xo + a4 * yo + a5
            inside[x] = (xin >= 0.0) & (xin < w) & (yin >= 0.0) & (yin < h)
            xs = xin - 0.5
            ys = yin - 0.5
            fx = np.floor(xs)
            fy = np.floor(ys)
            dxs[x] = xs - fx
            dys[x] = ys - fy
            # in [-1, size - 1] for points inside; points outside are clamped there too (their
            # pixels are never used)
            xi = np.int64(min(max(fx, -1.0), w - 1.0)) - first
            yi = np.int64(min(max(fy, -1.0), h - 1.0)) - first
            base[x] = (yi + 2) * wp + xi + 2
        if along_x:
            for p in range(k):
                for x in range(w):
                    taps[p, x] = padded[base[x] + first * wp + p]
        elif along_y:
            for q in range(k):
                for x in range(w):
                    taps[q, x] = padded[base[x] + q * wp + first]
        else:
            for q in range(k):
                for p in range(k):
                    for x in range(w):
                        taps[q * k + p, x] = padded[base[x] + q * wp + p]
        for x in range(w):
            res[x] = 0
        for s in (0, 8, 16):
            if bicubic:
                _cubic_pass(taps, dxs, dys, nx, ny, s, res)
            else:
                _linear_pass(taps, dxs, dys, nx, ny, s, res)
        o = dst[y]
        for x in range(w):
            p = res[x] if inside[x] else fillp
            o[3 * x] = p & 255
            o[3 * x + 1] = (p >> 8) & 255
            o[3 * x + 2] = (p >> 16) & 255


@numba.njit(cache=True, nogil=True, inline="always")
def _pack(r, g, b):  # pragma: no cover (compiled)
    return np.int32(r) | (np.int32(g) << 8) | (np.int32(b) << 16)


@numba.njit(cache=True, nogil=True, inline="always")
def _ch(p, s):  # pragma: no cover (compiled)
    """One channel (at bit s) of a packed pixel, as a double."""
    return float((p >> s) & 255)


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic_taps(t, i, x, s, d):  # pragma: no cover (compiled)
    """The cubic through four gathered neighbours t[i..i+3] of pixel x, channel s."""
    return _cubic(_ch(t[i, x], s), _ch(t[i + 1, x], s), _ch(t[i + 2, x], s),
                  _ch(t[i + 3, x], s), d)


@numba.njit(cache=True, nogil=True)
def _cubic_pass(t, dxs, dys, nx, ny, s, res):  # pragma: no cover (compiled)
    """bicubic_filter32RGB for channel s of a row: four rows of four neighbours, each row
    interpolated in x (BICUBIC with dx), then the four results in y (with dy); clipped to
    [0, 255] and truncated. One direction only where the map leaves the other alone."""
    w = res.shape[0]
    if ny == 1:
        for x in range(w):
            res[x] |= np.int32(_clip(_cubic_taps(t, 0, x, s, dxs[x]))) << s
    elif nx == 1:
        for x in range(w):
            res[x] |= np.int32(_clip(_cubic_taps(t, 0, x, s, dys[x]))) << s
    else:
        for x in range(w):
            dx = dxs[x]
            v = _cubic(_cubic_taps(t, 0, x, s, dx), _cubic_taps(t, 4, x, s, dx),
                       _cubic_taps(t, 8, x, s, dx), _cubic_taps(t, 12, x, s, dx), dys[x])
            res[x] |= np.int32(_clip(v)) << s


@numba.njit(cache=True, nogil=True, inline="always")
def _lerp(a, b, d):  # pragma: no cover (compiled)
    """Geometry.c's BILINEAR macro: a + (b - a) * d, in double."""
    return a + (b - a) * d


@numba.njit(cache=True, nogil=True)
def _linear_pass(t, dxs, dys, nx, ny, s, res):  # pragma: no cover (compiled)
    """bilinear_filter32RGB for channel s of a row: two rows of two neighbours, interpolated
    in x, then in y, truncated (the result lies between the neighbours). One direction only
    where the map leaves the other alone."""
    w = res.shape[0]
    if ny == 1 or nx == 1:
        for x in range(w):
            d = dxs[x] if ny == 1 else dys[x]
            res[x] |= np.int32(_lerp(_ch(t[0, x], s), _ch(t[1, x], s), d)) << s
    else:
        for x in range(w):
            dx = dxs[x]
            v1 = _lerp(_ch(t[0, x], s), _ch(t[1, x], s), dx)
            v2 = _lerp(_ch(t[2, x], s), _ch(t[3, x], s), dx)
            res[x] |= np.int32(_lerp(v1, v2, dys[x])) << s


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic(v1, v2, v3, v4, d):  # pragma: no cover (compiled)
    """Geometry.c's BICUBIC macro (a = -1), in its order of operations, in double."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


@numba.njit(cache=True, nogil=True, inline="always")
def _clip(t):  # pragma: no cover (compiled)
    """PIL's clip to [0, 255] (the integer cast then truncates)."""
    t = 0.0 if t < 0.0 else t
    return 255.0 if t > 255.0 else t


@numba.njit(cache=True, nogil=True, inline="always")
def _clip8(t):  # pragma: no cover (compiled)
    """A float32's clip to [0, 255] and C's truncating (UINT8) cast, as Blend.c and Filter.c
    do (comparisons in float32, so that the loops vectorise)."""
    t = np.float32(0.0) if t < np.float32(0.0) else t
    return np.uint8(np.float32(255.0) if t > np.float32(255.0) else t)


@numba.njit(cache=True, nogil=True)
def blend_const1(img, level, alpha, out):  # pragma: no cover (compiled)
    """Blend.c ImagingBlend with a constant degenerate image (contrast's grey, brightness's
    black): in1 + alpha * (in2 - in1) in float32, clipped and truncated."""
    src = img.reshape(-1)
    dst = out.reshape(-1)
    d = np.float32(level)
    a = np.float32(alpha)
    for j in range(src.shape[0]):
        dst[j] = _clip8(d + a * (np.float32(src[j]) - d))


@numba.njit(cache=True, nogil=True, inline="always")
def _luma(r, g, b):  # pragma: no cover (compiled)
    """Convert.c rgb2l: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16."""
    return (np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 0x8000) >> 16


@numba.njit(cache=True, nogil=True)
def _luma_mean(img):  # pragma: no cover (compiled)
    """ImageEnhance.Contrast's grey level: ImageStat's mean of the L image, in double, rounded
    as int(mean + 0.5)."""
    h, w, _ = img.shape
    total = 0
    for y in range(h):
        for x in range(w):
            total += _luma(img[y, x, 0], img[y, x, 1], img[y, x, 2])
    return np.float32(math.floor(total / (h * w) + 0.5))


@numba.njit(cache=True, nogil=True)
def color1(img, alpha, out):  # pragma: no cover (compiled)
    """ImageEnhance.Color: blend of the L-converted image (replicated) and the image."""
    src = img.reshape(-1, 3)
    dst = out.reshape(-1, 3)
    a = np.float32(alpha)
    for p in range(src.shape[0]):
        r, g, b = src[p, 0], src[p, 1], src[p, 2]
        d = np.float32(_luma(r, g, b))
        dst[p, 0] = _clip8(d + a * (np.float32(r) - d))
        dst[p, 1] = _clip8(d + a * (np.float32(g) - d))
        dst[p, 2] = _clip8(d + a * (np.float32(b) - d))


@numba.njit(cache=True, nogil=True)
def sharpness1(img, alpha, k1, k5, out):  # pragma: no cover (compiled)
    """ImageEnhance.Sharpness: blend of ImageFilter.SMOOTH (Filter.c ImagingFilter3x3, float32,
    rows below / centre / above summed onto 0.5, truncated; the border copied) and the image
    (whose border, blended with itself, stays as it is). Images under 3 x 3: a copy, as PIL."""
    h, w, c = img.shape
    flat = img.reshape(h, w * c)
    dst = out.reshape(h, w * c)
    a = np.float32(alpha)
    for y in range(h):
        if y == 0 or y == h - 1 or w < 3:
            dst[y, :] = flat[y, :]
            continue
        up, mid, down = flat[y - 1], flat[y], flat[y + 1]
        row = dst[y]
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
def lut1(img, table, out):  # pragma: no cover (compiled)
    """out[y, x, b] = table[b, img[y, x, b]], for a uint8 table (the pointwise ops) or a float32
    one (the normalisation: the 256 values per channel that the torch operations give)."""
    src = img.reshape(-1, 3)
    dst = out.reshape(-1, 3)
    t0, t1, t2 = table[0], table[1], table[2]
    for p in range(src.shape[0]):
        dst[p, 0] = t0[src[p, 0]]
        dst[p, 1] = t1[src[p, 1]]
        dst[p, 2] = t2[src[p, 2]]


@numba.njit(cache=True, nogil=True)
def _histogram(img, hist):  # pragma: no cover (compiled)
    """Per channel, the 256-bin histogram (3 x 256 int64), into hist."""
    hist[:] = 0
    src = img.reshape(-1, 3)
    for p in range(src.shape[0]):
        hist[0, src[p, 0]] += 1
        hist[1, src[p, 1]] += 1
        hist[2, src[p, 2]] += 1


@numba.njit(cache=True, nogil=True)
def _equalize_table(hist, table):  # pragma: no cover (compiled)
    """ImageOps.equalize's table per channel: step = (pixels - those at the last used level)
    // 255; level v -> min(255, (step // 2 + pixels below v) // step); identity where the
    channel has one level or step is 0."""
    for b in range(3):
        last, used, total = 0, 0, 0
        for v in range(256):
            if hist[b, v]:
                last = v
                used += 1
                total += hist[b, v]
        step = (total - hist[b, last]) // 255
        below = 0
        for v in range(256):
            if used <= 1 or step == 0:
                table[b, v] = v
            else:
                table[b, v] = min(255, (step // 2 + below) // step)
            below += hist[b, v]


@numba.njit(cache=True, nogil=True)
def _autocontrast_table(hist, table):  # pragma: no cover (compiled)
    """ImageOps.autocontrast's table per channel (cutoff 0): from the lowest used level lo to
    the highest hi, scale = 255 / (hi - lo) and offset = -lo * scale in double, v -> v * scale
    + offset truncated and clipped; identity where hi <= lo."""
    for b in range(3):
        lo, hi = 255, 0
        for v in range(256):
            if hist[b, v]:
                lo = min(lo, v)
                hi = max(hi, v)
        if hi <= lo:
            for v in range(256):
                table[b, v] = v
            continue
        scale = 255.0 / (hi - lo)
        offset = -float(lo) * scale
        for v in range(256):
            table[b, v] = np.uint8(min(max(math.trunc(v * scale + offset), 0.0), 255.0))
