"""The fold loop of a cross-validation, resumable: what the tile study and the cohort share.

A fold is finished when its ``metrics.json`` exists; it is written last (atomically), so a run killed
at any moment leaves either a finished fold or one that is redone from the start (training itself
resumes from its ``last.pt``). Before any fold runs, the output folder is checked against the
settings (:func:`check_settings`, via :func:`histomil.config.changed_since_record`), the inputs
(:func:`check_inputs`: digests of the table and data) and each seed's patient folds
(:func:`check_folds`): a changed one is refused, naming what changed, instead of mixing results.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from histomil.callbacks import Log
from histomil.config import changed_since_record
from histomil.errors import HistomilError
from histomil.evaluation.splitting import check_no_leak, roles_of
from histomil.files import write_json

FOLD_DONE = "metrics.json"


def check_settings(out_dir: Path, model: type[BaseModel], cfg_json: Mapping[str, Any],
                   resumable: Collection[tuple[str, ...]]) -> None:
    """Refuse to resume ``out_dir`` when a setting outside ``resumable`` differs from its config.json."""
    changed = changed_since_record(out_dir / "config.json", model, cfg_json, resumable,
                                   "{path}: unreadable; not a cross-validation folder, or a damaged one")
    if changed:
        raise HistomilError(
            f"{out_dir}: was made with a different config ({'.'.join(changed[0])} changed);"
            " use another output folder, or restore the old setting to resume"
        )


def check_inputs(out_dir: Path, digests: Mapping[str, str], what: Mapping[str, str],
                 notes: Mapping[str, Any] | None = None) -> None:
    """Record the inputs' digests in ``inputs.json`` and refuse a folder made from other inputs.

    ``digests``: name -> digest (e.g. ``cohort_digest``); ``what``: name -> how to say it changed
    (e.g. "cohort.csv: the cohort table changed"). Digests the record lacks are added (a folder made
    before a digest was recorded gains it), with ``notes`` (recorded, never compared: e.g. the table's path).
    """
    path = out_dir / "inputs.json"
    recorded: dict[str, Any] = {}
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError):
            raise HistomilError(f"{path}: unreadable; not a cross-validation folder, or a damaged one") from None
        for name, digest in digests.items():
            if name in recorded and recorded[name] != digest:
                raise HistomilError(
                    f"{what.get(name, name + ' changed')} since {out_dir} was made;"
                    " use another output folder, or restore the inputs to resume"
                )
    if any(recorded.get(k) != v for k, v in digests.items()):
        write_json(path, {**dict(notes or {}), **recorded, **digests})


def check_folds(path: Path, record: Mapping[str, Any], source: str) -> None:
    """Write a seed's folds (``folds.json``) or, on resume, refuse folds that differ from the recorded ones."""
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise HistomilError(f"{path}: unreadable; not a cross-validation folder, or a damaged one") from None
        if old != json.loads(json.dumps(record)):
            raise HistomilError(
                f"{path}: the patient folds differ from the ones this folder was made with (was {source} changed?);"
                " use another output folder"
            )
    else:
        write_json(path, record)


def fold_finished(fold_dir: Path) -> bool:
    return (fold_dir / FOLD_DONE).exists()


def run_fold(fold_dir: Path, name: str, work: Callable[[], dict[str, Any]], log: Log,
             after: Callable[[], None] | None = None) -> dict[str, Any]:
    """The fold's record: read back when the fold finished earlier ("finished earlier, skipped"), else
    ``work()`` runs and its record is written to ``metrics.json`` last; ``after()`` then tidies up."""
    path = fold_dir / FOLD_DONE
    if path.exists():
        log(f"{name}: finished earlier, skipped")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise HistomilError(f"{path}: unreadable; delete it to redo {name}") from None
    fold_dir.mkdir(parents=True, exist_ok=True)
    record = work()
    write_json(path, record)  # written last: its presence marks the fold finished
    if after is not None:
        after()
    return json.loads(path.read_text(encoding="utf-8"))


def run_training_fold(fold_dir: Path, name: str, work: Callable[[], tuple[dict[str, Any], Path, str]], log: Log) -> dict[str, Any]:
    """:func:`run_fold` for a fold that trains one model: ``work()`` returns (the fold's record, the training
    state it resumed from, ``last.pt``, and the fold's log line); once the record is written the training
    state is removed (``model.pt`` and ``history.csv`` stay) and the line logged."""
    done: dict[str, Any] = {}

    def record() -> dict[str, Any]:
        rec, done["last"], done["line"] = work()
        return rec

    def after() -> None:
        done["last"].unlink(missing_ok=True)
        log(done["line"])

    return run_fold(fold_dir, name, record, log, after)


def fold_roles(assignment: Mapping[str, str], holdout: set[str], name: str, log: Log) -> tuple[dict[str, set[str]], list[str], list[str], list[str]]:
    """(roles, train, validation, test patients) of a fold, checked for leaks (held-out patients included)."""
    roles = roles_of(assignment)
    check_no_leak({**roles, "held-out test": holdout}, name)
    train_p, val_p, test_p = (sorted(roles[r]) for r in ("train", "val", "test"))
    log(f"{name}: {len(train_p)} train / {len(val_p)} validation / {len(test_p)} test patients")
    return roles, train_p, val_p, test_p


__all__ = ["FOLD_DONE", "check_folds", "check_inputs", "check_settings", "fold_finished", "fold_roles", "run_fold",
           "run_training_fold"]
