"""An ImageFolder tree (`SRC/<class>/**/<image>`) walked safely: torchvision's class and file
order, with every image labelled exactly once.

torchvision's `make_dataset` walks with `os.walk(followlinks=True)`: a symlink inside the tree
that points back up (`ln -s .. SRC/a_cls/loop`) is followed until the path is too long, so
every image is found again dozens of times and images of other classes are labelled `a_cls`.
The rule here:

- a class folder may itself be a symlink (a subset of ImageNet built from links), and so may
  image files;
- inside a class, a symlinked directory is followed only when it leads outside the tree, and
  any directory (by its real path) is visited once, so no loop can be entered;
- an image (by its real path) found twice in one class counts once; found in two classes, it is
  a one-line DataError naming both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from repro.data import DataError


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def image_tree(src: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names, torchvision's convention) and (path, class index) pairs,
    in torchvision's order (classes, then walked folders, then file names, sorted)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not an ImageFolder tree (one folder per class): no such "
                        "directory")
    root = os.path.realpath(src)
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        flat = any(e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS)
                   for e in os.scandir(src))
        raise DataError(f"{src}: no class folders in it" + (
            " but images directly in it (ImageNet's validation set ships so): pass --labels "
            "FILE (a CSV of file,synset, e.g. LOC_val_solution.csv; or one synset per line in "
            "sorted file-name order), or sort the images into one folder per class" if flat
            else ""))
    label_of: dict[str, str] = {}  # real path of an image -> its class
    samples: list[tuple[str, int]] = []
    for index, cls in enumerate(classes):
        for path in _class_images(src / cls, root):
            real = os.path.realpath(path)
            if real in label_of:
                if label_of[real] != cls:
                    raise DataError(f"{path}: the same image is also under class "
                                    f"{label_of[real]!r} ({real}); an image has one label")
                continue
            label_of[real] = cls
            samples.append((path, index))
    return classes, samples


def _class_images(class_dir: Path, root: str) -> list[str]:
    visited: set[str] = set()
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not _loops(os.path.join(dirpath, d), root,
                                                         visited)]
        found.append((dirpath, filenames))
    return [os.path.join(dirpath, name) for dirpath, names in sorted(found)
            for name in sorted(names) if has_file_allowed_extension(name, IMG_EXTENSIONS)]


def _loops(path: str, root: str, visited: set[str]) -> bool:
    """A subdirectory not to enter: a link back into the tree, or a folder already walked."""
    real = os.path.realpath(path)
    return real in visited or (os.path.islink(path) and _inside(real, root))


def flat_images(src: str | os.PathLike, labels: str | os.PathLike
                ) -> tuple[list[str], list[tuple[str, int]]]:
    """A flat folder of images (ImageNet's validation set) labelled by a file: a CSV of
    `file,synset` (a header line and extra columns are ignored; Kaggle's LOC_val_solution.csv,
    whose second column starts with the synset, reads as is), or one synset per line in sorted
    file-name order. Classes are the sorted synsets, as the training tree's folder names.

    Integer labels are refused: the devkit's ground truth counts ILSVRC2012 ids (1-1000), whose
    order is not the sorted synsets', and taking them for class indices mislabels everything."""
    src, labels = Path(src), Path(labels)
    if not labels.is_file():
        raise DataError(f"{labels}: labels file not found")
    files = sorted(e.name for e in os.scandir(src)
                   if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS))
    lines = [ln.strip() for ln in labels.read_text().splitlines() if ln.strip()]
    by_file: dict[str, str] = {}
    if lines and "," in lines[0]:
        for i, line in enumerate(lines):
            name, rest = (c.strip() for c in line.split(",", 1))
            synset = rest.split()[0] if rest.split() else ""
            if not _SYNSET.fullmatch(synset):
                if i == 0:
                    continue  # a header
                raise DataError(f"{labels}:{i + 1}: expected file,synset (e.g. "
                                f"ILSVRC2012_val_00000001.JPEG,n01751748), got {line[:80]!r}")
            stem = Path(name).stem
            by_file[stem] = synset
        wanted = [by_file.get(Path(f).stem) for f in files]
    else:
        if len(lines) != len(files):
            raise DataError(f"{labels}: {len(lines)} labels for {len(files)} images in {src}")
        wanted = lines
    for f, synset in zip(files, wanted, strict=True):
        if synset is None:
            raise DataError(f"{labels}: no label for {src / f}")
        if not _SYNSET.fullmatch(synset):
            raise DataError(f"{labels}: label {synset!r} for {f} is not a WordNet synset id "
                            "(nXXXXXXXX); integer labels are refused: the devkit's are "
                            "ILSVRC2012 ids, not sorted-synset indices")
    classes = sorted(set(wanted))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(str(src / f), index[w]) for f, w in zip(files, wanted, strict=True)]


_SYNSET = re.compile(r"n\d{8}")
