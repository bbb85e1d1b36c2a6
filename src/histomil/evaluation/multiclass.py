"""Metrics of more than two classes (argmax decisions), with patient-resampling bootstrap intervals.

Keys: ``n``, ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present), ``roc_auc``
(macro one-vs-rest over the classes, NaN unless every class is present), ``f1_macro`` and
``confusion_matrix`` (rows truth, columns prediction); scikit-learn computes each.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from histomil.errors import HistomilError

MULTICLASS_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")


def _check(y: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y_arr.shape[0] or p.shape[1] < 2:
        raise HistomilError(f"multiclass metrics: probabilities of shape {p.shape} for {y_arr.shape[0]} labels")
    if y_arr.size == 0 or y_arr.min() < 0 or y_arr.max() >= p.shape[1]:
        raise HistomilError(f"multiclass metrics: labels must be class indices 0..{p.shape[1] - 1}")
    if not np.isfinite(p).all():
        raise HistomilError("multiclass metrics: probabilities hold NaN or infinite values")
    return y_arr, p


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():  # a resample without some class: sklearn warns, the metrics stay defined
        warnings.simplefilter("ignore", UserWarning)
        return _scores_of(y, p)


def _scores_of(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    labels = list(range(n_classes))
    if len(np.unique(y)) == n_classes:
        auc = float(roc_auc_score(y, p / p.sum(axis=1, keepdims=True), multi_class="ovr", average="macro", labels=labels))
    else:
        auc = math.nan
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else float(np.mean(pred == y)),
        "roc_auc": auc,
        "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }


def multiclass_metrics(y: Any, probs: Any) -> dict[str, Any]:
    """The metrics above for class indices ``y`` and class probabilities ``probs`` (n, classes)."""
    y_arr, p = _check(y, probs)
    cm = confusion_matrix(y_arr, p.argmax(axis=1), labels=list(range(p.shape[1])))
    return {"n": int(y_arr.size), **_scores(y_arr, p), "confusion_matrix": cm.tolist()}


def multiclass_bootstrap_ci(y: Any, probs: Any, n_resamples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict[str, dict[str, float | int]]:
    """Percentile bootstrap interval of each metric, resampling samples (patients) with replacement;
    resamples where a metric is undefined (a class missing, for the AUC) are skipped and counted."""
    y_arr, p = _check(y, probs)
    rng = np.random.default_rng(seed)
    point = _scores(y_arr, p)
    samples = {m: [] for m in MULTICLASS_METRICS}
    for _ in range(int(n_resamples)):
        idx = rng.integers(0, y_arr.size, y_arr.size)
        for m, v in _scores(y_arr[idx], p[idx]).items():
            samples[m].append(v)
    out: dict[str, dict[str, float | int]] = {}
    for m in MULTICLASS_METRICS:
        arr = np.asarray(samples[m], dtype=np.float64)
        ok = arr[np.isfinite(arr)]
        lo, hi = (np.percentile(ok, [100 * (1 - level) / 2, 100 * (1 + level) / 2]).tolist() if ok.size else (math.nan, math.nan))
        out[m] = {"value": point[m], "low": float(lo), "high": float(hi), "n_valid": int(ok.size),
                  "n_skipped": int(arr.size - ok.size)}
    return out


__all__ = ["MULTICLASS_METRICS", "multiclass_bootstrap_ci", "multiclass_metrics"]
