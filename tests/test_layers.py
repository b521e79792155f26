"""The package's layers (pyproject.toml's import-linter contract) hold: imports only go down
cli > doctor | bench > launch > train > measure | report > data | models > recipe >
config | papers | rundir > io > errors, with no exemption, and an upward import fails the check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def contract(config: dict) -> dict:
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return layers


def lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if pythonpath is not None:
        import os

        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_imports_only_go_down_the_layers():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_contract_has_the_layers_and_no_exemptions():
    layers = contract(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert len(layers["layers"]) >= 5
    assert not layers.get("ignore_imports")


def test_an_upward_import_fails_the_check(tmp_path):
    """A copy of the package in which the lowest layer imports the command line: the same
    contract must reject it, naming the import (the check is live, not vacuous)."""
    shutil.copytree(ROOT / "repro", tmp_path / "repro",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    io = tmp_path / "repro" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _upward():\n    import repro.cli  # noqa: F401\n")
    r = lint(tmp_path, pythonpath=tmp_path)
    assert r.returncode != 0
    assert "repro.io is not allowed to import repro.cli" in r.stdout, r.stdout[-3000:]
