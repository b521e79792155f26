"""Shared test set-up: a private cache for built-in datasets, so tests never touch ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def repro_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("repro-cache")
    old = os.environ.get("REPRO_CACHE")
    os.environ["REPRO_CACHE"] = str(path)  # inherited by spawned ranks and Slurm jobs
    yield path
    if old is None:
        os.environ.pop("REPRO_CACHE", None)
    else:
        os.environ["REPRO_CACHE"] = old
