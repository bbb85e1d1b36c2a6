"""A synthetic slide cohort with known tumour positions, built from real labelled tiles.

Each slide is a pyramidal TIFF (:mod:`histomil.slides.pyramid_tiff`) whose level 0 is a grid of real
tiles surrounded by white glass (``tile_size`` pixels, on a grid starting at (0, 0), so ``histomil tile --tile-size 224 --mpp
0.5`` cuts exactly the tiles placed). A synthetic patient draws its tiles from tile-table patients
("donor cases") that no other synthetic patient uses, so a patient-grouped split of the cohort is also
grouped by source patient. Positive patients get a connected region of tumour tiles in their first
slide (and possibly others), from a single tile to a large region; negative patients only non-tumour
tiles. Some patients have 2-3 slides, some slides have more white cells along one edge of the tissue, and a
few slides carry no resolution in their header. Everything is drawn from one seed.

A donor tile may appear more than once in a patient's slides, then rotated or mirrored (the 8
symmetries of the square, the unrotated copies first): the source tables hold few tiles per patient.

Outputs (:func:`build_cohort`): ``slides/<slide>.tif``, ``cohort.csv`` (slide, patient, label, split),
``truth.csv`` (every grid cell: level-0 x, y, size, content, is_tumour, source tile), ``cohort.json``
(the parameters, per-slide facts, source attribution) and ``README.md``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from histomil.callbacks import Progress
from histomil.data.images import read_rgb
from histomil.data.tile_table import TileTable, read_tile_table
from histomil.errors import HistomilError
from histomil.files import write_json, write_text
from histomil.slides.pyramid_tiff import write_pyramidal_tiff

EBHI_ATTRIBUTION = (
    "Tiles from EBHI-Seg: Shi L, Li X, Hu W, et al., 'EBHI-Seg: A novel enteroscope biopsy histopathological "
    "hematoxylin and eosin image dataset for image segmentation tasks', Frontiers in Medicine 10:1114673 (2023); "
    "figshare doi:10.6084/m9.figshare.21540159; licence CC BY 4.0. Rearranged into synthetic slides by histomil."
)
TUMOUR, NON_TUMOUR, BACKGROUND = "tumour", "non_tumour", "background"
GLASS = (243, 242, 240)  # RGB of the empty slide glass
TRUTH_COLUMNS = ["slide", "patient", "col", "row", "x", "y", "size", "content", "is_tumour", "source", "orientation"]


class SynthCohortSpec(BaseModel):
    """What to build: cohort size, slide sizes, tumour regions, the imperfections, the seed."""

    model_config = ConfigDict(extra="forbid")

    patients: int = Field(12, ge=4, description="synthetic patients")
    positive_fraction: float = Field(0.5, gt=0, lt=1, description="fraction of patients with tumour")
    multi_slide_fraction: float = Field(0.3, ge=0, le=1, description="fraction of patients with 2..max_slides slides")
    max_slides: int = Field(3, ge=2, le=26, description="most slides of one patient")
    grid_min: int = Field(4, ge=2, description="fewest tissue tiles along a slide side")
    grid_max: int = Field(6, ge=2, description="most tissue tiles along a slide side")
    margin: int = Field(2, ge=0, description="cells of white glass around the tissue (tissue detection needs glass)")
    tile_size: int = Field(224, ge=16, description="tile side in pixels (the tiles of the table must have it)")
    mpp: float = Field(0.5, gt=0, description="level-0 micrometres per pixel written to the slides")
    max_tumour_fraction: float = Field(0.5, gt=0, le=1, description="largest tumour region, fraction of a slide's tissue")
    tumour_free_fraction: float = Field(0.25, ge=0, le=1, description="chance a positive patient's 2nd/3rd slide has no tumour")
    background_fraction: float = Field(0.4, ge=0, le=1, description="fraction of slides with white cells along one edge")
    no_mpp_slides: int = Field(2, ge=0, description="slides written without resolution tags")
    test_fraction: float = Field(0.25, ge=0, lt=1, description="fraction of patients (per class) in split 'test'")
    max_orientations: int = Field(4, ge=1, le=8, description="most copies of one tile per patient (4: rotations; up to 8 with mirroring)")
    seed: int = 0
    attribution: str = EBHI_ATTRIBUTION

    @model_validator(mode="after")
    def _grid_order(self) -> SynthCohortSpec:
        if self.grid_min > self.grid_max:
            raise ValueError(f"grid_min ({self.grid_min}) is larger than grid_max ({self.grid_max})")
        return self


@dataclass
class SlidePlan:
    """One slide: its grid and what each cell holds (content, source tile, orientation)."""

    slide: str
    patient: str
    cols: int
    rows: int
    content: np.ndarray  # (rows, cols) of TUMOUR / NON_TUMOUR / BACKGROUND
    mpp: float | None = None
    sources: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (row, col) -> (tile index, orientation)

    @property
    def n_tumour(self) -> int:
        return int((self.content == TUMOUR).sum())


@dataclass
class PatientPlan:
    patient: str
    label: int
    split: str
    slides: list[SlidePlan]
    donors: list[str] = field(default_factory=list)


def _orient(tile: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 symmetries of the square (0 = as is; 1-3 rotations; 4-7 mirrored)."""
    out = np.rot90(tile, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def _grow_region(tissue: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 4-connected set of ``size`` tissue cells grown from a random seed cell (boolean mask)."""
    cells = np.argwhere(tissue)
    region = np.zeros_like(tissue, dtype=bool)
    r, c = cells[rng.integers(len(cells))]
    region[r, c] = True
    frontier = {(int(r), int(c))}
    while region.sum() < size:
        options = sorted({(rr + dr, cc + dc) for rr, cc in frontier for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                          if 0 <= rr + dr < tissue.shape[0] and 0 <= cc + dc < tissue.shape[1]
                          and tissue[rr + dr, cc + dc] and not region[rr + dr, cc + dc]})
        if not options:
            break
        nxt = options[rng.integers(len(options))]
        region[nxt] = True
        frontier.add(nxt)
    return region


def _background_mask(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """White cells: a run of cells along one random edge, leaving most of the slide tissue."""
    mask = np.zeros((rows, cols), dtype=bool)
    side = int(rng.integers(4))
    length = cols if side < 2 else rows
    run = int(rng.integers(1, max(2, length - 1)))
    start = int(rng.integers(0, length - run + 1))
    if side == 0:
        mask[0, start:start + run] = True
    elif side == 1:
        mask[rows - 1, start:start + run] = True
    elif side == 2:
        mask[start:start + run, 0] = True
    else:
        mask[start:start + run, cols - 1] = True
    return mask


def _patient_ids(n: int) -> list[str]:
    width = max(3, len(str(n)))
    return [f"SYN-{i + 1:0{width}d}" for i in range(n)]


def _layout(spec: SynthCohortSpec, rng: np.random.Generator) -> list[PatientPlan]:
    """Patients, labels, splits, slide grids, background cells and tumour regions (no tiles yet)."""
    ids = _patient_ids(spec.patients)
    n_pos = min(spec.patients - 1, max(1, round(spec.positive_fraction * spec.patients)))
    labels = np.zeros(spec.patients, dtype=int)
    labels[rng.permutation(spec.patients)[:n_pos]] = 1
    split = ["train"] * spec.patients
    if spec.test_fraction > 0:
        for cls in (0, 1):
            members = np.flatnonzero(labels == cls)
            n_test = min(len(members) - 1, max(1, round(spec.test_fraction * len(members))))
            for i in rng.permutation(members)[:n_test]:
                split[i] = "test"
    patients: list[PatientPlan] = []
    for i, pid in enumerate(ids):
        n_slides = int(rng.integers(2, spec.max_slides + 1)) if rng.random() < spec.multi_slide_fraction else 1
        slides = []
        for s in range(n_slides):
            rows, cols = (int(v) for v in rng.integers(spec.grid_min, spec.grid_max + 1, size=2))
            tissue = np.full((rows, cols), NON_TUMOUR, dtype=object)
            if rng.random() < spec.background_fraction:
                tissue[_background_mask(rows, cols, rng)] = BACKGROUND
            m = spec.margin
            content = np.full((rows + 2 * m, cols + 2 * m), BACKGROUND, dtype=object)
            content[m:m + rows, m:m + cols] = tissue
            slides.append(SlidePlan(f"{pid}-{chr(ord('A') + s)}", pid, cols + 2 * m, rows + 2 * m, content, spec.mpp))
        patients.append(PatientPlan(pid, int(labels[i]), split[i], slides))
    tumour_slides = [sl for p in patients if p.label for k, sl in enumerate(p.slides)
                     if k == 0 or rng.random() >= spec.tumour_free_fraction]
    order = rng.permutation(len(tumour_slides))
    for rank, idx in enumerate(order):  # region sizes spread log-evenly from 1 tile to the largest allowed
        sl = tumour_slides[idx]
        tissue = sl.content != BACKGROUND
        largest = max(1, math.floor(spec.max_tumour_fraction * int(tissue.sum())))
        q = rank / (len(order) - 1) if len(order) > 1 else 0.0
        size = max(1, min(largest, round(largest ** q)))
        sl.content[_grow_region(tissue, size, rng)] = TUMOUR
    all_slides = [sl for p in patients for sl in p.slides]
    for idx in rng.permutation(len(all_slides))[:spec.no_mpp_slides]:
        all_slides[idx].mpp = None
    return patients


def _assign_tiles(patients: list[PatientPlan], table: TileTable, spec: SynthCohortSpec, rng: np.random.Generator) -> None:
    """Give each patient its own donor cases and each tissue cell a (tile, orientation)."""
    by_case: dict[str, dict[int, list[int]]] = {}
    for i, (case, label) in enumerate(zip(table.patients, table.labels.tolist())):
        by_case.setdefault(case, {0: [], 1: []})[int(label)].append(i)
    cases = sorted(by_case)
    tumour_cases = [cases[i] for i in rng.permutation(len(cases)) if by_case[cases[i]][1]]
    clean_cases = [cases[i] for i in rng.permutation(len(cases)) if not by_case[cases[i]][1] and by_case[cases[i]][0]]
    used: set[str] = set()

    def take(pool: list[str], kind: int, need: int, pid: str) -> list[int]:
        """Donor cases for ``need`` cells: the smallest free case that covers what is left, else the largest
        (few tiles are wasted, so the table's patients go further); ties in the pool's shuffled order."""
        tiles: list[int] = []
        while len(tiles) * spec.max_orientations < need:
            free = [c for c in pool if c not in used]
            if not free:
                what = "tumour" if kind else "tumour-free"
                raise HistomilError(
                    f"{table.source}: too few {what} patients for the synthetic cohort (patient {pid} needs {need} "
                    f"{'tumour' if kind else 'non-tumour'} tiles); ask for fewer patients or smaller slides")
            left = need - len(tiles) * spec.max_orientations
            size = {c: len(by_case[c][kind]) for c in free}
            fits = [c for c in free if size[c] * spec.max_orientations >= left]
            pick = min(fits, key=size.__getitem__) if fits else max(free, key=size.__getitem__)
            used.add(pick)
            tiles.extend(by_case[pick][kind])
        return tiles

    for p in patients:
        need = {k: sum(int((sl.content == c).sum()) for sl in p.slides) for k, c in ((1, TUMOUR), (0, NON_TUMOUR))}
        pools: dict[int, list[int]] = {0: [], 1: []}
        if need[1]:
            pools[1] = take(tumour_cases, 1, need[1], p.patient)
            donor = table.patients[pools[1][0]]
            pools[0] = list(by_case[donor][0])  # the tumour donor's own normal tissue first
            p.donors.append(donor)
        if len(pools[0]) * spec.max_orientations < need[0]:
            extra = take(clean_cases, 0, need[0] - len(pools[0]) * spec.max_orientations, p.patient)
            p.donors.extend(dict.fromkeys(table.patients[i] for i in extra))
            pools[0] += extra
        for kind, content in ((1, TUMOUR), (0, NON_TUMOUR)):
            tiles = pools[kind]
            queue = [(tiles[j], o) for o in range(spec.max_orientations) for j in rng.permutation(len(tiles))]
            cells = [(sl, (r, c)) for sl in p.slides for r, c in np.argwhere(sl.content == content).tolist()]
            for (sl, rc), src in zip(cells, queue):
                sl.sources[(int(rc[0]), int(rc[1]))] = (int(src[0]), int(src[1]))


def plan_cohort(table: TileTable, spec: SynthCohortSpec) -> list[PatientPlan]:
    """The whole cohort, decided from ``spec.seed`` alone (no pixels read)."""
    rng = np.random.default_rng(spec.seed)
    patients = _layout(spec, rng)
    _assign_tiles(patients, table, spec, rng)
    return patients


class _TileReader:
    """Decoded source tiles, each read once and checked for size."""

    def __init__(self, table: TileTable, size: int) -> None:
        self.table, self.size, self.cache = table, size, {}

    def __call__(self, index: int) -> np.ndarray:
        if index not in self.cache:
            path = self.table.paths[index]
            tile = read_rgb(path)
            if tile.shape[:2] != (self.size, self.size):
                raise HistomilError(f"{path}: tile is {tile.shape[1]}x{tile.shape[0]} pixels, the cohort needs "
                                    f"{self.size}x{self.size} (--tile-size)")
            self.cache[index] = tile
        return self.cache[index]


def render_slide(plan: SlidePlan, tiles: Callable[[int], np.ndarray], size: int) -> np.ndarray:
    """Level 0 of one slide: tiles in their cells, off-white glass elsewhere."""
    image = np.empty((plan.rows * size, plan.cols * size, 3), dtype=np.uint8)
    image[:] = GLASS
    for (r, c), (index, orientation) in plan.sources.items():
        image[r * size:(r + 1) * size, c * size:(c + 1) * size] = _orient(tiles(index), orientation)
    return image


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _relative(path: str, base: Path) -> str:
    """``path`` relative to the tile table's folder when inside it (portable truth files), else as is."""
    full = Path(path).resolve()
    return full.relative_to(base).as_posix() if full.is_relative_to(base) else str(path)


def _truth_rows(p: PatientPlan, sl: SlidePlan, table: TileTable, size: int) -> list[list]:
    base = Path(table.source).resolve().parent
    rows = []
    for r in range(sl.rows):
        for c in range(sl.cols):
            content = str(sl.content[r, c])
            src, orientation = sl.sources.get((r, c), (None, ""))
            source = "" if src is None else _relative(table.paths[src], base)
            rows.append([sl.slide, p.patient, c, r, c * size, r * size, size, content, int(content == TUMOUR),
                         source, orientation])
    return rows


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HistomilError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise HistomilError(f"{out}: folder is not empty; use --overwrite to replace a synthetic cohort there")
        if not (out / "cohort.json").is_file():
            raise HistomilError(f"{out}: not a synthetic cohort folder (no cohort.json); refusing to overwrite it")
        for old in (out / "slides").glob("*.tif"):
            old.unlink()


def _readme(spec: SynthCohortSpec, summary: dict) -> str:
    return (
        "# Synthetic slide cohort (histomil synth-cohort)\n\n"
        f"{summary['n_patients']} patients ({summary['n_positive_patients']} with tumour), {summary['n_slides']} "
        f"slides, seed {spec.seed}. Slides are pyramidal TIFFs at {spec.mpp} um/px (except "
        f"{spec.no_mpp_slides} without resolution tags: tile them with --slide-mpp {spec.mpp}); every cell of the "
        f"{spec.tile_size}-pixel grid is a real tile, a rotated/mirrored copy of one, or white background.\n\n"
        "* `cohort.csv`: slide, patient, label (1 = the patient has tumour), split (train / test, by patient).\n"
        "* `truth.csv`: every grid cell: level-0 x, y and size, content (tumour, non_tumour, background), "
        "is_tumour, the source tile and its orientation (0 as is, 1-3 rotated, 4-7 mirrored).\n"
        "* `cohort.json`: the generation parameters and per-slide facts.\n\n"
        "Each synthetic patient takes its tiles from source patients no other synthetic patient uses.\n\n"
        f"## Source\n\n{spec.attribution}\n"
    )


def build_cohort(
    tile_table: str | Path,
    out: str | Path,
    spec: SynthCohortSpec,
    overwrite: bool = False,
    progress: Progress | None = None,
    label_col: str = "tumor",
    patient_col: str = "case_id",
    path_col: str = "path",
) -> dict:
    """Build the cohort described by ``spec`` from ``tile_table`` into ``out``; returns the summary."""
    out = Path(out)
    table = read_tile_table(tile_table, path_col, label_col, patient_col)
    patients = plan_cohort(table, spec)
    _prepare_out(out, overwrite)
    reader = _TileReader(table, spec.tile_size)
    slides = [(p, sl) for p in patients for sl in p.slides]
    cohort_rows, truth_rows, facts = [], [], []
    for i, (p, sl) in enumerate(slides):
        image = render_slide(sl, reader, spec.tile_size)
        levels = write_pyramidal_tiff(out / "slides" / f"{sl.slide}.tif", image, sl.mpp,
                                      description=f"histomil synthetic slide {sl.slide}")
        cohort_rows.append([sl.slide, p.patient, p.label, p.split])
        truth_rows += _truth_rows(p, sl, table, spec.tile_size)
        facts.append({"slide": sl.slide, "patient": p.patient, "label": p.label, "split": p.split,
                      "width": sl.cols * spec.tile_size, "height": sl.rows * spec.tile_size, "levels": levels,
                      "mpp": sl.mpp, "tumour_tiles": sl.n_tumour,
                      "tissue_tiles": int((sl.content != BACKGROUND).sum()),
                      "background_tiles": int((sl.content == BACKGROUND).sum())})
        if progress:
            progress("writing slides", i + 1, len(slides))
    summary = {
        "n_patients": len(patients),
        "n_positive_patients": sum(p.label for p in patients),
        "n_test_patients": sum(p.split == "test" for p in patients),
        "n_slides": len(slides),
        "n_tumour_slides": sum(f["tumour_tiles"] > 0 for f in facts),
    }
    write_text(out / "cohort.csv", _csv_text(["slide", "patient", "label", "split"], cohort_rows))
    write_text(out / "truth.csv", _csv_text(TRUTH_COLUMNS, truth_rows))
    write_text(out / "README.md", _readme(spec, summary))
    write_json(out / "cohort.json", {
        "generator": "histomil synth-cohort", "spec": spec.model_dump(), "tile_table": str(tile_table),
        "tile_table_digest": table.digest(), "summary": summary, "slides": facts,
        "patients": {p.patient: {"label": p.label, "split": p.split, "donor_cases": p.donors} for p in patients},
    })
    return summary
