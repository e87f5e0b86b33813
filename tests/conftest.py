"""Shared pytest fixtures: location of the real datasets used by integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding the real datasets (``e2e/devset.csv`` and others).

    Set ``FEDADS_DATA_DIR`` to point elsewhere; the default is ``../shared/data`` next to the
    repository checkout.
    """
    path = Path(os.environ.get("FEDADS_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "e2e" / "devset.csv").is_file():
        raise FileNotFoundError(
            f"real data not found under {path}: set FEDADS_DATA_DIR to a folder holding "
            "e2e/devset.csv"
        )
    return path
