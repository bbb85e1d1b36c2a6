"""Small helpers shared by the benchmark scripts: atomic text/JSON output, a machine description and
a seeded pick of distinct real tiles."""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histomil.files import atomic_write


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


def size_cells(rows: list[dict], key: str, name: str, mode: str, sizes: list[int], ok: Callable[[dict], str]) -> list[str]:
    """One row of a bag-size table: ``ok(row)`` where the (name, mode, N) measurement succeeded, its
    status where it was skipped or failed, and a dash where there is none."""
    cells = []
    for n in sizes:
        r = next((r for r in rows if r[key] == name and r["mode"] == mode and r["n"] == n), None)
        cells.append("—" if r is None else ok(r) if r["status"] == "ok" else str(r["status"]))
    return cells


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One histomil training step on bag ``x``: forward (labels go to models that take them), the
    trainer's bag loss, backward, optimizer step."""
    from histomil.training.common import bag_loss, takes_labels

    model.train()
    out = model(x, None, y=y) if takes_labels(model) else model(x)
    loss = bag_loss(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pick_tiles(data: Path, n: int, seed: int) -> list[Path]:
    """``n`` EBHI tiles with distinct contents, a seeded random pick from ``data``/tiles.csv."""
    from histomil.data.images import file_digest
    from histomil.errors import HistomilError

    table = data / "tiles.csv"
    if not table.is_file():
        raise HistomilError(f"{table}: not found (--data must be the EBHI folder with tiles.csv)")
    with open(table, newline="") as fh:
        paths = [data / row["path"] for row in csv.DictReader(fh)]
    out, seen = [], set()
    for i in np.random.default_rng(seed).permutation(len(paths)):
        digest = file_digest(paths[i])
        if digest not in seen:
            seen.add(digest)
            out.append(paths[i])
            if len(out) == n:
                return out
    raise HistomilError(f"{table}: only {len(out)} distinct tiles, {n} asked for")
