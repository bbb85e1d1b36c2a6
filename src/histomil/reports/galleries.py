"""Tile galleries of the HTML report: which bags to show and their tiles sorted by attention.

For a few bags (the most confident correct ones, the most wrong ones, and any the user names) the
report shows the bag's tiles sorted by attention, each with its attention score and, where the
study knows it, the tile's true label. Attention comes from running the saved model on the bag's
features: the feature file when it was kept, otherwise the features are looked up in the run's tile
cache by the hash of each tile file. Kept apart from :mod:`histomil.reports.html` because this is
the only part of the report that loads models and reads tiles and features.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.reports.html_blocks import BagRef, Gallery, Tile, thumbnail


def choose_bags(candidates: Sequence[BagRef], named: Sequence[str], max_bags: int) -> list[BagRef]:
    """The bags to show: the named ones, then the most confident correct and the most wrong ones.

    ``named`` entries are matched against :attr:`BagRef.name` (``SET/BAG`` for a study run,
    ``seed_S/fold_F/SET/BAG`` in a cross-validation) or, as a short form, its last two parts
    (``SET/BAG``: the first run holding it) or a bare ``BAG`` (the first test set holding it).
    Of the ``max_bags`` chosen automatically, half (rounded up) are the most confident correctly
    classified bags, alternating tumour and non-tumour bags, and the rest the most confidently
    misclassified ones (more confident ones when fewer are wrong). Ties keep the input order.
    """
    chosen: list[BagRef] = []
    seen: set[str] = set()

    def take(b: BagRef, reason: str) -> None:
        if b.name not in seen:
            seen.add(b.name)
            chosen.append(BagRef(**{**b.__dict__, "reason": reason}))

    for want in named:
        w = want.strip().strip("/")
        hit = next((b for b in candidates if b.name == w), None)
        hit = hit or next((b for b in candidates if f"{b.set_name}/{b.bag_id}" == w), None)
        hit = hit or next((b for b in candidates if b.bag_id == w), None)
        if hit is None:
            sets = ", ".join(dict.fromkeys(b.set_name for b in candidates))
            raise HistomilError(f"--bag {want!r}: no such bag among the evaluated bags (give SET/BAG; test sets: {sets})")
        take(hit, "named")
    if max_bags <= 0:
        return chosen

    def conf(b: BagRef) -> float:
        return b.p if b.y == 1 else 1.0 - b.p

    order = {id(b): i for i, b in enumerate(candidates)}
    correct = sorted((b for b in candidates if b.correct), key=lambda b: (-conf(b), order[id(b)]))
    wrong = sorted((b for b in candidates if not b.correct), key=lambda b: (conf(b), order[id(b)]))
    pos = [b for b in correct if b.y == 1]
    neg = [b for b in correct if b.y == 0]
    confident: list[BagRef] = []
    for i in range(max(len(pos), len(neg))):
        confident += [x[i] for x in (pos, neg) if i < len(x)]
    n_wrong = min(len(wrong), max_bags // 2)
    n_conf = max_bags - n_wrong
    for b in confident[:n_conf]:
        take(b, "most confident (correct)")
    for b in wrong[:n_wrong]:
        take(b, "most wrong")
    return chosen


def _resolve_tile(path: str, bag_dir: Path | None) -> Path | None:
    p = Path(path)
    for cand in (p, bag_dir / p.name if bag_dir is not None else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def _truth_map(truth_csv: Path | None, bag_id: str) -> dict[str, int]:
    """Tile file name -> tile label for one bag, from a ``tiles.csv`` (empty when unknown)."""
    if truth_csv is None or not truth_csv.is_file():
        return {}
    out: dict[str, int] = {}
    try:
        with open(truth_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if str(row.get("case", row.get("bag_id"))) == bag_id and (row.get("tile_label") or "") != "":
                    out[Path(row["path"]).name] = int(float(row["tile_label"]))
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise HistomilError(f"{truth_csv}: unreadable tile labels ({exc})") from None
    return out


def _features_from_cache(bag: BagRef, encoder_name: str | None) -> tuple[np.ndarray, list[str]] | str:
    """The bag's features looked up in the tile cache by tile hash, or why that is not possible."""
    from histomil.data.bags import load_bag_folders
    from histomil.features.cache import FeatureCache
    from histomil.features.extract import tile_digests

    if bag.bag_dir is None or not bag.bag_dir.is_dir():
        return "its feature file and its tile folder were both removed (keep_intermediate / prune_bags)"
    if bag.cache_dir is None or not bag.cache_dir.is_dir():
        return "its feature file was removed and there is no tile cache"
    try:
        found = [b for b in load_bag_folders(bag.bag_dir.parent, require_labels=False) if b.bag_id == bag.bag_id]
        if not found:
            return f"no tiles in {bag.bag_dir}"
        paths = [str(p) for p in found[0].tile_paths]
        digests = tile_digests([Path(p) for p in paths])
        for meta in sorted(bag.cache_dir.glob("*/encoder.json")):
            info = json.loads(meta.read_text(encoding="utf-8"))
            if encoder_name and info.get("name") not in (None, encoder_name):
                continue
            cache = FeatureCache(bag.cache_dir, info)
            keys = [digests[p] for p in paths]
            if all(k in cache for k in keys):
                return cache.get_many(keys), paths
    except (HistomilError, OSError, ValueError, json.JSONDecodeError) as exc:
        return f"the tile cache could not be read ({exc})"
    return "its tiles are not in the tile cache"


class Models:
    """Loaded checkpoints, one per model path."""

    def __init__(self) -> None:
        self._models: dict[Path, tuple[Any, dict]] = {}

    def get(self, path: Path) -> tuple[Any, dict]:
        if path not in self._models:
            from histomil.training.checkpoint import load_checkpoint

            self._models[path] = load_checkpoint(path)
        return self._models[path]


def build_gallery(bag: BagRef, models: Models, max_tiles: int = 40) -> Gallery:
    """Tiles of one bag sorted by the model's attention (highest first), with thumbnails and truth."""
    from histomil.features.formats import load_any_features
    from histomil.features.validate import check_feature_bag, model_inputs
    from histomil.training.common import torch_threads
    from histomil.training.trainer import predict

    gal = Gallery(bag)
    if not bag.model_path.is_file():
        gal.note = f"no gallery: model {bag.model_path} not found"
        return gal
    model, meta = models.get(bag.model_path)
    if meta.get("kind", "features") != "features":
        gal.note = f"no gallery: {bag.model_path} is an end-to-end ({meta.get('kind')}) model, not one on tile features"
        return gal
    if bag.feature_file is not None and bag.feature_file.is_file():
        fb = load_any_features(bag.feature_file)
        want = model_inputs(meta)
        check_feature_bag(fb, dim=want.dim, encoder=want.encoder)
        feats, paths = fb.features, fb.tile_paths
    else:
        got = _features_from_cache(bag, (meta.get("encoder_info") or {}).get("name"))
        if isinstance(got, str):
            gal.note = f"no gallery: {got}"
            return gal
        feats, paths = got
    with torch_threads(1):
        (probs, att), = predict(model, [feats])
    att = np.asarray(att, dtype=np.float64)
    gal.n_tiles = len(paths)
    gal.prob = float(probs[1]) if len(probs) > 1 else None
    notes = []
    if gal.prob is not None and abs(gal.prob - bag.p) > 1e-3:
        notes.append(f"the model now gives P(tumour) = {gal.prob:.4f} on these features, the predictions file"
                     f" {bag.p:.4f}: features or model changed since the evaluation")
    if not np.all(np.isfinite(att)):
        gal.note = f"no gallery: model {meta.get('model_name', '?')!r} gives no tile attention"
        return gal
    truth = _truth_map(bag.truth_csv, bag.bag_id)
    order = np.argsort(-att, kind="stable")[: max(1, max_tiles)]
    missing = 0
    for i in order:
        path = paths[int(i)]
        f = _resolve_tile(path, bag.bag_dir)
        thumb = thumbnail(f) if f is not None else None
        missing += thumb is None
        name = Path(path).name
        gal.tiles.append(Tile(name, float(att[i]), truth.get(name), thumb))
    if missing:
        notes.append(f"{missing} tile image(s) could not be found or read")
    gal.note = "; ".join(notes)
    return gal


__all__ = ["Models", "build_gallery", "choose_bags"]
