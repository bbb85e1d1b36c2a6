"""A synthetic survival cohort from real tiles: the hazard of a bag grows with its tumour content.

Bags are composed from a labelled tile table by :func:`histomil.data.compose.compose_study` (patients
never cross the train / val / test splits) and encoded by :func:`histomil.pipeline.extract_study`. A bag
of ``bag_size`` tiles with W tumour tiles gets

    hazard = baseline_hazard * exp(beta * W / bag_size),   event time T ~ Exponential(hazard),

and an independent censoring time C ~ Exponential(c), with c solved so that the *expected* censored
fraction over the cohort is ``censoring`` (P(C < T) = c / (c + hazard)). The bag's target is
``time = min(T, C)``, ``event = T <= C``. The true log hazard is the oracle risk: its c-index is the
best any model can reach on these times.

Training and validation bags draw W uniformly from 1..bag_size for their positive bags; the test bags
are one composed test set per W = 1..bag_size (``test_bags_per_w`` bags each), pooled, so W is spread
the same way there. A fraction ``1 - positive_fraction`` of the bags have W = 0.

On disk (``out_dir``): ``study/`` (the composed bags), ``features/<split>/`` (feature files per
composed split), ``slides/<bag>.h5`` (the same files hard-linked into one flat folder, as a slide
cohort's feature folder; ``<bag>`` is ``<split>_<case>``), ``cohort.csv`` (one row per bag: ``slide``,
``patient`` (= the bag: each bag is one synthetic patient), ``time``, ``event``, ``role`` (train / val /
test: whose real patients' tiles it holds), ``split`` (``test`` for the test role, else ``train``: the
cohort cross-validation holds ``test`` rows out of every fold), ``witnesses`` (W), ``log_hazard``) and
``cohort.json`` (the spec and the drawn censored fraction). The tiles of one real patient recur in many
bags of its role, so cross-validation folds drawn across the train and val bags share tiles; only the
held-out ``test`` bags come from other patients.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from pydantic import Field

from histomil.data.compose import compose_study, read_study
from histomil.data.study_spec import StudySpec
from histomil.data.tile_table import read_tile_table
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.files import atomic_write, write_json

COHORT_COLUMNS = ("slide", "patient", "time", "event", "split", "role", "witnesses", "log_hazard")


class SurvivalCohortSpec(pydantic.BaseModel, extra="forbid"):
    """How the synthetic survival cohort is drawn (see the module docstring)."""

    bag_size: int = Field(40, ge=2)
    train_bags: int = Field(300, ge=2)
    val_bags: int = Field(100, ge=2)
    test_bags_per_w: int = Field(8, ge=1)  # bags of each test set W = 1..bag_size
    positive_fraction: float = Field(0.75, gt=0, le=1)  # bags with W >= 1; the others have W = 0
    beta: float = 3.0  # log hazard ratio of an all-tumour bag against a tumour-free one
    baseline_hazard: float = Field(0.1, gt=0)  # events per time unit at W = 0
    censoring: float = Field(0.3, ge=0, lt=1)  # expected fraction of censored bags
    seed: int = 0  # the composition and the times
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # of real patients: train / val / test

    def study_spec(self) -> StudySpec:
        """The composition of the bags (one test set per W)."""
        k = self.bag_size
        return StudySpec(
            bag_size=k, train_bags=self.train_bags, val_bags=self.val_bags, test_bags=self.test_bags_per_w,
            train_witnesses=(1, k), val_witnesses=(1, k), test_witnesses=list(range(1, k + 1)),
            positive_fraction=self.positive_fraction, split_fractions=self.split_fractions, seed=self.seed,
        )


def censoring_rate(hazards: np.ndarray, fraction: float) -> float:
    """The rate c of exponential censoring whose expected censored fraction, mean(c / (c + hazard)), is
    ``fraction`` (bisection on a monotone function; 0 for no censoring)."""
    h = np.asarray(hazards, dtype=np.float64)
    if fraction <= 0:
        return 0.0
    if not 0 < fraction < 1 or h.size == 0 or np.any(h <= 0):
        raise HistomilError(f"censoring fraction must lie in [0, 1) and hazards be positive, got {fraction}")
    lo, hi = 0.0, float(h.max())
    while np.mean(hi / (hi + h)) < fraction:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.mean(mid / (mid + h)) < fraction else (lo, mid)
    return 0.5 * (lo + hi)


def draw_times(witnesses: np.ndarray, spec: SurvivalCohortSpec, seed: int) -> dict[str, np.ndarray]:
    """Event/censoring draws for bags with ``witnesses`` tumour tiles: ``time``, ``event`` (0/1 int),
    ``log_hazard`` (the oracle risk). The censoring rate is solved on these bags' hazards."""
    w = np.asarray(witnesses, dtype=np.float64)
    log_h = np.log(spec.baseline_hazard) + spec.beta * w / spec.bag_size
    hazard = np.exp(log_h)
    rng = np.random.default_rng([int(seed), 20_240_615])
    t_event = rng.exponential(1.0 / hazard)
    rate = censoring_rate(hazard, spec.censoring)
    t_cens = rng.exponential(1.0 / rate, size=w.size) if rate > 0 else np.full(w.size, np.inf)
    return {"time": np.minimum(t_event, t_cens), "event": (t_event <= t_cens).astype(np.int64), "log_hazard": log_h}


def witness_counts(study_dir: Path) -> list[tuple[str, str, str, int]]:
    """``(role, split, case, W)`` of every composed bag, from each split's tiles.csv (``tile_label`` 1 =
    tumour); the role is train / val / test (every ``test_K_W`` set is test)."""
    rows: list[tuple[str, str, str, int]] = []
    for split in (s["name"] for s in read_study(study_dir)["splits"]):
        counts: dict[str, int] = {}
        with open(study_dir / split / "tiles.csv", newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                counts[r["case"]] = counts.get(r["case"], 0) + int(r["tile_label"])
        role = "test" if split.startswith("test") else split
        rows += [(role, split, case, w) for case, w in sorted(counts.items())]
    return rows


def make_survival_cohort(
    tiles_csv: str | Path,
    out_dir: str | Path,
    spec: SurvivalCohortSpec = SurvivalCohortSpec(),
    features: Any = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Compose, encode and draw the cohort into ``out_dir`` (see the module docstring); returns cohort.csv.

    ``tiles_csv``: a tile table with ``path``, ``tumor`` (0/1) and ``case_id`` columns (EBHI's layout);
    ``features``: a :class:`histomil.pipeline.FeatureConfig` (default: EfficientNet-Lite0). Run again on
    the same folder, the composed bags and every feature file are reused (the tile cache).
    """
    from histomil.pipeline import FeatureConfig, extract_study

    out = Path(out_dir)
    study_dir, feat_dir, flat = out / "study", out / "features", out / "slides"
    table = read_tile_table(tiles_csv, "path", "tumor", "case_id")
    if not (study_dir / "study.json").is_file():
        compose_study(table, spec.study_spec(), study_dir)
    elif read_study(study_dir).get("spec") != spec.study_spec().model_dump(mode="json"):
        raise HistomilError(f"{study_dir}: composed with another spec; use another output folder")
    extract_study(study_dir, feat_dir, features or FeatureConfig(), log=log)
    bags = witness_counts(study_dir)
    draws = draw_times(np.array([w for *_, w in bags]), spec, spec.seed)
    flat.mkdir(parents=True, exist_ok=True)
    rows = []
    for (role, split, case, w), t, e, lh in zip(bags, draws["time"], draws["event"], draws["log_hazard"]):
        bag_id = f"{split}_{case}"
        src, dst = feat_dir / split / f"{case}.h5", flat / f"{bag_id}.h5"
        if not src.is_file():
            raise HistomilError(f"{src}: feature file of bag {bag_id} is missing after extraction")
        dst.unlink(missing_ok=True)
        os.link(src, dst)  # one file, two names: no copy of the features
        rows.append([bag_id, bag_id, repr(float(t)), int(e), "test" if role == "test" else "train", role, w, repr(float(lh))])
    table_path = out / "cohort.csv"
    with atomic_write(table_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COHORT_COLUMNS)
        writer.writerows(rows)
    write_json(out / "cohort.json", {"spec": spec.model_dump(mode="json"), "n_bags": len(rows),
                                     "censored_fraction": float(1 - draws["event"].mean()),
                                     "columns": list(COHORT_COLUMNS)})
    return table_path


def read_survival_cohort(table: str | Path) -> list[dict[str, Any]]:
    """The rows of a cohort.csv written by :func:`make_survival_cohort`, typed (time float, event int, W int)."""
    path = Path(table)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read cohort table ({exc.strerror or exc})") from None
    if not rows or any(c not in rows[0] for c in COHORT_COLUMNS):
        raise HistomilError(f"{path}: not a synthetic survival cohort (columns {', '.join(COHORT_COLUMNS)})")
    return [{"slide": r["slide"], "time": float(r["time"]), "event": int(r["event"]), "role": r["role"],
             "witnesses": int(r["witnesses"]), "log_hazard": float(r["log_hazard"])} for r in rows]


def with_targets(bag: FeatureBag, time: float, event: int, bag_id: str | None = None) -> FeatureBag:
    """The bag (renamed ``bag_id`` if given) with its survival target ``(time, event)`` set (features
    shared, not copied)."""
    return FeatureBag(bag_id or bag.bag_id, bag.features, bag.tile_paths, label=None, coords=bag.coords,
                      attrs=bag.attrs, target=(float(time), float(event)))


def cohort_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Bags, events and censored fraction per role (train / val / test), for logs and reports."""
    out = {}
    for split in ("train", "val", "test"):
        sub = [r for r in rows if r["role"] == split]
        ev = np.array([r["event"] for r in sub], dtype=np.float64)
        out[split] = {"bags": len(sub), "events": int(ev.sum()), "censored": float(1 - ev.mean()) if sub else float("nan")}
    return out

