"""Interleaved timing, for `repro bench` and the benchmarks.

Each item is warmed up, then timed over `repeats` rounds of one window each (a fixed number of
steps), the order rotating every round so that drift on a shared machine falls on every item
alike. Other processes' CPU use is read from /proc over every window; a disturbed window is
re-timed once the machine is quiet, within a budget. Figures are medians of the windows used,
min and max beside them; ratios are of medians, with the range of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from repro.measure.cpuload import QUIET_PCT, cpu_snapshot, cpu_use, others_pct, wait_for_quiet


@dataclass
class Plan:
    """How long to warm up and time, and how to treat disturbed windows."""

    warmup_s: float = 3.0
    window_s: float = 3.0
    repeats: int = 5
    attempts: int = 3  # tries per window when other processes disturb it
    retry_budget_s: float = 60.0  # most extra seconds spent waiting and re-timing per run
    quiet_pct: float = QUIET_PCT
    warmup_steps: int = 2  # at least this many warm-up steps, however long they take


@dataclass
class Item:
    """One thing timed: `run(k)` does k steps and returns the units done (images, FLOPs), or a
    dict of them ("units") and facts to keep with the window (keys other than a window's own)."""

    key: str
    run: Callable[[int], float | dict]
    device: str = "cpu"
    unit: str = "images"
    window_s: float | None = None  # None: the plan's window
    group: str | None = None  # items of a group time the same number of steps per window
    info: dict = field(default_factory=dict)


def _run(item: Item, k: int) -> tuple[float, dict]:
    """`k` steps of an item: the units done and the facts it reported beside them."""
    out = item.run(k)
    if isinstance(out, dict):
        facts = dict(out)
        return facts.pop("units"), facts
    return out, {}


def _window(item: Item, k: int) -> dict:
    """Time `k` steps of one item, with the machine's load over the same interval."""
    if item.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = cpu_snapshot()
    t0 = time.perf_counter()
    units, facts = _run(item, k)
    seconds = time.perf_counter() - t0
    w = {"steps": k, "units": units, "seconds": seconds, "rate": units / seconds,
         **cpu_use(before, cpu_snapshot()), **facts}
    if item.device == "cuda":
        w["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return w


def _warm_up(item: Item, plan: Plan, log) -> dict:
    """Run an item until `plan.warmup_s` and `plan.warmup_steps` are both reached; calibrate
    its steps per window on the second half of the warm-up steps."""
    t0, units, times, facts = time.perf_counter(), 0, [], {}
    while len(times) < plan.warmup_steps or time.perf_counter() - t0 < plan.warmup_s:
        t1 = time.perf_counter()
        done, facts = _run(item, 1)
        times.append(time.perf_counter() - t1)
        units += done
    seconds, step_s = time.perf_counter() - t0, statistics.median(times[len(times) // 2:])
    log(f"  warm-up {item.key:34s} {len(times):4d} steps, {step_s * 1e3:8.1f} ms/step")
    return {"warmup": {"steps": len(times), "seconds": seconds, "step_s": step_s,
                       "units": units, **facts},
            "steps_per_window": max(1, round((item.window_s or plan.window_s) / step_s)),
            "windows": []}


def interleave(items: list[Item], plan: Plan, log=print) -> tuple[dict, float]:
    """Warm every item up, then `plan.repeats` rounds of one timed window each, order rotating.

    A window during which other processes took more than `plan.quiet_pct` % of the machine is
    re-timed (after waiting for quiet) up to `plan.attempts` times while `plan.retry_budget_s`
    lasts; the last attempt is used if quiet, otherwise the least disturbed one. Every attempt
    is kept. Returns each item's record (warm-up, steps per window, windows) and the budget left.
    """
    raw = {item.key: _warm_up(item, plan, log) for item in items}
    groups: dict = {}
    for item in items:  # a group times the same steps: its first item's calibration
        if item.group is not None:
            raw[item.key]["steps_per_window"] = groups.setdefault(
                item.group, raw[item.key]["steps_per_window"])
    budget = plan.retry_budget_s
    for r in range(plan.repeats):
        for item in items[r % len(items):] + items[:r % len(items)]:
            k = raw[item.key]["steps_per_window"]
            tries = []
            while True:
                w = _window(item, k)
                w.update(round=r, attempt=len(tries), used=False,
                         disturbed=others_pct(w) > plan.quiet_pct)
                tries.append(w)
                if not w["disturbed"] or len(tries) >= plan.attempts or budget <= 0:
                    break
                t_retry = time.perf_counter()
                w["then_waited"] = wait_for_quiet(min(10.0, budget), plan.quiet_pct)
                budget -= time.perf_counter() - t_retry + w["seconds"]
            use = tries[-1] if not tries[-1]["disturbed"] else min(tries, key=others_pct)
            use["used"] = True
            raw[item.key]["windows"] += tries
            unit = "img/s" if item.unit == "images" else "GFLOP/s"
            scale = 1 if item.unit == "images" else 1e-9
            log(f"  round {r} {item.key:34s} {use['rate'] * scale:9.1f} {unit}  (others "
                f"{others_pct(use):4.1f} %" + (f", {len(tries)} tries" if len(tries) > 1
                                               else "") + ")")
    return raw, budget


def used_windows(record: dict) -> list[dict]:
    """The windows a figure rests on, one per round."""
    return sorted((w for w in record["windows"] if w["used"]), key=lambda w: w["round"])


def summarise(record: dict) -> dict:
    """Median, min and max rate of the used windows, and their disturbance."""
    ws = used_windows(record)
    rates = [w["rate"] for w in ws]
    out = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
           "windows": len(ws), "steps_per_window": record["steps_per_window"],
           "window_s": statistics.median(w["seconds"] for w in ws),
           "ours_pct": statistics.median(w["ours_pct"] for w in ws),
           "others_pct_max": max(others_pct(w) for w in ws),
           "disturbed_windows": sum(w["disturbed"] for w in ws),
           "retries": sum(1 for w in record["windows"] if w["attempt"] > 0)}
    mem = [w["memory/max_allocated_gib"] for w in ws if "memory/max_allocated_gib" in w]
    if mem:
        out["memory/max_allocated_gib"] = max(mem)
    return out


def ratio(raw: dict, top: str, bottom: str) -> dict:
    """One item's median rate over another's, and the range of per-round ratios."""
    a, b = used_windows(raw[top]), used_windows(raw[bottom])
    paired = [x["rate"] / y["rate"] for x, y in zip(a, b, strict=True)]
    med = statistics.median(w["rate"] for w in a) / statistics.median(w["rate"] for w in b)
    return {"of_medians": med, "per_round_min": min(paired), "per_round_max": max(paired)}


def other_load(raw: dict, keys: list[str], quiet_pct: float) -> dict:
    """How disturbed the used windows were, and how many were re-timed."""
    ws = [w for k in keys for w in raw[k]["windows"]]
    used = [w for w in ws if w["used"]]
    shares = [others_pct(w) for w in used]
    return {"timed_windows": len(used), "attempts": len(ws),
            "retried": sum(w["attempt"] > 0 for w in ws),
            "disturbed_used": sum(w["disturbed"] for w in used),
            "disturbed_first_try": sum(w["disturbed"] for w in ws if w["attempt"] == 0),
            "max_pct": max(shares), "median_pct": statistics.median(shares),
            "quiet": not any(w["disturbed"] for w in used), "threshold_pct": quiet_pct}
