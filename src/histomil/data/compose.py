"""Compose a whole MIL study (train / val / test bag folders) from a table of labelled tiles.

The design follows the original clear-cell RCC project: a bag holds ``bag_size`` tiles; a negative
bag holds only non-tumour tiles; a positive bag holds W tumour ("witness") tiles plus
``bag_size - W`` non-tumour tiles. One call writes every split of a study:

* ``train`` (W drawn uniformly per positive bag from ``train_witnesses``), ``val`` likewise,
* ``test_{K}_{W}`` for each W in ``test_witnesses``, all drawn from the test patients.

Patients never cross splits (tiles of one patient are correlated, so a patient in two splits would
inflate test scores). On disk, per split, the original project's layout::

    out_dir/study.json                 the spec and what was drawn
    out_dir/<split>/labels.csv         case,y_true
    out_dir/<split>/tiles.csv          case,path,tile_label,source,patient
    out_dir/<split>/<case>/NN_<name>   tile NN of the bag (symlink, hardlink or copy of the source)

The whole study is built in a temporary sibling folder and renamed into place at the end, so a
failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import filelock
import numpy as np
import pydantic
from pydantic import field_validator, model_validator

from histomil.errors import HistomilError

SPLITS = ("train", "val", "test")
STUDY_FORMAT = "histomil-study"
STUDY_VERSION = 1

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


def parse_witnesses(text: str) -> tuple[int, int]:
    """Parse a witness count ``"20"`` -> (20, 20) or an inclusive range ``"1-20"`` -> (1, 20)."""
    raw = str(text).strip()
    parts = raw.split("-")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise HistomilError(f"witnesses {text!r}: expected a whole number like '20' or a range like '1-20'") from None
    if lo < 1:
        raise HistomilError(f"witnesses {text!r}: a positive bag needs at least 1 witness tile")
    if lo > hi:
        raise HistomilError(f"witnesses {text!r}: range start {lo} is above its end {hi}")
    return lo, hi


def _witness_range(value: Any) -> Any:
    """Accept ``20``, ``"20"``, ``"1-20"`` or ``[1, 20]`` for a witness range field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        try:
            return parse_witnesses(value)
        except HistomilError as exc:
            raise ValueError(str(exc)) from None
    return value


class StudySpec(pydantic.BaseModel, extra="forbid"):
    """What to compose: bag size, bag counts, witness counts, patient split and seed."""

    bag_size: int = 40
    train_bags: int = 2000
    val_bags: int = 100
    test_bags: int = 1000
    train_witnesses: tuple[int, int] = (20, 20)  # inclusive range, W drawn uniformly per positive bag
    val_witnesses: tuple[int, int] = (20, 20)
    test_witnesses: list[int] = [20, 10, 5, 1]  # one test set per W
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # of patients: train/val/test
    positive_fraction: float = 0.5
    seed: int = 0
    link: Literal["symlink", "hardlink", "copy"] = "symlink"

    @field_validator("train_witnesses", "val_witnesses", mode="before")
    @classmethod
    def _coerce_range(cls, value: Any) -> Any:
        return _witness_range(value)

    @field_validator("test_witnesses", mode="before")
    @classmethod
    def _coerce_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # "20,10,5,1"
            try:
                return [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"expected whole numbers separated by commas, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return value

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        k = self.bag_size
        if k < 1:
            raise ValueError(f"bag_size must be at least 1, got {k}")
        for name in ("train_bags", "val_bags", "test_bags"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("train_witnesses", "val_witnesses"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: range start {lo} is above its end {hi}")
            if lo < 1 or hi > k:
                raise ValueError(f"{name}: witnesses must lie in 1..bag_size={k}, got {lo}-{hi}")
        for w in self.test_witnesses:
            if w < 1 or w > k:
                raise ValueError(f"test_witnesses: each W must lie in 1..bag_size={k}, got {w}")
        if len(set(self.test_witnesses)) != len(self.test_witnesses):
            raise ValueError(f"test_witnesses: repeated W in {self.test_witnesses}")
        fr = self.split_fractions
        if any(not math.isfinite(f) or f < 0 or f > 1 for f in fr):
            raise ValueError(f"split_fractions must each lie in 0..1, got {list(fr)}")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {list(fr)} (sum {sum(fr):g})")
        if not (0.0 <= self.positive_fraction <= 1.0):
            raise ValueError(f"positive_fraction must lie in 0..1, got {self.positive_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, got {self.seed}")
        return self


def spec_from_mapping(data: Mapping[str, Any], source: str = "study spec") -> StudySpec:
    """Validate a config mapping into a :class:`StudySpec`; bad values -> one-line HistomilError."""
    try:
        return StudySpec.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown setting (settings: {', '.join(StudySpec.model_fields)})"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise HistomilError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read a study spec from a YAML or JSON file (keys = :class:`StudySpec` fields)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read study spec ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - parser errors vary; report them in one line
        raise HistomilError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HistomilError(f"{path}: a study spec must be a mapping of settings, got {type(data).__name__}")
    return spec_from_mapping(data, source=str(path))


# --------------------------------------------------------------------------------------------
# Tile table
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


@dataclass
class _SplitPlan:
    name: str
    role: str  # train / val / test (which patients)
    n_bags: int
    witnesses: tuple[int, int]
    pos_pool: np.ndarray  # table row indices
    neg_pool: np.ndarray


def _n_positive(n: int, fraction: float) -> int:
    """round(n * fraction), halves rounded up (Python's round() would round 2.5 to 2)."""
    return math.floor(n * fraction + 0.5)


def split_names(spec: StudySpec) -> list[str]:
    """The split folder names a spec produces (splits with 0 bags are skipped)."""
    names = []
    if spec.train_bags:
        names.append("train")
    if spec.val_bags:
        names.append("val")
    if spec.test_bags:
        names += [f"test_{spec.bag_size}_{w}" for w in spec.test_witnesses]
    return names


def _plans(table: TileTable, spec: StudySpec, assignment: Mapping[str, str]) -> list[_SplitPlan]:
    role_of = np.array([assignment[p] for p in table.patients])
    pools = {}
    for role in SPLITS:
        in_role = role_of == role
        pools[role] = (
            np.flatnonzero(in_role & (table.labels == 1)),
            np.flatnonzero(in_role & (table.labels == 0)),
        )
    wanted = [
        ("train", "train", spec.train_bags, spec.train_witnesses),
        ("val", "val", spec.val_bags, spec.val_witnesses),
    ]
    wanted += [(f"test_{spec.bag_size}_{w}", "test", spec.test_bags, (w, w)) for w in spec.test_witnesses]
    plans = []
    for name, role, n, wit in wanted:
        if n <= 0:
            continue
        pos, neg = pools[role]
        plans.append(_SplitPlan(name, role, int(n), (int(wit[0]), int(wit[1])), pos, neg))
    return plans


def _check_capacity(table: TileTable, spec: StudySpec, plan: _SplitPlan) -> None:
    """Refuse a split whose patients cannot fill one bag of each kind it needs."""
    k = spec.bag_size
    n_pos = _n_positive(plan.n_bags, spec.positive_fraction)
    n_neg = plan.n_bags - n_pos
    lo, hi = plan.witnesses
    n_t, n_n = len(plan.pos_pool), len(plan.neg_pool)
    who = f"{table.source}: split {plan.name!r} ({plan.role} patients)"
    if n_neg > 0 and n_n < k:
        raise HistomilError(f"{who} has {n_n} non-tumour tiles but a negative bag needs {k}")
    if n_pos > 0:
        if n_t < hi:
            raise HistomilError(f"{who} has {n_t} tumour tiles but a positive bag with W={hi} needs {hi}")
        if n_n < k - lo:
            raise HistomilError(f"{who} has {n_n} non-tumour tiles but a positive bag with W={lo} needs {k - lo}")


def _split_rng(seed: int, name: str) -> np.random.Generator:
    """An RNG per split, so adding a test set does not change the bags of the others."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _draw_split(plan: _SplitPlan, spec: StudySpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw bag labels (shuffled, exact positive count) and each bag's tile rows (shuffled order)."""
    rng = _split_rng(spec.seed, plan.name)
    k = spec.bag_size
    n_pos = _n_positive(plan.n_bags, spec.positive_fraction)
    labels = np.zeros(plan.n_bags, dtype=np.int64)
    labels[:n_pos] = 1
    labels = rng.permutation(labels)
    lo, hi = plan.witnesses
    bags = []
    for y in labels:
        if y == 1:
            w = int(rng.integers(lo, hi + 1))
            rows = np.concatenate(
                [
                    rng.choice(plan.pos_pool, size=w, replace=False),
                    rng.choice(plan.neg_pool, size=k - w, replace=False),
                ]
            )
        else:
            rows = rng.choice(plan.neg_pool, size=k, replace=False)
        bags.append(rng.permutation(rows))
    return labels, bags


def _place(src: str, dst: str, link: str) -> None:
    if link == "symlink":
        os.symlink(src, dst)
    elif link == "hardlink":
        try:
            os.link(src, dst)
        except OSError as exc:
            raise HistomilError(
                f"{src}: cannot hardlink into {os.path.dirname(dst)} ({exc.strerror or exc});"
                " use link 'symlink' or 'copy' (hardlinks need one filesystem)"
            ) from None
    else:
        shutil.copyfile(src, dst)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _prepare_out_dir(out_dir: Path, overwrite: bool, table: TileTable) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise HistomilError(f"{out_dir}: exists and is not a folder; choose another output folder")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise HistomilError(f"{out_dir}: folder exists and is not empty; pass overwrite to replace it")
            roots = (os.path.abspath(out_dir) + os.sep, os.path.realpath(out_dir) + os.sep)
            inside = next(
                (p for p in table.paths if p.startswith(roots[0]) or os.path.realpath(p).startswith(roots[1])), None
            )
            if inside is not None:
                raise HistomilError(
                    f"{table.source}: tile {inside} lies inside {out_dir}, which overwrite would delete;"
                    " choose another output folder"
                )


def compose_study(
    table: TileTable,
    spec: StudySpec,
    out_dir: str | Path,
    progress: Progress | None = None,
    overwrite: bool = False,
    assignment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write a whole study (every split's bag folders, labels.csv, tiles.csv, study.json).

    ``assignment`` (patient -> train/val/test) defaults to :func:`assign_patients` with the spec's
    fractions and seed. Returns the study description also written to ``out_dir/study.json``.
    The study is built in a temporary sibling folder and renamed into place only when complete.
    """
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite, table)
    with _compose_lock(out_dir):
        remove_compose_leftovers(out_dir)  # a killed compose's temporary folders; no other compose runs now
        return _compose_locked(table, spec, out_dir, progress, assignment)


@contextlib.contextmanager
def _compose_lock(out_dir: Path) -> Iterator[None]:
    """One compose into ``out_dir`` at a time (a lock file beside it, released even by kill -9), so the
    temporary folders a killed compose left can be deleted safely when the next one starts."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(out_dir.parent / f".{out_dir.name}.compose.lock", timeout=0)
        lock.acquire()
    except filelock.Timeout:
        raise HistomilError(
            f"{out_dir}: another histomil process is composing bags here; wait for it to finish or use another folder"
        ) from None
    except OSError as exc:  # a read-only or full disk: name the study folder
        raise OSError(exc.errno, exc.strerror, str(out_dir)) from None
    try:
        yield
    finally:
        lock.release()


def _compose_locked(
    table: TileTable,
    spec: StudySpec,
    out_dir: Path,
    progress: Progress | None,
    assignment: Mapping[str, str] | None,
) -> dict[str, Any]:
    if assignment is None:
        assignment = assign_patients(table, spec.split_fractions, spec.seed)
        split_source = "column" if table.splits is not None else "fractions"
    else:
        split_source = "given"
    unknown = sorted({p for p in table.patients if p not in assignment})
    if unknown:
        raise HistomilError(f"{table.source}: patient {unknown[0]} has no split ({len(unknown)} patient(s) unassigned)")
    bad = sorted({s for s in assignment.values() if s not in SPLITS})
    if bad:
        raise HistomilError(f"{table.source}: unknown split {bad[0]!r}; splits are train, val, test")

    plans = _plans(table, spec, assignment)
    for plan in plans:  # every capacity problem is found before anything is written
        _check_capacity(table, spec, plan)

    by_role: dict[str, list[str]] = {r: [] for r in SPLITS}
    for patient in sorted(set(table.patients)):
        by_role[assignment[patient]].append(patient)

    width = max(2, len(str(spec.bag_size - 1)))
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as exc:  # a read-only or full disk: name the study folder, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(out_dir)) from None
    study: dict[str, Any] = {
        "format": STUDY_FORMAT,
        "version": STUDY_VERSION,
        "tile_table": str(table.source),
        "tile_table_digest": table.digest(),
        "seed": spec.seed,
        "spec": spec.model_dump(mode="json"),
        "split_source": split_source,
        "n_tiles": len(table),
        "n_excluded": table.n_excluded,
        "patients": {role: by_role[role] for role in SPLITS},
        "splits": [],
    }
    try:
        for plan in plans:
            labels, bags = _draw_split(plan, spec)
            split_dir = tmp / plan.name
            split_dir.mkdir()
            tile_rows: list[list[Any]] = []
            used: set[int] = set()
            wit_drawn: list[int] = []
            total = len(bags)
            if progress:
                progress(plan.name, 0, total)
            for case, (y, rows) in enumerate(zip(labels.tolist(), bags)):
                bag_dir = split_dir / str(case)
                bag_dir.mkdir()
                for pos, row in enumerate(rows.tolist()):
                    src = table.paths[row]
                    fname = f"{pos:0{width}d}_{os.path.basename(src)}"
                    _place(src, str(bag_dir / fname), spec.link)
                    tile_rows.append([case, f"{case}/{fname}", int(table.labels[row]), src, table.patients[row]])
                    used.add(row)
                if y == 1:
                    wit_drawn.append(int(table.labels[rows].sum()))
                if progress:
                    progress(plan.name, case + 1, total)
            _write_csv(split_dir / "labels.csv", ["case", "y_true"], [[c, y] for c, y in enumerate(labels.tolist())])
            _write_csv(split_dir / "tiles.csv", ["case", "path", "tile_label", "source", "patient"], tile_rows)
            n_pos = int(labels.sum())
            study["splits"].append(
                {
                    "name": plan.name,
                    "role": plan.role,
                    "n_bags": plan.n_bags,
                    "n_pos": n_pos,
                    "n_neg": plan.n_bags - n_pos,
                    "bag_size": spec.bag_size,
                    "witnesses": list(plan.witnesses),
                    "witnesses_drawn": (
                        {"min": min(wit_drawn), "max": max(wit_drawn), "mean": round(float(np.mean(wit_drawn)), 4)}
                        if wit_drawn
                        else None
                    ),
                    "n_patients": len(by_role[plan.role]),
                    "pool": {"tumour": len(plan.pos_pool), "non_tumour": len(plan.neg_pool)},
                    "tiles_used": len(used),
                }
            )
        with open(tmp / "study.json", "w", encoding="utf-8") as fh:
            json.dump(study, fh, indent=2)
            fh.write("\n")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return study


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Move the finished study into place, replacing an old one only after the new one is complete."""
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists() or out_dir.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        old = trash / "old"
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def remove_compose_leftovers(out_dir: str | Path) -> list[Path]:
    """Delete the temporary sibling folders (``.<name>.XXXXXXXX.tmp`` / ``.old``) that a killed
    :func:`compose_study` into ``out_dir`` left behind; returns them. Only for a caller that owns
    ``out_dir``'s parent folder (``run``'s folder) or holds the compose lock (:func:`compose_study` does):
    a compose running there now would lose its work."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}\.(tmp|old)$")
    removed = []
    if out_dir.parent.is_dir():
        for path in out_dir.parent.iterdir():
            if pattern.match(path.name) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Reading back / summary
# --------------------------------------------------------------------------------------------


def read_study(out_dir: str | Path) -> dict[str, Any]:
    """Load ``out_dir/study.json`` written by :func:`compose_study`."""
    path = Path(out_dir) / "study.json"
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read study description ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise HistomilError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(study, dict) or study.get("format") != STUDY_FORMAT:
        raise HistomilError(f"{path}: not a histomil study description")
    return study


def study_counts(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per split, for the CLI to print as a table."""
    rows = []
    for s in study["splits"]:
        lo, hi = s["witnesses"]
        rows.append(
            {
                "split": s["name"],
                "bags": s["n_bags"],
                "positive": s["n_pos"],
                "negative": s["n_neg"],
                "W": str(lo) if lo == hi else f"{lo}-{hi}",
                "patients": s["n_patients"],
                "tumour_tiles": s["pool"]["tumour"],
                "non_tumour_tiles": s["pool"]["non_tumour"],
                "tiles_used": s["tiles_used"],
            }
        )
    return rows


def format_counts(study: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`study_counts` plus the excluded-row count."""
    rows = study_counts(study)
    header = [
        "split",
        "bags",
        "positive",
        "negative",
        "W",
        "patients",
        "tumour_tiles",
        "non_tumour_tiles",
        "tiles_used",
    ]
    cells = [header] + [[str(r[h]) for h in header] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.append(
        f"{study.get('n_tiles', 0)} labelled tiles used as the pool;"
        f" {study.get('n_excluded', 0)} row(s) with an empty label excluded"
    )
    return "\n".join(lines)
