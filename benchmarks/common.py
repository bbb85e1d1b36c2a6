"""Small helpers shared by the benchmark scripts: atomic text/JSON output and a machine description."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from histomil.features.store import atomic_write


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, then rename)."""
    with atomic_write(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU count, load, torch version and threads."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
