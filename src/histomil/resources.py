"""Files shipped inside the histomil package (example tiles and the demo config)."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_DATA = Path(__file__).resolve().parent / "example_data"


def demo_config_path() -> Path:
    """The run config of ``histomil demo`` (tiles and study sizes)."""
    return EXAMPLE_DATA / "demo.yaml"


def example_tile_table() -> Path:
    """tiles.csv of the shipped EBHI-Seg example tiles (CC BY 4.0; see ATTRIBUTION.md beside it)."""
    return EXAMPLE_DATA / "ebhi_demo" / "tiles.csv"
