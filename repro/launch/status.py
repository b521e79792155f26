"""`repro status`: where runs are — local or Slurm — from their run directories (and sacct)."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from repro import rundir
from repro.launch.slurm import FAILED_STATES, LIVE_STATES, profile_conf, slurm_state


def find_runs(path: Path) -> list[Path]:
    """Run directories at or below `path` (launched here or submitted to Slurm)."""
    return [r.path for r in rundir.find_runs(path, markers=("launch.json", "slurm.json"))]


def describe(run: Path) -> dict:
    """One run's state, as `repro status` shows it."""
    r = rundir.Run(run)
    results, slurm, env = r.json("results.json"), r.json("slurm.json"), r.json("env.json")
    metrics = r.last_metrics()
    state = conf = None
    if slurm:
        conf = profile_conf(slurm.get("cluster"))
        state = slurm_state(slurm["job_id"], conf)
    status = results.get("status") or ("submitted" if slurm else "started")
    after = (slurm.get("after") or {}).get("job_id")
    if after and not results and (state in FAILED_STATES or state == "PENDING"):
        # A stage of a chain that has not started: say what it waits for, or why it never ran.
        parent = slurm_state(after, conf) or "state unknown"
        status = (f"waiting for job {after} ({parent})" if state == "PENDING" else
                  f"never ran: job {after} it depends on is {parent}")
    elif state in FAILED_STATES or status == "failed":
        status = "failed"
    elif state == "COMPLETED" and status == "running":
        status = "incomplete"
    elif status in ("running", "started") and state not in LIVE_STATES and r.holder() is None:
        status = "interrupted (resumable)"  # no live launch holds it: killed, not running
    return {
        "run": str(run), "status": status, "job": slurm.get("job_id", "local"),
        "after": after or "-",
        "slurm_state": state or "-", "requeues": env.get("requeue_count", 0),
        "epoch": f"{results.get('epochs_done', metrics.get('epoch', 0))}/"
                 f"{results.get('epochs_planned', '?')}",
        "step": results.get("steps_done", metrics.get("step", 0)),
        "loss": metrics.get("train/loss"), "top1": metrics.get("eval/top1"),
        "ema_top1": metrics.get("eval_ema/top1"), "stderr": slurm.get("stderr"),
    }


def _tail(path: str | None, n: int = 15) -> list[str]:
    if not path or not Path(path).exists():
        return []
    return Path(path).read_text(errors="replace").splitlines()[-n:]


def render(rows: list[dict]) -> str:
    cols = ["run", "status", "job", "after", "slurm_state", "requeues", "epoch", "step", "loss",
            "top1", "ema_top1"]
    out = [tabulate([[r[c] if r[c] is not None else "-" for c in cols] for r in rows], cols,
                    tablefmt="simple", floatfmt=".3g")]
    for r in rows:
        if r["status"] == "failed":
            tail = _tail(r["stderr"])
            if tail:
                out += ["", f"--- {r['run']}: last lines of {r['stderr']} ---", *tail]
    return "\n".join(out)
