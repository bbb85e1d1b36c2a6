"""What a cohort cross-validation writes once its folds are done (see :mod:`.cohort_cv`).

* ``oof_predictions.csv``: one row per patient and seed (patient, its slides ``;``-joined, fold, seed,
  y_true, label, ``probability`` of the positive class [``prob_<class>`` per class for more than two],
  y_pred, threshold);
* ``metrics.json``: per fold (with bootstrap 95% intervals, patients resampled), pooled per seed (every
  patient once, each at its own fold's threshold), mean ± sd over folds with the bootstrap interval of
  the mean (:func:`~.cv_summary.summarize_folds`), and the held-out patients' metrics;
* ``ensemble.pt``: every fold model combined (:func:`histomil.training.checkpoint.combine_checkpoints`),
  mean probability; its threshold is the mean of the folds' validation thresholds;
* binary targets: ``crossval.json``, ``crossval.md`` and (unless ``report: false``) ``roc_pr.png``,
  ``reliability.png`` and the HTML report (per-fold ROC and training curves).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Log
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS, bootstrap_ci, summarize_runs
from histomil.evaluation.calibration import expected_calibration_error
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.cv_summary import crossval_markdown, summarize_folds, write_predictions
from histomil.evaluation.metrics import binary_metrics
from histomil.evaluation.task_metrics import MULTICLASS_METRICS, multiclass_metrics
from histomil.files import write_json, write_text



def fold_metrics(y: np.ndarray, probs: np.ndarray, threshold: float | None, n_resamples: int, bins: int,
                 boot_seed: int = 0) -> dict[str, Any]:
    """Patient-level metrics: binary (at ``threshold``, with ECE) or multi-class (argmax); ``ci`` when resampling."""
    if threshold is not None:
        p = probs[:, 1]
        out = binary_metrics(y, p, threshold)
        out["ece"] = expected_calibration_error(y, p, bins)
        if n_resamples:
            out["ci"] = bootstrap_ci(y, p, threshold, n_resamples, seed=boot_seed)
        return out
    m = multiclass_metrics(y, probs, n_resamples=max(n_resamples, 1), seed=boot_seed)
    out = {"n": m["n"], **{k: m[k]["value"] for k in MULTICLASS_METRICS}, "confusion_matrix": m["confusion_matrix"]}
    if n_resamples:
        out["ci"] = {k: m[k] for k in MULTICLASS_METRICS}
    return out


def write_fold_predictions(path: Path, patients: Sequence[str], y: np.ndarray, probs: np.ndarray,
                           threshold: float | None, classes: Sequence[str]) -> None:
    """A fold's patient predictions: the tile study's columns (bag_id = patient) for a binary target,
    ``prob_<class>`` columns and the argmax for more classes."""
    if threshold is not None:
        write_predictions(path, patients, y, probs[:, 1], threshold)
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "y_true", *(f"prob_{c}" for c in classes), "y_pred"])
    for p, t, row in zip(patients, y.tolist(), probs):
        w.writerow([p, t, *(repr(float(v)) for v in row), int(np.argmax(row))])
    write_text(path, buf.getvalue())


def _oof_csv(path: Path, records: Sequence[Mapping[str, Any]], source: CohortSource) -> None:
    classes = source.cohort.classes
    binary = len(classes) == 2
    buf = io.StringIO()
    w = csv.writer(buf)
    probs_head = ["probability"] if binary else [f"prob_{c}" for c in classes]
    w.writerow(["patient", "slides", "fold", "seed", "y_true", "label", *probs_head, "y_pred", "threshold"])
    for r in sorted(records, key=lambda r: (r["seed"], r["fold"])):
        t = r["threshold"]
        for pred in r["predictions"]:
            probs = np.asarray(pred["probs"], dtype=np.float64)
            y_pred = int(probs[1] >= t) if binary else int(np.argmax(probs))
            cells = [repr(float(probs[1]))] if binary else [repr(float(v)) for v in probs]
            w.writerow([pred["patient"], ";".join(source.patient_slides(pred["patient"])), r["fold"], r["seed"],
                        pred["y_true"], classes[pred["y_true"]], *cells, y_pred, "" if t is None else repr(float(t))])
    write_text(path, buf.getvalue())


def _pooled(records: Sequence[Mapping[str, Any]], binary: bool, n_resamples: int, bins: int) -> dict[str, Any]:
    """Per seed: all folds' test patients together (each patient once), each at its own fold's threshold."""
    out: dict[str, Any] = {}
    for seed in sorted({int(r["seed"]) for r in records}):
        runs = [r for r in records if int(r["seed"]) == seed]
        y = np.array([p["y_true"] for r in runs for p in r["predictions"]], dtype=np.int64)
        probs = np.array([p["probs"] for r in runs for p in r["predictions"]], dtype=np.float64)
        if binary:
            t = np.array([float(r["threshold"]) for r in runs for _ in r["predictions"]])
            ci = bootstrap_ci(y, probs[:, 1], t, max(n_resamples, 1), seed=0)
            doc: dict[str, Any] = {m: {k: ci[m][k] for k in ("value", "low", "high")} if n_resamples else {"value": ci[m]["value"]}
                                   for m in METRICS}
            doc["ece"] = expected_calibration_error(y, probs[:, 1], bins)
        else:
            ci = multiclass_metrics(y, probs, n_resamples=max(n_resamples, 1), seed=0)
            doc = {m: {k: ci[m][k] for k in ("value", "low", "high")} if n_resamples else {"value": ci[m]["value"]}
                   for m in MULTICLASS_METRICS}
            doc["confusion_matrix"] = ci["confusion_matrix"]
        out[f"seed-{seed}"] = {"n_patients": int(y.size), **doc}
    return out


def _ensemble(out: Path, records: Sequence[Mapping[str, Any]], binary: bool) -> Path:
    """``ensemble.pt``: the fold models' mean probability, at the mean of their validation thresholds."""
    from histomil.training.checkpoint import combine_checkpoints, read_checkpoint_dict
    from histomil.training.checkpoint_file import atomic_torch_save

    path = combine_checkpoints([(out / r["dir"] / "model.pt").resolve() for r in records], out / "ensemble.pt")
    if binary:
        ckpt = read_checkpoint_dict(path)
        ckpt.setdefault("extra", {}).update(
            threshold=float(np.mean([float(r["threshold"]) for r in records])),
            threshold_rule="mean of the fold models' validation thresholds", threshold_value=None,
        )
        atomic_torch_save(ckpt, path)
    return path


def _holdout(out: Path, source: CohortSource, patients: set[str], ensemble: Path, binary: bool, n_resamples: int,
             bins: int) -> dict[str, Any]:
    """The held-out patients (split column ``test``) predicted by the ensemble of the fold models."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.trainer import predict

    model, meta = load_checkpoint(ensemble)
    bags = source.bags(sorted(patients))
    names, probs = source.per_patient(bags, np.stack([p for p, _ in predict(model, bags)]))
    y = source.labels(names)
    threshold = float(meta.get("threshold", 0.5)) if binary else None
    write_fold_predictions(out / "holdout_predictions.csv", names, y, probs, threshold, source.cohort.classes)
    return {"model": "ensemble.pt", "n_patients": len(names), "threshold": threshold,
            **fold_metrics(y, probs, threshold, n_resamples, bins)}


def write_results(cfg: Any, out: Path, source: CohortSource, records: Sequence[Mapping[str, Any]], holdout: set[str],
                  log: Log) -> dict[str, Any]:
    """Write every file listed in the module docstring; returns the content of ``metrics.json``."""
    if getattr(cfg, "task", "classification") == "survival":
        from histomil.evaluation.survival_cv import write_survival_results

        return write_survival_results(cfg, out, source, records, holdout, log)
    if getattr(cfg, "task", "classification") == "regression":
        from histomil.evaluation.regression_cv import write_regression_results

        return write_regression_results(cfg, out, source, records, holdout, log)
    cohort = source.cohort
    binary = len(cohort.classes) == 2
    _oof_csv(out / "oof_predictions.csv", records, source)
    ensemble = _ensemble(out, records, binary)
    per_fold = [
        {"seed": r["seed"], "fold": r["fold"], "dir": r["dir"], "n_patients": {k: len(v) for k, v in r["patients"].items()},
         "threshold": r["threshold"], "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
         "metrics": r["test_sets"]["test"]}
        for r in records
    ]
    summary: dict[str, Any] = {
        "format": "histomil-cohort-crossval",
        "table": cohort.source, "features": str(cfg.features), "target": cfg.target, "task": cfg.task,
        "classes": cohort.classes, "positive_class": cohort.positive_class, "class_counts": cohort.class_counts(),
        "bag_level": cfg.bag_level, "folds": cfg.folds, "seeds": list(cfg.seeds),
        "n_patients": len(cohort.patients), "n_slides": len(cohort.slides), "n_holdout_patients": len(holdout),
        "bootstrap_resamples": cfg.bootstrap_resamples,
        "threshold": ({"rule": cfg.threshold.rule, "value": cfg.threshold.value} if binary else {"rule": "argmax"}),
        "per_fold": per_fold,
        "pooled": _pooled(records, binary, cfg.bootstrap_resamples, cfg.calibration_bins),
    }
    if binary:
        cv = summarize_folds(records, lambda r, name: out / r["dir"] / f"predictions_{name}.csv", out, cfg.threshold,
                             cfg.bootstrap_resamples, cfg.calibration_bins, plots=cfg.report)
        summary["mean_over_folds"] = cv["test_sets"]["test"]["metrics"]
        summary["ece"] = cv["test_sets"]["test"]["ece"]
        crossval = {"format": "histomil-crossval", "input_kind": "Cohort table", "table": cohort.source,
                    "bag_level": cfg.bag_level, "folds": cfg.folds, "seeds": list(cfg.seeds), "n_runs": cv.pop("n_runs"),
                    "n_patients": len(cohort.patients), "n_holdout_patients": len(holdout), **cv}
        write_json(out / "crossval.json", crossval)
        write_text(out / "crossval.md", crossval_markdown(crossval))
    else:
        summary["mean_over_folds"] = summarize_runs([r["test_sets"]["test"] for r in records], MULTICLASS_METRICS)
    if holdout:
        summary["holdout"] = _holdout(out, source, holdout, ensemble, binary, cfg.bootstrap_resamples, cfg.calibration_bins)
    summary["files"] = {"oof_predictions": "oof_predictions.csv", "ensemble": "ensemble.pt",
                        "fold_models": [f"{r['dir']}/model.pt" for r in records]}
    if binary and cfg.report:
        from histomil.reports.html import build_report

        try:
            summary["files"]["report"] = build_report(out, max_bags=0).name
        except HistomilError as exc:  # the numbers are written; a report is not worth failing the run for
            log(f"no HTML report ({exc})")
    return summary


__all__ = ["fold_metrics", "write_fold_predictions", "write_results"]
