"""FFCV vs torchvision ImageFolder: images/s of the train and val loaders on the same photos.

Writes `reports/data_loading.md` and the raw numbers beside it (`reports/data_loading.json`):

1. A JPEG ImageFolder of natural images, made deterministically from the two photographs that
   scikit-learn ships (china.jpg, flower.jpg) by random crops, rescales, flips and colour
   shifts, so that the files have the statistics of photos, not of noise (benchmarks/photos.py).
   Cached in the workdir.
2. Two FFCV .betons of it, written by `repro.data.convert.convert` (timed on every run): one
   with the repo's default writer settings (`--max-res`, full resolution for these images), on
   which the verdict rests, and one with max side `--context-max-res` (256, the setting of
   FFCV_NOTES.md's figures), for context: FFCV then decodes downscaled images.
3. The loaders timed: the four `repro.data.build_loaders` builds from a minimal recipe (FFCV
   and ImageFolder, train and val: same transforms, batch and workers), a plain torchvision
   DataLoader (the textbook baseline: no per-sample seeding) and the FFCV train loader on the
   second .beton. Each runs one full warm-up epoch (numba compiles FFCV's pipelines then) and
   is then timed over full epochs, interleaved (`repro.measure.timing`, an epoch per window):
   one epoch of each loader per round, in an order that rotates each round, so that drift on a
   noisy machine falls on all alike. Every timed epoch also records how much CPU other
   processes took meanwhile. `repro.report.data_loading` renders the report from the JSON.

Usage (from the repository root):
    python benchmarks/data_loading.py [--images 2000] [--workers 2] [--batch 64] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from photos import HUE_BANDS, ensure_photos  # benchmarks/photos.py, beside this script

from repro.measure import timing
from repro.measure.machine import machine
from repro.measure.machine import versions as dist_versions
from repro.report.data_loading import (
    FOLDER,
    OTHER_LOAD_WARN_PCT,
    PAPER_PIPELINES,
    PLAIN,
    PROTOCOL_VAL,
    STOCK,
    SUMS,
    context_name,
    ffcv_paper,
    pil_paper,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "data_loading.md"
LOADING_DISTS = ("torch", "torchvision", "timm", "ffcv", "numba", "numpy", "Pillow",
                 "opencv-python")


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
# Conversion and loaders


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


# ------------------------------------------------------------------------------------------
# Timing and environment


def run_epoch(loader) -> dict:
    """One full pass: images seen, seconds to the first batch, and the first batch's layout.

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
    return {"images": images_seen, "first_batch_s": first_s, "batch": first}


def epoch_item(name: str, loader) -> timing.Item:
    """A loader as a timed item: a step is one full epoch; the last epoch's facts ride along."""

    def run(k: int) -> dict:
        epochs = [run_epoch(loader) for _ in range(k)]
        return {"units": sum(e["images"] for e in epochs),
                "first_batch_s": epochs[-1]["first_batch_s"], "batch": epochs[-1]["batch"],
                "torch_threads_after": torch.get_num_threads()}

    return timing.Item(name, run)


def measure(loaders: dict, epochs: int) -> dict:
    """One warm-up epoch per loader, then `epochs` rounds of one timed epoch each, rotating.

    No epoch is re-timed: an epoch during which other processes took more than
    OTHER_LOAD_WARN_PCT % of the machine is only counted (the report flags it)."""
    plan = timing.Plan(warmup_s=0.0, warmup_steps=1, window_s=0.0, repeats=epochs, attempts=1,
                       retry_budget_s=0.0, quiet_pct=OTHER_LOAD_WARN_PCT)
    items = [epoch_item(name, loader) for name, loader in loaders.items()]
    raw, _ = timing.interleave(items, plan, log=lambda msg: print(msg, flush=True))
    return raw


def summarise(raw: dict, pairs: list) -> tuple[dict, dict]:
    """Median/min/max images/s and CPU shares per loader, and the ratios in `pairs`."""
    rows = {}
    for name, record in raw.items():
        fig, epochs = timing.summarise(record), timing.used_windows(record)
        rows[name] = {"median": fig["median"], "min": fig["min"], "max": fig["max"],
                      "images_per_epoch": epochs[0]["units"],
                      "first_batch_s": statistics.median(e["first_batch_s"] for e in epochs),
                      "cpu_pct": fig["ours_pct"], "other_pct_max": fig["others_pct_max"]}
    return rows, {f"{top} / {bottom}": timing.ratio(raw, top, bottom) for top, bottom in pairs}


def other_load(raw: dict) -> dict:
    """How many timed epochs other processes (or the hypervisor) disturbed."""
    load = timing.other_load(raw, list(raw), OTHER_LOAD_WARN_PCT)
    return {"timed_epochs": load["timed_windows"], "max_pct": load["max_pct"],
            "busy_epochs": load["disturbed_used"]}


def saved_raw(raw: dict) -> dict:
    """The timing records in the report's layout: each loader's warm-up and timed epochs."""
    out = {}
    for name, record in raw.items():
        w = record["warmup"]
        out[name] = {
            "warmup": {"images": w["units"], "seconds": w["seconds"],
                       "images_per_s": w["units"] / w["seconds"],
                       "first_batch_s": w["first_batch_s"], "batch": w["batch"]},
            "epochs": [{"images": e["units"], "seconds": e["seconds"], "images_per_s": e["rate"],
                        "first_batch_s": e["first_batch_s"], "ours_pct": e["ours_pct"],
                        "other_pct": e["other_pct"], "steal_pct": e["steal_pct"],
                        "round": e["round"], "torch_threads_after": e["torch_threads_after"]}
                       for e in timing.used_windows(record)]}
    return out


def versions() -> dict:
    """Versions of everything on the loading path (ffcv's own __version__ is stale: ask pip)."""
    import cv2
    from PIL import features

    return {**dist_versions(LOADING_DISTS, missing="not installed"),
            "libjpeg-turbo (Pillow)": features.version_feature("libjpeg_turbo") or "no",
            "cv2 (Python, used by the writer)": cv2.__version__}


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
    timed = measure(loaders, args.epochs)
    threads["at_the_end"] = torch.get_num_threads()
    raw = saved_raw(timed)
    layouts = {json.dumps(r["warmup"]["batch"], sort_keys=True) for r in raw.values()}
    if len(layouts) != 1:
        raise SystemExit(f"the loaders' batches differ in layout: {sorted(layouts)}")
    summary, ratios = summarise(timed, ratio_pairs(args.context_max_res))
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
        "summary": summary, "ratios": ratios, "other_load": other_load(timed), "raw": raw,
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
