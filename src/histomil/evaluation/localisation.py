"""How well per-tile attention finds known tumour: AUC per slide and the top-attended tile's hit rate.

The truth is a table of tiles with level-0 ``x``, ``y``, ``size`` and ``is_tumour`` per ``slide`` (the
``truth.csv`` of :mod:`histomil.data.synthetic_cohort`, or any table with those columns). A scored tile
counts as tumour when at least half of its area lies on truth tumour tiles, so tiles cut on another grid
or at another size are scored too. Per slide that has tumour among its scored tiles:

* ``auc``: ROC-AUC of the scores against tumour / not tumour (None when every scored tile is tumour);
* ``top1_hit``: 1 when the highest-scoring tile is tumour (with ties: the tumour share of the tied tiles).

:func:`summarise` gives mean ± sd of the AUC over slides and the top-1 hit rate. Scores come from
heatmap GeoJSON files (:func:`read_geojson_scores`, as ``heatmap`` / ``predict-slides`` write them) or from
a model and feature bags (:func:`attention_by_slide`; patient bags are split back into their slides).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag

TRUTH_REQUIRED = ("slide", "x", "y", "size", "is_tumour")
GEOJSON_SUFFIX = "_tiles.geojson"


@dataclass
class TileScores:
    """Scores of one slide's tiles: level-0 top-left corners (N, 2), tile side in level-0 pixels, (N,) scores."""

    coords: np.ndarray
    size: int
    scores: np.ndarray


@dataclass
class SlideTruth:
    """The known tiles of one slide: level-0 corners (M, 2), sides (M,) and 0/1 tumour flags (M,)."""

    coords: np.ndarray
    sizes: np.ndarray
    is_tumour: np.ndarray


def read_truth(path: str | Path) -> dict[str, SlideTruth]:
    """slide -> :class:`SlideTruth` from a CSV with columns slide, x, y, size, is_tumour (others ignored)."""
    path = Path(path)
    rows: dict[str, list[tuple[int, int, int, int]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in TRUTH_REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise HistomilError(f"{path}: truth table lacks column(s) {', '.join(missing)}")
            for row in reader:
                try:
                    values = tuple(int(float(row[c])) for c in ("x", "y", "size", "is_tumour"))
                except (TypeError, ValueError):
                    raise HistomilError(f"{path} line {reader.line_num}: x, y, size and is_tumour must be numbers") from None
                if values[2] <= 0 or values[3] not in (0, 1):
                    raise HistomilError(f"{path} line {reader.line_num}: size must be positive and is_tumour 0 or 1")
                rows.setdefault(row["slide"].strip(), []).append(values)  # type: ignore[arg-type]
    except FileNotFoundError:
        raise HistomilError(f"{path}: truth table not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HistomilError(f"{path}: not a readable CSV truth table ({exc})") from None
    if not rows:
        raise HistomilError(f"{path}: truth table has no rows")
    out = {}
    for slide, values in rows.items():
        a = np.asarray(values, dtype=np.int64)
        out[slide] = SlideTruth(coords=a[:, :2], sizes=a[:, 2], is_tumour=a[:, 3])
    return out


def tumour_labels(tiles: TileScores, truth: SlideTruth) -> np.ndarray:
    """0/1 per scored tile: 1 when at least half of its area lies on truth tumour tiles."""
    coords = np.asarray(tiles.coords, dtype=np.float64).reshape(-1, 2)
    tum = truth.is_tumour == 1
    if not tum.any() or not len(coords):
        return np.zeros(len(coords), dtype=np.int64)
    t0 = truth.coords[tum].astype(np.float64)
    t1 = t0 + truth.sizes[tum, None]
    s = float(tiles.size)
    dx = np.clip(np.minimum(coords[:, None, 0] + s, t1[None, :, 0]) - np.maximum(coords[:, None, 0], t0[None, :, 0]), 0, None)
    dy = np.clip(np.minimum(coords[:, None, 1] + s, t1[None, :, 1]) - np.maximum(coords[:, None, 1], t0[None, :, 1]), 0, None)
    covered = (dx * dy).sum(axis=1) / (s * s)
    return (covered >= 0.5).astype(np.int64)


def slide_localisation(slide: str, tiles: TileScores, truth: SlideTruth) -> dict:
    """AUC and top-1 hit of one slide's scores (None where undefined: no tumour, or only tumour)."""
    scores = np.asarray(tiles.scores, dtype=np.float64).ravel()
    if len(scores) != len(np.asarray(tiles.coords).reshape(-1, 2)):
        raise HistomilError(f"slide {slide}: {len(scores)} scores for {len(tiles.coords)} tiles")
    if not np.isfinite(scores).all():
        raise HistomilError(f"slide {slide}: {int((~np.isfinite(scores)).sum())} tile scores are NaN or infinite")
    y = tumour_labels(tiles, truth)
    n_tumour = int(y.sum())
    auc = float(roc_auc_score(y, scores)) if 0 < n_tumour < len(y) else None
    hit = None
    if n_tumour and len(scores):
        top = scores == scores.max()
        hit = float(y[top].mean())
    return {"slide": slide, "n_tiles": int(len(y)), "n_tumour": n_tumour, "auc": auc, "top1_hit": hit}


def summarise(rows: Iterable[Mapping]) -> dict:
    """Mean ± sd (ddof 1) of the per-slide AUC over slides with tumour, and the top-1 hit rate."""
    rows = list(rows)
    aucs = np.array([r["auc"] for r in rows if r["auc"] is not None], dtype=np.float64)
    hits = np.array([r["top1_hit"] for r in rows if r["top1_hit"] is not None], dtype=np.float64)
    return {
        "n_slides": len(rows),
        "n_tumour_slides": int(sum(r["n_tumour"] > 0 for r in rows)),
        "n_auc_slides": int(len(aucs)),
        "auc_mean": float(aucs.mean()) if len(aucs) else None,
        "auc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else None,
        "auc_min": float(aucs.min()) if len(aucs) else None,
        "top1_hit_rate": float(hits.mean()) if len(hits) else None,
    }


def localise(scores: Mapping[str, TileScores], truth: Mapping[str, SlideTruth]) -> tuple[list[dict], dict]:
    """Per-slide rows and their summary for every scored slide; a scored slide missing from the truth is an error."""
    unknown = sorted(s for s in scores if s not in truth)
    if unknown:
        raise HistomilError(f"{len(unknown)} scored slide(s) have no truth rows: {', '.join(unknown[:5])}")
    rows = [slide_localisation(s, scores[s], truth[s]) for s in sorted(scores)]
    return rows, summarise(rows)


# ------------------------------------------------------------------------------------ score sources


def read_geojson_scores(path: str | Path) -> TileScores:
    """The tiles and scores of a heatmap GeoJSON (square polygons in level-0 pixels, ``properties.score``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        feats = doc["features"]
        corners, sides, scores = [], [], []
        for f in feats:
            ring = np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64)
            lo, hi = ring.min(axis=0), ring.max(axis=0)
            corners.append(lo)
            sides.append(hi[0] - lo[0])
            scores.append(float(f["properties"]["score"]))
    except FileNotFoundError:
        raise HistomilError(f"{path}: GeoJSON file not found") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise HistomilError(f"{path}: not a heatmap GeoJSON of tiles with a score ({type(exc).__name__}: {exc})") from None
    if not scores:
        raise HistomilError(f"{path}: no tiles")
    if len(set(np.round(sides, 6))) != 1:
        raise HistomilError(f"{path}: tiles of different sizes; expected one tile grid")
    return TileScores(np.asarray(corners), int(round(sides[0])), np.asarray(scores))


def geojson_scores(sources: Iterable[str | Path]) -> dict[str, TileScores]:
    """slide -> scores from ``<slide>_tiles.geojson`` files, given directly or found (recursively) in folders."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files += sorted(src.rglob(f"*{GEOJSON_SUFFIX}"))
        elif src.is_file():
            files.append(src)
        else:
            raise HistomilError(f"{src}: no such file or folder")
    if not files:
        raise HistomilError(f"no *{GEOJSON_SUFFIX} files in {', '.join(map(str, sources))}")
    out: dict[str, TileScores] = {}
    for f in files:
        slide = f.name[: -len(GEOJSON_SUFFIX)] if f.name.endswith(GEOJSON_SUFFIX) else f.stem
        if slide in out:
            raise HistomilError(f"{f}: slide {slide} has two GeoJSON files")
        out[slide] = read_geojson_scores(f)
    return out


def attention_by_slide(model, bags: Iterable[FeatureBag]) -> dict[str, TileScores]:
    """slide -> the model's attention (or instance scores) on its tiles, from slide or patient bags.

    A patient bag's attention is over all its slides' tiles together; it is split back by slide.
    """
    from histomil.data.cohort import tiles_by_slide
    from histomil.features.geometry import require_geometry
    from histomil.slides.heatmap import bag_scores

    out: dict[str, TileScores] = {}
    for bag in bags:
        _, scores, _ = bag_scores(model, bag)
        size = int(require_geometry(bag)[1])
        for slide, (coords, values) in tiles_by_slide(bag, scores).items():
            if coords is None:
                raise HistomilError(f"bag {bag.bag_id}: slide {slide} has no tile coordinates")
            out[slide] = TileScores(np.asarray(coords), size, np.asarray(values))
    return out
