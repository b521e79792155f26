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
import itertools
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


LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING",
               "CONFIGURING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE"}


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


@dataclass
class Planned:
    """One job of a submission: a stage's recipe, its run, and the job it waits for."""

    recipe: Recipe
    run_id: str
    run: Path
    seed: int
    after: dict | None = None  # {"job_id", "run_dir"} of the parent stage's job
    live: dict | None = None  # an already queued job of this stage: depended on, not resubmitted


def plan(recipe_path: str, overrides: list[str], *, smoke: bool = False,
         run_id: str | None = None, seeds: list[int] | None = None) -> list[list[Planned]]:
    """Per seed, the jobs to submit, first stage first: the stages a fine-tune still lacks
    (`init.from`; parents that completed are not rerun, a parent already queued is waited for)
    and the recipe itself, each next one to start from its parent's run (`after`)."""
    from repro.train import stages

    cwd = Path.cwd()
    plans = []
    for seed in seeds or [None]:
        extra = [f"train.seed={seed}"] if seed is not None else []
        r = load_recipe(recipe_path, [*overrides, *extra], smoke=smoke)
        _absolute(r, cwd)
        rid = rundir.choose_run_id(f"{run_id}-s{seed}" if seeds and run_id else run_id,
                                   r.train.run_id, r.train.seed)
        run = rundir.Run.at(r.train.output_dir, r.name, rid)
        run.refuse_if_complete()
        jobs = []
        for stage in stages.missing(r, smoke):
            _absolute(stage, cwd)
            live = queued_run(stage, smoke)
            path = Path(live["run_dir"]) if live else rundir.Run.at(
                stage.train.output_dir, stage.name,
                rundir.choose_run_id(None, stage.train.run_id, stage.train.seed)).path
            jobs.append(Planned(stage, path.name, path, stage.train.seed, live=live))
        jobs.append(Planned(r, rid, run.path, r.train.seed))
        for parent, child in itertools.pairwise(jobs):
            child.after = {"job_id": parent.live["job_id"] if parent.live else None,
                           "run_dir": str(parent.run)}
        plans.append(jobs)
    return plans


def queued_run(recipe: Recipe, smoke: bool) -> dict | None:
    """A run of `recipe` with its seed already submitted and pending or running (its
    slurm.json), so that a second chain waits for it instead of training it twice."""
    for run in rundir.find_runs(Path(recipe.train.output_dir) / recipe.name,
                                markers=("slurm.json",)):
        record = run.json("slurm.json")
        if record.get("seed") != recipe.train.seed or record.get("smoke", smoke) != smoke:
            continue
        conf = profile_conf(record.get("cluster"))
        if slurm_state(record["job_id"], conf) in LIVE_STATES:
            return record
    return None


def profile_conf(cluster_path: str | None) -> str | None:
    """The SLURM_CONF a submission's cluster profile names, if it still loads."""
    try:
        return load_cluster(cluster_path).slurm_conf if cluster_path else None
    except Exception:  # the profile moved: ask Slurm with the caller's environment
        return None


def submit(recipe_path: str, overrides: list[str], cluster_path: str, *, nodes: int | None,
           smoke: bool = False, run_id: str | None = None, seeds: list[int] | None = None,
           dry_run: bool = False) -> list[dict]:
    """Submit the recipe (an array of jobs with `seeds`), each seed's missing parent stages
    first, each next job with `--dependency=afterok:<parent job>`; returns a record per job,
    parents first (jobs already queued are not in it)."""
    cluster = load_cluster(cluster_path)
    plans = plan(recipe_path, overrides, smoke=smoke, run_id=run_id, seeds=seeds)
    env = _cluster_env(cluster)
    if dry_run:
        return [{"run_dir": str(j.run), "sbatch": sbatch_parameters(j.recipe, cluster, nodes),
                 "env": env, "recipe": j.recipe.to_dict(), "_recipe": j.recipe,
                 "after": j.after, "queued": j.live, "stage": f"{i + 1}/{len(jobs)}",
                 "smoke": smoke}
                for jobs in plans for i, j in enumerate(jobs)]

    child = plans[0][-1].run
    code_dir = child.parent / "_code" / child.name
    records: list[dict] = []
    # Directories this submission creates (the code snapshot, submitit's folders): removed
    # again if sbatch refuses the first job, so that a failed submission leaves nothing.
    made = [p for p in dict.fromkeys(
        d for jobs in plans for j in jobs for d in (Path(j.recipe.train.output_dir), j.run.parent))
        if not p.exists()]
    # sbatch exports this environment to the job: a stray RANK/MASTER_ADDR (or a parent job's
    # SLURM_* variables) would leak into it. clean_env() hides them, SLURM_CONF included, so
    # the profile's environment is set inside it.
    with submitit.helpers.clean_env(), _environ(env):
        snapshot = _snapshot_root()
        ctx = submitit.helpers.RsyncSnapshot(code_dir, root_dir=snapshot) if snapshot \
            else _NoSnapshot()
        try:
            with ctx:
                if all(len(jobs) == 1 for jobs in plans):  # no chain: one job, or one array
                    records = _submit_batch([j for (j,) in plans], cluster, cluster_path, nodes,
                                            smoke, snapshot and code_dir)
                else:
                    for jobs in plans:
                        records += _submit_chain(jobs, cluster, cluster_path, nodes, smoke,
                                                 snapshot and code_dir)
        except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError,
                subprocess.CalledProcessError) as e:
            if not records:
                for path in [code_dir, *made]:
                    shutil.rmtree(path, ignore_errors=True)
            detail = " ".join(str(e).split())[-300:]
            raise SubmissionError(f"{cluster_path}: sbatch refused the job ({detail}); check "
                                  "the profile's partition/account and that Slurm's client "
                                  "works here (`sinfo`)") from None
    return records


def _executor(j: Planned, cluster: ClusterProfile, nodes: int | None,
              after: str | None = None) -> tuple[submitit.AutoExecutor, dict]:
    executor = submitit.AutoExecutor(folder=j.run.parent / "_slurm" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=cluster.max_requeues)
    params = sbatch_parameters(j.recipe, cluster, nodes)
    if after:
        # A parent that fails (or is cancelled) makes the dependency unsatisfiable: Slurm then
        # cancels the child at once instead of leaving it pending forever.
        params["slurm_additional_parameters"] = {
            **params.get("slurm_additional_parameters", {}),
            "dependency": f"afterok:{after}", "kill_on_invalid_dep": "yes"}
    executor.update_parameters(**params)
    return executor, params


def _submit_batch(jobs: list[Planned], cluster, cluster_path, nodes, smoke, code
                  ) -> list[dict]:
    executor, params = _executor(jobs[0], cluster, nodes)
    if len(jobs) == 1:
        submitted = [executor.submit(TrainJob(jobs[0].recipe, jobs[0].run_id, smoke))]
    else:
        with executor.batch():
            submitted = [executor.submit(TrainJob(j.recipe, j.run_id, smoke)) for j in jobs]
    return [_record(job, j, params, cluster_path, code, smoke)
            for job, j in zip(submitted, jobs, strict=True)]


def _submit_chain(jobs: list[Planned], cluster, cluster_path, nodes, smoke, code) -> list[dict]:
    records, previous = [], None
    for j in jobs:
        if j.live:  # already queued by an earlier submission: the next stage waits for it
            previous = j.live["job_id"]
            continue
        if j.after is not None:
            j.after["job_id"] = previous
            j.recipe.init.run = j.after["run_dir"]  # exactly the run its dependency writes
        executor, params = _executor(j, cluster, nodes, after=previous)
        job = executor.submit(TrainJob(j.recipe, j.run_id, smoke))
        records.append(_record(job, j, params, cluster_path, code, smoke))
        previous = job.job_id
    return records


def _record(job, j: Planned, params: dict, cluster_path: str, code, smoke: bool) -> dict:
    """slurm.json: what `repro status` reads to find the job, its logs and its parent's job."""
    record = {"job_id": job.job_id, "run_dir": str(j.run), "run_id": j.run_id, "seed": j.seed,
              "smoke": smoke, "recipe": j.recipe.path, "after": j.after,
              "slurm_folder": str(job.paths.folder), "cluster": str(cluster_path),
              "code": str(code) if code else None, "sbatch": params,
              "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    rundir.Run(j.run).write_json("slurm.json", record)
    return record


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
    """What `--cluster ... --dry-run` prints: the chain, the jobs, sbatch parameters,
    environment, run dirs."""
    import yaml

    from repro.launch.plan import derived_table, path_lines, stage_lines

    child = records[-1]
    s = child["sbatch"]
    world = s["nodes"] * s["tasks_per_node"]
    lines = [f"data       {child['_recipe'].data.format}", *path_lines(child["_recipe"]),
             *stage_lines(child["_recipe"], child["smoke"]), "", "# jobs"]
    for r in records:
        if r["queued"]:
            lines.append(f"- stage {r['stage']}: already queued as job "
                         f"{r['queued']['job_id']} ({r['run_dir']}): waited for, not submitted")
            continue
        after = r["after"]
        wait = "" if after is None else (
            f", after job {after['job_id']} succeeds" if after["job_id"]
            else ", after the previous job succeeds")
        lines.append(f"- stage {r['stage']}: {r['_recipe'].path} -> {r['run_dir']} "
                     f"({r['sbatch']['nodes']} node(s) x {r['sbatch']['tasks_per_node']} "
                     f"task(s){wait})")
    if any(r["after"] for r in records):
        lines.append("  (a next job is submitted with sbatch --dependency=afterok:<its parent's "
                     "job> --kill-on-invalid-dep=yes: a failed stage cancels the rest)")
    lines += ["", "# sbatch parameters (submitit), the last stage's",
              yaml.safe_dump(s, sort_keys=False),
              f"# distributed: world size {world} = {s['nodes']} node(s) x "
              f"{s['tasks_per_node']} task(s); each task takes RANK, LOCAL_RANK, WORLD_SIZE, "
              "MASTER_ADDR (the first node) and MASTER_PORT from submitit's "
              "TorchDistributedEnvironment",
              derived_table(child["_recipe"], [world]), ""]
    if child["env"]:
        lines += ["# job environment", yaml.safe_dump(child["env"], sort_keys=False)]
    lines += ["# run directories"] + [f"- {r['run_dir']}" for r in records]
    lines += ["", "# resolved recipe", yaml.safe_dump(child["recipe"], sort_keys=False)]
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

