"""The data-loading benchmark's photo set: a JPEG ImageFolder of natural images, made
deterministically from the two photographs scikit-learn ships (china.jpg, flower.jpg) by random
crops, rescales, flips and colour shifts, so that the files have the statistics of photos, not
of noise. Generated once per setting into the workdir and reused."""

from __future__ import annotations

import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PHOTOS_VERSION = 1  # bump when the generated images change
HUE_BANDS = 5  # classes = source photo x hue band

_sources: list[np.ndarray] = []  # the sample photographs, loaded once per generating process


def _load_sources() -> None:
    """Load scikit-learn's sample photographs into this process (a Pool initializer)."""
    from sklearn.datasets import load_sample_images

    _sources[:] = load_sample_images().images


def make_photo(index: int, classes: int, seed: int, min_px: int, max_px: int):
    """Image `index` of the set and its class: a crop of one sample photo, rescaled and shifted.

    The class picks the source photo and a band of hue rotation, so the set is also learnable.
    """
    rng = np.random.default_rng([seed, index])
    label = index % classes
    src = _sources[label % len(_sources)]
    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    src_h, src_w = src.shape[:2]
    # scale < 1 upsamples the crop; keep it mild so the images stay photo-sharp
    s_max = min(src_w / w, src_h / h)
    s = rng.uniform(min(0.6, s_max), s_max)
    cw, ch = min(src_w, round(w * s)), min(src_h, round(h * s))
    x, y = int(rng.integers(0, src_w - cw + 1)), int(rng.integers(0, src_h - ch + 1))
    im = Image.fromarray(src[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    hsv = np.asarray(im.convert("HSV")).copy()
    band = label // len(_sources)
    shift = (band * 256 // HUE_BANDS + rng.integers(-10, 11)) % 256
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
    rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32) / 255
    rgb = rgb ** rng.uniform(0.8, 1.25) * rng.uniform(0.85, 1.15, size=3)  # gamma, white balance
    im = Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8))
    return im, label, int(rng.integers(75, 96))  # JPEG quality: ImageNet's files span ~75-95


def _write_photo(job: tuple) -> tuple[int, int, int]:
    """Write one image of the set; returns its width, height and file size."""
    root, index, class_names, seed, min_px, max_px = job
    im, label, quality = make_photo(index, len(class_names), seed, min_px, max_px)
    path = Path(root) / class_names[label] / f"img_{index:05d}.jpg"
    im.save(path, "JPEG", quality=quality)
    return im.width, im.height, path.stat().st_size


def ensure_photos(workdir: Path, args) -> tuple[Path, dict]:
    """The ImageFolder for these settings, generated on first use and reused afterwards."""
    name = (f"photos_{args.images}img_{args.min_px}-{args.max_px}px_{args.classes}cls_"
            f"seed{args.seed}_v{PHOTOS_VERSION}")
    root = workdir / name
    if (root / "meta.json").exists():
        return root, json.loads((root / "meta.json").read_text())
    from sklearn.datasets import load_sample_images

    stems = [Path(f).stem for f in load_sample_images().filenames]
    class_names = [f"{stems[c % len(stems)]}_hue{c // len(stems)}" for c in range(args.classes)]
    tmp = workdir / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in class_names:
        (tmp / c).mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = [(str(tmp), i, class_names, args.seed, args.min_px, args.max_px)
            for i in range(args.images)]
    try:
        with Pool(os.cpu_count(), initializer=_load_sources) as pool:
            sizes = np.array(pool.map(_write_photo, jobs, chunksize=32))
        meta = {
            "sources": [f"sklearn.datasets.load_sample_images(): {s}.jpg" for s in stems],
            "images": args.images, "classes": class_names, "seed": args.seed,
            "side_px": [args.min_px, args.max_px], "jpeg_quality": [75, 95],
            "mean_width": float(sizes[:, 0].mean()), "mean_height": float(sizes[:, 1].mean()),
            "total_mb": float(sizes[:, 2].sum() / 1e6), "mean_kb": float(sizes[:, 2].mean() / 1e3),
            "generation_s": time.perf_counter() - t0,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, meta
