"""Calibration of positive-class probabilities: reliability curve, expected calibration error, plot.

Bins are equal-width on [0, 1] (10 by default; a probability of exactly 1 falls in the last bin).
For each non-empty bin the reliability curve gives the mean predicted probability and the observed
fraction of positive bags; the expected calibration error (ECE) is the bag-weighted mean absolute
gap between the two, ``sum_b n_b / n * |frac_pos_b - mean_prob_b|``. This is the binary,
positive-class form of the ECE (Naeini et al. 2015; Guo et al. 2017 use the top-label confidence,
which for two classes bins the same bags by ``max(p, 1 - p)`` instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.metrics import check_binary_inputs
from histomil.reports.plots import new_figure, save_figure


def _bins(prob: np.ndarray, n_bins: int) -> np.ndarray:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise HistomilError(f"calibration: n_bins must be a whole number >= 1, got {n_bins!r}")
    return np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)


def reliability_curve(y: Any, prob: Any, n_bins: int = 10) -> dict[str, list[float] | list[int]]:
    """Per non-empty bin: ``bin`` index, ``lower``/``upper`` edges, ``count``, ``mean_prob``, ``frac_pos``."""
    yy, p = check_binary_inputs(y, prob, "reliability curve")
    b = _bins(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    sum_y = np.bincount(b, weights=yy.astype(np.float64), minlength=n_bins)
    keep = np.flatnonzero(count > 0)
    return {
        "bin": keep.tolist(),
        "lower": (keep / n_bins).tolist(),
        "upper": ((keep + 1) / n_bins).tolist(),
        "count": count[keep].tolist(),
        "mean_prob": (sum_p[keep] / count[keep]).tolist(),
        "frac_pos": (sum_y[keep] / count[keep]).tolist(),
    }


def expected_calibration_error(y: Any, prob: Any, n_bins: int = 10) -> float:
    """Bag-weighted mean of |observed positive fraction - mean predicted probability| over bins."""
    curve = reliability_curve(y, prob, n_bins)
    count = np.asarray(curve["count"], dtype=np.float64)
    gap = np.abs(np.asarray(curve["frac_pos"]) - np.asarray(curve["mean_prob"]))
    return float((count * gap).sum() / count.sum())


def plot_reliability(
    curves: Mapping[str, tuple[Any, Any]], out_png: str | Path, n_bins: int = 10, title: str | None = None
) -> Path:
    """Reliability diagram of several prediction sets (top) and how many bags fall in each bin (bottom).

    ``curves`` maps a name to ``(y_true, prob)``; each line is labelled with its ECE and bag count.
    The dotted diagonal is perfect calibration.
    """
    if not curves:
        raise HistomilError(f"plot_reliability ({out_png}): no prediction sets given")
    fig = new_figure(6.4, 6.4)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    width = 1.0 / n_bins
    k = len(curves)
    for i, (name, (y, prob)) in enumerate(curves.items()):
        curve = reliability_curve(y, prob, n_bins)
        ece = expected_calibration_error(y, prob, n_bins)
        color = f"C{i % 10}"
        n = int(np.sum(curve["count"]))
        ax.plot(curve["mean_prob"], curve["frac_pos"], marker="o", markersize=4, color=color,
                label=f"{name} (ECE {ece:.3f}, n={n})")
        lefts = np.asarray(curve["lower"]) + width * i / k
        ax_n.bar(lefts, curve["count"], width=width / k, align="edge", color=color, alpha=0.8)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("observed fraction of positive bags")
    ax.set_title(title or f"reliability ({n_bins} equal-width bins)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.set_xlabel("predicted probability of the positive class")
    ax_n.set_ylabel("bags")
    ax_n.grid(alpha=0.3)
    return save_figure(fig, out_png)
