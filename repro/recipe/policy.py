"""timm's auto-augment strings (timm 1.0.31 `timm/data/auto_augment.py`): the grammar, the op
sets and the AutoAugment policies, parsed into a `Policy`. Standard library only, so that
recipe validation can read a policy without loading torch; repro.data.augment_layers draws it.

RandAugment (`rand-...`): `n` (ops per image), `m` (magnitude), `mstd` (magnitude noise; > 100
draws uniformly), `mmax`, `inc` (the increasing op set), `p` (per-op probability), `t` (op set:
`tweights` for timm's weighted set). AutoAugment (`v0`, `v0r`, `original`, `originalr`): `mstd`.
Not supported (a clear error): AugMix, and the `3a` sets, whose Gaussian blur has no exact
tensor counterpart here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["LEVEL_DENOM", "Policy", "parse_policy", "RAND_TRANSFORMS",
           "RAND_INCREASING_TRANSFORMS", "RAND_WEIGHTED_0", "AA_POLICIES"]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes run from 0 to 10

# The RandAugment op sets.
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


def _sub_policies(table: str) -> tuple:
    """AutoAugment sub-policies written as text: `;` ends a sub-policy, `,` separates its ops,
    each op `Name probability magnitude` -> ((name, probability, magnitude), ...) per
    sub-policy, with a float probability and an int magnitude (timm's tuples)."""
    return tuple(tuple((name, float(prob), int(mag))
                       for name, prob, mag in (op.split() for op in sub.split(",")))
                 for sub in table.split(";"))


# The AutoAugment policies, in timm's order.
_V0 = _sub_policies("""
    Equalize 0.8 1, ShearY 0.8 4; Color 0.4 9, Equalize 0.6 3; Color 0.4 1, Rotate 0.6 8;
    Solarize 0.8 3, Equalize 0.4 7; Solarize 0.4 2, Solarize 0.6 2; Color 0.2 0, Equalize 0.8 8;
    Equalize 0.4 8, SolarizeAdd 0.8 3; ShearX 0.2 9, Rotate 0.6 8; Color 0.6 1, Equalize 1.0 2;
    Invert 0.4 9, Rotate 0.6 0; Equalize 1.0 9, ShearY 0.6 3; Color 0.4 7, Equalize 0.6 0;
    Posterize 0.4 6, AutoContrast 0.4 7; Solarize 0.6 8, Color 0.6 9; Solarize 0.2 4, Rotate 0.8 9;
    Rotate 1.0 7, TranslateYRel 0.8 9; ShearX 0.0 0, Solarize 0.8 4; ShearY 0.8 0, Color 0.6 4;
    Color 1.0 0, Rotate 0.6 2; Equalize 0.8 4, Equalize 0.0 8; Equalize 1.0 4, AutoContrast 0.6 2;
    ShearY 0.4 7, SolarizeAdd 0.6 7; Posterize 0.8 2, Solarize 0.6 10;
    Solarize 0.6 8, Equalize 0.6 1; Color 0.8 6, Rotate 0.4 5
""")
_ORIGINAL = _sub_policies("""
    PosterizeOriginal 0.4 8, Rotate 0.6 9; Solarize 0.6 5, AutoContrast 0.6 5;
    Equalize 0.8 8, Equalize 0.6 3; PosterizeOriginal 0.6 7, PosterizeOriginal 0.6 6;
    Equalize 0.4 7, Solarize 0.2 4; Equalize 0.4 4, Rotate 0.8 8; Solarize 0.6 3, Equalize 0.6 7;
    PosterizeOriginal 0.8 5, Equalize 1.0 2; Rotate 0.2 3, Solarize 0.6 8;
    Equalize 0.6 8, PosterizeOriginal 0.4 6; Rotate 0.8 8, Color 0.4 0;
    Rotate 0.4 9, Equalize 0.6 2; Equalize 0.0 7, Equalize 0.8 8; Invert 0.6 4, Equalize 1.0 8;
    Color 0.6 4, Contrast 1.0 8; Rotate 0.8 8, Color 1.0 2; Color 0.8 8, Solarize 0.8 7;
    Sharpness 0.4 7, Invert 0.6 8; ShearX 0.6 5, Equalize 1.0 9; Color 0.4 0, Equalize 0.6 3;
    Equalize 0.4 7, Solarize 0.2 4; Solarize 0.6 5, AutoContrast 0.6 5;
    Invert 0.6 4, Equalize 1.0 8; Color 0.6 4, Contrast 1.0 8; Equalize 0.8 8, Equalize 0.6 3
""")


def _research_posterize(policy):
    """timm's `v0r` / `originalr`: the same policies with PosterizeIncreasing."""
    return tuple(tuple(("PosterizeIncreasing" if n.startswith("Posterize") else n, p, m)
                       for n, p, m in sub) for sub in policy)


AA_POLICIES = {"v0": _V0, "v0r": _research_posterize(_V0), "original": _ORIGINAL,
               "originalr": _research_posterize(_ORIGINAL)}


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


def parse_policy(spec: str) -> Policy:
    """A timm auto-augment string -> Policy; a ValueError naming the part it cannot read."""
    parts = spec.split("-")
    head, rest = parts[0], parts[1:]
    if head == "rand":
        return _parse_rand(spec, rest)
    if head.startswith("augmix"):
        raise ValueError(f"auto-augment {spec!r}: AugMix is not supported on the device path")
    if head not in AA_POLICIES:
        raise ValueError(f"auto-augment {spec!r}: unknown policy {head!r} (rand-..., "
                         f"{', '.join(AA_POLICIES)})")
    mstd = 0.0
    for c in rest:
        key, val = _split(c)
        if key is None:
            continue
        if key != "mstd":
            raise ValueError(f"auto-augment {spec!r}: unknown AutoAugment section {c!r}")
        mstd = float(val)
    subs = AA_POLICIES[head]
    names = tuple(dict.fromkeys(o[0] for s in subs for o in s))
    return Policy(spec, "auto", names, len(subs[0]), 1.0, 0.0, mstd, None, None, subs)


def _parse_rand(spec: str, sections: list[str]) -> Policy:
    """The sections of a `rand-...` string, as timm's rand_augment_transform reads them."""
    magnitude, num_layers, prob, increasing = int(LEVEL_DENOM), 2, 0.5, False
    mstd, mmax, tset = 0.0, None, None
    for c in sections:
        if c.startswith("t"):
            tset = c[1:]
            continue
        key, val = _split(c)
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
    elif tset in ("3a", "3aw"):
        raise ValueError(f"auto-augment {spec!r}: the 3-Augment sets need PIL's Gaussian "
                         "blur, which has no exact tensor counterpart here")
    else:  # no `t` section, or another one: the plain or increasing set
        names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    return Policy(spec, "rand", tuple(names), num_layers, prob, magnitude, mstd, mmax, weights)


def _split(section: str):
    """`m9` -> ("m", "9"); a section without a number -> (None, None) (timm skips it)."""
    cs = re.split(r"(\d.*)", section)
    if len(cs) < 2:
        return None, None
    return cs[0], cs[1]
