"""Plots of targets other than two classes: predicted vs true values of a regression.

Same conventions as :mod:`histomil.reports.plots` (headless matplotlib, written atomically).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.reports.plots import new_figure, save_figure
from histomil.training.tasks import regression_scores


def plot_regression_scatter(sets: Mapping[str, tuple[Any, Any]], out_png: str | Path, title: str | None = None) -> Path:
    """Predicted (y axis) against true value (x axis) of each set, one colour per set, with the identity
    line; the legend gives each set's MAE, Spearman and bag count."""
    if not sets:
        raise HistomilError(f"plot_regression_scatter ({out_png}): no prediction sets given")
    fig = new_figure(6.0, 5.6)
    ax = fig.subplots()
    lows, highs = [], []
    for i, (name, (y, pred)) in enumerate(sets.items()):
        yy, pp = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
        if yy.shape != pp.shape or yy.ndim != 1 or yy.size == 0:
            raise HistomilError(f"plot_regression_scatter ({out_png}): set {name} has {yy.shape} targets, {pp.shape} predictions")
        s = regression_scores(yy, pp)
        ax.scatter(yy, pp, s=12, alpha=0.6, color=f"C{i % 10}",
                   label=f"{name} (MAE {s['mae']:.3g}, Spearman {s['spearman']:.3f}, n={yy.size})")
        lows.append(min(yy.min(), pp.min()))
        highs.append(max(yy.max(), pp.max()))
    lo, hi = min(lows), max(highs)
    ax.plot([lo, hi], [lo, hi], color="0.5", linestyle=":", linewidth=1, label="prediction = truth")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.set_title(title or "predicted vs true", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, out_png)
