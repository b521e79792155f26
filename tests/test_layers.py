"""The package's layers (pyproject.toml's import-linter contract) hold: imports only go down
cli > doctor > launch > train > measure | report > data | models > recipe > papers > io, and
the list of upward imports that predate the contract only shrinks (issue 12)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
# The upward imports the contract found when it was written; remove an entry when its import
# goes, never add one.
PREDATING = {
    "repro.measure.verify -> repro.report.architecture",
    "repro.recipe -> repro.data.policy",
}


def contract(config: dict) -> dict:
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return layers


def lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_imports_only_go_down_the_layers():
    r = lint(ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_upward_imports_allowed_only_shrink():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(contract(config)["ignore_imports"]) <= PREDATING


def test_the_contract_fails_on_an_upward_import(tmp_path):
    """Without its exemption, an upward import that exists breaks the contract: the check
    is live, not vacuous."""
    text = (ROOT / "pyproject.toml").read_text()
    allowed = contract(tomllib.loads(text))["ignore_imports"]
    if not allowed:
        return  # nothing upward is left to remove
    edge = allowed[0]
    config = tmp_path / "pyproject.toml"
    config.write_text(text.replace(f'    "{edge}",\n', "", 1))
    r = lint(config)
    assert r.returncode != 0
    importer, imported = (part.strip() for part in edge.split("->"))
    assert importer in r.stdout and f"is not allowed to import {imported.rsplit('.', 1)[0]}" \
        in r.stdout, r.stdout[-3000:]
