"""``histomil evaluate`` and ``histomil predict``: metrics on labelled test sets, predictions on new bags or slides."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histomil.config import check_range
from histomil.devices import DEVICE_HELP, resolve_device
from histomil.errors import HistomilError
from histomil.ui import log, progress_bars, show_result, user_errors


@user_errors
def evaluate_cmd(
    model: Path = typer.Argument(..., help="A model checkpoint (model.pt); with --table also a 'crossval --table' folder (each fold model and their ensemble)."),
    test_sets: Optional[list[Path]] = typer.Argument(None, help="One or more labelled feature folders (not with --table)."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, metrics.md, predictions and plots."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the one stored in the model, 0.5)."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Use features of another encoder than the model's (normally refused)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    task: Optional[str] = typer.Option(None, help="classification, regression or survival: refuse a model trained for another (default: the model's task)."),
    targets: Optional[Path] = typer.Option(None, help="Regression / survival: targets CSV of the test sets (default: targets.csv beside each)."),
    table: Optional[Path] = typer.Option(None, "--table", help="A cohort table (slide, patient, target[, split]) to evaluate on, patient-level, instead of feature folders."),
    features: Optional[Path] = typer.Option(None, "--features", help="With --table: folder of per-slide feature files <slide>.h5/.pt (any layout)."),
    target: Optional[str] = typer.Option(None, "--target", help="With --table: the label column (regression: the numeric column)."),
    time_column: Optional[str] = typer.Option(None, "--time", help="With --table, survival models: the follow-up time column (> 0)."),
    event_column: Optional[str] = typer.Option(None, "--event", help="With --table, survival models: the event column (1 = event, 0 = censored)."),
    clinical_table: Optional[Path] = typer.Option(None, "--clinical-table", help="With --table: per-patient table with the target (STAMP style); --table then maps slide -> patient."),
    split: str = typer.Option("auto", "--split", help="With --table: patients to evaluate: auto (split 'test' when the table has a split column, else all), test, train or all."),
    bag_level: Optional[str] = typer.Option(None, "--bag-level", help="With --table: patient or slide bags (default: the cross-validation's, else patient)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="With --table: class order, e.g. normal,tumor (default: the cross-validation's, else sorted)."),
    on_missing: str = typer.Option("error", "--on-missing", help="With --table: error, or skip slides without feature files / files without rows."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", help="With --table: bootstrap resamples of patients for the 95% intervals (0: none; default 1000, survival 200)."),
    slides: Optional[Path] = typer.Option(None, "--slides", help="With --table: folder of the slide files; the ensemble draws each patient bag's attention on every slide (OUT/heatmaps)."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="With --slides: scan um/px for slides whose header has none."),
) -> None:
    """Evaluate one model on several test sets: metrics table (JSON + markdown) and plots.

    With --table: every fold model of a cohort cross-validation and their ensemble on another cohort's
    patients (patient-level metrics with bootstrap intervals); classification, regression (--target, a
    numeric column) or survival (--time and --event; the fold models' mean risk stands for an ensemble).

    Test sets are feature folders of any layout (histomil, CLAM, TRIDENT, STAMP) with a labels.csv."""
    from histomil.evaluation.evaluate import evaluate_sets

    check_range("--threshold", threshold, 0, 1)
    resolve_device(device)
    if table is not None:
        from histomil.commands.cohort_eval import evaluate_table

        if test_sets:
            raise HistomilError("give feature folders or --table, not both")
        evaluate_table(model, table, features, target, out, clinical_table=clinical_table, split=split,
                       bag_level=bag_level, classes=classes, on_missing=on_missing, threshold=threshold,
                       bootstrap=bootstrap, allow_encoder_mismatch=allow_encoder_mismatch, slides=slides,
                       slide_mpp=slide_mpp, task=task, time=time_column, event=event_column)
        return
    if time_column is not None or event_column is not None:
        raise HistomilError("--time and --event go with --table (feature folders take their survival targets from targets.csv)")
    if not test_sets:
        raise HistomilError("give one or more labelled feature folders, or --table with --features and --target")
    names = [p.name for p in test_sets]
    if len(set(names)) != len(names):
        names = [str(p) for p in test_sets]
    with progress_bars() as progress:
        evaluate_sets(model, dict(zip(names, test_sets)), out, threshold, progress,
                      allow_encoder_mismatch=allow_encoder_mismatch, device=device, task=task, targets=targets)
    show_result((out / "metrics.md").read_text())  # the task's table (binary: metrics_markdown of the results)
    show_result(f"written to {out}")


@user_errors
def predict_cmd(
    model: Path = typer.Argument(..., help="A model checkpoint (model.pt)."),
    source: Path = typer.Argument(..., help="Unlabelled bag folders (one sub-folder of tiles per bag), a manifest CSV, or feature files (a folder or one file; histomil, CLAM, TRIDENT, STAMP)."),
    out: Path = typer.Option(..., "--out", help="CSV to write."),
    top_k: int = typer.Option(5, help="How many highest-attention tiles to list per bag."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the model's)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops; 'skip' logs bad tiles and leaves them out."),
    mpp: float = typer.Option(0.5, help="Slides only: tile resolution in micrometres per pixel."),
    slide_mpp: Optional[float] = typer.Option(None, help="The scan resolution (um/px) when the slide header has none; STAMP features: turns their micrometre coordinates into level-0 pixels."),
    coords: Optional[Path] = typer.Option(None, "--coords", help="Feature pt files: the CLAM/TRIDENT patches folder with their coordinates."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Use features of another encoder than the model's (normally refused)."),
    precision: str = typer.Option("auto", help="Bags: precision of the encoder (image bags) and the MIL head: auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16."),
    weights: Optional[Path] = typer.Option(None, help="Images and slides: weights file of the model's preset or timm: encoder (default: the local Hugging Face cache)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    task: Optional[str] = typer.Option(None, help="classification, regression or survival: refuse a model trained for another (default: the model's task)."),
) -> None:
    """Predict unlabelled bags or slides: probability, class and the tiles that drove the decision.

    A slide file or a folder of slides is tiled, encoded and predicted in one call, with a heatmap per
    slide (see also 'histomil predict-slides' for every tiling option).
    """
    from histomil.evaluation.predict import predict_source
    from histomil.slides.features import is_slide_source

    check_range("--threshold", threshold, 0, 1)
    check_range("--top-k", top_k, 0)
    resolve_device(device)
    if is_slide_source(source):
        from histomil.commands.slides import predict_slides_cmd

        predict_slides_cmd(model, [source], out, top_k=top_k, threshold=threshold, mpp=mpp, slide_mpp=slide_mpp,
                           on_bad_slide="skip" if on_bad_tile == "skip" else "error", weights=weights, device=device)
        return

    with progress_bars() as progress:
        rows = predict_source(model, source, out, top_k, threshold, on_bad_tile, log, progress, precision,
                              slide_mpp=slide_mpp, coords_dir=coords, allow_encoder_mismatch=allow_encoder_mismatch,
                              weights=weights, device=device, task=task)
    if rows and "prob_positive" in rows[0]:
        show_result(f"{len(rows)} bags predicted ({sum(r['predicted_class'] for r in rows)} positive); written to {out}")
    else:
        show_result(f"{len(rows)} bags predicted; written to {out}")
