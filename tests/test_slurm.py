"""`repro launch --cluster` and `repro status` against a real Slurm (slurm/dev/start.sh):
submission, 2-task DDP, requeue after interruption, a failing job, two nodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from repro import rundir
from repro.cli import main
from repro.launch import slurm
from repro.train import checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
# LayerNorm-only model, ImageFolder path, exact resume: results comparable across launches.
SMALL = ["data.format=folder", "data.workers=0", "model.name=vit_p_1gf",
         "model.kwargs={depth: 1, img_size: 32}", "train.ema=null", "aug.mixup=0",
         "schedule.epochs=2", "train.max_steps=30", "train.checkpoint_every_steps=5",
         "data.batch_size=16", "train.global_batch=32", "train.device=cpu"]


def profile(tmp_path: Path, cluster, **over) -> str:
    """A cluster profile for the dev cluster (slurm/clusters/dev.yaml plus `over`)."""
    data = yaml.safe_load((ROOT / "slurm/clusters/dev.yaml").read_text())
    data.update(slurm_conf=str(cluster.conf), **over)
    path = tmp_path / f"cluster-{len(list(tmp_path.glob('cluster-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def wait(record: dict, cluster) -> str:
    """Block until the job ends; its final Slurm state (from sacct: the cluster keeps
    accounting)."""
    deadline = time.monotonic() + 300
    while (state := slurm.slurm_state(record["job_id"], str(cluster.conf))) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {record['job_id']} still {state}"
        time.sleep(1)  # polling interval; the sacct state is the synchronisation
    return state


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def results(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def test_smoke_run_through_slurm_leaves_a_complete_run_dir(slurm_cluster, tmp_path, capsys):
    cluster = profile(tmp_path, slurm_cluster)
    assert main(["launch", QUICKSTART, "--smoke", "--cluster", cluster,
                 f"train.output_dir={tmp_path}/runs", "--run-id", "smoke"]) == 0
    run = tmp_path / "runs/quickstart/smoke"
    record = json.loads((run / "slurm.json").read_text())
    state = wait(record, slurm_cluster)
    assert state == "COMPLETED", Path(record["stderr"]).read_text()[-3000:]
    r = results(run)
    assert r["smoke"] and r["steps_done"] == 4 and r["final/eval/count"] == 360
    for f in ("recipe.yaml", "env.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert (run / f).is_file()
    env = json.loads((run / "env.json").read_text())
    assert env["slurm"]["SLURM_JOB_ID"] == record["job_id"]
    assert "_code" in env["code"]  # the job ran the snapshot taken at submission
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "COMPLETED" in out and record["job_id"] in out and "incomplete" in out


def test_two_task_ddp_job_matches_one_process(slurm_cluster, tmp_path):
    # Few steps: 1 and 2 processes sum gradients in different orders, and Adam amplifies the
    # float differences of near-zero gradients as training goes on.
    short = [*SMALL, "train.max_steps=5"]
    one = slurm.submit(QUICKSTART, [*short, f"train.output_dir={tmp_path}/one"],
                       profile(tmp_path, slurm_cluster), nodes=1, run_id="r")[0]
    two = slurm.submit(QUICKSTART, [*short, f"train.output_dir={tmp_path}/two"],
                       profile(tmp_path, slurm_cluster, tasks_per_node=2), nodes=1,
                       run_id="r")[0]
    for rec in (one, two):
        assert wait(rec, slurm_cluster) == "COMPLETED"
    assert json.loads((Path(two["run_dir"]) / "env.json").read_text())["world_size"] == 2
    a, b = (checkpoint.load(Path(r["run_dir"]) / "checkpoints/last.pt") for r in (one, two))
    assert a["state"]["step"] == b["state"]["step"] == 5
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_interrupted_job_is_requeued_and_reaches_the_same_weights(slurm_cluster, tmp_path,
                                                                  monkeypatch):
    cluster = profile(tmp_path, slurm_cluster)
    ref = slurm.submit(QUICKSTART, [*SMALL, f"train.output_dir={tmp_path}/ref"], cluster,
                       nodes=1, run_id="r")[0]
    rec = slurm.submit(QUICKSTART, [*SMALL, f"train.output_dir={tmp_path}/int"], cluster,
                       nodes=1, run_id="r")[0]
    last = Path(rec["run_dir"]) / "checkpoints/last.pt"
    deadline = time.monotonic() + 240
    while not last.exists():  # interrupt once the run is under way (a checkpoint exists)
        assert time.monotonic() < deadline, "the job never checkpointed"
        time.sleep(0.5)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))  # scancel, run by submitit
    job = submitit.SlurmJob(folder=rec["slurm_folder"], job_id=rec["job_id"])
    job._interrupt()  # as Slurm does on preemption: signal, checkpoint(), requeue
    assert wait(rec, slurm_cluster) == "COMPLETED"
    assert wait(ref, slurm_cluster) == "COMPLETED"
    env = json.loads((Path(rec["run_dir"]) / "env.json").read_text())
    assert env["requeue_count"] >= 1 and env["launches"] >= 2
    a = checkpoint.load(Path(ref["run_dir"]) / "checkpoints/last.pt")
    b = checkpoint.load(last)
    assert a["state"]["step"] == b["state"]["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_failing_job_is_reported_failed_with_its_error(slurm_cluster, tmp_path, capsys):
    rec = slurm.submit(QUICKSTART, ["model.name=no_such_model", "data.format=folder",
                                    f"train.output_dir={tmp_path}/runs"],
                       profile(tmp_path, slurm_cluster), nodes=1, run_id="bad")[0]
    assert wait(rec, slurm_cluster) == "FAILED"
    capsys.readouterr()
    assert main(["status", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "FAILED" in out
    assert "unknown model 'no_such_model'" in out  # the tail of the job's error log


def test_array_of_seeds_is_one_job_per_seed(slurm_cluster, tmp_path, capsys):
    cluster = profile(tmp_path, slurm_cluster)
    args = ["launch", QUICKSTART, "--smoke", "--cluster", cluster, "--array", "seeds=0,1",
            "data.format=folder", "data.workers=0",  # the FFCV path's jobs: the smoke test's
            f"train.output_dir={tmp_path}/runs", "--run-id", "arr"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arr-s0" in out and "arr-s1" in out and not (tmp_path / "runs").exists()
    assert main(args) == 0
    runs = [tmp_path / f"runs/quickstart/arr-s{s}" for s in (0, 1)]
    records = [json.loads((r / "slurm.json").read_text()) for r in runs]
    assert len({r["job_id"] for r in records}) == 2 and all("_" in r["job_id"] for r in records)
    for rec, seed in zip(records, (0, 1), strict=True):
        assert wait(rec, slurm_cluster) == "COMPLETED"
        assert f"seed: {seed}" in (Path(rec["run_dir"]) / "recipe.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["launch", QUICKSTART, "--array", "seeds=0,1"])  # arrays need --cluster


def test_completed_run_is_not_overwritten(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "runs/quickstart/done"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": "complete"}))
    code = main(["launch", QUICKSTART, "--cluster", profile(tmp_path, slurm_cluster),
                 f"train.output_dir={tmp_path}/runs", "--run-id", "done"])
    assert code == 1 and "has completed" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


def test_two_node_job_runs_one_rank_on_each_node(slurm_two_nodes, tmp_path):
    rec = slurm.submit(QUICKSTART, [*SMALL, "train.max_steps=4",
                                    f"train.output_dir={tmp_path}/runs"],
                       profile(tmp_path, slurm_two_nodes), nodes=2, run_id="two")[0]
    assert wait(rec, slurm_two_nodes) == "COMPLETED"
    env = json.loads((Path(rec["run_dir"]) / "env.json").read_text())
    assert env["world_size"] == 2 and sorted(env["rank_hosts"]) == ["n1", "n2"]


def sacct_times(job_id: str, cluster) -> tuple[str, str]:
    """(Start, End) of a job as sacct records them (ISO seconds; they sort as times)."""
    out = cluster.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "Start,End").stdout
    start, end = out.strip().splitlines()[0].split("|")
    return start, end


def test_a_chain_is_submitted_stage_by_stage_and_the_child_waits_for_its_parent(
        slurm_cluster, tmp_path, capsys):
    """Issue 14: `repro launch child --cluster` submits the missing parent first and the child
    with --dependency=afterok; the child starts after the parent ends, from the parent's run;
    a second child does not rerun the completed parent."""
    from test_stages import write_chain

    child = write_chain(tmp_path)
    cluster = profile(tmp_path, slurm_cluster)
    out = f"train.output_dir={tmp_path}/runs"
    assert main(["launch", str(child), out, "--cluster", cluster, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "stage 1/2  " in dry and "no run yet: runs first" in dry
    assert "- stage 2/2: " in dry and "after the previous job succeeds" in dry
    assert not (tmp_path / "runs").exists()  # a dry run submits and writes nothing

    assert main(["launch", str(child), out, "--cluster", cluster, "--run-id", "ft1"]) == 0
    printed = capsys.readouterr().out
    (parent,) = rundir.find_runs(tmp_path / "runs/pre", markers=("slurm.json",))
    pre, ft = parent.json("slurm.json"), rundir.Run(tmp_path / "runs/ft/ft1").json("slurm.json")
    assert ft["after"] == {"job_id": pre["job_id"], "run_dir": str(parent.path)}
    assert f"submitted job {ft['job_id']}" in printed and \
        f"after job {pre['job_id']} succeeds" in printed
    assert "--dependency=afterok:" + pre["job_id"] in Path(
        ft["slurm_folder"], f"{ft['job_id']}_submission.sh").read_text()
    assert wait(ft, slurm_cluster) == "COMPLETED" and wait(pre, slurm_cluster) == "COMPLETED"
    assert sacct_times(ft["job_id"], slurm_cluster)[0] >= \
        sacct_times(pre["job_id"], slurm_cluster)[1]  # the child started after the parent ended
    r = rundir.Run(ft["run_dir"]).results()
    assert r.complete and r.canonical and r.extra["init"]["run"] == str(parent.path)

    # The parent completed: a second child is one job, with no dependency.
    assert main(["launch", str(child), out, "--cluster", cluster, "--run-id", "ft2"]) == 0
    assert capsys.readouterr().out.count("submitted job") == 1
    ft2 = rundir.Run(tmp_path / "runs/ft/ft2").json("slurm.json")
    assert ft2["after"] is None and wait(ft2, slurm_cluster) == "COMPLETED"
    assert len(rundir.find_runs(tmp_path / "runs/pre", markers=("slurm.json",))) == 1
    assert rundir.Run(ft2["run_dir"]).results().extra["init"]["run"] == str(parent.path)


def test_a_failed_parent_leaves_its_child_never_run(slurm_cluster, tmp_path, capsys):
    from test_stages import write_chain

    child = write_chain(tmp_path)
    pre = tmp_path / "pre.yaml"
    pre.write_text(pre.read_text() + "model: {name: no_such_model}\n")  # fails in the job
    assert main(["launch", str(child), f"train.output_dir={tmp_path}/runs", "--cluster",
                 profile(tmp_path, slurm_cluster), "--run-id", "ft"]) == 0
    capsys.readouterr()
    ft = rundir.Run(tmp_path / "runs/ft/ft").json("slurm.json")
    (parent,) = rundir.find_runs(tmp_path / "runs/pre", markers=("slurm.json",))
    assert wait(parent.json("slurm.json"), slurm_cluster) == "FAILED"
    assert wait(ft, slurm_cluster) == "CANCELLED"  # --kill-on-invalid-dep: never started
    assert sacct_times(ft["job_id"], slurm_cluster)[0] in ("None", "Unknown")
    assert sorted(p.name for p in Path(ft["run_dir"]).iterdir()) == ["slurm.json"]
    assert main(["status", str(tmp_path / "runs")]) == 0
    status = capsys.readouterr().out
    assert f"never ran: job {parent.json('slurm.json')['job_id']} it depends on is FAILED" \
        in status
    assert "unknown model 'no_such_model'" in status  # the parent's error, from its log


def test_a_refused_chain_submission_leaves_nothing_behind(slurm_cluster, tmp_path, capsys):
    """sbatch refuses the first stage (no such partition): one line of ours, and no run
    directory, code snapshot or submitit folder is left."""
    from test_stages import write_chain

    child = write_chain(tmp_path)
    code = main(["launch", str(child), f"train.output_dir={tmp_path}/runs", "--cluster",
                 profile(tmp_path, slurm_cluster, partition="no_such_partition")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after sbatch's own words
    assert code == 1 and last.startswith("repro launch: error: ") and "sbatch refused" in last
    assert not (tmp_path / "runs").exists()
