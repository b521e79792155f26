"""`repro profile` traces that the TensorBoard plugin reads; `repro eval` equal to the trainer's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import repro.models  # noqa: F401  (registers vit_c_nano, cvt_13)
from repro.recipe import load_recipe
from repro.train import checkpoint, evaluate, profile
from repro.train.run import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
SMALL = ["data.format=folder", "data.workers=0", "train.device=cpu"]

# torch-tb-profiler's own loading path (what TensorBoard's PyTorch Profiler tab runs): RunLoader
# spawns a parser process per trace file, so it runs as a script with a __main__ guard.
TB_LOAD = """
import json, sys, tempfile
from torch_tb_profiler import io
from torch_tb_profiler.profiler.loader import RunLoader

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        run = RunLoader("profile", sys.argv[1], io.Cache(cache)).load()
        print(json.dumps({f"{w}/{s}": {
            "views": [v.name for v in p.views],
            "ops": [r["name"] for r in p.operation_table_by_name["data"]],
            "steps": len(p.overview["steps"]["rows"]),
        } for (w, s), p in run.profiles.items()}))
"""


def test_profile_writes_a_trace_the_tensorboard_plugin_loads(tmp_path, capsys):
    argv = [QUICKSTART, *SMALL, f"train.output_dir={tmp_path}/runs", "data.batch_size=16",
            "train.global_batch=16", "profile.wait=0", "profile.warmup=1", "--steps", "2"]
    assert profile.run_cli(argv) == 0
    (out,) = (tmp_path / "runs/quickstart").glob("profile-*")  # the default directory
    printed = capsys.readouterr().out
    (tb_trace,) = (out / "tb/profile").glob("*.pt.trace.json")
    for path in (tb_trace, out / "trace.json", out / "top_ops.md"):
        assert str(path) in printed, path

    res = subprocess.run([sys.executable, "-c", TB_LOAD, str(out / "tb/profile")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(loaded) == 1, res.stderr  # the loader logs and drops a trace it cannot parse
    (plugin,) = loaded.values()
    assert {"overall", "operator", "trace"} <= set(plugin["views"])
    assert plugin["steps"] == 2  # the active steps

    # The Perfetto/Chrome file is the same trace; the table names real operators, as the plugin.
    chrome = json.loads((out / "trace.json").read_text())
    assert chrome["traceEvents"] and (out / "trace.json").read_bytes() == tb_trace.read_bytes()
    table = (out / "top_ops.md").read_text()
    assert "`aten::addmm`" in table or "`aten::mm`" in table
    ours = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert {op for op in ours[:5] if op.startswith("aten::")} <= set(plugin["ops"])
    record = json.loads((out / "profile.json").read_text())
    assert record["schedule"] == {"wait": 0, "warmup": 1, "active": 2, "repeat": 1}
    assert record["steps_run"] == 3


def test_eval_of_a_run_equals_the_trainers_final_eval(tmp_path, capsys):
    recipe = load_recipe(QUICKSTART, [*SMALL, f"train.output_dir={tmp_path}/runs",
                                  "schedule.epochs=1", "schedule.warmup_epochs=0.2",
                                  "train.ema=0.9", "train.global_batch=32",
                                  "data.batch_size=32"], smoke=False)
    run = train(recipe, progress=False)
    results = json.loads((run / "results.json").read_text())
    assert results["final/eval/loss"] != results["final/eval_ema/loss"]  # two distinct models

    assert evaluate.run_cli([str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"top-1 {results['final/eval/top1']:.2f}" in line
    record = json.loads((run / "eval.json").read_text())
    assert record["checkpoint"] == str(run / "checkpoints/last.pt") and record["ema"]
    for prefix in ("eval", "eval_ema"):
        for key in ("top1", "top5", "count"):
            assert record[f"{prefix}/{key}"] == results[f"final/{prefix}/{key}"], (prefix, key)
        assert record[f"{prefix}/loss"] == pytest.approx(results[f"final/{prefix}/loss"],
                                                         rel=1e-6)
    assert record["protocol"] == {"resolution": 32, "crop_pct": 1.0, "interpolation": "bicubic"}


def test_module_prefixed_weights_load_through_evals_mapping(tmp_path, capsys):
    torch.manual_seed(0)
    state = timm.create_model("vit_c_nano", num_classes=10).state_dict()
    ddp = tmp_path / "official.pth"  # as DDP and the official CvT releases save them
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp)
    timm_ckpt = tmp_path / "timm.pth.tar"  # timm's train.py: args, and a ModelEmaV3 state dict
    torch.save({"epoch": 3, "arch": "vit_c_nano", "args": argparse.Namespace(lr=1e-3),
                "state_dict": state, "state_dict_ema": {f"module.{k}": v
                                                        for k, v in state.items()}}, timm_ckpt)
    records = []
    for path in (ddp, timm_ckpt):
        assert evaluate.run_cli([QUICKSTART, *SMALL, "--checkpoint", str(path)]) == 0
        records.append(json.loads(path.with_name(path.stem + ".eval.json").read_text()))
    plain, wrapped = records
    assert plain["checkpoint_layout"] == "state dict" and not plain["ema"]
    assert "stripped 'module.'" in plain["key_mapping"]
    assert wrapped["checkpoint_layout"] == "state_dict + state_dict_ema" and wrapped["ema"]
    assert plain["eval/count"] == 360
    assert plain["eval/top1"] == wrapped["eval/top1"] == wrapped["eval_ema/top1"]
    assert plain["eval/loss"] == wrapped["eval_ema/loss"]


def test_cvt_official_keys_load_strictly_and_mismatches_are_one_line(tmp_path):
    official = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=10)
    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save({f"module.{k}": v for k, v in official.state_dict().items()}, path)
    weights = checkpoint.read_weights(path)
    model = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=10)
    checkpoint.load_strict(model, weights.model, path=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, official.state_dict()[k]), k

    other = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=5)
    with pytest.raises(checkpoint.WeightsError) as e:
        checkpoint.load_strict(other, weights.model, path=path, name="cvt_13")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: model weights do not match model cvt_13")
    assert "head.weight (10, 384) vs (5, 384)" in msg
    broken = {k: v for k, v in weights.model.items() if k != "stage2.cls_token"}
    broken["stage9.extra"] = torch.zeros(1)
    with pytest.raises(checkpoint.WeightsError, match=r"1 missing \(stage2\.cls_token\); "
                                          r"1 unexpected \(stage9\.extra\)"):
        checkpoint.load_strict(model, broken, path=path)


def test_missing_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    absent = tmp_path / "weights/CvT-13-224x224-IN-1k.pth"
    with pytest.raises(FileNotFoundError) as e:
        evaluate.run_cli([QUICKSTART, *SMALL, "--checkpoint", str(absent)])
    assert str(e.value).startswith(f"{absent}: checkpoint not found") and "\n" not in str(e.value)
    run = tmp_path / "runs/quickstart/r1"  # a run directory without its checkpoint
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(Path(QUICKSTART).read_text())
    with pytest.raises(FileNotFoundError, match=str(run / "checkpoints/last.pt")):
        evaluate.run_cli([str(run), *SMALL])
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert written == ["runs", "runs/quickstart", "runs/quickstart/r1",
                       "runs/quickstart/r1/recipe.yaml"]  # nothing else
