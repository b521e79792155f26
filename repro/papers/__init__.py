"""The four papers' published tables as data: one YAML per paper, every number with its source.

A row is addressed as ``paper/row`` (e.g. ``earlyconv/ViT_C-18GF``); recipes name one, and reports
set measured numbers beside it. FLOPs are stored as ``gmacs`` (G multiply-adds).
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import yaml

from repro.errors import UserError

__all__ = [
    "PAPERS_DIR",
    "PaperTableError",
    "anchor_speeds",
    "get_row",
    "load_paper",
    "load_rows",
    "paper_info",
    "paper_keys",
]

PAPERS_DIR = Path(__file__).resolve().parent

PRETRAIN_DATA = ("in1k", "in21k", "in22k", "jft300m", "jft3b")

# Field names, written as one string each so the lists stay readable.
_PAPER_REQUIRED = tuple("key title authors year arxiv venue code units caveats rows".split())
_PAPER_OPTIONAL = tuple("code_note flops_unit gmacs_per_unit omitted timing_protocol".split())
_ROW_REQUIRED = tuple(
    "row model timm_model resolution pretrain_data params_m gmacs top1 source".split()
)
_ROW_OPTIONAL = tuple(
    "baseline params_resolution pretrain_detail flops_printed top1_real top1_v2 top1_by_epochs "
    "top1_tol epochs finetune_epochs pretrain_cost throughput notes caveat not_reproducible"
    .split()
)
# Pretraining data no one outside its owner can obtain: every row trained on it is marked not
# reproducible with this reason (a row may also be marked by hand: `not_reproducible: reason`).
PRIVATE_DATA = {
    "jft300m": "pretrained on JFT-300M, Google's internal dataset, which is not public",
    "jft3b": "pretrained on JFT-3B, Google's internal dataset, which is not public",
}
_NUMBER_FIELDS = tuple("params_m gmacs top1 top1_real top1_v2 top1_tol flops_printed".split())
_THROUGHPUT_FIELDS = tuple(
    "device device_type batch threads amp images_per_s train_min_per_epoch source".split()
)
_THROUGHPUT_VALUES = ("images_per_s", "train_min_per_epoch")

# Columns of load_rows(), in order; nested fields (throughput, top1_by_epochs) stay in get_row().
_COLUMNS = tuple(
    "id paper row model timm_model baseline resolution params_resolution pretrain_data "
    "pretrain_detail params_m gmacs top1 top1_real top1_v2 top1_tol epochs finetune_epochs "
    "source caveat notes not_reproducible".split()
)


class PaperTableError(UserError, ValueError):
    """A paper table is malformed, or a ``paper/row`` id names nothing."""


def _dir(directory: str | Path | None) -> Path:
    return PAPERS_DIR if directory is None else Path(directory).resolve()


def paper_keys(directory: str | Path | None = None) -> list[str]:
    """The keys of the papers with a table (``coatnet``, ``cvt``, ...), sorted."""
    return sorted(p.stem for p in _dir(directory).glob("*.yaml"))


def load_paper(key: str, directory: str | Path | None = None) -> dict[str, Any]:
    """One paper's table, parsed and validated; ``directory`` overrides PAPERS_DIR (tests)."""
    path = _dir(directory) / f"{key.lower()}.yaml"
    if not path.is_file():
        known = ", ".join(paper_keys(directory)) or "none"
        raise PaperTableError(
            f"unknown paper {key!r}: no {path.name} in {path.parent} (known: {known})"
        )
    # A deep copy, so a caller editing the result cannot change what the next caller reads.
    return copy.deepcopy(_load_validated(path))


def load_rows(paper: str | None = None, directory: str | Path | None = None) -> pd.DataFrame:
    """All rows (or one paper's) as a flat table, one line per printed row, in file order."""
    keys = [paper.lower()] if paper is not None else paper_keys(directory)
    records = []
    for key in keys:
        for row in load_paper(key, directory)["rows"]:
            record = {col: row.get(col) for col in _COLUMNS}
            record.update(id=f"{key}/{row['row']}", paper=key, baseline=bool(row.get("baseline")),
                          not_reproducible=not_reproducible(row))
            records.append(record)
    table = pd.DataFrame.from_records(records, columns=list(_COLUMNS))
    reason = table["not_reproducible"].astype(object)
    table["not_reproducible"] = reason.where(reason.notna(), None)  # None, never NaN
    return table


def not_reproducible(row: dict) -> str | None:
    """Why no one outside the authors can reproduce a row (None: it can be reproduced)."""
    return row.get("not_reproducible") or PRIVATE_DATA.get(row.get("pretrain_data"))


def get_row(row_id: str, directory: str | Path | None = None) -> dict[str, Any]:
    """One row by ``paper/row`` id, with ``id`` and ``paper`` added; case-insensitive.

    An unknown id raises PaperTableError suggesting the closest ids, since a typo in a recipe's
    row should be a one-line fix rather than a search through four files.
    """
    paper, sep, row = row_id.partition("/")
    paper = paper.lower()
    keys = paper_keys(directory)
    if sep and paper in keys:
        for entry in _load_validated(_dir(directory) / f"{paper}.yaml")["rows"]:
            if entry["row"].lower() == row.lower():
                return {"id": f"{paper}/{entry['row']}", "paper": paper, **copy.deepcopy(entry)}
    ids = [
        f"{k}/{r['row']}"
        for k in keys
        for r in _load_validated(_dir(directory) / f"{k}.yaml")["rows"]
    ]
    close = _suggest(row_id, ids)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not sep:
        raise PaperTableError(f"bad row id {row_id!r}: expected 'paper/row'{hint}")
    if paper not in keys:
        raise PaperTableError(
            f"unknown paper {paper!r} in row id {row_id!r} (known: {', '.join(keys)}){hint}"
        )
    raise PaperTableError(f"unknown row {row!r} in paper {paper!r} (id {row_id!r}){hint}")


def _suggest(row_id: str, ids: list[str], n: int = 3) -> list[str]:
    """The ids closest to a mistyped one: same row in another paper, then variants, then fuzzy.

    Difflib alone ranks CoAtNet-3 above CoAtNet-4@384-in21k for "coatnet/CoAtNet-4"; a missing
    row is far more often a variant (resolution, data) or a wrong paper key than a different model.
    """
    wanted = row_id.lower().rpartition("/")[2]
    by_row = [i for i in ids if i.lower().partition("/")[2] == wanted]
    variants = [
        i for i in ids if i.lower().partition("/")[2].startswith((wanted + "@", wanted + "-"))
    ]
    lowered = {i.lower(): i for i in ids}
    fuzzy = [lowered[c] for c in difflib.get_close_matches(row_id.lower(), list(lowered), n, 0.5)]
    return list(dict.fromkeys(by_row + variants + fuzzy))[:n]


def paper_info(key: str, directory: str | Path | None = None) -> dict[str, Any]:
    """A paper's header fields (title, authors, arXiv id, code, units, caveats) for reports."""
    paper = load_paper(key, directory)
    return {k: v for k, v in paper.items() if k not in ("rows", "omitted")}


def anchor_speeds(directory: str | Path | None = None) -> dict[str, Any]:
    """timm's own GPU inference figures (anchors/timm_benchmarks.yaml), context for speeds
    measured here; a paper's own figures stay in its table. Returns the file's `source` and,
    per device key (`rtx4090`, `rtx3090`), its `device`, `file`, `settings` and
    `models: {timm name: {images_per_s, batch, params_m, gmacs}}`."""
    path = _dir(directory) / "anchors" / "timm_benchmarks.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    name = f"anchors/{path.name}"
    if not isinstance(data, dict) or not data.get("source") or not data.get("devices"):
        _fail(name, "needs a 'source' and 'devices'")
    for key, dev in data["devices"].items():
        for field_ in ("device", "file", "settings", "models"):
            if not dev.get(field_):
                _fail(f"{name}: devices.{key}", f"missing {field_!r}")
        for model, fig in dev["models"].items():
            if not (_is_number(fig.get("images_per_s")) and _is_int(fig.get("batch"))):
                _fail(f"{name}: devices.{key}.models.{model}",
                      "needs images_per_s (number) and batch (integer)")
    return data


def _load_validated(path: Path) -> dict[str, Any]:
    """Parse and validate one file, from the cache unless it changed on disk since."""
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _parse(path: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    """Parse and validate one file; mtime and size are in the key so edits are picked up."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PaperTableError(
            f"{path.name}:{where} not valid YAML: {getattr(exc, 'problem', None) or exc}"
        ) from None
    _validate_paper(data, path)
    return data


def _validate_paper(data: Any, path: Path) -> None:
    """Raise PaperTableError, naming the file and the key or row, at the first problem."""
    name = path.name
    if not isinstance(data, dict):
        _fail(name, "top level must be a mapping")
    _check_fields(data, _PAPER_REQUIRED, _PAPER_OPTIONAL, name, "paper field")
    if data["key"] != path.stem:
        _fail(name, f"key {data['key']!r} does not match the file name")
    caveats = data["caveats"]
    if not isinstance(caveats, list) or not all(isinstance(c, str) and c.strip() for c in caveats):
        _fail(name, "'caveats' must be a list of non-empty strings")
    if not isinstance(data["rows"], list) or not data["rows"]:
        _fail(name, "'rows' must be a non-empty list")
    scale = data.get("gmacs_per_unit", 1.0)
    if not _is_number(scale) or scale <= 0:
        _fail(name, "'gmacs_per_unit' must be a positive number")

    seen: dict[str, int] = {}
    for index, row in enumerate(data["rows"]):
        where = f"{name}: rows[{index}]"
        if isinstance(row, dict) and isinstance(row.get("row"), str):
            where += f" ({row['row']})"
        _validate_row(row, where, scale)
        # Ids must differ beyond case, since get_row() matches them case-insensitively.
        folded = row["row"].lower()
        if folded in seen:
            _fail(where, f"duplicate row id (first at rows[{seen[folded]}])")
        seen[folded] = index


def _check_fields(mapping: dict, required, optional, where: str, what: str) -> None:
    """Every required key present, no key outside required + optional."""
    for key in required:
        if key not in mapping:
            _fail(where, f"missing {what} {key!r}")
    unknown = sorted(set(mapping) - set(required) - set(optional))
    if unknown:
        _fail(where, f"unknown {what}(s) {', '.join(map(repr, unknown))}")


def _validate_row(row: Any, where: str, scale: float) -> None:
    """Check one row's fields, types and internal consistency."""
    if not isinstance(row, dict):
        _fail(where, "must be a mapping")
    _check_fields(row, _ROW_REQUIRED, _ROW_OPTIONAL, where, "field")
    row_id = row["row"]
    if not isinstance(row_id, str) or not row_id or any(c == "/" or c.isspace() for c in row_id):
        _fail(where, "'row' must be a non-empty id without '/' or spaces")
    for key in ("source", "model"):
        if not isinstance(row[key], str) or not row[key].strip():
            _fail(where, f"{key!r} must be a non-empty string")
    if row["timm_model"] is not None and not isinstance(row["timm_model"], str):
        _fail(where, "'timm_model' must be a string or null")
    if not _is_int(row["resolution"]) or row["resolution"] <= 0:
        _fail(where, "'resolution' must be a positive integer")
    # null is allowed only for an architecture-only row (no accuracy, so no training data).
    if row["pretrain_data"] not in PRETRAIN_DATA and not (
        row["pretrain_data"] is None and row["top1"] is None
    ):
        _fail(where, f"'pretrain_data' must be one of {', '.join(PRETRAIN_DATA)}")
    for key in _NUMBER_FIELDS:
        if row.get(key) is not None and not _is_number(row[key]):
            _fail(where, f"{key!r} must be a number or null, not {row[key]!r}")
    for key in ("epochs", "finetune_epochs", "params_resolution"):
        if key in row and not (_is_int(row[key]) and row[key] > 0):
            _fail(where, f"{key!r} must be a positive integer")
    if "not_reproducible" in row and not (isinstance(row["not_reproducible"], str)
                                          and row["not_reproducible"].strip()):
        _fail(where, "'not_reproducible' must be the reason, a non-empty string")
    if "baseline" in row and not isinstance(row["baseline"], bool):
        _fail(where, "'baseline' must be true or false")
    # The printed value and its conversion travel together; a mismatch is a transcription slip.
    printed = row.get("flops_printed")
    if printed is not None and (
        row["gmacs"] is None or not math.isclose(printed * scale, row["gmacs"])
    ):
        _fail(where, f"gmacs {row['gmacs']} is not flops_printed {printed} x {scale}")
    by_epochs = row.get("top1_by_epochs")
    if by_epochs is not None and not (
        isinstance(by_epochs, dict)
        and all(_is_int(k) and _is_number(v) for k, v in by_epochs.items())
    ):
        _fail(where, "'top1_by_epochs' must map epochs to top-1")
    throughput = row.get("throughput")
    if throughput is not None and not isinstance(throughput, list):
        _fail(where, "'throughput' must be a list")
    for i, entry in enumerate(throughput or []):
        _validate_throughput(entry, f"{where} throughput[{i}]")


def _validate_throughput(entry: Any, where: str) -> None:
    """A speed figure needs its device, batch, exactly one measure and its own source."""
    if not isinstance(entry, dict):
        _fail(where, "must be a mapping")
    unknown = sorted(set(entry) - set(_THROUGHPUT_FIELDS))
    if unknown:
        _fail(where, f"unknown field(s) {', '.join(map(repr, unknown))}")
    for key in ("device", "batch", "source"):
        if not entry.get(key):
            _fail(where, f"missing {key!r}")
    measures = [k for k in _THROUGHPUT_VALUES if entry.get(k) is not None]
    if len(measures) != 1 or not _is_number(entry[measures[0]]):
        _fail(where, f"needs exactly one number of {', '.join(_THROUGHPUT_VALUES)}")


def _fail(where: str, message: str) -> NoReturn:
    raise PaperTableError(f"{where}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
