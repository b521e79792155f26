"""Other processes' share of the machine, read from /proc: snapshots of CPU seconds (the
machine's, the hypervisor's steal, this process tree's), the shares between two snapshots, and
a wait for a quiet machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

QUIET_PCT = 5.0  # a window in which other processes took more of the machine is disturbed


def _proc_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of one process, all its threads (0 if it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(task: Path) -> list[str]:
    """The child pids of one of our threads (none if the thread has ended meanwhile)."""
    try:
        return (task / "children").read_text().split()
    except OSError:
        return []


def cpu_snapshot() -> dict:
    """CPU seconds so far: the machine's, the hypervisor's steal, and this process tree's."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    live = [c for task in Path("/proc/self/task").iterdir() for c in _children(task)]
    reaped = os.times().children_user + os.times().children_system
    return {"t": time.perf_counter(), "machine": (user + nice + system + irq + softirq) / tick,
            "steal": steal / tick,
            "ours": _proc_cpu_s("self") + sum(map(_proc_cpu_s, live)) + reaped}


def cpu_use(before: dict, after: dict) -> dict:
    """Shares of the machine's cores between two snapshots: ours, other processes', stolen."""
    capacity = max(after["t"] - before["t"], 1e-9) * (os.cpu_count() or 1)
    ours = after["ours"] - before["ours"]
    other = after["machine"] - before["machine"] - ours
    return {"ours_pct": 100 * ours / capacity, "other_pct": max(0.0, 100 * other / capacity),
            "steal_pct": max(0.0, 100 * (after["steal"] - before["steal"]) / capacity)}


def others_pct(use: dict) -> float:
    """Other processes' and the hypervisor's share of the machine."""
    return use["other_pct"] + use["steal_pct"]


def wait_for_quiet(timeout_s: float, quiet_pct: float = QUIET_PCT, sample_s: float = 0.5) -> dict:
    """Sleep until other processes take at most `quiet_pct` % over `sample_s`, or time runs out."""
    start = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(sample_s)
        share = others_pct(cpu_use(before, cpu_snapshot()))
        waited = time.perf_counter() - start
        if share <= quiet_pct or waited + sample_s > timeout_s:
            return {"waited_s": waited, "quiet": share <= quiet_pct, "others_pct": share}
