"""Which numeric precision the hardware computes fast, and a description of that hardware.

bfloat16 halves the encoder's time only where the device computes it natively: CPUs with
AVX512-BF16 or AMX (AMD Zen 4 and later, Intel Xeon Cooper Lake / Sapphire Rapids and later),
ARM CPUs with the BF16 extension, and CUDA GPUs of compute capability 8.0 or newer. Elsewhere
PyTorch emulates it: on an AVX2-only AMD EPYC (Zen 3) the EfficientNet-Lite0 encoder ran 12-19x
slower in bf16 than in fp32. ``precision="auto"`` (the default everywhere) therefore resolves to
bf16 only on such hardware and to fp32 elsewhere; asking for bf16 on emulating hardware still
works but warns once.

What was resolved is recorded next to the results (:func:`device_description` goes into feature
files and run folders), so two machines that give slightly different numbers can be told apart.
"""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch

from histomil.errors import HistomilError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # fp16: tile encoders on a CUDA GPU only
EMULATED_BF16_SLOWDOWN = "12-19x"  # measured: EfficientNet-Lite0 on an AVX2-only AMD EPYC (Zen 3)


class EmulatedPrecisionWarning(UserWarning):
    """bf16 was asked for on hardware that emulates it (correct, but much slower than fp32)."""


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _cpu_flags() -> frozenset[str]:
    """CPU feature flags (x86 'flags', ARM 'Features'); empty where /proc/cpuinfo has none."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_name() -> str:
    """The CPU model as the OS names it (e.g. 'AMD EPYC 9454P'), or the platform's processor string."""
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_cpu_check(name: str) -> bool:
    """One of torch.cpu's hardware checks (``_is_amx_tile_supported`` ...); False where torch lacks it."""
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 units: a subset of ['AMX', 'AVX512-BF16', 'ARM-BF16'] (empty: emulated)."""
    flags = _cpu_flags()
    units = []
    if _torch_cpu_check("_is_amx_tile_supported") or {"amx_bf16", "amx_tile"} <= flags:
        units.append("AMX")
    if _torch_cpu_check("_is_avx512_bf16_supported") or "avx512_bf16" in flags:
        units.append("AVX512-BF16")
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        units.append("ARM-BF16")
    return units


def native_bf16(device: str | torch.device | None = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (fast) rather than by emulation."""
    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        major, _minor = torch.cuda.get_device_capability(dev)
        return major >= 8
    if dev.type == "cpu":
        return bool(cpu_bf16_units())
    return False  # mps and others: fp32 is the safe choice


def device_description(device: str | torch.device | None = "cpu") -> dict[str, str]:
    """Plain strings naming the device: type, model name, capability, and whether bf16 is native."""
    dev = _device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(dev)
        name, capability = torch.cuda.get_device_name(dev), f"sm_{major}{minor}"
    else:
        units = cpu_bf16_units()
        name = cpu_name()
        capability = "+".join([torch.backends.cpu.get_cpu_capability(), *units])
    return {
        "device": dev.type,
        "device_name": name,
        "device_capability": capability,
        "bf16": "native" if native_bf16(dev) else "emulated",
    }


class PrecisionError(HistomilError, ValueError):
    """A precision that is unknown or that the device cannot run: one line for the user (a HistomilError),
    and a ValueError for callers that validate values."""


def check_precision(requested: str, device: str | torch.device | None = "cpu") -> None:
    """PrecisionError unless ``requested`` is a precision ``device`` can run (fp16: CUDA GPUs only)."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested == "fp16" and _device(device).type != "cuda":
        raise PrecisionError("precision fp16 runs only on a CUDA GPU; use bf16 or fp32 here")


def resolve_precision(requested: str, device: str | torch.device | None = "cpu") -> str:
    """``auto`` -> ``bf16`` where ``device`` computes it natively, else ``fp32``; others unchanged. ``fp16``
    (autocast to float16, for GPUs without bf16 such as the V100 or T4) is refused off a CUDA device.

    Asking for ``bf16`` explicitly on emulating hardware is honoured with an
    :class:`EmulatedPrecisionWarning` that says how much slower it is.
    """
    check_precision(requested, device)
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device):
        desc = device_description(device)
        warnings.warn(
            f"bf16 requested, but this {desc['device']} ({desc['device_name']}, {desc['device_capability']}) has no "
            f"native bf16 and emulates it: expect the encoder to run about {EMULATED_BF16_SLOWDOWN} slower than "
            "fp32 (precision 'auto' picks fp32 here)",
            EmulatedPrecisionWarning,
            stacklevel=2,
        )
    return requested


def run_environment(requested_precision: str, device: str | torch.device | None = "cpu") -> dict[str, object]:
    """What a run folder records in ``environment.json``: the precision asked for and the one used,
    the device, and the library versions, so two machines' numbers can be told apart."""
    from histomil import __version__

    return {
        "precision_requested": requested_precision,
        "precision": resolve_precision(requested_precision, device) if requested_precision == "auto" else requested_precision,
        **device_description(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "histomil": __version__,
        "platform": platform.platform(),
    }
