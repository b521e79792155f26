"""`repro doctor`: what this machine has for the suite, and the install line for what it lacks."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import shutil
import subprocess
import sys

APT = "apt-get install -y --no-install-recommends"
PIP_CORE = "pip install -e ."
PIP_FFCV = "pip install -e '.[ffcv]'"

# (distribution, import name, required?, install line)
PYTHON_PACKAGES = [
    ("torch", "torch", True, PIP_CORE + "   # torch==2.14.1"),
    ("torchvision", "torchvision", True, PIP_CORE + "   # torchvision==0.29.1"),
    ("timm", "timm", True, PIP_CORE),
    ("pyyaml", "yaml", True, PIP_CORE),
    ("pandas", "pandas", True, PIP_CORE),
    ("tabulate", "tabulate", True, PIP_CORE),
    ("submitit", "submitit", True, PIP_CORE),
    ("tqdm", "tqdm", True, PIP_CORE),
    ("matplotlib", "matplotlib", True, PIP_CORE),
    ("scikit-learn", "sklearn", True, PIP_CORE),
    ("tensorboard", "tensorboard", True, PIP_CORE),
    ("torch-tb-profiler", "torch_tb_profiler", True, PIP_CORE),
    ("ffcv", "ffcv", False, f"{APT} libopencv-dev libturbojpeg0-dev pkg-config && {PIP_FFCV}"),
    ("numba", "numba", False, PIP_FFCV),
    ("opencv-python", "cv2", False, PIP_FFCV),
]

# pkg-config modules FFCV's C extension builds and links against.
FFCV_SYSTEM = [("opencv4", "libopencv-dev"), ("libturbojpeg", "libturbojpeg0-dev")]

SLURM_BINARIES = [("sbatch", "slurm-client"), ("squeue", "slurm-client"),
                  ("slurmctld", "slurmctld"), ("slurmd", "slurmd"), ("munged", "munge"),
                  ("sacct", "slurm-client"), ("slurmdbd", "slurmdbd")]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _imports(module: str) -> str | None:
    """None if `module` imports, else the error in one line."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # a broken install shows up here, not only a missing one
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def checks() -> list[dict]:
    """Every check as {area, item, ok, found, fix, required}."""
    out = [{"area": "python", "item": "python", "ok": sys.version_info >= (3, 10),
            "found": platform.python_version(), "fix": "Python >= 3.10", "required": True}]
    for dist, module, required, fix in PYTHON_PACKAGES:
        ver = _version(dist)
        problem = _imports(module) if ver else "not installed"
        out.append({"area": "python", "item": dist, "ok": problem is None,
                    "found": ver if problem is None else f"{ver or '-'} ({problem})",
                    "fix": fix, "required": required})
    has_pkgconfig = shutil.which("pkg-config") is not None
    for module, apt_pkg in FFCV_SYSTEM:
        found = None
        if has_pkgconfig:
            r = subprocess.run(["pkg-config", "--modversion", module], capture_output=True,
                               text=True)
            found = r.stdout.strip() if r.returncode == 0 else None
        out.append({"area": "ffcv system", "item": module, "ok": found is not None,
                    "found": found or ("missing" if has_pkgconfig else "no pkg-config"),
                    "fix": f"{APT} {apt_pkg} pkg-config", "required": False})
    for binary, apt_pkg in SLURM_BINARIES:
        path = shutil.which(binary)
        out.append({"area": "slurm", "item": binary, "ok": path is not None,
                    "found": path or "missing", "fix": f"{APT} {apt_pkg}", "required": False})
    out.append(_gpu_check())
    return out


def _gpu_check() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i)
                              for i in range(torch.cuda.device_count()))
            found = f"{torch.cuda.device_count()} x {names} (CUDA {torch.version.cuda})"
            return {"area": "gpu", "item": "cuda", "ok": True, "found": found, "fix": "",
                    "required": False}
        found = f"none (torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'})"
    except Exception as e:
        found = f"unknown ({type(e).__name__})"
    return {"area": "gpu", "item": "cuda", "ok": False, "found": found,
            "fix": "an NVIDIA GPU and driver; everything also runs on CPU", "required": False}


def run() -> int:
    """Print the checks; exit 1 only if something the core suite needs is missing."""
    from tabulate import tabulate

    rows = checks()
    def status(r):
        return "ok" if r["ok"] else ("MISSING" if r["required"] else "missing")

    table = [[r["area"], r["item"], status(r), r["found"], "" if r["ok"] else r["fix"]]
             for r in rows]
    print(f"repro doctor  ({platform.platform()}, {platform.machine()})")
    print(tabulate(table, ["area", "item", "status", "found", "install"], tablefmt="github"))
    missing = [r["item"] for r in rows if r["required"] and not r["ok"]]
    optional = [r["item"] for r in rows if not r["required"] and not r["ok"]]
    if optional:
        print(f"optional, missing: {', '.join(optional)} (see the install column)")
    if missing:
        print(f"required, missing: {', '.join(missing)}")
        return 1
    return 0
