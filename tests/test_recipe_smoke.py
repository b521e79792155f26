"""Every recipe's `--smoke` (issue 14): the recipe's model and optimisation for a few steps on
the built-in digits, each stage of a chain in turn (a fine-tune's parent stages first).

CI runs one recipe of each kind (a 21K chain with the sigmoid loss, an SGD fine-tune of a 224
run, a ViT 21K chain, a one-stage Table 9 variant); `make smoke-recipes` runs all of them
(`-m every_recipe`), parents shared, about 15 minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro import rundir
from repro.cli import main
from repro.recipe import load_recipe
from repro.train import stages

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"coatnet_2_in21k_384", "cvt_13_384", "earlyconv_vits_in21k_ft", "coatnet_0_strided"}
RECIPES = [pytest.param(p, id=p.stem, marks=() if p.stem in KINDS else pytest.mark.every_recipe)
           for p in sorted((ROOT / "recipes").glob("*.yaml")) if p.stem != "quickstart"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One output directory for the module: a parent's smoke run serves all its fine-tunes."""
    return tmp_path_factory.mktemp("smoke") / "runs"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_smokes_each_of_its_stages(recipe, runs, capsys):
    out = f"train.output_dir={runs}"
    assert main(["launch", str(recipe), "--smoke", out]) == 0
    r = load_recipe(recipe, [out], smoke=True)
    last = capsys.readouterr().out.strip().splitlines()[-1]  # "run incomplete: PATH  (...)"
    res = rundir.Run(last.split(": ", 1)[1].split("  (")[0]).results()
    assert res.smoke and not res.canonical and res.steps_done == 4
    assert res.extra["not_applied"] == []  # the augmentation is kept on the smoke path
    chain = stages.chain(r, smoke=True)
    if chain:  # each parent stage has its smoke run, and the child started from its own
        parent = Path(res.extra["init"]["run"])
        assert parent.parent == runs / chain[-1].name and rundir.Run(parent).results().smoke
        assert all(rundir.find_runs(runs / s.name) for s in chain)
