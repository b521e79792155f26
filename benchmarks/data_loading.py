"""FFCV vs torchvision ImageFolder: images/s of the train and val loaders on the same photos.

Writes `reports/data_loading.md` and the raw numbers beside it (`reports/data_loading.json`):

1. A JPEG ImageFolder of natural images, made deterministically from the two photographs that
   scikit-learn ships (china.jpg, flower.jpg) by random crops, rescales, flips and colour
   shifts, so that the files have the statistics of photos, not of noise. Cached in the workdir.
2. Two FFCV .betons of it, written by `repro.data.convert.convert` (timed on every run): one
   with the repo's default writer settings (`--max-res`, full resolution for these images), on
   which the verdict rests, and one with max side `--context-max-res` (256, the setting of
   FFCV_NOTES.md's figures), for context: FFCV then decodes downscaled images.
3. The loaders timed: the four `repro.data.build_loaders` builds from a minimal recipe (FFCV
   and ImageFolder, train and val: same transforms, batch and workers), a plain torchvision
   DataLoader (the textbook baseline: no per-sample seeding) and the FFCV train loader on the
   second .beton. Each runs one full warm-up epoch (numba compiles FFCV's pipelines then) and
   is then timed over full epochs, interleaved: one epoch of each loader per round, in an
   order that rotates each round, so that drift on a noisy machine falls on all alike. Every
   timed epoch also records how much CPU other processes took meanwhile.

Usage (from the repository root):
    python benchmarks/data_loading.py [--images 2000] [--workers 2] [--batch 64] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from repro.measure.throughput import cpu_snapshot, cpu_use, machine  # shared /proc meters

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "data_loading.md"
PHOTOS_VERSION = 1  # bump when the generated images change
HUE_BANDS = 5  # classes = source photo x hue band
FOLDER = "folder train"  # repro.data.folder's train loader (per-sample seeded)
PLAIN = "torchvision train, plain"  # see build_plain_torchvision
STOCK = "ffcv train, ffcv flip + normalize"  # see build_stock_ffcv
SUMS = "ffcv train, consumer sums"  # see ConsumerSums
MIN_TRAIN_RATIO = 3.0  # the project's acceptance bar: FFCV train vs ImageFolder train
# The papers' training augmentation (issue 11): FFCV + device augmentation against the official
# codes' pipeline, torchvision ImageFolder + timm's PIL transforms with the same policy.
PAPER_PIPELINES = {
    # LeViT / CvT-13 (recipes/_base/deit_aug.yaml; LeViT adds repeated augmentation)
    "DeiT block": {"aug": {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4,
                           "re_prob": 0.25, "re_mode": "pixel", "re_count": 1},
                   "repeated_aug": True},
    # CoAtNet (recipes/_base/coatnet.yaml)
    "CoAtNet RandAugment": {"aug": {"auto_augment": "rand-n2-m15-mmax15"},
                            "repeated_aug": False},
}
MIN_PAPER_RATIO = 2.5  # issue 11's bar for the DeiT block (aim: 3x)
PROTOCOL_VAL = "ffcv val, eval-protocol file"


def ffcv_paper(label: str) -> str:
    return f"ffcv train + device aug, {label}"


def pil_paper(label: str) -> str:
    return f"torchvision + timm PIL, {label}"
OTHER_LOAD_WARN_PCT = 5.0  # flag epochs during which other processes took this much CPU

_sources: list[np.ndarray] = []  # the sample photographs, loaded once per generating process


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones the committed report uses."""
    from repro.data.convert import DEFAULTS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images in the generated set")
    p.add_argument("--classes", type=int, default=10, help=f"class folders (<= 2 x {HUE_BANDS})")
    p.add_argument("--min-px", type=int, default=300, help="smallest image side")
    p.add_argument("--max-px", type=int, default=500, help="largest image side")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--workers", type=int, default=2, help="loader workers (threads / processes)")
    p.add_argument("--batch", type=int, default=64, help="batch size of every loader")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader")
    p.add_argument("--resolution", type=int, default=224, help="crop size")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"),
                   help="ImageFolder resize interpolation (FFCV always uses INTER_AREA)")
    p.add_argument("--max-res", type=int, default=DEFAULTS["max_res"],
                   help="writer max side of the .beton the verdict rests on")
    p.add_argument("--context-max-res", type=int, default=256,
                   help="writer max side of a second .beton, FFCV train only (0: none)")
    p.add_argument("--compress-prob", type=float, default=DEFAULTS["compress_prob"],
                   help="writer: share of images stored as JPEG (the rest raw)")
    p.add_argument("--quality", type=int, default=DEFAULTS["quality"], help="writer JPEG quality")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the images and the .betons go (default ${REPRO_CACHE}/bench)")
    args = p.parse_args(argv)
    if not 1 <= args.classes <= 2 * HUE_BANDS or args.min_px > args.max_px or args.epochs < 1:
        p.error("need 1 <= --classes <= 10, --min-px <= --max-px and --epochs >= 1")
    if args.context_max_res == args.max_res:
        args.context_max_res = 0
    return args


# ------------------------------------------------------------------------------------------
# The photo set


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


def convert_photos(src: Path, workdir: Path, max_res: int, args) -> tuple[Path, dict]:
    """Write the set to a .beton of max side `max_res` (other writer settings from `args`)."""
    from repro.data.convert import convert, default_name
    from repro.data.ffcv import import_ffcv

    import_ffcv()  # a one-time cost, not the writer's
    dst = workdir / default_name(src, max_res, args.compress_prob, args.quality)
    t0 = time.perf_counter()
    record = convert(src, dst, max_res=max_res, quality=args.quality,
                     compress_prob=args.compress_prob, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    print(f"  {dst.name}: {seconds:.1f} s", flush=True)
    return dst, {"path": str(dst), "seconds": seconds,
                 "images_per_s": record["num_images"] / seconds,
                 "images": record["num_images"], "skipped": record["skipped_count"],
                 "beton_mb": dst.stat().st_size / 1e6, "writer": record["writer"],
                 "writer_processes": os.cpu_count()}


# ------------------------------------------------------------------------------------------
# Loaders and timing


def context_name(max_res: int) -> str:
    """The label of the FFCV train loader on the context .beton."""
    return f"ffcv train, max side {max_res}"


def ratio_pairs(context_max_res: int) -> list[tuple[str, str]]:
    """The ratios reported, as (numerator loader, denominator loader)."""
    pairs = [(ffcv_paper(label), pil_paper(label)) for label in PAPER_PIPELINES]
    pairs += [(PROTOCOL_VAL, "folder val"), ("ffcv train", FOLDER), ("ffcv train", PLAIN),
              ("ffcv val", "folder val"), (FOLDER, PLAIN), ("ffcv train", STOCK),
              (STOCK, PLAIN), (SUMS, PLAIN)]
    if context_max_res:
        ctx = context_name(context_max_res)
        pairs += [(ctx, FOLDER), (ctx, PLAIN), (ctx, "ffcv train")]
    return pairs


def ratio(ratios: dict, top: str, bottom: str) -> float:
    """One loader's median images/s over another's."""
    return ratios[f"{top} / {bottom}"]["of_medians"]


def load_bench_recipe(fmt: str, train_path: Path, val_path: Path, args, paper: str | None = None):
    """A minimal recipe for `fmt` reading the benchmark's files, via the real recipe loader;
    `paper`: with that entry of PAPER_PIPELINES's augmentation."""
    import yaml

    from repro.recipe import load_recipe

    tree = {
        # model/optim/schedule/train are required by the schema but unused by the loaders
        "model": {"name": "resnet50"}, "optim": {"lr": 0.1}, "schedule": {"epochs": 1},
        "train": {"global_batch": args.batch},
        "data": {"dataset": "imagenet", "format": fmt, "train_path": str(train_path),
                 "val_path": str(val_path), "train_images": args.images,
                 "resolution": args.resolution, "batch_size": args.batch,
                 "workers": args.workers, "interpolation": args.interpolation},
        "eval": {"crop_pct": 0.875, "interpolation": args.interpolation,
                 "batch_size": args.batch},
    }
    if paper is not None:
        tree["aug"] = PAPER_PIPELINES[paper]["aug"]
        tree["data"]["repeated_aug"] = PAPER_PIPELINES[paper]["repeated_aug"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bench_{fmt}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_recipe(path)


def build(fmt: str, train_path: Path, val_path: Path, args, paper: str | None = None) -> dict:
    """The train and val loaders `repro.data.build_loaders` makes for format `fmt`."""
    from repro.data import build_loaders

    recipe = load_bench_recipe(fmt, train_path, val_path, args, paper)
    loaders = build_loaders(recipe, batch_size=args.batch, eval_batch_size=args.batch)
    return {f"{fmt} train": loaders.train, f"{fmt} val": loaders.val}


def device_augmentation_ms(beton: Path, args, batch: int = 256, repeats: int = 7) -> dict:
    """Milliseconds per `batch`-image batch of each paper pipeline's device augmentation alone
    (repro.data.augment.TrainTail: flip, policy, normalisation, erasing) on decoded, cropped
    uint8 images from the .beton, on this machine's CPU; median of `repeats` after a warm-up."""
    from repro.data.augment import TrainTail
    from repro.data.ffcv import make_loader, train_pipeline

    r = load_bench_recipe("ffcv", beton, beton, args).data
    loader = make_loader(str(beton), train_pipeline(r.resolution, r.scale, r.ratio, r.hflip,
                                                    r.mean, r.std, "cpu", uint8=True),
                         batch_size=args.batch, workers=r.workers, train=True,
                         distributed=False, device="cpu", seed=0)
    images = []
    for x, _ in loader:
        images.append(x.clone())
        if sum(len(i) for i in images) >= batch:
            break
    images = torch.cat(images)[:batch].contiguous(memory_format=torch.channels_last)
    out = {}
    for label, spec in PAPER_PIPELINES.items():
        a = {"color_jitter": None, "re_prob": 0.0, "re_mode": "pixel", "re_count": 1,
             **spec["aug"]}
        tail = TrainTail(interpolation=r.interpolation, mean=r.mean, std=r.std, hflip=r.hflip,
                         **a)
        tail(images, 0)
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            tail(images, k + 1)
            times.append(1000 * (time.perf_counter() - t0))
        out[label] = {"ms_per_batch": statistics.median(times), "min": min(times),
                      "max": max(times), "batch": batch, "repeats": repeats,
                      "torch_threads": torch.get_num_threads()}
    return out


def build_plain_torchvision(folder: Path, args, paper: str | None = None):
    """The textbook baseline: ImageFolder + DataLoader with the project's train transform.

    Shuffled by the DataLoader, workers persistent (as timm's `create_loader` keeps them), no
    per-sample seeding; batches made channels_last like every other loader's.
    """
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from repro.data.folder import FolderVal, train_transform

    dataset = ImageFolder(str(folder), transform=train_transform(
        load_bench_recipe("folder", folder, folder, args, paper)))
    loader = DataLoader(dataset, args.batch, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(0))
    return FolderVal(loader)  # a re-iterable channels_last wrapper, nothing val-specific


def build_stock_ffcv(beton: Path, args):
    """The FFCV train loader with ffcv's own flip and normalisation (RandomHorizontalFlip
    then NormalizeImage) in place of repro's one-pass FlipNormalize; all else as built."""
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    from repro.data.ffcv import make_loader, train_pipeline

    r = load_bench_recipe("ffcv", beton, beton, args).data
    decoder = train_pipeline(r.resolution, r.scale, r.ratio, r.hflip, r.mean, r.std, "cpu")[0]
    pipeline = [decoder, RandomHorizontalFlip(flip_prob=r.hflip),
                NormalizeImage(np.array(r.mean) * 255, np.array(r.std) * 255, np.float32),
                ToTensor(), ToTorchImage()]
    return make_loader(str(beton), pipeline, batch_size=args.batch, workers=r.workers,
                       train=True, distributed=False, device="cpu", seed=0,
                       in_memory=r.in_memory)


class ConsumerSums:
    """A loader whose consumer sums one image of every batch with torch (a cheap op, but one
    that starts torch's intra-op thread pool in the consuming process) before taking the next:
    what this benchmark's consumer did until it read one value only (see the report)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for images, labels in self.loader:
            float(images[-1].sum())
            yield images, labels


def run_epoch(loader) -> dict:
    """One full pass: images seen, seconds, seconds to the first batch, and its layout.

    The consumer reads one value of each batch and nothing more (no loader here returns lazy
    work, so none escapes the clock): torch ops in the consuming thread would start torch's
    intra-op threads, which compete with FFCV's loader threads in the same process (measured
    by the `ConsumerSums` row).
    """
    images_seen, first, first_s, checksum = 0, None, 0.0, 0.0
    t0 = time.perf_counter()
    for images, labels in loader:
        checksum += float(images[-1, 0, 0, 0])
        images_seen += len(labels)
        if first is None:
            first_s = time.perf_counter() - t0
            first = {"shape": list(images.shape[1:]), "dtype": str(images.dtype),
                     "channels_last": images.is_contiguous(memory_format=torch.channels_last),
                     "labels_dtype": str(labels.dtype)}
    seconds = time.perf_counter() - t0
    return {"images": images_seen, "seconds": seconds, "images_per_s": images_seen / seconds,
            "first_batch_s": first_s, "batch": first}


def measure(loaders: dict, epochs: int) -> dict:
    """One warm-up epoch per loader, then `epochs` rounds of one timed epoch each, rotating."""
    raw = {}
    for name, loader in loaders.items():
        warm = run_epoch(loader)
        raw[name] = {"warmup": warm, "epochs": []}
        print(f"  warm-up {name:25s} {warm['images']} images in {warm['seconds']:5.1f} s",
              flush=True)
    names = list(loaders)
    for r in range(epochs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            before = cpu_snapshot()
            epoch = run_epoch(loaders[name])
            epoch.update(cpu_use(before, cpu_snapshot()), round=r,
                         torch_threads_after=torch.get_num_threads())
            del epoch["batch"]
            raw[name]["epochs"].append(epoch)
            print(f"  round {r} {name:25s} {epoch['images_per_s']:5.0f} img/s (CPU: ours "
                  f"{epoch['ours_pct']:3.0f} %, others {epoch['other_pct']:3.0f} %)", flush=True)
    return raw


def summarise(raw: dict, pairs: list) -> tuple[dict, dict]:
    """Median/min/max images/s and CPU shares per loader, and the ratios in `pairs`."""
    rows = {}
    for name, record in raw.items():
        epochs = record["epochs"]
        rates = [e["images_per_s"] for e in epochs]
        rows[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                      "images_per_epoch": epochs[0]["images"],
                      "first_batch_s": statistics.median(e["first_batch_s"] for e in epochs),
                      "cpu_pct": statistics.median(e["ours_pct"] for e in epochs),
                      "other_pct_max": max(e["other_pct"] + e["steal_pct"] for e in epochs)}
    ratios = {}
    for top, bottom in pairs:
        paired = [a["images_per_s"] / b["images_per_s"]
                  for a, b in zip(raw[top]["epochs"], raw[bottom]["epochs"], strict=True)]
        ratios[f"{top} / {bottom}"] = {"of_medians": rows[top]["median"] / rows[bottom]["median"],
                         "per_round_min": min(paired), "per_round_max": max(paired)}
    return rows, ratios


def other_load(raw: dict) -> dict:
    """How many timed epochs other processes (or the hypervisor) disturbed."""
    shares = [e["other_pct"] + e["steal_pct"] for r in raw.values() for e in r["epochs"]]
    return {"timed_epochs": len(shares), "max_pct": max(shares),
            "busy_epochs": sum(s > OTHER_LOAD_WARN_PCT for s in shares)}


# ------------------------------------------------------------------------------------------
# Environment and report


def versions() -> dict:
    """Versions of everything on the loading path (ffcv's own __version__ is stale: ask pip)."""
    from importlib.metadata import PackageNotFoundError, version

    import cv2
    from PIL import features

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "ffcv", "numba", "numpy", "Pillow",
                 "opencv-python"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["libjpeg-turbo (Pillow)"] = features.version_feature("libjpeg_turbo") or "no"
    out["cv2 (Python, used by the writer)"] = cv2.__version__
    return out


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, left-aligned first column, right-aligned numbers."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _verdict(r: dict) -> str:
    """The acceptance bar applied to one ratio."""
    v = r["of_medians"]
    return (f"**{v:.2f}x** (per round {r['per_round_min']:.2f}-{r['per_round_max']:.2f}x), "
            f"{'meets' if v >= MIN_TRAIN_RATIO else 'below'} the bar")


def _resizing(ds: dict, max_res: int) -> str:
    """What a writer max side does to this set's images."""
    lo, hi = ds["side_px"]
    if hi <= max_res:
        return f"no image is larger than {max_res} px, so FFCV decodes the same pixels"
    which = "every image is" if lo > max_res else f"images with a side over {max_res} px are"
    return (f"{which} downscaled to a longer side of {max_res} px when written (a "
            f"{ds['mean_width']:.0f} px image becomes {max_res} px before the crop), so FFCV "
            "decodes fewer, different pixels than the ImageFolder loaders")


def _papers_section(rep: dict) -> list[str]:
    """The papers' training pipelines: FFCV + device augmentation against the official codes'
    torchvision + timm PIL pipeline, the augmentation alone, and exact evaluation."""
    s, m, ratios = rep["settings"], rep["machine"], rep["ratios"]
    lines = ["## The papers' pipelines", "",
             f"Training with the papers' augmentation, same JPEGs, {s['workers']} workers, "
             f"batch {s['batch']}, {s['resolution']} px, {m['usable_cores']} cores. FFCV "
             "decodes and crops in its threads; the flip, the policy, normalisation and random "
             "erasing then run as the device augmentation (`repro.data.augment.TrainTail`) "
             "on this machine's CPU, in the consuming process, so their cost counts against "
             "FFCV. The baseline is the official codes' pipeline: torchvision `ImageFolder` + "
             "`DataLoader` with timm's `create_transform` and the same policy, in worker "
             "processes. Mixup/CutMix are left out of both (a batch operation of the trainer, "
             "the same on both paths).", ""]
    rows = []
    for label, spec in PAPER_PIPELINES.items():
        r = ratios[f"{ffcv_paper(label)} / {pil_paper(label)}"]
        bar = (f"{'meets' if r['of_medians'] >= MIN_PAPER_RATIO else 'below'} the "
               f"{MIN_PAPER_RATIO:g}x bar" if label == "DeiT block" else "context")
        aug = ", ".join(f"{k} {v}" for k, v in spec["aug"].items())
        rows.append([label, aug + (", repeated aug" if spec["repeated_aug"] else ""),
                     f"{rep['summary'][ffcv_paper(label)]['median']:.0f}",
                     f"{rep['summary'][pil_paper(label)]['median']:.0f}",
                     f"**{r['of_medians']:.2f}x** ({r['per_round_min']:.2f}-"
                     f"{r['per_round_max']:.2f}x)", bar])
    lines += _table(["pipeline", "augmentation", "FFCV + device aug img/s",
                     "torchvision + timm PIL img/s", "ratio (per round)", "verdict"], rows)
    dev = rep["device_augmentation"]
    any_dev = next(iter(dev.values()))
    lines += ["", f"The device augmentation alone, on {any_dev['batch']} decoded {s['resolution']}"
              f" px images (median of {any_dev['repeats']} after a warm-up, "
              f"{any_dev['torch_threads']} torch threads, this CPU; numba kernels of "
              "`repro.data.augment_cpu`): "
              + "; ".join(f"{label} **{d['ms_per_batch']:.0f} ms** per batch "
                          f"({d['ms_per_batch'] / d['batch']:.2f} ms per image)"
                          for label, d in dev.items())
              + ". On a GPU: not measured (no GPU was available to this run).", ""]
    pv = ratios[f"{PROTOCOL_VAL} / folder val"]
    lines += [f"Exact evaluation: `{PROTOCOL_VAL}` (the protocol's PIL resize + centre crop "
              "stored raw by `repro data convert --eval-protocol`, "
              f"{rep['protocol_conversion']['beton_mb']:.0f} MB, written in "
              f"{rep['protocol_conversion']['seconds']:.0f} s) reads "
              f"{rep['summary'][PROTOCOL_VAL]['median']:.0f} img/s, {pv['of_medians']:.2f}x "
              "the folder val loader (which decodes and resizes every JPEG), and gives the "
              "model the same pixels (tests/test_data.py).", ""]
    return lines


def render(rep: dict) -> str:
    """The markdown report from the JSON record."""
    s, m, ds, conv = rep["settings"], rep["machine"], rep["dataset"], rep["conversion"]
    rows, ratios, load = rep["summary"], rep["ratios"], rep["other_load"]
    main_res, ctx_res = s["max_res"], s["context_max_res"]
    w = conv[str(main_res)]["writer"]
    lines = [
        "# Data loading: FFCV vs torchvision ImageFolder",
        "",
        "*Generated by `benchmarks/data_loading.py`; do not edit. Regenerate with "
        f"`{rep['command']}` (rewrites this file and `{Path(rep['json']).name}`; "
        f"took {rep['total_s'] / 60:.1f} min).*",
        "",
        *_papers_section(rep),
        f"The project's bar: FFCV train >= {MIN_TRAIN_RATIO:g}x the torchvision ImageFolder "
        f"train loader, same JPEGs, same transforms, {s['workers']} workers (batch "
        f"{s['batch']}, {m['usable_cores']} cores). On the repo's default .beton (max side "
        f"{main_res}, compress probability {w['compress_probability']}, JPEG quality "
        f"{w['jpeg_quality']}: ffcv-imagenet's full-resolution setting; "
        f"{_resizing(ds, main_res)}), FFCV train is",
        f"- vs `{FOLDER}`, `repro.data`'s ImageFolder loader (what a `data.format=folder` run "
        f"uses; per-sample seeded for exact resume): "
        f"{_verdict(ratios[f'ffcv train / {FOLDER}'])};",
        f"- vs `{PLAIN}`, a plain torchvision DataLoader (no per-sample seeding: the fairer "
        f"baseline): {_verdict(ratios[f'ffcv train / {PLAIN}'])}.",
        "",
    ]
    lines += [
        "Where FFCV's lead comes from, measured in the same run (context, not the verdict):",
        f"- `{STOCK}`: the same loader with ffcv's `RandomHorizontalFlip` then "
        "`NormalizeImage` (two passes, two buffers) in place of repro's one-pass "
        f"`FlipNormalize`: repro's train loader is {ratio(ratios, 'ffcv train', STOCK):.2f}x "
        f"it; it alone is {ratio(ratios, STOCK, PLAIN):.2f}x `{PLAIN}`.",
        f"- `{SUMS}`: the FFCV train loader with a consumer that sums one image of each batch "
        "with torch (as this benchmark's consumer did before it read one value only): torch's "
        "intra-op threads then wake in the process whose other threads are FFCV's loaders, on "
        f"the same {m['usable_cores']} cores: {ratio(ratios, SUMS, PLAIN):.2f}x `{PLAIN}`. A "
        "trainer's CPU work competes with an in-process loader the same way; on a GPU the "
        "main thread mostly waits.",
        "",
    ]
    if ctx_res:
        ctx = context_name(ctx_res)
        lines += [
            f"Context, not the verdict: on a .beton of max side {ctx_res} (the setting of "
            f"FFCV_NOTES.md's 4.6x), {_resizing(ds, ctx_res)}. Faster, not the same pixels: "
            f"`{ctx}` is {ratio(ratios, ctx, FOLDER):.2f}x `{FOLDER}` and "
            f"{ratio(ratios, ctx, PLAIN):.2f}x `{PLAIN}` ({ratio(ratios, ctx, 'ffcv train'):.2f}x "
            "FFCV train on the default .beton).", ""]
    if load["busy_epochs"]:
        lines += [f"**Warning**: other processes (or the hypervisor) took more than "
                  f"{OTHER_LOAD_WARN_PCT:g} % of the machine during {load['busy_epochs']} of "
                  f"the {load['timed_epochs']} timed epochs (see *others' CPU %*); medians "
                  "resist a few such epochs, but re-run on a quiet machine before trusting "
                  "close calls.", ""]
    else:
        lines += [f"Quiet run: other processes and the hypervisor took at most "
                  f"{load['max_pct']:.1f} % of the machine in any timed epoch.", ""]
    lines += _table(
        ["loader", "img/s median", "min", "max", "1st batch s", "CPU used %",
         "others' CPU % (max)", "warm-up epoch s"],
        [[name, f"{r['median']:.0f}", f"{r['min']:.0f}", f"{r['max']:.0f}",
          f"{r['first_batch_s']:.2f}", f"{r['cpu_pct']:.0f}", f"{r['other_pct_max']:.1f}",
          f"{rep['raw'][name]['warmup']['seconds']:.1f}"] for name, r in rows.items()])
    lines += ["", "Ratios of the medians; the range is over the interleaved rounds (one "
              "loader's epoch over the other's in the same round):", ""]
    lines += _table(["ratio", "of medians", "per-round min", "per-round max"],
                    [[k, f"{r['of_medians']:.2f}x", f"{r['per_round_min']:.2f}x",
                      f"{r['per_round_max']:.2f}x"] for k, r in ratios.items()])
    lines += [
        "",
        "- *ffcv train/val, folder train/val*: the loaders `repro.data.build_loaders` builds "
        f"for a single process, on the default .beton (max side {main_res}) and the JPEGs.",
        f"- *{PLAIN}*: `ImageFolder` + `DataLoader(shuffle=True, persistent_workers=True)` "
        "with `repro.data.folder.train_transform`, then channels_last. *folder train* differs "
        "only in its sampler and a per-sample seeded wrapper (each sample's augmentation drawn "
        "from (seed, epoch, index), for exact resume); its workers persist too.",
    ]
    lines.append(f"- *{STOCK}*: see above; built like *ffcv train* otherwise. *{SUMS}*: the "
                 "*ffcv train* loader itself, iterated by the summing consumer.")
    if ctx_res:
        lines.append(f"- *{context_name(ctx_res)}*: the FFCV train loader as built, on a "
                     f".beton written with max side {ctx_res} (context, see above).")
    lines += [
        "- *1st batch s*: from `iter()` to the first batch (median), included in img/s. "
        "*CPU used %*: this process and its DataLoader workers, as a share of all cores "
        "(median over epochs). *others' CPU %*: every other process plus hypervisor steal, "
        "worst epoch.",
        "",
        "## Method",
        f"- **Images**: {ds['images']} JPEGs in {len(ds['classes'])} class folders, each side "
        f"{ds['side_px'][0]}-{ds['side_px'][1]} px drawn per image (mean "
        f"{ds['mean_width']:.0f} x {ds['mean_height']:.0f}), JPEG quality "
        f"{ds['jpeg_quality'][0]}-{ds['jpeg_quality'][1]}, {ds['total_mb']:.0f} MB "
        f"({ds['mean_kb']:.0f} kB/image). Made from the photographs scikit-learn ships "
        "(china.jpg, flower.jpg) by random crops, rescales, flips, hue rotation, gamma and "
        f"white-balance shifts, seed {ds['seed']}: photo statistics, not noise (though "
        "smoother than ImageNet's, whose training JPEGs average ~110 kB, so decoding is "
        "cheaper here on both sides). Train and val loaders read the same images.",
        f"- **.betons**: `repro.data.convert.convert`, compress probability "
        f"{w['compress_probability']}, JPEG quality {w['jpeg_quality']}, write mode "
        f"{w['write_mode']}: that share of the images is stored as JPEG and the rest as raw "
        "pixels, so FFCV decodes a JPEG for only that share while the ImageFolder loaders "
        "decode every one. Written with "
        f"{conv[str(main_res)]['writer_processes']} processes, timed including the check pass:",
        "",
    ]
    lines += _table(["max side", "MB", "write s", "images/s"],
                    [[k, f"{c['beton_mb']:.0f}", f"{c['seconds']:.1f}",
                      f"{c['images_per_s']:.0f}"] for k, c in conv.items()])
    threads = rep["torch_threads"]
    thread_counts = sorted({e["torch_threads_after"] for r in rep["raw"].values()
                            for e in r["epochs"]} | set(threads.values()))
    lines += [
        "",
        f"- **Transforms**: train RandomResizedCrop {s['resolution']} (scale 0.08-1, ratio "
        "3/4-4/3), flip 0.5, normalise with ImageNet mean/std; val resize the shorter side to "
        f"{round(s['resolution'] / 0.875)} and centre-crop {s['resolution']} (crop_pct 0.875). "
        "FFCV: `train_pipeline` / `val_pipeline` via `make_loader` with the default "
        "`data.in_memory=true` (the .beton read through the OS page cache; train in "
        "QUASI_RANDOM order, as ffcv-imagenet on one process; val sequential), "
        f"{s['workers']} threads, OpenCV INTER_AREA resizing (fixed "
        "in ffcv 1.0.2); train flips and normalises in one pass (`repro.data.ffcv_ops."
        "FlipNormalize`: ffcv's lookup table, the same values). ImageFolder: timm "
        "`create_transform` (no auto-augment, jitter or "
        f"erasing), {s['interpolation']} interpolation (the recipes'), Pillow decoding, "
        f"{s['workers']} worker processes. All loaders yield float32 N x 3 x H x W "
        "channels_last images and int64 labels (checked).",
        f"- **Timing**: one full warm-up epoch per loader (FFCV's numba compilation happens "
        f"there), then {s['epochs']} timed full epochs each, interleaved: every round runs one "
        "epoch of each loader, the order rotating by one each round. An epoch is timed from "
        "`iter()` to exhaustion, the consumer reading one value of each batch; img/s = images "
        "yielded / seconds (train drops the last partial batch). Files are in the page cache "
        "for every loader.",
        "",
        "## Machine and versions",
        f"- CPU: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} online), "
        f"{m.get('memory_gib', '?')} GiB memory; {m['os']}.",
        "- " + ", ".join(f"{k} {val}" for k, val in rep["versions"].items()) + ".",
        "- torch threads in the main process: "
        + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in threads.items())
        + f"; after each timed epoch {', '.join(map(str, thread_counts))} ("
        + ("unchanged throughout: `repro.data.ffcv.import_ffcv` keeps ffcv from setting it)."
           if len(thread_counts) == 1 else "**changed**: ffcv sets it)."),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Generate, convert, measure, and write the report and its JSON."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    from repro.data import cache_dir
    from repro.io import atomic_write_json, atomic_write_text

    workdir = (args.workdir or cache_dir() / "bench").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = {"at_start": torch.get_num_threads()}
    photos, dataset = ensure_photos(workdir, args)
    print(f"images: {photos}\nconverting ...", flush=True)
    betons, conversion = {}, {}
    for res in filter(None, (args.max_res, args.context_max_res)):
        betons[res], conversion[str(res)] = convert_photos(photos, workdir, res, args)

    from repro.data.convert import convert

    protocol = workdir / f"val_{args.resolution}_0.875_{args.interpolation}_{args.images}.beton"
    protocol.unlink(missing_ok=True)
    t0 = time.perf_counter()
    convert(photos, protocol, eval_protocol=(args.resolution, 0.875, args.interpolation),
            workers=os.cpu_count(), progress=False)
    protocol_write = {"seconds": time.perf_counter() - t0,
                      "beton_mb": protocol.stat().st_size / 2**20}
    main_beton = betons[args.max_res]
    loaders = {}
    for label in PAPER_PIPELINES:
        loaders[ffcv_paper(label)] = build("ffcv", main_beton, main_beton, args,
                                           label)["ffcv train"]
        loaders[pil_paper(label)] = build_plain_torchvision(photos, args, label)
    loaders[PROTOCOL_VAL] = build("ffcv", main_beton, protocol, args)["ffcv val"]
    loaders |= build("ffcv", main_beton, main_beton, args)
    loaders |= build("folder", photos, photos, args)
    loaders[PLAIN] = build_plain_torchvision(photos, args)
    loaders[STOCK] = build_stock_ffcv(betons[args.max_res], args)
    loaders[SUMS] = ConsumerSums(loaders["ffcv train"])  # the same loader, another consumer
    if args.context_max_res:
        ctx = betons[args.context_max_res]
        loaders[context_name(args.context_max_res)] = build("ffcv", ctx, ctx, args)["ffcv train"]
    loaders = dict(sorted(loaders.items(), key=lambda item: "val" in item[0]))  # train first
    threads["after_building_loaders"] = torch.get_num_threads()
    raw = measure(loaders, args.epochs)
    threads["at_the_end"] = torch.get_num_threads()
    layouts = {json.dumps(r["warmup"]["batch"], sort_keys=True) for r in raw.values()}
    if len(layouts) != 1:
        raise SystemExit(f"the loaders' batches differ in layout: {sorted(layouts)}")
    summary, ratios = summarise(raw, ratio_pairs(args.context_max_res))
    device_ms = device_augmentation_ms(main_beton, args)

    out = args.out.resolve()
    json_path = out.with_suffix(".json")
    report = {
        "command": shlex.join(["python", "benchmarks/data_loading.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "json": str(json_path),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(), "versions": versions(), "dataset": dataset,
        "dataset_path": str(photos), "conversion": conversion, "torch_threads": threads,
        "summary": summary, "ratios": ratios, "other_load": other_load(raw), "raw": raw,
        "device_augmentation": device_ms, "protocol_conversion": protocol_write,
    }
    report["total_s"] = time.perf_counter() - t_start
    atomic_write_json(json_path, report)
    atomic_write_text(out, render(report))
    for label, r in ratios.items():
        print(f"{label}: {r['of_medians']:.2f}x")
    load = report["other_load"]
    print(f"other load: {load['busy_epochs']} of {load['timed_epochs']} timed epochs above "
          f"{OTHER_LOAD_WARN_PCT:g} % (max {load['max_pct']:.1f} %)")
    print(f"wrote {out} and {json_path.name} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
