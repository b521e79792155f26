"""Shared test set-up: a private cache for built-in datasets, so tests never touch ~/.cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def repro_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("repro-cache")
    old = os.environ.get("REPRO_CACHE")
    os.environ["REPRO_CACHE"] = str(path)  # inherited by spawned ranks and Slurm jobs
    yield path
    if old is None:
        os.environ.pop("REPRO_CACHE", None)
    else:
        os.environ["REPRO_CACHE"] = old



# ------------------------------------------------------------------------------------------
# A real Slurm on localhost (slurm/dev/start.sh), one per session and node count.

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "slurm/dev/start.sh"
STOP = ROOT / "slurm/dev/stop.sh"
SBIN_PATH = f"/usr/sbin:/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "unshare")


@dataclass
class DevCluster:
    dir: Path
    env: dict[str, str]  # os.environ + what DIR/env.sh exports

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, (
            f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}{res.stderr}")
        return res


def _script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REPRO_SLURM_DIR"}
    return subprocess.run(["bash", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _skip_unless_possible() -> None:
    """Skip on a developer machine without Slurm; never on CI, where `make test` installs it."""
    missing = [d for d in DAEMONS if shutil.which(d, path=SBIN_PATH) is None]
    problem = "the dev Slurm cluster needs root" if os.geteuid() != 0 else (
        f"Slurm packages not installed (missing {', '.join(missing)}); `make install` installs "
        "them" if missing else None)
    if problem and os.environ.get("CI") == "true":
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


def _client_env(env_sh: Path) -> dict[str, str]:
    # A clean environment: no SLURM_* from an enclosing job (srun would join that allocation).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["PATH"] = SBIN_PATH
    for line in env_sh.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    return env


def _cluster(tmp_path_factory, name: str, nodes: int):
    _skip_unless_possible()
    # Unix socket paths are limited to ~107 bytes: keep DIR short.
    path = tmp_path_factory.mktemp(name)
    own = len(str(path)) > 60
    if own:
        path = Path(tempfile.mkdtemp(prefix=f"repro-{name}-", dir="/tmp"))
    try:
        started = time.monotonic()
        res = _script(str(START), "--nodes", str(nodes), "--dir", str(path))
        assert res.returncode == 0, f"start.sh failed:\n{res.stdout}\n{res.stderr}"
        print(f"start.sh --nodes {nodes}: {time.monotonic() - started:.1f}s")
        env_sh = Path(res.stdout.strip().splitlines()[-1])  # start.sh prints env.sh's path last
        assert env_sh == path / "env.sh"
        yield DevCluster(path, _client_env(env_sh))
    finally:
        res = _script(str(STOP), "--dir", str(path), "--purge")
        assert res.returncode == 0, f"stop.sh failed:\n{res.stdout}\n{res.stderr}"
        if own:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node cluster (node `localhost`), up for the whole session."""
    yield from _cluster(tmp_path_factory, "sd", nodes=1)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """A two-node cluster (nodes n1 and n2 on this machine)."""
    yield from _cluster(tmp_path_factory, "sd2n", nodes=2)


# ------------------------------------------------------------------------------------------
# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). Every test
# that uses a dev Slurm cluster goes to one worker, so a session starts each cluster once and
# the cluster tests never race each other's daemons; they are collected first, so that worker
# starts on them while the other takes the rest, beginning with the GPU check's --tiny run
# (one module fixture, minutes). The tests of `repro verify`'s counts (one module fixture, a
# minute of FLOP counting) share a worker too.

SLURM_FIXTURES = {"slurm_cluster", "slurm_two_nodes"}

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # Each worker (and the processes it starts) gets its share of the cores for torch's
    # intra-op threads: on 2 cores, one each, not two pools of two contending for them.
    import torch

    _threads = max(1, (os.cpu_count() or 1) //
                   int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def _group(item) -> str | None:
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & SLURM_FIXTURES or item.module.__name__ == "test_slurm_dev":
        return "slurm"
    if "tiny" in fixtures:  # benchmarks/gpu_check.py --tiny, run once (a module fixture)
        return "gpu_check"
    return "verify" if "verified" in fixtures else None


FIRST = ("slurm", "gpu_check")  # the longest groups start first, one on each worker


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # stable: otherwise as collected
    items.sort(key=lambda item: FIRST.index(g) if (g := _group(item)) in FIRST else len(FIRST))


LOST_GROUPS = pytest.StashKey[str]()


def pytest_collection_finish(session):
    """On an xdist worker under `--dist loadgroup`, a group that xdist did not write into the
    node id is silently not a group (pytest-dev/pytest-xdist#1386): its tests then fail, saying
    so, instead of running on several workers (a Slurm cluster started on each)."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup")):
        return
    lost = [i.nodeid for i in session.items
            if i.get_closest_marker("xdist_group") and "@" not in i.nodeid.rpartition("]")[2]]
    if lost:
        session.config.stash[LOST_GROUPS] = (
            f"--dist loadgroup is not grouping ({lost[0]} has no @group): this pytest and "
            "pytest-xdist do not work together (pytest-dev/pytest-xdist#1386); `make install` "
            "installs the versions pinned in pyproject.toml")


def pytest_runtest_setup(item):
    lost = item.config.stash.get(LOST_GROUPS, None)
    if lost and item.get_closest_marker("xdist_group"):
        pytest.fail(lost, pytrace=False)
