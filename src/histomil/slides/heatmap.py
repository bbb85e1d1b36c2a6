"""Slide prediction and attention heatmaps: where on the slide the model looked.

* :func:`render_heatmap` paints one score per tile over the slide overview (PNG, with the tissue
  outline and a colour bar). Scale ``"rank"`` colours tiles by their percentile among the slide's
  tiles: softmax attention over thousands of tiles is tiny everywhere except a few tiles, so a
  ``"linear"`` (min-max) scale shows one hot spot on a uniformly cold slide, while ranks show the
  ordering everywhere. ``"linear"`` is right when the absolute values matter.
* :func:`tiles_geojson` writes the tiles as a GeoJSON FeatureCollection (squares in level-0 pixel
  coordinates) that QuPath opens (File > Import objects): each tile is a ``"tile"`` object with the
  score as a measurement and a decile class, so QuPath's measurement maps and class colours work.
* :func:`write_slide_heatmap` does both for one slide. Predicting slides and drawing their heatmaps
  in one call is :mod:`histomil.slides.predict_slides`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from PIL import Image

from histomil.errors import HistomilError
from histomil.features.geometry import require_geometry
from histomil.features.store import FeatureBag
from histomil.files import write_bytes
from histomil.reports.plots import new_figure, save_figure
from histomil.slides.tiling import TilingSpec

Scale = Literal["rank", "linear"]
SCALES = ("rank", "linear")


# ------------------------------------------------------------------------------------ scores


def scale_scores(scores: np.ndarray, scale: Scale = "rank") -> np.ndarray:
    """Scores mapped to [0, 1]: percentile ranks (ties share their mean rank) or min-max.

    A constant score (or a single tile) maps to 0.5 under both scales.
    """
    from scipy.stats import rankdata

    if scale not in SCALES:
        raise HistomilError(f"unknown heatmap scale {scale!r}; choose one of {', '.join(SCALES)}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size and not np.isfinite(s).all():
        raise HistomilError(f"tile scores: {int((~np.isfinite(s)).sum())} of {s.size} are NaN or infinite")
    if s.size == 0:
        return s
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return np.full(s.shape, 0.5)
    if scale == "rank":
        return (rankdata(s, method="average") - 1.0) / (s.size - 1.0)
    return (s - lo) / (hi - lo)


def bag_scores(model: torch.nn.Module, bag: FeatureBag) -> tuple[np.ndarray, np.ndarray, str]:
    """(class probabilities, one score per tile, what the score is) for one bag.

    The score is the model's attention; a model without attention falls back to its instance
    scores (probability-like score of the positive class); a model with neither cannot be mapped.
    """
    from histomil.training.trainer import predict

    (probs, attention), = predict(model, [bag])
    if attention is not None and np.isfinite(attention).all():
        return probs, np.asarray(attention, dtype=np.float64), "attention"
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32))[None], None)
    inst = getattr(out, "instance_scores", None)
    if inst is None:
        raise HistomilError(f"bag {bag.bag_id}: the model gives neither attention nor instance scores; no heatmap")
    inst = inst[0].float()
    if inst.dim() == 2:  # (N, C): the positive class (or the predicted one for > 2 classes)
        inst = inst[:, 1 if inst.shape[1] == 2 else int(np.argmax(probs))]
    return probs, inst.cpu().numpy().astype(np.float64), "instance score"


# ------------------------------------------------------------------------------------ drawing


def score_canvas(
    shape: tuple[int, int],
    level0_dims: tuple[int, int],
    coords: np.ndarray,
    patch_size_level0: int,
    values: np.ndarray,
) -> np.ndarray:
    """A (h, w) float image of an overview: each tile's value over its square, NaN where no tile.

    Overlapping tiles (stride < tile size) are averaged. Tile edges are rounded to overview pixels
    so that neighbouring tiles neither overlap nor leave gaps.
    """
    h, w = int(shape[0]), int(shape[1])
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) != len(coords):
        raise ValueError(f"{len(values)} values for {len(coords)} tiles")
    sx, sy = w / float(level0_dims[0]), h / float(level0_dims[1])
    x0 = np.clip(np.rint(coords[:, 0] * sx), 0, w).astype(np.int64)
    y0 = np.clip(np.rint(coords[:, 1] * sy), 0, h).astype(np.int64)
    x1 = np.clip(np.rint((coords[:, 0] + patch_size_level0) * sx), 0, w).astype(np.int64)
    y1 = np.clip(np.rint((coords[:, 1] + patch_size_level0) * sy), 0, h).astype(np.int64)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))  # a tile smaller than an overview pixel still shows
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for a, b, c, d, v in zip(x0, y0, x1, y1, values):
        total[b:d, a:c] += v
        count[b:d, a:c] += 1
    return np.divide(total, count, out=np.full((h, w), np.nan), where=count > 0)


def heatmap_overlay(thumbnail: np.ndarray, canvas: np.ndarray, cmap: str = "turbo", alpha: float = 0.5) -> np.ndarray:
    """The overview (h, w, 3) uint8 with ``canvas`` values in [0, 1] blended in colour where not NaN."""
    thumb = np.asarray(thumbnail)
    if thumb.shape[:2] != canvas.shape:
        raise ValueError(f"thumbnail {thumb.shape[:2]} and canvas {canvas.shape} differ in size")
    has = np.isfinite(canvas)
    colours = colormaps[cmap](np.clip(np.nan_to_num(canvas), 0.0, 1.0))[..., :3] * 255.0
    out = thumb[..., :3].astype(np.float64)
    out[has] = (1.0 - alpha) * out[has] + alpha * colours[has]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_heatmap(
    out_png: str | Path,
    thumbnail: np.ndarray,
    level0_dims: tuple[int, int],
    coords: np.ndarray,
    patch_size_level0: int,
    scores: np.ndarray,
    scale: Scale = "rank",
    mask: np.ndarray | None = None,
    title: str | None = None,
    label: str = "attention",
    cmap: str = "turbo",
    alpha: float = 0.5,
) -> Path:
    """Write the heatmap PNG (overview + coloured tiles + tissue outline + colour bar) atomically."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    scaled = scale_scores(scores, scale)
    canvas = score_canvas(thumbnail.shape[:2], level0_dims, coords, patch_size_level0, scaled)
    overlay = heatmap_overlay(thumbnail, canvas, cmap, alpha)
    h, w = overlay.shape[:2]
    width = 8.0
    height = float(np.clip(width * h / w * 0.85 + 0.6, 3.0, 14.0))
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    ax.imshow(overlay, interpolation="antialiased")
    if mask is not None and np.asarray(mask).any():
        m = np.asarray(mask, dtype=bool)
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
        ax.contour(m.astype(np.float32), levels=[0.5], colors=["black"], linewidths=0.8)
    ax.set_axis_off()
    if scale == "rank":
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        bar = fig.colorbar(sm, ax=ax, shrink=0.8, label=f"{label}: percentile among the slide's tiles")
        bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0], labels=["0%", "25%", "50%", "75%", "100%"])
    else:
        lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
        sm = ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1e-12), cmap=cmap)
        fig.colorbar(sm, ax=ax, shrink=0.8, label=f"{label} (linear)")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, out_png)


# ------------------------------------------------------------------------------------ GeoJSON


def tiles_geojson(
    coords: np.ndarray,
    patch_size_level0: int,
    scores: np.ndarray,
    measurement: str = "attention",
    cmap: str = "turbo",
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the tiles, in level-0 pixel coordinates (what QuPath expects).

    Each feature: a closed square ring from the tile's top-left ``(x, y)``; properties ``objectType``
    ``"tile"``, ``name`` ``"x_y"``, ``score`` (raw), ``rank`` (1 = highest score), ``percentile``
    (0-1, as the rank scale), ``measurements`` ``{measurement: score, measurement percentile: ...}``
    and a ``classification`` by decile (``"attention 90-100%"``) coloured like the heatmap.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(scores) != len(coords):
        raise ValueError(f"{len(scores)} scores for {len(coords)} tiles")
    pct = scale_scores(scores, "rank")
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(scores), np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    cm = colormaps[cmap]
    p = int(patch_size_level0)
    features = []
    for i, ((x, y), s) in enumerate(zip(coords.tolist(), scores.tolist())):
        x, y = int(x), int(y)
        decile = min(9, int(pct[i] * 10))
        rgb = [round(float(c) * 255) for c in cm((decile + 0.5) / 10)[:3]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "name": f"{x}_{y}",
                "score": float(s),
                "rank": int(rank[i]),
                "percentile": float(pct[i]),
                "classification": {"name": f"{measurement} {decile * 10}-{decile * 10 + 10}%", "color": rgb},
                "measurements": {measurement: float(s), f"{measurement} percentile": float(pct[i])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: dict[str, Any]) -> Path:
    """Write a GeoJSON object compactly and atomically."""
    return write_bytes(path, json.dumps(collection, separators=(",", ":"), allow_nan=False).encode("utf-8"))


# ---------------------------------------------------------------------------- one slide


def write_slide_heatmap(
    slide_path: str | Path,
    coords: np.ndarray,
    scores: np.ndarray,
    out_png: str | Path,
    out_geojson: str | Path | None = None,
    *,
    patch_size_level0: int | None = None,
    bag: FeatureBag | None = None,
    spec: TilingSpec | None = None,
    scale: Scale = "rank",
    title: str | None = None,
    label: str = "attention",
    cmap: str = "turbo",
    alpha: float = 0.5,
) -> tuple[Path, Path | None]:
    """Heatmap PNG (and GeoJSON) of per-tile ``scores`` at ``coords`` over the slide's overview.

    The overview and its tissue outline are computed as the tiler does (``spec.mask_size``,
    ``spec``'s tissue detection). The tile side comes from ``patch_size_level0`` or from ``bag``.
    """
    from histomil.slides.reader import open_slide
    from histomil.slides.tissue import tissue_mask

    spec = spec or TilingSpec()
    coords = np.asarray(coords).reshape(-1, 2)
    with open_slide(slide_path, mpp=spec.slide_mpp) as slide:
        if patch_size_level0 is None:
            if bag is None:
                raise ValueError("give patch_size_level0 or the bag the scores belong to")
            patch_size_level0 = require_geometry(bag)[1]
        thumb = slide.thumbnail(spec.mask_size)
        mask = tissue_mask(thumb, **spec.tissue_params())  # type: ignore[arg-type]
        dims = slide.dimensions
    png = render_heatmap(out_png, thumb, dims, coords, patch_size_level0, scores, scale, mask, title, label, cmap, alpha)
    geo = None
    if out_geojson is not None:
        geo = write_geojson(out_geojson, tiles_geojson(coords, patch_size_level0, scores, label.replace(" ", "_"), cmap))
    return png, geo
