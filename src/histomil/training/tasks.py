"""The training targets histomil knows: classes, continuous values and survival; built by name.

* ``classification``: a class index per bag (``FeatureBag.label``); softmax head of one output per class,
  cross-entropy (optionally label-smoothed and class-weighted); validation accuracy and ROC-AUC
  (one-vs-rest macro for more than two classes); predictions are class probabilities.
* ``regression``: one number per bag (``FeatureBag.target == (value,)``); one output, trained on the
  target standardised with the training targets' mean and sd (so the learning rate means the same for a
  fraction and for a count), MSE or Huber loss; validation MAE, RMSE, R², Pearson and Spearman;
  predictions in the target's own units.
* ``survival``: ``(time, event)`` per bag (``FeatureBag.target``); its losses and metrics are in
  :mod:`histomil.training.survival_task` (registered in :data:`TASKS` when present).

The interface is :class:`histomil.training.task_base.Task`; :func:`build_task` makes one from a training
config and :func:`task_from_checkpoint` from a saved model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from histomil.errors import HistomilError
from histomil.training.common import auc, monitored_metric
from histomil.training.survival_task import SurvivalTask
from histomil.training.task_base import Task, bag_name

TASK_NAMES = ("classification", "regression", "survival")


class ClassificationTask(Task):
    """Bag classes 0..C-1; see the module docstring. Options: ``label_smoothing`` (eps, targets 1 - eps/2
    and eps/2 for two classes), ``class_weights`` (inverse-frequency weighted cross-entropy) and
    ``class_names`` (one name per class index, shown in evaluation files and reports)."""

    name = "classification"
    losses = ("cross_entropy",)
    scores = ("val_auc",)
    option_names = ("label_smoothing", "class_weights", "class_names")
    feeds_labels = True

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        names = options.get("class_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(set(map(str, names))) != len(names) or len(names) < 2):
            raise HistomilError(f"task classification: class_names must be a list of 2+ distinct names, not {names!r}")
        return options

    def targets(self, bags: Sequence[Any], split: str) -> np.ndarray:
        y = []
        for i, b in enumerate(bags):
            if b.label is None or int(b.label) < 0:
                kind = " (it has a continuous target: use task regression or survival)" if getattr(b, "target", None) is not None else ""
                raise HistomilError(f"{split} bag {bag_name(b, i)} has no label{kind}")
            y.append(int(b.label))
        return np.array(y, dtype=np.int64)

    def fit(self, y_train: np.ndarray, y_val: np.ndarray | None = None) -> None:
        classes = set(np.unique(y_train).tolist())
        if len(classes) < 2:
            raise HistomilError(f"training bags all have label {classes.pop()}; need at least two classes")
        top = int(max(y_train.max(), y_val.max() if y_val is not None and len(y_val) else 0))
        n = max(2, top + 1)
        names = self.options.get("class_names")
        if names is not None and len(names) < n:
            raise HistomilError(f"task classification: {len(names)} class_names for class indices up to {n - 1}")
        n = len(names) if names is not None else n
        self.fitted = {"n_classes": n}
        if self.options.get("class_weights"):
            counts = np.bincount(y_train, minlength=n)
            self.fitted["class_weights"] = (len(y_train) / (n * np.maximum(counts, 1))).tolist()

    def output_size(self) -> int:
        return int(self.fitted["n_classes"])

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.fitted.get("class_weights")
        weight = torch.tensor(weights, dtype=logits.dtype, device=logits.device) if weights else None
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=float(self.options.get("label_smoothing", 0.0)))

    def train_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        return {"train_acc": float((logits.argmax(dim=-1).cpu().numpy() == y).mean())}

    def validation_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        target = torch.from_numpy(y).to(logits.device)
        return {
            "val_loss": float(F.cross_entropy(logits, target)),
            "val_acc": float((logits.argmax(dim=-1) == target).double().mean()),
            "val_auc": auc(y, torch.softmax(logits.double(), dim=-1).cpu().numpy(), self.output_size()),
        }

    def monitor(self, requested: str, y_val: np.ndarray) -> str:
        return monitored_metric(self.check_monitor(requested), y_val)

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        return torch.softmax(logits.double(), dim=-1).cpu().numpy()

    def prediction_columns(self) -> list[str]:
        return [f"prob_{c}" for c in range(self.output_size())]


class RegressionTask(Task):
    """One continuous value per bag; see the module docstring. Option ``huber_delta`` (default 1.0, in
    training-target standard deviations) for the Huber loss."""

    name = "regression"
    losses = ("mse", "huber")
    scores = ("val_r2", "val_pearson", "val_spearman")
    option_names = ("huber_delta",)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        delta = options.get("huber_delta", 1.0)
        if not isinstance(delta, (int, float)) or not delta > 0:
            raise HistomilError(f"task regression: huber_delta must be a positive number, not {delta!r}")
        return options

    def targets(self, bags: Sequence[Any], split: str) -> np.ndarray:
        return np.array([_single_value(b, i, split) for i, b in enumerate(bags)], dtype=np.float32)

    def fit(self, y_train: np.ndarray, y_val: np.ndarray | None = None) -> None:
        sd = float(np.std(y_train))
        if not sd > 0:
            raise HistomilError(f"training bags all have target {float(y_train[0])}; a regression needs different values")
        self.fitted = {"mean": float(np.mean(y_train)), "sd": sd}

    def output_size(self) -> int:
        return 1

    def standardise(self, target: torch.Tensor) -> torch.Tensor:
        return (target - self.fitted["mean"]) / self.fitted["sd"]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = self.standardise(target.to(logits.dtype))
        if self.loss_name == "huber":
            return F.huber_loss(logits[:, 0], z, delta=float(self.options.get("huber_delta", 1.0)))
        return F.mse_loss(logits[:, 0], z)

    def train_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        return {"train_mae": float(np.mean(np.abs(self.predict(logits)[:, 0] - y)))}

    def validation_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        pred = self.predict(logits)[:, 0]
        loss = float(self.loss(logits, torch.from_numpy(y).to(logits.device)))
        return {"val_loss": loss, **regression_scores(y, pred, prefix="val_")}

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        return (logits.double()[:, :1].cpu().numpy() * self.fitted["sd"] + self.fitted["mean"])

    def prediction_columns(self) -> list[str]:
        return ["prediction"]


def regression_scores(y: np.ndarray, pred: np.ndarray, prefix: str = "") -> dict[str, float]:
    """MAE, RMSE, R², Pearson and Spearman of predictions ``pred`` for true values ``y``.

    Correlations are NaN when either side is constant (undefined), R² when ``y`` is."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = pred - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    varies = len(y) > 1 and np.ptp(y) > 0 and np.ptp(pred) > 0
    return {
        f"{prefix}mae": float(np.mean(np.abs(err))),
        f"{prefix}rmse": float(math.sqrt(np.mean(err**2))),
        f"{prefix}r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan"),
        f"{prefix}pearson": float(stats.pearsonr(y, pred)[0]) if varies else float("nan"),
        f"{prefix}spearman": float(stats.spearmanr(y, pred)[0]) if varies else float("nan"),
    }


def _single_value(bag: Any, index: int, split: str) -> float:
    """A regression bag's target value; a missing, non-finite or multi-valued target is one error line."""
    target = getattr(bag, "target", None)
    if target is None:
        kind = " (it has a class label only: use task classification)" if bag.label is not None else ""
        raise HistomilError(f"{split} bag {bag_name(bag, index)} has no regression target{kind}")
    values = np.atleast_1d(np.asarray(target, dtype=np.float64))
    if values.shape != (1,):
        raise HistomilError(f"{split} bag {bag_name(bag, index)} has target {tuple(values.tolist())}, "
                            "not one value (a (time, event) pair is a survival target)")
    if not np.isfinite(values[0]):
        raise HistomilError(f"{split} bag {bag_name(bag, index)} has a non-finite target ({values[0]})")
    return float(values[0])


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "regression": RegressionTask, "survival": SurvivalTask}


def task_class(name: str) -> type[Task]:
    """The Task class registered under ``name``; an unknown or unavailable name is one error line."""
    if name in TASKS:
        return TASKS[name]
    if name in TASK_NAMES:
        raise HistomilError(f"task {name!r} is not available in this installation of histomil")
    raise HistomilError(f"unknown task {name!r}; use one of {', '.join(TASK_NAMES)}")


def build_task(config: Any) -> Task:
    """The (unfitted) task of a training config: ``task``, ``loss``, ``task_options`` and, for
    classification, ``label_smoothing`` and ``class_weights``."""
    name = getattr(config, "task", "classification")
    options = dict(getattr(config, "task_options", None) or {})
    if name == "classification":
        options.setdefault("label_smoothing", float(getattr(config, "label_smoothing", 0.0)))
        options.setdefault("class_weights", bool(getattr(config, "class_weights", False)))
    elif getattr(config, "class_weights", False):
        raise HistomilError(f"task {name}: class_weights applies to classification only")
    task = task_class(name)(getattr(config, "loss", None), options)
    task.check_batch_size(int(getattr(config, "batch_size", 1)))
    return task


def task_from_state(state: dict[str, Any]) -> Task:
    """A fitted task rebuilt from :meth:`Task.state` (as a checkpoint stores it)."""
    task = task_class(str(state.get("name", "classification")))(state.get("loss"), state.get("options") or {})
    task.restore(state.get("fitted") or {})
    return task


def task_from_checkpoint(meta: dict[str, Any]) -> Task:
    """The task of a loaded checkpoint's metadata; checkpoints from before tasks are classifiers."""
    state = meta.get("task") or (meta.get("extra") or {}).get("task")
    if state:
        return task_from_state(state)
    task = ClassificationTask()
    task.restore({"n_classes": int(meta.get("n_classes", 2))})
    return task
