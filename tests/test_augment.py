"""Device augmentation (repro.data.augment) against its reference, timm's PIL transforms (timm
1.0.31 `timm/data/auto_augment.py` on Pillow 13): op by op on real photographs, and policy by
policy in distribution; the folder path's posterize repair; the training tail."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import auto_augment as taa

from repro.data import augment as A
from repro.data import augment_ops as O
from repro.data.augment_layers import policy_layers
from repro.data.augment_pixel import posterize
from repro.data.folder import _posterize, train_transform
from repro.recipe import RecipeError, load_recipe
from repro.recipe import policy as P

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FILL = A.fill_color(MEAN)
LEVELS = (0.0, 4.5, 9.0, 10.0, 15.0)  # zero, mid, the DeiT m9, timm's bound, mmax15


def photos(n: int = 6, size=(72, 56)) -> list[Image.Image]:
    """Crops of the two photographs scikit-learn ships, rescaled (not square on purpose)."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        img = imgs[i % 2]
        y, x = rng.integers(0, img.shape[0] - 260), rng.integers(0, img.shape[1] - 260)
        out.append(Image.fromarray(img[y:y + 260, x:x + 260]).resize(size, Image.BICUBIC))
    return out


def as_batch(images) -> torch.Tensor:
    arr = np.stack([np.asarray(i) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def timm_op(name: str, img: Image.Image, arg: float, interpolation: str) -> Image.Image:
    """timm's own op function with the arguments its AugmentOp passes (Pillow 13: posterize to
    0 bits raises; the reference for it is a black image, see test_posterize_zero_bits)."""
    op = O.OPS[name]
    args = ()
    if op.level_fn is not None:
        args = (int(arg),) if name.startswith(("Posterize", "Solarize")) else (arg,)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    return taa.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=resample)


# "auto": the numba kernels for these CPU batches; "torch": the torch ops a GPU runs.
BACKENDS = ["auto", "torch"] if O.cpu_kernels(torch.zeros(1, 3, 1, 1), {}) else ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("name", sorted(O.OPS))
def test_each_op_equals_timm_pil_on_photos(name, interpolation, backend):
    imgs = photos()
    batch = as_batch(imgs)
    h, w = batch.shape[-2:]
    hp = {"translate_const": int(min(h, w) * 0.45), "translate_pct": 0.45,
          "fill": torch.tensor(FILL, dtype=torch.uint8), "interpolation": interpolation,
          "backend": backend}
    op = O.OPS[name]
    for level in LEVELS:
        for sign in (1.0, -1.0):
            n = len(imgs)
            arg = torch.zeros(n, dtype=torch.float64)
            if op.level_fn is not None:
                arg = op.level_fn(torch.full((n,), level, dtype=torch.float64),
                                  torch.full((n,), sign, dtype=torch.float64), hp)
            if name.startswith("Posterize") and (arg <= 0).any():
                continue  # Pillow 13 refuses 0 bits; covered below
            ours = op.fn(batch, arg, hp)
            for i, img in enumerate(imgs):
                ref = np.asarray(timm_op(name, img, float(arg[i]), interpolation))
                got = ours[i].permute(1, 2, 0).numpy()
                diff = np.abs(got.astype(int) - ref.astype(int))
                assert diff.max() == 0, (name, level, sign, i, int(diff.max()),
                                         int((diff > 0).sum()))


def test_ci_runs_both_backends():
    import os

    if os.environ.get("CI") == "true":  # numba is installed with the ffcv extra
        assert BACKENDS == ["auto", "torch"]


def test_posterize_zero_bits_is_black_as_before_pillow_13():
    imgs = photos(2)
    ours = posterize(as_batch(imgs), torch.zeros(2, dtype=torch.float64), {})
    assert int(ours.max()) == 0
    for img in imgs:
        with pytest.raises(ValueError):  # the Pillow 13 behaviour the folder path repairs
            taa.posterize(img, 0)
        assert np.asarray(_posterize(img, 0)).max() == 0
        assert np.array_equal(np.asarray(_posterize(img, 3)), np.asarray(taa.posterize(img, 3)))


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "v0", "rand-n2-m15-mmax15"])
def test_layouts_and_backends_agree(spec):
    batch = as_batch(photos(6) * 4)
    ref = A.auto_augment(spec, interpolation="bicubic", mean=MEAN, backend="torch")(
        batch, torch.Generator().manual_seed(3))
    for backend in BACKENDS:
        aug = A.auto_augment(spec, interpolation="bicubic", mean=MEAN, backend=backend)
        for x in (batch, batch.contiguous()):
            out = aug(x, torch.Generator().manual_seed(3))
            assert torch.equal(out, ref) and out.dtype == torch.uint8 and out.shape == x.shape


# The kernels index without bounds checks; this runs them with numba's checks on (a fresh
# compile in a subprocess) on the shapes most likely to step outside an image: single pixels,
# one row or column, the identity map, and everything against the torch ops a GPU runs.
EDGE_SHAPES = """
import torch
from repro.data import augment as A
from repro.data import augment_ops as O
g = torch.Generator().manual_seed(0)
for h, w in [(1, 1), (1, 5), (4, 1), (2, 3), (3, 2), (9, 7)]:
    x = torch.randint(0, 256, (4, 3, h, w), generator=g, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    for interpolation in ("bilinear", "bicubic"):
        hp = {"translate_const": 3, "translate_pct": 0.45, "interpolation": interpolation,
              "fill": torch.tensor([124, 116, 104], dtype=torch.uint8), "backend": "auto"}
        for name, op in O.OPS.items():
            for level in (0.0, 3.3, 10.0):
                for sign in (1.0, -1.0):
                    arg = torch.zeros(4, dtype=torch.float64)
                    if op.level_fn is not None:
                        arg = op.level_fn(torch.full((4,), level, dtype=torch.float64),
                                          torch.full((4,), sign, dtype=torch.float64), hp)
                    ref = op.torch_fn(x, arg, hp)
                    got = op.fn(x, arg, hp)
                    assert torch.equal(got, ref), (name, h, w, interpolation, level, sign)
        for spec in ("rand-m9-mstd0.5-inc1", "v0", "rand-n3-m15-mmax15-p1"):
            tails = [A.TrainTail(auto_augment=spec, color_jitter=None,
                                 interpolation=interpolation, mean=(0.485, 0.456, 0.406),
                                 std=(0.229, 0.224, 0.225), re_prob=0.0, re_mode="pixel",
                                 re_count=1, hflip=0.5, cpu_workers=2, backend=backend)
                     for backend in ("auto", "torch")]
            many = x.repeat(4, 1, 1, 1)
            assert torch.equal(tails[0](many, 5), tails[1](many, 5)), (spec, h, w)
print("ok")
"""


@pytest.mark.skipif("auto" not in BACKENDS, reason="numba (the ffcv extra) is not installed")
def test_kernels_stay_in_bounds_and_exact_on_edge_shapes(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", EDGE_SHAPES], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Policies in distribution: ours against timm's own transforms, 60,000 draws each.

DRAWS = 60_000


def timm_draws(spec: str, n: int) -> tuple[list[list[str]], Counter, dict]:
    """Run timm's own transform n times on a 2 x 2 image, recording what its AugmentOps drew:
    per call the op names in order, and per op name how often it applied and its arguments."""
    hp = dict(translate_const=100, img_mean=FILL, interpolation=Image.BICUBIC)
    if spec.startswith("rand"):
        t = taa.rand_augment_transform(spec, hp)
        ops = t.ops
    else:
        t = taa.auto_augment_transform(spec, hp)
        ops = [op for sub in t.policy for op in sub]
    chosen: list[str] = []
    applied: Counter = Counter()
    args: dict = {}

    class Recording(taa.AugmentOp):
        def __call__(self, img):
            chosen.append(self.name)
            return super().__call__(img)

    def record(name):
        def fn(img, *a, **_):
            applied[name] += 1
            args.setdefault(name, []).append(a[0] if a else 0.0)
            return img
        return fn

    for op in ops:
        op.__class__ = Recording
        op.aug_fn = record(op.name)
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (2, 2))
    calls = []
    for _ in range(n):
        chosen.clear()
        t(img)
        calls.append(list(chosen))
    return calls, applied, args


def distribution_tests(spec: str, draws: int) -> dict:
    """Our draws of `spec` against timm's, as p-values: chi-square on the op chosen at each
    layer, on each op's application, on application pooled over ops and on the sign of the
    signed ops' arguments; two-sample Kolmogorov-Smirnov on each op's argument. Each p-value
    comes with a label naming what it tests (benchmarks/augment_parity.py reports them)."""
    calls, t_applied, t_args = timm_draws(spec, draws)
    policy = P.parse_policy(spec)
    layers = policy_layers(policy, draws, torch.Generator().manual_seed(0),
                           {"translate_const": 100})
    names = policy.names
    out = {"choice": [], "applied": [], "argument": []}
    for j, layer in enumerate(layers):
        ours = Counter(names[k] for k in layer.op.tolist())
        theirs = Counter(c[j] for c in calls)
        keys = sorted(set(ours) | set(theirs))
        table = np.array([[ours[k] for k in keys], [theirs[k] for k in keys]])
        out["choice"].append((f"layer {j}", stats.chi2_contingency(table).pvalue))
    o_applied, o_args = Counter(), {}
    for layer in layers:
        for k, a, v in zip(layer.op.tolist(), layer.applied.tolist(), layer.arg.tolist(),
                           strict=True):
            if a:
                o_applied[names[k]] += 1
                o_args.setdefault(names[k], []).append(v)
    o_chosen = Counter(names[k] for layer in layers for k in layer.op.tolist())
    t_chosen = Counter(n for c in calls for n in c)
    pooled = np.array([[sum(o_applied.values()), sum(o_chosen.values())],
                       [sum(t_applied.values()), sum(t_chosen.values())]])
    out["applied_pct"] = (100 * pooled[0, 0] / pooled[0, 1], 100 * pooled[1, 0] / pooled[1, 1])
    pooled[:, 1] -= pooled[:, 0]
    out["applied"].append(("pooled", stats.chi2_contingency(pooled).pvalue))
    signed = [n for n in names if n in O.SIGNED]
    if signed:
        signs = np.array([[sum(v < 0 for n in signed for v in args.get(n, [])),
                           sum(v > 0 for n in signed for v in args.get(n, []))]
                          for args in (o_args, t_args)])
        out["argument"].append(("sign", stats.chi2_contingency(signs).pvalue))
    for name in names:
        table = np.array([[o_applied[name], o_chosen[name] - o_applied[name]],
                          [t_applied[name], t_chosen[name] - t_applied[name]]])
        if table.sum(axis=0).min() > 0:
            out["applied"].append((name, stats.chi2_contingency(table).pvalue))
        ours, theirs = o_args.get(name, []), t_args.get(name, [])
        if len(set(ours) | set(theirs)) > 1 and ours and theirs:
            out["argument"].append((name, stats.ks_2samp(ours, theirs).pvalue))
    return out


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-n2-m15-mmax15", "v0",
                                  "rand-n3-m7-mstd100-p0.7", "original-mstd0.5"])
def test_policy_draws_match_timm_in_distribution(spec):
    """Every test of `distribution_tests` at p > 1e-3, with fixed seeds."""
    result = distribution_tests(spec, DRAWS)
    for family in ("choice", "applied", "argument"):
        for label, p in result[family]:
            assert p > 1e-3, (spec, family, label, p)


def test_policy_strings_parse_as_timm_reads_them():
    p = P.parse_policy("rand-m9-mstd0.5-inc1")
    assert (p.kind, p.num_layers, p.magnitude, p.magnitude_std, p.prob) == ("rand", 2, 9, 0.5,
                                                                            0.5)
    assert p.names == P.RAND_INCREASING_TRANSFORMS
    p = P.parse_policy("rand-n2-m15-mmax15")
    assert (p.magnitude, p.magnitude_max, p.names) == (15, 15, P.RAND_TRANSFORMS)
    assert P.parse_policy("rand-mstd101").magnitude_std == float("inf")
    assert P.parse_policy("rand-tweights").weights is not None
    assert P.parse_policy("v0").sub_policies[0] == (("Equalize", 0.8, 1), ("ShearY", 0.8, 4))
    for bad, says in (("rand-q3", "unknown RandAugment section"), ("v9", "unknown policy"),
                      ("augmix-m5", "AugMix"), ("rand-t3a", "Gaussian blur"),
                      ("v0-m3", "unknown AutoAugment section")):
        with pytest.raises(ValueError, match=says):
            P.parse_policy(bad)


def test_bad_policy_in_a_recipe_is_a_one_line_error():
    with pytest.raises(RecipeError, match=r"levit_256.yaml .*: aug.auto_augment: bad value "
                                          r"'rand-q3'.*unknown RandAugment section") as e:
        load_recipe("recipes/levit_256.yaml", ["aug.auto_augment=rand-q3"])
    assert "\n" not in str(e.value)


def test_draws_are_per_sample_and_reproducible():
    batch = as_batch(photos(1) * 32)  # 32 copies of one photo
    aug = A.auto_augment("rand-m9-mstd0.5-inc1", interpolation="bicubic", mean=MEAN)
    out = aug(batch, torch.Generator().manual_seed(0))
    distinct = {bytes(o.numpy().tobytes()) for o in out}
    assert len(distinct) > 20  # each sample its own ops and magnitudes
    again = aug(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(TypeError, match="uint8"):
        aug(batch.float(), torch.Generator())


def test_ten_thousand_images_through_the_folder_transforms_never_raise():
    """The ImageFolder path (timm's PIL transforms) under Pillow 13 with the policies whose
    posterize asks for 0 bits: `rand-m9-mstd0.5-inc1` (PosterizeIncreasing at magnitude 10)
    and `v0` (Posterize at magnitude 2)."""
    img = photos(1, size=(40, 40))[0]
    for name in ("levit_256", "earlyconv_vitt"):
        r = load_recipe(f"recipes/{name}.yaml", ["data.resolution=16"])
        t = train_transform(r)
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        for _ in range(10_000):
            t(img)


# --------------------------------------------------------------------------------------------
# The training tail: policy, ToTensor + Normalize as torchvision computes them, RandomErasing.

def test_train_tail_normalises_as_torchvision_and_erases_at_its_rate():
    from torchvision.transforms import functional as F

    batch = as_batch(photos(4))
    plain = A.TrainTail(auto_augment=None, color_jitter=None, interpolation="bicubic",
                        mean=MEAN, std=STD, re_prob=0.0, re_mode="pixel", re_count=1)
    assert not plain.active
    out = plain(batch, 0)
    for i in range(4):
        ref = F.normalize(F.to_tensor(Image.fromarray(batch[i].permute(1, 2, 0).numpy())),
                          MEAN, STD)
        assert torch.equal(out[i], ref)
    erasing = A.TrainTail(auto_augment=None, color_jitter=None, interpolation="bicubic",
                          mean=MEAN, std=STD, re_prob=0.5, re_mode="pixel", re_count=1)
    many = as_batch(photos(1) * 200)
    changed = (erasing(many, 7) != plain(many, 7)).flatten(1).any(1).float().mean().item()
    assert 0.35 < changed < 0.65
    assert torch.equal(erasing(many, 7), erasing(many, 7))
    assert not torch.equal(erasing(many, 7), erasing(many, 8))


@pytest.mark.parametrize("aug", [{"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": None},
                                 {"auto_augment": None, "color_jitter": 0.4}])
def test_a_batch_split_between_threads_is_augmented_as_in_one_part(aug):
    batch = as_batch(photos(6) * 6)

    def tail(workers, backend="auto"):
        return A.TrainTail(**aug, interpolation="bicubic", mean=MEAN, std=STD, re_prob=0.25,
                           re_mode="pixel", re_count=1, hflip=0.5, cpu_workers=workers,
                           backend=backend)

    one, three = (tail(w)(batch, 11).clone() for w in (1, 3))
    assert torch.equal(one, three)
    assert torch.equal(tail(1, "torch")(batch, 11), one)  # the torch operations a GPU runs


def test_the_tail_flips_about_half_the_images_left_right_from_its_seed():
    batch = as_batch(photos(1) * 200)

    def tail(hflip):
        return A.TrainTail(auto_augment=None, color_jitter=None, interpolation="bicubic",
                           mean=MEAN, std=STD, re_prob=0.0, re_mode="pixel", re_count=1,
                           hflip=hflip)

    ref = tail(0.0)(batch, 3).clone()
    flipping = tail(0.5)
    out = flipping(batch, 3).clone()
    mirrored = [torch.equal(out[i], ref[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], ref[i]) for i in range(200)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 70 < sum(mirrored) < 130
    assert torch.equal(flipping(batch, 3), out)
    assert not torch.equal(flipping(batch, 4), out)


def test_colour_jitter_is_inert_under_a_policy_and_timm_like_without():
    tail = A.TrainTail(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4,
                       interpolation="bicubic", mean=MEAN, std=STD, re_prob=0.0,
                       re_mode="pixel", re_count=1)
    assert tail.jitter is None
    batch = as_batch(photos(1) * 64)
    out = A.color_jitter(batch, 0.4, torch.Generator().manual_seed(0))
    # Brightness / contrast / saturation factors in [0.6, 1.4]: the mean stays near, pixels move.
    ratio = out.float().mean((1, 2, 3)) / batch.float().mean((1, 2, 3))
    assert 0.5 < ratio.min() and ratio.max() < 1.5 and len(set(ratio.tolist())) > 50
