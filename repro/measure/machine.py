"""Facts of the machine a figure or a run comes from: host, CPU, memory, GPU, versions, the code's
git commit. One collector for `repro bench`, the benchmarks and a run's env.json."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

RUN_DISTS = ("torch", "torchvision", "timm", "ffcv")  # a training run's env.json
_BUILD_TAGGED = ("torch", "torchvision")  # their __version__ carries the build, e.g. +cu130


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def machine(device: str = "cpu") -> dict:
    """Host, CPU model, cores, memory (and the GPU when `device` is cuda and has one)."""
    info = {"host": socket.gethostname(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "os": platform.platform()}
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
        # a virtual machine: steal time is others' load
        info["hypervisor"] = " hypervisor" in Path("/proc/cpuinfo").read_text()
    except (OSError, StopIteration):
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}")
    return info


def _version(dist: str) -> str | None:
    if dist in _BUILD_TAGGED:
        try:
            return importlib.import_module(dist).__version__
        except ImportError:
            return None
    try:  # the distribution's: importing ffcv costs seconds, and its __version__ is stale
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def versions(dists=("torch", "timm"), missing: str | None = None) -> dict:
    """Python's version and each distribution's (`missing` for one not installed)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        found = _version(dist)
        out[dist] = missing if found is None else found
    return out


def torch_backends() -> dict:
    """The math back-ends torch runs on here (CPU kernels' ISA, MKL, oneDNN, CUDA, cuDNN)."""
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available()}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return out


def thread_env() -> dict:
    """The OpenMP/MKL variables that are set: they change multi-thread timings on a shared
    machine."""
    return {var: os.environ[var] for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                             "MKL_NUM_THREADS", "KMP_BLOCKTIME")
            if var in os.environ}


def git_commit() -> dict:
    """The commit of the code that runs, and whether its working tree had changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def run_facts(device: torch.device | str) -> dict:
    """A training run's machine facts: `versions`, `git` and `hardware` (env.json's keys)."""
    device = torch.device(device)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"versions": versions(RUN_DISTS), "git": git_commit(),
            "hardware": {**machine(device.type), "torch_threads": torch.get_num_threads(),
                         "gpus": gpus, "device": str(device)}}
