"""Data: conversion to FFCV (hostile inputs, atomicity), both loaders, the built-in digits set,
FFCV under DDP. FFCV tests run the exact pipelines the trainer uses, on CPU, under a timeout
(ffcv 1.0.2 can spin forever on a badly ordered pipeline: libffcv/ffcv#396)."""

from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from repro.cli import main
from repro.data import DataError, build_loaders, ffcv_available
from repro.data.builtin import FORMAT_VERSION, ensure_digits
from repro.recipe import load_recipe

pytestmark = [
    pytest.mark.skipif(not ffcv_available() and os.environ.get("CI") != "true",
                       reason="FFCV not installed (make install installs it; CI requires it)"),
    pytest.mark.timeout(300),
]

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def photo(seed: int, size: int = 64) -> Image.Image:
    """A real photograph crop (scikit-learn ships two), so JPEG behaves as on ImageNet."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(seed)
    img = imgs[seed % 2]
    y, x = rng.integers(0, img.shape[0] - 200), rng.integers(0, img.shape[1] - 200)
    return Image.fromarray(img[y:y + 200, x:x + 200]).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """An ImageFolder with ImageNet's awkward files: CMYK, grey, PNG named .JPEG, truncated."""
    root = tmp_path_factory.mktemp("hostile") / "train"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    for i in range(6):
        photo(i).save(root / ("cat" if i % 2 else "dog") / f"ok{i}.JPEG", quality=95)
    base = photo(10)
    base.convert("CMYK").save(root / "cat" / "cmyk.JPEG")
    base.convert("L").save(root / "dog" / "grey.JPEG")
    base.save(root / "dog" / "png_named.JPEG", format="PNG")
    buf = io.BytesIO()
    base.save(buf, format="JPEG", quality=95)
    (root / "cat" / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "garbage.JPEG").write_bytes(b"this is not an image")
    return root


@pytest.fixture(scope="module")
def converted(hostile, tmp_path_factory) -> tuple[Path, dict]:
    from repro.data.convert import convert

    out = tmp_path_factory.mktemp("beton")
    record = convert(hostile, out, max_res=None, compress_prob=0.0, workers=2, progress=False)
    return Path(record["destination"]), record


def test_default_name_records_the_writer_settings(converted):
    beton, _ = converted
    assert beton.name == "train_full_0.00_90.beton"
    from repro.data.beton import default_name

    assert default_name("/x/train", 500, 0.5, 90) == "train_500_0.50_90.beton"  # ffcv-imagenet


def test_unreadable_files_are_skipped_counted_and_listed(converted):
    beton, record = converted
    sidecar = json.loads(Path(f"{beton}.json").read_text())
    assert sidecar == record
    assert record["skipped_count"] == 2
    assert sorted(s["path"] for s in record["skipped"]) == ["cat/truncated.JPEG",
                                                            "dog/garbage.JPEG"]
    assert "truncated" in record["skipped"][0]["error"] + record["skipped"][1]["error"]
    # CMYK, grey and the PNG named .JPEG are readable: converted to RGB and kept.
    assert record["num_images"] == 6 + 3
    assert record["classes"] == ["cat", "dog"]  # sorted folder names = torchvision's indices
    assert record["writer"] == {"max_resolution": None, "jpeg_quality": 90,
                                "compress_probability": 0.0, "write_mode": "proportion",
                                "ffcv": record["writer"]["ffcv"]}


def test_on_error_fail_stops_and_writes_nothing(hostile, tmp_path):
    from repro.data.convert import convert

    dst = tmp_path / "x.beton"
    with pytest.raises(DataError, match=r"(truncated|garbage)\.JPEG: unreadable image"):
        convert(hostile, dst, on_error="fail", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_leaves_no_destination(hostile, tmp_path, monkeypatch):
    from repro.data import convert as conv

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # after the data are written, before the rename

    monkeypatch.setattr(conv, "atomic_write_json", interrupt)
    dst = tmp_path / "x.beton"
    with pytest.raises(KeyboardInterrupt):
        conv.convert(hostile, dst, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary file


def test_existing_destination_is_not_overwritten(converted, hostile, capsys):
    beton, _ = converted
    before = beton.stat().st_mtime_ns
    assert main(["data", "convert", str(hostile), str(beton)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(beton) in err and "--overwrite" in err
    assert beton.stat().st_mtime_ns == before


def _sequential_images(beton: Path, res: int, crop_pct: float):
    from repro.data.ffcv import make_loader, val_pipeline

    loader = make_loader(str(beton), val_pipeline(res, crop_pct, MEAN / 255, STD / 255, "cpu"),
                         batch_size=4, workers=1, train=False, distributed=False,
                         device="cpu", seed=0)
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    x = torch.cat(images).permute(0, 2, 3, 1).numpy() * STD + MEAN  # back to 0..255 RGB
    return x, torch.cat(labels).numpy()


def test_round_trip_preserves_labels_and_pixels(converted, hostile):
    beton, record = converted
    from repro.data.convert import list_images, load_rgb

    _, samples = list_images(hostile)
    kept = [(p, c) for p, c in samples
            if Path(p).relative_to(hostile).as_posix() not in
            {s["path"] for s in record["skipped"]}]
    images, labels = _sequential_images(beton, res=64, crop_pct=1.0)
    assert labels.tolist() == [c for _, c in kept]
    for got, (path, _) in zip(images, kept, strict=True):
        want = np.asarray(load_rgb(path), dtype=np.float64)
        assert np.abs(got - want).max() < 0.5  # raw storage, no resize: the same pixels


def test_val_image_is_close_to_the_source_resized(hostile, tmp_path):
    from repro.data.convert import convert, list_images, load_rgb

    record = convert(hostile, tmp_path / "v.beton", max_res=None, compress_prob=1.0,
                     quality=90, workers=2, progress=False)  # every image stored as JPEG
    images, _ = _sequential_images(Path(record["destination"]), res=32, crop_pct=0.875)
    _, samples = list_images(hostile)
    # 64 px source: the centre 56 px, resized to 32. FFCV resizes with OpenCV's INTER_AREA;
    # PIL's (antialiased) bilinear is the closest PIL filter (measured: mean error 1.0 level
    # on raw storage, 2.2 with JPEG q90, against 2.3 / 3.6 for PIL's box filter).
    first = np.asarray(load_rgb(samples[0][0]))
    want = np.asarray(Image.fromarray(first[4:60, 4:60]).resize((32, 32), Image.BILINEAR),
                      float)
    err = np.abs(images[0] - want)
    assert err.mean() < 3.5 and np.percentile(err, 99) < 25
    other = np.asarray(Image.fromarray(np.asarray(load_rgb(samples[1][0]))[4:60, 4:60])
                       .resize((32, 32), Image.BILINEAR), float)
    assert np.abs(images[0] - other).mean() > 4 * err.mean()  # and not close to any image


def test_missing_or_corrupt_beton_is_a_one_line_error(tmp_path):
    from repro.data.ffcv import _open

    missing = tmp_path / "none.beton"
    with pytest.raises(DataError) as e:
        _open(str(missing), "train")
    assert str(missing) in str(e.value) and "repro data convert" in str(e.value)
    corrupt = tmp_path / "bad.beton"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(DataError) as e:
        _open(str(corrupt), "val")
    msg = str(e.value)
    assert "\n" not in msg and str(corrupt) in msg and "repro data convert" in msg


def write_recipe(tmp_path, data: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{name: vit_c_1gf, num_classes: 10}}
        data: {data}
        optim: {{lr: 1.0e-3}}
        schedule: {{epochs: 1}}
        train: {{global_batch: 64}}
    """))
    return path


def test_recipe_with_missing_data_path_names_it(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "{format: folder, train_path: /nope/train, "
                                           "val_path: /nope/val}"))
    with pytest.raises(DataError, match=r"^/nope/train: ImageFolder directory not found"):
        build_loaders(r, batch_size=8)
    r = load_recipe(write_recipe(tmp_path, "{format: ffcv, train_path: /nope/t.beton, "
                                           "val_path: /nope/v.beton}"))
    with pytest.raises(DataError, match=r"^/nope/t.beton: FFCV .beton file not found; create "
                                        r"it with `repro data convert"):
        build_loaders(r, batch_size=8)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ensure_digits(32, cache=cache), cache


def test_digits_are_built_once_and_reused(digits):
    paths, cache = digits
    meta = json.loads((paths.root / "meta.json").read_text())
    assert (meta["train"], meta["val"]) == (1437, 360)  # 1,797 digits, 20 % stratified val
    counts = [len(list((paths.val_dir / str(c)).iterdir())) for c in range(10)]
    assert sum(counts) == 360 and min(counts) >= 35
    stamp = paths.train_beton.stat().st_mtime_ns
    assert ensure_digits(32, cache=cache) == paths
    assert paths.train_beton.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert json.loads(Path(f"{paths.train_beton}.json").read_text())["source"] == \
        str(paths.train_dir)


BUILD_AND_READ = """
import sys
from repro.data.builtin import FORMAT_VERSION, ensure_digits
p = ensure_digits(24, cache=sys.argv[1], with_beton=False)
print(sum(1 for d in (p.train_dir, p.val_dir) for f in d.glob("*/*.png") if f.stat().st_size))
"""


def test_two_processes_starting_together_build_the_digits_once(tmp_path):
    """The jobs of an array on a fresh machine: the later builder used to delete the set the
    first had just finished, under a process already reading it."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", BUILD_AND_READ, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["1797", "1797"]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == \
        [f"digits-24px-v{FORMAT_VERSION}"]  # one set, no temporary directory left
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fmt", ["ffcv", "folder"])
def test_loaders_share_one_contract(digits, tmp_path, monkeypatch, fmt):
    _, cache = digits
    monkeypatch.setenv("REPRO_CACHE", str(cache))
    r = load_recipe(write_recipe(tmp_path, f"{{dataset: digits, format: {fmt}, resolution: 32,"
                                           f" workers: 2, train_images: null}}"))
    threads = torch.get_num_threads()
    loaders = build_loaders(r, batch_size=64, eval_batch_size=100)
    assert torch.get_num_threads() == threads  # FFCV's Loader() resets it; we restore it
    assert (loaders.format, loaders.train_images, loaders.val_images) == (fmt, 1437, 360)
    x, y = next(iter(loaders.train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x.mean().item()) < 2 and 0.3 < x.std().item() < 3  # normalised
    seen = sum(len(y) for _, y in loaders.val)
    assert seen == 360  # evaluation drops nothing
    assert len(loaders.train) == 1437 // 64  # training drops the last partial batch


def test_ffcv_orders_as_ffcv_imagenet(digits):
    """One process trains in QUASI_RANDOM order (a fresh permutation each epoch, fixed by
    (seed, epoch), which resume relies on), evaluation is sequential; DDP's RANDOM order is
    exercised by the gloo test below (QUASI_RANDOM would raise there)."""
    from ffcv.traversal_order import QuasiRandom, Sequential

    from repro.data.ffcv import make_loader, train_pipeline, val_pipeline

    def loader(train: bool, seed: int = 0):
        make = train_pipeline(32, (0.5, 1), (0.75, 4 / 3), 0.5, MEAN / 255, STD / 255, "cpu") \
            if train else val_pipeline(32, 0.875, MEAN / 255, STD / 255, "cpu")
        return make_loader(str(digits[0].train_beton), make, batch_size=64, workers=2,
                           train=train, distributed=False, device="cpu", seed=seed)

    train, val = loader(True), loader(False)
    assert isinstance(train.traversal_order, QuasiRandom)
    assert isinstance(val.traversal_order, Sequential)
    e0, e1 = train.traversal_order.sample_order(0), train.traversal_order.sample_order(1)
    assert sorted(e0) == list(range(1437)) and list(e0) != sorted(e0)  # a shuffle
    assert list(e0) != list(e1)  # a new one each epoch
    assert list(loader(True).traversal_order.sample_order(1)) == list(e1)  # fixed by epoch
    assert list(loader(True, seed=1).traversal_order.sample_order(1)) != list(e1)  # and seed


def test_fused_flip_normalize_matches_ffcv_flip_then_normalize(digits):
    """repro's one-pass FlipNormalize (the CPU train tail) gives exactly what ffcv's
    RandomHorizontalFlip + NormalizeImage give: the same table values, mirrored or not."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

    from repro.data.ffcv import make_loader, train_pipeline
    from repro.data.ffcv_ops import FlipNormalize

    def images(normalize):  # a deterministic decoder, sequential order: the same pixels
        loader = make_loader(str(digits[0].val_beton),
                             [CenterCropRGBImageDecoder((32, 32), ratio=1.0), normalize,
                              ToTensor(), ToTorchImage()],
                             batch_size=100, workers=2, train=False, distributed=False,
                             device="cpu", seed=0)
        return torch.cat([x.clone() for x, _ in loader])

    ref = images(NormalizeImage(MEAN, STD, np.float32))
    assert torch.equal(images(FlipNormalize(0.0, MEAN, STD)), ref)
    assert torch.equal(images(FlipNormalize(1.0, MEAN, STD)), ref.flip(-1))
    half = images(FlipNormalize(0.5, MEAN, STD))
    same = [bool(torch.equal(a, b)) for a, b in zip(half, ref, strict=True)]
    mirrored = [bool(torch.equal(a, b.flip(-1))) for a, b in zip(half, ref, strict=True)]
    pairs = list(zip(same, mirrored, strict=True))
    assert all(s or m for s, m in pairs)  # each image is one or the other
    assert 100 < sum(m and not s for s, m in pairs) < 260  # mirrored only: ~180 of 360
    assert ref.is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(op, FlipNormalize) for op in train_pipeline(
        32, (0.5, 1), (0.75, 4 / 3), 0.5, MEAN / 255, STD / 255, "cpu"))  # what training runs


def _ddp_rank(rank: int, world: int, init: str, beton: str, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from repro.data.ffcv import make_loader, train_pipeline

    loader = make_loader(beton, train_pipeline(16, (0.5, 1.0), (0.75, 4 / 3), 0.5, MEAN / 255,
                                               STD / 255, "cpu"),
                         batch_size=8, workers=1, train=True, distributed=True, device="cpu",
                         seed=0)
    ids = [y.clone() for _, y in loader]
    torch.save(torch.cat(ids), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ffcv_under_two_process_gloo_splits_the_samples(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Numbered:  # the label is the sample's index, so ranks' shares can be compared
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return np.full((20, 20, 3), i, np.uint8), i

    beton = tmp_path / "n.beton"
    DatasetWriter(str(beton), {"image": RGBImageField(), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Numbered())
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path}/store", str(beton), str(tmp_path)),
             nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt").tolist() for r in (0, 1))
    assert len(a) == len(b) == 32
    assert not set(a) & set(b) and set(a) | set(b) == set(range(64))


def test_cli_convert_and_digits(hostile, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    assert main(["data", "convert", str(hostile), f"{tmp_path}/", "--max-res", "32",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train_32_0.50_90.beton" in out and "9 images" in out and "skipped 2" in out
    assert (tmp_path / "train_32_0.50_90.beton").is_file()


def test_ffcv_leaves_torch_threads_alone(digits):
    from repro.data.ffcv import import_ffcv, make_loader, train_pipeline

    torch.set_num_threads(2)
    import_ffcv()
    assert torch.get_num_threads() == 2  # importing ffcv would set 1
    loader = make_loader(str(digits[0].train_beton),
                         train_pipeline(32, (0.5, 1.0), (0.75, 4 / 3), 0.5, MEAN / 255,
                                        STD / 255, "cpu"),
                         batch_size=64, workers=1, train=True, distributed=False,
                         device="cpu", seed=0)
    for _ in loader:  # ffcv's loader thread sets threads at each epoch's start
        pass
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------------------------
# The evaluation protocol, exactly, on both paths.

@pytest.fixture(scope="module")
def val_jpegs(tmp_path_factory) -> Path:
    """Photo JPEGs of assorted sizes and aspect ratios, in class folders."""
    root = tmp_path_factory.mktemp("valjpegs") / "val"
    sizes = [(120, 90), (64, 100), (77, 77), (200, 61), (45, 130), (96, 72)]
    for i, size in enumerate(sizes * 2):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        photo(i, 200).resize(size, Image.BICUBIC).save(d / f"{i}.JPEG", quality=90)
    return root


def _protocol_recipe(tmp_path, fmt: str, val: Path, interp: str, crop: float = 0.875) -> Path:
    path = tmp_path / f"{fmt}_{interp}.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{name: vit_c_nano, num_classes: 3}}
        data: {{format: {fmt}, train_path: {val}, val_path: {val}, train_images: 12,
                resolution: 32, workers: 1}}
        eval: {{resolution: 32, crop_pct: {crop}, interpolation: {interp}, batch_size: 5}}
        optim: {{lr: 1.0e-3}}
        schedule: {{epochs: 1}}
        train: {{global_batch: 4}}
    """))
    return path


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_evaluation_gives_the_model_the_protocols_image_on_both_paths(val_jpegs, tmp_path,
                                                                      interp):
    """Per image: PIL Resize(int(32 / 0.875), interp) + CenterCrop(32) of the source JPEG is
    what reaches the model, through an eval-protocol .beton and through the folder loader."""
    from repro.data.beton import eval_protocol_of, read_sidecar
    from repro.data.convert import convert, load_rgb
    from repro.data.folder import eval_resize_crop

    record = convert(val_jpegs, f"{tmp_path}/", eval_protocol=(32, 0.875, interp), workers=1,
                     progress=False)
    beton = Path(record["destination"])
    assert beton.name == f"val_32_0.875_{interp}.beton"
    assert eval_protocol_of(beton) == read_sidecar(beton)["eval_protocol"] == \
        {"resolution": 32, "crop_pct": 0.875, "interpolation": interp}
    from torchvision.datasets import ImageFolder

    ref = [np.asarray(eval_resize_crop(32, 0.875, interp)(load_rgb(p)))
           for p, _ in ImageFolder(str(val_jpegs)).samples]  # the sorted order both loaders use
    for fmt, val in (("ffcv", beton), ("folder", val_jpegs)):
        loaders = build_loaders(load_recipe(_protocol_recipe(tmp_path, fmt, val, interp)),
                                batch_size=4)
        assert loaders.exact_eval and not [d for d in loaders.deviations if "eval." in d]
        images = torch.cat([x.clone() for x, _ in loaders.val])
        levels = (images * torch.tensor(STD).view(1, 3, 1, 1) +
                  torch.tensor(MEAN).view(1, 3, 1, 1)).round().permute(0, 2, 3, 1).numpy()
        assert len(levels) == len(ref) == 12
        for got, want in zip(levels, ref, strict=True):
            assert np.abs(got - want.astype(np.float64)).max() <= 1, fmt


def test_an_eval_file_for_another_protocol_is_refused_in_one_line(val_jpegs, tmp_path):
    from repro.data.convert import convert

    record = convert(val_jpegs, f"{tmp_path}/", eval_protocol=(32, 0.875, "bicubic"),
                     workers=1, progress=False)
    r = load_recipe(_protocol_recipe(tmp_path, "ffcv", Path(record["destination"]), "bicubic",
                                     crop=0.9))
    with pytest.raises(DataError) as e:
        build_loaders(r, batch_size=4)
    msg = str(e.value)
    assert "\n" not in msg and "val_32_0.875_bicubic.beton: written for the eval protocol " \
        "32,0.875,bicubic, the recipe asks for 32,0.9,bicubic" in msg
    assert "--eval-protocol 32,0.9,bicubic" in msg
    # A training-style file evaluates with FFCV's own centre crop: listed as a deviation.
    plain = convert(val_jpegs, f"{tmp_path}/plain/", max_res=None, workers=1, progress=False)
    loaders = build_loaders(load_recipe(_protocol_recipe(tmp_path, "ffcv",
                                                         Path(plain["destination"]),
                                                         "bicubic")), batch_size=4)
    assert not loaders.exact_eval
    assert any(d.startswith("eval.interpolation=bicubic") for d in loaders.deviations)
