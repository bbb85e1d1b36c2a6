"""Small pieces shared by the feature trainer (:mod:`.trainer`) and end-to-end training (:mod:`.pixels`).

Config parsing, the bag checks and labels, the loss, metrics, the device and seeded torch RNG.
The epoch loop itself is :mod:`.loop`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from histomil.errors import HistomilError
from histomil.models.base import MILOutput
from histomil.training.task_base import model_objectives

C = TypeVar("C", bound=pydantic.BaseModel)


def parse_config(cls: type[C], data: dict[str, Any], source: str) -> C:
    """``cls.model_validate(data)``; every problem listed in one HistomilError line naming ``source``."""
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].replace('Value error, ', '')}" for err in exc.errors()
        )
        raise HistomilError(f"{source}: {problems}") from None


# --- model and loss ----------------------------------------------------------------------


def takes_labels(model: nn.Module) -> bool:
    """Whether the model's forward takes the bag labels ``y`` (e.g. CLAM's instance clustering)."""
    return "y" in inspect.signature(model.forward).parameters


def bag_loss(
    out: MILOutput, target: torch.Tensor, weight: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy on the bag logits plus the model's own objectives.

    A model may scale the bag loss (``extras["loss_weight_bag"]``) and add auxiliary losses
    (``extras["aux_loss"]``): CLAM trains on 0.7 * bag loss + 0.3 * instance clustering loss.
    ``label_smoothing`` = eps aims at ``1 - eps/2`` instead of 1 (binary), which bounds the logits the
    loss asks for (eps = 0.1: |logit difference| <= log(19) = 2.9) instead of driving them to infinity.
    """
    return model_objectives(out, F.cross_entropy(out.logits, target, weight=weight, label_smoothing=label_smoothing))


def check_finite(train_loss: float, epoch: int, out_dir: Path, lr: float) -> None:
    """A NaN or infinite training loss -> HistomilError (the run diverged)."""
    if not math.isfinite(train_loss):
        raise HistomilError(f"{out_dir}: training diverged at epoch {epoch} (train loss {train_loss}); lower lr (now {lr})")


# --- device, threads, seeding ------------------------------------------------------------


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (0 leaves torch's setting alone)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def seeded(device: torch.device, seed: int, threads: int) -> Iterator[None]:
    """Torch's RNG seeded with ``seed`` and ``threads`` CPU threads inside the block.

    The RNG is forked, so the caller's global RNG is left untouched.
    """
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch_threads(threads):
        torch.manual_seed(seed)
        yield


# --- bags and labels ---------------------------------------------------------------------


def check_nonempty(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> None:
    """Training needs training bags, and validation bags for early stopping and model selection."""
    if not train_bags:
        raise HistomilError("no training bags")
    if not val_bags:
        raise HistomilError("no validation bags (early stopping and model selection need some)")


def labelled(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """Each bag with its split ("training" / "validation"), once its label is checked."""
    for split, bags in (("training", train_bags), ("validation", val_bags)):
        for b in bags:
            if b.label is None or int(b.label) < 0:
                raise HistomilError(f"{split} bag {b.bag_id!r} has no label")
            yield split, b


def count_classes(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> int:
    """Number of classes of labelled bags; the training bags must hold at least two."""
    train_classes = {int(b.label) for b in train_bags}
    if len(train_classes) < 2:
        raise HistomilError(f"training bags all have label {train_classes.pop()}; need at least two classes")
    return max(2, max(int(b.label) for b in [*train_bags, *val_bags]) + 1)


def labels(bags: Sequence[Any]) -> np.ndarray:
    """The bags' labels as an int64 array (the bags were checked to be labelled)."""
    return np.array([int(b.label) for b in bags], dtype=np.int64)


# --- metrics -----------------------------------------------------------------------------


def monitored_metric(monitor: str, y_val: np.ndarray) -> str:
    """The metric to monitor: ``val_auc`` falls back to ``val_loss`` (with a warning) on a one-class val set."""
    if monitor == "val_auc" and len(np.unique(y_val)) < 2:
        # stacklevel 3: the warning points at the caller of train / train_pixels
        warnings.warn("validation bags all have one class, so AUC is undefined; monitoring val_loss instead", stacklevel=3)
        return "val_loss"
    return monitor


def auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """ROC-AUC (one-vs-rest macro for >2 classes); NaN when a class is missing from ``y``."""
    if len(np.unique(y)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(n_classes))))
