"""`repro verify`: every paper row's parameters and FLOPs, counted, against the paper's table."""

from __future__ import annotations

import math

import pandas as pd
import timm
import torch

from repro import papers
from repro.measure.complexity import count

# Tolerances, relative to the paper's number (DESIGN.md, "Conventions that matter for honesty").
PARAMS_TOL = 0.01
GMACS_TOL = 0.05

# timm's own paper-like CoAtNets (strided depthwise down-sampling, avg pooling): compared with
# the paper's rows in a section of their own, never gating.
TIMM_VARIANTS = {f"coatnet_{i}_224": f"coatnet/CoAtNet-{i}" for i in range(5)}


def _rel(measured: float, paper) -> float | None:
    if paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return None
    return measured / paper - 1


def _verdict(params_rel, gmacs_rel) -> str:
    checks = [abs(r) <= tol for r, tol in ((params_rel, PARAMS_TOL), (gmacs_rel, GMACS_TOL))
              if r is not None]
    if not checks:
        return "no paper number"
    return "ok" if all(checks) else "OUT OF TOLERANCE"


def check_rows(paper: str | None = None, row: str | None = None) -> pd.DataFrame:
    """Count every row that names a model; one result row per paper row."""
    rows = papers.load_rows(paper)
    if row is not None:
        rows = rows[rows["row"].str.lower() == row.lower()]
        if rows.empty:
            papers.get_row(f"{paper or '?'}/{row}")  # raises with suggestions
    rows = rows[rows["timm_model"].notna()]
    out = []
    for r in rows.itertuples(index=False):
        c = count(r.timm_model, int(r.resolution))
        # Some tables print one #Params per model, taken at another resolution (coatnet.yaml).
        params_res = int(r.params_resolution) if pd.notna(r.params_resolution) else c.resolution
        cp = count(r.timm_model, params_res)
        params_rel = _rel(cp.params_m, r.params_m)
        gmacs_rel = _rel(c.gmacs, r.gmacs)
        out.append({
            "id": r.id, "paper": r.paper, "model": r.timm_model, "resolution": int(r.resolution),
            "baseline": bool(r.baseline), "params_m_paper": r.params_m,
            "params_m": round(cp.params_m, 3), "params": cp.params, "params_rel": params_rel,
            "params_resolution": params_res, "params_m_at_resolution": round(c.params_m, 3),
            "gmacs_paper": r.gmacs, "gmacs": round(c.gmacs, 3), "gmacs_rel": gmacs_rel,
            "verdict": _verdict(params_rel, gmacs_rel), "source": r.source,
            "caveat": r.caveat if isinstance(r.caveat, str) else "",
        })
    return pd.DataFrame(out)


def check_timm_variants() -> pd.DataFrame:
    """timm's `coatnet_N_224` against the paper's CoAtNet-N rows (and Table 9 where it has one)."""
    out = []
    for model, row_id in TIMM_VARIANTS.items():
        c = count(model, 224)
        for rid in (row_id, f"{row_id}-strided-dconv"):
            try:
                r = papers.get_row(rid)
            except papers.PaperTableError:
                continue
            params_rel, gmacs_rel = _rel(c.params_m, r["params_m"]), _rel(c.gmacs, r.get("gmacs"))
            out.append({"model": model, "id": rid, "params_m_paper": r["params_m"],
                        "params_m": round(c.params_m, 3), "params_rel": params_rel,
                        "gmacs_paper": r.get("gmacs"), "gmacs": round(c.gmacs, 3),
                        "gmacs_rel": gmacs_rel, "verdict": _verdict(params_rel, gmacs_rel),
                        "source": r["source"]})
    return pd.DataFrame(out)


def _records(df: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]


def run(paper: str | None = None, row: str | None = None) -> dict:
    """Everything `repro verify` reports, as one JSON-able record."""
    data = {
        "meta": {"params_tol": PARAMS_TOL, "gmacs_tol": GMACS_TOL, "torch": torch.__version__,
                 "timm": timm.__version__, "counted_on": "meta device, batch 1, eval mode"},
        "rows": _records(check_rows(paper, row)),
    }
    if paper is None and row is None:
        data["timm_variants"] = _records(check_timm_variants())
    return data


def failures(data: dict) -> list[str]:
    """Model rows (not baselines) out of tolerance: these make `repro verify` exit 1."""
    return [r["id"] for r in data["rows"]
            if not r["baseline"] and r["verdict"] == "OUT OF TOLERANCE"]
