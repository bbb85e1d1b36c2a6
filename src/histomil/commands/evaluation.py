"""``histomil evaluate`` and ``histomil predict``: metrics on labelled test sets, predictions on new bags or slides."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histomil.config import check_range
from histomil.devices import DEVICE_HELP, resolve_device
from histomil.ui import log, progress_bars, show_result, user_errors


@user_errors
def evaluate_cmd(
    model: Path = typer.Argument(..., help="A model checkpoint (model.pt)."),
    test_sets: list[Path] = typer.Argument(..., help="One or more labelled feature folders."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, metrics.md, predictions and plots."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the one stored in the model, 0.5)."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Use features of another encoder than the model's (normally refused)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    task: Optional[str] = typer.Option(None, help="classification, regression or survival: refuse a model trained for another (default: the model's task)."),
    targets: Optional[Path] = typer.Option(None, help="Regression / survival: targets CSV of the test sets (default: targets.csv beside each)."),
) -> None:
    """Evaluate one model on several test sets: metrics table (JSON + markdown) and plots.

    Test sets are feature folders of any layout (histomil, CLAM, TRIDENT, STAMP) with a labels.csv."""
    from histomil.evaluation.evaluate import evaluate_sets

    check_range("--threshold", threshold, 0, 1)
    resolve_device(device)
    names = [p.name for p in test_sets]
    if len(set(names)) != len(names):
        names = [str(p) for p in test_sets]
    with progress_bars() as progress:
        results = evaluate_sets(model, dict(zip(names, test_sets)), out, threshold, progress,
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
