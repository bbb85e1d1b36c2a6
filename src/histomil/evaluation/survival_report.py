"""Evaluate one survival model's risks on held-out bags: every metric with its bootstrap interval, and
the Kaplan-Meier risk groups split at the training median.

Everything that must not see the test bags comes from the training bags: the censoring distribution
(Uno's c-index, time-dependent AUC, Brier score), the Breslow baseline that turns Cox risks into survival
probabilities, and the cut between the risk groups (the training bags' median risk). A single trained
model carries what it needs of its training bags in its checkpoint (:class:`TrainingReference`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.survival import (
    SurvivalTargets,
    breslow_survival,
    evaluation_times,
    survival_bootstrap_ci,
    survival_targets,
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


@dataclass(frozen=True)
class TrainingReference:
    """What a survival checkpoint keeps of its training bags (``extra["survival_train"]``, written by
    :meth:`histomil.training.survival_task.SurvivalTask.training_record`): their targets, for the censoring
    distribution; the model's risk on each (None in checkpoints written before it was stored), for the
    Breslow baseline of a Cox model; and their median, the cut between the risk groups."""

    targets: SurvivalTargets
    median_risk: float
    risk: np.ndarray | None = None

    def breslow(self, risk: Any, times: np.ndarray) -> np.ndarray | None:
        """Survival probabilities (n, len(times)) of Cox risks ``risk`` by the Breslow baseline of the
        training bags (:func:`breslow_survival`, as a cross-validation fold does); None without stored risks."""
        if self.risk is None:
            return None
        return breslow_survival(self.targets, self.risk, risk, times)

    def summary(self, cox: bool = False) -> dict[str, Any]:
        """What metrics.json records of the reference (not the per-bag targets); ``cox``: the model is a
        Cox model, whose integrated Brier score needs the stored training risks."""
        note = ("risk groups split at the training median risk; Uno's c-index, time-dependent AUC and "
                "IBS weighted by the training censoring distribution")
        if cox:
            note += (" (Cox survival curves by the Breslow baseline of the stored training risks)" if self.risk is not None
                     else f"; {NO_TRAINING_RISKS}")
        return {"source": "training bags (stored in the checkpoint)", "n_train_bags": len(self.targets),
                "n_train_events": int(self.targets.event.sum()), "median_risk": self.median_risk,
                "training_risks": self.risk is not None, "note": note}


# metrics.json and the warning of an evaluation without a :class:`TrainingReference`
NO_REFERENCE = ("the checkpoint stores no training survival data (an older histomil or an ensemble): risk groups "
                "split at each test set's own median risk and the censoring distribution estimated on the test "
                "set itself; retrain with this histomil to evaluate against the training bags")
# the note of a Cox checkpoint that stores its training targets and median risk but not each bag's risk
NO_TRAINING_RISKS = ("no integrated Brier score: the checkpoint stores no training risks (an earlier histomil), so "
                     "there is no Breslow baseline to turn Cox risks into survival curves; retrain to get it")


def stored_reference(record: Mapping[str, Any] | None, source: str) -> TrainingReference | None:
    """The :class:`TrainingReference` of a checkpoint's ``survival_train`` record (None when it has none);
    a damaged record is one error line naming ``source``."""
    if not record:
        return None
    try:
        targets = survival_targets(record["time"], record["event"], f"{source}: stored training targets")
        cut = float(record["median_risk"])
        risk = None if record.get("risk") is None else np.asarray(record["risk"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise HistomilError(f"{source}: the stored training survival data is damaged ({exc!r})") from None
    if not math.isfinite(cut):
        raise HistomilError(f"{source}: the stored training median risk is {cut}")
    if risk is not None and (risk.shape != (len(targets),) or not np.all(np.isfinite(risk))):
        raise HistomilError(f"{source}: the stored training risks are damaged ({risk.size} values for "
                            f"{len(targets)} bags, or not finite)")
    return TrainingReference(targets, cut, risk)
