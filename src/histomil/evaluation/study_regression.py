"""Regression on composed tile studies: predict each bag's tumour fraction instead of its class.

A composed study knows every bag's tumour fraction exactly (W tumour tiles of ``bag_size``, 0 for a
negative bag): :func:`~histomil.data.compose.compose_study` writes it to each split's ``targets.csv``
(``case,target``) and feature extraction copies it beside the feature files. With ``train.task:
regression`` (``train.loss`` mse or huber), ``histomil run`` and ``histomil crossval`` train on that
value and score each test set (one per W) with :func:`~.task_metrics.regression_metrics`: MAE, RMSE, R²,
Pearson and Spearman, each with a bootstrap interval. There is no decision threshold (a classification
concept): none is fitted, stored or applied, and a config that sets one is refused.

Per cross-validation fold: ``predictions_<set>.csv`` (``bag_id,target,prediction``; also for the
validation bags) and the fold record in ``metrics.json``; over all runs (:func:`summarize_regression`),
per test set, the mean ± sd of each metric over runs and the metrics of all runs' predictions pooled
(bootstrap interval), with a predicted-vs-true scatter plot (``scatter.png``) and ``crossval.md``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.data.targets import load_task_bags
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import summarize_runs
from histomil.evaluation.cv_summary import runs_by_test_set
from histomil.evaluation.regression_cv import METRICS, scores
from histomil.features.formats import load_feature_dataset
from histomil.features.store import FeatureBag
from histomil.files import write_text
from histomil.reports.task_plots import plot_regression_scatter
from histomil.training.trainer import predict

PredictionsPath = Callable[[Mapping[str, Any], str], Path]  # (fold record, set name) -> its predictions CSV
STUDY_TASKS = ("classification", "regression")  # a composed bag has a class and a tumour fraction, no survival


def check_study_task(task: str, threshold_set: bool, ensemble_seeds: int = 1) -> None:
    """Refuse what a composed study cannot do with ``task`` (raised as ValueError, so a config names it):
    survival (no follow-up times), and with regression a threshold or a seed ensemble (class probabilities)."""
    if task not in STUDY_TASKS:
        raise ValueError(f"train.task {task!r} does not apply to a composed study: its bags have a class"
                         " (classification) and a tumour fraction (regression)")
    if task == "regression" and threshold_set:
        raise ValueError("threshold applies to classification only: a regression predicts the tumour fraction itself")
    if task == "regression" and ensemble_seeds > 1:
        raise ValueError("ensemble_seeds averages class probabilities: use it with train.task classification")


def load_study_bags(folder: Path, task: str) -> list[FeatureBag]:
    """A composed split's feature bags with what ``task`` trains on: the class (labels.csv) or the tumour
    fraction (targets.csv beside the feature files)."""
    if task == "classification":
        return load_feature_dataset(folder, require_labels=True)
    if not (folder / "targets.csv").is_file():
        raise HistomilError(f"{folder}: no targets.csv (tumour fractions); the study was composed by an older "
                            "histomil: compose it again (use another output folder) to train a regression")
    return load_task_bags(folder, task)


def write_regression_predictions(path: Path, bags: Sequence[FeatureBag], pred: np.ndarray) -> np.ndarray:
    """``bag_id,target,prediction`` per bag; returns the true values."""
    y = np.array([float(b.target[0]) for b in bags], dtype=np.float64)  # type: ignore[index]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "target", "prediction"])
    for b, t, p in zip(bags, y.tolist(), pred.tolist()):
        w.writerow([b.bag_id, repr(t), repr(float(p))])
    write_text(path, buf.getvalue())
    return y


def read_regression_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(target, prediction) arrays from a CSV written by :func:`write_regression_predictions`."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return (np.array([float(r["target"]) for r in rows], dtype=np.float64),
                np.array([float(r["prediction"]) for r in rows], dtype=np.float64))
    except (OSError, KeyError, ValueError) as exc:
        raise HistomilError(f"{path}: unreadable predictions ({exc}); delete the fold's metrics.json to redo it") from None


def evaluate_regression_set(model: Any, task: Any, bags: Sequence[FeatureBag], pred_csv: Path, n_resamples: int,
                            boot_seed: int) -> dict[str, Any]:
    """Predict ``bags`` (tumour fractions), write their predictions CSV, return the set's metrics
    (``n``, each metric's value and, when resampling, its interval under ``ci``)."""
    pred = np.array([float(p[0]) for p, _ in predict(model, bags, task=task)], dtype=np.float64)
    y = write_regression_predictions(pred_csv, bags, pred)
    return scores(y, pred, n_resamples, boot_seed)


def regression_fold(model_path: Path, val_bags: Sequence[FeatureBag], test_sets: Mapping[str, Path], fold_dir: Path,
                    n_resamples: int, boot_seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fold's validation and test-set metrics (predictions written to ``fold_dir``): ``(val, {set: metrics})``."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint

    model, meta = load_checkpoint(model_path)
    task = task_from_checkpoint(meta)
    val = evaluate_regression_set(model, task, val_bags, fold_dir / "predictions_val.csv", 0, boot_seed)
    results = {name: evaluate_regression_set(model, task, load_study_bags(folder, task.name),
                                             fold_dir / f"predictions_{name}.csv", n_resamples, boot_seed)
               for name, folder in test_sets.items()}
    return val, results


def fold_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The log line of a finished fold: its first test set's MAE and Spearman."""
    name = next(iter(results))
    return f"{name}: MAE {_fmt(results[name]['mae'])}, Spearman {_fmt(results[name]['spearman'])}"


def summarize_regression(records: Sequence[Mapping[str, Any]], predictions: PredictionsPath, out: Path,
                         bootstrap_resamples: int, plots: bool = True) -> dict[str, Any]:
    """Per test set over all runs: mean ± sd of each metric (:func:`~.bootstrap.summarize_runs`) and the
    metrics of all runs' predictions pooled; ``scatter.png`` of the pooled predictions (unless ``plots`` is False)."""
    sets: dict[str, Any] = {}
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, runs in runs_by_test_set(records).items():
        pairs = [read_regression_predictions(predictions(r, name)) for r in runs]
        y, pred = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        pooled = scores(y, pred, bootstrap_resamples, 0)
        over_runs = summarize_runs([r["test_sets"][name] for r in runs], METRICS)
        sets[name] = {
            "n_runs": len(runs), "n_bags_pooled": int(y.size),
            "metrics": {m: {**over_runs[m], "pooled": ({k: pooled["ci"][m][k] for k in ("value", "low", "high")}
                                                       if bootstrap_resamples else {"value": pooled[m]})}
                        for m in METRICS},
        }
        scatter[name] = (y, pred)
    files = {}
    if plots and scatter:
        plot_regression_scatter(scatter, out / "scatter.png", "tumour fraction: predictions of every run, pooled")
        files["scatter"] = "scatter.png"
    runs_doc = [{"seed": r["seed"], "fold": r["fold"], "best_epoch": r.get("best_epoch"), "epochs_run": r.get("epochs_run"),
                 "val": {m: r["val"].get(m) for m in METRICS}} for r in records]
    return {"task": "regression", "target": "tumour fraction (W / bag_size)", "n_runs": len(records),
            "bootstrap_resamples": bootstrap_resamples, "test_sets": sets, "runs": runs_doc, "files": files}


def regression_crossval_markdown(summary: Mapping[str, Any]) -> str:
    """crossval.md of a regression: per test set, each metric as mean ± sd over runs and pooled [95% CI]."""
    lines = [
        f"# Cross-validation: tumour fraction (regression), {summary['folds']} folds x {len(summary['seeds'])} seed(s)"
        f" = {summary['n_runs']} runs",
        "",
        f"{summary['n_patients']} patients ({summary['n_holdout_patients']} held out). Each cell: mean ± sd over runs;"
        " below it, all runs' predictions pooled [bootstrap 95% CI]. No threshold: the model predicts W / bag_size.",
        "",
        "| test set | runs | " + " | ".join(METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for name, s in summary["test_sets"].items():
        cells = [f"{_fmt(s['metrics'][m]['mean'])} ± {_fmt(s['metrics'][m]['std'])}" for m in METRICS]
        lines.append(f"| {name} | {s['n_runs']} | " + " | ".join(cells) + " |")
        pooled = [_pooled_cell(s["metrics"][m]["pooled"]) for m in METRICS]
        lines.append(f"| {name}, pooled | {s['n_bags_pooled']} bags | " + " | ".join(pooled) + " |")
    return "\n".join(lines) + "\n"


def _pooled_cell(p: Mapping[str, Any]) -> str:
    return _fmt(p["value"]) + (f" [{_fmt(p['low'])}, {_fmt(p['high'])}]" if "low" in p else "")


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v is not None and math.isfinite(float(v)) else "n/a"


__all__ = ["STUDY_TASKS", "check_study_task", "evaluate_regression_set", "fold_line", "load_study_bags",
           "read_regression_predictions", "regression_crossval_markdown", "regression_fold", "summarize_regression",
           "write_regression_predictions"]
