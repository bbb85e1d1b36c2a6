"""Write an RGB image as a tiled pyramidal TIFF that OpenSlide opens as a whole-slide image.

OpenSlide's generic-TIFF reader takes a TIFF whose pages are tiled and each half the size of the one
before; the level-0 resolution comes from the TIFF resolution tags (pixels per centimetre), which it
reports as ``openslide.mpp-x``/``mpp-y``. Pages are deflate-compressed (lossless, no codec beyond
zlib), so a region read back from level 0 equals the pixels written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histomil.files import atomic_write

#: TIFF tile side: a multiple of 16, as the TIFF standard requires.
TIFF_TILE = 256


def pyramid_levels(image: np.ndarray, min_size: int = TIFF_TILE) -> list[np.ndarray]:
    """``image`` and its 2x box-filtered reductions until the longer side is at most ``min_size``."""
    levels = [np.ascontiguousarray(image)]
    while max(levels[-1].shape[:2]) > min_size and min(levels[-1].shape[:2]) >= 2:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    *,
    description: str = "",
    min_size: int = TIFF_TILE,
) -> int:
    """Write ``image`` (H, W, 3) ``uint8`` as a tiled, deflate-compressed pyramid; returns the level count.

    ``mpp`` (level-0 micrometres per pixel) goes into the resolution tags of every level (scaled by its
    downsample); ``None`` writes no resolution, as some scanners' exports do. Written atomically.
    """
    import tifffile

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    levels = pyramid_levels(image, min_size)
    path = Path(path)
    with atomic_write(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            extra: dict = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * image.shape[1] / level.shape[1])
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            else:
                extra = {"resolution": None, "resolutionunit": None}
            tif.write(
                level,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if i == 0 else 1,
                description=description if i == 0 else None,
                metadata=None,
                **extra,
            )
    return len(levels)
