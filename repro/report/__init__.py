"""Reports: markdown tables (pandas -> tabulate) and plots, rendered from saved JSON and run
directories only.

Each saved report is a pair `reports/<name>.json` (the measurement) and `<name>.md` (its
rendering). `RENDERERS` names the module that renders each one, so `repro report` re-renders
them all from their JSON and a report is never edited by hand.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# report name -> module with `render(record: dict) -> str`
RENDERERS = {
    "architecture": "repro.report.architecture",
    "throughput_cpu": "repro.report.throughput",
    "data_loading": "repro.report.data_loading",
    "augment_parity": "repro.report.augment_parity",
}


def rerender(reports_dir: Path) -> list[Path]:
    """Re-render every saved report under `reports_dir` from its JSON; returns the files written."""
    from repro.io import atomic_write_text

    written = []
    for name, module in RENDERERS.items():
        saved = Path(reports_dir) / f"{name}.json"
        if saved.exists():
            render = importlib.import_module(module).render
            written.append(atomic_write_text(saved.with_suffix(".md"),
                                             render(json.loads(saved.read_text()))))
    return written
