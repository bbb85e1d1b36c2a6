"""Tile encoders built from timm architectures and Hugging Face transformers models: the presets of
:mod:`histomil.features.presets` and ``timm:<architecture>``.

timm models take timm-format weights, transformers models their folder (``config.json`` beside the
weights); both from ``weights`` (a local file or folder) or the local Hugging Face cache
(:mod:`histomil.features.weights`). Nothing is downloaded and no network runs with silent random
weights; the weights' identity (a digest of the loaded tensors) goes into the encoder's
:class:`~histomil.features.tile_encoder.EncoderInfo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from histomil.errors import HistomilError
from histomil.features.conch import ConchVisionTower
from histomil.features.presets import LAYER_NAMES, Preset
from histomil.features.tile_encoder import INTERPOLATIONS, EncoderInfo, TileEncoder
from histomil.features.weights import (
    FOUNDATION_EXTRA,
    RANDOM_WEIGHTS,
    WeightsSource,
    cached_weights,
    load_weights,
    local_weights,
    missing_weights_message,
    state_digest,
)

TIMM_PREFIX = "timm:"


class TimmEmbedding(nn.Module):
    """A timm model whose ``forward_features`` returns one (B, dim) embedding per image.

    ``embedding`` (see :class:`~histomil.features.presets.Preset`): ``timm_head`` is timm's own pooling
    (``forward_head(pre_logits=True)``), ``cls`` the class token after the final norm, ``cls+mean_patch``
    the class token next to the mean of the patch tokens (class and register tokens excluded).
    """

    def __init__(self, model: nn.Module, embedding: str) -> None:
        super().__init__()
        if embedding not in ("timm_head", "cls", "cls+mean_patch"):
            raise HistomilError(f"embedding {embedding!r} cannot be computed from a timm model")
        if embedding != "timm_head" and not hasattr(model, "num_prefix_tokens"):
            raise HistomilError(f"embedding {embedding!r} needs a token model (a ViT), not {type(model).__name__}")
        self.model = model
        self.embedding = embedding
        width = int(getattr(model, "num_features"))
        head = getattr(model, "head_hidden_size", None) or width
        self.dim = {"timm_head": int(head), "cls": width, "cls+mean_patch": 2 * width}[embedding]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, dim)."""
        tokens = self.model.forward_features(x)
        if self.embedding == "timm_head":
            return self.model.forward_head(tokens, pre_logits=True)
        if self.embedding == "cls":
            return tokens[:, 0]
        patches = tokens[:, int(self.model.num_prefix_tokens):]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


class TransformersEmbedding(nn.Module):
    """A Hugging Face transformers vision model whose ``forward_features`` returns the class token of its
    ``last_hidden_state`` (Phikon-v2's embedding, as its model card and TRIDENT take it)."""

    def __init__(self, model: nn.Module, embedding: str) -> None:
        super().__init__()
        if embedding != "cls":
            raise HistomilError(f"embedding {embedding!r} is not computed for transformers models (only 'cls')")
        self.model = model
        self.embedding = embedding
        self.dim = int(model.config.hidden_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, hidden size)."""
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def import_timm() -> Any:
    """timm, or one error line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise HistomilError(f"timm encoders need timm, huggingface-hub and safetensors: {FOUNDATION_EXTRA}") from None
    return timm


def timm_kwargs(preset: Preset) -> dict[str, Any]:
    """The preset's timm keyword arguments with layer names (``swiglu_packed``, ``silu``) made classes."""
    timm = import_timm()
    layers = dict(zip(LAYER_NAMES, (timm.layers.SwiGLUPacked, nn.SiLU)))  # LAYER_NAMES = ("swiglu_packed", "silu")
    kwargs = dict(preset.timm_kwargs)
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str):
            if value not in layers:
                raise HistomilError(f"preset {preset.name!r}: unknown layer {value!r} for {key}; known: {', '.join(layers)}")
            kwargs[key] = layers[value]
    return kwargs


def timm_preset(arch: str) -> Preset:
    """A preset for any timm architecture (``timm:<arch>``): preprocessing from its timm pretrained config
    (input size, ``crop_pct`` -> resize, interpolation, mean/std), weights from its Hugging Face repo."""
    timm = import_timm()
    if not arch or not timm.is_model(arch):
        raise HistomilError(f"unknown timm architecture {arch!r} (timm.list_models() lists them)")
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    size = int(data["input_size"][-1])
    crop = float(data.get("crop_pct") or 1.0)
    interpolation = str(data.get("interpolation", "bicubic"))
    files = (cfg.hf_hub_filename,) if cfg is not None and cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    return Preset(
        name=f"{TIMM_PREFIX}{arch}", title=arch, hf_repo=(cfg.hf_hub_id if cfg is not None else None) or "", arch=arch,
        timm_kwargs={"num_classes": 0}, input_size=size, resize=int(size / crop),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        embedding="timm_head", dim=0, prefix_tokens=0, licence=(cfg.license if cfg is not None else None) or "unknown",
        gated=False, weights_files=files,
        extra={"classifier": cfg.classifier if cfg is not None else None},
    )


def preset_weights(preset: Preset, weights: str | Path | None) -> WeightsSource:
    """``weights`` when given, else the preset's repository in the local Hugging Face cache, else one error line.
    A transformers preset also takes the model folder itself (``config.json`` and its weights)."""
    if weights is not None:
        if preset.builder == "transformers" and Path(weights).is_dir():
            return WeightsSource(Path(weights), f"folder:{Path(weights).resolve()}")
        return local_weights(weights)
    found = cached_weights(preset.hf_repo, preset.weights_files)
    if found is None:
        raise HistomilError(missing_weights_message(preset.name, preset.hf_repo, preset.gated))
    return found


def preset_encoder(
    preset: Preset,
    weights: str | Path | None = None,
    pretrained: bool = True,
    precision: str = "fp32",
    channels_last: bool = False,
) -> TileEncoder:
    """A TileEncoder for a preset (timm or transformers): network, weights, preprocessing and embedding
    from ``preset``; the weights' identity is the digest of the loaded tensors.

    ``pretrained=False`` builds a timm network with random weights (recorded as ``weights="random"``:
    for speed tests only).
    """
    if not pretrained and weights is not None:
        raise HistomilError(f"encoder {preset.name!r}: weights {weights} given for an encoder built without weights")
    if preset.builder == "transformers":
        if not pretrained:
            raise HistomilError(f"encoder {preset.name!r}: a transformers model is built from its folder's config.json, "
                                "so it cannot be built without weights")
        backbone: nn.Module = TransformersEmbedding(transformers_model(preset, preset_weights(preset, weights)), preset.embedding)
        return preset_tile_encoder(preset, backbone, state_digest(backbone.model), precision, channels_last)
    source = preset_weights(preset, weights) if pretrained else None  # before building: a missing file fails fast
    timm = import_timm()
    model = timm.create_model(preset.arch, pretrained=False, **timm_kwargs(preset))
    if preset.builder == "conch":
        model = ConchVisionTower(model)
    if source is not None:
        load_weights(model, source, str(preset.arch), classifier=preset.extra.get("classifier"))
    identity = state_digest(model) if source is not None else RANDOM_WEIGHTS
    backbone = model.eval() if preset.builder == "conch" else TimmEmbedding(model.eval(), preset.embedding)
    return preset_tile_encoder(preset, backbone, identity, precision, channels_last)


def preset_tile_encoder(preset: Preset, backbone: nn.Module, identity: str, precision: str, channels_last: bool) -> TileEncoder:
    """The TileEncoder of a built preset backbone, its dimension checked against the table."""
    dim = int(backbone.dim)  # type: ignore[arg-type]
    if preset.dim and dim != preset.dim:
        raise HistomilError(f"encoder {preset.name!r}: {preset.arch or 'its model'} gives {dim}-d embeddings, the preset says {preset.dim}")
    info = EncoderInfo(
        name=preset.name, input_size=preset.input_size, mean=preset.mean, std=preset.std, dim=dim,
        resize=preset.resize, interpolation=preset.interpolation, weights=identity,
    )
    return TileEncoder(backbone, info, precision=precision, channels_last=channels_last).eval()


def transformers_model(preset: Preset, source: WeightsSource) -> nn.Module:
    """A transformers model from its folder (``config.json`` + weights; a weights file names its folder).

    Every weight must come from the folder: transformers would fill missing ones with random values and
    only warn, so missing or mis-shaped tensors are an error here.
    """
    try:
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise HistomilError(f"encoder {preset.name!r} needs transformers: {FOUNDATION_EXTRA}") from None
    transformers_logging.disable_progress_bar()  # histomil draws its own progress
    folder = source.path if source.path.is_dir() else source.path.parent
    if not (folder / "config.json").is_file():
        raise HistomilError(f"{folder}: no config.json; a transformers model ({preset.name}) needs its folder "
                            f"(config.json beside the weights, as in {preset.hf_repo or 'its repository'})")
    try:
        model, loading = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model folder, said in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistomilError(f"{folder}: cannot load the transformers model ({detail[:200]})") from None
    bad = [*loading.get("missing_keys", []), *loading.get("mismatched_keys", [])]
    if bad:
        raise HistomilError(f"{folder}: weights do not fill the model: {len(bad)} missing or mis-shaped (first: {bad[0]})")
    return model.eval()
