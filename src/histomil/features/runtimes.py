"""Which program runs a tile encoder's network on the CPU: PyTorch, or OpenVINO / ONNX Runtime.

The same EfficientNet-Lite0 graph runs faster on a CPU under an inference runtime that fuses
its layers and picks kernels for the exact shapes (``benchmarks/cpu_encoders.py``; the numbers
and the decision are in ``benchmarks/RESULTS.md``). :func:`with_runtime` wraps a
:class:`~histomil.features.encoders.TileEncoder` in a :class:`RuntimeEncoder` that behaves like
it (``info``, ``precision``, ``preprocess``, ``encode``, ``feature_attrs``) and adds ``runtime``,
so extraction code needs no branching. The torch graph is converted in memory when the encoder is
built (a few seconds, nothing downloaded); preprocessing stays the encoder's own torch code.

Runtimes:

* ``torch``: the :class:`TileEncoder` itself (any precision, any device).
* ``openvino``: OpenVINO's CPU plugin, fp32 (``pip install 'histomil[cpu]'``). Its inference
  precision is pinned to f32: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run bf16.
* ``onnxruntime``: ONNX Runtime's CPU execution provider, fp32 (``pip install onnxruntime onnx``;
  torch's ONNX exporter needs ``onnx``); ``auto`` does not pick it (slower than OpenVINO here).
* ``auto`` (the default): :data:`AUTO_RUNTIME` when it is installed, the encoder runs on the CPU
  and its (resolved) precision is fp32; torch otherwise (bf16 stays with torch's autocast).

The runtime used is recorded in every feature file (``feature_attrs()["runtime"]``) and in the
tile-feature cache identity (:meth:`FeatureCache.for_encoder`), so features from different runtimes
are never silently mixed. Both alternative runtimes match torch fp32 to within
:data:`FEATURE_TOLERANCE` of the feature scale (measured: about 1e-5 absolute on features up to ~6).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from histomil.errors import HistomilError
from histomil.features.encoders import encode_in_batches

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
AUTO_RUNTIME = "openvino"  # the fastest fp32 runtime measured on CPU (benchmarks/RESULTS.md)
AUTO_ENCODERS = ("efficientnet_lite0",)  # the encoders AUTO_RUNTIME was measured to speed up (2.75x); not ViTs
FEATURE_TOLERANCE = 1e-4  # max |alternative - torch fp32| / max |torch fp32| that the tests hold runtimes to
_MODULES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx")}  # onnx: torch's ONNX exporter needs it
_INSTALL = {"openvino": "pip install 'histomil[cpu]' (or: pip install openvino)", "onnxruntime": "pip install onnxruntime onnx"}

Infer = Callable[[np.ndarray], np.ndarray]


def runtime_installed(runtime: str) -> bool:
    """Whether the Python packages of an alternative runtime can be imported (``torch``: always)."""
    if runtime == "torch":
        return True
    try:
        return all(importlib.util.find_spec(module) is not None for module in _MODULES[runtime])
    except (KeyError, ImportError, ValueError):
        return False


def runtime_of(encoder: object) -> str:
    """The runtime an encoder runs on (``torch`` for a plain TileEncoder)."""
    return str(getattr(encoder, "runtime", "torch"))


def encoder_device(encoder: nn.Module) -> str:
    """The device type (``cpu``, ``cuda`` ...) an encoder's tensors live on."""
    for tensor in (*encoder.buffers(), *encoder.parameters()):
        return tensor.device.type
    return "cpu"


def resolve_runtime(runtime: str, precision: str, device: str = "cpu") -> str:
    """``auto`` -> :data:`AUTO_RUNTIME` for fp32 on the CPU when installed, else ``torch``.

    An explicit alternative runtime that cannot serve (not installed, not fp32, not the CPU) is an
    error that says why, not a silent fallback.
    """
    if runtime not in RUNTIMES:
        raise HistomilError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        usable = device == "cpu" and precision == "fp32" and runtime_installed(AUTO_RUNTIME)
        return AUTO_RUNTIME if usable else "torch"
    if runtime == "torch":
        return runtime
    if precision != "fp32":
        raise HistomilError(f"runtime {runtime} runs fp32 only, not {precision}; use --precision fp32 or --runtime torch")
    if device != "cpu":
        raise HistomilError(f"runtime {runtime} runs on the CPU only, not {device}; use --runtime torch")
    if not runtime_installed(runtime):
        raise HistomilError(f"runtime {runtime} is not installed ({_INSTALL[runtime]}); or use --runtime torch")
    return runtime


def with_runtime(encoder: nn.Module, runtime: str = "auto", threads: int | None = None) -> nn.Module:
    """``encoder`` (a TileEncoder) run by ``runtime``: itself for torch, else a :class:`RuntimeEncoder`.

    ``auto`` picks an alternative runtime only for the encoders it was measured to speed up
    (:data:`AUTO_ENCODERS`): for a ViT it gained nothing (OpenVINO 1.03x on ViT-S/16, RESULTS.md
    section 10) and converting a ViT-L/g would cost minutes and a second copy of its weights.
    """
    if runtime == "auto" and getattr(getattr(encoder, "info", None), "name", None) not in AUTO_ENCODERS:
        runtime = "torch"
    resolved = resolve_runtime(runtime, str(getattr(encoder, "precision", "fp32")), encoder_device(encoder))
    if resolved == "torch":
        return encoder
    return RuntimeEncoder(encoder, resolved, threads=threads)


class _Features(nn.Module):
    """The part that is converted: normalised pixels (B, 3, S, S) -> pooled features (B, D)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


def _graph(encoder: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    s = int(encoder.info.input_size)  # type: ignore[attr-defined]
    return _Features(encoder.backbone).eval(), torch.zeros(2, 3, s, s)  # type: ignore[arg-type]


def openvino_infer(encoder: nn.Module, threads: int) -> tuple[Infer, str]:
    """OpenVINO CPU inference of ``encoder``'s backbone in f32, batch size free; and how it was converted."""
    import openvino as ov

    module, example = _graph(encoder)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about a fixed-size graph
        try:  # torch.export: the supported route (TorchScript tracing is deprecated in torch)
            program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            model, how = ov.convert_model(program), "torch.export"
        except Exception:  # noqa: BLE001 - any export failure: fall back to OpenVINO's own tracing
            s = example.shape[-1]
            model = ov.convert_model(module, example_input=example, input=[ov.PartialShape([-1, 3, s, s])])
            how = "trace"
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

    def infer(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer([x])[0], dtype=np.float32, copy=True)

    return infer, how


def onnxruntime_infer(encoder: nn.Module, threads: int) -> tuple[Infer, str]:
    """ONNX Runtime (CPU execution provider) inference of ``encoder``'s backbone, exported in memory."""
    import onnxruntime as ort

    module, example = _graph(encoder)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def infer(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": x})[0].astype(np.float32, copy=False)

    return infer, "torch.onnx (TorchScript)"


_BACKENDS: dict[str, Callable[[nn.Module, int], tuple[Infer, str]]] = {
    "openvino": openvino_infer,
    "onnxruntime": onnxruntime_infer,
}


class RuntimeEncoder(nn.Module):
    """A TileEncoder whose network runs under OpenVINO or ONNX Runtime (fp32, CPU).

    Same interface as :class:`~histomil.features.encoders.TileEncoder`: ``info``, ``precision``,
    ``preprocess`` (the wrapped encoder's), ``forward`` (normalised pixels -> float32 features),
    ``encode`` and ``feature_attrs``; plus ``runtime`` and ``conversion`` (how the graph was made).
    ``threads`` (default: torch's intra-op thread count when built) is the runtime's thread count.
    """

    def __init__(self, encoder: nn.Module, runtime: str, threads: int | None = None) -> None:
        super().__init__()
        if runtime not in _BACKENDS:
            raise HistomilError(f"RuntimeEncoder runs {', '.join(_BACKENDS)}, not {runtime!r}")
        precision = str(getattr(encoder, "precision", "fp32"))
        if precision != "fp32":
            raise HistomilError(f"runtime {runtime} runs fp32 only, not {precision}")
        self.encoder = encoder.eval()
        self.info = encoder.info
        self.precision = "fp32"
        self.channels_last = False
        self.runtime = runtime
        self.threads = int(threads or torch.get_num_threads())
        try:
            self._infer, self.conversion = _BACKENDS[runtime](encoder, self.threads)
        except ImportError as exc:
            raise HistomilError(f"runtime {runtime} is not installed ({_INSTALL[runtime]}): {exc}") from None

    def preprocess(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (H, W, 3) RGB -> float32 (B, 3, S, S) normalised, NCHW contiguous."""
        return self.encoder.preprocess(tiles).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, dim) float32 pooled embeddings."""
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        if arr.shape[0] == 0:
            return torch.zeros((0, self.info.dim), dtype=torch.float32)
        return torch.from_numpy(self._infer(arr))

    def feature_attrs(self) -> dict[str, Any]:
        """The wrapped encoder's feature-file attributes, with this runtime."""
        return {**self.encoder.feature_attrs(), "runtime": self.runtime}

    def encode(self, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 tiles (B, H, W, 3) -> (B, dim) float32 embeddings."""
        return encode_in_batches(self, tiles, batch_size)

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, conversion={self.conversion}, threads={self.threads}"
