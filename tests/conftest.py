"""Shared test fixtures: the real data beside the checkout, an offline environment, one CPU thread for
tiny models and a fast stand-in tile encoder."""

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (and thrash on a shared machine).

    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast_encoder():
    """Registers the fast stand-in tile encoder of tiny_runs.py (``FAST_ENCODER``) for one test module."""
    from tiny_runs import FAST_ENCODER, colour_stats_encoder

    from histomil.features.encoders import ENCODERS

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ENCODERS, FAST_ENCODER, colour_stats_encoder)
        yield
