"""Bag-level and tile-level evaluation metrics on plain numpy arrays.

Every function returns plain Python ints/floats/lists so results can be written as JSON (after
:func:`histomil.files.sanitize`, which turns the NaN of an undefined metric into ``null``). Metrics that are
undefined for the data (an AUC on a test set with a single class, the recall of a set without
positives) are ``float('nan')``, never an exception or a warning: a single-class external test set
is a normal thing to evaluate, and "n/a" is more honest than a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
)

from histomil.errors import HistomilError

NAN = float("nan")
_PROB_TOL = 1e-5  # float32 softmax outputs may overshoot [0, 1] by a few ulps


def _binary_labels(y: Any, what: str) -> np.ndarray:
    """``y`` as a 1-D int64 array of 0/1, or a HistomilError saying what is wrong."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise HistomilError(f"{what}: expected a 1-D array of 0/1 labels, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "biuf":
        raise HistomilError(f"{what}: labels must be numbers 0/1, got dtype {arr.dtype}")
    bad = arr[~np.isin(arr, (0, 1))]
    if bad.size:
        raise HistomilError(f"{what}: labels must be 0 or 1, found {sorted(set(bad.tolist()))[:5]}")
    return arr.astype(np.int64)


def check_binary_inputs(y_true: Any, prob: Any, what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (labels, positive-class probabilities) for metrics and plots.

    Returns ``(y int64 0/1, prob float64 in [0, 1])``. Raises :class:`HistomilError` on a length
    mismatch, labels other than 0/1, an empty set, or probabilities that are not finite or outside
    [0, 1] (logits passed by mistake would otherwise give silently wrong thresholded metrics).
    """
    y = _binary_labels(y_true, f"{what} y_true")
    p = np.asarray(prob)
    if p.dtype.kind not in "biuf":
        raise HistomilError(f"{what}: probabilities must be numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.ndim != 1:
        raise HistomilError(f"{what}: expected a 1-D array of probabilities, got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise HistomilError(f"{what}: {y.shape[0]} labels but {p.shape[0]} probabilities")
    if y.size == 0:
        raise HistomilError(f"{what}: no samples to evaluate")
    if not np.all(np.isfinite(p)):
        raise HistomilError(f"{what}: {int((~np.isfinite(p)).sum())} probabilities are NaN or infinite")
    if p.min() < -_PROB_TOL or p.max() > 1 + _PROB_TOL:
        raise HistomilError(
            f"{what}: probabilities must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}] (logits?)"
        )
    return y, np.clip(p, 0.0, 1.0)


def _ratio(num: int, den: int) -> float:
    return num / den if den else NAN


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Bag-level metrics for a binary task; a sample is predicted positive when ``prob >= threshold``.

    Keys: n, n_pos, n_neg, threshold, accuracy, balanced_accuracy, roc_auc, pr_auc (average
    precision), precision, recall (sensitivity), specificity, f1, confusion_matrix
    ``[[tn, fp], [fn, tp]]``. ROC-AUC and PR-AUC are NaN when only one class is present; recall is
    NaN without positives and specificity NaN without negatives; precision and F1 are 0 when they
    would divide by zero (scikit-learn's ``zero_division=0``). Balanced accuracy is the mean of the
    defined ones among recall and specificity.
    """
    if not (isinstance(threshold, (int, float, np.floating)) and math.isfinite(threshold)):
        raise HistomilError(f"binary_metrics: threshold must be a finite number, got {threshold!r}")
    y, p = check_binary_inputs(y_true, prob, "binary_metrics")
    pred = (p >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    n_pos, n_neg = int(tp + fn), int(tn + fp)
    both = n_pos > 0 and n_neg > 0

    recall = _ratio(tp, n_pos)
    specificity = _ratio(tn, n_neg)
    if both:
        balanced = float(balanced_accuracy_score(y, pred))
        roc_auc = float(roc_auc_score(y, p))
        pr_auc = float(average_precision_score(y, p))
    else:  # sklearn would warn here; the only defined per-class recall is the answer
        balanced = recall if n_pos else specificity
        roc_auc = pr_auc = NAN
    return {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "precision": float(precision_score(y, pred, labels=[0, 1], zero_division=0)),
        "recall": float(recall),
        "specificity": float(specificity),
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0)),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def attention_metrics(
    bag_labels: Sequence[Any] | np.ndarray,
    attentions: Sequence[np.ndarray],
    tile_labels: Sequence[np.ndarray | None],
) -> dict[str, Any]:
    """How well attention finds tumour tiles inside positive bags (when tile truth is known).

    ``attentions[i]`` and ``tile_labels[i]`` are 1-D arrays over the real (unpadded) tiles of bag i;
    a ``None`` tile-label entry means "no tile truth" and the bag is skipped. Only bags with label 1
    are scored. Keys:

    - ``n_bags``: bags given; ``n_pos_bags``: positive bags with tile truth (used for top-1).
    - ``tile_auc_pooled``: ROC-AUC of attention vs tile label, all tiles of positive bags pooled.
      Raw scores are pooled as given; softmax attention is smaller in larger bags, so this mixes
      ranking quality with bag size - ``tile_auc_mean`` does not.
    - ``tile_auc_mean``: mean of per-bag AUCs over positive bags that hold both tile classes
      (``n_bags_auc`` of them).
    - ``top1_hit``: fraction of positive bags whose top-attended tile is tumour; a tie at the top
      counts as the fraction of tied tiles that are tumour (the expected hit of a random pick).
    - ``top1_hit_random``: the same for a uniformly random pick (mean tumour fraction), the baseline
      that ``top1_hit`` should beat.

    Undefined values are NaN.
    """
    n = len(attentions)
    if len(bag_labels) != n or len(tile_labels) != n:
        raise HistomilError(
            f"attention_metrics: {len(bag_labels)} bag labels, {n} attention arrays and "
            f"{len(tile_labels)} tile-label arrays; they must match"
        )
    pooled_a: list[np.ndarray] = []
    pooled_y: list[np.ndarray] = []
    per_bag_auc: list[float] = []
    hits: list[float] = []
    random_hits: list[float] = []
    for i, (bag_y, att, tiles) in enumerate(zip(bag_labels, attentions, tile_labels)):
        if tiles is None or bag_y is None or int(bag_y) != 1:
            continue
        a = np.asarray(att, dtype=np.float64)
        t = _binary_labels(tiles, f"attention_metrics: bag {i} tile labels")
        if a.ndim != 1 or a.shape != t.shape:
            raise HistomilError(
                f"attention_metrics: bag {i} has attention of shape {a.shape} but {t.shape[0]} tile labels"
            )
        if a.size == 0:
            continue
        if not np.all(np.isfinite(a)):
            raise HistomilError(f"attention_metrics: bag {i} attention contains NaN or infinite values")
        pooled_a.append(a)
        pooled_y.append(t)
        if 0 < t.sum() < t.size:
            per_bag_auc.append(float(roc_auc_score(t, a)))
        hits.append(float(t[a == a.max()].mean()))
        random_hits.append(float(t.mean()))

    auc_pooled = NAN
    if pooled_y:
        y_all, a_all = np.concatenate(pooled_y), np.concatenate(pooled_a)
        if 0 < y_all.sum() < y_all.size:
            auc_pooled = float(roc_auc_score(y_all, a_all))
    return {
        "n_bags": n,
        "n_pos_bags": len(hits),
        "n_bags_auc": len(per_bag_auc),
        "tile_auc_pooled": auc_pooled,
        "tile_auc_mean": float(np.mean(per_bag_auc)) if per_bag_auc else NAN,
        "top1_hit": float(np.mean(hits)) if hits else NAN,
        "top1_hit_random": float(np.mean(random_hits)) if random_hits else NAN,
    }
