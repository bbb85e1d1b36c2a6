"""Process-wide settings that make CNN work on the CPU faster.

glibc's malloc serves every buffer above its mmap threshold (at most 32 MB by default) with a fresh
``mmap`` and returns it to the system on ``free``. A CNN forward pass over a batch of tiles allocates
and frees activation buffers of tens to hundreds of MB per layer, so each batch maps new zeroed pages
and page-faults through them: measured on this project's 2-core machine, half of the encoder's CPU
time went to the kernel (1.3 million page faults per 192 tiles). Keeping freed memory in the heap
(a high mmap and trim threshold) removes that: 2.4x less CPU per tile, identical outputs. The price
is that the process keeps its peak heap until it exits, which suits batch jobs (extraction, training).
Set ``HISTOMIL_KEEP_MALLOC=1`` to leave the allocator as it is.

Denormal (subnormal) floats, the values below ~1e-38 in float32, take a slow microcode path on
many x86 CPUs. Once a model's loss saturates, gradients, Adam moments and attention weights drift
into that range and late training epochs can become several times slower. :func:`flush_denormals`
makes the CPU treat them as zero (flush-to-zero / denormals-are-zero); every training and inference
path of histomil calls it. Only values that small change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger single buffers still come from mmap
_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large buffers instead of unmapping them; True when in effect.

    Idempotent and cheap after the first call; a no-op (False) off Linux/glibc or when
    ``HISTOMIL_KEEP_MALLOC=1``.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or os.environ.get("HISTOMIL_KEEP_MALLOC") == "1":
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _tuned


def flush_denormals() -> bool:
    """Treat denormal floats as zero on the CPU (``torch.set_flush_denormal(True)``); True when supported.

    The setting belongs to a thread (x86 MXCSR): the calling thread, and the threads and processes
    it starts later (torch's intra-op pool is created at the first parallel op, DataLoader workers
    per epoch), which inherit it. Pool threads started before the call keep their setting, which is
    why training and inference call this on entry, before building models. Cheap; it stays on.
    """
    import torch  # here, so importing histomil.runtime stays light

    return bool(torch.set_flush_denormal(True))
