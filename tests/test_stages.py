"""Stages (issue 14): a fine-tune names the recipe it continues (`init.from`); `repro launch`
runs a missing parent first, the child starts from the parent's EMA at another resolution, a
completed parent is not rerun, and a head of another class count is re-initialised."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from repro import models, rundir
from repro.cli import main
from repro.recipe import RecipeError, load_recipe
from repro.train import checkpoint, stages

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes/quickstart.yaml"


def write_chain(tmp_path: Path) -> Path:
    (tmp_path / "pre.yaml").write_text(
        f"_base_: {QUICKSTART}\n"
        "data: {format: folder, workers: 0}\nschedule: {epochs: 1}\n"
        "train: {max_steps: null, log_every_steps: 5}\n")
    (tmp_path / "ft.yaml").write_text(
        f"_base_: {QUICKSTART}\n"
        "init: {from: pre.yaml, weights: ema}\n"
        "data: {format: folder, workers: 0, resolution: 48}\neval: {resolution: 48}\n"
        "schedule: {epochs: 1}\ntrain: {log_every_steps: 5}\n")
    return tmp_path / "ft.yaml"


def test_a_two_stage_chain_runs_its_parent_first_and_starts_from_its_ema(tmp_path, capsys):
    child = write_chain(tmp_path)
    out = f"train.output_dir={tmp_path}/runs"
    assert main(["launch", str(child), out, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "stage 1/2" in dry and "pre.yaml  (1 epochs" in dry and "no run yet: runs first" in dry
    assert main(["launch", str(child), out, "--run-id", "ft1"]) == 0
    printed = capsys.readouterr().out
    assert "stage pre: no complete run to start from yet: training it first" in printed
    (parent,) = rundir.find_runs(tmp_path / "runs/pre")
    ft = rundir.Run(tmp_path / "runs/ft/ft1")
    # The parent ended before the child began.
    assert parent.file("results.json").stat().st_mtime <= ft.file("launch.json").stat().st_mtime
    init = ft.results().extra["init"]
    assert init["run"] == str(parent.path) and init["weights"] == "ema"
    assert init["parent_complete"] and init["parent_canonical"] and ft.results().canonical
    assert any("checkpoint_filter_fn" in n for n in init["adapted"])  # pos_embed 32 -> 48 px
    assert ft.json("launch.json")["init"]["run"] == str(parent.path)
    # The report shows the row's chain, and its compute summed over both stages.
    from repro.report import results

    runs, _ = results.load_runs([tmp_path / "runs"])
    row = runs.set_index("recipe").loc["ft"]
    hours = [rundir.Run(p).results() for p in (parent.path, ft.path)]
    assert row["chain"] == "pre → ft"
    assert row["cpu_hours"] == pytest.approx(sum(h.wall_time_s for h in hours) / 3600)
    # A second child run starts from the same parent: it is not trained again.
    assert main(["launch", str(child), out, "--run-id", "ft2"]) == 0
    assert "training it first" not in capsys.readouterr().out
    assert len(rundir.find_runs(tmp_path / "runs/pre")) == 1


def test_the_child_model_holds_the_parents_ema_adapted_to_its_resolution(tmp_path):
    parent_model = models.create("vit_c_nano", 32, num_classes=10)
    run = rundir.Run(tmp_path / "runs/pre/p0")
    run.checkpoints.mkdir(parents=True)
    ema = {f"module.{k}": v + 1 for k, v in parent_model.state_dict().items()}  # EMA != raw
    checkpoint.save(run.last_checkpoint, {"model": parent_model.state_dict(), "ema": ema})
    run.write_results(rundir.Results(run_id="p0", recipe="pre", status="complete", seed=0,
                                     canonical=True))
    r = load_recipe(write_chain(tmp_path), [f"train.output_dir={tmp_path}/runs"])
    for classes in (10, 5):  # 5: a 21K -> 1K style head of another class count
        child = models.create("vit_c_nano", 48, num_classes=classes)
        fresh_head = child.head.weight.clone()
        loaded = stages.start_from_parent(child, r)
        assert loaded.parent.run.path == run.path
        block = "blocks.0.attn.qkv.weight"
        assert torch.equal(child.state_dict()[block], ema[f"module.{block}"])
        assert child.pos_embed.shape[1] > parent_model.pos_embed.shape[1]
        if classes == 5:
            assert torch.equal(child.head.weight, fresh_head)
            assert any("classifier re-initialised" in n for n in loaded.notes)
        else:
            assert torch.equal(child.head.weight, ema["module.head.weight"])


def test_without_a_parent_run_the_child_says_what_to_run(tmp_path):
    r = load_recipe(write_chain(tmp_path), [f"train.output_dir={tmp_path}/runs"])
    with pytest.raises(RecipeError, match="init.from: no complete run of .*pre.yaml with seed 0"):
        stages.start_from_parent(models.create("vit_c_nano", 48, num_classes=10), r)
    (tmp_path / "pre.yaml").write_text(f"_base_: {tmp_path / 'ft.yaml'}\n")  # a loop
    with pytest.raises(RecipeError, match="the stages loop back"):
        stages.chain(r)


def test_a_fine_tune_is_profiled_without_its_parent_run(tmp_path):
    from repro.train import profile

    child = write_chain(tmp_path)
    assert profile.run_cli([str(child), f"train.output_dir={tmp_path}/runs", "profile.wait=0",
                            "--steps", "1", "--out",
                            str(tmp_path / "prof")]) == 0
    assert (tmp_path / "prof/top_ops.md").is_file()


def imagenet21k_style(tmp_path: Path) -> Path:
    """The built-in digits' training images laid out as ImageNet-21K is distributed: one .tar
    per class (flat members), here with two classes left unpacked as folders."""
    from repro.data import builtin

    src = tmp_path / "in21k"
    src.mkdir()
    for cls in sorted(p.name for p in builtin.ensure_digits(32).train_dir.iterdir()):
        images = sorted((builtin.ensure_digits(32).train_dir / cls).iterdir())
        if cls in ("8", "9"):
            (src / cls).symlink_to(images[0].parent)
            continue
        with tarfile.open(src / f"{cls}.tar", "w") as tf:
            for image in images:
                tf.add(image, arcname=f"{cls}_{image.name}")
    return src


def test_a_21k_style_chain_converts_the_release_and_fine_tunes_a_new_head(tmp_path, capsys):
    """Issue 14: a parent pre-trained on more classes (10, per-class .tar files split by
    `--holdout`, sigmoid loss as CoAtNet's 21K stage) and a child fine-tuned on 5 of them at
    48 px: the child's head is re-initialised, its body starts from the parent, and it trains."""
    from repro.data import builtin
    from repro.data.beton import read_sidecar

    src = imagenet21k_style(tmp_path)
    data = tmp_path / "data"
    convert = ["data", "convert", str(src), "--max-res", "0", "--compress-prob", "0",
               "--workers", "1"]
    assert main([*convert[:3], str(data / "train.beton"), *convert[3:], "--holdout", "20"]) == 0
    assert main([*convert[:3], str(data / "val.beton"), *convert[3:],
                 "--heldout-of", str(data / "train.beton")]) == 0
    train, val = read_sidecar(data / "train.beton"), read_sidecar(data / "val.beton")
    per_class = [len(list((builtin.ensure_digits(32).train_dir / c).iterdir()))
                 for c in train["classes"]]
    assert train["classes"] == [str(c) for c in range(10)] and val["classes"] == train["classes"]
    assert val["num_images"] == 10 * 20 and train["num_images"] == sum(per_class) - 200
    assert val["holdout"]["heldout_sha256"] == train["holdout"]["heldout_sha256"]
    assert val["holdout"]["part"] == "heldout" and train["holdout"]["part"] == "train"
    # A different source (a class missing) is refused for the held-out file, in one line.
    (src / "9").unlink()
    assert main([*convert[:3], str(data / "x.beton"), *convert[3:],
                 "--heldout-of", str(data / "train.beton")]) == 1
    assert "not the source" in capsys.readouterr().err

    five = tmp_path / "digits5"  # the "1K" of this chain: 5 of the 10 classes
    for split in ("train", "val"):
        for c in range(5):
            (five / split).mkdir(parents=True, exist_ok=True)
            (five / split / str(c)).symlink_to(builtin.ensure_digits(32).root / split / str(c))
    (tmp_path / "pre21k.yaml").write_text(
        f"_base_: {QUICKSTART}\n"
        f"data: {{dataset: imagenet21k, train_path: {data / 'train.beton'}, "
        f"val_path: {data / 'val.beton'}, workers: 0}}\n"
        "schedule: {epochs: 2, warmup_epochs: 0.5}\n"
        "train: {loss: sigmoid, label_smoothing: 1.0e-4, log_every_steps: 5}\n")
    (tmp_path / "ft1k.yaml").write_text(
        f"_base_: {QUICKSTART}\n"
        "init: {from: pre21k.yaml, weights: ema}\n"
        "model: {num_classes: 5}\n"
        f"data: {{dataset: imagenet, format: folder, train_path: {five / 'train'}, "
        f"val_path: {five / 'val'}, train_images: {sum(per_class[:5])}, workers: 0, "
        "resolution: 48}\n"
        "eval: {resolution: 48}\nschedule: {epochs: 3, warmup_epochs: 0.5}\n"
        "train: {log_every_steps: 5}\n")
    assert main(["launch", str(tmp_path / "ft1k.yaml"), f"train.output_dir={tmp_path}/runs",
                 "--run-id", "ft"]) == 0
    (parent,) = rundir.find_runs(tmp_path / "runs/pre21k")
    assert parent.results().complete
    ft = rundir.Run(tmp_path / "runs/ft1k/ft")
    init = ft.results().extra["init"]
    assert init["run"] == str(parent.path)
    assert any(n.startswith("classifier re-initialised") and "head.weight" in n
               for n in init["adapted"])
    losses = [m["train/loss"] for m in ft.metrics() if "train/loss" in m]
    assert losses[-1] < losses[0]
    assert ft.results().metrics["final/eval/top1"] > 40  # chance is 20
