"""``histomil evaluate MODEL_OR_CV --table T --features F --target label``: external validation of the fold
models of a cohort cross-validation (and their ensemble) on another cohort table, classification,
regression or survival (``--time T --event E``); called by ``evaluate``."""

from __future__ import annotations

from pathlib import Path

from histomil.errors import HistomilError
from histomil.ui import log, progress_bars, show_result


def evaluate_table(
    model: Path,
    table: Path,
    features: Path | None,
    target: str | None,
    out: Path,
    *,
    clinical_table: Path | None = None,
    split: str = "auto",
    bag_level: str | None = None,
    classes: str | None = None,
    on_missing: str = "error",
    threshold: float | None = None,
    bootstrap: int | None = None,
    allow_encoder_mismatch: bool = False,
    slides: Path | None = None,
    slide_mpp: float | None = None,
    task: str | None = None,
    time: str | None = None,
    event: str | None = None,
) -> None:
    """Run :func:`histomil.evaluation.cohort_evaluate.evaluate_cohort` with the command's options and print its table."""
    from histomil.data.cohort import ON_MISSING
    from histomil.evaluation.cohort_evaluate import evaluate_cohort

    if features is None or not (target or event):
        raise HistomilError("--table needs --features (the folder of per-slide feature files) and --target (the label "
                            "or numeric column; survival: --time and --event)")
    if bag_level is not None and bag_level not in ("patient", "slide"):
        raise HistomilError(f"--bag-level must be patient or slide, not {bag_level!r}")
    if on_missing not in ON_MISSING:
        raise HistomilError(f"--on-missing must be one of {', '.join(ON_MISSING)}, not {on_missing!r}")
    if bootstrap is not None and bootstrap < 0:
        raise HistomilError(f"--bootstrap must be 0 (no intervals) or more resamples, got {bootstrap}")
    class_list = [c.strip() for c in classes.split(",")] if classes else None
    with progress_bars() as progress:
        evaluate_cohort(model, table, features, target, out, clinical_table=clinical_table, classes=class_list,
                        on_missing=on_missing, split=split, bag_level=bag_level, threshold=threshold,  # type: ignore[arg-type]
                        n_resamples=bootstrap, allow_encoder_mismatch=allow_encoder_mismatch, slides=slides,
                        slide_mpp=slide_mpp, task=task, time=time, event=event, log=log, progress=progress)
    show_result((out / "metrics.md").read_text())
    show_result(f"written to {out}")
