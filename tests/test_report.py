"""`repro report`: verdicts over fixture run directories, a stable markdown (golden file), plots."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from repro.cli import main
from repro.report import results

GOLDEN = Path(__file__).parent / "golden" / "results.md"


def make_run(root: Path, recipe: str, row: str | None, seed: int, top1: float, *,
             epochs=(400, 400), status="complete", canonical=True, smoke=False,
             overrides=(), ema=None, wall_s=3600.0, gmacs=17.71, params_m=81.57, run_id=None):
    run = root / recipe / (run_id or f"run-s{seed}")
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"# resolved\ntrain: {{seed: {seed}}}\n")
    (run / "env.json").write_text(json.dumps({"hardware": {"gpus": ["A100"] * 8},
                                              "world_size": 8}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"step": 10, "epoch": 0, "train/loss": 6.5, "throughput/images_per_s": 2500.0},
        {"step": 20, "epoch": 1, "train/loss": 5.9, "throughput/images_per_s": 2600.0},
        {"step": 20, "epoch": 1, "eval/top1": top1 - 10},
        {"step": 40, "epoch": 2, "eval/top1": top1}]) + "\n")
    r = {"schema_version": 1, "recipe": recipe, "paper_row": row, "status": status,
         "canonical": canonical, "smoke": smoke, "non_canonical_keys": list(overrides),
         "epochs_done": epochs[0], "epochs_planned": epochs[1], "final/eval/top1": top1,
         "final/eval/top5": 96.0, "params_m": params_m, "gmacs": gmacs, "resolution": 224,
         "world_size": 8, "device": "cuda:0", "wall_time_s": wall_s}
    if ema is not None:
        r["final/eval_ema/top1"] = ema
    (run / "results.json").write_text(json.dumps(r))
    return run


@pytest.fixture
def fixture_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, top1 in ((0, 83.1), (1, 82.9), (2, 83.2)):  # three seeds: mean 83.07
        make_run(root, "earlyconv_vitb", "earlyconv/ViT_C-18GF", seed, top1, ema=83.3)
    make_run(root, "coatnet_0", "coatnet/CoAtNet-0", 0, 80.9, epochs=(300, 300), gmacs=4.14,
             params_m=25.04)
    make_run(root, "levit_256", "levit/LeViT-256", 0, 78.0, epochs=(500, 1000),
             status="incomplete", gmacs=1.13, params_m=18.89)
    cvt = make_run(root, "cvt_13", "cvt/CvT-13", 0, 81.9, epochs=(300, 300), canonical=False,
                   overrides=("optim.lr",), gmacs=4.57, params_m=20.0)
    # `repro eval RUN --real-labels --v2`: the ReaL and V2 columns (CvT's table gives both).
    (cvt / "eval.json").write_text(json.dumps({"eval/top1": 81.9, "eval/real_top1": 86.95,
                                               "eval/v2_top1": 70.12}))
    make_run(root, "earlyconv_vitb_patch", "earlyconv/ViT_P-18GF", 0, 84.0, smoke=True,
             canonical=False, epochs=(0, 400), status="incomplete")
    make_run(root, "quickstart", None, 0, 98.3, epochs=(40, 40), ema=98.6, gmacs=0.028,
             params_m=0.4)
    return root


def verdicts(md: str) -> dict[str, str]:
    """Row label -> verdict, from every paper table (their columns differ: ReaL and V2 where
    the paper gives them), read by each table's own header."""
    out, head = {}, None
    for line in md.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif not set(cells[0]) <= {"-", ":"} and "verdict" in head and head[0] == "row [recipe]":
            out[cells[0]] = cells[head.index("verdict")]
    return out


def test_verdicts(fixture_runs):
    md = results.render(results.load_runs([fixture_runs])[0])
    v = verdicts(md)
    assert v["ViT_C-18GF [earlyconv_vitb]"] == "reproduced"  # 83.07 vs 83.0, within 0.3
    assert v["CoAtNet-0 [coatnet_0]"] == "below"  # 80.9 vs 81.6
    assert v["LeViT-256 [levit_256]"] == "incomplete"  # 500 of 1000 epochs
    assert v["CvT-13 [cvt_13, optim.lr]"] == "non-canonical"
    assert v["ViT_P-18GF [earlyconv_vitb_patch, smoke]"] == "non-canonical"
    assert v["CvT-21"] == "not run" and v["LeViT-384"] == "not run"
    assert "83.07 ± 0.15 (n=3)" in md
    assert re.search(r"\| quickstart +\| 98.30 \(n=1\) +\| 98.60 ", md)
    # Every non-baseline row of every paper is listed.
    from repro import papers

    rows = papers.load_rows()
    for r in rows[~rows["baseline"].astype(bool)].itertuples():
        assert f"| {r.row}" in md, r.id


def test_verdict_rules():
    entry = {"smoke": False, "canonical": True, "complete": True, "epochs_done": 300,
             "epochs_planned": 300, "top1": 81.8}
    assert results.verdict(entry, 81.6) == "reproduced"
    assert results.verdict({**entry, "top1": 82.0}, 81.6) == "above"
    assert results.verdict({**entry, "top1": 82.0}, 81.6, tol=0.5) == "reproduced"
    assert results.verdict({**entry, "complete": False}, 81.6) == "incomplete"
    assert results.verdict(None, 81.6) == "not run"


def test_markdown_is_stable(fixture_runs):
    md = results.render(results.load_runs([fixture_runs])[0], command="repro report runs/")
    md = md.replace(str(fixture_runs), "RUNS")
    if os.environ.get("REPRO_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(md)
    assert md == GOLDEN.read_text(), "rerun with REPRO_UPDATE_GOLDEN=1 if the change is meant"


def test_cli_writes_report_and_plots(fixture_runs, tmp_path, capsys):
    out = tmp_path / "reports" / "results.md"
    assert main(["report", str(fixture_runs), "--out", str(out)]) == 0
    md = out.read_text()
    assert "![top-1 vs GMACs](plots/top1_vs_gmacs.png)" in md
    for png in ("top1_vs_gmacs.png", "training_curves.png"):
        data = (out.parent / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "nope: no such run directory" in capsys.readouterr().err


def test_committed_throughput_report_is_rendered_from_its_json():
    from repro.report.throughput import render

    reports = Path(__file__).resolve().parents[1] / "reports"
    saved = json.loads((reports / "throughput_cpu.json").read_text())
    assert (reports / "throughput_cpu.md").read_text() == render(saved)


def test_relaunches_are_not_seeds_and_incomplete_runs_stand_apart(tmp_path, capsys):
    """Killed relaunches and repeated seeds (issue 13, item 5): n counts distinct seeds of
    complete runs; a seed run twice is one result (the latest); incomplete runs never enter
    the mean and are shown as incomplete."""
    root = tmp_path / "runs"
    for i in range(3):  # killed during epoch 1: status running, epoch-1 evaluation
        make_run(root, "quickstart", None, 0, 20.0, epochs=(1, 3), status="running",
                 run_id=f"killed-{i}")
    for i, top1 in enumerate((97.0, 98.0)):  # the same seed completed twice
        run = make_run(root, "quickstart", None, 0, top1, epochs=(3, 3), run_id=f"done-{i}")
        os.utime(run / "results.json", (1_000 + i, 1_000 + i))
    make_run(root, "quickstart", None, 1, 96.0, epochs=(3, 3), run_id="seed1")
    os.utime(root / "quickstart/seed1/results.json", (500, 500))
    md = results.render(results.load_runs([root])[0])
    assert "97.00 ± 1.41 (n=2; 1 repeated seed run(s) set aside, the latest shown: seed 0: " \
           "done-1)" in md
    assert "– (3 incomplete runs)" in md and "20.00" not in md


def test_a_damaged_run_is_skipped_with_a_warning_and_the_rest_reported(fixture_runs, tmp_path,
                                                                      capsys):
    """Issue 13, item 7: garbage results.json, a torn metrics line."""
    (fixture_runs / "coatnet_0/run-s0/results.json").write_text("{not json")
    torn = fixture_runs / "earlyconv_vitb/run-s0/metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 50, "train/lo')
    out = tmp_path / "reports" / "results.md"
    assert main(["report", str(fixture_runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coatnet_0/run-s0/results.json: not valid JSON" in err
    md = out.read_text()
    assert "83.07 ± 0.15 (n=3)" in md and "CoAtNet-0 [coatnet_0]" not in md
    for run in ("coatnet_0/run-s0", "earlyconv_vitb/run-s0"):  # launched here
        (fixture_runs / run / "launch.json").write_text("{}")
    assert main(["status", str(fixture_runs)]) == 0
    out, err = capsys.readouterr()
    assert "earlyconv_vitb/run-s0" in out
    assert err.count("\n") == 1 and "results.json: not valid JSON" in err
