"""Evaluate one survival model's risks on held-out bags: every metric with its bootstrap interval, and
the Kaplan-Meier risk groups split at the training median.

Everything that must not see the test bags comes from the training bags: the censoring distribution
(Uno's c-index, time-dependent AUC, Brier score), the Breslow baseline that turns Cox risks into survival
probabilities, and the cut between the risk groups (the training bags' median risk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histomil.evaluation.survival import (
    SurvivalTargets,
    breslow_survival,
    evaluation_times,
    survival_bootstrap_ci,
)
from histomil.evaluation.survival_plots import plot_km_risk_groups, risk_cut, risk_groups, risk_groups_summary


def held_out_times(train: SurvivalTargets, test: SurvivalTargets) -> np.ndarray:
    """Evaluation times of the test bags (:func:`evaluation_times`) that also lie inside the training
    follow-up, where the censoring distribution and the Breslow baseline are estimated."""
    times = evaluation_times(test)
    return times[times < train.time.max()]


def evaluate_survival(
    train: SurvivalTargets,
    train_risk: Any,
    test: SurvivalTargets,
    test_risk: Any,
    survival: np.ndarray | None = None,
    times: np.ndarray | None = None,
    km_png: str | Path | None = None,
    title: str | None = None,
    n_resamples: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics with bootstrap CIs and the risk groups of ``test_risk`` on the ``test`` bags.

    ``survival``: the model's own survival probabilities at ``times`` (e.g. a discrete-time model); by
    default they come from ``test_risk`` as Cox log hazard ratios through the Breslow baseline of the
    training bags. ``km_png``: where to draw the Kaplan-Meier curves (None: no figure). Returns
    ``{"n", "events", "times", "metrics": {metric: {value, low, high, ...}}, "risk_groups": {...}}``.
    """
    times = held_out_times(train, test) if times is None else np.asarray(times, dtype=np.float64)
    if survival is None:
        survival = breslow_survival(train, train_risk, test_risk, times)
    metrics = survival_bootstrap_ci(test, test_risk, train, times, survival, n_resamples=n_resamples, seed=seed)
    cut = risk_cut(train_risk)
    if km_png is not None:
        groups = plot_km_risk_groups(test, test_risk, cut, km_png, title)
    else:
        groups = risk_groups_summary(risk_groups(test, test_risk, cut))
    return {"n": len(test), "events": int(test.event.sum()), "times": times.tolist(), "metrics": metrics,
            "risk_groups": groups}
