"""A run trains the recipe it names, on either data path: every data / aug key is consumed by
the trainer's build or declared (not applied, deviation, or another path's own), canonical
recipes have nothing not applied, smoke runs keep the augmentation, and the optimiser's
weight-decay groups and drop path are the official codes'."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from repro.cli import main
from repro.data.builtin import ensure_digits
from repro.recipe import DATA_PATHS, Recipe, load_recipe, path_report
from repro.train import distributed
from repro.train.optim import build_optimizer
from repro.train.run import build, create_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.stem != "quickstart")
SECTIONS = ("data", "aug")


class Reads:
    """A recipe section that records which of its keys are read (except by path_report)."""

    def __init__(self, target, prefix: str, seen: set):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        if sys._getframe(1).f_code.co_name != "_get_dotted":  # path_report lists, not consumes
            self._seen.add(self._prefix + name)
        return getattr(self._target, name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", DATA_PATHS)
def test_every_data_and_aug_key_is_consumed_or_declared(fmt, tmp_path):
    """The trainer's own build (data, model, optimiser, Mixup) on the digits files, with every
    augmentation of the papers' recipes switched on: each key of `data` and `aug` is read, or
    the schema declares it not applied / a deviation on this path / another path's own."""
    digits = ensure_digits(32)
    train_path, val_path = ((digits.train_beton, digits.val_beton) if fmt == "ffcv" else
                            (digits.train_dir, digits.val_dir))
    r = load_recipe(str(ROOT / "recipes/quickstart.yaml"), [
        f"data.format={fmt}", "data.dataset=imagenet", f"data.train_path={train_path}",
        f"data.val_path={val_path}", "data.train_images=1437", "data.repeated_aug=true",
        "data.hflip=0.5", "aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.color_jitter=0.4",
        "aug.re_prob=0.25", "aug.mixup=0.8", "aug.cutmix=1.0", "data.workers=1",
        "train.device=cpu", f"train.output_dir={tmp_path}"], smoke=False)
    seen: set = set()
    for section in SECTIONS:
        setattr(r, section, Reads(getattr(r, section), f"{section}.", seen))
    env = distributed.setup("cpu")
    try:
        s = build(r, env, smoke=False)
    finally:
        distributed.teardown()
    listed = {item.split("=")[0] for item in s.loaders.not_applied + s.loaders.deviations}
    for section in SECTIONS:
        cls = type(getattr(Recipe(model=None, optim=None, schedule=None, train=None),
                           section))
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            only = f.metadata.get("only")
            assert key in seen or key in listed or (only and only != fmt), \
                f"{key} is neither consumed nor declared on the {fmt} path"
    assert s.loaders.not_applied == []
    if fmt == "ffcv":  # the flip is the device augmentation's, once: none in FFCV's pipeline
        from ffcv.transforms import RandomHorizontalFlip

        ops = s.loaders.train.loader.pipeline_specs["image"].transforms
        assert s.loaders.train.augment.hflip == 0.5
        assert not any(isinstance(op, RandomHorizontalFlip) for op in ops), ops


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_canonical_recipes_have_nothing_not_applied_on_either_path(recipe, capsys):
    r = load_recipe(recipe)
    for fmt in DATA_PATHS:
        assert path_report(r, fmt)[0] == [], fmt
        assert main(["launch", str(recipe), "--dry-run", f"data.format={fmt}"]) == 0
        out = capsys.readouterr().out
        assert "\nnot applied: none\n" in out
        deviations = next(line for line in out.splitlines() if line.startswith("deviations:"))
        if fmt == "folder":
            assert deviations == "deviations: none"
        else:  # FFCV's crop resizes with OpenCV's area filter whatever the recipe says
            assert "data.interpolation=" in deviations and "area filter" in deviations


def test_an_ffcv_deviation_is_listed_with_its_value():
    r = load_recipe("recipes/earlyconv_vitt.yaml")
    _, deviations = path_report(r, "ffcv")
    assert any(d.startswith("data.interpolation=bilinear (FFCV's random-resized crop resizes "
                            "with OpenCV's area filter") for d in deviations)
    assert path_report(r, "folder") == ([], [])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_smoke_keeps_the_recipes_augmentation(recipe):
    full = load_recipe(recipe)
    smoke = load_recipe(str(recipe), [], smoke=True)
    assert smoke.aug == full.aug
    assert smoke.data.repeated_aug == full.data.repeated_aug
    assert smoke.data.interpolation == full.data.interpolation


# --------------------------------------------------------------------------------------------
# Weight decay: the EarlyConv recipes decay what pycls decays.

def pycls_vit_params(stem: str, dims, n_layers: int, hidden: int, mlp: int, patch: int = 16,
                     classes: int = 1000, res: int = 224) -> dict[str, tuple]:
    """Parameter names and shapes of pycls's ViT (branch vitconfigs @206d0db,
    pycls/models/vit.py and blocks.py): the fixture that pycls's optimiser groups are built
    from (a name rule, below)."""
    p: dict[str, tuple] = {}
    if stem == "conv":
        w_in = 3
        for i, w in enumerate(dims[:-1]):
            p[f"stem.cstem{i}_conv.weight"] = (w, w_in, 3, 3)
            p[f"stem.cstem{i}_bn.weight"] = p[f"stem.cstem{i}_bn.bias"] = (w,)
            w_in = w
        p["stem.cstem_last_conv.weight"] = (dims[-1], w_in, 1, 1)
        p["stem.cstem_last_conv.bias"] = (dims[-1],)
    else:
        p["stem.patchify.weight"] = (hidden, 3, patch, patch)
        p["stem.patchify.bias"] = (hidden,)
    p["class_token"] = (1, 1, hidden)
    p["pos_embedding"] = (1, (res // patch) ** 2 + 1, hidden)
    for i in range(n_layers):
        b = f"encoder.block_{i}."
        for ln in ("ln_1", "ln_2"):
            p[b + ln + ".weight"] = p[b + ln + ".bias"] = (hidden,)
        p[b + "self_attention.attn_proj.weight"] = (3 * hidden, hidden)
        p[b + "self_attention.attn_proj.bias"] = (3 * hidden,)
        p[b + "self_attention.out_proj.weight"] = (hidden, hidden)
        p[b + "self_attention.out_proj.bias"] = (hidden,)
        p[b + "mlp_block.linear_1.weight"] = (mlp, hidden)
        p[b + "mlp_block.linear_1.bias"] = (mlp,)
        p[b + "mlp_block.linear_2.weight"] = (hidden, mlp)
        p[b + "mlp_block.linear_2.bias"] = (hidden,)
    p["encoder.ln.weight"] = p["encoder.ln.bias"] = (hidden,)
    p["head.head_fc.weight"] = (classes, hidden)
    p["head.head_fc.bias"] = (classes,)
    return p


def pycls_decayed(params: dict[str, tuple]) -> tuple[list, list]:
    """construct_optimizer's grouping: the first of "bn", "ln", "bias", "" found in the name;
    the configs set BN / LN / bias CUSTOM_WEIGHT_DECAY 0, the rest gets WEIGHT_DECAY."""
    decayed, exempt = [], []
    for name, shape in params.items():
        group = next(k for k in ("bn", "ln", "bias", "") if k in name)
        (decayed if group == "" else exempt).append(shape)
    return decayed, exempt


def numels(shapes) -> list[int]:
    return sorted(int(torch.Size(s).numel()) for s in shapes)


@pytest.mark.parametrize("recipe, pycls", [
    ("earlyconv_vitt", dict(stem="conv", dims=(24, 48, 96, 192, 192), n_layers=11, hidden=192,
                            mlp=576)),
    ("earlyconv_vitt_patch", dict(stem="patch", dims=(), n_layers=12, hidden=192, mlp=576)),
])
def test_earlyconv_decays_what_pycls_decays(recipe, pycls):
    r = load_recipe(f"recipes/{recipe}.yaml")
    model = create_model(r, 1000)
    opt = build_optimizer(model, r, 1e-3)
    ours_decayed = [p.shape for g in opt.param_groups if g["weight_decay"] > 0
                    for p in g["params"]]
    ours_exempt = [p.shape for g in opt.param_groups if g["weight_decay"] == 0
                   for p in g["params"]]
    theirs_decayed, theirs_exempt = pycls_decayed(pycls_vit_params(**pycls))
    assert numels(ours_decayed) == numels(theirs_decayed)
    assert numels(ours_exempt) == numels(theirs_exempt)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.24}
    # The tokens are decayed, as in pycls; timm's own rule would exempt them:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    assert {"cls_token", "pos_embed"} <= decayed


def test_coatnet_and_levit_exempt_what_their_models_name():
    for recipe, marker in (("coatnet_0", "relative_position_bias_table"),
                           ("levit_256", "attention_biases")):
        r = load_recipe(f"recipes/{recipe}.yaml")
        model = create_model(r, 1000)
        opt = build_optimizer(model, r, 1e-3)
        names = {id(p): n for n, p in model.named_parameters()}
        exempt = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0
                  for p in g["params"]}
        tables = {n for n in names.values() if marker in n}
        assert tables and tables <= exempt, recipe


def test_explicit_zero_drop_path_gives_zero():
    r = load_recipe("recipes/cvt_13.yaml", ["model.drop_path=0.0"])
    model = create_model(r, 10)
    rates = [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")]
    assert all(rate == 0.0 for rate in rates)  # no stochastic depth anywhere
    r = load_recipe("recipes/cvt_13.yaml")
    rates = [m.drop_prob for m in create_model(r, 10).modules() if hasattr(m, "drop_prob")]
    assert max(rates) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_trains_its_rows_model_and_evaluates_at_its_rows_resolution(recipe):
    """The model `repro verify` counts for a row is the one its recipe trains, and the row's
    resolution is the one its recipe evaluates at (a fine-tune at 384 evaluates at 384)."""
    from repro import papers

    r = load_recipe(recipe)
    if not r.row_id:
        return  # a pre-training stage: its fine-tunes carry the row
    row = papers.get_row(r.row_id)
    assert r.model.name == row["timm_model"], (r.model.name, row["timm_model"])
    assert (r.eval.resolution or r.data.resolution) == row["resolution"]
