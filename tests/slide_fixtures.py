"""Synthetic pyramidal TIFF slides with known tissue regions, for the tiling tests.

Level 0 is 4096 x 4096 at 0.25 um/px with two sub-resolution levels (downsample 4 and 16), tiled
256 x 256, zlib-compressed; flat H&E-like colours on white so that regions are known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

SIZE = 4096
MPP = 0.25
DOWNSAMPLES = (1, 4, 16)
WHITE = (255, 255, 255)
PINK = (230, 150, 200)  # eosin-like
PURPLE = (150, 90, 170)  # haematoxylin-like
BLUE = (60, 60, 200)  # a marker at a known level-0 position

# Known regions in level-0 pixels.
RECT_A = (512, 512, 1536, 1280)  # x0, y0, x1, y1 (pink)
DISC_B = (2800, 1200, 500)  # cx, cy, r (purple)
RECT_C = (1024, 2560, 3072, 3584)  # pink
MARKER = (2000, 2900, 64)  # x0, y0, side (blue, inside RECT_C)


def paint(size: int = SIZE, scale: int = 1) -> np.ndarray:
    """The slide's RGB image at 1/``scale`` of level 0 (shapes painted at scaled coordinates)."""
    n = size // scale
    img = np.full((n, n, 3), 255, np.uint8)
    x0, y0, x1, y1 = (v // scale for v in RECT_A)
    img[y0:y1, x0:x1] = PINK
    cx, cy, r = (v / scale for v in DISC_B)
    bx0, by0, bx1, by1 = int(cx - r) - 1, int(cy - r) - 1, int(cx + r) + 2, int(cy + r) + 2
    yy, xx = np.ogrid[by0:by1, bx0:bx1]
    img[by0:by1, bx0:bx1][(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = PURPLE
    x0, y0, x1, y1 = (v // scale for v in RECT_C)
    img[y0:y1, x0:x1] = PINK
    mx, my, side = (v // scale for v in MARKER)
    img[my : my + side, mx : mx + side] = BLUE
    return img


def truth_mask(scale: int) -> np.ndarray:
    """Ground-truth tissue mask at 1/``scale`` of level 0."""
    return (paint(SIZE, scale) != 255).any(axis=2)


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None = MPP, downsamples=DOWNSAMPLES) -> Path:
    """Write ``image`` as a tiled pyramidal TIFF that OpenSlide reads as generic-tiff."""
    with tifffile.TiffWriter(path) as tw:
        for k, ds in enumerate(downsamples):
            level = np.ascontiguousarray(image[::ds, ::ds])
            kwargs = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * ds)
                kwargs = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level, tile=(256, 256) if min(level.shape[:2]) >= 256 else (16, 16), photometric="rgb",
                compression="zlib", subfiletype=0 if k == 0 else 1, **kwargs,
            )
    return path


def make_slide(folder: Path, name: str = "synthetic.tif", mpp: float | None = MPP) -> Path:
    return write_pyramid(folder / name, paint(), mpp=mpp)
