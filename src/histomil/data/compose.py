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
    out_dir/<split>/targets.csv        case,target: the bag's tumour fraction W / bag_size (0 for a negative bag),
                                       the regression target (``train.task: regression``, data/targets.py)
    out_dir/<split>/tiles.csv          case,path,tile_label,source,patient
    out_dir/<split>/<case>/NN_<name>   tile NN of the bag (symlink, hardlink or copy of the source)

The whole study is built in a temporary sibling folder and renamed into place at the end, so a
failed run leaves nothing half-written. The settings are a :class:`~histomil.data.study_spec.StudySpec`;
the tiles come from a :class:`~histomil.data.tile_table.TileTable`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from histomil.callbacks import Progress
from histomil.data.study_spec import StudySpec
from histomil.data.tile_table import SPLITS, TileTable, assign_patients
from histomil.errors import HistomilError

STUDY_FORMAT = "histomil-study"
STUDY_VERSION = 1
TARGETS_CSV = "targets.csv"  # per split: case,target = the bag's tumour fraction



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


def tumour_fraction(n_tumour: int, bag_size: int) -> str:
    """A bag's tumour fraction W / bag_size as written to targets.csv (Python's shortest exact float text)."""
    return repr(n_tumour / bag_size)


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
            fractions: list[list[Any]] = []
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
                n_tumour = int(table.labels[rows].sum())
                fractions.append([case, tumour_fraction(n_tumour, spec.bag_size)])
                if y == 1:
                    wit_drawn.append(n_tumour)
                if progress:
                    progress(plan.name, case + 1, total)
            _write_csv(split_dir / "labels.csv", ["case", "y_true"], [[c, y] for c, y in enumerate(labels.tolist())])
            _write_csv(split_dir / "tiles.csv", ["case", "path", "tile_label", "source", "patient"], tile_rows)
            _write_csv(split_dir / TARGETS_CSV, ["case", "target"], fractions)
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
