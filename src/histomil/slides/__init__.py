"""Whole-slide images: reading (OpenSlide), tissue detection and tiling at a fixed resolution."""

from histomil.slides.reader import Slide, open_slide
from histomil.slides.tiling import (
    TilePlan,
    TilingSpec,
    TilingSummary,
    iter_tiles,
    plan_tiles,
    read_tile,
    tile_slide,
    tile_slides,
)
from histomil.slides.tissue import tissue_mask

__all__ = [
    "Slide",
    "TilePlan",
    "TilingSpec",
    "TilingSummary",
    "iter_tiles",
    "open_slide",
    "plan_tiles",
    "read_tile",
    "tile_slide",
    "tile_slides",
    "tissue_mask",
]
