"""Predict unlabelled bags: image bag folders (encoded on the fly) or feature folders in, CSV out."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from histomil.data.bags import Bag, load_bags
from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.evaluation.task_evaluate import prediction_fields
from histomil.features.cache import FeatureCache
from histomil.features.encoders import build_encoder
from histomil.features.extract import extract_bags, tile_digests
from histomil.features.formats import FEATURE_SUFFIXES, is_feature_folder, load_any_features, load_features_folder
from histomil.features.store import FeatureBag
from histomil.features.validate import check_bags_for_model
from histomil.files import exclusive_output, write_text
from histomil.hardware import resolve_precision
from histomil.training.checkpoint import load_checkpoint
from histomil.training.tasks import task_from_checkpoint
from histomil.training.trainer import predict


def features_for_source(
    source: Path,
    encoder_info: dict,
    work_dir: Path,
    on_bad_tile: str = "error",
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    precision: str = "auto",
    weights: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """A feature folder for ``source``: itself if it holds feature files, else extracted into ``work_dir``
    with the model's encoder in ``precision`` (``auto``: bf16 where this machine computes it natively).

    Extracted features go to ``work_dir/features/<content key>`` (:func:`source_content_key`), so
    another folder whose bag ids repeat never reuses these files; the tile cache beside it is keyed by
    tile bytes, so extracting a folder again costs no encoding for the tiles it has seen. ``weights``: the
    encoder's weights file (timm/preset encoders; default the local Hugging Face cache); weights other
    than those the model's features were made with are refused."""
    if is_feature_source(source):
        return source
    bags = load_bags(source, require_labels=False, on_bad_tile=on_bad_tile, log=log)
    name = encoder_info.get("name")
    if not name:
        raise HistomilError(f"{source}: the model does not record its encoder; pass a feature folder instead")
    encoder = build_encoder(name, precision=precision, channels_last=True, weights=weights, device=device)
    trained = encoder_info.get("weights")
    if trained and encoder.info.weights != trained:
        raise HistomilError(f"{source}: the model was trained on features of {name} with weights {trained}, this encoder "
                            f"has {encoder.info.weights}; pass the weights file it was trained with (--weights)")
    feat_dir = work_dir / "features" / source_content_key(bags, encoder.feature_attrs(), progress)
    _remove_other_sources(feat_dir.parent, keep=feat_dir.name)
    cache = FeatureCache.for_encoder(work_dir / "cache", encoder)
    extract_bags(bags, feat_dir, encoder, cache, on_bad_tile=on_bad_tile, log=log, progress=progress)
    return feat_dir


def source_content_key(bags: list[Bag], encoder_attrs: dict, progress: Callable[[str, int, int], None] | None = None) -> str:
    """A digest of what the features of ``bags`` depend on: bag ids, labels, tile paths and tile bytes
    (in order) and the encoder configuration (name, preprocessing, precision, runtime)."""
    digests = tile_digests([Path(p) for b in bags for p in b.tile_paths], progress)
    h = hashlib.blake2b(json.dumps(encoder_attrs, sort_keys=True, default=str).encode(), digest_size=12)
    for b in bags:
        h.update(json.dumps([b.bag_id, b.label, [[str(p), digests[str(p)]] for p in b.tile_paths]]).encode())
    return h.hexdigest()


def _remove_other_sources(feat_root: Path, keep: str) -> None:
    """Delete the features of sources predicted before into the same CSV (and the flat per-bag-id files
    of older versions): they are never reused. A folder another process is writing is left alone."""
    if not feat_root.is_dir():
        return
    for child in feat_root.iterdir():
        if child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            try:
                with exclusive_output(child, "predict"):
                    shutil.rmtree(child)
            except HistomilError:
                continue
        else:
            child.unlink(missing_ok=True)


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
    *,
    slide_mpp: float | None = None,
    coords_dir: str | Path | None = None,
    allow_encoder_mismatch: bool = False,
    weights: str | Path | None = None,
    device: str = "cpu",
    task: str | None = None,
) -> list[dict]:
    """Write one CSV row per bag: probability, predicted class and its highest-attention tiles.

    Models of several classes write one ``prob_<class>`` column per class and the argmax class; regression
    and survival models their value or risk (:func:`histomil.evaluation.task_evaluate.prediction_fields`).
    ``task`` (classification, regression, survival): refuse a model trained for another.

    ``source``: image bag folders, a manifest CSV, or feature files of any layout (a folder or one
    file; see :mod:`histomil.features.formats`), each checked for the model
    (:func:`histomil.features.validate.check_bags_for_model`). ``top_tiles`` are ``x_y`` level-0
    pixels when the file locates its tiles (STAMP needs ``slide_mpp``; pt files ``coords_dir``), tile
    file names for image bags, row numbers otherwise. ``precision`` is that of the encoder (image
    bags) and the MIL head: ``auto`` resolves to bf16 where this machine computes it natively (half
    the head's CPU time on large bags), else fp32. ``device`` (cpu, cuda, cuda:N, auto): where the
    encoder and the head run.
    """
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    model, meta = load_checkpoint(checkpoint, dev)
    model_task = task_from_checkpoint(meta)
    if task is not None and task != model_task.name:
        raise HistomilError(f"{checkpoint}: the model was trained for {model_task.name}, not {task}")
    threshold = float(meta.get("threshold", 0.5)) if threshold is None else threshold
    out_csv = Path(out_csv)
    feat_dir = features_for_source(
        Path(source), meta.get("encoder_info") or {}, out_csv.parent / f".{out_csv.stem}-work", on_bad_tile, log, progress,
        precision, weights, str(dev),
    )
    bags = read_feature_source(feat_dir, slide_mpp=slide_mpp, coords_dir=coords_dir)
    check_bags_for_model(bags, meta, allow_encoder_mismatch=allow_encoder_mismatch, source=source)
    unplaced = [b for b in bags if b.coords is None and b.attrs.get("source_format") not in (None, "histomil")]
    if unplaced:
        first = unplaced[0].attrs
        warnings.warn(f"{first.get('source_file')}: top_tiles are row numbers ({len(unplaced)} bag(s) without level-0 "
                      f"coordinates: {first.get('coords_missing', 'none recorded')})", stacklevel=2)
    preds = predict(model, bags, precision=precision, task=model_task)
    rows = []
    for bag, (prob, attention) in zip(bags, preds):
        order = np.argsort(-attention)[:top_k] if attention is not None else []
        rows.append(
            {
                "bag_id": bag.bag_id,
                "n_tiles": len(bag),
                **prediction_fields(model_task, prob, threshold),
                "top_tiles": ";".join(tile_name(bag, int(j)) for j in order),
                "top_attention": ";".join(f"{attention[j]:.4f}" for j in order),
            }
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    write_text(out_csv, buf.getvalue())
    return rows


def is_feature_source(source: Path) -> bool:
    """Whether ``source`` is a feature file or a folder of them (any layout), not image bags."""
    if source.is_file():
        return source.suffix.lower() in FEATURE_SUFFIXES
    return is_feature_folder(source)


def read_feature_source(source: Path, *, slide_mpp: float | None = None, coords_dir: str | Path | None = None) -> list[FeatureBag]:
    """The bags of a feature file or folder for prediction (labels optional)."""
    if source.is_file():
        return [load_any_features(source, mpp=slide_mpp, coords_dir=coords_dir)]
    return load_features_folder(source, require_labels=False, mpp=slide_mpp, coords_dir=coords_dir)


def tile_name(bag: FeatureBag, row: int) -> str:
    """How a prediction names one tile: ``x_y`` level-0 pixels when known, else its file name or row."""
    if bag.coords is not None:
        x, y = (int(v) for v in bag.coords[row][:2])
        return f"{x}_{y}"
    return Path(bag.tile_paths[row]).name
