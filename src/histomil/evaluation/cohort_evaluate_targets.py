"""External validation of regression and survival cross-validations on a cohort table, the part of
``histomil evaluate CV --table`` (:mod:`.cohort_evaluate`) for models whose target is not a class.

:func:`~.cohort_evaluate.evaluate_cohort` reads the table and builds the patients' bags (the bag level
the cross-validation recorded); here each model predicts them (slide bags: the mean over a patient's
slides) and is scored per patient, nothing fitted on the evaluated patients:

* regression (``--target``: the numeric column, read as ``crossval --task regression`` reads it): every
  fold model and ``ensemble.pt`` with MAE, RMSE, R², Pearson and Spearman and their bootstrap intervals
  over patients (:func:`~.regression_cv.scores`), the mean ± sd over the fold models,
  ``predictions_<model>.csv`` (patient, y_true, prediction) and ``scatter.png`` of the ensemble;
* survival (``--time``, ``--event``): every fold model's risks with Harrell's and Uno's c-index, the
  time-dependent AUC and the integrated Brier score, with intervals; a fold model that stores its
  training data (``survival_train``, :func:`~.survival_report.stored_reference`) gives the censoring
  distribution, the risk groups at its training median risk and (Cox, with stored training risks) the
  Breslow baseline of the Brier score, else the evaluated patients do (``reference`` says which; a Cox
  model then has no Brier score). Survival fold models have no ensemble (their risks share no
  scale): the mean risk of the fold models (``mean_risk``) is the combined prediction, and ``km.png``
  splits it at the mean of the fold models' training medians when every fold model stores one and that
  cut leaves patients on both sides, else at the evaluated patients' median (``km.cut_from`` says which).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Progress
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import summarize_runs
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.cv_summary import models_table
from histomil.evaluation.regression_cv import METRICS as REGRESSION_METRICS
from histomil.evaluation.regression_cv import scores as regression_scores_ci
from histomil.evaluation.survival import METRICS as SURVIVAL_METRICS
from histomil.evaluation.survival import (
    SurvivalTargets,
    evaluation_times,
    survival_bootstrap_ci,
    survival_metrics,
)
from histomil.evaluation.survival_cv import PatientSurvival
from histomil.evaluation.survival_plots import (
    plot_km_risk_groups,
    risk_groups,
    risk_groups_summary,
)
from histomil.evaluation.survival_report import (
    NO_REFERENCE,
    TrainingReference,
    held_out_times,
    stored_reference,
)
from histomil.evaluation.target_cv import patient_outputs
from histomil.files import write_text
from histomil.training.survival_task import TRAINING_KEY

CheckBags = Callable[[Mapping[str, Any]], None]  # refuses bags the model cannot take (its checkpoint meta)
COMBINED = "mean_risk"  # the name of the survival fold models' mean risk among the evaluated models


def _predict(path: Path, source: CohortSource, bags: Sequence[Any],
             check: CheckBags) -> tuple[Any, dict[str, Any], list[str], np.ndarray]:
    """(task, checkpoint meta, patients, prediction rows) of the model ``path`` on ``bags``, a patient's
    bags averaged."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint

    model, meta = load_checkpoint(path)
    check(meta)
    task = task_from_checkpoint(meta)
    names, rows = patient_outputs(model, task, bags, source)
    return task, meta, names, rows


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def evaluate_regression_models(models: Mapping[str, Path], source: CohortSource, bags: Sequence[Any],
                               values: Mapping[str, float], out: Path, *, n_resamples: int, check: CheckBags,
                               title: str, progress: Progress | None = None) -> dict[str, Any]:
    """Score every model on the patients of ``bags`` against ``values`` (see the module docstring); writes
    the prediction tables and the scatter plot, returns the task's part of metrics.json."""
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (name, path) in enumerate(models.items()):
        _, _, names, rows = _predict(path, source, bags, check)
        y, pred = np.array([values[p] for p in names], dtype=np.float64), rows[:, 0]
        write_text(out / f"predictions_{name}.csv",
                   _csv(["patient", "y_true", "prediction"], [[p, repr(float(t)), repr(float(v))] for p, t, v in zip(names, y, pred)]))
        s = regression_scores_ci(y, pred, n_resamples, 0)
        results[name] = {"checkpoint": str(path), "n_patients": s.pop("n"), **s}
        preds[name] = (y, pred)
        if progress:
            progress("evaluating models", i + 1, len(models))
    v = np.array(list(values.values()), dtype=np.float64)
    summary: dict[str, Any] = {
        "target_summary": {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "sd": float(v.std()),
                           "median": float(np.median(v))},
        "models": results,
    }
    folds = [m for n, m in results.items() if n.startswith("fold-")]
    if len(folds) > 1:
        summary["fold_models_mean"] = summarize_runs(folds, REGRESSION_METRICS)
    from histomil.reports.task_plots import plot_regression_scatter

    shown = "ensemble" if "ensemble" in preds else next(iter(preds))
    plot_regression_scatter({shown: preds[shown]}, out / "scatter.png", f"{title}: {shown}")
    summary["files"] = {"predictions": [f"predictions_{n}.csv" for n in results], "scatter": "scatter.png",
                        "scatter_model": shown}
    return summary


def survival_scores(targets: SurvivalTargets, rows: np.ndarray, task: Any, reference: TrainingReference | None,
                    n_resamples: int, seed: int = 0) -> dict[str, Any]:
    """Flat survival metrics of one model's prediction ``rows`` (risk first), with intervals under ``ci``
    when resampling, and the evaluation ``times``: against the training data of ``reference`` (times
    inside its follow-up, its censoring distribution, a Cox model's Breslow baseline for the integrated
    Brier score), else against the evaluated patients themselves (no Brier score of a Cox model).
    ``task`` None: a combined risk, no survival curves."""
    train = reference.targets if reference is not None else None
    times = held_out_times(reference.targets, targets) if reference is not None else evaluation_times(targets)
    risk = rows[:, 0]
    if getattr(task, "loss_name", None) == "discrete":  # its own survival probabilities: the Brier score
        survival = task.survival_at(rows, times)
    else:  # Cox: through the Breslow baseline of the stored training risks, when stored
        survival = reference.breslow(risk, times) if reference is not None and task is not None else None
    out: dict[str, Any] = {"n": len(targets), "events": int(targets.event.sum())}
    if n_resamples:
        ci = survival_bootstrap_ci(targets, risk, train, times, survival, n_resamples=n_resamples, seed=seed)
        out.update({m: v["value"] for m, v in ci.items()})
        out["ci"] = ci
    else:
        out.update(survival_metrics(targets, risk, train, times, survival))
    out["times"] = times.tolist()
    return out


def _survival_csv(patients: Sequence[str], surv: PatientSurvival, rows: np.ndarray, columns: Sequence[str], cut: float) -> str:
    return _csv(["patient", "time", "event", *columns, "risk_group"],
                [[p, repr(surv.time[p]), surv.event[p], *(repr(float(v)) for v in row), "high" if row[0] > cut else "low"]
                 for p, row in zip(patients, rows)])


def combined_cut(references: Sequence[TrainingReference | None], risk: np.ndarray) -> tuple[float, str, str]:
    """(cut, where it comes from, why) of the risk groups of the fold models' mean ``risk``: the mean of their
    training medians when every fold model stores one and it leaves patients on both sides, else the
    evaluated patients' median risk."""
    if references and all(r is not None for r in references):
        cut = float(np.mean([r.median_risk for r in references if r is not None]))
        if (risk > cut).any() and (risk <= cut).any():
            return cut, "mean of the fold models' training median risks", "each fold model stores its training median risk"
        why = f"the mean of the fold models' training medians ({cut:.3g}) puts every evaluated patient in one group"
    else:
        why = "a fold model stores no training median risk (an older histomil)"
    return float(np.median(risk)), "evaluated patients' median risk", why


def evaluate_survival_models(models: Mapping[str, Path], source: CohortSource, bags: Sequence[Any],
                             surv: PatientSurvival, out: Path, *, n_resamples: int, check: CheckBags,
                             title: str, progress: Progress | None = None) -> dict[str, Any]:
    """Score every fold model's risks and their mean on the patients of ``bags`` (see the module
    docstring); writes the prediction tables and ``km.png``, returns the task's part of metrics.json."""
    results: dict[str, dict[str, Any]] = {}
    risks: list[np.ndarray] = []
    references: list[TrainingReference | None] = []
    patients: list[str] = []
    targets: SurvivalTargets | None = None
    for i, (name, path) in enumerate(models.items()):
        task, meta, names, rows = _predict(path, source, bags, check)
        reference = stored_reference(meta.get(TRAINING_KEY), str(path))
        if targets is None:
            patients, targets = names, surv.targets(names, "evaluated patients")
        elif names != patients:
            raise HistomilError(f"{path}: predicted patients in another order than the other models")  # a bug, never the data
        cut = reference.median_risk if reference is not None else float(np.median(rows[:, 0]))
        write_text(out / f"predictions_{name}.csv", _survival_csv(names, surv, rows, task.prediction_columns(), cut))
        groups = risk_groups_summary(risk_groups(targets, rows[:, 0], cut))
        m = survival_scores(targets, rows, task, reference, n_resamples)
        results[name] = {"checkpoint": str(path), "n_patients": m.pop("n"), **m,
                         "reference": (reference.summary(cox=task.loss_name != "discrete") if reference
                                       else {"source": "evaluated patients", "note": NO_REFERENCE}),
                         "risk_groups": {**groups, "cut_from": "training median risk" if reference else "evaluated patients' median risk"}}
        risks.append(rows[:, 0])
        references.append(reference)
        if progress:
            progress("evaluating models", i + 1, len(models))
    assert targets is not None  # find_models returns at least one model
    summary: dict[str, Any] = {"n_events": int(targets.event.sum()), "models": results}
    if len(results) > 1:
        summary["fold_models_mean"] = summarize_runs(list(results.values()),
                                                     [k for k in SURVIVAL_METRICS if any(k in r for r in results.values())])
        risk = np.mean(risks, axis=0)
        cut, cut_from, why = combined_cut(references, risk)
        write_text(out / f"predictions_{COMBINED}.csv", _survival_csv(patients, surv, risk[:, None], ["risk"], cut))
        m = survival_scores(targets, risk[:, None], None, None, n_resamples)
        results[COMBINED] = {"model": "mean risk of the fold models", "n_patients": m.pop("n"), **m,
                             "reference": {"source": "evaluated patients",
                                           "note": "censoring distribution of the evaluated patients (the fold models "
                                                   "were trained on different patients)"}}
        shown, label = COMBINED, f"mean risk of {len(risks)} fold models, split at the {cut_from} {cut:.3g}"
    else:
        shown, risk = next(iter(results)), risks[0]
        cut, cut_from = results[shown]["risk_groups"]["cut"], results[shown]["risk_groups"]["cut_from"]
        why, label = "", f"split at the {cut_from} {cut:.3g}"
    groups = plot_km_risk_groups(targets, risk, cut, out / "km.png", title, label)
    summary["km"] = {"model": shown, "cut_from": cut_from, **({"why": why} if why else {}), **groups}
    summary["files"] = {"predictions": [f"predictions_{n}.csv" for n in results], "km": "km.png"}
    return summary


def target_markdown(summary: Mapping[str, Any]) -> str:
    """One row per model (each metric with its 95% interval) and a row of mean ± sd over the fold models."""
    keys = REGRESSION_METRICS if summary["task"] == "regression" else SURVIVAL_METRICS
    events = f", {summary['n_events']} events" if "n_events" in summary else ""
    lines = models_table(summary, keys, events)
    km = summary.get("km")
    if km:
        p = km.get("logrank_p", math.nan)
        lines.append(f"\nKaplan-Meier groups of {km['model']} (km.png), split at the {km['cut_from']} {km['cut']:.3g}: "
                     f"log-rank p {p:.2g}" if math.isfinite(p) else
                     f"\nKaplan-Meier groups of {km['model']} (km.png), split at the {km['cut_from']} {km['cut']:.3g}")
    return "\n".join(lines) + "\n"


__all__ = ["COMBINED", "combined_cut", "evaluate_regression_models", "evaluate_survival_models", "survival_scores",
           "target_markdown"]
