"""Predict unlabelled bags: image bag folders (encoded on the fly) or feature folders in, CSV out."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np

from histomil.data.bags import load_bags
from histomil.errors import HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.encoders import build_encoder
from histomil.features.extract import extract_bags
from histomil.features.store import load_feature_dataset
from histomil.hardware import resolve_precision
from histomil.reports.tables import write_text
from histomil.training.checkpoint import load_checkpoint
from histomil.training.trainer import predict


def features_for_source(
    source: Path,
    encoder_info: dict,
    work_dir: Path,
    on_bad_tile: str = "error",
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    precision: str = "auto",
) -> Path:
    """A feature folder for ``source``: itself if it holds feature files, else extracted into ``work_dir``
    with the model's encoder in ``precision`` (``auto``: bf16 where this machine computes it natively)."""
    if source.is_dir() and any(source.glob("*.h5")):
        return source
    bags = load_bags(source, require_labels=False, on_bad_tile=on_bad_tile, log=log)
    name = encoder_info.get("name")
    if not name:
        raise HistomilError(f"{source}: the model does not record its encoder; pass a feature folder instead")
    encoder = build_encoder(name, precision=precision, channels_last=True)
    feat_dir = work_dir / "features"
    cache = FeatureCache.for_encoder(work_dir / "cache", encoder)
    extract_bags(bags, feat_dir, encoder, cache, on_bad_tile=on_bad_tile, log=log, progress=progress)
    return feat_dir


def predict_source(
    checkpoint: str | Path,
    source: str | Path,
    out_csv: str | Path,
    top_k: int = 5,
    threshold: float | None = None,
    on_bad_tile: str = "error",
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    precision: str = "auto",
) -> list[dict]:
    """Write one CSV row per bag: probability, predicted class and its highest-attention tiles.

    ``precision`` is that of the encoder (image bags) and the MIL head: ``auto`` resolves to bf16 where
    this machine computes it natively (half the head's CPU time on large bags), else fp32.
    """
    try:
        precision = resolve_precision(precision, "cpu")
    except ValueError as exc:
        raise HistomilError(str(exc)) from None
    model, meta = load_checkpoint(checkpoint)
    threshold = float(meta.get("threshold", 0.5)) if threshold is None else threshold
    out_csv = Path(out_csv)
    feat_dir = features_for_source(
        Path(source), meta.get("encoder_info") or {}, out_csv.parent / f".{out_csv.stem}-work", on_bad_tile, log, progress,
        precision,
    )
    bags = load_feature_dataset(feat_dir)
    preds = predict(model, bags, precision=precision)
    rows = []
    for bag, (prob, attention) in zip(bags, preds):
        p = float(prob[1]) if len(prob) == 2 else float(np.max(prob))
        order = np.argsort(-attention)[:top_k] if attention is not None else []
        rows.append(
            {
                "bag_id": bag.bag_id,
                "n_tiles": len(bag),
                "prob_positive": round(p, 6),
                "predicted_class": int(np.argmax(prob)) if len(prob) > 2 else int(p >= threshold),
                "top_tiles": ";".join(Path(bag.tile_paths[j]).name for j in order),
                "top_attention": ";".join(f"{attention[j]:.4f}" for j in order),
            }
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    write_text(out_csv, buf.getvalue())
    return rows
