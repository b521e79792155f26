"""What a .beton's writer (repro.data.convert) and its readers (repro.data.ffcv, `repro launch`)
share: the file names, which record the writer settings or the eval protocol, and the sidecar
`<file>.json` written beside each file, with the file's size and sha256.

A reader checks the size on every open, and the sha256 on the first use of a file (the verdict
is cached by path, size and mtime) or when asked (`repro data check FILE`): a truncated or
overwritten .beton is a one-line error with the command that re-creates it, never a silent run
on damaged data."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from repro.data import DataError, cache_dir
from repro.io import atomic_write_json


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


def files_path(beton: str | os.PathLike) -> Path:
    """Where the names of a .beton's images are listed, one per line in the file's order:
    `<file>.files.txt` (ImageNet-ReaL's labels follow the validation images' names)."""
    return Path(f"{beton}.files.txt")


def file_names(beton: str | os.PathLike) -> list[str] | None:
    """The images' names (relative to the converted folder) in the .beton's order, if its
    conversion listed them."""
    path = files_path(beton)
    return path.read_text().splitlines() if path.exists() else None


def digest(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "verified_betons.json"


def _recreate(side: dict) -> str:
    w, p = side.get("writer", {}), side.get("eval_protocol")
    how = (f"--eval-protocol {p['resolution']},{p['crop_pct']:g},{p['interpolation']}" if p else
           f"--max-res {w.get('max_resolution') or 0} --quality {w.get('jpeg_quality')} "
           f"--compress-prob {w.get('compress_probability')}")
    if side.get("labels"):
        how += f" --labels {side['labels']}"
    return (f"re-create it: repro data convert {side.get('source')} {side.get('destination')} "
            f"{how} --overwrite")


def verify(beton: str | os.PathLike, *, full: bool | None = None) -> dict | None:
    """Check a .beton against its conversion record; returns the record (None: no record).

    The size always; the sha256 when `full`, or, when `full` is None, on the first use of this
    file at this size and mtime (the verdict is cached). A mismatch is a one-line DataError."""
    side = read_sidecar(beton)
    if side is None or "size" not in side:
        return side  # written before records carried a size: nothing to check against
    st = os.stat(beton)
    if st.st_size != side["size"]:
        raise DataError(f"{beton}: {st.st_size} bytes, but its conversion record says "
                        f"{side['size']}: the file is truncated or damaged; {_recreate(side)}")
    if full is False:
        return side
    key = os.path.realpath(beton)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": side["sha256"]}
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if full is None and cache.get(key) == stamp:
        return side
    if digest(beton) != side["sha256"]:
        raise DataError(f"{beton}: its content differs from its conversion record (sha256): "
                        f"the file is damaged; {_recreate(side)}")
    try:
        atomic_write_json(cache_file, {**cache, key: stamp})
    except OSError:
        pass  # an unwritable cache only means checking again next time
    return side
