"""Model registry: one name -> (constructor, default kwargs), so configs and checkpoints can
name a model as a string and rebuild it later.

Every constructor takes ``in_dim`` and ``n_classes`` plus its own keyword options and returns an
``nn.Module`` whose forward is ``(x (B, N, D), mask (B, N) | None) -> MILOutput``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from histomil.errors import HistomilError
from histomil.models.abmil import ABMIL
from histomil.models.clam import CLAM
from histomil.models.dsmil import DSMIL
from histomil.models.ensemble import MeanProbabilityEnsemble, MeanValueEnsemble
from histomil.models.pooling import MaxPoolMIL, MeanPoolMIL, MiNet
from histomil.models.small import SmallABMIL
from histomil.models.transmil import TransMIL

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, tuple[ModelFactory, dict[str, Any]]] = {
    "abmil": (ABMIL, {"gated": False}),
    "gated_abmil": (ABMIL, {"gated": True}),
    "mean_pool": (MeanPoolMIL, {}),
    "max_pool": (MaxPoolMIL, {}),
    "mi_net": (MiNet, {}),
    "clam_sb": (CLAM, {"multi_branch": False}),
    "clam_mb": (CLAM, {"multi_branch": True}),
    "transmil": (TransMIL, {}),
    "dsmil": (DSMIL, {}),
    # the small fc network of Ilse et al. 2018 (Table 1) for Musk / Elephant features
    "abmil_small": (SmallABMIL, {"gated": False}),
    "gated_abmil_small": (SmallABMIL, {"gated": True}),
}


# Built from trained members (training/checkpoint.combine_checkpoints), never trained from their name.
ENSEMBLE_MODELS = ("ensemble", "ensemble_mean_value")


def _members(in_dim: int, n_classes: int, members: list[dict[str, Any]] | None) -> list[nn.Module]:
    """The registry models ``members`` (``{"model": name, "kwargs": {...}}`` each), untrained."""
    specs = members or []
    if not specs or any(not isinstance(m, dict) or "model" not in m or m["model"] in ENSEMBLE_MODELS for m in specs):
        raise ValueError("members must be a non-empty list of {'model': name, 'kwargs': {...}} (no nested ensembles)")
    return [build_model(m["model"], in_dim, n_classes, **m.get("kwargs", {})) for m in specs]


def build_ensemble(in_dim: int, n_classes: int = 2, members: list[dict[str, Any]] | None = None) -> nn.Module:
    """A :class:`MeanProbabilityEnsemble` of registry models, each given as ``{"model": name, "kwargs": {...}}``."""
    return MeanProbabilityEnsemble(_members(in_dim, n_classes, members))


def build_value_ensemble(in_dim: int, n_classes: int = 1, members: list[dict[str, Any]] | None = None,
                         means: list[float] | None = None, sds: list[float] | None = None) -> nn.Module:
    """A :class:`MeanValueEnsemble` of one-output regression models, with each member's training (mean, sd)."""
    if n_classes != 1:
        raise ValueError(f"a value ensemble has one output, not {n_classes}")
    return MeanValueEnsemble(_members(in_dim, 1, members), list(means or []), list(sds or []))


MODELS["ensemble"] = (build_ensemble, {})
MODELS["ensemble_mean_value"] = (build_value_ensemble, {})


def register_model(name: str, constructor: ModelFactory, defaults: dict[str, Any] | None = None) -> None:
    """Add a model under ``name`` (used by model modules and plugins)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = (constructor, dict(defaults or {}))


def model_names() -> list[str]:
    """The models that train from their name and defaults (an ensemble is built from trained members)."""
    return sorted(name for name in MODELS if name not in ENSEMBLE_MODELS)


def model_options(name: str) -> dict[str, Any]:
    """The keyword options a model accepts, with their effective defaults."""
    constructor, defaults = _lookup(name)
    params = inspect.signature(constructor).parameters
    options = {
        k: p.default
        for k, p in params.items()
        if k not in ("self", "in_dim", "n_classes") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    options.update(defaults)
    return options


def build_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``in_dim``-dimensional features; bad names/options -> HistomilError."""
    constructor, defaults = _lookup(name)
    params = inspect.signature(constructor).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = model_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown and not takes_any:
        raise HistomilError(
            f"model {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid)) or 'none'}"
        )
    try:
        return constructor(in_dim=in_dim, n_classes=n_classes, **{**defaults, **kwargs})
    except (TypeError, ValueError) as exc:
        raise HistomilError(f"model {name!r}: bad options {kwargs}: {exc}") from None


def _lookup(name: str) -> tuple[ModelFactory, dict[str, Any]]:
    if name not in MODELS:
        raise HistomilError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
    return MODELS[name]
