"""Tissue detection on a low-resolution overview of a slide.

H&E-stained tissue is coloured (pink eosin, purple haematoxylin) while glass background is white or
grey, so the HSV saturation separates them well. The default method thresholds the saturation with
Otsu's method (the threshold that best splits the histogram into two classes), never below
``min_saturation`` so that an empty, all-white slide (whose Otsu threshold falls inside the JPEG
noise) yields an empty mask. Morphological closing then opening smooth the mask, holes inside
tissue are filled, and components smaller than ``min_area_fraction`` of the image are dropped.

All sizes are in pixels of the overview image the mask is computed on.

Known limits: pen marks and coloured debris count as tissue; on a slide almost fully covered by
tissue Otsu may split pale from dark tissue (use ``method="fixed_saturation"`` there).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

TissueMethod = Literal["otsu_saturation", "fixed_saturation", "all"]


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` in [0, 1] of an RGB ``uint8`` image; 0 where the pixel is black."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (h, w, 3) RGB image, got shape {rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.float32)
    lo = np.minimum(np.minimum(r, g), b).astype(np.float32)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]; the single value itself for a constant input."""
    from skimage.filters import threshold_otsu

    flat = np.asarray(values, dtype=np.float32).ravel()
    if flat.size == 0 or float(flat.min()) == float(flat.max()):
        return float(flat.max()) if flat.size else 1.0
    return float(threshold_otsu(flat, nbins=bins))


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


def _morph(mask: np.ndarray, op: str, radius: int) -> np.ndarray:
    """Binary closing/opening with a disk, padding by edge replication so borders are not eroded."""
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius + 1, mode="edge")
    fn = ndimage.binary_closing if op == "close" else ndimage.binary_opening
    out = fn(padded, structure=_disk(radius))
    return out[radius + 1 : -(radius + 1), radius + 1 : -(radius + 1)]


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def tissue_mask(
    rgb: np.ndarray,
    method: TissueMethod = "otsu_saturation",
    *,
    saturation_threshold: float = 0.08,
    min_saturation: float = 0.05,
    median_size: int = 5,
    close_radius: int = 2,
    open_radius: int = 2,
    fill_holes: bool = True,
    min_area_fraction: float = 0.0005,
) -> np.ndarray:
    """Boolean tissue mask (h, w) of an RGB overview image (h, w, 3).

    Args:
        method: ``"otsu_saturation"`` (Otsu on saturation, at least ``min_saturation``),
            ``"fixed_saturation"`` (saturation above ``saturation_threshold``) or ``"all"``
            (everything is tissue, e.g. for tissue microarray cores already cropped).
        saturation_threshold: the threshold of ``"fixed_saturation"``.
        min_saturation: lower bound of the Otsu threshold; keeps a blank slide empty.
        median_size: width of the median filter on the saturation (0 or 1: none; odd sizes);
            removes isolated noisy pixels and thin dust.
        close_radius: disk radius of the closing that joins nearby tissue fragments (0: none).
        open_radius: disk radius of the opening that removes thin specks (0: none).
        fill_holes: fill background fully enclosed by tissue (lumens, fat, tears).
        min_area_fraction: drop connected components smaller than this fraction of the image.
    """
    sat = saturation(rgb)
    if method == "all":
        return np.ones(sat.shape, dtype=bool)
    if method == "otsu_saturation":
        threshold = max(otsu_threshold(sat), float(min_saturation))
    elif method == "fixed_saturation":
        threshold = float(saturation_threshold)
    else:
        raise ValueError(f"unknown tissue method {method!r}: use otsu_saturation, fixed_saturation or all")
    mask = sat > threshold
    if median_size and median_size > 1:
        # Thresholding commutes with the median filter, and the median of a binary image is a
        # majority vote: the same result as median-filtering the saturation, several times faster.
        votes = ndimage.uniform_filter(mask.astype(np.float32), size=int(median_size), mode="nearest")
        mask = votes > 0.5
    if not mask.any():
        return mask
    mask = _morph(mask, "close", close_radius)
    mask = _morph(mask, "open", open_radius)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return remove_small_components(mask, int(np.ceil(min_area_fraction * mask.size)))


def box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact fraction of each box ``[x0, x1) x [y0, y1)`` (mask-pixel units, may be fractional) covered by ``mask``.

    Uses the summed-area table of the mask, which is bilinear inside each pixel, so bilinear
    interpolation at the fractional box corners gives the exact covered area. Parts of a box outside
    the mask count as background.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), 0, w)
        y = np.clip(np.asarray(y, dtype=np.float64), 0, h)
        xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - xi, y - yi
        return (
            sat[yi, xi] * (1 - fx) * (1 - fy)
            + sat[yi, xi + 1] * fx * (1 - fy)
            + sat[yi + 1, xi] * (1 - fx) * fy
            + sat[yi + 1, xi + 1] * fx * fy
        )

    area = (np.asarray(x1, np.float64) - x0) * (np.asarray(y1, np.float64) - y0)
    covered = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return np.divide(covered, area, out=np.zeros_like(area), where=area > 0).clip(0.0, 1.0)
