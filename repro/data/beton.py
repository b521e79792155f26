"""What a .beton's writer (repro.data.convert) and its readers (repro.data.ffcv, `repro launch`)
share: the file names, which record the writer settings or the eval protocol, and the sidecar
`<file>.json` written beside each file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def default_name(src: str | os.PathLike, max_res: int | None, compress_prob: float,
                 quality: int) -> str:
    """ffcv-imagenet's naming: split, max side, compress probability, JPEG quality."""
    return f"{Path(src).name}_{max_res or 'full'}_{compress_prob:.2f}_{quality}.beton"


def protocol_name(src: str | os.PathLike, res: int, crop_pct: float, interpolation: str) -> str:
    """An eval-protocol file's name: split, resolution, crop fraction, interpolation."""
    return f"{Path(src).name}_{res}_{crop_pct:g}_{interpolation}.beton"


_PROTOCOL_NAME = re.compile(r"_(\d+)_([0-9.]+)_(bilinear|bicubic)\.beton$")


def eval_protocol_of(beton: str | os.PathLike) -> dict | None:
    """The eval protocol a .beton was written with: from its sidecar when it exists, else
    from a protocol name (a file not yet written); None for a training-style file."""
    side = read_sidecar(beton)
    if side is not None:
        return side.get("eval_protocol")
    m = _PROTOCOL_NAME.search(str(beton))
    if m is None:
        return None
    return {"resolution": int(m[1]), "crop_pct": float(m[2]), "interpolation": m[3]}


def protocol(res: int, crop_pct: float, interpolation: str) -> dict:
    """An eval protocol as the sidecar records it."""
    return {"resolution": int(res), "crop_pct": float(crop_pct), "interpolation": interpolation}


def sidecar_path(beton: str | os.PathLike) -> Path:
    """Where the conversion record of a .beton is written: `<file>.json`."""
    return Path(f"{beton}.json")


def read_sidecar(beton: str | os.PathLike) -> dict | None:
    """The conversion record beside a .beton, if there is one."""
    path = sidecar_path(beton)
    return json.loads(path.read_text()) if path.exists() else None
