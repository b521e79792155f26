"""Local launches: in this process, or N processes on this machine (torchrun-style, gloo on CPU,
NCCL on GPUs), each initialised from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from repro import rundir
from repro.recipe import Recipe
from repro.train import distributed


def _worker(rank: int, world: int, port: int, recipe: Recipe, smoke: bool, run_id: str):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from repro.train.run import train

    train(recipe, smoke=smoke, run_id=run_id, progress=rank == 0)


def launch(recipe: Recipe, *, nproc: int = 1, smoke: bool = False,
           run_id: str | None = None) -> Path:
    """Train `recipe` with `nproc` local processes; returns the run directory."""
    from repro.train.run import train

    run_id = rundir.choose_run_id(run_id, recipe.train.run_id, recipe.train.seed)
    if nproc == 1:
        return train(recipe, smoke=smoke, run_id=run_id)
    torch.multiprocessing.spawn(_worker, args=(nproc, distributed.free_port(), recipe, smoke,
                                               run_id), nprocs=nproc, join=True)
    return rundir.Run.at(recipe.train.output_dir, recipe.name, run_id).path
