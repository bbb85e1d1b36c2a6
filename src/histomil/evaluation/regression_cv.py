"""Regression in the cohort cross-validation (:mod:`.cohort_cv`):

``histomil crossval --table cohort.csv --features F/ --task regression --target score --folds 5 --out cv/``

The target column holds one number per patient (a patient's slides must agree; read by
:func:`~.target_cv.patient_numbers`, so a value that is not a finite number is one error line naming
the file, line and column). The patient-grouped folds are **stratified on the target's quantile bins**
(:func:`~.splitting.quantile_strata`: as many bins, up to 10, as leave every bin at least ``folds``
patients), so every fold tests low, middle and high values. Per fold, the model (``train.task
regression``, ``train.loss`` mse or huber, trained on the standardised target) is trained on the
training patients, early-stopped on the validation patients, and the test patients are predicted (slide
bags: the mean prediction over a patient's slides) and scored by
:func:`~.task_metrics.regression_metrics`: MAE, RMSE, R², Pearson and Spearman with bootstrap intervals.

Written: ``seed-S/fold-F/`` (model.pt, history.csv, predictions_val.csv, predictions_test.csv,
metrics.json last), ``oof_predictions.csv`` (patient, slides, fold, seed, y_true, prediction),
``metrics.json`` (per fold; mean ± sd over folds; pooled per seed over the out-of-fold predictions with
bootstrap intervals; mean ± sd of the pooled values over seeds), ``scatter_oof.png`` (predicted vs
true, one colour per seed) and ``ensemble.pt``: every fold model combined
(:func:`histomil.training.checkpoint.combine_checkpoints`, registry model ``ensemble_mean_value``: the
mean of the fold models' predictions in target units, each through its own training mean and sd), which
``predict``, ``predict-slides``, ``heatmap --features`` and ``evaluate`` take like any regression model.
Held-out patients (split ``test``) are predicted by ``ensemble.pt`` (``holdout_predictions.csv``).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Log, Progress
from histomil.data.cohort import Cohort
from histomil.evaluation.bootstrap import summarize_runs
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.fold_loop import fold_roles, run_training_fold
from histomil.evaluation.splitting import quantile_strata
from histomil.evaluation.target_cv import (
    NumberColumn,
    patient_numbers,
    patient_outputs,
    train_fold,
    with_targets,
)
from histomil.evaluation.task_metrics import regression_metrics
from histomil.files import write_text
from histomil.training.tasks import regression_scores

REGRESSION_DEFAULTS: dict[str, Any] = {"train": {"task": "regression"}}
METRICS = ("mae", "rmse", "r2", "pearson", "spearman")
TARGET_COLUMN = NumberColumn("target", "--target", lambda v: True, "a finite number")


def cohort_values(cfg: Any, cohort: Cohort) -> dict[str, float]:
    """Each patient's target value, from the tables and columns of a cohort cross-validation config."""
    return patient_numbers(cohort, cfg.table, cfg.target, TARGET_COLUMN, cfg.clinical_table, cfg.columns.slide,
                           cfg.columns.patient)


def describe_values(cohort: Cohort, values: Mapping[str, float]) -> str:
    """One line: patients, slides and the target's range, mean and sd (what ``Cohort.describe`` says of classes)."""
    v = np.array(list(values.values()), dtype=np.float64)
    return (f"{len(cohort.patients)} patients, {len(cohort.slide_patient)} slides; target {cohort.target!r} from "
            f"{v.min():g} to {v.max():g}, mean {v.mean():g}, sd {v.std():g}")


def target_strata(cfg: Any, cohort: Cohort, patients: Sequence[str]) -> dict[str, int]:
    """patient -> quantile bin of its target, the labels the folds are stratified on."""
    values = cohort_values(cfg, cohort)
    bins = quantile_strata([values[p] for p in patients], cfg.folds)
    return dict(zip(patients, bins.tolist()))


def scores(y: np.ndarray, pred: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """Flat metrics (``n`` and each metric's value) and, when resampling, their intervals under ``ci``."""
    if not n_resamples:
        return {"n": int(len(y)), **regression_scores(y, pred)}
    ci = regression_metrics(y, pred, n_resamples=n_resamples, seed=seed)
    return {"n": ci.pop("n"), **{m: v["value"] for m, v in ci.items()}, "ci": ci}


def _predictions_csv(path: Path, patients: Sequence[str], y: np.ndarray, pred: np.ndarray) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "y_true", "prediction"])
    for p, t, v in zip(patients, y.tolist(), pred.tolist()):
        w.writerow([p, repr(float(t)), repr(float(v))])
    write_text(path, buf.getvalue())


def run_regression_fold(cfg: Any, source: CohortSource, out: Path, seed: int, fold: int, assignment: Mapping[str, str],
                        holdout: set[str], log: Log, progress: Progress | None) -> dict[str, Any]:
    """Train, predict and score one fold into ``out/seed-S/fold-F`` (see the module docstring); resumable
    through :func:`run_fold`."""
    name = f"seed {seed} fold {fold}"
    fold_dir = out / f"seed-{seed}" / f"fold-{fold}"
    values = cohort_values(cfg, source.cohort)

    def work() -> tuple[dict[str, Any], Path, str]:
        roles, train_p, val_p, test_p = fold_roles(assignment, holdout, name, log)
        t0 = time.perf_counter()
        bags = {r: with_targets(source.bags(ps), lambda p: (values[p],))
                for r, ps in (("train", train_p), ("val", val_p), ("test", test_p))}
        result, model, task = train_fold(cfg.train.model_copy(update={"seed": seed}), bags["train"], bags["val"],
                                         fold_dir, name, progress)
        timings = {"train": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        pred = {r: patient_outputs(model, task, bags[r], source) for r in ("val", "test")}
        y = {r: np.array([values[p] for p in pred[r][0]]) for r in pred}
        for r in pred:
            _predictions_csv(fold_dir / f"predictions_{r}.csv", pred[r][0], y[r], pred[r][1][:, 0])
        test_metrics = scores(y["test"], pred["test"][1][:, 0], int(cfg.bootstrap_resamples), seed * 1000 + fold)
        timings["evaluate"] = round(time.perf_counter() - t0, 2)
        line = (f"{name}: test MAE {test_metrics['mae']:.3g}, R² {test_metrics['r2']:.3f}, "
                f"Spearman {test_metrics['spearman']:.3f}")
        return {
            "seed": seed, "fold": fold, "dir": f"seed-{seed}/fold-{fold}",
            "patients": {r: sorted(ps) for r, ps in roles.items()},
            "slides": {p: source.patient_slides(p) for p in pred["test"][0]},
            "val": scores(y["val"], pred["val"][1][:, 0], 0, 0),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
            "test_sets": {"test": test_metrics},
            "predictions": [{"patient": p, "y_true": float(t), "prediction": float(v)}
                            for p, t, v in zip(pred["test"][0], y["test"].tolist(), pred["test"][1][:, 0].tolist())],
            "timings": timings,
        }, result.last_path, line

    return run_training_fold(fold_dir, name, work, log)


def _oof_csv(path: Path, records: Sequence[Mapping[str, Any]], source: CohortSource) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["patient", "slides", "fold", "seed", "y_true", "prediction"])
    for r in sorted(records, key=lambda r: (r["seed"], r["fold"])):
        for p in r["predictions"]:
            w.writerow([p["patient"], ";".join(source.patient_slides(p["patient"])), r["fold"], r["seed"],
                        repr(p["y_true"]), repr(p["prediction"])])
    write_text(path, buf.getvalue())


def _oof_by_seed(records: Sequence[Mapping[str, Any]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """seed -> (true values, out-of-fold predictions): every cross-validated patient once."""
    out = {}
    for seed in sorted({int(r["seed"]) for r in records}):
        preds = [p for r in records if int(r["seed"]) == seed for p in r["predictions"]]
        out[seed] = (np.array([p["y_true"] for p in preds]), np.array([p["prediction"] for p in preds]))
    return out


def _pooled(oof: Mapping[int, tuple[np.ndarray, np.ndarray]], n_resamples: int) -> dict[str, Any]:
    """Per seed, the metrics of the pooled out-of-fold predictions (``{value, low, high}`` when resampling)."""
    pooled: dict[str, Any] = {}
    for seed, (y, pred) in oof.items():
        s = scores(y, pred, n_resamples, seed)
        doc: dict[str, Any] = {"n_patients": s["n"]}
        doc.update({m: ({k: s["ci"][m][k] for k in ("value", "low", "high")} if n_resamples else {"value": s[m]})
                    for m in METRICS})
        pooled[f"seed-{seed}"] = doc
    return pooled


def ensemble_outputs(path: Path, source: CohortSource, bags: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """(patients, predictions in target units) of ``bags`` by the ensemble checkpoint ``path``."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint

    model, meta = load_checkpoint(path)
    return patient_outputs(model, task_from_checkpoint(meta), bags, source)


def write_regression_results(cfg: Any, out: Path, source: CohortSource, records: Sequence[Mapping[str, Any]],
                             holdout: set[str], log: Log) -> dict[str, Any]:
    """oof_predictions.csv, scatter_oof.png, ensemble.pt and the content of metrics.json (returned)."""
    from histomil.training.checkpoint import combine_checkpoints

    cohort = source.cohort
    values = cohort_values(cfg, cohort)
    _oof_csv(out / "oof_predictions.csv", records, source)
    oof = _oof_by_seed(records)
    pooled = _pooled(oof, int(cfg.bootstrap_resamples))
    v = np.array([values[p] for p in cohort.patients])
    summary: dict[str, Any] = {
        "format": "histomil-cohort-crossval", "task": "regression", "loss": cfg.train.loss or "mse",
        "table": cohort.source, "features": str(cfg.features), "target": cfg.target,
        "classes": None, "positive_class": None,
        "target_summary": {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "sd": float(v.std()),
                           "median": float(np.median(v))},
        "bag_level": cfg.bag_level, "folds": cfg.folds, "seeds": list(cfg.seeds),
        "n_patients": len(cohort.patients), "n_slides": len(cohort.slides), "n_holdout_patients": len(holdout),
        "bootstrap_resamples": cfg.bootstrap_resamples,
        "per_fold": [{"seed": r["seed"], "fold": r["fold"], "dir": r["dir"],
                      "n_patients": {k: len(ps) for k, ps in r["patients"].items()}, "best_epoch": r["best_epoch"],
                      "epochs_run": r["epochs_run"], "metrics": r["test_sets"]["test"]} for r in records],
        "mean_over_folds": summarize_runs([r["test_sets"]["test"] for r in records], METRICS),
        "pooled": pooled,
        "mean_over_seeds": summarize_runs([{m: d[m]["value"] for m in METRICS} for d in pooled.values()], METRICS),
    }
    files: dict[str, Any] = {"oof_predictions": "oof_predictions.csv"}
    if cfg.report:
        from histomil.reports.task_plots import plot_regression_scatter

        plot_regression_scatter({f"seed {s}": yp for s, yp in oof.items()}, out / "scatter_oof.png",
                                f"{cfg.target}: out-of-fold predictions, {cfg.folds} folds")
        files["scatter"] = "scatter_oof.png"
    ensemble = combine_checkpoints([(out / r["dir"] / "model.pt").resolve() for r in records], out / "ensemble.pt")
    if holdout:
        bags = with_targets(source.bags(sorted(holdout)), lambda p: (values[p],))
        names, rows = ensemble_outputs(ensemble, source, bags)
        y = np.array([values[p] for p in names])
        _predictions_csv(out / "holdout_predictions.csv", names, y, rows[:, 0])
        held = scores(y, rows[:, 0], int(cfg.bootstrap_resamples), 0)
        summary["holdout"] = {"model": "ensemble.pt (mean prediction of the fold models)", "n_patients": held.pop("n"), **held}
        files["holdout_predictions"] = "holdout_predictions.csv"
    summary["files"] = {**files, "ensemble": "ensemble.pt", "fold_models": [f"{r['dir']}/model.pt" for r in records]}
    r2 = summary["mean_over_folds"]["r2"]
    log(f"R² over {r2['n']} folds: {r2['mean']:.3f} ± {r2['std']:.3f}")
    return summary


__all__ = ["METRICS", "REGRESSION_DEFAULTS", "cohort_values", "describe_values", "ensemble_outputs", "run_regression_fold",
           "scores", "target_strata", "write_regression_results"]
