"""Patient splits shared by every cross-validation: leak check, grouped stratified folds, inner validation.

Both the composed tile studies (:mod:`.protocol`) and slide cohorts (:mod:`.cohort_cv`) split through
here, so a patient (or a whole group of patients, e.g. a hospital) is only ever in one of train /
validation / test:

* :func:`grouped_stratified_folds`: scikit-learn's ``StratifiedGroupKFold`` over rows (tiles or
  patients), grouped so a group's rows stay together, stratified by the rows' labels;
* :func:`nested_folds`: those outer folds, with the remaining patients of each fold divided into
  training and validation patients by a caller-given inner split;
* :func:`stratified_groups_split`: one grouped, stratified split (the inner validation split of a
  cohort, and a held-out fraction), again through ``StratifiedGroupKFold``;
* :func:`quantile_strata`: a continuous target binned at its quantiles, the labels those stratify on;
* :func:`patient_folds` and :func:`holdout_patients`: the tile-table versions used by the tile study.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from histomil.data.tile_table import TileTable, assign_patients
from histomil.errors import HistomilError

ROLES = ("train", "val", "test")
InnerSplit = Callable[[list[str], int], Mapping[str, str]]  # (other patients, fold) -> patient -> "train" / "val"


def _split(k: int, seed: int, labels: np.ndarray, groups: np.ndarray, source: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold(k)`` splits; sklearn's warning about a class smaller than k is not shown (the
    fold sizes then differ by class; the leak-free grouping is unaffected) and its errors are one line."""
    splitter = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            yield from splitter.split(np.zeros(len(groups)), labels, groups)
        except ValueError as exc:
            raise HistomilError(f"{source}: cannot make {k} stratified folds ({exc})") from None


def check_no_leak(roles: Mapping[str, Iterable[str]], where: str = "patient split") -> None:
    """Raise :class:`HistomilError` naming the first patient found in two roles (train / val / test / ...)."""
    seen: dict[str, str] = {}
    for role, patients in roles.items():
        for p in sorted(set(patients)):
            if p in seen and seen[p] != role:
                raise HistomilError(
                    f"{where}: patient {p} is in both {seen[p]!r} and {role!r}; a patient must stay in one of"
                    " train / validation / test, or the test score is inflated"
                )
            seen.setdefault(p, role)


def roles_of(assignment: Mapping[str, str], roles: Sequence[str] = ROLES) -> dict[str, set[str]]:
    """patient -> role turned into role -> patients (every role of ``roles`` present, maybe empty)."""
    out: dict[str, set[str]] = {r: set() for r in roles}
    for p, r in assignment.items():
        out.setdefault(r, set()).add(p)
    return out


def grouped_stratified_folds(labels: Sequence[int] | np.ndarray, groups: Sequence[str], k: int, seed: int,
                             source: str = "cross-validation", one_label_ok: bool = False) -> list[set[str]]:
    """The test groups of each of ``k`` folds: every group tested exactly once, labels balanced across folds.

    ``labels`` and ``groups`` have one entry per row (a tile, or a patient); rows of one group always
    fall in one fold. Raises :class:`HistomilError` when there are fewer groups than folds or one label
    (unless ``one_label_ok``: strata of a continuous target, one bin when there are few patients).
    """
    groups_arr = np.asarray(groups)
    labels_arr = np.asarray(labels)
    distinct = sorted(set(groups_arr.tolist()))
    if k < 2:
        raise HistomilError(f"{source}: cross-validation needs at least 2 folds, got {k}")
    if len(distinct) < k:
        raise HistomilError(f"{source}: {len(distinct)} patients cannot make {k} patient-disjoint folds")
    if len(np.unique(labels_arr)) < 2 and not one_label_ok:
        raise HistomilError(f"{source}: every labelled row has the same label; need two classes to stratify")
    counts = np.unique(labels_arr, return_counts=True)[1]
    if counts.max() < k:
        raise HistomilError(f"{source}: {k} folds need at least {k} rows of one class; the largest class has {counts.max()}")
    folds: list[set[str]] = []
    tested: dict[str, int] = {}
    for f, (_, test_idx) in enumerate(_split(k, seed, labels_arr, groups_arr, source)):
        test = set(groups_arr[test_idx].tolist())
        for g in test:
            if g in tested:  # StratifiedGroupKFold guarantees this never happens; check anyway
                raise HistomilError(f"{source}: patient {g} is tested in folds {tested[g]} and {f}")
            tested[g] = f
        folds.append(test)
    if len(tested) != len(distinct):
        raise HistomilError(f"{source}: patient {sorted(set(distinct) - set(tested))[0]} is never tested")
    return folds


def nested_folds(patients: Sequence[str], outer: Sequence[set[str]], inner: InnerSplit,
                 source: str = "cross-validation") -> list[dict[str, str]]:
    """One patient -> "train" / "val" / "test" assignment per outer fold (``outer``: each fold's test
    patients); ``inner(rest, fold)`` divides the other patients into training and validation."""
    folds = []
    for f, test in enumerate(outer):
        rest = [p for p in patients if p not in test]
        if len(rest) < 2:
            raise HistomilError(f"{source}: fold {f} leaves {len(rest)} patient(s) for training and validation")
        roles = {p: "test" for p in test}
        roles.update(inner(rest, f))
        missing = [p for p in patients if p not in roles]
        if missing:
            raise HistomilError(f"{source}: fold {f} gives patient {missing[0]} no role")
        check_no_leak(roles_of(roles), f"{source}, fold {f}")
        folds.append({p: roles[p] for p in patients})
    return folds


def stratified_groups_split(patients: Sequence[str], labels: Sequence[int] | np.ndarray, fraction: float, seed: int,
                            groups: Sequence[str] | None = None, source: str = "cross-validation") -> set[str]:
    """About ``fraction`` of ``patients`` (the validation or held-out share), stratified by label, whole groups.

    One fold of a ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds (fewer when there are fewer
    groups, or fewer patients in the largest class: then the share is larger), so every class is
    represented when it has enough patients and a group is never divided.
    """
    if not 0.0 < fraction < 1.0:
        raise HistomilError(f"{source}: the validation fraction must lie strictly between 0 and 1, got {fraction}")
    groups = list(groups) if groups is not None else list(patients)
    n_groups = len(set(groups))
    if n_groups < 2:
        raise HistomilError(f"{source}: {len(patients)} patient(s) in one group cannot be split into training and validation")
    labels_arr = np.asarray(labels)
    k = min(max(2, round(1.0 / fraction)), n_groups, int(np.unique(labels_arr, return_counts=True)[1].max()))
    y = labels_arr if len(np.unique(labels_arr)) > 1 and k >= 2 else np.zeros(len(labels_arr), dtype=np.int64)
    k = max(k, 2)
    _, idx = next(_split(k, seed, y, np.asarray(groups), source))
    return {patients[i] for i in idx}


def quantile_strata(values: Sequence[float] | np.ndarray, min_count: int, max_bins: int = 10) -> np.ndarray:
    """Bin index (0..B-1) of each value, cut at its quantiles: the most bins (up to ``max_bins``) whose
    every bin holds at least ``min_count`` values (e.g. the number of folds), so folds stratified on the
    bins each get low, middle and high values; fewer bins when ties or few values leave bins too small,
    down to one bin (no stratification)."""
    v = np.asarray(values, dtype=np.float64)
    # tied values can merge quantiles: the bins left non-empty are the ones that count
    for bins in range(max_bins if len(v) >= 2 * min_count else 1, 1, -1):
        edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        _, strata, counts = np.unique(np.searchsorted(edges, v, side="right"), return_inverse=True, return_counts=True)
        if len(counts) > 1 and counts.min() >= min_count:
            return strata.astype(np.int64)
    return np.zeros(len(v), dtype=np.int64)


# ----------------------------------------------------------------------------------- tile tables


def subset_table(table: TileTable, patients: Iterable[str]) -> TileTable:
    """The rows of ``table`` that belong to ``patients`` (without a split column)."""
    keep_set = set(patients)
    keep = [i for i, p in enumerate(table.patients) if p in keep_set]
    return TileTable(
        source=table.source,
        paths=[table.paths[i] for i in keep],
        labels=table.labels[keep],
        patients=[table.patients[i] for i in keep],
        splits=None,
        lines=[table.lines[i] for i in keep] if table.lines else None,
        n_excluded=table.n_excluded,
    )


def holdout_patients(table: TileTable, fraction: float = 0.0, seed: int = 0) -> set[str]:
    """Patients held out from cross-validation: the split column's ``test`` patients, else a fraction.

    A split column that puts one patient in two splits is refused (naming the patient). A fraction
    is drawn with :func:`~histomil.data.tile_table.assign_patients`, balancing tumour and non-tumour
    tiles; ``seed`` fixes it (``holdout_seed``, not the run seeds, so every seed of a cross-validation
    shares one held-out set).
    """
    if table.splits is not None:
        roles = assign_patients(table)
        return {p for p, r in roles.items() if r == "test"}
    if fraction <= 0:
        return set()
    roles = assign_patients(subset_table(table, table.patients), (1.0 - fraction, 0.0, fraction), seed)
    return {p for p, r in roles.items() if r == "test"}


def patient_folds(table: TileTable, k: int = 5, seed: int = 0, val_fraction: float = 0.2) -> list[dict[str, str]]:
    """One patient -> "train" / "val" / "test" assignment per fold; each patient is tested in exactly one fold.

    Outer folds: :func:`grouped_stratified_folds` over tiles, grouped by patient and stratified by
    tile label, so every fold gets about 1/k of the tumour tiles AND of the non-tumour tiles (the two
    pools bags are drawn from) while a patient's tiles stay together. Inner split: the other patients
    are divided by :func:`~histomil.data.tile_table.assign_patients` into training and validation
    patients (``val_fraction`` of their tiles of each class, patient by patient).
    """
    source = str(table.source)
    if not 0.0 < val_fraction < 1.0:
        raise HistomilError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if k >= 2 and len(set(table.patients)) >= k and len(np.unique(table.labels)) < 2:
        raise HistomilError(f"{source}: every labelled tile has the same label; need tumour and non-tumour tiles")
    outer = grouped_stratified_folds(table.labels, table.patients, k, seed, source)

    def inner(rest: list[str], fold: int) -> Mapping[str, str]:
        return assign_patients(subset_table(table, rest), (1.0 - val_fraction, val_fraction, 0.0), seed * 1000 + fold)

    return nested_folds(sorted(set(table.patients)), outer, inner, source)


__all__ = [
    "ROLES", "check_no_leak", "grouped_stratified_folds", "holdout_patients", "nested_folds", "patient_folds",
    "quantile_strata", "roles_of", "stratified_groups_split", "subset_table",
]
