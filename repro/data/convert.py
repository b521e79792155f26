"""`repro data convert`: an ImageFolder tree (ImageNet's layout) -> one FFCV .beton file.

Writer settings default to ffcv-imagenet's (longest side <= 500 px, JPEG quality 90, half the
images stored as JPEG and half raw) and are recorded twice: in the default file name
(`train_500_0.50_90.beton`, as ffcv-imagenet names them) and in a sidecar `<file>.json` with
the class list and every skipped file.

`eval_protocol=(res, crop_pct, interpolation)` writes an evaluation file instead: each image is
what the recipes' protocol gives the model, PIL's `Resize(int(res / crop_pct), interpolation)`
+ `CenterCrop(res)` (timm's eval transform, the official codes' own) applied to the source
file, stored as raw pixels; the name records the protocol (`val_224_0.875_bicubic.beton`) and
so does the sidecar, which the FFCV loader checks against the recipe. Evaluation through FFCV
is then exactly the protocol, with no decode cost at all.

Real ImageNet is not clean: CMYK and grayscale JPEGs, a PNG named .JPEG, the odd truncated
file. Every image is checked first (a cheap reduced-size JPEG decode that still reads the whole
file) so that the writer, which allocates one slot per image up front, only sees images that
decode; each is converted to RGB. Unreadable files are skipped, counted and listed, or stop the
conversion with `on_error="fail"`. The .beton is written under a temporary name and renamed at
the end: an interrupted conversion leaves no destination file behind.
"""

from __future__ import annotations

import importlib.metadata
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from repro.data import DataError, release
from repro.data.beton import (
    default_name,
    digest,
    files_path,
    protocol,
    protocol_name,
    read_sidecar,
    sidecar_path,
)
from repro.data.ffcv import import_ffcv
from repro.data.tree import flat_images
from repro.io import atomic_write_json, atomic_write_text

DEFAULTS = {"max_res": 500, "quality": 90, "compress_prob": 0.5}


def list_images(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (image, class index) pairs, each image labelled once: an ImageFolder tree
    (repro.data.tree), or ImageNet-21K's per-class .tar files (repro.data.release)."""
    return release.source_images(src)


def load_rgb(path: str) -> Image.Image:
    """Decode any image PIL reads (whatever its extension says) and convert it to RGB."""
    with Image.open(release.open_image(path)) as im:
        return im.convert("RGB")  # CMYK, L, P, RGBA, I;16 ... -> RGB; loads the pixels


def check_image(path: str) -> str | None:
    """None if `path` decodes, else the error in one line."""
    try:
        with Image.open(release.open_image(path)) as im:
            if im.format == "JPEG":
                # DCT-domain downscaling: ~8x cheaper, and it still reads every scan, so a
                # truncated file fails here as it would on a full decode.
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _split(src: Path, classes: list[str], samples: list, holdout: int | None,
           heldout_of) -> tuple[list, dict | None]:
    """The training part (`holdout`), the held-out part (`heldout_of`), or all the samples."""
    if holdout and heldout_of:
        raise DataError("--holdout and --heldout-of: give one (the training file holds out, "
                        "the evaluation file takes what it held out)")
    if holdout:
        train, _, record = release.split(src, classes, samples, holdout)
        return train, {**record, "part": "train"}
    if heldout_of is None:
        return samples, None
    train_record = read_sidecar(heldout_of) or {}
    made = train_record.get("holdout")
    if not made or made.get("part") != "train":
        raise DataError(f"{heldout_of}: not a training file written with --holdout (its "
                        f"record {sidecar_path(heldout_of)} has no split)")
    _, held, record = release.split(src, classes, samples, made["per_class"])
    if record["heldout_sha256"] != made["heldout_sha256"] or \
            train_record.get("classes") != classes:
        raise DataError(f"{src}: not the source {heldout_of} was split from (its classes or "
                        "held-out images differ)")
    return held, {**record, "part": "heldout", "of": str(Path(heldout_of).resolve())}


def _default_signals() -> None:
    """Pool workers die on SIGTERM again: a parent under submitit ignores it (it waits for its
    own checkpoint signal), and a pool that cannot terminate its workers hangs on exit."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


class _ImageFolderRGB:
    """Indexable (image as uint8 HxWx3, label) pairs for FFCV's writer; `transform`: a PIL
    transform applied first (the eval protocol's resize and centre crop)."""

    def __init__(self, samples: list[tuple[str, int]], transform=None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return np.asarray(img), label


def _write_stoppably(tmp: Path, fields: dict, workers: int, dataset) -> None:
    """FFCV's DatasetWriter, run in a child process in its own process group.

    In the conversion's own process, Ctrl-C reached the writer's workers and its progress loop
    at random points: it was swallowed two times in three ("Exception ignored ...") and the
    conversion finished, or it left the writer's shared memory behind. Here Ctrl-C reaches this
    process only (the child's group is not the terminal's); it then kills the child's whole
    group, unlinks the shared memory the writer created, and re-raises, so the caller removes
    the temporary file."""
    import multiprocessing as mp
    import signal
    from multiprocessing import shared_memory

    ctx = mp.get_context("fork")
    name = ctx.Array("c", 256)  # the writer's shared-memory segment, once created
    # Held by the child while it creates the segment and reports its name, and by this process
    # while it stops the child: a segment is never created unnamed, so none can leak.
    guard, stop = ctx.Lock(), ctx.Value("b", 0)
    child = ctx.Process(target=_writer_process,
                        args=(str(tmp), fields, workers, dataset, name, guard, stop))
    child.start()
    try:
        child.join()
    except BaseException:
        held = guard.acquire(timeout=60)
        stop.value = 1
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.join()
        if held:
            guard.release()
        if name.value:
            try:  # attach and unlink: also settles the resource tracker's account of it
                segment = shared_memory.SharedMemory(name=name.value.decode())
                segment.close()
                segment.unlink()
            except FileNotFoundError:
                pass
        raise
    if child.exitcode != 0:
        raise DataError(f"{tmp}: FFCV's writer failed (exit status {child.exitcode}; its "
                        "messages are above); nothing written")


def _writer_process(tmp: str, fields: dict, workers: int, dataset, name, guard, stop) -> None:
    import signal

    from ffcv.writer import DatasetWriter

    os.setpgrp()  # its own group: the terminal's Ctrl-C goes to the parent, which stops it
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    class Writer(DatasetWriter):
        def prepare(self):
            with guard:
                if stop.value:  # stopped before the segment exists
                    os._exit(130)
                super().prepare()
                name.value = self.metadata_sm.name.encode()

    Writer(tmp, fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=100)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, max_res: int | None = 500,
            quality: int = 90, compress_prob: float = 0.5, workers: int | None = None,
            on_error: str = "skip", overwrite: bool = False, progress: bool = True,
            eval_protocol: tuple[int, float, str] | None = None,
            labels: str | os.PathLike | None = None, holdout: int | None = None,
            heldout_of: str | os.PathLike | None = None) -> dict:
    """Write `src` (an ImageFolder tree, or ImageNet-21K's per-class .tar files; or, with
    `labels`, a flat folder labelled by that file: repro.data.tree.flat_images) to the .beton
    `dst`; returns the sidecar record. `holdout`: leave N images per class out (the training
    file of a release without a validation split); `heldout_of`: write the images that
    training file left out (repro.data.release).

    `dst` may be a directory (or end in '/'): the file is then named by `default_name`, or by
    `protocol_name` for an `eval_protocol` file (module doc).
    """
    from tqdm import tqdm

    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source directory not found (expected an ImageFolder tree, "
                        "e.g. ImageNet's train/ with one folder per class)")
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    if not 0 <= compress_prob <= 1 or not 1 <= quality <= 100:
        raise DataError(f"compress_prob must be in [0, 1] and quality in [1, 100], got "
                        f"{compress_prob}, {quality}")
    transform = None
    if eval_protocol is not None:
        from repro.data.folder import eval_resize_crop

        res, crop_pct, interpolation = eval_protocol
        if interpolation not in ("bilinear", "bicubic") or not 0 < crop_pct <= 1 or res < 1:
            raise DataError(f"eval protocol {res},{crop_pct},{interpolation}: expected "
                            "RES,CROP_PCT,bilinear|bicubic with 0 < CROP_PCT <= 1")
        transform = eval_resize_crop(res, crop_pct, interpolation)
    dst = Path(dst)
    if dst.is_dir() or str(dst).endswith(os.sep):
        dst = dst / (protocol_name(src, *eval_protocol) if eval_protocol else
                     default_name(src, max_res, compress_prob, quality))
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists (pass --overwrite to replace it)")
    workers = workers or os.cpu_count() or 1

    classes, samples = flat_images(src, labels) if labels else list_images(src)
    if not samples:
        raise DataError(f"{src}: no images found under its class folders")
    samples, split = _split(src, classes, samples, holdout, heldout_of)
    paths = [p for p, _ in samples]
    with Pool(workers, initializer=_default_signals) as pool:
        results = list(tqdm(pool.imap(check_image, paths, chunksize=64), total=len(paths),
                            desc="checking", unit="img", disable=not progress))
    skipped = [{"path": os.path.relpath(p, src), "error": err}
               for p, err in zip(paths, results, strict=True) if err]
    if skipped and on_error == "fail":
        first = skipped[0]
        raise DataError(f"{src / first['path']}: unreadable image ({first['error']}); "
                        f"{len(skipped)} such file(s), nothing written (--on-error skip skips "
                        "and lists them)")
    good = [s for s, err in zip(samples, results, strict=True) if not err]

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    image = (RGBImageField(write_mode="raw") if eval_protocol else
             RGBImageField(write_mode="proportion", max_resolution=max_res,
                           jpeg_quality=quality, compress_probability=compress_prob))
    fields = {"image": image, "label": IntField()}
    had_list = files_path(dst).exists()
    try:
        _write_stoppably(tmp, fields, workers, _ImageFolderRGB(good, transform))
        record = {
            "created_by": "repro data convert",
            "destination": str(dst),
            "source": str(src.resolve()),
            "labels": str(Path(labels).resolve()) if labels else None,
            "num_images": len(good),
            "num_classes": len(classes),
            "classes": classes,  # index i = classes[i] (sorted folder names)
            "writer": ({"write_mode": "raw"} if eval_protocol else
                       {"max_resolution": max_res, "jpeg_quality": quality,
                        "compress_probability": compress_prob, "write_mode": "proportion"})
            | {"ffcv": importlib.metadata.version("ffcv")},  # the installed distribution
            "eval_protocol": protocol(*eval_protocol) if eval_protocol else None,
            "holdout": split,  # how a release without a validation split was split
            "files": files_path(dst).name,  # the images' names, in this file's order
            "skipped_count": len(skipped),
            "skipped": skipped,
            "size": tmp.stat().st_size,  # checked on every open (repro.data.beton.verify)
            "sha256": digest(tmp),  # checked on first use and by `repro data check`
        }
        atomic_write_text(files_path(dst),
                          "".join(f"{os.path.relpath(p, src)}\n" for p, _ in good))
        atomic_write_json(sidecar_path(dst), record)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not had_list:  # a name list written for a .beton that never arrived
            files_path(dst).unlink(missing_ok=True)
        raise
    return record
