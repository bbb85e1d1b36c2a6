"""Where networks run: ``--device cpu|cuda|cuda:N|auto`` for every command that runs one.

One place turns the option into a ``torch.device`` (:func:`resolve_device`: ``auto`` is the first CUDA
GPU when there is one, else the CPU; a GPU asked for but absent is one clear error), moves tile
batches to it (:func:`to_device`: pinned host memory and an asynchronous copy on CUDA, a plain
``.to`` on the CPU) and says what ran (:func:`device_record`: device, its name, the precision), so
run folders and feature files record it. On the CPU every path behaves as before devices existed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from histomil.errors import HistomilError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
DEVICE_HELP = "Where the network runs: cpu, cuda, cuda:N or auto (a CUDA GPU when there is one, else the CPU)."


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> torch.device; HistomilError for an unknown name, a GPU
    asked for on a machine without CUDA, or ``cuda:N`` beyond the GPUs there are."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise HistomilError(f"unknown device {name!r}; use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise HistomilError(f"unknown device {name!r}; use {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HistomilError(f"device {name!r} requested but no CUDA GPU is available (torch {torch.__version__}, "
                                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise HistomilError(f"device {name!r} requested but this machine has {count} CUDA GPU(s): "
                                f"cuda:0 to cuda:{count - 1}")
    return device


def check_device_name(name: str) -> str:
    """A config validator: the name must be a device spelling (availability is checked when it is used)."""
    if name == "auto" or name == "cpu" or name == "cuda":
        return name
    prefix, _, index = name.partition(":")
    if prefix == "cuda" and index.isdigit():
        return name
    raise ValueError(f"unknown device {name!r}; use {DEVICE_CHOICES}")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``: through pinned memory and a non-blocking copy to a GPU, so
    the copy overlaps the GPU's work; unchanged on the CPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory (so a smaller batch may fit)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def device_record(device: torch.device | str, precision: str) -> dict[str, str]:
    """What a run records about where it ran: ``device`` (e.g. ``cuda:0``), ``device_name`` (the GPU as
    torch names it, or the CPU model) and ``precision`` (the resolved one: fp32 or bf16)."""
    from histomil.hardware import device_description

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"device": str(dev), "device_name": device_description(dev)["device_name"], "precision": precision}


@contextmanager
def compute_precision(device: torch.device, precision: str) -> Iterator[None]:
    """Run a network's forward pass in ``precision`` on ``device``: ``bf16`` (``fp16``) autocasts to bfloat16
    (float16); ``fp32`` is IEEE float32 on a GPU too, where cuDNN convolutions would otherwise run in TF32 (a 10-bit mantissa, the
    default on Ampere and later GPUs), so fp32 features from a GPU match the CPU's up to summation order."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device_type=device.type, dtype=half or torch.bfloat16, enabled=half is not None):
        if device.type != "cuda" or precision != "fp32":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
