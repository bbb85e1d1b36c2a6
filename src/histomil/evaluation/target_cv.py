"""What the cohort cross-validations of continuous targets share: survival (:mod:`.survival_cv`) and
regression (:mod:`.regression_cv`).

Both read one number per patient from a column of the cohort table (:func:`patient_numbers`: the
follow-up time, the regression target), give the fold's bags those numbers as targets
(:func:`with_targets`), train a fold through :func:`histomil.training.trainer.train` (:func:`train_fold`),
average the model's outputs per patient (:func:`patient_outputs`: a patient's slide bags are averaged)
and score the held-out patients with the mean output of the fold models (survival: :func:`mean_fold_outputs`;
regression: its ``ensemble.pt``, the same mean in target units).
Classification (:mod:`.cohort_cv`) reads its classes from the cohort itself and keeps its own fold.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Progress
from histomil.data.cohort import Cohort
from histomil.data.csv_rows import read_csv_rows
from histomil.errors import HistomilError
from histomil.evaluation.cohort_source import CohortSource
from histomil.features.lazy import LazyFeatureBag
from histomil.features.store import FeatureBag
from histomil.features.validate import training_encoder_info


@dataclasses.dataclass(frozen=True)
class NumberColumn:
    """How to read and name one numeric patient column: ``what`` (e.g. "time"), the option that names it
    (e.g. "--time"), which values are valid and how to say so (e.g. "a number above 0")."""

    what: str
    option: str
    valid: Callable[[float], bool]
    expected: str


def patient_numbers(cohort: Cohort, table: str | Path, column: str, spec: NumberColumn,
                    clinical_table: str | Path | None = None, slide_column: str = "slide",
                    patient_column: str = "patient") -> dict[str, float]:
    """One number per cohort patient from ``column`` (of the clinical table, one row per patient, when
    given; else of the slide table, where a patient's slides must agree). A missing column, a value that
    is not a number ``spec`` accepts, a patient with two values or without one is one error line naming
    the file (and line, column, patient)."""
    path = Path(clinical_table if clinical_table is not None else table)
    names, rows = read_csv_rows(path, "clinical table" if clinical_table is not None else "cohort table")
    header = {n.lower(): n for n in names}
    col = column.strip().lower()
    if col not in header:
        raise HistomilError(f"{path}: no {spec.what} column {column!r} (columns: {', '.join(names)}); use {spec.option}")
    key = (patient_column if clinical_table is not None else slide_column).strip().lower()
    values: dict[str, float] = {}
    lines: dict[str, int] = {}
    for line, row in rows:
        ident = row.get(key, "")
        patient = ident if clinical_table is not None else cohort.slide_patient.get(ident, "")
        if patient not in cohort.patient_label:
            continue  # a row the cohort dropped (no feature file, no target)
        text = row.get(col, "")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and spec.valid(value)):
            raise HistomilError(f"{path}: line {line}: {spec.what} {text!r} of patient {patient} (column {header[col]!r}) "
                                f"is not {spec.expected}")
        if patient in values and values[patient] != value:
            raise HistomilError(f"{path}: patient {patient} has two {spec.what}s, {values[patient]:g} (line {lines[patient]})"
                                f" and {value:g} (line {line}); a patient has one")
        values.setdefault(patient, value)
        lines.setdefault(patient, line)
    missing = [p for p in cohort.patients if p not in values]
    if missing:
        raise HistomilError(f"{path}: no {spec.what} for patient(s) {', '.join(missing[:5])}")
    return values


def with_targets(bags: Sequence[FeatureBag], target_of: Callable[[str], tuple[float, ...]]) -> list[FeatureBag]:
    """The bags (features shared, not copied) with their patient's target ``target_of(patient)``; a streamed
    bag (:class:`~histomil.features.lazy.LazyFeatureBag`) stays in its files, its copy carrying the target."""
    out: list[FeatureBag] = []
    for b in bags:
        target = target_of(str(b.attrs.get("patient", b.bag_id)))
        if isinstance(b, LazyFeatureBag):  # dataclasses.replace would read the features and cannot rebuild it
            lazy = copy.copy(b)
            lazy.target = target
            out.append(lazy)
        else:
            out.append(dataclasses.replace(b, target=target))
    return out


def train_fold(train_cfg: Any, train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag], fold_dir: Path,
               name: str, progress: Progress | None) -> tuple[Any, Any, Any]:
    """(training result, best model, its fitted task): ``train`` resumable in ``fold_dir``, errors prefixed by ``name``."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint
    from histomil.training.trainer import train

    on_epoch = (lambda row: progress("training epochs", int(row["epoch"]), train_cfg.epochs)) if progress else None
    try:
        result = train(train_bags, val_bags, train_cfg, fold_dir, encoder_info=training_encoder_info(list(train_bags) + list(val_bags)),
                       on_epoch=on_epoch, resume=True)
    except HistomilError as exc:
        raise HistomilError(f"{name}: {exc}") from None
    model, meta = load_checkpoint(result.model_path)
    return result, model, task_from_checkpoint(meta)


def patient_outputs(model: Any, task: Any, bags: Sequence[FeatureBag], source: CohortSource) -> tuple[list[str], np.ndarray]:
    """(patients, their prediction rows): the task's outputs of each bag, slide bags averaged per patient."""
    from histomil.training.trainer import predict

    rows = np.stack([np.asarray(p, dtype=np.float64) for p, _ in predict(model, bags, task=task)])
    return source.per_patient(bags, rows)


def mean_fold_outputs(out: Path, records: Sequence[Mapping[str, Any]], source: CohortSource,
                      bags: Sequence[FeatureBag]) -> tuple[list[str], np.ndarray]:
    """(patients, mean prediction rows over every fold model ``out/<record dir>/model.pt``) of ``bags``."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.tasks import task_from_checkpoint

    outputs = []
    names: list[str] = []
    for r in records:
        model, meta = load_checkpoint(out / r["dir"] / "model.pt")
        names, rows = patient_outputs(model, task_from_checkpoint(meta), bags, source)
        outputs.append(rows)
    return names, np.mean(outputs, axis=0)


__all__ = ["NumberColumn", "mean_fold_outputs", "patient_numbers", "patient_outputs", "train_fold",
           "with_targets"]
