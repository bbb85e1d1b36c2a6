"""Shared test fixtures: the real data beside the checkout, and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real tiles, slides and MIL benchmarks (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the shared data must sit beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ebhi_table(shared_data: Path) -> Path:
    return shared_data / "ebhi" / "tiles.csv"
