"""Shared test set-up: a private cache for built-in datasets, so tests never touch ~/.cache."""

from __future__ import annotations

import os

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


class DevCluster:
    """A real Slurm started by slurm/dev/start.sh in `dir` (stopped and purged at the end)."""

    def __init__(self, dir: str, nodes: int):
        self.dir, self.nodes = dir, nodes
        self.conf = f"{dir}/etc/slurm.conf"

    def start(self):
        import subprocess
        from pathlib import Path

        script = Path(__file__).resolve().parents[1] / "slurm/dev/start.sh"
        proc = subprocess.run(["bash", str(script), "--dir", self.dir, "--nodes",
                               str(self.nodes)], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"start.sh failed:\n{proc.stdout}\n{proc.stderr}"
        conf = subprocess.run(["bash", "-c", f"source {self.dir}/env.sh && echo $SLURM_CONF"],
                              capture_output=True, text=True).stdout.strip()
        self.conf = conf or self.conf
        return self

    def stop(self):
        import subprocess
        from pathlib import Path

        script = Path(__file__).resolve().parents[1] / "slurm/dev/stop.sh"
        subprocess.run(["bash", str(script), "--dir", self.dir, "--purge"], capture_output=True,
                       timeout=120)


def _cluster(tmp_path_factory, nodes: int):
    import shutil

    if shutil.which("slurmctld") is None and os.environ.get("CI") != "true":
        pytest.skip("Slurm is not installed (make install installs it; CI requires it)")
    # Unix socket paths are limited to ~107 characters: keep the directory short.
    import tempfile

    d = tempfile.mkdtemp(prefix=f"rs{nodes}-", dir="/tmp")
    cluster = DevCluster(d, nodes).start()
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    cluster = _cluster(tmp_path_factory, 1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    cluster = _cluster(tmp_path_factory, 2)
    yield cluster
    cluster.stop()
