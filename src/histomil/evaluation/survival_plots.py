"""Kaplan-Meier curves of predicted risk groups, with the log-rank test (scikit-survival).

Bags are split into a low- and a high-risk group at a cut fixed *before* looking at the test bags:
the median predicted risk of the training bags (:func:`risk_cut`). Each group's Kaplan-Meier curve
(with its 95% log-log band) is drawn in the style of :mod:`histomil.reports.plots` (Agg canvas, no
pyplot, PNG written atomically), and the log-rank p-value says whether the groups' survival differs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.survival import SurvivalTargets
from histomil.reports.plots import new_figure, save_figure

GROUPS = ("low risk", "high risk")


def risk_cut(train_risk: Any) -> float:
    """The median predicted risk of the training bags: the cut between the low- and high-risk groups."""
    r = np.asarray(train_risk, dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise HistomilError("risk groups: the training risks must be finite and at least one")
    return float(np.median(r))


def risk_groups(targets: SurvivalTargets, risk: Any, cut: float) -> dict[str, Any]:
    """Per group (risk <= cut: low, > cut: high) the Kaplan-Meier curve, its size and events, and the
    log-rank chi-square and p-value (NaN when one group is empty or no bag had an event)."""
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if r.size != len(targets) or not np.all(np.isfinite(r)):
        raise HistomilError(f"risk groups: need one finite risk per bag ({len(targets)}), got {r.size}")
    from sksurv.compare import compare_survival  # scikit-survival loads only where survival is evaluated
    from sksurv.nonparametric import kaplan_meier_estimator

    high = r > cut
    groups: dict[str, Any] = {}
    for name, mask in zip(GROUPS, (~high, high)):
        entry: dict[str, Any] = {"n": int(mask.sum()), "events": int(targets.event[mask].sum())}
        if mask.any():
            t, s, band = kaplan_meier_estimator(targets.event[mask], targets.time[mask], conf_type="log-log")
            below = np.flatnonzero(s <= 0.5)
            entry.update(time=t, survival=s, low=band[0], high=band[1],
                         median_survival=float(t[below[0]]) if below.size else math.nan)
        groups[name] = entry
    chisq = pvalue = math.nan
    if high.any() and (~high).any() and targets.event.any():
        chisq, pvalue = compare_survival(targets.structured(), high.astype(int))
    return {"cut": float(cut), "groups": groups, "logrank_chisq": float(chisq), "logrank_p": float(pvalue)}


def plot_km_risk_groups(
    targets: SurvivalTargets, risk: Any, cut: float, out_png: str | Path, title: str | None = None,
    cut_label: str | None = None,
) -> dict[str, Any]:
    """Draw the Kaplan-Meier curves of :func:`risk_groups` into ``out_png``; returns :func:`risk_groups_summary`.
    ``cut_label`` says how the groups were split (default: at the training median risk ``cut``)."""
    summary = risk_groups(targets, risk, cut)
    fig = new_figure(6.4, 4.6)
    ax = fig.subplots()
    for i, (name, g) in enumerate(summary["groups"].items()):
        color = f"C{i}"
        if g["n"] == 0:
            ax.plot([], [], color=color, label=f"{name}: no bags")
            continue
        t = np.r_[0.0, g["time"]]
        ax.step(t, np.r_[1.0, g["survival"]], where="post", color=color,
                label=f"{name} (n={g['n']}, events {g['events']})")
        ax.fill_between(t, np.r_[1.0, g["low"]], np.r_[1.0, g["high"]], step="post", color=color, alpha=0.15)
    p = summary["logrank_p"]
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")  # Kaplan-Meier curves fall from the top left
    cut_text = cut_label or f"split at training median risk {cut:.3g}"
    p_text = f"log-rank p = {p:.2g}" if math.isfinite(p) else "log-rank p: n/a"
    ax.set_title(f"{title + ': ' if title else ''}{p_text}\n{cut_text}", fontsize=10)
    save_figure(fig, out_png)
    return risk_groups_summary(summary)


def risk_groups_summary(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`risk_groups` without the curves (JSON-able): the cut, the log-rank test, and per group its
    size, events and median survival (NaN where the curve stays above 0.5)."""
    return {"cut": result["cut"], "logrank_chisq": result["logrank_chisq"], "logrank_p": result["logrank_p"],
            "groups": {k: {m: g[m] for m in ("n", "events", "median_survival") if m in g}
                       for k, g in result["groups"].items()}}
