"""The table of labelled tiles a study is composed from, and its patient-grouped split.

:func:`read_tile_table` reads ``path,label,patient[,split]`` CSVs (one-line errors naming the file,
row and column), :meth:`TileTable.digest` / :meth:`TileTable.content_digest` fingerprint the table and
the tile bytes for resumable steps, and :func:`assign_patients` puts every patient in exactly one of
train / val / test, balancing tumour and non-tumour patients.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomil.errors import HistomilError

SPLITS = ("train", "val", "test")


@dataclass
class TileTable:
    """Labelled tiles read from a CSV; rows with an empty label are excluded (and counted)."""

    source: Path  # the CSV, for error messages
    paths: list[str]  # absolute tile paths
    labels: np.ndarray  # (N,) int, 1 = tumour (witness), 0 = non-tumour
    patients: list[str]
    splits: list[str] | None = None  # per row train/val/test when the CSV fixes the split
    lines: list[int] | None = None  # CSV line number of each row (header = line 1)
    n_excluded: int = 0  # rows with an empty label

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """Hash of what composing reads from the table (paths, labels, patients, splits), recorded in
        study.json so a run can tell that the table changed since its bags were drawn."""
        h = hashlib.sha256()
        for row in zip(self.paths, self.labels.tolist(), self.patients, self.splits or [""] * len(self.paths)):
            h.update(("\t".join(map(str, row)) + "\n").encode())
        return h.hexdigest()

    def content_digest(self) -> str:
        """:meth:`digest` plus the bytes of every tile: what a finished result depends on, so a tile image
        replaced under an unchanged table is noticed (a missing tile hashes as missing)."""
        h = hashlib.sha256(self.digest().encode())
        for path in self.paths:
            try:
                with open(path, "rb") as fh:
                    h.update(hashlib.sha256(fh.read()).digest())
            except OSError:
                h.update(b"missing")
        return h.hexdigest()

    def patient_counts(self) -> dict[str, tuple[int, int]]:
        """patient -> (tumour tiles, non-tumour tiles)."""
        out: dict[str, list[int]] = {}
        for patient, label in zip(self.patients, self.labels.tolist()):
            c = out.setdefault(patient, [0, 0])
            c[0 if label == 1 else 1] += 1
        return {p: (c[0], c[1]) for p, c in out.items()}


_EMPTY = {"", "nan", "na", "none", "null"}
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_tile_table(
    csv_path: str | Path,
    path_col: str = "path",
    label_col: str = "tumor",
    patient_col: str = "case_id",
    split_col: str | None = None,
    check_files: bool = True,
) -> TileTable:
    """Read a tile table: one row per tile with its path, 0/1 label and patient id.

    Paths are taken relative to the CSV's folder unless absolute. An empty label excludes the row
    (counted in ``n_excluded``). With ``split_col`` the table fixes each row's split (train/val/test).
    """
    csv_path = Path(csv_path)
    base = os.path.abspath(csv_path.parent)
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise HistomilError(f"{csv_path}: cannot read tile table ({exc.strerror or exc})") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        wanted = [path_col, label_col, patient_col] + ([split_col] if split_col else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise HistomilError(
                f"{csv_path}: missing column(s) {', '.join(repr(c) for c in missing)}"
                f" (columns: {', '.join(header) if header else 'none, the file is empty'})"
            )
        paths: list[str] = []
        labels: list[int] = []
        patients: list[str] = []
        splits: list[str] = []
        lines: list[int] = []
        seen: dict[str, int] = {}
        excluded = 0
        try:
            for row in reader:
                line = reader.line_num
                raw_label = (row.get(label_col) or "").strip()
                low = raw_label.lower()
                if low in _EMPTY:
                    excluded += 1
                    continue
                if low in _TRUE:
                    label = 1
                elif low in _FALSE:
                    label = 0
                else:
                    raise HistomilError(
                        f"{csv_path} line {line}: column {label_col!r} must be 0 or 1"
                        f" (empty excludes the tile), got {raw_label!r}"
                    )
                rel = (row.get(path_col) or "").strip()
                if not rel:
                    raise HistomilError(f"{csv_path} line {line}: empty {path_col!r}")
                patient = (row.get(patient_col) or "").strip()
                if not patient:
                    raise HistomilError(f"{csv_path} line {line}: empty patient id in column {patient_col!r}")
                full = os.path.normpath(os.path.join(base, os.path.expanduser(rel)))
                if full in seen:
                    raise HistomilError(f"{csv_path} line {line}: tile {rel} is listed twice (also line {seen[full]})")
                seen[full] = line
                if split_col:
                    raw_split = (row.get(split_col) or "").strip()
                    split = _SPLIT_NAMES.get(raw_split.lower())
                    if split is None:
                        raise HistomilError(
                            f"{csv_path} line {line}: column {split_col!r} must be train, val or test, got {raw_split!r}"
                        )
                    splits.append(split)
                paths.append(full)
                labels.append(label)
                patients.append(patient)
                lines.append(line)
        except csv.Error as exc:
            raise HistomilError(f"{csv_path} line {reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError:
            raise HistomilError(f"{csv_path}: not a UTF-8 text CSV") from None
    if not paths:
        raise HistomilError(f"{csv_path}: no labelled tiles ({excluded} row(s) with an empty {label_col!r})")
    if check_files:
        absent = [(p, ln) for p, ln in zip(paths, lines) if not os.path.isfile(p)]
        if absent:
            p, ln = absent[0]
            more = f" and {len(absent) - 1} other tile file(s)" if len(absent) > 1 else ""
            raise HistomilError(f"{csv_path} line {ln}: tile file {p} does not exist{more}")
    return TileTable(
        source=csv_path,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        splits=splits if split_col else None,
        lines=lines,
        n_excluded=excluded,
    )


# --------------------------------------------------------------------------------------------
# Patient split
# --------------------------------------------------------------------------------------------


def assign_patients(table: TileTable, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, str]:
    """Map each patient to "train", "val" or "test".

    If the table has a split column, that is used (a patient with rows in two splits is refused).
    Otherwise patients are shuffled (seeded) and each is given, greedily, to the split whose
    tumour and non-tumour tile counts are furthest below their targets (fraction x total), so
    each split gets roughly its fraction of both classes. Splits with fraction 0 get nobody.
    """
    if table.splits is not None:
        out: dict[str, str] = {}
        first_line: dict[str, int] = {}
        lines = table.lines or [0] * len(table)
        for patient, split, line in zip(table.patients, table.splits, lines):
            prev = out.setdefault(patient, split)
            first_line.setdefault(patient, line)
            if prev != split:
                raise HistomilError(
                    f"{table.source} line {line}: patient {patient} is in split {split!r}"
                    f" but also in {prev!r} (line {first_line[patient]}); a patient must stay in one split"
                )
        return out

    fr = np.asarray(list(fractions), dtype=float)
    if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise HistomilError(
            f"{table.source}: split fractions must be three numbers >= 0 summing to 1, got {list(fractions)}"
        )
    counts = table.patient_counts()
    patients = sorted(counts)
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(patients))
    totals = np.array([sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())], dtype=float)
    scale = np.maximum(totals, 1.0)
    target = fr[:, None] * totals[None, :]  # (split, class)
    have = np.zeros((3, 2))
    allowed = [s for s in range(3) if fr[s] > 0]
    out = {}
    for idx in order:
        patient = patients[idx]
        add = np.asarray(counts[patient], dtype=float)
        best, best_cost = allowed[0], math.inf
        for s in allowed:
            # change in the squared (relative) distance to target if this patient joins split s
            before = ((have[s] - target[s]) / scale) ** 2
            after = ((have[s] + add - target[s]) / scale) ** 2
            cost = float((after - before).sum())
            if cost < best_cost - 1e-12:
                best, best_cost = s, cost
        have[best] += add
        out[patient] = SPLITS[best]
    return out
