"""Continuous targets of feature bags: ``targets.csv`` beside the feature files, per task.

Classification bags carry a class (``labels.csv``: ``case,y_true``). Other tasks read a second table,
``targets.csv`` (or a CSV passed explicitly), in the folder of the feature files or of the folder given:

* regression: ``case,target`` (one number per bag, e.g. the tumour fraction of a composed bag);
* survival: ``case,time,event`` (follow-up time and 1 = event observed, 0 = censored).

A histomil feature file may also store its target (``FeatureBag.target``); the CSV must then agree.
:func:`load_task_bags` is what the commands use: the bags of a folder with the targets their task needs;
:func:`read_task_training_folder` is its training form, which may keep the bags in their files
(:mod:`histomil.features.lazy`) with the same targets and the same checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from histomil.data.csv_rows import read_csv_rows
from histomil.errors import HistomilError
from histomil.features.formats import feature_files_any, load_features_folder
from histomil.features.lazy import fits_in_memory, lazy_features_folder, read_training_folder
from histomil.features.store import FeatureBag

TARGET_FILE = "targets.csv"
TARGET_COLUMNS = {"regression": ("target",), "survival": ("time", "event")}


def read_targets_csv(path: str | Path, columns: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``{case: (value, ...)}`` from a CSV with ``case`` and ``columns``; a bad cell is one error line."""
    path = Path(path)
    names, rows = read_csv_rows(path, "targets CSV")
    header = [n.lower() for n in names]
    missing = [c for c in ("case", *columns) if c not in header]
    if missing:
        raise HistomilError(f"{path}: targets CSV has no column {', '.join(missing)} (has: {', '.join(header) or 'none'})")
    out: dict[str, tuple[float, ...]] = {}
    for line, row in rows:
        case = row.get("case", "")
        if not case:
            raise HistomilError(f"{path}: line {line}: empty case id")
        if case in out:
            raise HistomilError(f"{path}: line {line}: case {case} appears more than once")
        out[case] = tuple(_number(row.get(c), path, line, c) for c in columns)
    return out


def _number(cell: str | None, path: Path, line: int, column: str) -> float:
    text = (cell or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise HistomilError(f"{path}: line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise HistomilError(f"{path}: line {line}: {column} is {text}, not a finite number")
    return value


def attach_targets(bags: list[FeatureBag], csv_path: Path, columns: Sequence[str], require: bool = True,
                   shared: bool = False) -> list[FeatureBag]:
    """Set each bag's ``target`` from ``csv_path``; stored targets must agree, every CSV case needs a bag
    (unless the CSV is ``shared`` by several folders, e.g. training and validation) and, with ``require``,
    every bag a target."""
    targets = read_targets_csv(csv_path, columns)
    ids = {b.bag_id for b in bags}
    extra = sorted(c for c in targets if c not in ids)
    if extra and not shared:
        raise HistomilError(f"{csv_path}: {len(extra)} case(s) have no feature file: {_few(extra)}")
    for b in bags:
        if b.bag_id not in targets:
            continue
        value = targets[b.bag_id]
        if b.target is not None and tuple(b.target) != value:
            raise HistomilError(f"bag {b.bag_id}: its feature file stores target {tuple(b.target)}, {csv_path} says {value}")
        b.target = value
    return _check_all(bags, csv_path, require)


def load_task_bags(
    folder: str | Path, task: str = "classification", targets_csv: str | Path | None = None,
    columns: Sequence[str] | None = None, require: bool = True,
) -> list[FeatureBag]:
    """The bags of a feature folder with what ``task`` needs: classes from labels.csv (classification), or
    targets from ``targets_csv`` (default ``targets.csv`` beside the files) or from the files themselves.
    A ``targets_csv`` given may list the cases of other folders too (one table for train and val)."""
    if task == "classification":
        return load_features_folder(folder, require_labels=require)
    check_target_task(task)
    return with_folder_targets(load_features_folder(folder, require_labels=False), folder, task, targets_csv,
                               columns, require)


def check_target_task(task: str) -> None:
    """Refuse a task that has no targets table (one error line naming the tasks)."""
    if task not in TARGET_COLUMNS:
        raise HistomilError(f"unknown task {task!r}; use classification, regression or survival")


def with_folder_targets(
    bags: list[FeatureBag], folder: str | Path, task: str, targets_csv: str | Path | None = None,
    columns: Sequence[str] | None = None, require: bool = True,
) -> list[FeatureBag]:
    """The bags just read from ``folder`` (in memory or lazy: only ids and stored targets are used) with
    ``task``'s targets, found and checked as :func:`load_task_bags` does."""
    columns = tuple(c.lower() for c in (columns or TARGET_COLUMNS[task]))
    shared = targets_csv is not None
    if targets_csv is None:
        folder = Path(folder)
        places = (folder, feature_files_any(folder)[0].parent)
        targets_csv = next((d / TARGET_FILE for d in places if (d / TARGET_FILE).is_file()), None)
    if targets_csv is not None:
        return attach_targets(bags, Path(targets_csv), columns, require, shared=shared)
    return _check_all(bags, Path(folder) / TARGET_FILE, require)


def read_task_training_folder(
    folder: str | Path, task: str = "classification", targets_csv: str | Path | None = None,
    stream: str = "auto", processes: int = 1,
) -> list[FeatureBag]:
    """The training bags of a feature folder for ``task``, read as
    :func:`histomil.features.lazy.read_training_folder` reads them (``stream`` off: in memory; on: lazy,
    only the bags being trained on in memory; auto: lazy, loaded when ``processes`` copies fit in memory), with the
    targets and checks of :func:`load_task_bags` (a regression / survival target travels on the lazy bag)."""
    if task == "classification":
        return read_training_folder(folder, stream, processes=processes)
    check_target_task(task)
    if stream not in ("auto", "on", "off"):
        raise HistomilError(f"stream must be auto, on or off, not {stream!r}")
    if stream == "off":
        return load_task_bags(folder, task, targets_csv)
    bags = with_folder_targets(lazy_features_folder(folder, require_labels=False), folder, task, targets_csv)  # type: ignore[arg-type]
    if stream == "auto" and fits_in_memory(bags, processes):
        return [b.load() for b in bags]  # type: ignore[attr-defined]
    return bags


def _check_all(bags: list[FeatureBag], where: Path, require: bool) -> list[FeatureBag]:
    if require:
        missing = [b.bag_id for b in bags if b.target is None]
        if missing:
            raise HistomilError(f"{where}: {len(missing)} feature file(s) have no target: {_few(missing)}")
    return bags


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
