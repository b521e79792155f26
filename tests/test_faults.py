"""Faults and hostile input, item by item (issue 13; items 1-5 also run end to end in
test_hostile.py): damaged data and run files, odd run ids, flat validation folders, and the
one-line errors that replace tracebacks."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from repro import rundir
from repro.cli import main
from repro.data import DataError, ffcv_available
from repro.data.tree import flat_images, image_tree
from repro.recipe import load_recipe
from repro.train.run import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
needs_ffcv = pytest.mark.skipif(not ffcv_available() and os.environ.get("CI") != "true",
                                reason="FFCV not installed")


def recipe(tmp_path, *overrides):
    return load_recipe(QUICKSTART, [f"train.output_dir={tmp_path}/runs", "data.format=folder",
                                    "train.log_every_steps=1", "data.workers=0",
                                    "train.device=cpu", *overrides])


def images(root: Path, classes=("a_cls", "b_cls"), n=4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (20, 16), (40 * i, 90, 0)).save(root / c / f"{i}.jpg")
    return root


class Interrupt(Exception):
    pass


def kill_at(step: int):
    def hook(state):
        if state.step == step:
            raise Interrupt
    return hook


# 1 -------------------------------------------------------------------------------------------
def test_the_walk_enters_no_loop_and_labels_each_image_once(tmp_path):
    src = images(tmp_path / "src")
    os.symlink("..", src / "a_cls" / "loop")
    os.symlink(src / "b_cls", src / "a_cls" / "nested_back")  # into the tree: not followed
    outside = images(tmp_path / "elsewhere", classes=("extra",), n=2) / "extra"
    os.symlink(outside, src / "b_cls" / "more")  # leads outside the tree: followed
    classes, samples = image_tree(src)
    assert classes == ["a_cls", "b_cls"]
    assert [(Path(p).relative_to(src).as_posix(), c) for p, c in samples] == [
        ("a_cls/0.jpg", 0), ("a_cls/1.jpg", 0), ("a_cls/2.jpg", 0), ("a_cls/3.jpg", 0),
        ("b_cls/0.jpg", 1), ("b_cls/1.jpg", 1), ("b_cls/2.jpg", 1), ("b_cls/3.jpg", 1),
        ("b_cls/more/0.jpg", 1), ("b_cls/more/1.jpg", 1)]
    os.symlink(src / "b_cls", src / "c_cls")  # a class that is another class: two labels
    with pytest.raises(DataError, match="the same image is also under class 'b_cls'"):
        image_tree(src)


# 2 -------------------------------------------------------------------------------------------
def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from repro.train import checkpoint
    from repro.train.loop import TrainingDiverged

    r = recipe(tmp_path, "schedule.epochs=2", "optim.lr=1e6", "train.checkpoint_every_steps=1")
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is kept"):
        train(r, run_id="nan", progress=False)
    last = tmp_path / "runs/quickstart/nan/checkpoints/last.pt"
    if last.exists():
        ck = checkpoint.load(last)
        assert not checkpoint.non_finite(ck["model"]) and not checkpoint.non_finite(ck["ema"])


# 3, 10 ---------------------------------------------------------------------------------------
def test_a_run_directory_has_one_holder_and_a_closed_one_has_none(tmp_path):
    run = rundir.Run(tmp_path / "r")
    lock = run.hold()
    holder = run.holder()
    assert holder["pid"] == os.getpid()
    with pytest.raises(rundir.RunBusy, match=f"pid {os.getpid()}"):
        run.hold()  # another open file description: refused, as another process would be
    lock.release()
    assert run.holder() is None
    run.hold().release()


# 4, 11 ---------------------------------------------------------------------------------------
def test_a_resume_trims_the_metrics_after_its_checkpoint_and_refuses_another_recipe(tmp_path):
    r = recipe(tmp_path, "schedule.epochs=1", "train.checkpoint_every_steps=5")
    with pytest.raises(Interrupt):
        train(r, run_id="k", hooks=[kill_at(8)], progress=False)  # last checkpoint: step 5
    run = rundir.Run(tmp_path / "runs/quickstart/k")
    assert max(m["step"] for m in run.metrics()) == 7  # the hook runs before step 8 is logged
    with (run.path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "train/lo')  # 7. a torn last line, as a kill leaves it
    with pytest.raises(rundir.RunError, match=r"differ from its recipe.yaml: optim\.lr"):
        train(recipe(tmp_path, "schedule.epochs=1", "train.checkpoint_every_steps=5",
                     "optim.lr=0.5"), run_id="k", progress=False)
    train(r, run_id="k", progress=False)
    steps = [m["step"] for m in run.metrics() if "train/loss" in m]
    assert steps == list(range(1, 23))  # 6-7 trained again, logged once; the torn line gone
    assert run.results().status == "complete"


def test_metrics_without_a_checkpoint_are_not_silently_restarted(tmp_path):
    r = recipe(tmp_path, "schedule.epochs=1", "train.checkpoint_every_steps=100")
    with pytest.raises(Interrupt):
        train(r, run_id="nock", hooks=[kill_at(3)], progress=False)
    with pytest.raises(rundir.RunError, match="has metrics but no checkpoint"):
        train(r, run_id="nock", progress=False)


# 6, 13 ---------------------------------------------------------------------------------------
@needs_ffcv
def test_a_damaged_beton_is_refused_in_one_line(tmp_path, capsys):
    from repro.data.beton import verify
    from repro.data.convert import convert

    dst = tmp_path / "d.beton"
    convert(images(tmp_path / "src", n=6), dst, workers=1, progress=False)
    side = json.loads((tmp_path / "d.beton.json").read_text())
    assert side["writer"]["ffcv"] == importlib.metadata.version("ffcv")
    assert side["size"] == dst.stat().st_size and len(side["sha256"]) == 64
    assert main(["data", "check", str(dst)]) == 0
    data = bytearray(dst.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # same size, damaged content
    dst.write_bytes(bytes(data))
    with pytest.raises(DataError, match="content differs from its conversion record"):
        verify(dst)  # the size and mtime changed: checked again on this first use
    assert main(["data", "check", str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "repro data convert" in err and "--overwrite" in err
    dst.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(DataError, match="bytes, but its conversion record says"):
        verify(dst, full=False)


# 7 -------------------------------------------------------------------------------------------
def test_a_garbage_results_file_is_one_line_for_launch(tmp_path, capsys):
    run = rundir.Run(tmp_path / "runs/quickstart/g")
    run.path.mkdir(parents=True)
    (run.path / "results.json").write_text("\x00garbage")
    code = main(["launch", QUICKSTART, f"train.output_dir={tmp_path}/runs", "--run-id", "g"])
    err = capsys.readouterr().err
    assert code == 1 and f"{run.path}/results.json: not valid JSON" in err


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "../../x", "/abs/path", ".hidden"])
def test_a_run_id_outside_one_path_component_is_refused(tmp_path, capsys, bad):
    code = main(["launch", QUICKSTART, f"train.output_dir={tmp_path}/runs", "--run-id", bad])
    err = capsys.readouterr().err
    assert code == 1 and f"run id {bad!r}" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


# 15 ------------------------------------------------------------------------------------------
def test_a_flat_validation_folder_says_how_to_label_it_and_takes_labels(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    with pytest.raises(DataError, match="pass --labels FILE"):
        image_tree(val)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "ILSVRC2012_val_00000002,n01440764 1 2 3 4\n"
                   "ILSVRC2012_val_00000001,n01530575 5 6 7 8 n01530575 1 1 2 2\n"
                   "ILSVRC2012_val_00000003,n01530575 0 0 1 1\n")
    classes, samples = flat_images(val, csv)
    assert classes == ["n01440764", "n01530575"]
    assert [(Path(p).name, c) for p, c in samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000002.JPEG", 0),
        ("ILSVRC2012_val_00000003.JPEG", 1)]
    listed = tmp_path / "labels.txt"
    listed.write_text("n01530575\nn01440764\nn01530575\n")
    assert flat_images(val, listed) == (classes, samples)
    listed.write_text("65\n970\n230\n")  # the devkit's ILSVRC2012 ids: refused, not guessed
    with pytest.raises(DataError, match="integer labels are refused"):
        flat_images(val, listed)


# 16 ------------------------------------------------------------------------------------------
def test_small_things_read_right(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    assert "%%" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "the committed report" in " ".join(capsys.readouterr().out.split())
    code = main(["launch", QUICKSTART, "model.name=does_not_exist", "--smoke",
                 f"train.output_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 1 and "model.name: unknown model 'does_not_exist'" in err
    assert not (tmp_path / "runs").exists()
    assert main(["launch", QUICKSTART, "--smoke", f"train.output_dir={tmp_path}/runs"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "{" not in out and "eval/top1 " in out


# 14 ------------------------------------------------------------------------------------------
@needs_ffcv
def test_ctrl_c_stops_a_conversion_and_leaves_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    for c in ("a", "b"):  # noise compresses badly: a writer phase of a few seconds
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(700):
            Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(
                tmp_path / "src" / c / f"{i}.jpg")
    shm_before = set(os.listdir("/dev/shm"))
    # A session of its own, as a terminal's job: SIGINT goes to its whole process group, and
    # its disposition is the default, as in a terminal (a test run started in the background
    # of a script inherits SIGINT ignored, and a Python started so never raises
    # KeyboardInterrupt: the conversion then finished, and this test failed for that reason).
    proc = subprocess.Popen([sys.executable, "-m", "repro.cli", "data", "convert", "src",
                             "out.beton", "--workers", "1"], cwd=tmp_path,
                            start_new_session=True, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not any(f.endswith(".tmp") for f in os.listdir(tmp_path)):  # the writer started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].endswith("repro data: interrupted")
    assert "leaked" not in err and "Exception ignored" not in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no destination, no temporary file
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not [p for p in os.listdir("/proc") if p.isdigit() and "out.beton" in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def test_verify_says_a_baseline_outside_tolerance_is_not_checked():
    from repro.report.architecture import summary

    row = {"id": "x/A", "model": "a", "resolution": 224, "params_m_paper": 12, "params_m": 11,
           "params_rel": -0.08, "gmacs_paper": 1, "gmacs": 1, "gmacs_rel": 0.0}
    data = {"meta": {"params_tol": 0.01, "gmacs_tol": 0.05}, "rows": [
        {**row, "baseline": True, "verdict": "OUT OF TOLERANCE"},
        {**row, "id": "x/B", "baseline": False, "verdict": "ok", "params_rel": 0.0}]}
    text = summary(data)
    assert "OUT OF TOLERANCE (baseline)" not in text
    assert "outside tolerance (baseline, not checked)" in text
    assert text.endswith("every model row within tolerance; 1 baseline row(s) outside it, not "
                         "checked (a reference model quoted with a rounded count): x/A")
