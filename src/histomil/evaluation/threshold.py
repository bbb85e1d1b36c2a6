"""Choose a bag-level decision threshold on validation predictions only.

The threshold is part of the model: it is fixed on the validation split and then applied unchanged
to every test set, so test labels never influence it. Rules:

* ``fixed``: ``value`` (default 0.5), whatever the validation data say;
* ``youden``: the cut that maximises Youden's J = sensitivity + specificity - 1 on validation
  (ties go to the highest threshold, i.e. the fewest positive calls);
* ``sensitivity``: the highest threshold whose validation sensitivity is at least ``value``
  (default 0.9).

A bag is called positive when ``prob >= threshold``. The data-driven rules place the threshold
halfway between the validation score that defines the cut and the next lower validation score:
validation bags are classified exactly as at the cut itself, while a test bag that falls in the
gap between two validation scores is not decided by an arbitrary tie-break at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator
from sklearn.metrics import roc_curve

from histomil.errors import HistomilError
from histomil.evaluation.metrics import check_binary_inputs

Rule = Literal["fixed", "youden", "sensitivity"]
RULES: tuple[str, ...] = ("fixed", "youden", "sensitivity")
DEFAULT_VALUE = {"fixed": 0.5, "youden": None, "sensitivity": 0.9}


def choose_threshold(y_val, p_val, rule: str = "fixed", value: float | None = None) -> float:
    """The decision threshold for ``rule`` from validation labels and positive-class probabilities.

    ``value`` is the threshold for ``fixed`` (default 0.5) and the target sensitivity for
    ``sensitivity`` (default 0.9); ``youden`` takes no value. The data-driven rules need both
    classes in the validation set and raise :class:`HistomilError` otherwise.
    """
    if rule not in RULES:
        raise HistomilError(f"threshold rule {rule!r}: choose one of {', '.join(RULES)}")
    if value is None:
        value = DEFAULT_VALUE[rule]
    if rule == "fixed":
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise HistomilError(f"fixed threshold must lie in [0, 1], got {value!r}")
        return float(value)
    if rule == "youden" and value is not None:
        raise HistomilError("the youden threshold rule takes no value")
    if rule == "sensitivity" and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise HistomilError(f"target sensitivity must lie in (0, 1], got {value!r}")

    y, p = check_binary_inputs(y_val, p_val, "validation predictions")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        raise HistomilError(
            f"validation predictions: all {y.size} bags are {only}, so the {rule!r} threshold is undefined;"
            " use a validation split with both classes or the 'fixed' rule"
        )
    # drop_intermediate=False: one point per distinct score, from the highest cut (inf) down.
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    if rule == "youden":
        j = tpr - fpr
        k = int(np.argmax(j[1:])) + 1  # index 0 is the "call nothing positive" cut at +inf
    else:
        ok = np.flatnonzero(tpr >= float(value) - 1e-12)
        k = int(ok[0]) if ok.size else len(thr) - 1
        k = max(k, 1)
    cut = float(thr[k])
    lower = float(thr[k + 1]) if k + 1 < len(thr) else cut
    return (cut + lower) / 2.0


def describe_rule(rule: str, value: float | None = None) -> str:
    """A short human description, e.g. ``'youden on validation'`` or ``'fixed 0.5'``."""
    if rule == "fixed":
        return f"fixed {DEFAULT_VALUE['fixed'] if value is None else value:g}"
    if rule == "youden":
        return "Youden's J on validation"
    return f"sensitivity >= {DEFAULT_VALUE['sensitivity'] if value is None else value:g} on validation"


class ThresholdConfig(BaseModel):
    """How the decision threshold is chosen on validation bags (rules above); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["fixed", "youden", "sensitivity"] = "fixed"
    value: float | None = None  # fixed: the threshold (0.5); sensitivity: the target (0.9); youden: none

    @model_validator(mode="after")
    def _check(self) -> ThresholdConfig:
        if self.rule == "youden" and self.value is not None:
            raise ValueError("the youden rule takes no value")
        if self.rule == "fixed" and self.value is not None and not 0.0 <= self.value <= 1.0:
            raise ValueError(f"a fixed threshold must lie in [0, 1], got {self.value}")
        if self.rule == "sensitivity" and self.value is not None and not 0.0 < self.value <= 1.0:
            raise ValueError(f"a target sensitivity must lie in (0, 1], got {self.value}")
        return self


def fit_threshold(model_path: str | Path, val_bags: Sequence[Any], rule: ThresholdConfig) -> tuple[float, np.ndarray]:
    """Choose the threshold on the validation bags only and record it in the checkpoint.

    Returns ``(threshold, validation positive-class probabilities)``. The threshold, its rule and
    value go into the checkpoint's ``extra`` (``load_checkpoint`` meta ``threshold``), so
    ``evaluate``, ``predict`` and the report apply it unchanged to every test set.
    """
    from histomil.training.checkpoint import load_checkpoint, read_checkpoint_dict
    from histomil.training.checkpoint_file import atomic_torch_save
    from histomil.training.trainer import predict

    model, _ = load_checkpoint(model_path)
    y_val = np.array([int(b.label) for b in val_bags], dtype=np.int64)
    p_val = np.array([p[1] for p, _ in predict(model, val_bags)], dtype=np.float64)
    threshold = choose_threshold(y_val, p_val, rule.rule, rule.value)
    ckpt = read_checkpoint_dict(model_path)
    ckpt.setdefault("extra", {}).update({"threshold": threshold, "threshold_rule": rule.rule, "threshold_value": rule.value})
    atomic_torch_save(ckpt, Path(model_path))
    return threshold, p_val
