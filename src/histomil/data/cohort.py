"""A slide cohort: a table of slides with patient ids and a target, matched to per-slide feature files.

The everyday input of a computational pathologist (CLAM's ``dataset_csv``, STAMP's clinical and slide
tables): one CSV with a row per slide (``slide``, ``patient``, the target column, optional ``split``
[train/test], ``fold`` and ``group``), or two CSVs as STAMP has them, a clinical table with a row per
patient (``patient``, target, optional split/fold/group) and a slide table ``slide -> patient``.

Everything that would make a cross-validation silently wrong is one :class:`HistomilError` line naming
the file and rows: duplicate slides, empty patient ids, a patient whose slides carry different labels,
labels written in two spellings (``Tumor``/``tumor``, ``1``/``1.0``), a target with one class, a slide
without a feature file and a feature file without a row (both listed; ``on_missing="skip"`` drops
them with one warning instead).

Classes: the distinct labels in sorted order (numerically when every label is a number), or the order
given by ``classes``; label ``classes[i]`` is class index ``i``. For a binary target the positive class
is ``classes[1]`` (``1``, ``True``/``yes`` sort after ``0``/``False``/``no``; give ``classes`` to choose).

Bags (:func:`cohort_bags`): one per slide, or one per patient holding the tiles of all its slides
(``attrs["slides"]`` lists them and ``attrs["slide_of_tile"]`` gives each tile's index into that list,
so attention can be drawn per slide, :func:`tiles_by_slide`). Feature files are read only through
:mod:`histomil.features.formats` (any layout: histomil, CLAM h5/pt, TRIDENT h5/pt, STAMP v1/v2) and
checked with :mod:`histomil.features.validate` (finite values, one dimension, one encoder).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histomil.data.csv_rows import read_csv_rows
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.files import natural_key

ON_MISSING = ("error", "skip")
BAG_LEVELS = ("patient", "slide")
MISSING_VALUES = {"", "na", "nan", "n/a", "none", "null"}  # compared lower-case: an unknown target
SPLIT_VALUES = {"train": "train", "training": "train", "test": "test", "testing": "test"}

OnMissing = Literal["error", "skip"]
BagLevel = Literal["patient", "slide"]


@dataclass(frozen=True)
class CohortColumns:
    """Column names of the cohort table(s); matched case-insensitively. Optional columns are used when present."""

    slide: str = "slide"
    patient: str = "patient"
    split: str = "split"
    fold: str = "fold"
    group: str = "group"


@dataclass
class Cohort:
    """A checked cohort: slides, their patients and each patient's target, class index and optional split/fold/group."""

    source: str  # the table(s), for messages
    target: str  # the target column
    classes: list[str]  # class index -> label as written in the table
    slide_patient: dict[str, str]  # every slide -> its patient
    patient_label: dict[str, int]  # class index of each patient
    patient_target: dict[str, str]  # the label as written
    slide_line: dict[str, int] = field(default_factory=dict)  # slide -> its line in the table, for messages
    patient_split: dict[str, str] | None = None  # "train" / "test"
    patient_fold: dict[str, int] | None = None
    patient_group: dict[str, str] | None = None
    feature_files: dict[str, Path] = field(default_factory=dict)  # slide -> file, after match_feature_files

    @property
    def positive_class(self) -> str | None:
        """The label called positive (class 1) of a binary target; None for more classes."""
        return self.classes[1] if len(self.classes) == 2 else None

    @property
    def patients(self) -> list[str]:
        return sorted(set(self.slide_patient.values()), key=natural_key)

    @property
    def slides(self) -> list[str]:
        return sorted(self.slide_patient, key=natural_key)

    def slides_of(self, patient: str) -> list[str]:
        """The patient's slides in natural order."""
        return [s for s in self.slides if self.slide_patient[s] == patient]

    def labels_of(self, patients: Iterable[str]) -> np.ndarray:
        return np.array([self.patient_label[p] for p in patients], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        """Patients per class label."""
        counts = np.bincount(self.labels_of(self.patients), minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def digest(self) -> str:
        """Identifies the cohort's content (slides, patients, labels, classes, splits, folds, groups), so a
        resumed cross-validation can refuse a changed table."""
        doc = {
            "target": self.target, "classes": self.classes, "slides": self.slide_patient, "labels": self.patient_label,
            "split": self.patient_split, "fold": self.patient_fold, "group": self.patient_group,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        """One line: patients, slides and patients per class (positive class named)."""
        counts = ", ".join(f"{c!r}: {n}" for c, n in self.class_counts().items())
        pos = f"; positive class {self.positive_class!r}" if self.positive_class is not None else ""
        return f"{len(self.patients)} patients, {len(self.slide_patient)} slides; patients per class {counts}{pos}"


# ------------------------------------------------------------------------------------------ reading


def _few(items: Sequence[Any], limit: int = 5) -> str:
    return ", ".join(str(i) for i in items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _read_rows(path: Path, what: str) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """(lower-cased column name -> name as written, [(line, row keyed by lower-cased name)]) of a CSV."""
    names, rows = read_csv_rows(path, what)
    lowered = [n.lower() for n in names]
    if not rows:
        raise HistomilError(f"{path}: {what} has a header but no rows")
    return dict(zip(lowered, names)), rows


def _column(path: Path, columns: Mapping[str, str], name: str, what: str, option: str) -> str:
    key = name.strip().lower()
    if key not in columns:
        raise HistomilError(
            f"{path}: {what} has no {name!r} column ({option}); columns: {', '.join(columns.values()) or 'none'}"
        )
    return key


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _spelling_key(text: str) -> str:
    """Two labels with the same key are one label written twice differently ('Tumor'/'tumor', '1'/'1.0')."""
    value = _number(text)
    return repr(value) if value is not None else " ".join(text.casefold().split())


def class_order(labels: Iterable[str], classes: Sequence[str] | None = None, source: str = "cohort table") -> list[str]:
    """The class labels in index order: ``classes`` when given (every label must be one of them),
    else sorted, numerically when all labels are numbers."""
    found = sorted(set(labels))
    if classes is not None:
        given = [c.strip() for c in classes]
        if len(set(given)) != len(given) or any(not c for c in given):
            raise HistomilError(f"--classes {','.join(classes)}: give each class once, none empty")
        unknown = [x for x in found if x not in given]
        if unknown:
            raise HistomilError(f"{source}: label(s) {_few(unknown)} are not among the classes given ({', '.join(given)})")
        return given
    if all(_number(x) is not None for x in found):
        return sorted(found, key=lambda x: (_number(x), x))
    return sorted(found, key=lambda x: (x.casefold(), x))


def read_cohort(
    table: str | Path,
    target: str,
    *,
    clinical_table: str | Path | None = None,
    columns: CohortColumns = CohortColumns(),
    classes: Sequence[str] | None = None,
    on_missing: OnMissing = "error",
    numeric: bool = False,
) -> Cohort:
    """Read and check a cohort table (or a slide table plus a per-patient clinical table).

    ``table``: one row per slide with the slide and patient columns; with ``clinical_table`` (one row
    per patient) the target, split, fold and group columns come from there, else from ``table``. Rows
    whose target is empty (or NA) are an error, or with ``on_missing="skip"`` are dropped with a warning.
    ``numeric``: the target is a number, not a class ('0.5' and '0.50' are then not one class spelt twice).
    """
    if on_missing not in ON_MISSING:
        raise HistomilError(f"--on-missing must be one of {', '.join(ON_MISSING)}, not {on_missing!r}")
    path = Path(table)
    cols, rows = _read_rows(path, "slide table" if clinical_table is not None else "cohort table")
    slide_key = _column(path, cols, columns.slide, "the table", "--slide-column")
    patient_key = _column(path, cols, columns.patient, "the table", "--patient-column")
    slide_patient: dict[str, str] = {}
    slide_line: dict[str, int] = {}
    empty_slide = [line for line, r in rows if not r[slide_key]]
    if empty_slide:
        raise HistomilError(f"{path}: line(s) {_few(empty_slide)} have no slide id in column {cols[slide_key]!r}")
    empty_patient = [line for line, r in rows if not r[patient_key]]
    if empty_patient:
        raise HistomilError(f"{path}: line(s) {_few(empty_patient)} have no patient id in column {cols[patient_key]!r}")
    for line, r in rows:
        s = r[slide_key]
        if s in slide_line:
            raise HistomilError(f"{path}: slide {s!r} is listed twice (lines {slide_line[s]} and {line}); one row per slide")
        slide_line[s], slide_patient[s] = line, r[patient_key]

    if clinical_table is not None:
        cpath = Path(clinical_table)
        ccols, crows = _read_rows(cpath, "clinical table")
        ckey = _column(cpath, ccols, columns.patient, "the clinical table", "--patient-column")
        empty = [line for line, r in crows if not r[ckey]]
        if empty:
            raise HistomilError(f"{cpath}: line(s) {_few(empty)} have no patient id in column {ccols[ckey]!r}")
        source = f"{cpath} + {path}"
        tpath, tcols, trows, tpatient = cpath, ccols, crows, ckey
        unknown = sorted({slide_patient[s] for s in slide_patient} - {r[ckey] for _, r in crows}, key=natural_key)
        if unknown:
            bad = [s for s in slide_patient if slide_patient[s] in set(unknown)]
            msg = f"{path}: {len(bad)} slide(s) belong to patients missing from {cpath}: {_few(unknown)}"
            if on_missing == "error":
                raise HistomilError(msg + " (--on-missing skip drops them)")
            warnings.warn(msg + "; dropped (--on-missing skip)", stacklevel=2)
            for s in bad:
                del slide_patient[s], slide_line[s]
    else:
        source = str(path)
        tpath, tcols, trows, tpatient = path, cols, rows, patient_key
    target_key = _column(tpath, tcols, target, "the table", "--target")
    optional = {k: getattr(columns, k).strip().lower() for k in ("split", "fold", "group")}
    optional = {k: v for k, v in optional.items() if v in tcols}

    # one value per patient for the target and each optional column; two different values are a conflict
    per_patient: dict[str, dict[str, tuple[str, int]]] = {}
    unlabelled: list[int] = []
    used = set(slide_patient.values())
    for line, r in trows:
        p = r[tpatient]
        if p not in used:
            continue
        if r[target_key].lower() in MISSING_VALUES:
            unlabelled.append(line)
            continue
        seen = per_patient.setdefault(p, {})
        for name, key in [("target", target_key), *optional.items()]:
            value = r[key]
            if name in seen and seen[name][0] != value:
                what = f"{'value' if numeric else 'label'} ({tcols[target_key]})" if name == "target" else f"{tcols[key]!r} value"
                raise HistomilError(
                    f"{tpath}: patient {p!r} has conflicting {what}: {seen[name][0]!r} on line {seen[name][1]},"
                    f" {value!r} on line {line}; a patient has one {what}"
                )
            seen.setdefault(name, (value, line))
    if unlabelled:
        msg = f"{tpath}: line(s) {_few(unlabelled)} have no value in the target column {tcols[target_key]!r}"
        if on_missing == "error":
            raise HistomilError(msg + "; fill them in, remove the rows, or pass --on-missing skip")
        warnings.warn(msg + "; dropped (--on-missing skip)", stacklevel=2)
    unlabelled_patients = [p for p in used if p not in per_patient]
    for s in [s for s, p in slide_patient.items() if p in set(unlabelled_patients)]:
        del slide_patient[s], slide_line[s]
    if not slide_patient:
        raise HistomilError(f"{source}: no slide with a label in column {tcols[target_key]!r} is left")

    patient_target = {p: v["target"][0] for p, v in per_patient.items() if p in set(slide_patient.values())}
    if not numeric:
        _check_spellings(tpath, patient_target, {p: v["target"][1] for p, v in per_patient.items()})
    order = class_order(patient_target.values(), classes, source)
    if len(set(patient_target.values())) < 2:
        only = next(iter(patient_target.values()))
        raise HistomilError(
            f"{source}: every patient has the label {only!r} in column {tcols[target_key]!r}; a target needs two classes"
        )
    index = {c: i for i, c in enumerate(order)}
    cohort = Cohort(
        source=source, target=target, classes=order, slide_patient=slide_patient,
        patient_label={p: index[v] for p, v in patient_target.items()}, patient_target=patient_target,
        slide_line=slide_line,
    )
    for name in optional:
        values = {p: v[name] for p, v in per_patient.items() if p in patient_target and name in v}
        setattr(cohort, f"patient_{name}", _optional_column(tpath, name, tcols[optional[name]], values,
                                                          {p: v[name][1] for p, v in per_patient.items() if name in v}))
    return cohort


def _check_spellings(path: Path, targets: Mapping[str, str], lines: Mapping[str, int]) -> None:
    by_key: dict[str, dict[str, int]] = {}
    for p, v in targets.items():
        by_key.setdefault(_spelling_key(v), {}).setdefault(v, lines[p])
    for spellings in by_key.values():
        if len(spellings) > 1:
            (a, la), (b, lb) = sorted(spellings.items(), key=lambda kv: kv[1])[:2]
            raise HistomilError(
                f"{path}: the label {a!r} (line {la}) and {b!r} (line {lb}) look like one class written two ways;"
                " write every label the same way"
            )


def _optional_column(path: Path, name: str, column: str, values: Mapping[str, tuple[str, int]],
                     lines: Mapping[str, int]) -> dict[str, Any] | None:
    """The split (train/test), fold (whole number) or group column per patient; None when it is all empty."""
    filled = {p: v for p, (v, _) in values.items() if v}
    if not filled:
        return None
    missing = sorted((lines[p] for p in values if not values[p][0]))
    if missing:
        raise HistomilError(f"{path}: line(s) {_few(missing)} have no value in column {column!r}; fill every row or none")
    if name == "split":
        bad = [(lines[p], v) for p, v in filled.items() if v.lower() not in SPLIT_VALUES]
        if bad:
            raise HistomilError(f"{path}: line {bad[0][0]}: {column!r} is {bad[0][1]!r}; expected train or test")
        return {p: SPLIT_VALUES[v.lower()] for p, v in filled.items()}
    if name == "fold":
        out = {}
        for p, v in filled.items():
            num = _number(v)
            if num is None or num != int(num) or num < 0:
                raise HistomilError(f"{path}: line {lines[p]}: {column!r} is {v!r}; expected a fold number 0, 1, ...")
            out[p] = int(num)
        return out
    return dict(filled)


# ------------------------------------------------------------------------------------ feature files


def match_feature_files(cohort: Cohort, folder: str | Path, on_missing: OnMissing = "error") -> Cohort:
    """Pair every slide with its feature file ``<slide>.h5``/``.pt`` in ``folder`` (any layout; see
    :func:`histomil.features.formats.feature_files_any`); returns the cohort with ``feature_files`` set.

    Slides without a file and files without a row are listed in one error; with ``on_missing="skip"``
    they are dropped with one warning each, and so are patients left without slides.
    """
    from histomil.features.formats import feature_files_any

    files = {p.stem: p for p in feature_files_any(folder)}
    no_file = [s for s in cohort.slides if s not in files]
    no_row = sorted((s for s in files if s not in cohort.slide_patient), key=natural_key)
    folder_name = next(iter(files.values())).parent
    if on_missing == "error" and (no_file or no_row):
        parts = []
        if no_file:
            lines = ", ".join(f"{s} (line {cohort.slide_line.get(s, '?')})" for s in no_file[:5])
            parts.append(f"{len(no_file)} slide(s) of {cohort.source} have no feature file in {folder_name}: {lines}"
                         + (" ..." if len(no_file) > 5 else ""))
        if no_row:
            parts.append(f"{len(no_row)} feature file(s) in {folder_name} have no row in {cohort.source}: {_few(no_row)}")
        raise HistomilError("; ".join(parts) + " (--on-missing skip drops them)")
    if no_file:
        warnings.warn(f"{len(no_file)} slide(s) of {cohort.source} have no feature file in {folder_name}, dropped: "
                      f"{_few(no_file)}", stacklevel=2)
    if no_row:
        warnings.warn(f"{len(no_row)} feature file(s) in {folder_name} have no row in {cohort.source}, ignored: "
                      f"{_few(no_row)}", stacklevel=2)
    keep = {s: p for s, p in cohort.slide_patient.items() if s in files}
    if not keep:
        raise HistomilError(f"{folder_name}: none of the {len(cohort.slide_patient)} slides of {cohort.source} has a feature file")
    patients = set(keep.values())
    labels = {p: cohort.patient_label[p] for p in patients}
    if len(set(labels.values())) < 2:
        raise HistomilError(f"{cohort.source}: the slides with feature files all belong to class "
                            f"{cohort.classes[next(iter(labels.values()))]!r}; a target needs two classes")

    def only(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {p: v for p, v in d.items() if p in patients}

    return Cohort(
        source=cohort.source, target=cohort.target, classes=list(cohort.classes), slide_patient=keep,
        patient_label=labels, patient_target={p: cohort.patient_target[p] for p in patients},
        slide_line={s: cohort.slide_line[s] for s in keep if s in cohort.slide_line},
        patient_split=only(cohort.patient_split), patient_fold=only(cohort.patient_fold),
        patient_group=only(cohort.patient_group), feature_files={s: files[s] for s in keep},
    )


def load_slide_features(cohort: Cohort, stream: bool = False, **options: Any) -> dict[str, FeatureBag]:
    """Every slide's feature file read through :func:`histomil.features.formats.load_any_features` (``options``:
    ``mpp``, ``tile_size``, ``coords_dir``) and checked: finite, one feature dimension, one encoder.

    ``stream=True``: each file is read and checked once, one at a time, and kept as a
    :class:`histomil.features.lazy.LazyFeatureBag` (read again when used), so the cohort need not fit in memory."""
    from histomil.features.formats import load_any_features
    from histomil.features.lazy import scan_feature_bag
    from histomil.features.validate import check_feature_bag, training_encoder_info

    if not cohort.feature_files:
        raise HistomilError(f"{cohort.source}: no feature files matched yet (match_feature_files)")
    out: dict[str, FeatureBag] = {}
    for slide in cohort.slides:
        if stream:
            bag = scan_feature_bag(cohort.feature_files[slide], check=lambda b: check_feature_bag(b, dim=None, encoder=None),
                                   **options)
        else:
            bag = load_any_features(cohort.feature_files[slide], **options)
            check_feature_bag(bag, dim=None, encoder=None)  # finite, at least one tile, a known precision
        first = next(iter(out.values()), bag)
        if bag.shape[1] != first.shape[1]:
            raise HistomilError(f"{bag.attrs['source_file']}: {bag.shape[1]}-d features, but "
                                f"{first.attrs['source_file']} has {first.shape[1]}-d; one encoder per cohort")
        bag.bag_id = slide
        bag.label = cohort.patient_label[cohort.slide_patient[slide]]
        bag.attrs["patient"] = cohort.slide_patient[slide]
        out[slide] = bag
    training_encoder_info(list(out.values()))  # one encoder (and one set of weights) across the cohort
    return out


def patient_bag(patient: str, slides: Sequence[FeatureBag], label: int | None) -> FeatureBag:
    """One bag of all the tiles of a patient's slides, in slide order; each tile keeps its slide
    (``attrs["slides"]``, ``attrs["slide_of_tile"]``) and its own coordinates (when every slide has them)."""
    if not slides:
        raise HistomilError(f"patient {patient!r}: no slides to make a bag of")
    slide_of_tile = np.concatenate([np.full(len(b), i, dtype=np.int32) for i, b in enumerate(slides)])
    attrs = dict(slides[0].attrs)
    attrs.pop("source_file", None)
    attrs.update(patient=patient, slides=[b.bag_id for b in slides], slide_of_tile=slide_of_tile,
                 source_files=[str(b.attrs.get("source_file", "")) for b in slides])
    from histomil.features.lazy import LazyCombinedBag, LazyFeatureBag

    if any(isinstance(b, LazyFeatureBag) for b in slides):  # streamed slides: combined when the bag is read
        if not all(isinstance(b, LazyFeatureBag) for b in slides):
            raise HistomilError(f"patient {patient!r}: slides both in memory and streamed; read them one way")
        return LazyCombinedBag(patient, slides, label, attrs,  # type: ignore[arg-type]
                               combine=lambda loaded: patient_bag(patient, loaded, label))
    feats = np.concatenate([b.features for b in slides], axis=0)
    coords = None
    if all(b.coords is not None for b in slides):
        coords = np.concatenate([np.asarray(b.coords) for b in slides], axis=0)
    tile_paths = [t for b in slides for t in b.tile_paths]
    return FeatureBag(bag_id=patient, features=feats, tile_paths=tile_paths, label=label, coords=coords, attrs=attrs)


def cohort_bags(cohort: Cohort, level: BagLevel = "patient", slide_bags: Mapping[str, FeatureBag] | None = None,
                **options: Any) -> list[FeatureBag]:
    """The cohort as labelled bags, in patient order: one per patient (all its slides' tiles) or one per
    slide (``attrs["patient"]`` names its patient). ``slide_bags`` reuses bags already read by
    :func:`load_slide_features` (else they are read, with ``options``)."""
    if level not in BAG_LEVELS:
        raise HistomilError(f"--bag-level must be one of {', '.join(BAG_LEVELS)}, not {level!r}")
    slide_bags = slide_bags if slide_bags is not None else load_slide_features(cohort, **options)
    out: list[FeatureBag] = []
    for p in cohort.patients:
        slides = [slide_bags[s] for s in cohort.slides_of(p)]
        if level == "slide":
            out += slides
        else:
            out.append(patient_bag(p, slides, cohort.patient_label[p]))
    return out


def tiles_by_slide(bag: FeatureBag, values: np.ndarray) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """Split per-tile ``values`` (e.g. attention) of a patient bag by slide: slide -> (coords or None, values)."""
    values = np.asarray(values)
    if values.shape[0] != len(bag):
        raise HistomilError(f"bag {bag.bag_id}: {values.shape[0]} values for {len(bag)} tiles")
    if "slides" not in bag.attrs:  # a slide bag
        return {bag.bag_id: (bag.coords, values)}
    index = np.asarray(bag.attrs["slide_of_tile"])
    return {
        s: (None if bag.coords is None else np.asarray(bag.coords)[index == i], values[index == i])
        for i, s in enumerate(bag.attrs["slides"])
    }


__all__ = [
    "BAG_LEVELS", "ON_MISSING", "Cohort", "CohortColumns", "class_order", "cohort_bags", "load_slide_features",
    "match_feature_files", "patient_bag", "read_cohort", "tiles_by_slide",
]
