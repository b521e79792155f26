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
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from repro.errors import UserError
from repro.io import atomic_write_json, atomic_write_text

RESULTS_SCHEMA = 2  # 2: `seed` recorded (runs of schema 1 read it from recipe.yaml)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MARKERS = ("results.json", "launch.json", "slurm.json")  # any of them makes a run directory


class RunError(UserError, ValueError):
    """A run id or run directory that cannot be used."""


class RunExists(UserError, RuntimeError):
    """The run id names a run that has finished: relaunching would overwrite it."""


def new_run_id(seed: int) -> str:
    """The default run id: launch time and seed, e.g. `20261202-154501-s0`."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-s{seed}"


def check_run_id(run_id: str) -> str:
    """A run id is one path component of letters, digits, `.`, `_` and `-`."""
    if not RUN_ID.fullmatch(run_id or ""):
        raise RunError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                       "starting with a letter or digit)")
    return run_id


def choose_run_id(given: str | None, recipe_run_id: str | None, seed: int) -> str:
    """`--run-id`, else the recipe's `train.run_id`, else a new one from the time and seed."""
    return check_run_id(given or recipe_run_id or new_run_id(seed))


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
    return json.loads(path.read_text()) if path.exists() else {}


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
        f = self.path / "metrics.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines() if x] if f.exists() else []

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

    # writing and guarding
    def write_launch(self, recipe_yaml: str, launch: dict, env: dict) -> None:
        """recipe.yaml, launch.json and env.json; a relaunch (resume) keeps the launch history."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
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
