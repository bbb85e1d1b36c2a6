"""External validation on a cohort table: each fold model of a cross-validation, and their ensemble,
evaluated on the patients of another table, with patient-level metrics and bootstrap 95% intervals.

``histomil evaluate cv/ --table external.csv --features F/ --target label --out o/``

``cv/`` is the folder of ``histomil crossval --table`` (fold models ``seed-S/fold-F/model.pt``, their
ensemble ``ensemble.pt``; its bag level and class order are reused) or a single ``model.pt``. The table is
read and matched to its feature files exactly as the cross-validation reads its own
(:mod:`histomil.data.cohort`); with a ``split`` column only the ``test`` patients are evaluated (``split``
option: ``auto``), so a table that also lists the training patients can be used as is. Each model decides
at the threshold it recorded (fold models: fitted on their validation patients; the ensemble: the mean of
those); nothing is fitted on the evaluated patients. Slide-level bags are averaged per patient.

Writes ``predictions_<model>.csv`` per model, ``metrics.json`` (per model, with intervals, and the mean ±
sd over the fold models), ``metrics.md``, for a binary target ``roc_pr.png`` and, given the slide files,
``heatmaps/`` with each patient bag's attention drawn on each of its slides.

The task comes from the models' checkpoints: regression and survival cross-validations
(``--target`` numeric; ``--time``/``--event``) are scored by :mod:`.cohort_evaluate_targets`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histomil.callbacks import Log, Progress
from histomil.data.cohort import Cohort, CohortColumns, load_slide_features, match_feature_files, read_cohort
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import summarize_runs
from histomil.evaluation.cohort_results import fold_metrics, write_fold_predictions
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.cv_summary import models_table
from histomil.features.validate import check_bags_for_model
from histomil.files import write_json, write_text

SPLITS = ("auto", "test", "train", "all")
# binary metrics, then the multi-class ones (evaluation/task_metrics.MULTICLASS_METRICS); each record has one set
SUMMARY_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "recall", "specificity", "pr_auc", "f1",
                   "macro_roc_auc", "macro_pr_auc", "f1_macro")


def find_models(source: str | Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """name -> checkpoint of a model file or of a cohort cross-validation folder (``fold-S-F`` per fold
    model, then ``ensemble``), and what that folder recorded (bag level, classes)."""
    source = Path(source)
    if source.is_file():
        return {"model": source}, {}
    if not source.is_dir():
        raise HistomilError(f"{source}: no such model file or cross-validation folder")
    folds = sorted(source.glob("seed-*/fold-*/model.pt"),
                   key=lambda p: tuple(int(n) for n in re.findall(r"\d+", str(p.relative_to(source)))))
    models = {f"fold-{p.parent.parent.name.removeprefix('seed-')}-{p.parent.name.removeprefix('fold-')}": p for p in folds}
    if (source / "ensemble.pt").is_file():
        models["ensemble"] = source / "ensemble.pt"
    if not models:
        raise HistomilError(f"{source}: holds no seed-*/fold-*/model.pt and no ensemble.pt (not a 'crossval --table' folder)")
    recorded: dict[str, Any] = {}
    for name in ("metrics.json", "config.json"):
        try:
            doc = json.loads((source / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bag_level", "classes"):
            if doc.get(key) and key not in recorded:
                recorded[key] = doc[key]
    return models, recorded


def patients_to_evaluate(cohort: Cohort, split: str) -> list[str]:
    """The patients of ``split``: ``auto`` = the ``test`` patients when the table has a split column, else all."""
    if split not in SPLITS:
        raise HistomilError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if split == "all" or (split == "auto" and cohort.patient_split is None):
        return cohort.patients
    if cohort.patient_split is None:
        raise HistomilError(f"{cohort.source}: --split {split} needs a split column, and the table has none")
    wanted = "test" if split == "auto" else split
    chosen = [p for p in cohort.patients if cohort.patient_split.get(p) == wanted]
    if not chosen:
        raise HistomilError(f"{cohort.source}: no patient has split {wanted!r}")
    return chosen


def subset_cohort(cohort: Cohort, patients: Sequence[str]) -> Cohort:
    """The cohort restricted to ``patients`` (their slides, labels and feature files)."""
    keep = set(patients)

    def only(d: dict | None) -> dict | None:
        return None if d is None else {p: v for p, v in d.items() if p in keep}

    slides = {s: p for s, p in cohort.slide_patient.items() if p in keep}
    return Cohort(
        source=cohort.source, target=cohort.target, classes=list(cohort.classes), slide_patient=slides,
        patient_label=only(cohort.patient_label), patient_target=only(cohort.patient_target),  # type: ignore[arg-type]
        slide_line={s: n for s, n in cohort.slide_line.items() if s in slides},
        patient_split=only(cohort.patient_split), patient_fold=only(cohort.patient_fold),
        patient_group=only(cohort.patient_group),
        feature_files={s: f for s, f in cohort.feature_files.items() if s in slides},
    )


TASKS = ("classification", "regression", "survival")


def models_task(models: dict[str, Path], wanted: str | None = None) -> str:
    """The task every model was trained for (their checkpoints record it; older ones are classifiers);
    models of several tasks, or of another task than ``wanted``, are one error line."""
    from histomil.training.checkpoint_file import read_model_checkpoint

    if wanted is not None and wanted not in TASKS:
        raise HistomilError(f"--task must be one of {', '.join(TASKS)}, not {wanted!r}")
    kinds: dict[str, Path] = {}
    for path in models.values():
        data = read_model_checkpoint(path)
        state = data.get("task") or (data.get("extra") or {}).get("task")
        kind = str((state.get("name") if isinstance(state, dict) else state) or "classification")
        if wanted is not None and kind != wanted:
            raise HistomilError(f"{path}: the model was trained for {kind}, not {wanted}")
        kinds.setdefault(kind, path)
    if len(kinds) > 1:
        raise HistomilError("the models mix tasks: " + ", ".join(f"{k} ({p})" for k, p in kinds.items()))
    return next(iter(kinds))


def target_column(kind: str, target: str | None, classes: Sequence[str] | None, time: str | None,
                  event: str | None) -> str:
    """The table column the models of task ``kind`` are scored against (survival: the event column),
    after refusing options of another task in one line, as ``crossval`` does."""
    if kind != "classification" and classes is not None:
        raise HistomilError(f"--classes does not apply to {kind} models (they predict "
                            f"{'a number' if kind == 'regression' else 'a risk'}, not classes)")
    if kind != "survival":
        given = "--time" if time is not None else "--event" if event is not None else None
        if given:
            raise HistomilError(f"{given} applies to survival models; these are {kind} models")
    elif event is not None:
        if target is not None and target != event:
            raise HistomilError("--event is the target of survival models; give --event or --target, not both")
        target = event
    if kind == "survival" and (time is None or target is None):
        raise HistomilError("survival models need --time (the follow-up time column) and --event (1 = event, 0 = censored)")
    if not target:
        raise HistomilError("--target: the column to score the models against is missing")
    return target


def patient_truth(kind: str, cohort: Cohort, table: str | Path, clinical_table: str | Path | None,
                  columns: CohortColumns, time: str | None) -> tuple[Any, str]:
    """(each patient's truth, one line describing the patients) of regression (patient -> value) or survival
    (:class:`~.survival_cv.PatientSurvival`) models, read and checked as ``crossval`` reads them."""
    if kind == "regression":
        from histomil.evaluation.regression_cv import TARGET_COLUMN, describe_values
        from histomil.evaluation.target_cv import patient_numbers

        values = patient_numbers(cohort, table, cohort.target, TARGET_COLUMN, clinical_table, columns.slide, columns.patient)
        return values, describe_values(cohort, values)
    from histomil.evaluation.survival_cv import patient_survival

    surv = patient_survival(cohort, table, str(time), clinical_table, columns.slide, columns.patient)
    return surv, (f"{len(cohort.patients)} patients, {len(cohort.slides)} slides; {sum(surv.event.values())} events, "
                  f"{len(surv.event) - sum(surv.event.values())} censored")


def _evaluate_targets(head: dict[str, Any], models: dict[str, Path], source: CohortSource, bags: Sequence, truth: Any,
                      out: Path, check: Callable[[Any], None], progress: Progress | None) -> dict[str, Any]:
    """Score regression or survival models (``head["task"]``) against ``truth`` (:func:`patient_truth`);
    write and return metrics.json's content (``head`` first) and metrics.md."""
    from histomil.evaluation import cohort_evaluate_targets as targets

    cohort, n = source.cohort, head["bootstrap_resamples"]
    if head["task"] == "regression":
        part = targets.evaluate_regression_models(models, source, bags, truth, out, n_resamples=n, check=check,
                                                  title=f"{cohort.target}, {len(cohort.patients)} patients", progress=progress)
    else:
        part = targets.evaluate_survival_models(models, source, bags, truth, out, n_resamples=n, check=check,
                                                title=f"{len(cohort.patients)} patients", progress=progress)
    summary = {**head, **part}
    write_json(out / "metrics.json", summary)
    write_text(out / "metrics.md", targets.target_markdown(summary))
    return summary


def evaluate_cohort(
    model_or_cv: str | Path,
    table: str | Path,
    features: str | Path,
    target: str | None,
    out: str | Path,
    *,
    clinical_table: str | Path | None = None,
    columns: CohortColumns = CohortColumns(),
    classes: Sequence[str] | None = None,
    on_missing: Literal["error", "skip"] = "error",
    split: str = "auto",
    bag_level: str | None = None,
    threshold: float | None = None,
    n_resamples: int | None = None,
    bins: int = 10,
    task: str | None = None,
    time: str | None = None,
    event: str | None = None,
    allow_encoder_mismatch: bool = False,
    slides: str | Path | None = None,
    slide_mpp: float | None = None,
    log: Log | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate every model of ``model_or_cv`` on the table's patients; write and return ``metrics.json``'s content.

    The task is the models' (``task``: refuse models of another). Regression: ``target`` is the numeric
    column; survival: ``time`` and ``event`` (or ``target``) the columns ``crossval`` takes
    (:mod:`.cohort_evaluate_targets`). ``n_resamples``: default 1000, survival 200. With ``slides`` (a
    folder of the slide files), the ensemble (or the first model) also draws each evaluated patient's bag
    attention on every slide of the patient (:func:`patient_heatmaps`)."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.trainer import predict

    out = Path(out)
    models, recorded = find_models(model_or_cv)
    kind = models_task(models, task)
    target = target_column(kind, target, classes, time, event)
    if threshold is not None and kind != "classification":
        raise HistomilError(f"{model_or_cv}: --threshold applies to classifiers, not these {kind} models")
    if n_resamples is None:
        n_resamples = 200 if kind == "survival" else 1000
    if kind == "classification" and classes is None and recorded.get("classes"):
        classes = [str(c) for c in recorded["classes"]]
    level = bag_level or recorded.get("bag_level") or "patient"
    cohort = read_cohort(table, target, clinical_table=clinical_table, columns=columns, classes=classes,
                         on_missing=on_missing, numeric=kind == "regression")
    cohort = match_feature_files(cohort, features, on_missing)
    patients = patients_to_evaluate(cohort, split)
    cohort = subset_cohort(cohort, patients)
    truth, about = (None, cohort.describe()) if kind == "classification" else patient_truth(
        kind, cohort, table, clinical_table, columns, time)
    if log:
        log(f"evaluating {len(models)} {kind} model(s) on {about}, bags per {level}")
    source = CohortSource(cohort, level, load_slide_features(cohort))  # type: ignore[arg-type]
    bags = source.bags(cohort.patients)
    if kind != "classification":
        head = {"format": "histomil-cohort-evaluation", "task": kind, "models_from": str(model_or_cv),
                "table": cohort.source, "features": str(features),
                **({"time": time, "event": target} if kind == "survival" else {"target": target}),
                "split": split, "bag_level": level, "n_patients": len(cohort.patients), "n_slides": len(cohort.slides),
                "bootstrap_resamples": n_resamples}
        summary = _evaluate_targets(head, models, source, bags, truth, out,
                                    lambda meta: check_bags_for_model(bags, meta, allow_encoder_mismatch=allow_encoder_mismatch,
                                                                      source=features), progress)
        if slides is not None:
            name = "ensemble" if "ensemble" in models else next(iter(models))
            patient_heatmaps(load_checkpoint(models[name])[0], bags, slides, out / "heatmaps", slide_mpp, progress)
        return summary
    binary = len(cohort.classes) == 2
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (name, path) in enumerate(models.items()):
        model, meta = load_checkpoint(path)
        n_classes = int(meta.get("n_classes", len(cohort.classes)))
        if n_classes != len(cohort.classes):
            raise HistomilError(f"{path}: the model predicts {n_classes} classes, the table has "
                                f"{len(cohort.classes)} ({', '.join(cohort.classes)})")
        check_bags_for_model(bags, meta, allow_encoder_mismatch=allow_encoder_mismatch, source=features)
        names, probs = source.per_patient(bags, np.stack([p for p, _ in predict(model, bags)]))
        y = source.labels(names)
        cut = (threshold if threshold is not None else float(meta.get("threshold", 0.5))) if binary else None
        write_fold_predictions(out / f"predictions_{name}.csv", names, y, probs, cut, cohort.classes)
        results[name] = {"checkpoint": str(path), "n_patients": len(names),
                         **fold_metrics(y, probs, cut, n_resamples, bins)}
        if binary:
            curves[name] = (y, probs[:, 1])
        if progress:
            progress("evaluating models", i + 1, len(models))
    folds = [m for n, m in results.items() if n.startswith("fold-")]
    summary: dict[str, Any] = {
        "format": "histomil-cohort-evaluation", "task": "classification", "models_from": str(model_or_cv), "table": cohort.source,
        "features": str(features), "target": target, "classes": cohort.classes, "positive_class": cohort.positive_class,
        "split": split, "bag_level": level, "n_patients": len(cohort.patients), "n_slides": len(cohort.slides),
        "class_counts": cohort.class_counts(), "bootstrap_resamples": n_resamples, "models": results,
    }
    if len(folds) > 1:
        summary["fold_models_mean"] = summarize_runs(folds, SUMMARY_METRICS)
    write_json(out / "metrics.json", summary)
    write_text(out / "metrics.md", evaluation_markdown(summary))
    if curves:
        from histomil.reports.plots import plot_roc_pr

        plot_roc_pr(curves, out / "roc_pr.png")
    if slides is not None:
        name = "ensemble" if "ensemble" in models else next(iter(models))
        patient_heatmaps(load_checkpoint(models[name])[0], bags, slides, out / "heatmaps", slide_mpp, progress)
    return summary


def patient_heatmaps(model, bags: Sequence, slides: str | Path, out: Path, slide_mpp: float | None = None,
                     progress: Progress | None = None) -> list[Path]:
    """``<slide>_heatmap.png`` and ``<slide>_tiles.geojson`` for every slide of every bag: the attention of
    the whole bag (a patient's slides together) drawn on each slide, so the slides of one patient share
    one scale of attention (``localise`` reads the GeoJSON files)."""
    from histomil.evaluation.localisation import attention_by_slide
    from histomil.slides.features import find_slides
    from histomil.slides.heatmap import write_slide_heatmap
    from histomil.slides.tiling import TilingSpec

    files = {p.stem: p for p in find_slides([slides])}
    spec = TilingSpec(slide_mpp=slide_mpp)
    written: list[Path] = []
    for i, bag in enumerate(bags):
        for slide, tiles in attention_by_slide(model, [bag]).items():
            if slide not in files:
                raise HistomilError(f"{slides}: no slide file for slide {slide} (patient {bag.attrs.get('patient', bag.bag_id)})")
            png, geo = write_slide_heatmap(files[slide], tiles.coords, tiles.scores, out / f"{slide}_heatmap.png",
                                           out / f"{slide}_tiles.geojson", patch_size_level0=tiles.size, spec=spec,
                                           title=f"{slide}: attention of patient {bag.attrs.get('patient', bag.bag_id)}'s bag")
            written += [png, geo]  # type: ignore[list-item]
        if progress:
            progress("patient heatmaps", i + 1, len(bags))
    return written


def evaluation_markdown(summary: dict[str, Any]) -> str:
    """One row per model (metric with its 95% interval) and a row of mean ± sd over the fold models."""
    keys = ("roc_auc", "macro_roc_auc", "balanced_accuracy", "accuracy", "recall", "specificity", "f1_macro")
    return "\n".join(models_table(summary, keys)) + "\n"
