"""Slurm through submitit: `repro launch RECIPE --cluster slurm/clusters/X.yaml`.

One task per GPU (per training process on CPU clusters); each task reads its rank and the
rendezvous from submitit's `TorchDistributedEnvironment`, then runs the same trainer as a local
launch. The job is a submitit `Checkpointable`: on preemption or time-out Slurm signals it
`slurm_signal_delay_s` early, submitit requeues the same job, and the trainer resumes the same
run id from its last atomic checkpoint. The code is snapshotted at submission (submitit's
`RsyncSnapshot`), so a requeued job runs what was submitted, not what the checkout holds later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from repro import rundir
from repro.config import key as _f
from repro.config import load_typed
from repro.errors import UserError
from repro.recipe import Recipe, load_recipe


@dataclass(kw_only=True)
class ClusterProfile:
    """A cluster's facts (slurm/clusters/*.yaml; example.yaml documents each key)."""

    partition: str | None = _f(None, "sbatch --partition")
    account: str | None = _f(None, "sbatch --account")
    qos: str | None = _f(None, "sbatch --qos")
    constraint: str | None = _f(None, "sbatch --constraint, e.g. volta32gb")
    gpus_per_node: int = _f(8, "GPUs per node (0: a CPU cluster); a job uses the recipe's "
                             "launch.gpus_per_node of them")
    tasks_per_node: int | None = _f(None, "processes per node on a CPU cluster (default 1); "
                                          "on GPUs it is gpus_per_node")
    cpus_per_task: int = _f(10, "CPU cores per task (data-loading workers live here)")
    mem_gb_per_task: int = _f(40, "host memory per task, GB")
    time_limit_min: int = _f(4320, "per-job time limit; longer runs are requeued and resume")
    signal_delay_s: int = _f(120, "seconds before the limit that Slurm signals the job")
    max_requeues: int = _f(10, "requeues submitit may do for preemption/time-outs")
    sbatch: dict[str, Any] = _f({}, "extra sbatch options, e.g. {exclusive: true}")
    env: dict[str, Any] = _f({}, "environment variables for the job, e.g. NCCL settings")
    setup: list[str] = _f([], "shell lines run before the job, e.g. module load cuda")
    slurm_conf: str | None = _f(None, "SLURM_CONF for this cluster's client (the dev cluster)")


def load_cluster(path: str | os.PathLike) -> ClusterProfile:
    return load_typed(path, ClusterProfile)


class SubmissionError(UserError, RuntimeError):
    """sbatch refused the job, in one line."""


class TrainJob(submitit.helpers.Checkpointable):
    """What every task of a Slurm job runs; requeued as itself on preemption."""

    def __init__(self, recipe: Recipe, run_id: str, smoke: bool = False):
        self.recipe, self.run_id, self.smoke = recipe, run_id, smoke

    def __call__(self) -> str:
        submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
        from repro.train.run import train

        return str(train(self.recipe, smoke=self.smoke, run_id=self.run_id, progress=False))

    def checkpoint(self, *args, **kwargs):
        # The trainer checkpoints atomically every train.checkpoint_every_steps and at every
        # epoch's end; the requeued job resumes the same run id from there.
        return submitit.helpers.DelayedSubmission(TrainJob(self.recipe, self.run_id, self.smoke))


def _absolute(recipe: Recipe, cwd: Path) -> None:
    """Paths in the recipe are relative to where `repro launch` ran, not to the job's cwd."""
    for section, key in (("train", "output_dir"), ("data", "train_path"), ("data", "val_path"),
                         ("distill", "teacher_file"), ("model", "pretrained_file")):
        obj = getattr(recipe, section)
        value = getattr(obj, key)
        if value and not os.path.isabs(value):
            setattr(obj, key, str(cwd / value))


def sbatch_parameters(recipe: Recipe, cluster: ClusterProfile, nodes: int | None) -> dict:
    """submitit's Slurm parameters for this recipe on this cluster."""
    nodes = nodes or recipe.launch.nodes
    gpus = recipe.launch.gpus_per_node if cluster.gpus_per_node else 0
    if gpus > cluster.gpus_per_node:
        raise SubmissionError(f"{recipe.path}: launch.gpus_per_node: {gpus} but the cluster "
                              f"profile has gpus_per_node {cluster.gpus_per_node}")
    tasks = gpus if gpus else (cluster.tasks_per_node or 1)
    params: dict[str, Any] = {
        "nodes": nodes, "tasks_per_node": tasks, "cpus_per_task": cluster.cpus_per_task,
        "mem_gb": cluster.mem_gb_per_task * tasks, "timeout_min": cluster.time_limit_min,
        "slurm_signal_delay_s": cluster.signal_delay_s, "name": f"repro-{recipe.name}",
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[f"slurm_{key}"] = getattr(cluster, key)
    if cluster.setup:
        params["slurm_setup"] = list(cluster.setup)
    if cluster.sbatch:
        params["slurm_additional_parameters"] = dict(cluster.sbatch)
    return params


def _snapshot_root() -> Path | None:
    """The git checkout this code runs from, if any (the snapshot's source)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / ".git").exists() and shutil.which("rsync") else None


def _cluster_env(cluster: ClusterProfile) -> dict[str, str]:
    env = {k: str(v) for k, v in cluster.env.items()}
    if cluster.slurm_conf:
        env["SLURM_CONF"] = cluster.slurm_conf
    return env


def submit(recipe_path: str, overrides: list[str], cluster_path: str, *, nodes: int | None,
           smoke: bool = False, run_id: str | None = None, seeds: list[int] | None = None,
           dry_run: bool = False) -> list[dict]:
    """Submit one job (or an array, one per seed); returns a record per job."""
    cluster = load_cluster(cluster_path)
    cwd = Path.cwd()
    recipes = []
    for seed in seeds or [None]:
        extra = [f"train.seed={seed}"] if seed is not None else []
        r = load_recipe(recipe_path, [*overrides, *extra], smoke=smoke)
        _absolute(r, cwd)
        rid = rundir.choose_run_id(f"{run_id}-s{seed}" if seeds and run_id else run_id,
                                   r.train.run_id, r.train.seed)
        run = rundir.Run.at(r.train.output_dir, r.name, rid)
        run.refuse_if_complete()
        recipes.append((r, rid, run.path))
    params = sbatch_parameters(recipes[0][0], cluster, nodes)
    if dry_run:
        return [{"run_dir": str(p), "sbatch": params, "env": _cluster_env(cluster),
                 "recipe": r.to_dict(), "_recipe": r} for r, _, p in recipes]

    env = _cluster_env(cluster)
    # sbatch exports this environment to the job: a stray RANK/MASTER_ADDR (or a parent job's
    # SLURM_* variables) would leak into it. clean_env() hides them, SLURM_CONF included, so
    # the profile's environment is set inside it.
    with submitit.helpers.clean_env(), _environ(env):
        first = recipes[0][2]
        executor = submitit.AutoExecutor(folder=first.parent / "_slurm" / "%j",
                                         cluster="slurm",
                                         slurm_max_num_timeout=cluster.max_requeues)
        executor.update_parameters(**params)
        snapshot = _snapshot_root()
        code_dir = first.parent / "_code" / first.name
        jobs = []
        ctx = submitit.helpers.RsyncSnapshot(code_dir, root_dir=snapshot) if snapshot \
            else _NoSnapshot()
        try:
            with ctx:
                if len(recipes) == 1:
                    jobs = [executor.submit(TrainJob(recipes[0][0], recipes[0][1], smoke))]
                else:
                    with executor.batch():
                        for r, rid, _ in recipes:
                            jobs.append(executor.submit(TrainJob(r, rid, smoke)))
        except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError,
                subprocess.CalledProcessError) as e:
            detail = " ".join(str(e).split())[-300:]
            raise SubmissionError(f"{cluster_path}: sbatch refused the job ({detail}); check "
                                  "the profile's partition/account and that Slurm's client "
                                  "works here (`sinfo`)") from None
    records = []
    for job, (_, rid, path) in zip(jobs, recipes, strict=True):
        record = {"job_id": job.job_id, "run_dir": str(path), "run_id": rid,
                  "slurm_folder": str(job.paths.folder), "cluster": str(cluster_path),
                  "code": str(code_dir) if snapshot else None, "sbatch": params,
                  "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        rundir.Run(path).write_json("slurm.json", record)
        records.append(record)
    return records


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoSnapshot:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def render_dry_run(records: list[dict]) -> str:
    """What `--cluster ... --dry-run` prints: sbatch parameters, environment, run dirs."""
    import yaml

    from repro.launch.plan import derived_table, path_lines

    r0 = records[0]
    s = r0["sbatch"]
    world = s["nodes"] * s["tasks_per_node"]
    lines = [f"data       {r0['_recipe'].data.format}", *path_lines(r0["_recipe"]), "",
             "# sbatch parameters (submitit)", yaml.safe_dump(s, sort_keys=False),
             f"# distributed: world size {world} = {s['nodes']} node(s) x {s['tasks_per_node']} "
             "task(s); each task takes RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (the first "
             "node) and MASTER_PORT from submitit's TorchDistributedEnvironment",
             derived_table(r0["_recipe"], [world]), ""]
    if r0["env"]:
        lines += ["# job environment", yaml.safe_dump(r0["env"], sort_keys=False)]
    lines += ["# run directories"] + [f"- {r['run_dir']}" for r in records]
    lines += ["", "# resolved recipe", yaml.safe_dump(r0["recipe"], sort_keys=False)]
    return "\n".join(lines)


def slurm_state(job_id: str, slurm_conf: str | None = None) -> str | None:
    """The job's state from sacct (accounting), or None if Slurm cannot be asked."""
    env = dict(os.environ, **({"SLURM_CONF": slurm_conf} if slurm_conf else {}))
    try:
        out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    states = [s.split()[0] for s in out.stdout.split() if s.strip()]
    return states[-1] if states and out.returncode == 0 else None

