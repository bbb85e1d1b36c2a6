"""Honest evaluation: patient-grouped cross-validation repeated over seeds, with bootstrap intervals.

For every seed and every fold (see :func:`patient_folds`):

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
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.model_selection import StratifiedGroupKFold

from histomil import config
from histomil.config import changed_since_record
from histomil.data.compose import (
    SPLITS,
    StudySpec,
    TileTable,
    assign_patients,
    compose_study,
    read_study,
    read_tile_table,
)
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import (
    METRICS,
    bootstrap_ci,
    bootstrap_mean_ci,
    summarize_runs,
)
from histomil.evaluation.calibration import expected_calibration_error, plot_reliability
from histomil.evaluation.evaluate import tile_truth_for
from histomil.evaluation.metrics import attention_metrics, binary_metrics
from histomil.evaluation.threshold import RULES, ThresholdConfig, describe_rule, fit_threshold
from histomil.features.formats import load_feature_dataset
from histomil.hardware import run_environment
from histomil.pipeline import (
    FeatureConfig,
    TileColumns,
    extract_study,
)
from histomil.reports.plots import plot_roc_pr, plot_training_curves
from histomil.reports.tables import write_json, write_text
from histomil.training.trainer import TrainConfig, predict, train

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]

ATTENTION_KEYS = ("tile_auc_pooled", "tile_auc_mean", "top1_hit", "top1_hit_random")
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
        return self


def load_crossval_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CrossValConfig:
    """Read a YAML/JSON cross-validation config, apply dotted ``overrides`` and validate it."""
    return config.load_config(CrossValConfig, path, overrides)


# --------------------------------------------------------------------------------------------
# Patient splits
# --------------------------------------------------------------------------------------------


def check_no_leak(roles: Mapping[str, Iterable[str]], where: str = "patient split") -> None:
    """Raise :class:`HistomilError` naming the first patient found in two roles (train / val / test / ...)."""
    seen: dict[str, str] = {}
    for role, patients in roles.items():
        for p in sorted(set(patients)):
            if p in seen and seen[p] != role:
                raise HistomilError(
                    f"{where}: patient {p} is in both {seen[p]!r} and {role!r}; a patient must stay in one of"
                    " train / validation / test, or the test score is inflated"
                )
            seen.setdefault(p, role)


def subset_table(table: TileTable, patients: Iterable[str]) -> TileTable:
    """The rows of ``table`` that belong to ``patients`` (without a split column)."""
    keep_set = set(patients)
    keep = [i for i, p in enumerate(table.patients) if p in keep_set]
    return TileTable(
        source=table.source,
        paths=[table.paths[i] for i in keep],
        labels=table.labels[keep],
        patients=[table.patients[i] for i in keep],
        splits=None,
        lines=[table.lines[i] for i in keep] if table.lines else None,
        n_excluded=table.n_excluded,
    )


def holdout_patients(table: TileTable, fraction: float = 0.0, seed: int = 0) -> set[str]:
    """Patients held out from cross-validation: the split column's ``test`` patients, else a fraction.

    A split column that puts one patient in two splits is refused (naming the patient). A fraction
    is drawn with :func:`~histomil.data.compose.assign_patients`, balancing tumour and non-tumour
    tiles; ``seed`` fixes it (``holdout_seed``, not the run seeds, so every seed of a cross-validation
    shares one held-out set).
    """
    if table.splits is not None:
        roles = assign_patients(table)
        return {p for p, r in roles.items() if r == "test"}
    if fraction <= 0:
        return set()
    roles = assign_patients(subset_table(table, table.patients), (1.0 - fraction, 0.0, fraction), seed)
    return {p for p, r in roles.items() if r == "test"}


def patient_folds(table: TileTable, k: int = 5, seed: int = 0, val_fraction: float = 0.2) -> list[dict[str, str]]:
    """One patient -> "train" / "val" / "test" assignment per fold; each patient is tested in exactly one fold.

    Outer folds: scikit-learn's ``StratifiedGroupKFold`` over tiles, grouped by patient and
    stratified by tile label, so every fold gets about 1/k of the tumour tiles AND of the
    non-tumour tiles (the two pools bags are drawn from) while a patient's tiles stay together.
    Inner split: the other patients are divided by
    :func:`~histomil.data.compose.assign_patients` into training and validation patients
    (``val_fraction`` of their tiles of each class, patient by patient).
    """
    patients = sorted(set(table.patients))
    if k < 2:
        raise HistomilError(f"{table.source}: cross-validation needs at least 2 folds, got {k}")
    if len(patients) < k:
        raise HistomilError(f"{table.source}: {len(patients)} patients cannot make {k} patient-disjoint folds")
    if not 0.0 < val_fraction < 1.0:
        raise HistomilError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if len(np.unique(table.labels)) < 2:
        raise HistomilError(f"{table.source}: every labelled tile has the same label; need tumour and non-tumour tiles")
    groups = np.asarray(table.patients)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    folds: list[dict[str, str]] = []
    tested: dict[str, int] = {}
    for f, (_, test_idx) in enumerate(splitter.split(np.zeros(len(table)), table.labels, groups)):
        test = set(groups[test_idx].tolist())
        rest = [p for p in patients if p not in test]
        if len(rest) < 2:
            raise HistomilError(f"{table.source}: fold {f} leaves {len(rest)} patient(s) for training and validation")
        inner = assign_patients(subset_table(table, rest), (1.0 - val_fraction, val_fraction, 0.0), seed * 1000 + f)
        roles = {p: "test" for p in test}
        roles.update(inner)
        folds.append({p: roles[p] for p in patients})
        for p in test:
            if p in tested:  # StratifiedGroupKFold guarantees this never happens; check anyway
                raise HistomilError(f"{table.source}: patient {p} is tested in folds {tested[p]} and {f}")
            tested[p] = f
    if len(tested) != len(patients):
        missing = sorted(set(patients) - set(tested))
        raise HistomilError(f"{table.source}: patient {missing[0]} is never tested")
    return folds


def _roles_of(assignment: Mapping[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {r: set() for r in SPLITS}
    for p, r in assignment.items():
        out[r].add(p)
    return out


def composed_patients(study_dir: Path) -> dict[str, set[str]]:
    """Patients whose tiles are actually in each role's bags of a composed study (from tiles.csv)."""
    roles: dict[str, set[str]] = {}
    for s in read_study(study_dir)["splits"]:
        with open(study_dir / s["name"] / "tiles.csv", newline="", encoding="utf-8") as fh:
            roles.setdefault(s["role"], set()).update(row["patient"] for row in csv.DictReader(fh))
    return roles


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _check_resume(out_dir: Path, cfg_json: dict) -> None:
    changed = changed_since_record(out_dir / "config.json", CrossValConfig, cfg_json, _RESUMABLE,
                                   "{path}: unreadable; not a cross-validation folder, or a damaged one")
    if changed:
        raise HistomilError(
            f"{out_dir}: was made with a different config ({'.'.join(changed[0])} changed);"
            " use another output folder, or restore the old setting to resume"
        )


def _check_tile_table(out_dir: Path, table: TileTable) -> None:
    """Record the tile table's digest and its tiles' content digest (``inputs.json``) and refuse a folder
    made from another version of the table or of its tile images: finished folds and composed bags would
    otherwise be mixed with new ones."""
    path = out_dir / "inputs.json"
    content, recorded_content = table.content_digest(), None
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            recorded_table, recorded_content = recorded.get("tile_table_digest"), recorded.get("tile_content_digest")
        except (OSError, ValueError, AttributeError):
            raise HistomilError(f"{path}: unreadable; not a cross-validation folder, or a damaged one") from None
        if recorded_table != table.digest():
            raise HistomilError(
                f"{table.source}: the tile table changed (paths, labels, patients or splits) since {out_dir} was made;"
                " use another output folder, or restore the table to resume"
            )
        if recorded_content is not None and recorded_content != content:
            raise HistomilError(
                f"{table.source}: tile images changed since {out_dir} was made (the table is the same);"
                " use another output folder, or restore the tiles to resume"
            )
    if recorded_content is None:  # new folders, and folders made before contents were recorded gain it now
        write_json(path, {"tile_table": str(table.source), "tile_table_digest": table.digest(),
                          "tile_content_digest": content})


def _fold_spec(cfg: CrossValConfig, seed: int, **update: Any) -> StudySpec:
    return StudySpec.model_validate({**cfg.study.model_dump(), "seed": seed, **update})


def _write_predictions(path: Path, bag_ids: Sequence[str], y: np.ndarray, prob: np.ndarray, threshold: float) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "y_true", "prob_positive", "y_pred", "threshold"])
    for b, t, p in zip(bag_ids, y.tolist(), prob.tolist()):
        w.writerow([b, t, repr(float(p)), int(p >= threshold), repr(float(threshold))])
    write_text(path, buf.getvalue())


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, prob_positive, threshold) arrays from a predictions CSV written here."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        y = np.array([int(r["y_true"]) for r in rows], dtype=np.int64)
        p = np.array([float(r["prob_positive"]) for r in rows], dtype=np.float64)
        t = np.array([float(r["threshold"]) for r in rows], dtype=np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise HistomilError(f"{path}: unreadable predictions ({exc}); delete the fold's metrics.json to redo it") from None
    return y, p, t


class _Run:
    """State shared by the folds of one cross-validation."""

    def __init__(self, cfg: CrossValConfig, out_dir: Path, log: Log, progress: Progress | None) -> None:
        self.cfg, self.out, self.log, self.progress = cfg, out_dir, log, progress
        self.cache_dir = out_dir / "cache"

    def extract(self, study_dir: Path, feat_dir: Path) -> None:
        extract_study(study_dir, feat_dir, self.cfg.features, cache_dir=self.cache_dir, log=self.log, progress=self.progress)

    def evaluate_set(
        self, model: Any, folder: Path, threshold: float, pred_csv: Path, boot_seed: int
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        bags = load_feature_dataset(folder, require_labels=True)
        preds = predict(model, bags)
        y = np.array([int(b.label) for b in bags], dtype=np.int64)  # type: ignore[arg-type]
        prob = np.array([p[1] for p, _ in preds], dtype=np.float64)
        metrics = binary_metrics(y, prob, threshold)
        truth = tile_truth_for(folder, bags)
        if truth is not None:
            metrics["attention"] = attention_metrics(y, [a for _, a in preds], truth)
        metrics["ece"] = expected_calibration_error(y, prob, self.cfg.calibration_bins)
        if self.cfg.bootstrap_resamples:
            metrics["ci"] = bootstrap_ci(y, prob, threshold, self.cfg.bootstrap_resamples, seed=boot_seed)
        _write_predictions(pred_csv, [b.bag_id for b in bags], y, prob, threshold)
        return metrics, y, prob


_PRUNED = ".bag_folders_removed"


def _bags_ready(study_dir: Path) -> bool:
    """A composed study with its bag folders (pruned ones are composed again: same seed, same bags)."""
    return (study_dir / "study.json").exists() and not (study_dir / _PRUNED).exists()


def _prune_bags(study_dir: Path) -> None:
    """Remove the per-bag tile-link folders of a finished study; keep study.json and the CSVs."""
    if not (study_dir / "study.json").exists():
        return
    write_text(study_dir / _PRUNED, "bag folders removed after the fold finished; the CSVs list every bag's tiles\n")
    for split in read_study(study_dir)["splits"]:
        for child in (study_dir / split["name"]).iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)


def _seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed_{seed}"


def _prepare_seed(run: _Run, cv_table: TileTable, seed: int) -> list[dict[str, str]]:
    """The seed's folds (written to folds.json; on resume they must match what is there)."""
    cfg = run.cfg
    folds = patient_folds(cv_table, cfg.folds, seed, cfg.val_fraction)
    sdir = _seed_dir(run.out, seed)
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / "folds.json"
    record = {"seed": seed, "folds": [{r: sorted(ps) for r, ps in _roles_of(a).items()} for a in folds]}
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(record)):
            raise HistomilError(
                f"{path}: the patient folds differ from the ones this folder was made with (was the tile table"
                f" {cv_table.source} changed?); use another output folder"
            )
    else:
        write_json(path, record)
    return folds


def _prepare_holdout(run: _Run, table: TileTable, holdout: set[str], seed: int) -> dict[str, Path]:
    """Compose and extract the held-out test sets for this seed; returns name -> feature folder."""
    if not holdout:
        return {}
    cfg = run.cfg
    hdir = _seed_dir(run.out, seed) / "holdout"
    bags_dir, feat_dir = hdir / "bags", hdir / "features"
    if not _bags_ready(bags_dir):
        assignment = {p: ("test" if p in holdout else "train") for p in set(table.patients)}
        spec = _fold_spec(cfg, seed, train_bags=0, val_bags=0)
        run.log(f"seed {seed}: composing the held-out test sets ({len(holdout)} patients)")
        compose_study(table, spec, bags_dir, assignment=assignment, overwrite=True)
    got = composed_patients(bags_dir).get("test", set())
    if not got <= holdout:
        stray = min(got - holdout)
        raise HistomilError(f"{bags_dir}: patient {stray} is in the held-out bags but not held out; delete the folder to recompose")
    run.extract(bags_dir, feat_dir)
    names = [s["name"] for s in read_study(bags_dir)["splits"]]
    return {"holdout" + n.removeprefix("test"): feat_dir / n for n in names}


def _run_fold(
    run: _Run, cv_table: TileTable, seed: int, fold: int, assignment: Mapping[str, str], holdout: set[str],
    holdout_sets: Mapping[str, Path],
) -> dict[str, Any]:
    """Compose, extract, train, choose the threshold on validation, evaluate; returns the fold record."""
    from histomil.training.checkpoint import load_checkpoint

    cfg = run.cfg
    fold_dir = _seed_dir(run.out, seed) / f"fold_{fold}"
    metrics_path = fold_dir / "metrics.json"
    if metrics_path.exists():
        run.log(f"seed {seed} fold {fold}: finished earlier, skipped")
        return json.loads(metrics_path.read_text(encoding="utf-8"))
    fold_dir.mkdir(parents=True, exist_ok=True)
    roles = _roles_of(assignment)
    check_no_leak({**roles, "held-out test": holdout}, f"seed {seed} fold {fold}")
    run.log(
        f"seed {seed} fold {fold}: {len(roles['train'])} train / {len(roles['val'])} validation /"
        f" {len(roles['test'])} test patients"
    )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    bags_dir, feat_dir, model_dir = fold_dir / "bags", fold_dir / "features", fold_dir / "model"
    if not _bags_ready(bags_dir):
        try:
            compose_study(cv_table, _fold_spec(cfg, seed), bags_dir, assignment=assignment, overwrite=True)
        except HistomilError as exc:
            raise HistomilError(
                f"seed {seed} fold {fold}: {exc} (try fewer folds, a larger val_fraction or smaller witness counts)"
            ) from None
    composed = composed_patients(bags_dir)
    for role, got in composed.items():
        if not got <= roles[role]:
            stray = min(got - roles[role])
            raise HistomilError(
                f"{bags_dir}: patient {stray} is in the {role} bags but assigned to"
                f" {assignment.get(stray, 'no split')!r}; delete the folder to recompose"
            )
    check_no_leak({**composed, "held-out test": holdout}, str(bags_dir))
    timings["compose"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    run.extract(bags_dir, feat_dir)
    timings["extract"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    train_bags = load_feature_dataset(feat_dir / "train", require_labels=True)
    val_bags = load_feature_dataset(feat_dir / "val", require_labels=True)
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    on_epoch = (lambda row: run.progress("training epochs", int(row["epoch"]), train_cfg.epochs)) if run.progress else None
    result = train(
        train_bags, val_bags, train_cfg, model_dir,
        encoder_info=dict(train_bags[0].attrs), on_epoch=on_epoch, resume=True,
    )
    timings["train"] = round(time.perf_counter() - t0, 2)
    del train_bags

    t0 = time.perf_counter()
    y_val = np.array([int(b.label) for b in val_bags], dtype=np.int64)  # type: ignore[arg-type]
    try:  # chosen on validation only and recorded in the checkpoint ('histomil evaluate' uses it too)
        threshold, p_val = fit_threshold(result.model_path, val_bags, cfg.threshold)
    except HistomilError as exc:
        raise HistomilError(f"{feat_dir / 'val'}: {exc}") from None
    _write_predictions(fold_dir / "predictions_val.csv", [b.bag_id for b in val_bags], y_val, p_val, threshold)
    model, _ = load_checkpoint(result.model_path)

    test_sets = {n: feat_dir / n for n in (s["name"] for s in read_study(bags_dir)["splits"]) if n.startswith("test")}
    test_sets.update(holdout_sets)
    results: dict[str, Any] = {}
    for name, folder in test_sets.items():
        results[name], _, _ = run.evaluate_set(
            model, folder, threshold, fold_dir / f"predictions_{name}.csv", boot_seed=seed * 1000 + fold
        )
    timings["evaluate"] = round(time.perf_counter() - t0, 2)
    try:
        plot_training_curves(result.history_path, fold_dir / "training_curves.png", best_epoch=result.best_epoch)
    except HistomilError as exc:  # a figure is not worth failing the fold for
        run.log(f"seed {seed} fold {fold}: no training curves ({exc})")

    record = {
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
    write_json(metrics_path, record)  # written last: its presence marks the fold finished
    if not cfg.keep_intermediate:
        shutil.rmtree(feat_dir, ignore_errors=True)
        result.last_path.unlink(missing_ok=True)
    if cfg.prune_bags:
        _prune_bags(bags_dir)
    first = next(iter(results))
    run.log(
        f"seed {seed} fold {fold}: threshold {threshold:.3f} (on validation); {first}: ROC-AUC"
        f" {_fmt(results[first]['roc_auc'])}, balanced accuracy {_fmt(results[first]['balanced_accuracy'])}"
    )
    return json.loads(metrics_path.read_text(encoding="utf-8"))


def run_crossval(
    cfg: CrossValConfig, out_dir: str | Path, log: Log = print, progress: Progress | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole cross-validation and write its reports; returns the summary."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads(cfg.model_dump_json())
    _check_resume(out, cfg_json)
    write_json(out / "config.json", cfg_json)
    write_json(out / "environment.json", run_environment(cfg.features.precision))  # resolved precision, hardware
    run = _Run(cfg, out, log, progress)

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
        folds = _prepare_seed(run, cv_table, seed)
        unfinished = any(not (_seed_dir(out, seed) / f"fold_{f}" / "metrics.json").exists() for f in range(len(folds)))
        holdout_sets = _prepare_holdout(run, table, holdout, seed) if unfinished else {}
        for f, assignment in enumerate(folds):
            records.append(_run_fold(run, cv_table, seed, f, assignment, holdout, holdout_sets))
            if progress:
                progress("cross-validation runs", len(records), total)
        if holdout_sets and not cfg.keep_intermediate:
            shutil.rmtree(_seed_dir(out, seed) / "holdout" / "features", ignore_errors=True)
        if holdout_sets and cfg.prune_bags:
            _prune_bags(_seed_dir(out, seed) / "holdout" / "bags")

    summary = aggregate(cfg, out, records, n_patients=len(set(table.patients)), n_holdout=len(holdout))
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "crossval.json", summary)
    write_text(out / "crossval.md", crossval_markdown(summary))
    log(f"cross-validation reports written to {out / 'crossval.md'}")
    return summary


# --------------------------------------------------------------------------------------------
# Aggregation and reports
# --------------------------------------------------------------------------------------------


def aggregate(
    cfg: CrossValConfig, out: Path, records: Sequence[Mapping[str, Any]], n_patients: int = 0, n_holdout: int = 0
) -> dict[str, Any]:
    """Combine the fold records per test set: mean/std over runs, bootstrap CIs, ECE, plots."""
    names: list[str] = []
    for r in records:
        names += [n for n in r["test_sets"] if n not in names]
    sets: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        runs = [r for r in records if name in r["test_sets"]]
        per_run = [r["test_sets"][name] for r in runs]
        ys, ps, ts = [], [], []
        for r in runs:
            y, p, t = read_predictions(_seed_dir(out, r["seed"]) / f"fold_{r['fold']}" / f"predictions_{name}.csv")
            ys.append(y)
            ps.append(p)
            ts.append(t)
        y, p, t = np.concatenate(ys), np.concatenate(ps), np.concatenate(ts)
        curves[name] = (y, p)
        stats: dict[str, dict[str, Any]] = summarize_runs(per_run, METRICS)
        if cfg.bootstrap_resamples:
            mean_ci = bootstrap_mean_ci(list(zip(ys, ps, ts)), cfg.bootstrap_resamples, seed=0)
            pooled = bootstrap_ci(y, p, t, cfg.bootstrap_resamples, seed=0)
            for m in METRICS:
                stats[m].update({"low": mean_ci[m]["low"], "high": mean_ci[m]["high"], "n_skipped": mean_ci[m]["n_skipped"]})
                stats[m]["pooled"] = {k: pooled[m][k] for k in ("value", "low", "high", "n_skipped")}
        att_runs = [m["attention"] for m in per_run if "attention" in m]
        sets[name] = {
            "n_runs": len(runs),
            "n_bags_pooled": int(y.size),
            "n_pos_pooled": int(y.sum()),
            "metrics": stats,
            "attention": summarize_runs(att_runs, ATTENTION_KEYS) if att_runs else None,
            "ece": {
                "pooled": expected_calibration_error(y, p, cfg.calibration_bins),
                **summarize_runs([{"ece": m.get("ece")} for m in per_run], ("ece",))["ece"],
            },
        }
    if curves:
        plot_roc_pr(curves, out / "roc_pr.png", title=f"pooled over {len(records)} runs")
        plot_reliability(curves, out / "reliability.png", cfg.calibration_bins,
                         title=f"reliability, pooled over {len(records)} runs")
    thresholds = [float(r["threshold"]) for r in records]
    return {
        "format": "histomil-crossval",
        "tile_table": str(cfg.tiles),
        "folds": cfg.folds,
        "seeds": list(cfg.seeds),
        "n_runs": len(records),
        "n_patients": n_patients,
        "n_holdout_patients": n_holdout,
        "bootstrap_resamples": cfg.bootstrap_resamples,
        "calibration_bins": cfg.calibration_bins,
        "threshold": {
            "rule": cfg.threshold.rule,
            "value": cfg.threshold.value,
            "description": describe_rule(cfg.threshold.rule, cfg.threshold.value),
            "mean": float(np.mean(thresholds)) if thresholds else math.nan,
            "std": float(np.std(thresholds, ddof=1)) if len(thresholds) > 1 else math.nan,
            "min": min(thresholds, default=math.nan),
            "max": max(thresholds, default=math.nan),
        },
        "test_sets": sets,
        "runs": [
            {
                "seed": r["seed"],
                "fold": r["fold"],
                "threshold": r["threshold"],
                "best_epoch": r["best_epoch"],
                "epochs_run": r["epochs_run"],
                "n_patients": {k: len(v) for k, v in r["patients"].items()},
                "val_roc_auc": r["val"].get("roc_auc"),
                "test": {n: {m: s.get(m) for m in METRICS} for n, s in r["test_sets"].items()},
            }
            for r in records
        ],
    }


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v is not None and math.isfinite(float(v)) else "n/a"


def _cell(s: Mapping[str, Any]) -> str:
    text = f"{_fmt(s.get('mean'))} ± {_fmt(s.get('std'))}"
    if "low" in s:
        text += f" [{_fmt(s.get('low'))}, {_fmt(s.get('high'))}]"
    return text


def crossval_markdown(summary: Mapping[str, Any]) -> str:
    """The report: bag-level table (mean ± std [95% CI of the mean]), instance level, calibration."""
    th = summary["threshold"]
    sets = summary["test_sets"]
    lines = [
        f"# Cross-validation: {summary['folds']} folds x {len(summary['seeds'])} seed(s) = {summary['n_runs']} runs",
        "",
        f"Tile table: `{summary['tile_table']}`; {summary['n_patients']} patients"
        + (f", {summary['n_holdout_patients']} of them held out (holdout_* rows)" if summary["n_holdout_patients"] else "")
        + ". Folds are patient-disjoint; each run's threshold was chosen on its own validation patients.",
        "",
        (
            f"Threshold: {th['description']}; per run mean {_fmt(th['mean'])} ± {_fmt(th['std'])}"
            f" (range {_fmt(th['min'])} to {_fmt(th['max'])})."
        ),
        "",
        "Cells: mean ± standard deviation over runs"
        + (
            f" [95% bootstrap interval of the mean: bags resampled within each run, {summary['bootstrap_resamples']}"
            " resamples]. crossval.json also holds each metric of all runs' predictions pooled, with its interval."
            if summary["bootstrap_resamples"]
            else "."
        ),
        "",
        "| test set | bags | " + " | ".join(METRICS) + " |",
        "|---|---:|" + "|".join("---:" for _ in METRICS) + "|",
    ]
    for name, s in sets.items():
        lines.append(f"| {name} | {s['n_bags_pooled']} | " + " | ".join(_cell(s["metrics"][m]) for m in METRICS) + " |")
    if any(s.get("attention") for s in sets.values()):
        lines += [
            "",
            "## Instance level (attention against tile truth, positive bags; mean ± std over runs)",
            "",
            "| test set | tile ROC-AUC (pooled tiles) | tile ROC-AUC (mean per bag) | top-1 tile is tumour | random tile is tumour |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, s in sets.items():
            a = s.get("attention")
            if a:
                lines.append(f"| {name} | " + " | ".join(_cell(a[k]) for k in ATTENTION_KEYS) + " |")
    lines += [
        "",
        f"## Calibration (expected calibration error, {summary['calibration_bins']} equal-width bins)",
        "",
        "| test set | ECE pooled | ECE per run |",
        "|---|---:|---:|",
    ]
    for name, s in sets.items():
        lines.append(f"| {name} | {_fmt(s['ece']['pooled'])} | {_cell(s['ece'])} |")
    lines += ["", "Figures: `roc_pr.png` (ROC and PR, pooled), `reliability.png` (reliability diagram, pooled).", ""]
    return "\n".join(lines)


__all__ = [
    "ATTENTION_KEYS",
    "RULES",
    "CrossValConfig",
    "ThresholdConfig",
    "aggregate",
    "check_no_leak",
    "composed_patients",
    "crossval_markdown",
    "holdout_patients",
    "load_crossval_config",
    "patient_folds",
    "read_predictions",
    "run_crossval",
    "subset_table",
]
