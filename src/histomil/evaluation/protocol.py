"""Honest evaluation: patient-grouped cross-validation repeated over seeds, with bootstrap intervals.

The tile-study path; what it shares with slide cohorts (:mod:`.cohort_cv`) lives in their own modules:
patient splits in :mod:`.splitting`, the resumable fold loop in :mod:`.fold_loop`, the composed-study
bags in :mod:`.study_source` and the summaries over folds in :mod:`.cv_summary`.

For every seed and every fold (see :func:`~.splitting.patient_folds`):

1. the fold's patients are split three ways: the fold itself is the test set, and the other
   patients are split again into training and validation patients (``val_fraction`` of them);
   a patient is never in two of train / validation / test (nor in the held-out test set);
2. a study is composed from those patients (:func:`~histomil.data.compose.compose_study` with an
   explicit assignment), so bags of the test set hold only test patients' tiles;
3. features are extracted through ONE tile cache shared by all folds and seeds (each distinct
   tile is encoded once), the model is trained with early stopping on the validation bags;
4. the decision threshold is chosen on the validation bags only (:mod:`.threshold`) and applied
   unchanged to the fold's test sets (one per witness count W) and the held-out test sets;
5. metrics, bootstrap intervals, attention-vs-tile-truth scores and predictions are written to
   ``seed_<s>/fold_<f>/``; ``metrics.json`` is written last, so a finished fold is skipped when
   the run is started again.

Finally, per test set over all runs: mean and standard deviation over runs, a bootstrap 95%
interval of that mean (bags resampled within each run, :func:`~.bootstrap.bootstrap_mean_ci`), and,
in ``crossval.json`` only, the metrics of all predictions pooled together (each bag keeps its own
run's threshold) with their bootstrap interval; also calibration (ECE and a reliability diagram)
and ROC / PR curves of the pooled predictions, in ``crossval.json``, ``crossval.md`` and PNGs.

An optional held-out test set is taken out before the folds are made: the patients marked
``test`` in the tile table's split column (``columns.split``), or ``holdout_fraction`` of the
patients. Every fold's model is evaluated on it; it never takes part in training or threshold
choice.

With ``train.task: regression`` the model predicts each bag's tumour fraction W / bag_size instead of its
class (:mod:`.study_regression`): no threshold is chosen, each test set is scored by MAE, RMSE, R²,
Pearson and Spearman, and the summary gives their mean ± sd over runs and pooled values.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from histomil import config
from histomil.callbacks import Log, Progress
from histomil.data.compose import read_study
from histomil.data.study_spec import StudySpec
from histomil.data.tile_table import TileTable, read_tile_table
from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.evaluation.cv_summary import (
    ATTENTION_KEYS,
    crossval_markdown,
    read_predictions,
    summarize_folds,
    write_predictions,
)
from histomil.evaluation.fold_loop import check_folds, check_inputs, check_settings, fold_finished, run_fold
from histomil.evaluation.metrics import binary_metrics
from histomil.evaluation.splitting import (
    check_no_leak,
    holdout_patients,
    patient_folds,
    roles_of,
    subset_table,
)
from histomil.evaluation.study_regression import (
    check_study_task,
    fold_line,
    load_study_bags,
    regression_crossval_markdown,
    regression_fold,
    summarize_regression,
)
from histomil.evaluation.study_source import StudySource, composed_patients, prune_bags
from histomil.evaluation.threshold import RULES, ThresholdConfig, fit_threshold
from histomil.files import write_json, write_text
from histomil.hardware import run_environment
from histomil.pipeline import FeatureConfig, TileColumns
from histomil.reports.plots import plot_training_curves
from histomil.training.trainer import TrainConfig, train


# Settings that may change between a stopped cross-validation and its resumption (they do not
# change any fold's result); everything else must match what the output folder was made with.
_RESUMABLE = {("seeds",), ("keep_intermediate",), ("prune_bags",), ("bootstrap_resamples",), ("calibration_bins",),
              ("features", "batch_size"), ("features", "workers"), ("train", "device")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _small_study() -> StudySpec:
    return StudySpec(bag_size=40, train_bags=400, val_bags=100, test_bags=200, train_witnesses=(1, 20), val_witnesses=(1, 20))


class CrossValConfig(_Strict):
    """A whole cross-validation; paths are relative to the config file.

    ``study`` gives the bag sizes and counts of every fold's study (its ``seed`` and
    ``split_fractions`` must not be set: patients are split by the folds and the seeds come from
    ``seeds``, which also seed the model, replacing ``train.seed``). With ``columns.split`` the
    patients marked ``test`` in that column are the held-out test set and the others (train and
    val alike) are cross-validated.
    """

    tiles: Path
    columns: TileColumns = TileColumns()
    folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of each fold's training patients
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # of all patients, taken out before the folds
    holdout_seed: int = Field(0, ge=0)  # draws the held-out patients: one fixed set for all seeds
    study: StudySpec = Field(default_factory=_small_study)
    features: FeatureConfig = FeatureConfig()
    train: TrainConfig = TrainConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    bootstrap_resamples: int = Field(1000, ge=0)  # 0 = no confidence intervals
    calibration_bins: int = Field(10, ge=1)
    # Keep each finished fold's per-bag feature files and last.pt training state (the tile cache keeps
    # every tile's features anyway). Always kept: model.pt, history.csv, predictions, metrics and each
    # split's labels.csv / tiles.csv (which tiles of which patient are in each bag).
    keep_intermediate: bool = False
    # Remove each finished fold's bag folders (one link per tile, ~3 KB of disk each): saves disk,
    # but unlinking tens of thousands of links can take a minute per fold on a busy disk.
    prune_bags: bool = False

    @model_validator(mode="after")
    def _check(self) -> CrossValConfig:
        if "seed" in self.study.model_fields_set:
            raise ValueError("study.seed is not used here: list the run seeds in 'seeds'")
        if "split_fractions" in self.study.model_fields_set:
            raise ValueError("study.split_fractions is not used here: patients are split by 'folds', 'val_fraction' and 'holdout_fraction'")
        if "seed" in self.train.model_fields_set:
            raise ValueError("train.seed is not used here: each run's model is seeded from 'seeds'")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct whole numbers >= 0, got {self.seeds}")
        if self.columns.split and self.holdout_fraction > 0:
            raise ValueError("give either columns.split (its 'test' patients are held out) or holdout_fraction, not both")
        if self.study.val_bags < 2:
            raise ValueError("study.val_bags must be at least 2: the threshold and early stopping need validation bags")
        if self.study.train_bags < 1 or self.study.test_bags < 1:
            raise ValueError("study.train_bags and study.test_bags must be at least 1")
        check_study_task(self.train.task, "threshold" in self.model_fields_set)
        return self


def load_crossval_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CrossValConfig:
    """Read a YAML/JSON cross-validation config, apply dotted ``overrides`` and validate it."""
    return config.load_config(CrossValConfig, path, overrides)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _check_tile_table(out_dir: Path, table: TileTable) -> None:
    """Record the tile table's digest and its tiles' content digest (``inputs.json``) and refuse a folder
    made from another version of the table or of its tile images: finished folds and composed bags would
    otherwise be mixed with new ones."""
    check_inputs(
        out_dir,
        {"tile_table_digest": table.digest(), "tile_content_digest": table.content_digest()},
        {
            "tile_table_digest": f"{table.source}: the tile table changed (paths, labels, patients or splits)",
            "tile_content_digest": f"{table.source}: tile images changed (the table is the same)",
        },
        notes={"tile_table": str(table.source)},
    )


def _fold_spec(cfg: CrossValConfig, seed: int, **update: Any) -> StudySpec:
    return StudySpec.model_validate({**cfg.study.model_dump(), "seed": seed, **update})


def _seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed_{seed}"


def _prepare_seed(out: Path, cfg: CrossValConfig, cv_table: TileTable, seed: int) -> list[dict[str, str]]:
    """The seed's folds (written to folds.json; on resume they must match what is there)."""
    folds = patient_folds(cv_table, cfg.folds, seed, cfg.val_fraction)
    sdir = _seed_dir(out, seed)
    sdir.mkdir(parents=True, exist_ok=True)
    record = {"seed": seed, "folds": [{r: sorted(ps) for r, ps in roles_of(a).items()} for a in folds]}
    check_folds(sdir / "folds.json", record, f"the tile table {cv_table.source}")
    return folds


def _run_fold(
    source: StudySource, cfg: CrossValConfig, out: Path, cv_table: TileTable, seed: int, fold: int,
    assignment: Mapping[str, str], holdout: set[str], holdout_sets: Mapping[str, Path],
) -> dict[str, Any]:
    """Compose, extract, train, choose the threshold on validation, evaluate; returns the fold record."""
    fold_dir = _seed_dir(out, seed) / f"fold_{fold}"
    bags_dir, feat_dir, model_dir = fold_dir / "bags", fold_dir / "features", fold_dir / "model"
    state: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        from histomil.training.checkpoint import load_checkpoint

        roles = roles_of(assignment)
        check_no_leak({**roles, "held-out test": holdout}, f"seed {seed} fold {fold}")
        source.log(
            f"seed {seed} fold {fold}: {len(roles['train'])} train / {len(roles['val'])} validation /"
            f" {len(roles['test'])} test patients"
        )
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        source.compose(cv_table, _fold_spec(cfg, seed), bags_dir, assignment, f"seed {seed} fold {fold}")
        check_no_leak({**composed_patients(bags_dir), "held-out test": holdout}, str(bags_dir))
        timings["compose"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        source.extract(bags_dir, feat_dir)
        timings["extract"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        train_bags, val_bags = (load_study_bags(feat_dir / split, cfg.train.task) for split in ("train", "val"))
        train_cfg = cfg.train.model_copy(update={"seed": seed})
        progress = source.progress
        on_epoch = (lambda row: progress("training epochs", int(row["epoch"]), train_cfg.epochs)) if progress else None
        result = train(
            train_bags, val_bags, train_cfg, model_dir,
            encoder_info=dict(train_bags[0].attrs), on_epoch=on_epoch, resume=True,
        )
        state["result"] = result
        timings["train"] = round(time.perf_counter() - t0, 2)
        del train_bags

        t0 = time.perf_counter()
        test_sets = {n: feat_dir / n for n in (s["name"] for s in read_study(bags_dir)["splits"]) if n.startswith("test")}
        test_sets.update(holdout_sets)
        if cfg.train.task == "regression":  # the tumour fraction: no threshold
            val, results = regression_fold(result.model_path, val_bags, test_sets, fold_dir, source.bootstrap_resamples,
                                           boot_seed=seed * 1000 + fold)
            timings["evaluate"] = round(time.perf_counter() - t0, 2)
            _curves(source, result, fold_dir, f"seed {seed} fold {fold}")
            state["line"] = f"seed {seed} fold {fold}: {fold_line(results)}"
            return {"seed": seed, "fold": fold, "patients": {r: sorted(ps) for r, ps in roles.items()}, "task": "regression",
                    "val": val, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
                    "test_sets": results, "timings": timings}
        y_val = np.array([int(b.label) for b in val_bags], dtype=np.int64)  # type: ignore[arg-type]
        try:  # chosen on validation only and recorded in the checkpoint ('histomil evaluate' uses it too)
            threshold, p_val = fit_threshold(result.model_path, val_bags, cfg.threshold)
        except HistomilError as exc:
            raise HistomilError(f"{feat_dir / 'val'}: {exc}") from None
        write_predictions(fold_dir / "predictions_val.csv", [b.bag_id for b in val_bags], y_val, p_val, threshold)
        model, _ = load_checkpoint(result.model_path)
        results: dict[str, Any] = {}
        for name, folder in test_sets.items():
            results[name], _, _ = source.evaluate_set(
                model, folder, threshold, fold_dir / f"predictions_{name}.csv", boot_seed=seed * 1000 + fold
            )
        timings["evaluate"] = round(time.perf_counter() - t0, 2)
        _curves(source, result, fold_dir, f"seed {seed} fold {fold}")
        first = next(iter(results))
        state["line"] = (
            f"seed {seed} fold {fold}: threshold {threshold:.3f} (on validation); {first}: ROC-AUC"
            f" {_fmt(results[first]['roc_auc'])}, balanced accuracy {_fmt(results[first]['balanced_accuracy'])}"
        )
        return {
            "seed": seed,
            "fold": fold,
            "patients": {r: sorted(ps) for r, ps in roles.items()},
            "threshold": threshold,
            "threshold_rule": cfg.threshold.rule,
            "threshold_value": cfg.threshold.value,
            "val": binary_metrics(y_val, p_val, threshold),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "monitor": result.monitor,
            "test_sets": results,
            "timings": timings,
        }

    def after() -> None:
        if not cfg.keep_intermediate:
            shutil.rmtree(feat_dir, ignore_errors=True)
            state["result"].last_path.unlink(missing_ok=True)
        if cfg.prune_bags:
            prune_bags(bags_dir)
        source.log(state["line"])

    return run_fold(fold_dir, f"seed {seed} fold {fold}", work, source.log, after)


def _curves(source: StudySource, result: Any, fold_dir: Path, where: str) -> None:
    """The fold's training curves (a figure is not worth failing the fold for)."""
    try:
        plot_training_curves(result.history_path, fold_dir / "training_curves.png", best_epoch=result.best_epoch)
    except HistomilError as exc:
        source.log(f"{where}: no training curves ({exc})")


def run_crossval(
    cfg: CrossValConfig, out_dir: str | Path, log: Log = print, progress: Progress | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole cross-validation and write its reports; returns the summary."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads(cfg.model_dump_json())
    check_settings(out, CrossValConfig, cfg_json, _RESUMABLE)
    write_json(out / "config.json", cfg_json)
    # resolved precision and the hardware the features are extracted on
    write_json(out / "environment.json", run_environment(cfg.features.precision, resolve_device(cfg.features.device)))
    source = StudySource(cfg.features, out / "cache", cfg.calibration_bins, cfg.bootstrap_resamples, log, progress)

    c = cfg.columns
    table = read_tile_table(cfg.tiles, c.path, c.label, c.patient, c.split)
    _check_tile_table(out, table)
    holdout = holdout_patients(table, cfg.holdout_fraction, cfg.holdout_seed)
    cv_patients = sorted(set(table.patients) - holdout)
    cv_table = subset_table(table, cv_patients)
    log(
        f"{len(set(table.patients))} patients ({len(table)} labelled tiles): {len(cv_patients)} cross-validated in"
        f" {cfg.folds} folds x {len(cfg.seeds)} seed(s)" + (f", {len(holdout)} held out for testing" if holdout else "")
    )
    if holdout:
        write_json(out / "holdout.json", {"patients": sorted(holdout)})

    records: list[dict[str, Any]] = []
    total = cfg.folds * len(cfg.seeds)
    for seed in cfg.seeds:
        folds = _prepare_seed(out, cfg, cv_table, seed)
        unfinished = any(not fold_finished(_seed_dir(out, seed) / f"fold_{f}") for f in range(len(folds)))
        holdout_sets = (
            source.holdout(table, holdout, _fold_spec(cfg, seed, train_bags=0, val_bags=0), _seed_dir(out, seed) / "holdout", seed)
            if unfinished else {}
        )
        for f, assignment in enumerate(folds):
            records.append(_run_fold(source, cfg, out, cv_table, seed, f, assignment, holdout, holdout_sets))
            if progress:
                progress("cross-validation runs", len(records), total)
        if holdout_sets and not cfg.keep_intermediate:
            shutil.rmtree(_seed_dir(out, seed) / "holdout" / "features", ignore_errors=True)
        if holdout_sets and cfg.prune_bags:
            prune_bags(_seed_dir(out, seed) / "holdout" / "bags")

    summary = aggregate(cfg, out, records, n_patients=len(set(table.patients)), n_holdout=len(holdout))
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "crossval.json", summary)
    write_text(out / "crossval.md", crossval_report(summary))
    log(f"cross-validation reports written to {out / 'crossval.md'}")
    return summary


# --------------------------------------------------------------------------------------------
# Aggregation and reports
# --------------------------------------------------------------------------------------------


def aggregate(
    cfg: CrossValConfig, out: Path, records: Sequence[Mapping[str, Any]], n_patients: int = 0, n_holdout: int = 0
) -> dict[str, Any]:
    """Combine the fold records per test set (:func:`~.cv_summary.summarize_folds`): mean/std over runs,
    bootstrap CIs, ECE, plots; with the tile table, folds, seeds and patient counts. A regression: mean ± sd
    and pooled regression metrics (:func:`~.study_regression.summarize_regression`)."""
    def predictions(r: Mapping[str, Any], name: str) -> Path:
        return _seed_dir(out, r["seed"]) / f"fold_{r['fold']}" / f"predictions_{name}.csv"

    if cfg.train.task == "regression":
        summary = summarize_regression(records, predictions, out, cfg.bootstrap_resamples)
    else:
        summary = summarize_folds(records, predictions, out, cfg.threshold, cfg.bootstrap_resamples, cfg.calibration_bins)
    return {
        "format": "histomil-crossval",
        "tile_table": str(cfg.tiles),
        "folds": cfg.folds,
        "seeds": list(cfg.seeds),
        "n_runs": summary.pop("n_runs"),
        "n_patients": n_patients,
        "n_holdout_patients": n_holdout,
        **summary,
    }


def crossval_report(summary: Mapping[str, Any]) -> str:
    """crossval.md of a summary: :func:`~.cv_summary.crossval_markdown`, or the regression table."""
    if summary.get("task") == "regression":
        return regression_crossval_markdown(summary)
    return crossval_markdown(summary)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v is not None and math.isfinite(float(v)) else "n/a"


__all__ = [
    "ATTENTION_KEYS",
    "RULES",
    "CrossValConfig",
    "ThresholdConfig",
    "aggregate",
    "check_no_leak",
    "composed_patients",
    "crossval_markdown",
    "crossval_report",
    "holdout_patients",
    "load_crossval_config",
    "patient_folds",
    "read_predictions",
    "run_crossval",
    "subset_table",
]
