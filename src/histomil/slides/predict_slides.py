"""Predict unlabelled slides and draw where the model looked, in one call.

:func:`predict_slides` tiles, encodes (with the encoder the model was trained on, :func:`check_encoder`)
and predicts slides, or reads features extracted before by any tool (``features``,
:mod:`histomil.slides.cached`): a CSV with probability, class and top tiles per slide, plus a heatmap
and GeoJSON per slide (:mod:`histomil.slides.heatmap`) and, on request, one heatmap per class
(:mod:`histomil.slides.class_heatmaps`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from histomil.callbacks import Log, Progress
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.files import write_bytes
from histomil.slides.class_heatmaps import write_class_heatmaps
from histomil.slides.heatmap import SCALES, Scale, bag_scores, write_slide_heatmap
from histomil.slides.tiling import TilingSpec


def check_encoder(checkpoint: str | Path, meta: dict[str, Any], encoder: torch.nn.Module) -> None:
    """Refuse an encoder other than the one the model was trained on (features would mean nothing)."""
    info = meta.get("encoder_info") or {}
    have = encoder.info
    if int(meta.get("in_dim", have.dim)) != int(have.dim):
        raise HistomilError(
            f"{checkpoint}: the model takes {meta['in_dim']}-d features but encoder {have.name} gives {have.dim}-d"
        )
    for key, value in (("name", have.name), ("input_size", have.input_size), ("weights", have.weights)):
        if info.get(key) is not None and str(info[key]) != str(value):
            raise HistomilError(
                f"{checkpoint}: the model was trained on features of {info.get('name')} "
                f"({key} {info[key]}), not {have.name} ({key} {value})"
            )


def predict_slides(
    checkpoint: str | Path,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    spec: TilingSpec | None = None,
    *,
    csv_path: str | Path | None = None,
    coords_dir: str | Path | None = None,
    features: str | Path | None = None,
    tile_size_level0: int | None = None,
    allow_encoder_mismatch: bool = False,
    top_k: int = 5,
    threshold: float | None = None,
    scale: Scale = "rank",
    heatmaps: bool = True,
    encoder: torch.nn.Module | None = None,
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int = 1,
    on_bad_slide: Literal["error", "skip"] = "error",
    log: Log | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
    class_heatmaps: bool = False,
) -> list[dict[str, Any]]:
    """Predict unlabelled slides (tiling and encoding them, or from cached features); returns (and
    writes) one CSV row per slide.

    ``class_heatmaps`` (classification models, with ``heatmaps``): also one heatmap per class,
    ``heatmaps/<slide>_class-<name>.png`` (:mod:`histomil.slides.class_heatmaps`). Regression and survival
    models leave ``prob_positive`` and ``predicted_class`` empty and write their value or risk in
    ``prediction``; their heatmap is the attention.

    Writes into ``out_dir``: ``features/<slide>.h5`` (reused on a re-run), ``heatmaps/<slide>_heatmap.png``
    and ``heatmaps/<slide>_tiles.geojson`` (with ``heatmaps``), and ``predictions.csv`` (or
    ``csv_path``) with columns ``slide, n_tiles, prob_positive, predicted_class, top_tiles``
    (level-0 ``x_y`` of the ``top_k`` highest-scoring tiles), ``top_scores``, ``score``, ``heatmap``,
    ``geojson``, ``features``, ``error`` (why a skipped slide has no prediction).

    The encoder is the one named in the checkpoint, run in ``precision`` (``auto``: bf16 where this
    machine computes it natively, else fp32; see :mod:`histomil.hardware`);
    pass ``encoder`` to use an already-built one (it must match the checkpoint). The encoder runs on
    ``device`` (cpu, cuda, cuda:N, auto); the MIL head, small beside it, on the CPU.

    With ``features`` (a feature file, or a folder with ``<slide>.h5``/``.pt`` in any layout that
    :mod:`histomil.features.formats` reads) nothing is encoded: the tiles, and their size on the
    slide, come from those files, ``coords_dir`` (the tiler's coordinates files) or
    ``tile_size_level0`` (see :mod:`histomil.slides.cached`). Features of another dimension or another
    encoder than the model's are refused (the latter unless ``allow_encoder_mismatch``).
    """
    from histomil.features.encoders import build_encoder
    from histomil.features.validate import check_bags_for_model
    from histomil.slides.cached import find_feature_file, slide_bag_from_features
    from histomil.slides.features import extract_slide_features, find_slides
    from histomil.slides.reader import open_slide
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint

    if scale not in SCALES:
        raise HistomilError(f"unknown heatmap scale {scale!r}; choose one of {', '.join(SCALES)}")
    if top_k < 0:
        raise HistomilError(f"top_k must be >= 0, got {top_k}")
    spec = spec or TilingSpec()
    out_dir = Path(out_dir)
    model, meta = load_checkpoint(checkpoint)
    task = task_from_checkpoint(meta)
    if class_heatmaps and task.name != "classification":
        raise HistomilError(f"{checkpoint}: class-wise heatmaps need a classification model, this one is {task.name}")
    threshold = float(meta.get("threshold", 0.5)) if threshold is None else float(threshold)
    paths = find_slides(slides)
    bad: dict[str, str] = {}
    files: dict[str, Path] = {}
    if features is not None:
        if Path(features).is_file() and len(paths) > 1:
            raise HistomilError(f"{features}: one feature file for {len(paths)} slides; give a folder of <slide>.h5 files")
        for path in paths:
            try:
                files[path.stem] = find_feature_file(features, path.stem)
            except HistomilError as err:
                if on_bad_slide == "error":
                    raise
                bad[path.stem] = str(err)
    else:
        info = meta.get("encoder_info") or {}
        if encoder is None:
            if not info.get("name"):
                raise HistomilError(f"{checkpoint}: the model does not record its encoder, so slides cannot be encoded for it")
            try:
                encoder = build_encoder(str(info["name"]), precision=precision, channels_last=True, device=device)
            except HistomilError as err:
                raise HistomilError(f"{err} (features extracted before, by any tool: pass --features)") from None
        check_encoder(checkpoint, meta, encoder)
        summary = extract_slide_features(
            paths, out_dir / "features", encoder, spec, coords_dir=coords_dir, batch_size=batch_size,
            num_workers=num_workers, on_bad_slide=on_bad_slide, log=log, progress=progress,
        )
        bad = {p.stem: reason for p, reason in summary.skipped}
        files = summary.files

    def load(path: Path) -> FeatureBag:
        """The slide's bag, with level-0 coordinates and ``patch_size_level0`` (see slides.cached)."""
        given = features is not None
        with open_slide(path, mpp=spec.slide_mpp) as slide:
            bag = slide_bag_from_features(slide, files[path.stem], coords_dir if given else None,
                                          tile_size_level0 if given else None)
        check_bags_for_model([bag], meta, allow_encoder_mismatch=allow_encoder_mismatch)
        return bag

    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"slide": path.stem, "n_tiles": "", "prob_positive": "", "predicted_class": "",
                               "top_tiles": "", "top_scores": "", "score": "", "heatmap": "", "geojson": "",
                               "features": "", "error": bad.get(path.stem, "")}
        if task.name != "classification":
            row["prediction"] = ""
        if path.stem in files and path.stem not in bad:
            feat_path = files[path.stem]
            try:
                bag = load(path)
            except HistomilError as err:
                if on_bad_slide == "error":
                    raise
                row["error"] = str(err)
                rows.append(row)
                continue
            probs, scores, kind = bag_scores(model, bag)
            p = float(probs[1]) if len(probs) == 2 else float(np.max(probs))
            cls = int(p >= threshold) if len(probs) == 2 else int(np.argmax(probs))
            if task.name != "classification":  # a value or a risk, not class probabilities
                from histomil.training.trainer import predict

                value = float(predict(model, [bag], task=task)[0][0][0])
                row["prediction"] = round(value, 6)
                p, cls = value, ""
            order = np.argsort(-scores, kind="stable")[:top_k]
            row.update(
                n_tiles=len(bag), prob_positive=round(p, 6) if task.name == "classification" else "", predicted_class=cls,
                top_tiles=";".join(bag.tile_paths[j] for j in order),
                top_scores=";".join(f"{scores[j]:.6g}" for j in order), score=kind,
                features=str(feat_path.relative_to(out_dir)) if feat_path.is_relative_to(out_dir) else str(feat_path),
            )
            if heatmaps:
                png = out_dir / "heatmaps" / f"{path.stem}_heatmap.png"
                geo = out_dir / "heatmaps" / f"{path.stem}_tiles.geojson"
                title = f"{path.stem}: P(class {1 if len(probs) == 2 else cls}) = {p:.3f}, {len(bag)} tiles, {scale} scale"
                if task.name != "classification":
                    title = f"{path.stem}: {task.prediction_columns()[0]} {p:.4g}, {len(bag)} tiles, {scale} scale"
                write_slide_heatmap(path, bag.coords, scores, png, geo, patch_size_level0=int(bag.attrs["patch_size_level0"]),
                                    spec=spec,
                                    scale=scale, title=title, label=kind)
                row.update(heatmap=str(png.relative_to(out_dir)), geojson=str(geo.relative_to(out_dir)))
                if class_heatmaps:
                    from histomil.evaluation.task_evaluate import class_names

                    write_class_heatmaps(path, bag, model, task, out_dir / "heatmaps", class_names(task), spec)
            if log:
                log(f"{path.name}: p = {p:.3f} -> class {cls}" if task.name == "classification" else f"{path.name}: {p:.4g}")
        rows.append(row)
        if progress:
            progress("predicting slides", i + 1, len(paths))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(Path(csv_path) if csv_path is not None else out_dir / "predictions.csv", buf.getvalue().encode("utf-8"))
    return rows
