"""`top_ops.md` of a `repro profile` run: the top operators of each profiled cycle, rendered
from the run's `profile.json` (written by repro.train.profile)."""

from __future__ import annotations

from tabulate import tabulate


def table(cycle: dict) -> str:
    """One cycle's tables (by self CPU time; and by self CUDA time on GPUs)."""
    text = tabulate(cycle["by_cpu"], cycle["head"], tablefmt="github", floatfmt=".3f")
    if cycle.get("by_cuda"):
        text += "\n\nBy self CUDA time:\n\n" + tabulate(cycle["by_cuda"], cycle["head"],
                                                         tablefmt="github", floatfmt=".3f")
    return text


def render(record: dict) -> str:
    s = record["schedule"]
    lines = [
        f"# Top operators: {record['name']} ({record['model']})"
        + (" --smoke: built-in digits, a few steps" if record["smoke"] else ""),
        "",
        f"Device {record['device']} (world size {record['world_size']}), micro-batch "
        f"{record['micro_batch']} x {record['accum_steps']} accumulation = "
        f"{record['micro_batch'] * record['accum_steps']} images per step per device, "
        f"resolution {record['resolution']}, amp {record['amp']}, channels_last "
        f"{record['channels_last']}, compile {record['compile']}, data {record['data_format']}. "
        f"Schedule: wait {s['wait']}, warm-up {s['warmup']}, active {s['active']}, repeat "
        f"{s['repeat']}. Times are totals over the {s['active']} active steps of a cycle; "
        "sorted by self CPU time.",
    ]
    if record.get("teacher_note"):
        lines += ["", f"Note: the teacher is untrained ({record['teacher_file']} not found); "
                  "its cost, not its weights, is what is measured."]
    cycles = record["top_ops"]
    for i, cycle in enumerate(cycles, 1):
        title = f"## Cycle {i} of {s['repeat']}\n\n" if s["repeat"] > 1 else ""
        lines += ["", title + table(cycle)]
    return "\n".join(lines) + "\n"
