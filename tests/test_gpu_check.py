"""benchmarks/gpu_check.py: without CUDA, one line, exit status 3 and nothing written; with
`--device cpu --tiny`, the check's own code (the four families' recipes on the trainer's path
under a one-process gloo group with bf16, channels_last, torch.compile, FFCV and the device
augmentation; the LeViT protocol bench; the augmentation timing) runs end to end and its
record says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repro import papers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever this machine has
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_without_cuda_it_says_so_in_one_line_exits_3_and_writes_nothing(tmp_path):
    out = tmp_path / "reports" / "gpu_check.md"
    p = run("--out", str(out), tmp_path=tmp_path)
    assert p.returncode == 3, p.stderr
    assert p.stdout == "" and p.stderr.count("\n") == 1 and "no CUDA device" in p.stderr
    assert list(tmp_path.iterdir()) == []  # not even the reports/ folder


def test_bad_options_are_one_line_and_write_nothing(tmp_path):
    p = run("--device", "cpu", "--out", str(tmp_path / "x.md"), tmp_path=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--tiny" in p.stderr
    p = run("--device", "cpu", "--tiny", "--families", "CvT-99", "--out",
            str(tmp_path / "x.md"), tmp_path=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "CvT-99" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_what_would_start_past_the_budget_is_skipped_and_said(tmp_path):
    """On a lent GPU a check cut off by the session's timeout would write nothing: parts that
    start too late are skipped instead, named in the report, and the exit status is 1."""
    out = tmp_path / "g.md"
    p = run("--device", "cpu", "--tiny", "--parts", "bench,augment", "--budget-s", "0.001",
            "--out", str(out), tmp_path=tmp_path)
    assert p.returncode == 1 and "skipped: part 2, part 3" in p.stdout
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["skipped"] == ["part 2", "part 3"] and not rep["ok"]
    assert "bench" not in rep and "augment" not in rep
    assert "**Skipped to stay within the 0.001 s budget:** part 2, part 3" in out.read_text()


TINY = pytest.mark.gpu_check_tiny  # alone: `make test-gpu-check-tiny`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.md"
    p = run("--device", "cpu", "--tiny", "--out", str(out), tmp_path=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, json.loads(out.with_suffix(".json").read_text()), out.read_text()


@TINY
def test_tiny_trains_each_family_on_the_gpu_path_settings(tiny):
    _, rep, _ = tiny
    assert rep["ok"] and rep["errors"] == {} and rep["tiny"]
    fams = {f["row"]: f for f in rep["train"]}
    assert list(fams) == ["CoAtNet-0", "LeViT-256", "CvT-13", "ViT_C-18GF"]
    models = {"CoAtNet-0": "coatnet_0", "LeViT-256": "levit_256", "CvT-13": "cvt_13",
              "ViT_C-18GF": "vit_c_18gf"}
    for row, f in fams.items():
        assert "error" not in f, f.get("error")
        assert f["model"] == models[row]
        # The one-process group: DDP wraps the model (gloo here; NCCL on the GPU).
        assert f["backend"] == "gloo" and f["ddp"] and f["world_size"] == 1
        assert f["amp"] == "bf16" and f["channels_last"] and f["compile"]
        assert f["compile_backend"] == "eager"  # inductor on the GPU
        assert f["data_format"] == "ffcv" and f["device_augmentation"]
        assert f["resolution"] == 32 and f["batch"] == 8 and f["accum_steps"] == 1
        assert f["steps"] == 4 and len(f["losses"]) == 4 and f["loss_finite"]
        assert all(0 < x < 10 for x in f["losses"])
        assert f["throughput/images_per_s"] > 0 and 0 <= f["time/data_pct"] <= 100
        assert f["mfu_pct"] > 0 and f["first_step_s"] > 0
        assert 0 <= f["eval"]["eval/top1"] <= 100 and f["eval"]["eval/count"] == 360
        # The per-GPU batch it stands in for: the recipe's global batch over its GPUs.
        assert f["recipe_per_gpu_batch"] * f["planned_gpus"] >= f["recipe_global_batch"]
    assert fams["LeViT-256"]["teacher"] == "regnety_160"  # distillation is in the step
    assert fams["ViT_C-18GF"]["augment"].startswith("v0")  # pycls's AutoAugment policy


@TINY
def test_tiny_times_the_levit_protocol_beside_the_papers_v100(tiny):
    _, rep, _ = tiny
    rows = {r["row"]: r for r in rep["bench"]["rows"]}
    assert list(rows) == ["LeViT-128S", "LeViT-128", "LeViT-192", "LeViT-256", "LeViT-384",
                          "DeiT-Tiny", "DeiT-Small"]
    for name, r in rows.items():
        row = papers.get_row(f"levit/{name}")
        (v100,) = [t for t in row["throughput"] if t["device_type"] == "gpu"]
        assert r["model"] == row["timm_model"] and r["paper_v100"] == v100["images_per_s"]
        assert r["here"] > 0 and r["vs_paper_v100"] == pytest.approx(r["here"] / r["paper_v100"])
        assert r["batch"] == 2  # --tiny's; the protocol's 2048 on a GPU
    assert rows["LeViT-256"]["ratio_to_anchor_here"] == 1.0
    assert rows["LeViT-128S"]["ratio_to_anchor_paper"] == pytest.approx(12880 / 6582)
    assert rows["LeViT-256"]["timm_rtx4090"] == 12506.52  # the anchors, timm's CSV
    settings = rep["bench"]["record"]["settings"]
    assert settings["protocol"] == "levit" and settings["fuse_bn"]


@TINY
def test_tiny_times_every_device_augmentation_tail_the_recipes_use(tiny):
    _, rep, md = tiny
    active = [r for r in rep["augment"] if r["active"]]
    names = " ".join(r["name"] for r in active)
    for policy in ("rand-m9-mstd0.5-inc1", "rand-n2-m15-mmax15", "v0"):
        assert policy in names
    for r in active:
        assert r["output_finite"] and r["output_shape"] == [16, 3, 64, 64]
        assert r["ms_median"] > 0
    assert {"coatnet_0", "levit_256", "cvt_13", "earlyconv_vitb"} <= {
        n for r in active for n in r["recipes"]}
    assert "**A `--tiny` run on the CPU.**" in md
    for title in ("## 1. Training on the GPU path", "## 2. Inference under the LeViT protocol",
                  "## 3. Device augmentation alone"):
        assert title in md
