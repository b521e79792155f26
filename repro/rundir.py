"""The run directory, `<output_dir>/<recipe>/<run-id>/`: the one owner of its layout and schema.

    recipe.yaml     the resolved recipe (overrides applied), with its source in a header line
    launch.json     source recipe, overrides, canonical or not, derived values
    env.json        versions, code, hardware and scheduler facts of each launch
    metrics.jsonl   one JSON object per logged step or evaluation (TensorBoard in tb/)
    checkpoints/    last.pt (resume) and best.pt
    results.json    the run's typed record (`Results`), with a schema version
    slurm.json      the submission, for runs launched with --cluster
    eval.json       `repro eval`'s record of the run's checkpoint

The trainer writes these files through this module, and every reader (`repro report`,
`repro status`, `repro eval`, the launchers) reads them through it, so the layout, the run-id
rule and the completed-run guard exist once. Pure standard library: reading a run costs no torch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from repro.errors import UserError
from repro.io import atomic_write_json, atomic_write_text

RESULTS_SCHEMA = 2  # 2: `seed` recorded (runs of schema 1 read it from recipe.yaml)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MARKERS = ("results.json", "launch.json", "slurm.json")  # any of them makes a run directory
# A paper's released weights evaluated here (`repro eval --row`): <output_dir>/_released/
# <paper>/<row>/eval.json, kept apart from runs (it holds none of the markers).
RELEASED = "_released"


def released_dir(output_dir: str | os.PathLike, row_id: str) -> Path:
    paper, _, row = row_id.partition("/")
    return Path(output_dir) / RELEASED / paper / row


class RunError(UserError, ValueError):
    """A run id or run directory that cannot be used."""


class RunExists(UserError, RuntimeError):
    """The run id names a run that has finished: relaunching would overwrite it."""


class RunBusy(UserError, RuntimeError):
    """Another live launch holds the run directory."""


LOCK = ".lock"  # held (fcntl.flock) by the launch that runs the directory; see Run.hold


def new_run_id(seed: int) -> str:
    """The default run id: launch time and seed, e.g. `20261202-154501-s0`."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-s{seed}"


def check_run_id(run_id: str) -> str:
    """A run id is one path component of letters, digits, `.`, `_` and `-`."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise RunError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                       "starting with a letter or digit)")
    return run_id


def choose_run_id(given: str | None, recipe_run_id: str | None, seed: int) -> str:
    """`--run-id`, else the recipe's `train.run_id`, else a new one from the time and seed.
    A given id is checked as it is: an empty one is an error, not a new run."""
    for run_id in (given, recipe_run_id):
        if run_id is not None:
            return check_run_id(run_id)
    return new_run_id(seed)


@dataclass
class Results:
    """results.json: what a run is and how far it got. Metrics (`final/eval/top1`,
    `best/eval/top1`, ...) are slash-namespaced keys in `metrics`, flat in the file."""

    run_id: str
    recipe: str
    status: str  # running | complete | incomplete | failed
    seed: int | None = None
    paper_row: str | None = None
    canonical: bool = False
    smoke: bool = False
    non_canonical_keys: list = field(default_factory=list)
    epochs_planned: int | None = None
    epochs_done: int | None = None
    steps_planned: int | None = None
    steps_done: int | None = None
    world_size: int = 1
    device: str | None = None
    wall_time_s: float = 0.0
    params_m: float | None = None
    gmacs: float | None = None
    resolution: int | None = None
    extra: dict = field(default_factory=dict)  # the other recorded settings and facts
    metrics: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict:
        d = {"schema_version": RESULTS_SCHEMA}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "metrics"):
                d[f.name] = getattr(self, f.name)
        return {**d, **self.extra, **self.metrics}

    @classmethod
    def from_json(cls, d: dict, *, seed: int | None = None) -> Results:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "metrics"}
        kw = {k: d[k] for k in known if k in d}
        kw.setdefault("seed", seed)
        kw.setdefault("run_id", "")
        kw.setdefault("recipe", "")
        kw.setdefault("status", "unknown")
        rest = {k: v for k, v in d.items() if k not in known and k != "schema_version"}
        metrics = {k: v for k, v in rest.items() if k.startswith(("final/", "best/"))}
        extra = {k: v for k, v in rest.items() if k not in metrics}
        return cls(**kw, extra=extra, metrics=metrics)


def _json(path: Path) -> dict:
    """A JSON object from `path` ({} when absent); anything else is a one-line RunError."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); the file is damaged "
                       "(move it away to read the rest of the run)") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file. A torn last line (a kill during a write) is ignored;
    a damaged line elsewhere is a one-line RunError naming it."""
    return _read_jsonl(path)[0]


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(records, whether the file ends in a torn line), the file read once."""
    if not path.exists():
        return [], False
    text = path.read_text(errors="replace")
    torn = bool(text) and not text.endswith("\n")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if torn and i == len(lines) - 1:
                break  # the torn last line
            raise RunError(f"{path}:{i + 1}: not a JSON record; the file is damaged") from None
    return records, torn


class Run:
    """One run directory: its paths, and its files read back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def at(cls, output_dir: str, recipe_name: str, run_id: str) -> Run:
        return cls(Path(output_dir) / recipe_name / check_run_id(run_id))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # paths
    @property
    def recipe_name(self) -> str:
        """The recipe's name: runs live at <output_dir>/<recipe>/<run-id>."""
        return self.path.parent.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    # reading
    def json(self, name: str) -> dict:
        """launch.json, env.json, slurm.json, eval.json: {} when absent."""
        return _json(self.path / name)

    def results(self) -> Results | None:
        d = _json(self.path / "results.json")
        if not d:
            return None
        return Results.from_json(d, seed=self.recipe_seed() if "seed" not in d else None)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def last_metrics(self) -> dict:
        """The latest value of each metric key."""
        last: dict = {}
        for m in self.metrics():
            last.update(m)
        return last

    def recipe_seed(self) -> int | None:
        """train.seed of the resolved recipe.yaml (runs of results schema 1 do not record it)."""
        import yaml

        f = self.path / "recipe.yaml"
        if not f.exists():
            return None
        return (yaml.safe_load(f.read_text()) or {}).get("train", {}).get("seed")

    # holding: one live launch per run directory
    def hold(self) -> RunLock:
        """Hold the run directory for this launch, or raise RunBusy naming the holder.

        An `fcntl.flock` on `.lock`: the kernel releases it when the process ends, however it
        ends (a kill -9 included), so a dead launch never leaves it held, and a Slurm requeue's
        new process takes it again."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.read(fd, 4096))
            os.close(fd)
            raise RunBusy(f"{self.path}: another launch of this run is running ({holder}); "
                          "wait for it or stop it, then relaunch to resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": dt.datetime.now().isoformat(timespec="seconds"),
                                 "slurm_job": os.environ.get("SLURM_JOB_ID")}).encode())
        return RunLock(fd)

    def holder(self) -> dict | None:
        """The live launch holding the run directory, or None (the run is not running)."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.read(fd, 4096) or b"{}")
            except json.JSONDecodeError:
                return {}
        finally:
            os.close(fd)  # closing drops a lock taken here
        return None

    def remove_stale_temporaries(self) -> list[Path]:
        """Half-written files a kill left (`.NAME.*.tmp` of repro.io's atomic writes)."""
        stale = [f for d in (self.path, self.checkpoints) if d.is_dir()
                 for f in d.glob(".*.tmp")]
        for f in stale:
            f.unlink(missing_ok=True)
        return stale

    def trim_metrics(self, step: int) -> int:
        """Drop metric records after optimizer step `step` (logged after the checkpoint a
        resume starts from, so they would be logged twice) and a torn last line; returns how
        many records were dropped."""
        f = self.path / "metrics.jsonl"
        records, torn = _read_jsonl(f)
        keep = [r for r in records if r.get("step", 0) <= step]
        if len(keep) < len(records) or torn:
            atomic_write_text(f, "".join(json.dumps(r) + "\n" for r in keep))
        return len(records) - len(keep)

    # writing and guarding
    def write_launch(self, recipe_yaml: str, launch: dict, env: dict) -> None:
        """recipe.yaml, launch.json and env.json; a relaunch (resume) keeps the launch history."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        previous = self.json("launch.json")
        if previous:  # a relaunch: its non-scientific changes (workers, paths) stay on record
            launch["earlier_launches"] = [*previous.pop("earlier_launches", []), previous]
        atomic_write_json(self.path / "launch.json", launch)
        old = self.json("env.json")
        if old:
            env["launches"] = old.get("launches", 1) + 1
            env["first_launch"] = old.get("first_launch", old)
            env["first_launch"].pop("first_launch", None)
        atomic_write_json(self.path / "env.json", env)

    def write_json(self, name: str, record: dict) -> None:
        """A record of the run (slurm.json, eval.json), written whole or not at all."""
        atomic_write_json(self.path / name, record)

    def write_results(self, results: Results) -> None:
        atomic_write_json(self.path / "results.json", results.to_json())

    def refuse_if_complete(self) -> None:
        """A completed run is never relaunched: its results would be overwritten."""
        r = self.results()
        if r is not None and r.complete:
            raise RunExists(f"{self.path}: this run has completed; launch without a run id for "
                            "a new run (it would be overwritten otherwise)")


class RunLock:
    """A held run directory; `release()` (or the process's end) lets it go."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _holder_text(raw: bytes) -> str:
    try:
        h = json.loads(raw or b"{}")
    except json.JSONDecodeError:
        h = {}
    if not h:
        return "its holder is starting"
    job = f", Slurm job {h['slurm_job']}" if h.get("slurm_job") else ""
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}{job}"


def find_runs(paths: list[Path] | Path, markers: tuple[str, ...] = MARKERS) -> list[Run]:
    """Run directories at or below each path (holding one of `markers`), sorted. The copies of
    the code that Slurm jobs run from (`_code/`) are not runs."""
    found: set[Path] = set()
    for p in [paths] if isinstance(paths, Path) else paths:
        p = Path(p)
        if any((p / m).exists() for m in markers):
            found.add(p)
        elif p.is_dir():
            found |= {f.parent for m in markers for f in p.rglob(m) if "_code" not in f.parts}
    return [Run(p) for p in sorted(found)]
