"""Test-set metrics of multi-class and regression models, with bootstrap confidence intervals.

Binary classification keeps :func:`histomil.evaluation.metrics.binary_metrics` (threshold, recall,
specificity); this module adds what more than two classes and continuous targets need:

* :func:`multiclass_metrics`: accuracy, balanced accuracy, macro one-vs-rest ROC-AUC and PR-AUC, macro
  F1, the AUCs per class, the confusion matrix (counts and row-normalised) and per-class calibration (the
  one-vs-rest expected calibration error of :mod:`histomil.evaluation.calibration`); argmax decides.
* :func:`regression_metrics`: MAE, RMSE, R², Pearson and Spearman.

Each scalar metric comes with a percentile bootstrap interval over bags (:func:`bootstrap_over_bags`,
the same ``{"value", "low", "high", "n_valid", "n_skipped"}`` as :func:`histomil.evaluation.bootstrap.bootstrap_ci`).
Undefined metrics (an AUC of a class absent from the set) are NaN, never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix

from histomil.errors import HistomilError
from histomil.evaluation.calibration import expected_calibration_error
from histomil.training.tasks import regression_scores

NAN = float("nan")
#: the scalar metrics of :func:`multiclass_metrics` (each a bootstrap interval there)
MULTICLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_roc_auc", "macro_pr_auc", "f1_macro")


def bootstrap_over_bags(
    n: int,
    statistic: Callable[[np.ndarray], dict[str, float]],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | int]]:
    """Percentile interval of each value ``statistic(indices)`` returns, resampling the ``n`` bags with
    replacement; the point estimate is ``statistic(all bags)``. A resample where a value is NaN
    (undefined) is skipped for it and counted in ``n_skipped``."""
    if n < 1:
        raise HistomilError("bootstrap: no bags to resample")
    if not 0.0 < level < 1.0 or n_resamples < 1:
        raise HistomilError(f"bootstrap: need level in (0, 1) and n_resamples >= 1, got {level}, {n_resamples}")
    point = statistic(np.arange(n))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(int(n_resamples)):
        values = statistic(rng.integers(0, n, size=n))
        for k in point:
            samples[k].append(values[k])
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, dict[str, float | int]] = {}
    for k, v in point.items():
        arr = np.asarray(samples[k], dtype=np.float64)
        ok = arr[np.isfinite(arr)]
        low, high = np.percentile(ok, [lo_q, hi_q]).tolist() if ok.size else (NAN, NAN)
        out[k] = {"value": float(v), "low": float(low), "high": float(high), "n_valid": int(ok.size),
                  "n_skipped": int(arr.size - ok.size)}
    return out


def check_class_probabilities(y: Any, probs: Any, what: str = "multiclass metrics") -> tuple[np.ndarray, np.ndarray]:
    """``(y int64 in 0..C-1, probs float64 (n, C) rows summing to 1)`` or one error line."""
    yy, p = np.asarray(y), np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != yy.shape[0] or yy.ndim != 1 or yy.size == 0:
        raise HistomilError(f"{what}: need n labels and an (n, classes) probability matrix, got {yy.shape} and {p.shape}")
    if yy.dtype.kind not in "iu" or yy.min() < 0 or yy.max() >= p.shape[1]:
        raise HistomilError(f"{what}: labels must be class indices 0..{p.shape[1] - 1}")
    if not np.all(np.isfinite(p)) or p.min() < -1e-5 or np.abs(p.sum(axis=1) - 1).max() > 1e-3:
        raise HistomilError(f"{what}: probabilities must be finite, in [0, 1] and sum to 1 per bag (logits?)")
    return yy.astype(np.int64), np.clip(p, 0.0, 1.0)


def _per_class_auc(y: np.ndarray, p: np.ndarray) -> tuple[list[float], list[float]]:
    """One-vs-rest ROC-AUC and PR-AUC (average precision) per class; NaN for a class absent or alone."""
    rocs, prs = [], []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos = int(pos.sum())
        if 0 < n_pos < pos.size:
            # Mann-Whitney with average ranks for ties: what roc_auc_score computes, without its overhead
            ranks = rankdata(p[:, c])
            rocs.append(float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (pos.size - n_pos))))
            prs.append(average_precision(pos, p[:, c]))
        else:
            rocs.append(NAN)
            prs.append(NAN)
    return rocs, prs


def average_precision(pos: np.ndarray, score: np.ndarray) -> float:
    """Average precision, sum over distinct score levels (high to low) of (recall step) x precision: what
    scikit-learn's ``average_precision_score`` computes (tests compare), fast enough for 1,000 resamples."""
    order = np.argsort(-score, kind="stable")
    s, hit = score[order], pos[order].astype(np.float64)
    last = np.r_[s[1:] != s[:-1], True]  # the last bag of each score level
    tp = np.cumsum(hit)[last]
    seen = (np.flatnonzero(last) + 1).astype(np.float64)
    recall_step = np.diff(np.r_[0.0, tp]) / tp[-1]
    return float(np.sum(recall_step * tp / seen))


def _macro(values: list[float]) -> float:
    """Mean over the classes where the value is defined (NaN when none is)."""
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else NAN


def _f1_macro(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over all ``n_classes`` (0 for a class never true nor predicted): scikit-learn's
    ``f1_score(average="macro", labels=range(n_classes), zero_division=0)``."""
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 tp + fp + fn
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)))


def _summary(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict[str, float]:
    pred = p.argmax(axis=1)
    rocs, prs = _per_class_auc(y, p)
    present = np.unique(y)
    recalls = [float(np.mean(pred[y == c] == c)) for c in present]
    out = {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recalls)),
           "macro_roc_auc": _macro(rocs), "macro_pr_auc": _macro(prs), "f1_macro": _f1_macro(y, pred, n_classes)}
    for c in range(n_classes):
        out[f"roc_auc_{c}"], out[f"pr_auc_{c}"] = rocs[c], prs[c]
    return out


def multiclass_metrics(
    y: Any, probs: Any, class_names: Sequence[str] | None = None, n_resamples: int = 1000, seed: int = 0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Metrics of class probabilities ``probs`` (n, C) for true classes ``y``; see the module docstring.

    Macro AUCs average the classes present in the set with both sides (a class absent from it has no
    one-vs-rest AUC); balanced accuracy is the mean recall over the classes present."""
    yy, p = check_class_probabilities(y, probs)
    k = p.shape[1]
    names = [str(c) for c in (class_names or range(k))]
    if len(names) != k:
        raise HistomilError(f"multiclass metrics: {len(names)} class names for {k} classes")
    ci = bootstrap_over_bags(len(yy), lambda idx: _summary(yy[idx], p[idx], k), n_resamples, seed)
    cm = confusion_matrix(yy, p.argmax(axis=1), labels=list(range(k)))
    rows = cm.sum(axis=1, keepdims=True)
    cm_norm = np.divide(cm, rows, out=np.full(cm.shape, NAN), where=rows > 0)
    per_class = {}
    for c, name in enumerate(names):
        pos = (yy == c).astype(np.int64)
        per_class[name] = {
            "n": int(pos.sum()),
            "roc_auc": ci[f"roc_auc_{c}"], "pr_auc": ci[f"pr_auc_{c}"],
            "recall": float(cm_norm[c, c]) if rows[c, 0] else NAN,
            "precision": float(cm[c, c] / cm[:, c].sum()) if cm[:, c].sum() else NAN,
            "ece": expected_calibration_error(pos, p[:, c], n_bins),  # one-vs-rest calibration of class c
        }
    return {
        "n": int(yy.size),
        "n_classes": k,
        "class_names": names,
        **{m: ci[m] for m in MULTICLASS_METRICS},
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalised": cm_norm.tolist(),
    }


def regression_metrics(y: Any, pred: Any, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """MAE, RMSE, R², Pearson and Spearman of ``pred`` against ``y``, each with a bootstrap interval."""
    yy, pp = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if yy.ndim != 1 or yy.shape != pp.shape or yy.size == 0:
        raise HistomilError(f"regression metrics: need two equal-length 1-D arrays, got {yy.shape} and {pp.shape}")
    if not (np.all(np.isfinite(yy)) and np.all(np.isfinite(pp))):
        raise HistomilError("regression metrics: targets and predictions must be finite")
    ci = bootstrap_over_bags(yy.size, lambda idx: regression_scores(yy[idx], pp[idx]), n_resamples, seed)
    return {"n": int(yy.size), **ci}
