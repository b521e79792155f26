"""The run directory: `runs/<recipe>/<run-id>/` with the resolved recipe, how it was launched,
the environment, metrics (JSON lines + TensorBoard), checkpoints and results.

Reports are built from these files only, so each one says what it is: `results.json` carries a
schema version; metric keys are slash-namespaced (`train/loss`, `eval_ema/top1`, ...).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from repro.io import atomic_write_json, atomic_write_text

RESULTS_SCHEMA = 1


def new_run_id(seed: int) -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-s{seed}"


def run_dir(output_dir: str, recipe_name: str, run_id: str) -> Path:
    return Path(output_dir) / recipe_name / run_id


def read_results(path: Path) -> dict | None:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.exists() else None


def _git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def environment(world_size: int, device: torch.device, hosts: list[str] | None = None) -> dict:
    """Versions, code, hardware and scheduler facts of this launch."""
    import timm
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "timm": timm.__version__}
    try:  # the distribution's version: importing ffcv would cost seconds of numba compiling
        versions["ffcv"] = importlib.metadata.version("ffcv")
    except importlib.metadata.PackageNotFoundError:
        versions["ffcv"] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "versions": versions,
        "git": _git_commit(),
        "hardware": {"host": socket.gethostname(), "cpu": cpu, "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "gpus": gpus,
                     "device": str(device)},
        "world_size": world_size,
        "rank_hosts": hosts or [socket.gethostname()],  # the host of each rank, in rank order
        "code": str(Path(__file__).resolve().parents[1]),  # the repro package that ran
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                                             "SLURM_ARRAY_TASK_ID", "SLURM_NODELIST")
                  if k in os.environ},
        "requeue_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def write_launch_files(path: Path, recipe, derived, *, smoke: bool, world_size: int,
                       device, hosts: list[str] | None = None) -> None:
    """recipe.yaml (resolved), launch.json (source, overrides, derived), env.json."""
    from dataclasses import asdict

    header = f"# resolved from {recipe.path}" + (
        f" with overrides: {' '.join(recipe.overrides)}" if recipe.overrides else "") + "\n"
    atomic_write_text(path / "recipe.yaml", header + recipe.to_yaml())
    atomic_write_json(path / "launch.json", {
        "recipe": recipe.path, "name": recipe.name, "paper_row": recipe.row_id,
        "overrides": recipe.overrides, "canonical": recipe.canonical and not smoke,
        "non_canonical_keys": recipe.non_canonical_keys, "smoke": smoke,
        "derived": asdict(derived),
    })
    env_path = path / "env.json"
    env = environment(world_size, device, hosts)
    if env_path.exists():  # a resumed run: keep the history of launches
        old = json.loads(env_path.read_text())
        env["launches"] = old.get("launches", 1) + 1
        env["first_launch"] = old.get("first_launch", old)
        env["first_launch"].pop("first_launch", None)
    atomic_write_json(env_path, env)


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step or epoch) and TensorBoard scalars."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.path = path / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path / "tb"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and "/" in k:
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_results(path: Path, results: dict) -> None:
    atomic_write_json(path / "results.json", {"schema_version": RESULTS_SCHEMA, **results})
