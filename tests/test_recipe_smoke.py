"""Every recipe's `--smoke` (issue 14): the recipe's model and optimisation for a few steps on
the built-in digits, each stage of a chain in turn (a fine-tune's parent stages first).

CI runs two chains: an SGD fine-tune at 384 of a 224 run (CvT-13, whose 224 smoke is its
parent) and a ViT 21K pre-training with its fine-tune (EarlyConv ViT_S). The sigmoid 21K
pre-training is trained in test_train.py and a 21K-style chain end to end in test_stages.py;
the one-stage recipes of each family in test_train.py. `make smoke-recipes` runs all of them
(`-m every_recipe`), parents shared, one at a time: over an hour on 2 cores (measured in
pieces: the 41 CoAtNet and CvT recipes 40 min on two workers, the 17 EarlyConv L/XL and LeViT
ones 18.5 min on one). The EarlyConv XL chains need ~20 GB of memory and write ~5 GB per run
(~25 GB of disk for all runs at once): two workers run out of both."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro import rundir
from repro.cli import main
from repro.recipe import load_recipe
from repro.train import stages

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"cvt_13_384", "earlyconv_vits_in21k_ft"}
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
        pr = rundir.Run(parent).results()
        assert parent.parent == runs / chain[-1].name and pr.smoke and pr.steps_done == 4
        assert pr.extra["not_applied"] == []
        assert all(rundir.find_runs(runs / s.name) for s in chain)
