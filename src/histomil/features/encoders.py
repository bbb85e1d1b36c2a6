"""Pretrained tile encoders: uint8 RGB tiles in, one embedding per tile out.

A :class:`TileEncoder` wraps a backbone with the preprocessing it was trained with (input size,
normalisation) and records both in an :class:`EncoderInfo`, which goes into every feature file
and checkpoint so that features from different encoders or preprocessing are never mixed.
Encoders are built by name from :data:`ENCODERS` via :func:`build_encoder`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import EfficientNetLite0, load_pretrained_lite0
from histomil.hardware import device_description, resolve_precision
from histomil.runtime import flush_denormals, keep_freed_memory

PRECISIONS = ("fp32", "bf16")  # what a TileEncoder runs in; build_encoder also takes "auto"


@dataclass(frozen=True)
class EncoderInfo:
    """What a feature vector means: which encoder, at what input size and normalisation."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values (str, int, list of float) that JSON and HDF5 attributes accept."""
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
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

        Tiles whose size is not S x S are resized (bilinear, antialiased) to S x S.
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
        s = self.info.input_size
        if x.shape[0] and x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
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


def build_encoder(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
) -> TileEncoder:
    """Build a registered encoder by name (in eval mode, on the CPU).

    ``precision="auto"`` is bf16 where the CPU computes it natively and fp32 elsewhere
    (:func:`histomil.hardware.resolve_precision`); the encoder's ``precision`` is the resolved one.
    """
    factory = ENCODERS.get(name)
    if factory is None:
        raise HistomilError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    try:
        resolved = resolve_precision(precision, "cpu")
    except ValueError as exc:
        raise HistomilError(str(exc)) from None
    return factory(pretrained=pretrained, precision=resolved, channels_last=channels_last)
