"""Faults and hostile input, end to end on real processes (issue 13, items 1-5): a symlink loop
in a source tree, a run that diverges, two launches of one run id, a SIGKILL and a relaunch
that changes the recipe, and the report over what that leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from repro import rundir
from repro.data import ffcv_available

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
REPRO = [sys.executable, "-m", "repro.cli"]

pytestmark = pytest.mark.timeout(600)


def repro(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*REPRO, *map(str, args)], capture_output=True, text=True,
                          timeout=400, cwd=ROOT, **kw)


def q(tmp_path, *more) -> list[str]:
    """The issue's `Q`: quickstart on the folder path, 3 epochs, checkpoints every 5 steps."""
    return [QUICKSTART, "data.format=folder", "schedule.epochs=3",
            "train.checkpoint_every_steps=5", "data.workers=0", "train.log_every_steps=1",
            f"train.output_dir={tmp_path}/runs", *more]


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]  # above it: progress bars of first-use builds
    assert err.startswith("repro ") and ": error: " in err, res.stderr[-3000:]
    return err


def wait_until(condition, what: str, timeout: float = 300):
    """Poll a condition of the real processes (never a fixed sleep in place of it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.skipif(not ffcv_available() and os.environ.get("CI") != "true",
                    reason="FFCV not installed")
def test_a_symlink_loop_is_not_followed_and_no_image_gets_two_labels(tmp_path):
    src = tmp_path / "src"
    for cls in ("a_cls", "b_cls"):
        (src / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (24, 20), (30 * i, 100 if cls == "a_cls" else 200, 0)).save(
                src / cls / f"{i}.jpg")
    os.symlink("..", src / "a_cls" / "loop")  # back up into the tree: 40 levels deep before
    res = repro("data", "convert", src, tmp_path / "out.beton", "--workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    side = json.loads((tmp_path / "out.beton.json").read_text())
    assert side["num_images"] == 16 and side["classes"] == ["a_cls", "b_cls"]
    os.symlink(src / "a_cls" / "0.jpg", src / "b_cls" / "also_a.jpg")  # one file, two classes
    err = one_line(repro("data", "convert", src, tmp_path / "two.beton", "--workers", "1"))
    assert "also_a.jpg: the same image is also under class 'a_cls'" in err
    assert not (tmp_path / "two.beton").exists()


def test_a_diverged_run_keeps_its_last_finite_checkpoint(tmp_path):
    err = one_line(repro("launch", *q(tmp_path, "schedule.epochs=2", "optim.lr=1e6",
                                     "train.checkpoint_every_steps=1"), "--run-id", "nan2"))
    assert "not finite" in err or "loss is" in err
    run = tmp_path / "runs/quickstart/nan2"
    last = run / "checkpoints/last.pt"
    if last.exists():  # a checkpoint was written before the weights broke: it must be finite
        from repro.train import checkpoint

        ck = checkpoint.load(last)
        assert not checkpoint.non_finite(ck["model"])
        assert not checkpoint.non_finite(ck["ema"] or {})
    assert json.loads((run / "results.json").read_text())["status"] == "failed"


def test_one_launch_per_run_id_a_kill_frees_it_and_a_resume_keeps_the_recipe(tmp_path):
    first = subprocess.Popen([*REPRO, "launch", *q(tmp_path), "--run-id", "conc"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = rundir.Run(tmp_path / "runs/quickstart/conc")
    try:
        wait_until(lambda: run.last_checkpoint.exists(), "the first launch's first checkpoint")
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the run directory
        assert first.poll() is None, first.communicate()[1][-3000:]
        holder = run.holder()
        assert holder and holder["pid"] == first.pid
        # 3. A second launch of the same id is refused in one line naming the holder.
        err = one_line(repro("launch", *q(tmp_path), "--run-id", "conc"))
        assert f"another launch of this run is running (pid {first.pid}" in err
        assert run.json("env.json").get("launches", 1) == 1
        os.kill(first.pid, signal.SIGKILL)  # 10. a real kill -9
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert run.holder() is None  # the kernel released the lock with the process
    status = repro("status", run.path)
    assert status.returncode == 0 and "interrupted (resumable)" in status.stdout, status.stdout
    # 4. Changing scientific keys on resume is refused, naming them; nothing is rewritten.
    recipe_before = run.file("recipe.yaml").read_text()
    err = one_line(repro("launch", *q(tmp_path, "schedule.epochs=5", "optim.lr=0.1"),
                         "--run-id", "conc"))
    assert "optim.lr" in err and "schedule.epochs" in err and "differ from its recipe.yaml" in err
    assert run.file("recipe.yaml").read_text() == recipe_before
    # A non-scientific change resumes, and is recorded.
    done = repro("launch", *q(tmp_path, "data.workers=1"), "--run-id", "conc")
    assert done.returncode == 0, done.stderr[-3000:]
    launch = run.json("launch.json")
    assert "data.workers=1" in launch["overrides"]
    assert "data.workers=1" not in launch["earlier_launches"][0]["overrides"]
    steps = [m["step"] for m in run.metrics() if "train/loss" in m]
    assert steps == sorted(set(steps))  # 11. no step logged twice across the kill
    assert run.results().status == "complete" and run.results().epochs_done == 3
    # 5. The report counts this one run once, whatever it went through.
    out = tmp_path / "report.md"
    rep = repro("report", tmp_path / "runs", "--out", out)
    assert rep.returncode == 0, rep.stderr
    assert "(n=1)" in out.read_text()


def test_a_corrupt_checkpoint_is_one_line_and_never_suggests_unsafe_loading(tmp_path):
    run = rundir.Run(tmp_path / "runs/quickstart/bad")
    run.checkpoints.mkdir(parents=True)
    for damage in (os.urandom(4096), b""):
        run.last_checkpoint.write_bytes(damage)
        (run.checkpoints / ".last.pt.123.tmp").write_bytes(b"half")  # 12. a killed write
        err = one_line(repro("launch", *q(tmp_path), "--run-id", "bad"))
        assert f"{run.last_checkpoint}: unreadable checkpoint" in err
        assert "new run id" in err and "weights_only" not in err
        assert not (run.checkpoints / ".last.pt.123.tmp").exists()
    torch.save({"not": "ours"}, run.last_checkpoint)
    assert "not a repro checkpoint" in one_line(repro("launch", *q(tmp_path), "--run-id", "bad"))
