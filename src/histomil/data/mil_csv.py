"""Read the classical MIL benchmark CSV format (Musk1, Musk2, Elephant, Fox, Tiger, ...).

Format: no header; one row per instance; column 0 = bag label (0 or 1, repeated on every row of the
bag), column 1 = bag id, columns 2.. = the instance's numeric features. Rows of a bag need not be
contiguous. Each bag becomes a :class:`FeatureBag` (features float32, ``tile_paths`` naming the
source line of each instance), in order of first appearance, so the MIL models and the trainer
can use these benchmarks like any cached feature bags.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag


def load_mil_csv(path: str | Path) -> list[FeatureBag]:
    """The bags of a classical MIL CSV file; any malformed input -> one-line HistomilError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HistomilError(f"{path}: not a text CSV file (cannot decode as UTF-8)") from None
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read MIL CSV ({exc.strerror or exc})") from None
    labels: dict[str, int] = {}
    rows: dict[str, list[list[float]]] = {}
    lines: dict[str, list[str]] = {}
    n_cols: int | None = None
    try:
        for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            where = f"{path}:{lineno}"
            if len(row) < 3:
                raise HistomilError(f"{where}: expected label, bag id and at least one feature, got {len(row)} column(s)")
            if n_cols is None:
                n_cols = len(row)
            elif len(row) != n_cols:
                raise HistomilError(f"{where}: ragged row with {len(row)} columns, earlier rows have {n_cols}")
            label = _label(row[0], where)
            bag_id = row[1].strip()
            if not bag_id:
                raise HistomilError(f"{where}: empty bag id (column 2)")
            if bag_id in labels and labels[bag_id] != label:
                raise HistomilError(
                    f"{where}: bag {bag_id!r} has label {label} here but {labels[bag_id]} on earlier rows (must be constant in a bag)"
                )
            labels.setdefault(bag_id, label)
            rows.setdefault(bag_id, []).append(_features(row, where))
            lines.setdefault(bag_id, []).append(f"{path.name}:{lineno}")
    except csv.Error as exc:
        raise HistomilError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise HistomilError(f"{path}: empty MIL CSV file (no instance rows)")
    return [
        FeatureBag(
            bag_id=bag_id,
            features=np.asarray(feats, dtype=np.float32),
            tile_paths=lines[bag_id],
            label=labels[bag_id],
            attrs={"source": str(path), "format": "mil-csv"},
        )
        for bag_id, feats in rows.items()
    ]


def _label(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise HistomilError(f"{where}: bag label must be 0 or 1, got {text.strip()!r} (column 1)")
    return int(value)


def _features(row: list[str], where: str) -> list[float]:
    values = []
    for col, text in enumerate(row[2:], start=3):
        try:
            value = float(text)
        except ValueError:
            raise HistomilError(f"{where}: non-numeric feature {text.strip()!r} in column {col}") from None
        if not math.isfinite(value):
            raise HistomilError(f"{where}: non-finite feature {text.strip()!r} in column {col}")
        values.append(value)
    return values
