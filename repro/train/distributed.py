"""DDP set-up from the environment torchrun, `repro launch --nproc` or Slurm/submitit provide.

Rank, world size and rendezvous come from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (submitit's `TorchDistributedEnvironment().export()` sets the same variables), so
one code path serves a laptop, a node and a cluster. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when there is no process group

    @property
    def distributed(self) -> bool:
        """A process group exists (DDP wraps the model, collectives run): more than one
        process, or one process set up with `group=True`."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when present; each process takes the GPU of its local rank."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device_preference: str = "auto", group: bool = False) -> DistEnv:
    """Initialise the process group if WORLD_SIZE > 1; a single process needs none, unless
    `group` asks for one anyway (benchmarks/gpu_check.py runs NCCL and DDP on one GPU; the
    rendezvous is MASTER_ADDR / MASTER_PORT, as for more processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_preference, local)
    if world == 1 and not group:
        return DistEnv(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local, device, backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum floats over ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64,
                     device=env.device if env.backend == "nccl" else "cpu")
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    """An unused TCP port on localhost, for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
