"""Survival in the cohort cross-validation (:mod:`.cohort_cv`):

``histomil crossval --table cohort.csv --features F/ --task survival --time time --event event --folds 5 --out cv/``

The event column is the cohort's target (two classes, 0/1 or false/true: class 1 is the event), so the
patient-grouped folds are **stratified on the event**; the time column is read here, one follow-up
time (> 0) per patient (a patient's slides must agree). Per fold, the model (Cox or discrete-time,
``train.loss``) is trained on the training patients, early-stopped on the validation patients' c-index,
and the test patients' risks (slide bags: the mean risk of a patient's slides) are scored by
:func:`~.survival_report.evaluate_survival`: Harrell's and Uno's c-index, time-dependent AUC and
integrated Brier score with bootstrap intervals, the censoring distribution and Breslow baseline from
the fold's training patients, and ``km_test.png``: Kaplan-Meier curves of the risk groups split at the
training patients' median risk, with the log-rank p.

Written: ``seed-S/fold-F/`` (model.pt, history.csv, predictions_test.csv, km_test.png, metrics.json
last), ``oof_predictions.csv`` (patient, slides, fold, seed, time, event, risk, risk_group),
``metrics.json`` (per fold; mean ± sd over folds; pooled per seed: every patient once, risks of
different fold models compared with one another, and ``km_pooled_seed-S.png`` where each patient is
grouped by its own fold's training median). Fold models are not combined into an ``ensemble.pt``
(an ensemble averages class probabilities or regression values; fold models' risks share no scale);
held-out patients (split ``test``) get the mean risk of the fold models.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Log, Progress
from histomil.data.cohort import Cohort
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import summarize_runs
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.fold_loop import fold_roles, run_training_fold
from histomil.evaluation.survival import (
    METRICS,
    SurvivalTargets,
    survival_bootstrap_ci,
    survival_metrics,
    survival_targets,
)
from histomil.evaluation.survival_plots import plot_km_risk_groups
from histomil.evaluation.survival_report import evaluate_survival, held_out_times
from histomil.evaluation.target_cv import (
    NumberColumn,
    mean_fold_outputs,
    patient_numbers,
    patient_outputs,
    train_fold,
    with_targets,
)
from histomil.files import write_text
from histomil.training.survival_losses import batch_memory_bytes

# What a survival cross-validation changes in the cohort defaults: several patients per step (the Cox
# partial likelihood compares the patients of a batch), early stopping on the validation c-index, and
# fewer bootstrap resamples (scikit-survival's estimators run afresh for each one).
SURVIVAL_DEFAULTS: dict[str, Any] = {"train": {"task": "survival", "batch_size": 32, "monitor": "val_cindex"},
                                     "bootstrap_resamples": 200}
TIME_COLUMN = NumberColumn("time", "--time", lambda v: v > 0, "a number above 0")
EVENT_WORDS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1, "no": 0, "yes": 1}


@dataclasses.dataclass(frozen=True)
class PatientSurvival:
    """Each patient's follow-up time and event (1 = observed, 0 = censored)."""

    time: dict[str, float]
    event: dict[str, int]

    def target(self, patient: str) -> tuple[float, float]:
        """A patient's training target ``(time, event)``."""
        return (self.time[patient], float(self.event[patient]))

    def targets(self, patients: Sequence[str], what: str) -> SurvivalTargets:
        return survival_targets([self.time[p] for p in patients], [self.event[p] for p in patients], what)


def patient_survival(cohort: Cohort, table: str | Path, time_column: str, clinical_table: str | Path | None = None,
                     slide_column: str = "slide", patient_column: str = "patient") -> PatientSurvival:
    """Times from ``time_column`` (of the clinical table, one row per patient, when given; else of the
    slide table) and events from the cohort's target classes; one error line for a missing or
    non-positive time, a patient whose rows disagree, or an event column that is not 0/1."""
    events = {c: EVENT_WORDS.get(str(c).strip().lower()) for c in cohort.classes}
    if len(cohort.classes) != 2 or None in events.values() or set(events.values()) != {0, 1}:
        raise HistomilError(f"{cohort.source}: the event column {cohort.target!r} must hold 0 (censored) and 1 (event), "
                            f"found {', '.join(map(repr, cohort.classes))}")
    times = patient_numbers(cohort, table, time_column, TIME_COLUMN, clinical_table, slide_column, patient_column)
    return PatientSurvival(times, {p: events[cohort.classes[c]] for p, c in cohort.patient_label.items()})


def cohort_survival(cfg: Any, cohort: Cohort) -> PatientSurvival:
    """:func:`patient_survival` with the columns and tables of a cohort cross-validation config."""
    return patient_survival(cohort, cfg.table, cfg.time, cfg.clinical_table, cfg.columns.slide, cfg.columns.patient)


def _metrics(result: Mapping[str, Any], with_ci: bool) -> dict[str, Any]:
    """Flat fold metrics: each metric's value, its interval under ``ci``, the risk groups."""
    out: dict[str, Any] = {"n": result["n"], "events": result["events"]}
    out.update({m: v["value"] for m, v in result["metrics"].items()})
    if with_ci:
        out["ci"] = dict(result["metrics"])
    out["risk_groups"] = result["risk_groups"]
    return out


def run_survival_fold(cfg: Any, source: CohortSource, out: Path, seed: int, fold: int, assignment: Mapping[str, str],
                      holdout: set[str], log: Log, progress: Progress | None) -> dict[str, Any]:
    """Train, predict and score one fold into ``out/seed-S/fold-F`` (see the module docstring); resumable
    through :func:`run_fold`."""
    name = f"seed {seed} fold {fold}"
    fold_dir = out / f"seed-{seed}" / f"fold-{fold}"
    surv = cohort_survival(cfg, source.cohort)

    def work() -> tuple[dict[str, Any], Path, str]:
        roles, train_p, val_p, test_p = fold_roles(assignment, holdout, name, log)
        t0 = time.perf_counter()
        bags = {r: with_targets(source.bags(ps), surv.target) for r, ps in (("train", train_p), ("val", val_p), ("test", test_p))}
        train_cfg = cfg.train.model_copy(update={"seed": seed})
        most = max(len(b) for b in bags["train"])
        mb = batch_memory_bytes(train_cfg.batch_size, most, bags["train"][0].shape[1]) / 2**20
        log(f"{name}: {train_cfg.batch_size} patients per step (largest bag {most} tiles: about {mb:.0f} MB of activations)")
        result, model, task = train_fold(train_cfg, bags["train"], bags["val"], fold_dir, name, progress)
        timings = {"train": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        pred = {r: patient_outputs(model, task, bags[r], source) for r in ("train", "val", "test")}
        targets = {r: surv.targets(pred[r][0], f"{name}, {r} patients") for r in pred}
        times = held_out_times(targets["train"], targets["test"])
        discrete = task.loss_name == "discrete"
        n_boot = int(cfg.bootstrap_resamples)
        test_eval = evaluate_survival(
            targets["train"], pred["train"][1][:, 0], targets["test"], pred["test"][1][:, 0],
            survival=task.survival_at(pred["test"][1], times) if discrete else None, times=times,
            km_png=fold_dir / "km_test.png" if cfg.report else None, title=name, n_resamples=max(n_boot, 1),
            seed=seed * 1000 + fold)
        val_metrics = survival_metrics(targets["val"], pred["val"][1][:, 0], targets["train"])
        cut = test_eval["risk_groups"]["cut"]
        write_text(fold_dir / "predictions_test.csv", _predictions_csv(pred["test"][0], surv, pred["test"][1], task, cut))
        timings["evaluate"] = round(time.perf_counter() - t0, 2)
        test_metrics = _metrics(test_eval, n_boot > 0)
        line = (f"{name}: test c-index {test_metrics['cindex_harrell']:.3f} (Harrell), "
                f"{test_metrics['cindex_uno']:.3f} (Uno); log-rank p {test_metrics['risk_groups']['logrank_p']:.2g}")
        return {
            "seed": seed, "fold": fold, "dir": f"seed-{seed}/fold-{fold}",
            "patients": {r: sorted(ps) for r, ps in roles.items()},
            "slides": {p: source.patient_slides(p) for p in pred["test"][0]},
            "val": val_metrics, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
            "risk_cut": cut, "times": test_eval["times"], "test_sets": {"test": test_metrics},
            "predictions": [{"patient": p, "time": surv.time[p], "event": surv.event[p], "risk": float(r[0])}
                            for p, r in zip(pred["test"][0], pred["test"][1])],
            "timings": timings,
        }, result.last_path, line

    return run_training_fold(fold_dir, name, work, log)


def _predictions_csv(patients: Sequence[str], surv: PatientSurvival, rows: np.ndarray, task: Any, cut: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "time", "event", *task.prediction_columns(), "risk_group"])
    for p, row in zip(patients, rows):
        w.writerow([p, repr(surv.time[p]), surv.event[p], *(repr(float(v)) for v in row),
                    "high" if row[0] > cut else "low"])
    return buf.getvalue()


def _oof_csv(path: Path, records: Sequence[Mapping[str, Any]], source: CohortSource) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["patient", "slides", "fold", "seed", "time", "event", "risk", "risk_group"])
    for r in sorted(records, key=lambda r: (r["seed"], r["fold"])):
        for p in r["predictions"]:
            w.writerow([p["patient"], ";".join(source.patient_slides(p["patient"])), r["fold"], r["seed"], repr(p["time"]),
                        p["event"], repr(p["risk"]), "high" if p["risk"] > r["risk_cut"] else "low"])
    write_text(path, buf.getvalue())


def _pooled(out: Path, records: Sequence[Mapping[str, Any]], n_resamples: int, plots: bool) -> dict[str, Any]:
    """Per seed, every patient once: metrics of the pooled risks (CIs when resampling) and the Kaplan-Meier
    groups with each patient split at its own fold's training median."""
    pooled: dict[str, Any] = {}
    for seed in sorted({int(r["seed"]) for r in records}):
        runs = [r for r in records if int(r["seed"]) == seed]
        preds = [(p, r["risk_cut"]) for r in runs for p in r["predictions"]]
        targets = survival_targets([p["time"] for p, _ in preds], [p["event"] for p, _ in preds], f"seed {seed}")
        risk = np.array([p["risk"] for p, _ in preds])
        centred = risk - np.array([c for _, c in preds])  # > 0: above its own fold's training median
        ci = survival_bootstrap_ci(targets, risk, n_resamples=max(n_resamples, 1), seed=seed)
        doc: dict[str, Any] = {"n_patients": len(targets), "events": int(targets.event.sum())}
        doc.update({m: ({k: v[k] for k in ("value", "low", "high")} if n_resamples else {"value": v["value"]})
                    for m, v in ci.items()})
        if plots:
            doc["risk_groups"] = plot_km_risk_groups(targets, centred, 0.0, out / f"km_pooled_seed-{seed}.png",
                                                     f"seed {seed}, all folds",
                                                     "each patient split at its own fold's training median risk")
        pooled[f"seed-{seed}"] = doc
    return pooled


def _holdout(out: Path, source: CohortSource, surv: PatientSurvival, patients: set[str],
             records: Sequence[Mapping[str, Any]], n_resamples: int) -> dict[str, Any]:
    """The held-out patients scored by the mean risk of every fold model."""
    names, rows = mean_fold_outputs(out, records, source, with_targets(source.bags(sorted(patients)), surv.target))
    risk = rows[:, 0]
    targets = surv.targets(names, "held-out patients")
    ci = survival_bootstrap_ci(targets, risk, n_resamples=max(n_resamples, 1))
    return {"model": "mean risk of the fold models", "n_patients": len(names),
            **{m: v["value"] for m, v in ci.items()}, **({"ci": ci} if n_resamples else {})}


def write_survival_results(cfg: Any, out: Path, source: CohortSource, records: Sequence[Mapping[str, Any]],
                           holdout: set[str], log: Log) -> dict[str, Any]:
    """oof_predictions.csv, the pooled Kaplan-Meier plots and the content of metrics.json (returned)."""
    cohort = source.cohort
    surv = cohort_survival(cfg, cohort)
    _oof_csv(out / "oof_predictions.csv", records, source)
    per_fold = [{"seed": r["seed"], "fold": r["fold"], "dir": r["dir"],
                 "n_patients": {k: len(v) for k, v in r["patients"].items()}, "best_epoch": r["best_epoch"],
                 "epochs_run": r["epochs_run"], "risk_cut": r["risk_cut"], "metrics": r["test_sets"]["test"]}
                for r in records]
    names = [m for m in METRICS if all(m in r["test_sets"]["test"] for r in records)]
    summary: dict[str, Any] = {
        "format": "histomil-cohort-crossval", "task": "survival", "loss": cfg.train.loss or "cox",
        "table": cohort.source, "features": str(cfg.features), "time": cfg.time, "event": cfg.target,
        "classes": ["censored", "event"], "positive_class": None,
        "patients_by_event": {"censored": sum(1 for e in surv.event.values() if e == 0),
                              "event": sum(1 for e in surv.event.values() if e == 1)},
        "bag_level": cfg.bag_level, "folds": cfg.folds, "seeds": list(cfg.seeds),
        "n_patients": len(cohort.patients), "n_slides": len(cohort.slides), "n_holdout_patients": len(holdout),
        "bootstrap_resamples": cfg.bootstrap_resamples, "per_fold": per_fold,
        "mean_over_folds": summarize_runs([r["test_sets"]["test"] for r in records], names),
        "pooled": _pooled(out, records, cfg.bootstrap_resamples, cfg.report),
    }
    if holdout:
        summary["holdout"] = _holdout(out, source, surv, holdout, records, cfg.bootstrap_resamples)
    summary["files"] = {"oof_predictions": "oof_predictions.csv", "fold_models": [f"{r['dir']}/model.pt" for r in records]}
    c = summary["mean_over_folds"].get("cindex_harrell", {})
    log(f"c-index (Harrell) over {c.get('n', 0)} folds: {c.get('mean', float('nan')):.3f} ± {c.get('std', float('nan')):.3f}")
    return summary


__all__ = ["SURVIVAL_DEFAULTS", "PatientSurvival", "cohort_survival", "patient_survival", "run_survival_fold", "write_survival_results"]
