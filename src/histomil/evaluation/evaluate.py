"""Evaluate one trained model on one or several labelled feature datasets.

For each test set: bag-level metrics at a fixed threshold (chosen before looking at test data),
per-bag predictions, a confusion-matrix plot, and, when the set carries tile truth (``tiles.csv``,
written by ``histomil bags make``), how well attention finds the tumour tiles.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np

from histomil.data.bags import read_tile_truth
from histomil.data.targets import load_task_bags
from histomil.devices import device_record, resolve_device
from histomil.errors import HistomilError
from histomil.evaluation.metrics import attention_metrics, binary_metrics
from histomil.evaluation.task_evaluate import evaluate_task_sets, is_binary
from histomil.features.formats import load_features_folder
from histomil.features.store import FeatureBag
from histomil.features.validate import check_bags_for_model
from histomil.files import write_json, write_text
from histomil.reports.plots import plot_confusion_matrix, plot_roc_pr, plot_training_curves
from histomil.reports.tables import metrics_markdown
from histomil.training.checkpoint import load_checkpoint
from histomil.training.survival_task import TRAINING_KEY
from histomil.training.tasks import task_from_checkpoint
from histomil.training.trainer import predict


def tile_truth_for(folder: Path, bags: list[FeatureBag]) -> list[np.ndarray] | None:
    """Tile labels aligned with each bag's tiles, from ``folder/tiles.csv`` (None when absent)."""
    truth_csv = folder / "tiles.csv"
    if not truth_csv.is_file():
        return None
    by_tile = {(case, Path(tile).name): label for (case, tile), label in read_tile_truth(truth_csv).items()}
    out = []
    for bag in bags:
        try:
            out.append(np.array([by_tile[(bag.bag_id, Path(p).name)] for p in bag.tile_paths], dtype=int))
        except KeyError as exc:
            raise HistomilError(f"{truth_csv}: no tile label for bag {bag.bag_id} tile {exc.args[0][1]}") from None
    return out


def evaluate_sets(
    checkpoint: str | Path,
    test_sets: dict[str, Path],
    out_dir: str | Path,
    threshold: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    allow_encoder_mismatch: bool = False,
    device: str = "cpu",
    task: str | None = None,
    targets: str | Path | None = None,
    n_resamples: int = 1000,
) -> dict[str, dict]:
    """Evaluate ``checkpoint`` on each named feature folder; write JSON, markdown, CSV and PNGs.

    ``device`` (cpu, cuda, cuda:N, auto) is where the model runs; metrics.json records it.
    ``task``: the target kind the model must have been trained for (None: the model's own, see
    :mod:`histomil.training.tasks`); ``targets``: regression / survival targets CSV of the sets (default
    targets.csv beside each). Models other than binary classifiers: :mod:`histomil.evaluation.task_evaluate`
    (bootstrap ``n_resamples`` per metric; a survival model's stored training bags, ``survival_train``).

    Every file of every folder is checked for the model (finite, its dimension and encoder; see
    :mod:`histomil.features.validate`); ``allow_encoder_mismatch`` lets another encoder's features through.
    metrics.json is written last, so a bad file in a later set leaves no metrics.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    task_of_model = task_from_checkpoint(meta)
    if task is not None and task != task_of_model.name:
        raise HistomilError(f"{checkpoint}: the model was trained for {task_of_model.name}, not {task}")
    task = task_of_model
    if not is_binary(task):  # several classes, a value or a survival time: histomil.evaluation.task_evaluate
        sets = {}
        for name, folder in test_sets.items():
            bags = load_task_bags(folder, task.name, targets)
            check_bags_for_model(bags, meta, allow_encoder_mismatch=allow_encoder_mismatch, source=folder)
            sets[name] = (bags, predict(model, bags, task=task))
        header = {"checkpoint": str(checkpoint), "environment": device_record(dev, "fp32")}
        return evaluate_task_sets(task, sets, out_dir, header, progress, n_resamples, meta.get(TRAINING_KEY))
    if threshold is None:
        threshold = float(meta.get("threshold", 0.5))
    results: dict[str, dict] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (name, folder) in enumerate(test_sets.items()):
        folder = Path(folder)
        bags, preds = _predict_folder(model, meta, _load_folder(meta, folder, allow_encoder_mismatch))
        y = np.array([b.label for b in bags], dtype=int)
        prob = np.array([p[1] for p, _ in preds], dtype=float)
        metrics = binary_metrics(y, prob, threshold)
        truth = tile_truth_for(folder, bags)
        if truth is not None:
            metrics["attention"] = attention_metrics(y, [a for _, a in preds], truth)
        results[name] = metrics
        curves[name] = (y, prob)
        _write_predictions(out_dir / f"predictions_{name}.csv", bags, prob, threshold)
        plot_confusion_matrix(metrics["confusion_matrix"], out_dir / f"confusion_{name}.png", title=name)
        if progress:
            progress("evaluating test sets", i + 1, len(test_sets))
    write_json(out_dir / "metrics.json", {"checkpoint": str(checkpoint), "threshold": threshold, "results": results,
                                          "environment": device_record(dev, "fp32")})
    write_text(out_dir / "metrics.md", metrics_markdown(results) + "\n")
    plot_roc_pr(curves, out_dir / "roc_pr.png")
    history = Path(checkpoint).parent / "history.csv"
    if history.is_file():
        plot_training_curves(history, out_dir / "training_curves.png", best_epoch=meta.get("best_epoch"))
    return results


def _load_folder(meta: dict, folder: Path, allow_encoder_mismatch: bool) -> list:
    """The labelled bags of ``folder``, every file checked for the model.

    Models on cached features read a feature folder of any layout (histomil, CLAM, TRIDENT, STAMP);
    end-to-end pixel models (checkpoint kind ``"pixels"``) read a bag folder of tile images.
    """
    if meta.get("kind") == "pixels":
        from histomil.data.bags import load_bag_folders

        return load_bag_folders(folder, require_labels=True)
    bags = load_features_folder(folder, require_labels=True)
    check_bags_for_model(bags, meta, allow_encoder_mismatch=allow_encoder_mismatch, source=folder)
    return bags


def _predict_folder(model, meta: dict, bags: list) -> tuple[list, list]:
    """``bags`` and the model's (probs, attention) for each (pixel models read the tiles)."""
    if meta.get("kind") == "pixels":
        from histomil.training.pixels import predict_pixels

        return bags, predict_pixels(model, bags)
    return bags, predict(model, bags)


def _write_predictions(path: Path, bags: list, prob: np.ndarray, threshold: float) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "y_true", "prob_positive", "y_pred"])
    for b, p in zip(bags, prob):
        w.writerow([b.bag_id, b.label, f"{p:.6f}", int(p >= threshold)])
    write_text(path, buf.getvalue())
