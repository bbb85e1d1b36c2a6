"""The survival task: a bag's target is ``(time, event)``; the model predicts a risk (higher = earlier).

Two losses (:mod:`histomil.training.survival_losses`):

* ``cox`` (default): one output per bag, its log hazard ratio; the Cox partial likelihood over the
  bags of a batch (option ``ties``: ``efron``, the default, or ``breslow``). Each optimizer step
  compares the bags of one batch, so the training config's ``batch_size`` (bags per step) must be at
  least 2 (:data:`MIN_COX_BATCH`; 16-64 is usual, memory grows linearly with it, see
  :func:`histomil.training.survival_losses.batch_memory_bytes`). A batch without an event adds nothing
  (its loss is 0: skipped, see the losses module).
* ``discrete``: ``n_bins`` outputs (option ``n_bins``, default 4), hazards of time bins cut at quantiles
  of the training event times (stored in the checkpoint as ``edges``); predictions also carry the
  survival probability at the end of each bin.

Validation columns: ``val_loss`` and ``val_cindex`` (Harrell's c-index of the risk, higher is better,
the score to monitor); training: ``train_cindex``. Registered in :data:`histomil.training.tasks.TASKS`.

A survival checkpoint's ``extra`` also holds ``survival_train`` (:data:`TRAINING_KEY`,
:meth:`SurvivalTask.training_record`): the training bags' times and events, the model's risk on each and
their median, so ``histomil evaluate`` takes the censoring distribution, the risk-group cut and (Cox) the
Breslow baseline from the training bags, never from the test set (:mod:`histomil.evaluation.task_evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from histomil.errors import HistomilError
from histomil.evaluation.survival import cindex_harrell, survival_targets
from histomil.training.survival_losses import cox_loss, discrete_hazard_loss, discrete_risk, discrete_survival, time_bins
from histomil.training.task_base import Task, bag_name

MIN_COX_BATCH = 2
DEFAULT_BINS = 4
TRAINING_KEY = "survival_train"  # the checkpoint ``extra`` key of :meth:`SurvivalTask.training_record`


class SurvivalTask(Task):
    """``(time, event)`` per bag; see the module docstring. Options: ``ties`` (Cox), ``n_bins`` (discrete)."""

    name = "survival"
    losses = ("cox", "discrete")
    scores = ("val_cindex",)
    option_names = ("ties", "n_bins")

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        ties = options.get("ties", "efron")
        if ties not in ("efron", "breslow"):
            raise HistomilError(f"task survival: ties must be 'efron' or 'breslow', not {ties!r}")
        if "ties" in options and self.loss_name != "cox":
            raise HistomilError("task survival: option ties applies to the cox loss only")
        n_bins = options.get("n_bins", DEFAULT_BINS)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise HistomilError(f"task survival: n_bins must be a whole number of at least 2, not {n_bins!r}")
        if "n_bins" in options and self.loss_name != "discrete":
            raise HistomilError("task survival: option n_bins applies to the discrete loss only")
        return options

    def check_batch_size(self, batch_size: int) -> None:
        """The Cox loss compares the bags of a batch: fewer than :data:`MIN_COX_BATCH` learns nothing."""
        if self.loss_name == "cox" and batch_size < MIN_COX_BATCH:
            raise HistomilError(
                f"task survival, cox loss: batch_size {batch_size} is too small; the partial likelihood compares"
                f" the bags of one step, so use at least {MIN_COX_BATCH} (16-64 is usual)"
            )

    # --- targets -------------------------------------------------------------------------

    def targets(self, bags: Sequence[Any], split: str) -> np.ndarray:
        rows = []
        for i, b in enumerate(bags):
            target = getattr(b, "target", None)
            if target is None:
                kind = " (it has a class label only: use task classification)" if b.label is not None else ""
                raise HistomilError(f"{split} bag {bag_name(b, i)} has no survival target (time, event){kind}")
            values = np.atleast_1d(np.asarray(target, dtype=np.float64))
            if values.shape != (2,):
                raise HistomilError(f"{split} bag {bag_name(b, i)} has target {tuple(values.tolist())}, not (time, event)")
            time, event = float(values[0]), float(values[1])
            if not (math.isfinite(time) and time > 0):
                raise HistomilError(f"{split} bag {bag_name(b, i)} has survival time {time}; times must be above 0")
            if event not in (0.0, 1.0):
                raise HistomilError(f"{split} bag {bag_name(b, i)} has event {event}; events are 0 (censored) or 1")
            rows.append((time, event))
        return np.asarray(rows, dtype=np.float32).reshape(-1, 2)

    def fit(self, y_train: np.ndarray, y_val: np.ndarray | None = None) -> None:
        if not np.any(y_train[:, 1] == 1):
            raise HistomilError("task survival: the training bags hold no event (every one is censored)")
        if y_val is not None and len(y_val) and not np.any(y_val[:, 1] == 1):
            raise HistomilError("task survival: the validation bags hold no event, so there is nothing to early-stop on")
        if self.loss_name == "discrete":
            n_bins = int(self.options.get("n_bins", DEFAULT_BINS))
            self.fitted = {"edges": time_bins(y_train[:, 0], y_train[:, 1], n_bins).tolist()}

    # --- head, loss, metrics -------------------------------------------------------------

    def output_size(self) -> int:
        if self.loss_name == "discrete":
            return int(self.options.get("n_bins", DEFAULT_BINS))
        return 1

    def edges(self, like: torch.Tensor) -> torch.Tensor:
        """The discrete loss's inner time-bin edges as a tensor (dtype and device of ``like``)."""
        return torch.tensor(self.fitted["edges"], dtype=like.dtype, device=like.device)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        time, event = target[:, 0].to(logits.dtype), target[:, 1]
        if self.loss_name == "discrete":
            return discrete_hazard_loss(logits, time, event, self.edges(logits))
        return cox_loss(logits[:, 0], time, event, self.options.get("ties", "efron"))

    def risk(self, logits: torch.Tensor) -> np.ndarray:
        """One risk per bag (n,): the Cox log hazard ratio, or minus the expected bins survived."""
        logits = logits.detach().double()
        r = discrete_risk(logits) if self.loss_name == "discrete" else logits[:, 0]
        return r.cpu().numpy()

    def train_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        return {"train_cindex": self.cindex(logits, y)}

    def validation_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        loss = float(self.loss(logits, torch.from_numpy(np.ascontiguousarray(y)).to(logits.device)))
        return {"val_loss": loss, "val_cindex": self.cindex(logits, y)}

    def cindex(self, logits: torch.Tensor, y: np.ndarray) -> float:
        """Harrell's c-index of the risk of ``logits`` for targets ``y`` (n, 2); NaN when undefined."""
        return cindex_harrell(survival_targets(y[:, 0], y[:, 1], "c-index"), self.risk(logits))

    def training_record(self, y_train: np.ndarray, logits: torch.Tensor) -> dict[str, Any]:
        """What a checkpoint keeps of the training bags (targets ``y_train``, the model's ``logits`` on them):
        ``time`` and ``event`` (lists, one per bag) for the censoring distribution of Uno's c-index,
        time-dependent AUC and Brier score; ``risk`` (one per bag, same order), for the Breslow baseline that
        turns a Cox model's risks into survival curves (integrated Brier score); ``median_risk``, their median,
        the cut between low- and high-risk groups."""
        risk = self.risk(logits)
        return {"time": [float(t) for t in y_train[:, 0]], "event": [int(e) for e in y_train[:, 1]],
                "risk": [float(r) for r in risk], "median_risk": float(np.median(risk))}

    # --- predictions ---------------------------------------------------------------------

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        risk = self.risk(logits)[:, None]
        if self.loss_name == "discrete":
            return np.concatenate([risk, discrete_survival(logits.detach().double()).cpu().numpy()], axis=1)
        return risk

    def survival_at(self, predictions: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Survival probabilities (n, len(times)) of a discrete-time model's :meth:`predict` rows: at a time
        inside bin k, the probability of having survived bins 0..k-1 (1 in the first bin)."""
        if self.loss_name != "discrete":
            raise HistomilError("survival probabilities of a Cox model need a baseline hazard (evaluation.survival.breslow_survival)")
        per_bin = np.asarray(predictions, dtype=np.float64)[:, 1:]
        k = np.searchsorted(np.asarray(self.fitted["edges"]), np.asarray(times, dtype=np.float64), side="right")
        padded = np.concatenate([np.ones((per_bin.shape[0], 1)), per_bin], axis=1)
        return padded[:, k]

    def prediction_columns(self) -> list[str]:
        if self.loss_name == "discrete":
            return ["risk", *(f"survival_bin_{k}" for k in range(self.output_size()))]
        return ["risk"]
