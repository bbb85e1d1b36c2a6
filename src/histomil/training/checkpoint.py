"""Model checkpoints: :func:`load_checkpoint` rebuilds a trained model of either kind from ``model.pt``.

The file format, and writing and reading it, live in :mod:`.checkpoint_file` (re-exported here:
``save_checkpoint``, ``read_checkpoint_dict``, ``atomic_torch_save``). This module sits above both
trainers: it imports :mod:`.pixels` to rebuild end-to-end pixel models, and the trainers import
only :mod:`.checkpoint_file`, so no import cycle runs through the checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histomil.errors import HistomilError
from histomil.models.registry import build_model
from histomil.training.checkpoint_file import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    atomic_torch_save,
    read_checkpoint_dict,
    read_model_checkpoint,
    save_checkpoint,
    with_weights,
)
from histomil.training.pixels import model_from_checkpoint

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "REBUILD", "atomic_torch_save", "feature_model_from_checkpoint",
    "load_checkpoint", "read_checkpoint_dict", "save_checkpoint",
]


def feature_model_from_checkpoint(data: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) MIL model on features from the registry; the caller loads the weights."""
    return build_model(data["model_name"], int(data["in_dim"]), int(data["n_classes"]), **data["model_kwargs"])


# How each checkpoint kind is rebuilt from its dict (untrained; the weights are loaded afterwards).
REBUILD: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "features": feature_model_from_checkpoint,
    "pixels": model_from_checkpoint,
}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint; returns ``(model in eval mode, meta)``.

    ``meta`` holds every key of the checkpoint except ``state_dict``; the keys of ``extra`` (e.g.
    ``best_epoch``, ``metrics``) are also copied to the top level for convenience.
    """
    path = Path(path)
    data = read_model_checkpoint(path)
    try:
        model = REBUILD[data.get("kind", "features")](data)
    except HistomilError as exc:
        raise HistomilError(f"{path}: {exc}") from None
    return with_weights(path, data, model, device)
