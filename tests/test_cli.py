"""The `repro` command line: launch --dry-run on every recipe, doctor, unbuilt subcommands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repro.cli import main
from repro.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))
# Recipes other recipes start from (init.from): the pre-training stages.
STAGES = {Path(load_recipe(p).init.from_recipe).name for p in RECIPES
          if load_recipe(p).init.from_recipe}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def derived_rows(out: str) -> dict[int, list[str]]:
    """The dry-run's derived table, keyed by world size."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_every_paper_recipe_exists():
    names = {p.stem for p in RECIPES}
    expected = {"coatnet_0", "coatnet_1", "coatnet_2", "coatnet_3", "levit_128s", "levit_128",
                "levit_192", "levit_256", "levit_384", "cvt_13", "cvt_21"}
    expected |= {f"earlyconv_vit{s}{p}" for s in "tsbl" for p in ("", "_patch")}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_with_dry_run(capsys, recipe):
    code, out, err = run_cli(capsys, "launch", str(recipe), "--dry-run")
    assert code == 0, err
    r = load_recipe(recipe)
    assert r.canonical
    if not r.row_id and recipe.stem != "quickstart":  # a pre-training stage: its fine-tunes
        assert recipe.name in STAGES and r.notes, "recipes name their row, or are a stage " \
            "another recipe starts from and say in notes: which rows it feeds"
    if r.row_id:
        assert f"target     {r.row_id}" in out and "source:" in out
    assert derived_rows(out)[1][1] == str(r.train.global_batch)


def test_earlyconv_vitb_dry_run_shows_the_papers_settings(capsys):
    code, out, _ = run_cli(capsys, "launch", str(ROOT / "recipes/earlyconv_vitb.yaml"),
                           "--dry-run")
    assert code == 0
    assert "model      vit_c_18gf" in out
    assert "target     earlyconv/ViT_C-18GF" in out
    resolved = out.split("# resolved recipe", 1)[1]
    assert re.search(r"weight_decay: 0\.24\b", resolved)
    assert re.search(r"epochs: 400\b", resolved)
    assert re.search(r"global_batch: 2048\b", resolved)
    rows = derived_rows(out)
    assert {1, 8, 64} <= set(rows)
    for world in (1, 8, 64):
        ws, gb, per_device, micro, accum, lr = rows[world][:6]
        assert gb == "2048" and float(lr) == pytest.approx(1e-3)
        assert int(micro) * int(accum) * world == 2048
        assert int(per_device) == 2048 // world
    assert rows[1][4] != rows[64][4]  # accumulation differs with the world size


def test_dry_run_with_override_is_marked_non_canonical(capsys):
    code, out, _ = run_cli(capsys, "launch", str(ROOT / "recipes/earlyconv_vitb.yaml"),
                           "optim.lr=5e-4", "--dry-run", "--world-size", "4", "data.workers=4")
    assert code == 0
    assert "NON-CANONICAL (scientific keys overridden: optim.lr)" in out
    assert "override   optim.lr=5e-4" in out
    assert float(derived_rows(out)[4][5]) == pytest.approx(5e-4)


def test_bad_override_is_a_one_line_error(capsys):
    code, out, err = run_cli(capsys, "launch", str(ROOT / "recipes/earlyconv_vitb.yaml"),
                             "optim.lrr=1", "--dry-run")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert "earlyconv_vitb.yaml" in err and "optim.lrr" in err and "optim.lr'" in err


def test_doctor_reports_versions_and_install_lines(capsys, monkeypatch):
    from repro import doctor

    real_which = shutil.which
    monkeypatch.setattr(doctor.shutil, "which",
                        lambda name: None if name == "slurmctld" else real_which(name))
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0  # nothing required is missing in the test environment
    import importlib.metadata

    import torch

    version = importlib.metadata.version("torch")
    assert re.search(rf"\| torch +\| ok +\| {re.escape(version)}", out)
    line = next(ln for ln in out.splitlines() if "| slurmctld" in ln)
    assert "missing" in line and "apt-get install -y --no-install-recommends slurmctld" in line
    gpu = next(ln for ln in out.splitlines() if "| cuda" in ln)
    assert ("ok" in gpu) == torch.cuda.is_available()


def test_console_script_entry_point():
    exe = Path(sys.executable).with_name("repro")
    proc = subprocess.run([str(exe), "launch", str(ROOT / "recipes/earlyconv_vitb.yaml"),
                           "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "vit_c_18gf" in proc.stdout
