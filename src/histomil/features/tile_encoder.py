"""The tile encoder: uint8 RGB tiles in, one embedding per tile out, with the preprocessing it was trained with.

A :class:`TileEncoder` wraps a backbone (anything with ``forward_features`` returning (B, dim)) with
its preprocessing (input size, resize and crop, normalisation) and records both in an
:class:`EncoderInfo`, which goes into every feature file and checkpoint so that features from
different encoders, weights or preprocessing are never mixed. :mod:`histomil.features.encoders`
builds them by name.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histomil.devices import compute_precision, is_out_of_memory, to_device
from histomil.errors import HistomilError
from histomil.hardware import device_description
from histomil.runtime import flush_denormals, keep_freed_memory

PRECISIONS = ("fp32", "bf16", "fp16")  # what a TileEncoder runs in; build_encoder also takes "auto"
INTERPOLATIONS = ("bilinear", "bicubic")


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
        x = to_device(torch.from_numpy(arr), self._mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[0]:
            x = resize_and_crop(x, self.info)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, dim) float32 pooled embeddings."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with compute_precision(x.device, self.precision):
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


@torch.no_grad()
def encode_in_batches(encoder: Any, tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 tiles (B, H, W, 3) or (H, W, 3) -> (B, dim) float32: ``encoder(encoder.preprocess(batch))``
    batch by batch. Shared by :class:`TileEncoder` and the other CPU runtimes (:mod:`.runtimes`). A GPU out of
    memory retries in halves; features that are not finite (float16 overflow, a broken network) are an error."""
    if batch_size < 1:
        raise HistomilError(f"batch size must be at least 1, got {batch_size}")
    arr = np.asarray(tiles)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[0] == 0 and arr.dtype == np.uint8:
        return np.zeros((0, encoder.info.dim), dtype=np.float32)
    keep_freed_memory()  # 2.4x less CPU per tile on glibc (see histomil.runtime)
    flush_denormals()
    out: list[torch.Tensor] = []
    start = 0
    while start < len(arr):
        try:
            out.append(encoder(encoder.preprocess(arr[start : start + batch_size])).cpu())
        except Exception as exc:  # a GPU out of memory: the same tiles again in halves, same features
            if batch_size == 1 or not is_out_of_memory(exc):
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            warnings.warn(f"the GPU ran out of memory: encoding in batches of {batch_size}", stacklevel=2)
            continue
        start += batch_size
    feats = torch.cat(out)
    bad = int((~torch.isfinite(feats).all(dim=1)).sum())
    if bad:  # never written: a feature file or cache holding inf/NaN would poison every model trained on it
        precision = getattr(encoder, "precision", "fp32")
        hint = "; float16 overflows in some networks: use --precision bf16 or fp32" if precision == "fp16" else ""
        raise HistomilError(f"encoder {encoder.info.name!r} ({precision}) gave non-finite features for {bad} of "
                            f"{len(feats)} tiles{hint}")
    return feats.numpy().astype(np.float32, copy=False)
