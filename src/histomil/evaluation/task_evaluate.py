"""Evaluation files of models whose target is not two classes: several classes, a value, a survival time.

:func:`histomil.evaluation.evaluate.evaluate_sets` hands models of these tasks here (binary classifiers
keep their threshold-based evaluation). Per test set ``<name>``:

* ``predictions_<name>.csv``: ``bag_id``, the truth (``y_true``; ``target``; ``time``, ``event``), the
  task's prediction columns (``prob_<class>`` per class; ``prediction``; ``risk``) and, for classes,
  ``y_pred`` (the argmax);
* classes: ``confusion_<name>.png`` (counts and row percentages), ``roc_pr_<name>.png`` (one-vs-rest
  curves per class), ``calibration_<name>.png`` (one-vs-rest reliability per class);
* survival: ``km_<name>.png``, Kaplan-Meier curves of the bags above and below the model's median
  predicted risk on its *training* bags, with the log-rank p (the set's ``risk_groups`` record the
  ``cut`` and ``cut_from``).

and for all sets ``metrics.json`` (every metric with its bootstrap interval), ``metrics.md`` and, for
regression, ``scatter.png`` (predicted vs true). Survival metrics take the censoring distribution (Uno's
c-index, time-dependent AUC, integrated Brier score) from the training targets, at evaluation times
inside the training follow-up, as a cross-validation fold does (:mod:`.survival_report`). The IBS needs
survival curves: a discrete-time model has its own; a Cox model's come from the Breslow baseline of the
training bags' stored risks. All of it comes from the checkpoint (``survival_train``). A checkpoint
without it (an older histomil) falls back to each test set's own median and censoring distribution, with
a warning and a note under ``survival_reference`` in metrics.json; a Cox checkpoint that stores no
training risks (written before they were) gets no IBS, also said in that note.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.evaluation.survival_report import NO_REFERENCE, TrainingReference, held_out_times, stored_reference
from histomil.evaluation.task_metrics import multiclass_metrics, regression_metrics
from histomil.files import write_json, write_text
from histomil.reports.plots import plot_confusion_matrix, plot_roc_pr
from histomil.reports.task_plots import plot_regression_scatter
from histomil.training.survival_task import SurvivalTask
from histomil.training.task_base import Task

SetPredictions = tuple[Sequence[Any], Sequence[tuple[np.ndarray, np.ndarray]]]  # bags, (outputs, attention) per bag


def is_binary(task: Task) -> bool:
    """Whether a model of ``task`` is a two-class classifier (evaluated with a threshold)."""
    return task.name == "classification" and task.output_size() == 2


def class_names(task: Task) -> list[str]:
    """The class names a classification task was given (``task_options.class_names``), else 0..C-1."""
    names = task.options.get("class_names")
    return [str(n) for n in names] if names else [str(c) for c in range(task.output_size())]


def set_metrics(task: Task, y: np.ndarray, outputs: np.ndarray, n_resamples: int = 1000,
                reference: TrainingReference | None = None) -> dict[str, Any]:
    """The metrics of one set (see the module docstring) from the truth ``y`` and ``task.predict`` rows;
    ``reference``: a survival model's training bags (None: the set is its own censoring distribution)."""
    if task.name == "classification":
        return multiclass_metrics(y, outputs, class_names(task), n_resamples=n_resamples)
    if task.name == "regression":
        return regression_metrics(y, outputs[:, 0], n_resamples=n_resamples)
    from histomil.evaluation.survival import survival_bootstrap_ci, survival_targets

    targets = survival_targets(y[:, 0], y[:, 1], "test set")
    if reference is None:
        return {"n": int(len(y)), "n_events": int(y[:, 1].sum()),
                **survival_bootstrap_ci(targets, outputs[:, 0], n_resamples=n_resamples)}
    times = held_out_times(reference.targets, targets)
    # survival probabilities for the IBS: a discrete-time model's own, a Cox model's by the training Breslow baseline
    discrete = isinstance(task, SurvivalTask) and task.loss_name == "discrete"
    survival = task.survival_at(outputs, times) if discrete else reference.breslow(outputs[:, 0], times)
    metrics = survival_bootstrap_ci(targets, outputs[:, 0], reference.targets, times, survival, n_resamples=n_resamples)
    return {"n": int(len(y)), "n_events": int(y[:, 1].sum()), **metrics, "times": times.tolist()}


def evaluate_task_sets(
    task: Task,
    sets: Mapping[str, SetPredictions],
    out_dir: str | Path,
    header: Mapping[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
    n_resamples: int = 1000,
    survival_train: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """Metrics, predictions and plots of every set (see the module docstring); ``header`` goes on top of
    metrics.json (checkpoint, environment). ``survival_train``: a survival checkpoint's record of its
    training bags (None: fall back to each set's own, with a warning). Returns ``{set: metrics}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    about: dict[str, Any] = {}
    reference = None
    if task.name == "survival":
        source = str(header.get("checkpoint", "the model"))
        reference = stored_reference(survival_train, source)
        cox = isinstance(task, SurvivalTask) and task.loss_name == "cox"
        about["survival_reference"] = reference.summary(cox) if reference else {"source": "test set", "note": NO_REFERENCE}
        if reference is None:
            warnings.warn(f"{source}: {NO_REFERENCE}", stacklevel=2)
    results: dict[str, dict] = {}
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (name, (bags, preds)) in enumerate(sets.items()):
        y = task.targets(bags, f"test set {name}:")
        outputs = np.stack([np.asarray(p, dtype=np.float64) for p, _ in preds])
        results[name] = set_metrics(task, y, outputs, n_resamples, reference)
        write_text(out_dir / f"predictions_{name}.csv", predictions_csv(task, bags, outputs))
        _plots(task, name, y, outputs, results[name], out_dir, reference)
        if task.name == "regression":
            scatter[name] = (y, outputs[:, 0])
        if progress:
            progress("evaluating test sets", i + 1, len(sets))
    write_json(out_dir / "metrics.json", {**header, "task": task.state(), **about, "results": results})
    write_text(out_dir / "metrics.md", task_markdown(task, results))
    if scatter:
        plot_regression_scatter(scatter, out_dir / "scatter.png")
    return results


def _plots(task: Task, name: str, y: np.ndarray, outputs: np.ndarray, metrics: dict, out_dir: Path,
           reference: TrainingReference | None) -> None:
    if task.name == "classification":
        names = class_names(task)
        plot_confusion_matrix(metrics["confusion_matrix"], out_dir / f"confusion_{name}.png", title=name, class_names=names)
        one_vs_rest = {c: ((y == k).astype(int), outputs[:, k]) for k, c in enumerate(names)}
        plot_roc_pr(one_vs_rest, out_dir / f"roc_pr_{name}.png", title=f"{name}: one class vs the rest")
        from histomil.evaluation.calibration import plot_reliability

        plot_reliability(one_vs_rest, out_dir / f"calibration_{name}.png", title=f"{name}: calibration per class (one vs rest)")
    elif task.name == "survival":
        from histomil.evaluation.survival import survival_targets
        from histomil.evaluation.survival_plots import plot_km_risk_groups

        risk = outputs[:, 0]
        if reference is not None:
            cut, cut_from = reference.median_risk, "training median risk"
            label = f"split at the training median risk {cut:.3g}"
        else:
            cut, cut_from = float(np.median(risk)), "set median risk"
            label = f"split at the set's own median risk {cut:.3g} (the model stores no training risks)"
        groups = plot_km_risk_groups(survival_targets(y[:, 0], y[:, 1], f"test set {name}"), risk, cut,
                                     out_dir / f"km_{name}.png", title=name, cut_label=label)
        metrics["risk_groups"] = {**groups, "cut_from": cut_from}


def predictions_csv(task: Task, bags: Sequence[Any], outputs: np.ndarray) -> str:
    """The per-bag prediction table (see the module docstring) as CSV text."""
    truth = {"classification": ["y_true"], "regression": ["target"], "survival": ["time", "event"]}[task.name]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", *truth, *task.prediction_columns(), *(["y_pred"] if task.name == "classification" else [])])
    for b, out in zip(bags, outputs):
        true = [b.label] if task.name == "classification" else list(b.target or ())
        row = [b.bag_id, *true, *(f"{v:.6g}" for v in out)]
        if task.name == "classification":
            row.append(int(np.argmax(out)))
        w.writerow(row)
    return buf.getvalue()


def task_markdown(task: Task, results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per set: each headline metric as value [low, high]; survival adds ``ibs`` (lower is
    better) when some set has it."""
    columns = {
        "classification": ["accuracy", "balanced_accuracy", "macro_roc_auc", "macro_pr_auc"],
        "regression": ["mae", "rmse", "r2", "pearson", "spearman"],
        "survival": ["cindex_harrell", "cindex_uno", "td_auc"],
    }[task.name]
    if task.name == "survival" and any("ibs" in m for m in results.values()):
        columns = [*columns, "ibs"]
    lines = ["| test set | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, m in results.items():
        cells = [_with_ci(m.get(c)) for c in columns]
        lines.append(f"| {name} | {m.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_ci(entry: Any) -> str:
    if not isinstance(entry, Mapping) or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "n/a"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def prediction_fields(task: Task, outputs: np.ndarray, threshold: float) -> dict[str, Any]:
    """What ``histomil predict`` writes for one bag: binary ``prob_positive`` and ``predicted_class`` (at
    ``threshold``); several classes one ``prob_<class>`` each and the argmax class; otherwise the task's
    prediction columns (``prediction``; ``risk``...)."""
    if is_binary(task):
        p = float(outputs[1])
        return {"prob_positive": round(p, 6), "predicted_class": int(p >= threshold)}
    fields: dict[str, Any] = {c: round(float(v), 6) for c, v in zip(task.prediction_columns(), outputs)}
    if task.name == "classification":
        fields["predicted_class"] = int(np.argmax(outputs))
        names = task.options.get("class_names")
        if names:
            fields["predicted_name"] = str(names[int(np.argmax(outputs))])
    return fields
