"""What `repro data convert` reads besides an ImageFolder tree: ImageNet-21K as distributed,
and a held-out split for a release that has none.

ImageNet-21K (fall11, and the winter-2021 release image-net.org serves today) comes as one
`.tar` per class (`n01440764.tar`, flat members `n01440764_10026.JPEG`), unpacked or not. A
source folder may hold class folders, per-class `.tar` files, or both: the class is the folder
name or the archive's stem, and classes are sorted, as torchvision's ImageFolder sorts them.
An image inside an archive is addressed as `ARCHIVE.tar::MEMBER`, and read straight from the
archive (no unpacking to disk).

Neither release has a validation split, and none of the papers that pre-train on it states
how it evaluated the pre-training. `--holdout N` holds out, per class, the N images whose
SHA-1 of `<class>/<name in class>` is smallest (at most half of a class with fewer than 2N
images): the rule depends on the names only, not on listing order or on whether the class was
unpacked, so the same release gives the same split anywhere. The training file's sidecar
records the rule, the count and a digest of the held-out list; `--heldout-of TRAIN.beton`
writes exactly those held-out images and checks the digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from repro.data import DataError
from repro.data.tree import image_tree

TAR_SEP = "::"
HOLDOUT_RULE = ("per class, the N images with the smallest sha1('<class>/<name in class>'), "
                "at most half of the class")


def source_images(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (image, class index) pairs of a folder of class folders and/or per-class
    .tar archives (module doc)."""
    archives = sorted(e.name for e in os.scandir(src) if e.is_file() and e.name.endswith(".tar"))
    if not archives:
        return image_tree(src)
    folders = {e.name for e in os.scandir(src) if e.is_dir()}
    by_class: dict[str, list[str]] = {}
    if folders:
        classes, samples = image_tree(src)
        for path, i in samples:
            by_class.setdefault(classes[i], []).append(path)
    for name in archives:
        cls = name.removesuffix(".tar")
        if cls in by_class or cls in folders:
            raise DataError(f"{src / name}: class {cls!r} is also a folder in {src}; keep one")
        by_class[cls] = [f"{src / name}{TAR_SEP}{m}" for m in _members(src / name)]
    classes = sorted(by_class)
    return classes, [(ref, i) for i, c in enumerate(classes) for ref in by_class[c]]


def _members(archive: Path) -> list[str]:
    try:
        with tarfile.open(archive) as tf:
            return sorted(m.name for m in tf.getmembers()
                          if m.isfile() and has_file_allowed_extension(m.name, IMG_EXTENSIONS))
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: not a readable .tar archive ({e})") from None


_open: dict[str, tarfile.TarFile] = {}  # per process: archives stay open across images


def open_image(ref: str):
    """A path, or the bytes of `ARCHIVE::MEMBER`: something PIL's Image.open reads."""
    if TAR_SEP not in ref:
        return ref
    archive, member = ref.split(TAR_SEP, 1)
    tf = _open.get(archive)
    if tf is None:
        if len(_open) >= 32:  # a worker walks classes in order: keep a few open
            for old in _open.values():
                old.close()
            _open.clear()
        tf = _open[archive] = tarfile.open(archive)
    data = tf.extractfile(member)
    if data is None:
        raise OSError(f"{ref}: not a file in the archive")
    return io.BytesIO(data.read())


def _name_in_class(ref: str, src: Path, cls: str) -> str:
    if TAR_SEP in ref:
        return ref.split(TAR_SEP, 1)[1]
    return os.path.relpath(ref, src / cls)


def split(src: Path, classes: list[str], samples: list[tuple[str, int]], per_class: int
          ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], dict]:
    """(training samples, held-out samples, the record of the split) by HOLDOUT_RULE."""
    if per_class < 1:
        raise DataError(f"--holdout {per_class}: expected a positive number of images per class")
    keyed: dict[int, list[tuple[str, tuple[str, int]]]] = {}
    for ref, i in samples:
        key = f"{classes[i]}/{_name_in_class(ref, src, classes[i])}"
        keyed.setdefault(i, []).append((hashlib.sha1(key.encode()).hexdigest(), (ref, i)))
    train, held, names = [], [], []
    for i in sorted(keyed):
        ranked = sorted(keyed[i])
        n = min(per_class, len(ranked) // 2)
        held_keys = {h for h, _ in ranked[:n]}
        for h, sample in keyed[i]:  # listing order kept within each part
            (held if h in held_keys else train).append(sample)
        names += sorted(f"{classes[i]}/{_name_in_class(s[0], src, classes[i])}"
                        for _, s in ranked[:n])
    record = {"rule": HOLDOUT_RULE, "per_class": per_class, "heldout_count": len(held),
              "heldout_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    return train, held, record
