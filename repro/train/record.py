"""What the trainer records in its run directory (layout: `repro.rundir`): the environment of
each launch (env.json), the launch files, and the metrics log (metrics.jsonl + TensorBoard).
Metric keys are slash-namespaced (`train/loss`, `eval_ema/top1`, ...)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from repro.measure.machine import run_facts
from repro.rundir import Run


def environment(world_size: int, device: torch.device, hosts: list[str] | None = None) -> dict:
    """Versions, code, hardware and scheduler facts of this launch."""
    return {
        **run_facts(device),
        "world_size": world_size,
        "rank_hosts": hosts or [socket.gethostname()],  # the host of each rank, in rank order
        "code": str(Path(__file__).resolve().parents[1]),  # the repro package that ran
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                                             "SLURM_ARRAY_TASK_ID", "SLURM_NODELIST")
                  if k in os.environ},
        "requeue_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def write_launch_files(run: Run, recipe, derived, *, smoke: bool, world_size: int,
                       device, hosts: list[str] | None = None, init: dict | None = None) -> None:
    """recipe.yaml (resolved), launch.json (source, overrides, derived), env.json."""
    from dataclasses import asdict

    header = f"# resolved from {recipe.path}" + (
        f" with overrides: {' '.join(recipe.overrides)}" if recipe.overrides else "") + "\n"
    run.write_launch(header + recipe.to_yaml(), {
        "recipe": recipe.path, "name": recipe.name, "paper_row": recipe.row_id,
        "overrides": recipe.overrides, "canonical": recipe.canonical and not smoke,
        "non_canonical_keys": recipe.non_canonical_keys, "smoke": smoke,
        "derived": asdict(derived), "init": init,
    }, environment(world_size, device, hosts))


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
