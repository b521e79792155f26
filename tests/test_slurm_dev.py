"""slurm/dev/start.sh and stop.sh: a real Slurm (with accounting) on localhost, 1 and 2 nodes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import START, STOP, DevCluster, _script

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_for_state(cluster: DevCluster, job_id: str, timeout: float = 60) -> str:
    """Poll sacct until the job is in a terminal state (bounded)."""
    deadline = time.monotonic() + timeout
    state = ""
    while state not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {state or '?'} after {timeout}s"
        time.sleep(0.2)  # polling interval; the sacct state is the synchronisation
        out = cluster.run("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State").stdout
        state = out.strip().split(" ")[0]  # "CANCELLED by 0" -> CANCELLED
    return state


def pid_files(cluster: DevCluster) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((cluster.dir / "run").glob("*.pid"))}


@pytest.mark.slurm
def test_sbatch_job_completes_and_sacct_reports_it(slurm_cluster, tmp_path):
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
    assert nodes == ["localhost", "idle"]
    out = slurm_cluster.run("sbatch", "--parsable", "-o", f"{tmp_path}/%j.out",
                          "--wrap", "hostname").stdout
    job_id = out.strip().split(";")[0]
    assert wait_for_state(slurm_cluster, job_id) == "COMPLETED"
    assert (tmp_path / f"{job_id}.out").read_text().strip() == socket.gethostname()


@pytest.mark.slurm
def test_start_again_is_a_noop(slurm_cluster):
    before = pid_files(slurm_cluster)
    conf_mtime = slurm_cluster.conf.stat().st_mtime_ns
    assert len(before) == 5  # munged, mariadbd, slurmdbd, slurmctld, slurmd-localhost
    res = _script(str(START), "--dir", str(slurm_cluster.dir), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "already running" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == str(slurm_cluster.dir / "env.sh")
    assert pid_files(slurm_cluster) == before
    assert slurm_cluster.conf.stat().st_mtime_ns == conf_mtime
    # Another node count on a running cluster is refused, and changes nothing either.
    res = _script(str(START), "--nodes", "2", "--dir", str(slurm_cluster.dir), timeout=60)
    assert res.returncode == 3
    assert "running with 1 node(s), not 2" in res.stderr
    assert pid_files(slurm_cluster) == before


@pytest.mark.slurm
def test_two_nodes_run_one_step_each_and_resolve_node_names(slurm_two_nodes):
    out = slurm_two_nodes.run(
        "srun", "-N2", "--ntasks-per-node=1", "sh", "-c",
        'echo "$(hostname) $(getent hosts n1 | cut -d" " -f1) $(getent hosts n2 | cut -d" " -f1)"',
    ).stdout
    assert sorted(out.splitlines()) == ["n1 127.0.0.1 127.0.0.1", "n2 127.0.0.1 127.0.0.1"]
    assert socket.gethostname() not in ("n1", "n2")  # the host's own hostname is untouched


@pytest.mark.slurm
def test_stop_is_idempotent_and_start_restarts(slurm_two_nodes):
    pids = [int(v) for v in pid_files(slurm_two_nodes).values()]
    assert len(pids) == 6  # ... slurmd-n1, slurmd-n2
    res = _script(str(STOP), "--dir", str(slurm_two_nodes.dir))
    assert res.returncode == 0, res.stderr
    assert pid_files(slurm_two_nodes) == {}
    for pid in pids:  # gone, or a zombie not yet reaped by this machine's init
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    res = _script(str(STOP), "--dir", str(slurm_two_nodes.dir))
    assert res.returncode == 0 and "Nothing was running" in res.stdout
    res = _script(str(START), "--nodes", "2", "--dir", str(slurm_two_nodes.dir))
    assert res.returncode == 0, res.stderr
    out = slurm_two_nodes.run("srun", "-N2", "hostname").stdout
    assert sorted(out.split()) == ["n1", "n2"]


@pytest.mark.slurm
def test_dev_profile_finds_the_cluster_start_sh_made(slurm_cluster, monkeypatch):
    from repro.launch.slurm import load_cluster

    monkeypatch.setenv("REPRO_SLURM_DIR", str(slurm_cluster.dir))
    profile = load_cluster(Path(__file__).resolve().parents[1] / "slurm/clusters/dev.yaml")
    assert Path(profile.slurm_conf) == slurm_cluster.conf and slurm_cluster.conf.is_file()
