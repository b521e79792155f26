"""timm's auto-augment ops by name (timm 1.0.31 `timm/data/auto_augment.py`): `OPS` maps each
name to its image function (repro.data.augment_pixel, repro.data.augment_affine: torch
operations, what a GPU runs; for CPU batches the numba kernels of repro.data.augment_cpu) and its
level function, timm's `LEVEL_TO_ARG`. `cpu_run` runs a chain of drawn ops on a CPU batch in one
kernel call. Each op takes the batch, one float64 argument per sample and the policy's hparams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from repro.data.augment_affine import affine_matrices, geometric
from repro.data.augment_pixel import (
    SMOOTH_K1,
    SMOOTH_K5,
    auto_contrast,
    brightness,
    color,
    contrast,
    equalize,
    invert,
    posterize,
    sharpness,
    solarize,
    solarize_add,
)
from repro.recipe.policy import LEVEL_DENOM

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
# The ops by name, on uint8 n x 3 x H x W tensors with one float64 argument per sample (shape n).

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
    _op("Rotate", geometric("Rotate"), "affine", _rotate_arg),
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
    _op("ShearX", geometric("ShearX"), "affine", _shear_arg),
    _op("ShearY", geometric("ShearY"), "affine", _shear_arg),
    _op("TranslateX", geometric("TranslateX"), "affine", _translate_abs_arg),
    _op("TranslateY", geometric("TranslateY"), "affine", _translate_abs_arg),
    _op("TranslateXRel", geometric("TranslateXRel"), "affine", _translate_rel_arg),
    _op("TranslateYRel", geometric("TranslateYRel"), "affine", _translate_rel_arg),
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
                matrices[hit, j] = affine_matrices(name, a, w, h)
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
          fill.numpy(), bicubic, SMOOTH_K1.numpy()[()], SMOOTH_K5.numpy()[()],
          (norm if norm is not None else torch.zeros((c, 256))).contiguous().numpy(),
          out8.numpy(), out32.numpy())
    return (out8 if norm is None else out32).permute(0, 3, 1, 2)
