"""The interface every training target implements: what a MIL model predicts and how it learns it.

A :class:`Task` tells the trainer (:mod:`.trainer`), evaluation and prediction everything that depends on
the target, so they only dispatch:

* ``targets(bags, split)``: the bags' targets as a checked array (a bag with a target of the wrong
  kind, or none, is one HistomilError line naming the bag);
* ``fit(y_train)``: learn from the training targets what the head and loss need (the number of
  classes, the target scale, time bins) and keep it in ``state()``, which the checkpoint stores;
* ``output_size()``: how many numbers the model outputs per bag (its ``n_classes`` argument);
* ``loss(logits, target)``: the mean loss of a batch of bags (the model's own auxiliary objectives are
  added by :func:`model_objectives`);
* ``train_metrics`` / ``validation_metrics``: the history columns of an epoch (``val_loss`` always;
  the names in ``scores`` are higher-is-better and may be monitored for early stopping);
* ``predict(logits)``: raw outputs -> what is reported per bag (class probabilities, a value, a risk),
  named by ``prediction_columns()``.

Concrete tasks and the registry that builds them by name live in :mod:`.tasks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from histomil.errors import HistomilError
from histomil.models.base import MILOutput


class Task(ABC):
    """One kind of target (classification, regression, survival); see the module docstring.

    Subclasses set ``name``, ``losses`` (the loss names they accept, the first is the default) and
    ``scores`` (higher-is-better validation metrics besides ``val_loss`` that ``monitor`` may name),
    and implement the abstract methods. ``options`` are task-specific settings from the training
    config (``task_options``); unknown ones are refused by :meth:`check_options`.
    """

    name: ClassVar[str]
    losses: ClassVar[tuple[str, ...]]
    scores: ClassVar[tuple[str, ...]] = ()
    option_names: ClassVar[tuple[str, ...]] = ()
    # Whether a model that takes the bag labels in its forward (CLAM's instance clustering) gets the targets.
    feeds_labels: ClassVar[bool] = False

    def __init__(self, loss: str | None = None, options: dict[str, Any] | None = None) -> None:
        loss = loss or self.losses[0]
        if loss not in self.losses:
            raise HistomilError(f"task {self.name}: unknown loss {loss!r}; use one of {', '.join(self.losses)}")
        self.loss_name = loss
        self.options = self.check_options(dict(options or {}))
        self.fitted: dict[str, Any] = {}  # what fit() learned; JSON-able, stored in the checkpoint

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The task options, checked; unknown names are one error line."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            allowed = ", ".join(self.option_names) or "none"
            raise HistomilError(f"task {self.name}: unknown task option(s) {', '.join(unknown)} (allowed: {allowed})")
        return options

    # --- targets -------------------------------------------------------------------------

    @abstractmethod
    def targets(self, bags: Sequence[Any], split: str) -> np.ndarray:
        """The targets of ``bags`` (``split`` names them in errors): int64 classes (n,), float32 values
        (n,) or float32 (time, event) pairs (n, 2). Every bag must carry one of the task's kind."""

    def fit(self, y_train: np.ndarray, y_val: np.ndarray | None = None) -> None:
        """Learn what the head and loss need from the training targets (into ``self.fitted``); ``y_val``
        only to size the head (a class seen in validation only still gets an output)."""

    def target_tensor(self, y: np.ndarray, device: torch.device) -> torch.Tensor:
        """The targets as a tensor the loss takes (int64 classes stay int64, values become float32)."""
        t = torch.from_numpy(np.ascontiguousarray(y))
        return (t if t.dtype == torch.int64 else t.float()).to(device)

    # --- model head, loss, metrics ---------------------------------------------------------

    @abstractmethod
    def output_size(self) -> int:
        """Outputs per bag of the model (passed to the model as ``n_classes``); valid after :meth:`fit`."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch: ``logits`` (B, output_size), ``target`` rows of :meth:`target_tensor`."""

    @abstractmethod
    def train_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        """History columns of the training pass from the epoch's (detached) outputs and targets, e.g.
        ``{"train_acc": ...}`` (``train_loss`` is the trainer's). May be empty."""

    @abstractmethod
    def validation_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        """``{"val_loss": ..., <other columns>}`` on all validation bags (logits float64, (n, output_size))."""

    def monitor(self, requested: str, y_val: np.ndarray) -> str:
        """The metric early stopping watches: ``val_loss`` or one of ``scores`` (checked already)."""
        return requested

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a number of bags per optimizer step the loss cannot learn from (the Cox loss needs 2+)."""

    def check_monitor(self, requested: str) -> str:
        """``requested`` if this task can monitor it, else one error line."""
        allowed = ("val_loss", *self.scores)
        if requested not in allowed:
            raise HistomilError(f"task {self.name}: cannot monitor {requested!r}; use one of {', '.join(allowed)}")
        return requested

    # --- predictions ---------------------------------------------------------------------

    @abstractmethod
    def predict(self, logits: torch.Tensor) -> np.ndarray:
        """Raw outputs (n, output_size) -> what is reported per bag, (n, len(prediction_columns()))."""

    @abstractmethod
    def prediction_columns(self) -> list[str]:
        """Column names of :meth:`predict`'s output in prediction tables (e.g. ``prob_0``.., ``prediction``)."""

    # --- checkpoint ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted task from a checkpoint (plain JSON values)."""
        return {"name": self.name, "loss": self.loss_name, "options": dict(self.options), "fitted": dict(self.fitted)}

    def restore(self, fitted: dict[str, Any]) -> None:
        """Take back what :meth:`fit` learned (from :meth:`state`)."""
        self.fitted = dict(fitted)

    def history_key(self) -> str:
        """How the task is recorded in a run's identity (a resumed run must train the same target)."""
        return f"{self.name}:{self.loss_name}:{sorted(self.options.items())}"


def model_objectives(out: MILOutput, loss: torch.Tensor) -> torch.Tensor:
    """The task loss combined with the model's own objectives.

    A model may scale the bag loss (``extras["loss_weight_bag"]``) and add auxiliary losses
    (``extras["aux_loss"]``): CLAM trains on 0.7 * bag loss + 0.3 * instance clustering loss.
    """
    extras = out.extras or {}
    if "loss_weight_bag" in extras:
        loss = loss * extras["loss_weight_bag"]
    aux = extras.get("aux_loss")
    if aux is not None:
        loss = loss + aux
    return loss


def bag_name(bag: Any, index: int) -> str:
    """A bag's id for error messages."""
    return repr(getattr(bag, "bag_id", f"#{index}"))
