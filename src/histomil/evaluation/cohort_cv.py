"""Cross-validation of a slide cohort: a table of slides + a folder of per-slide feature files in,
patient-level out-of-fold predictions, metrics with bootstrap intervals and fold models out.

``histomil crossval --table cohort.csv --features slide_features/ --target label --folds 5 --out cv/``

For every seed (``seeds``) and fold:

1. patients (never slides) are split: stratified, patient-grouped outer folds
   (:func:`~.splitting.grouped_stratified_folds`; a ``group`` column keeps a whole group, e.g. a
   hospital, in one fold; a ``fold`` column gives the folds instead), and inside each training fold a
   stratified inner validation split of patients (``val_fraction``, :func:`~.splitting.stratified_groups_split`);
   patients marked ``test`` in a ``split`` column are held out of every fold (a ``regression`` target
   is stratified on its quantile bins, :mod:`.regression_cv`; ``survival`` on the event, :mod:`.survival_cv`);
2. the model is trained on the training patients' bags (:func:`histomil.training.trainer.train`, one
   bag per patient holding all its slides' tiles, or one per slide), early-stopped on the validation
   patients;
3. a binary target's decision threshold is chosen on the validation patients only
   (:func:`~.threshold.fit_threshold`, recorded in the fold's ``model.pt``) and applied unchanged to the
   fold's test patients; more classes are decided by the largest probability;
4. the fold's test patients are predicted (slide bags: the mean probability over a patient's slides);
   ``metrics.json`` in ``seed-S/fold-F/`` is written last, so a finished fold is skipped on a rerun.

Then ``oof_predictions.csv`` (every patient once per seed), ``metrics.json`` (per fold, pooled per
seed, mean ± sd over folds, bootstrap 95% intervals), ``ensemble.pt`` (all fold models, mean
probability: ``evaluate``, ``predict``, ``predict-slides`` and ``heatmap --features`` take it), the
held-out patients' predictions by the ensemble, and for binary targets ``crossval.json`` /
``crossval.md`` / ``report.html`` with per-fold ROC and training curves (:mod:`histomil.reports.html`;
``report: false`` leaves out the plots and the HTML page).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from histomil import config
from histomil.callbacks import Log, Progress
from histomil.data.cohort import CohortColumns, load_slide_features, match_feature_files, read_cohort
from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.evaluation.cohort_results import fold_metrics, write_fold_predictions, write_results
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.fold_loop import check_folds, check_inputs, check_settings, fold_roles, run_training_fold
from histomil.evaluation.splitting import (
    grouped_stratified_folds,
    nested_folds,
    roles_of,
    stratified_groups_split,
)
from histomil.evaluation.threshold import ThresholdConfig, fit_threshold
from histomil.features.lazy import fits_in_memory
from histomil.features.validate import training_encoder_info
from histomil.files import write_json
from histomil.hardware import run_environment
from histomil.training import distributed
from histomil.training.trainer import TrainConfig, predict, train

# Settings that may change between a stopped cross-validation and its resumption: they change no fold's
# result (the table and feature files are compared by content digest, not by path).
RESUMABLE = {("seeds",), ("bootstrap_resamples",), ("calibration_bins",), ("report",), ("table",), ("clinical_table",),
             ("features",), ("train", "device"), ("train", "threads"), ("stream",)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CohortColumnNames(_Strict):
    """Column names of the cohort table(s), matched case-insensitively; split/fold/group are used when present."""

    slide: str = "slide"
    patient: str = "patient"
    split: str = "split"
    fold: str = "fold"
    group: str = "group"


class CohortCVConfig(_Strict):
    """A cohort cross-validation: table(s), feature folder, target, folds, seeds and training."""

    table: Path
    features: Path
    target: str = Field(min_length=1)
    clinical_table: Path | None = None
    # survival: the target is the event column (0/1; the folds are stratified on it) and ``time`` the
    # follow-up time column; training, metrics and results are histomil.evaluation.survival_cv's.
    # regression: the target is a number per patient (folds stratified on its quantile bins), see regression_cv
    task: Literal["classification", "regression", "survival"] = "classification"
    time: str | None = None
    columns: CohortColumnNames = CohortColumnNames()
    classes: list[str] | None = None  # class order (index 0, 1, ...); default: sorted labels
    on_missing: Literal["error", "skip"] = "error"
    bag_level: Literal["patient", "slide"] = "patient"
    folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of each fold's training patients
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = TrainConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    bootstrap_resamples: int = Field(1000, ge=0)  # 0 = no confidence intervals
    calibration_bins: int = Field(10, ge=1)
    report: bool = True  # binary targets: ROC/PR and reliability plots, report.html (per-fold curves)
    # on: slides read from their files when used (histomil.features.lazy), for cohorts larger than memory;
    # auto: so when their float32 features exceed a quarter of this machine's memory; off: all in memory
    stream: Literal["off", "on", "auto"] = "off"

    @model_validator(mode="after")
    def _check(self) -> CohortCVConfig:
        if "seed" in self.train.model_fields_set:
            raise ValueError("train.seed is not used here: each run's model is seeded from 'seeds'")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct whole numbers >= 0, got {self.seeds}")
        if (self.task == "survival") != (self.time is not None):
            raise ValueError("a survival cross-validation needs the time column (--time), and only it takes one")
        if self.task != self.train.task:
            raise ValueError(f"task {self.task} trains with train.task {self.train.task}; leave train.task unset")
        if self.task == "regression" and self.classes is not None:
            raise ValueError("a regression target has no classes; leave out --classes")
        return self


def cohort_config(options: Mapping[str, Any], train_yaml: str | Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> CohortCVConfig:
    """A validated config from command-line ``options``, an optional YAML of training keys (``train``'s
    fields, or a whole config with a ``train`` section) and dotted ``overrides`` (``train.lr=1e-3``)."""
    raw: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if train_yaml is not None:
        doc = config.read_mapping(train_yaml)
        extra = {k: v for k, v in doc.items() if k != "train"} if "train" in doc else {}
        raw = {**extra, **raw, "train": {**(doc.get("train") if "train" in doc else doc), **raw.get("train", {})}}
    raw = config.apply_overrides(raw, overrides)
    if raw.get("task") == "survival":  # a Cox loss needs several patients per step; early stopping on the c-index
        from histomil.evaluation.survival_cv import SURVIVAL_DEFAULTS

        raw["train"] = {**SURVIVAL_DEFAULTS["train"], **raw.get("train", {})}
        raw.setdefault("bootstrap_resamples", SURVIVAL_DEFAULTS["bootstrap_resamples"])
    elif raw.get("task") == "regression":  # the trainer's regression task: one output, standardised target
        from histomil.evaluation.regression_cv import REGRESSION_DEFAULTS

        raw["train"] = {**REGRESSION_DEFAULTS["train"], **raw.get("train", {})}
    return config.validate(CohortCVConfig, raw, str(train_yaml) if train_yaml is not None else "crossval options")


# ------------------------------------------------------------------------------------------- splits


def cohort_folds(source: CohortSource, patients: list[str], k: int, seed: int, val_fraction: float,
                 strata: Mapping[str, int] | None = None) -> list[dict[str, str]]:
    """patient -> "train" / "val" / "test" per fold: stratified by class (or by ``strata``, e.g. a
    continuous target's quantile bins), grouped by the group column (else by patient); the table's fold
    column, when present, gives the outer folds."""
    cohort = source.cohort

    def labels_of(ps: list[str]) -> np.ndarray:
        return cohort.labels_of(ps) if strata is None else np.array([strata[p] for p in ps], dtype=np.int64)

    labels = labels_of(patients)
    group_of = {p: (cohort.patient_group or {}).get(p, p) for p in patients}
    if cohort.patient_fold:
        given = sorted({cohort.patient_fold[p] for p in patients})
        if len(given) != k:
            raise HistomilError(f"{cohort.source}: the fold column holds {len(given)} folds ({given}), --folds asks for {k}")
        outer = [{p for p in patients if cohort.patient_fold[p] == f} for f in given]
    else:
        outer = grouped_stratified_folds(labels, [group_of[p] for p in patients], k, seed, cohort.source,
                                         one_label_ok=strata is not None)
        outer = [{p for p in patients if group_of[p] in test} for test in outer]

    def inner(rest: list[str], fold: int) -> Mapping[str, str]:
        val = stratified_groups_split(rest, labels_of(rest), val_fraction, seed * 1000 + fold,
                                      [group_of[p] for p in rest], f"{cohort.source}, fold {fold}")
        return {p: ("val" if p in val else "train") for p in rest}

    return nested_folds(patients, outer, inner, cohort.source)


# --------------------------------------------------------------------------------------------- folds


def _fold_dir(out: Path, seed: int, fold: int) -> Path:
    return out / f"seed-{seed}" / f"fold-{fold}"


def _run_fold(cfg: CohortCVConfig, source: CohortSource, out: Path, seed: int, fold: int, assignment: Mapping[str, str],
              holdout: set[str], log: Log, progress: Progress | None) -> dict[str, Any]:
    if cfg.task == "survival":
        from histomil.evaluation.survival_cv import run_survival_fold

        return run_survival_fold(cfg, source, out, seed, fold, assignment, holdout, log, progress)
    if cfg.task == "regression":
        from histomil.evaluation.regression_cv import run_regression_fold

        return run_regression_fold(cfg, source, out, seed, fold, assignment, holdout, log, progress)
    fold_dir = _fold_dir(out, seed, fold)
    name = f"seed {seed} fold {fold}"
    cohort = source.cohort

    def work() -> tuple[dict[str, Any], Path, str]:
        from histomil.training.checkpoint import load_checkpoint

        roles, train_p, val_p, test_p = fold_roles(assignment, holdout, name, log)
        absent = [cohort.classes[c] for c in range(len(cohort.classes)) if c not in set(source.labels(train_p).tolist())]
        if absent:
            raise HistomilError(f"{cohort.source}: {name} has no training patient of class {absent[0]!r}; use fewer folds")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        train_bags, val_bags, test_bags = source.bags(train_p), source.bags(val_p), source.bags(test_p)
        train_cfg = cfg.train.model_copy(update={"seed": seed})
        on_epoch = (lambda row: progress("training epochs", int(row["epoch"]), train_cfg.epochs)) if progress else None
        result = train(train_bags, val_bags, train_cfg, fold_dir, encoder_info=training_encoder_info(train_bags + val_bags),
                       on_epoch=on_epoch, resume=True)
        timings["train"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        binary = len(cohort.classes) == 2
        if binary:  # chosen on the validation patients only, recorded in model.pt
            try:
                threshold, p_val = fit_threshold(result.model_path, val_bags, cfg.threshold)
            except HistomilError as exc:
                raise HistomilError(f"{name}, validation patients: {exc}") from None
        model, _ = load_checkpoint(result.model_path)
        if binary:
            val_probs = np.stack([1.0 - p_val, p_val], axis=1)
        else:
            threshold = None
            val_probs = np.stack([p for p, _ in predict(model, val_bags)])
        val_patients, val_p_probs = source.per_patient(val_bags, val_probs)
        test_patients, test_probs = source.per_patient(test_bags, np.stack([p for p, _ in predict(model, test_bags)]))
        y_val, y_test = source.labels(val_patients), source.labels(test_patients)
        write_fold_predictions(fold_dir / "predictions_val.csv", val_patients, y_val, val_p_probs, threshold, cohort.classes)
        write_fold_predictions(fold_dir / "predictions_test.csv", test_patients, y_test, test_probs, threshold, cohort.classes)
        test_metrics = fold_metrics(y_test, test_probs, threshold, cfg.bootstrap_resamples, cfg.calibration_bins,
                                    boot_seed=seed * 1000 + fold)
        timings["evaluate"] = round(time.perf_counter() - t0, 2)
        auc = test_metrics["roc_auc"] if binary else test_metrics["macro_roc_auc"]
        line = (f"{name}: " + (f"threshold {threshold:.3f} (on validation); " if threshold is not None else "")
                + f"test {'' if binary else 'macro '}ROC-AUC {auc:.3f}, balanced accuracy {test_metrics['balanced_accuracy']:.3f}")
        return {
            "seed": seed, "fold": fold, "dir": f"seed-{seed}/fold-{fold}",
            "patients": {r: sorted(ps) for r, ps in roles.items()},
            "slides": {p: source.patient_slides(p) for p in test_patients},  # each test patient's bag: all its slides
            "threshold": threshold, "threshold_rule": cfg.threshold.rule if binary else "argmax",
            "threshold_value": cfg.threshold.value if binary else None,
            "val": fold_metrics(y_val, val_p_probs, threshold, 0, cfg.calibration_bins),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
            "test_sets": {"test": test_metrics},
            "predictions": [{"patient": p, "y_true": int(y), "probs": [float(v) for v in row]}
                            for p, y, row in zip(test_patients, y_test.tolist(), test_probs)],
            "timings": timings,
        }, result.last_path, line

    return run_training_fold(fold_dir, name, work, log)


# ----------------------------------------------------------------------------------------------- run


def run_cohort_crossval(cfg: CohortCVConfig, out_dir: str | Path, log: Log = print,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the cohort cross-validation and write its results; returns metrics.json's content.

    Under torchrun the folds are spread over the ranks (fold i of the seeds' folds on rank i % ranks, each
    trained by its rank alone); rank 0 then writes the results and returns them, the other ranks return {}."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads(cfg.model_dump_json())
    check_settings(out, CohortCVConfig, cfg_json, RESUMABLE)
    c = cfg.columns
    cohort = read_cohort(cfg.table, cfg.target, clinical_table=cfg.clinical_table, classes=cfg.classes,
                         columns=CohortColumns(c.slide, c.patient, c.split, c.fold, c.group), on_missing=cfg.on_missing,
                         numeric=cfg.task == "regression")
    cohort = match_feature_files(cohort, cfg.features, cfg.on_missing)
    if cfg.task == "regression":  # every patient's value checked (a finite number) before any fold is drawn
        from histomil.evaluation import regression_cv

        log(f"{cohort.source}: {regression_cv.describe_values(cohort, regression_cv.cohort_values(cfg, cohort))}")
    else:
        log(f"{cohort.source}: {cohort.describe()}")
    if cfg.task == "survival":  # times and events checked before any fold is drawn
        from histomil.evaluation.survival_cv import cohort_survival

        cohort_survival(cfg, cohort)
    source = CohortSource(cohort, cfg.bag_level, load_slide_features(cohort, stream=cfg.stream != "off"))
    if cfg.stream == "auto" and fits_in_memory(list(source.slide_bags.values())):
        source = CohortSource(cohort, cfg.bag_level, {s: b.load() for s, b in source.slide_bags.items()})  # type: ignore[attr-defined]
    main = distributed.is_main()  # under torchrun: folds spread over the ranks, rank 0 writes the results
    if main:
        check_inputs(
            out, {"cohort_digest": cohort.digest(), "features_digest": source.features_digest()},
            {"cohort_digest": f"{cohort.source}: the cohort table changed (slides, patients, labels, classes, splits, folds or groups)",
             "features_digest": f"{cfg.features}: the slides' feature files changed"},
            notes={"table": str(cfg.table), "features": str(cfg.features)},
        )
        write_json(out / "config.json", cfg_json)
        write_json(out / "environment.json", run_environment("fp32", resolve_device(cfg.train.device)))
    holdout = {p for p, s in (cohort.patient_split or {}).items() if s == "test"}
    patients = [p for p in cohort.patients if p not in holdout]
    log(f"{len(patients)} patients cross-validated in {cfg.folds} folds x {len(cfg.seeds)} seed(s), bags per "
        f"{cfg.bag_level}" + (f"; {len(holdout)} held out (split column 'test')" if holdout else ""))

    strata = None
    if cfg.task == "regression":  # folds stratified on the target's quantile bins
        from histomil.evaluation.regression_cv import target_strata

        strata = target_strata(cfg, cohort, patients)
    jobs: list[tuple[int, int, Mapping[str, str]]] = []
    for seed in cfg.seeds:
        folds = cohort_folds(source, patients, cfg.folds, seed, cfg.val_fraction, strata)
        if main:
            (out / f"seed-{seed}").mkdir(exist_ok=True)
            check_folds(out / f"seed-{seed}" / "folds.json",
                        {"seed": seed, "folds": [{r: sorted(ps) for r, ps in roles_of(a).items()} for a in folds]}, cohort.source)
        jobs += [(seed, f, assignment) for f, assignment in enumerate(folds)]
    distributed.barrier()
    records: list[dict[str, Any]] = []
    for i in distributed.jobs_of_rank(len(jobs)):  # every fold for one process; folds i % ranks == rank under torchrun
        seed, f, assignment = jobs[i]
        with distributed.local_only():  # a fold trains in this process alone
            records.append(_run_fold(cfg, source, out, seed, f, assignment, holdout, log, progress))
        if progress:
            progress("cross-validation runs", len(records), len(jobs))
    if distributed.active():  # rank 0 reads every rank's finished folds back
        distributed.barrier()
        if not main:
            return {}
        records = [_run_fold(cfg, source, out, seed, f, a, holdout, lambda _m: None, None) for seed, f, a in jobs]
    summary = write_results(cfg, out, source, records, holdout, log)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "metrics.json", summary)
    return summary


__all__ = ["RESUMABLE", "CohortCVConfig", "CohortColumnNames", "cohort_config", "cohort_folds", "run_cohort_crossval"]
