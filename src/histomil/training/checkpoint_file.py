"""The model checkpoint file (``model.pt``): everything needed to predict later, in one file.

A checkpoint is a ``torch.save`` dict of plain Python values and tensors only (so it loads with
``weights_only=True``, no arbitrary unpickling):

* ``format`` / ``format_version``: identify the file as a histomil model checkpoint.
* ``model_name``, ``model_kwargs``, ``in_dim``, ``n_classes``: rebuild the model via the registry.
* ``state_dict``: the weights (on CPU).
* ``encoder_info``: the feature encoder the model was trained on (name, input_size, mean, std, ...),
  so prediction can refuse features from a different encoder.
* ``train_config``: the training configuration as a dict; ``histomil_version``; ``extra``
  (best epoch and its metrics, the task's state, anything else the trainer wants to keep; a survival
  model also its training bags' ``time``, ``event`` and ``risk`` lists and its ``median_risk`` on them
  under ``survival_train``, for the censoring distribution, risk-group cut and Cox Breslow baseline of its
  evaluation).
* ``kind``: ``"features"`` (a MIL model on cached features, rebuilt from the registry; also
  assumed when the key is missing) or ``"pixels"`` (an end-to-end tile encoder + MIL head, rebuilt
  from ``train_config`` by :func:`histomil.training.pixels.model_from_checkpoint`).

This module writes and reads the file and knows nothing about the models: the trainers import it
to save, and :func:`histomil.training.checkpoint.load_checkpoint` (above the trainers) rebuilds
the model of each kind.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histomil import __version__
from histomil.errors import HistomilError
from histomil.files import atomic_write

FORMAT = "histomil-mil-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_name", "model_kwargs", "in_dim", "n_classes", "state_dict")
KINDS = ("features", "pixels")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    n_classes: int,
    encoder_info: dict[str, Any] | None,
    train_config: dict[str, Any] | Any | None,
    extra: dict[str, Any] | None = None,
    in_dim: int | None = None,
    kind: str = "features",
) -> Path:
    """Write a checkpoint atomically (temp file + rename); returns the path."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    in_dim = in_dim if in_dim is not None else getattr(model, "in_dim", None)
    if in_dim is None:
        raise ValueError("in_dim is unknown: pass in_dim= or give the model an 'in_dim' attribute")
    if train_config is not None and hasattr(train_config, "model_dump"):
        train_config = train_config.model_dump(mode="json")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "histomil_version": __version__,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "in_dim": int(in_dim),
        "n_classes": int(n_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "encoder_info": dict(encoder_info) if encoder_info is not None else None,
        "train_config": train_config,
        "extra": dict(extra or {}),
    }
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED = re.compile(r"WeightsUnpickler error: ([^\n]+?)(?: was not an allowed global by default|\.?\n|$)")


def load_problem(exc: BaseException) -> str:
    """What ``torch.load`` failed on, in a few plain words: no ANSI codes, none of torch's advice on
    loading untrusted files with ``weights_only=False`` (a pickle histomil refuses stays refused)."""
    text = _ANSI.sub("", str(exc)).strip()
    refused = _REFUSED.search(text)
    if refused:
        return f"holds Python objects other than tensors and plain values: {refused[1].strip()}"
    if isinstance(exc, (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError)) and text:
        return text.splitlines()[0].split(". This is an internal")[0]
    return "truncated, corrupt or not a torch file"


def read_checkpoint_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a torch-saved dict safely (``weights_only``); any failure -> one-line HistomilError."""
    path = Path(path)
    if not path.is_file():
        raise HistomilError(f"{path}: {what} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch's unpickler raises, the file is not one we can read
        raise HistomilError(f"{path}: not a readable {what} ({load_problem(exc)})") from None
    if not isinstance(data, dict):
        raise HistomilError(f"{path}: not a histomil {what} (unexpected content)")
    return data


def read_model_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``path`` after checking its format, version and kind (HistomilError if not)."""
    data = read_checkpoint_dict(path)
    if data.get("format") != FORMAT or any(k not in data for k in REQUIRED_KEYS):
        raise HistomilError(f"{path}: not a histomil model checkpoint")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise HistomilError(
            f"{path}: checkpoint format {data['format_version']} is newer than this histomil "
            f"({__version__}) understands; upgrade histomil"
        )
    kind = data.get("kind", "features")
    if kind not in KINDS:
        raise HistomilError(f"{path}: unknown checkpoint kind {kind!r}; upgrade histomil")
    return data


def with_weights(
    path: str | Path, data: dict[str, Any], model: nn.Module, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the checkpoint's weights into the rebuilt ``model``; returns ``(model in eval mode, meta)``.

    ``meta`` holds every key of the checkpoint except ``state_dict``; the keys of ``extra`` (e.g.
    ``best_epoch``, ``metrics``) are also copied to the top level for convenience.
    """
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise HistomilError(f"{path}: weights do not match model {data['model_name']!r} ({first})") from None
    model.to(device).eval()
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    for key, value in (data.get("extra") or {}).items():
        meta.setdefault(key, value)
    return model, meta
