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
from histomil.models.registry import ENSEMBLE_MODELS, build_model
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
from histomil.training.tasks import task_from_checkpoint

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "REBUILD", "atomic_torch_save", "combine_checkpoints", "feature_model_from_checkpoint",
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


def combine_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write one checkpoint that averages the predictions of several trained feature models.

    The models (e.g. the same recipe trained with different seeds, or a cross-validation's fold models)
    must take the same features: the same feature dimension, classes and encoder, and be all classifiers
    or all regression models (a survival risk has no common scale to average). Classifiers give the
    registry model ``ensemble`` (:class:`histomil.models.ensemble.MeanProbabilityEnsemble`, mean
    probability, threshold 0.5); regression models give ``ensemble_mean_value``
    (:class:`~histomil.models.ensemble.MeanValueEnsemble`, the mean prediction in target units, saved
    with a regression task of mean 0 and sd 1). ``evaluate``, ``predict``, heatmaps and reports use
    either unchanged; ``extra.members`` records the member files.
    """
    if len(paths) < 2:
        raise HistomilError("an ensemble needs at least two model checkpoints")
    datas = [read_model_checkpoint(Path(p)) for p in paths]
    tasks = [task_from_checkpoint(d) for d in datas]
    first, task0 = datas[0], tasks[0]
    enc0 = (first.get("encoder_info") or {}).get("name")
    for path, data, task in zip(paths, datas, tasks):
        if data.get("kind", "features") != "features":
            raise HistomilError(f"{path}: only models on cached features can be combined (this one takes pixels)")
        if data["model_name"] in ENSEMBLE_MODELS:
            raise HistomilError(f"{path}: is an ensemble already; combine its members instead")
        if task.name not in ("classification", "regression"):  # probabilities and values average; risks do not
            raise HistomilError(f"{path}: a {task.name} model; only classifiers or regression models can be combined "
                                "into an ensemble")
        if task.name != task0.name:
            raise HistomilError(f"{path}: a {task.name} model, {paths[0]} a {task0.name} model; an ensemble combines "
                                "models of one task")
        if (int(data["in_dim"]), int(data["n_classes"])) != (int(first["in_dim"]), int(first["n_classes"])):
            raise HistomilError(f"{path}: takes {data['in_dim']}-d features and {data['n_classes']} classes, "
                                f"{paths[0]} takes {first['in_dim']}-d and {first['n_classes']}")
        enc = (data.get("encoder_info") or {}).get("name")
        if enc != enc0:
            raise HistomilError(f"{path}: trained on features of encoder {enc!r}, {paths[0]} on {enc0!r}")
    members = [{"model": d["model_name"], "kwargs": dict(d["model_kwargs"])} for d in datas]
    name, kwargs, task_state = "ensemble", {"members": members}, task0.state()  # e.g. the class names
    if task0.name == "regression":  # each member's own standardisation; the ensemble outputs target units
        name = "ensemble_mean_value"
        kwargs.update(means=[float(t.fitted["mean"]) for t in tasks], sds=[float(t.fitted["sd"]) for t in tasks])
        task_state = {**task_state, "fitted": {"mean": 0.0, "sd": 1.0}}
    model = build_model(name, int(first["in_dim"]), int(first["n_classes"]), **kwargs)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("members.")}  # the means and sds
    state.update({f"members.{i}.{k}": v for i, d in enumerate(datas) for k, v in d["state_dict"].items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HistomilError(f"ensemble: member weights do not match their models ({str(exc).splitlines()[0]})") from None
    extra = {"members": [str(p) for p in paths], "member_best_epochs": [(d.get("extra") or {}).get("best_epoch") for d in datas],
             "task": task_state}
    return save_checkpoint(out, model, name, kwargs, int(first["n_classes"]), first.get("encoder_info"),
                           {"ensemble_of": [str(p) for p in paths]}, extra=extra, in_dim=int(first["in_dim"]))
