"""Bags of a composed tile study, the tile cross-validation's bag source (:mod:`.protocol`).

Each fold's study is composed from its patients (:func:`~histomil.data.compose.compose_study` with an
explicit assignment), so bags of the test set hold only test patients' tiles; features are extracted
through ONE tile cache shared by all folds and seeds (each distinct tile is encoded once). Finished
folds can drop their per-bag tile-link folders (:func:`prune_bags`); a fold redone later composes them
again, identically (same seed, same bags).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Log, Progress
from histomil.data.compose import compose_study, read_study
from histomil.data.study_spec import StudySpec
from histomil.data.tile_table import TileTable
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import bootstrap_ci
from histomil.evaluation.calibration import expected_calibration_error
from histomil.evaluation.cv_summary import write_predictions
from histomil.evaluation.evaluate import tile_truth_for
from histomil.evaluation.metrics import attention_metrics, binary_metrics
from histomil.features.formats import load_feature_dataset
from histomil.files import write_text
from histomil.pipeline import FeatureConfig, extract_study
from histomil.training.trainer import predict

PRUNED = ".bag_folders_removed"


def composed_patients(study_dir: Path) -> dict[str, set[str]]:
    """Patients whose tiles are actually in each role's bags of a composed study (from tiles.csv)."""
    roles: dict[str, set[str]] = {}
    for s in read_study(study_dir)["splits"]:
        with open(study_dir / s["name"] / "tiles.csv", newline="", encoding="utf-8") as fh:
            roles.setdefault(s["role"], set()).update(row["patient"] for row in csv.DictReader(fh))
    return roles


def bags_ready(study_dir: Path) -> bool:
    """A composed study with its bag folders (pruned ones are composed again: same seed, same bags)."""
    return (study_dir / "study.json").exists() and not (study_dir / PRUNED).exists()


def prune_bags(study_dir: Path) -> None:
    """Remove the per-bag tile-link folders of a finished study; keep study.json and the CSVs."""
    if not (study_dir / "study.json").exists():
        return
    write_text(study_dir / PRUNED, "bag folders removed after the fold finished; the CSVs list every bag's tiles\n")
    for split in read_study(study_dir)["splits"]:
        for child in (study_dir / split["name"]).iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)


class StudySource:
    """Composes, extracts and evaluates the bags of every fold of one tile cross-validation."""

    def __init__(self, features: FeatureConfig, cache_dir: Path, calibration_bins: int, bootstrap_resamples: int,
                 log: Log, progress: Progress | None) -> None:
        self.features, self.cache_dir, self.log, self.progress = features, cache_dir, log, progress
        self.calibration_bins, self.bootstrap_resamples = calibration_bins, bootstrap_resamples

    def compose(self, table: TileTable, spec: StudySpec, bags_dir: Path, assignment: Mapping[str, str],
                where: str) -> None:
        """Compose the fold's study (unless its bag folders are there) and check each role holds only its patients."""
        if not bags_ready(bags_dir):
            try:
                compose_study(table, spec, bags_dir, assignment=assignment, overwrite=True)
            except HistomilError as exc:
                raise HistomilError(
                    f"{where}: {exc} (try fewer folds, a larger val_fraction or smaller witness counts)"
                ) from None
        roles: dict[str, set[str]] = {}
        for p, r in assignment.items():
            roles.setdefault(r, set()).add(p)
        for role, got in composed_patients(bags_dir).items():
            if not got <= roles.get(role, set()):
                stray = min(got - roles.get(role, set()))
                raise HistomilError(
                    f"{bags_dir}: patient {stray} is in the {role} bags but assigned to"
                    f" {assignment.get(stray, 'no split')!r}; delete the folder to recompose"
                )

    def holdout(self, table: TileTable, holdout: set[str], spec: StudySpec, hdir: Path, seed: int) -> dict[str, Path]:
        """Compose and extract the held-out test sets for this seed; returns name -> feature folder."""
        if not holdout:
            return {}
        bags_dir, feat_dir = hdir / "bags", hdir / "features"
        if not bags_ready(bags_dir):
            assignment = {p: ("test" if p in holdout else "train") for p in set(table.patients)}
            self.log(f"seed {seed}: composing the held-out test sets ({len(holdout)} patients)")
            compose_study(table, spec, bags_dir, assignment=assignment, overwrite=True)
        got = composed_patients(bags_dir).get("test", set())
        if not got <= holdout:
            stray = min(got - holdout)
            raise HistomilError(f"{bags_dir}: patient {stray} is in the held-out bags but not held out; delete the folder to recompose")
        self.extract(bags_dir, feat_dir)
        names = [s["name"] for s in read_study(bags_dir)["splits"]]
        return {"holdout" + n.removeprefix("test"): feat_dir / n for n in names}

    def extract(self, study_dir: Path, feat_dir: Path) -> None:
        extract_study(study_dir, feat_dir, self.features, cache_dir=self.cache_dir, log=self.log, progress=self.progress)

    def evaluate_set(
        self, model: Any, folder: Path, threshold: float, pred_csv: Path, boot_seed: int
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """Metrics (with attention against tile truth, ECE and bootstrap CIs) of one test set; writes its predictions."""
        bags = load_feature_dataset(folder, require_labels=True)
        preds = predict(model, bags)
        y = np.array([int(b.label) for b in bags], dtype=np.int64)  # type: ignore[arg-type]
        prob = np.array([p[1] for p, _ in preds], dtype=np.float64)
        metrics = binary_metrics(y, prob, threshold)
        truth = tile_truth_for(folder, bags)
        if truth is not None:
            metrics["attention"] = attention_metrics(y, [a for _, a in preds], truth)
        metrics["ece"] = expected_calibration_error(y, prob, self.calibration_bins)
        if self.bootstrap_resamples:
            metrics["ci"] = bootstrap_ci(y, prob, threshold, self.bootstrap_resamples, seed=boot_seed)
        write_predictions(pred_csv, [b.bag_id for b in bags], y, prob, threshold)
        return metrics, y, prob


__all__ = ["PRUNED", "StudySource", "bags_ready", "composed_patients", "prune_bags"]
