"""Bags of tiles: folders-per-case (the original project's layout) or a manifest CSV.

Folder layout (read unchanged from the original project)::

    root/
      labels.csv        # case,y_true  (0 = negative, 1 = positive); root/df.csv also accepted
      <case id>/        # one sub-folder per bag, any number of tiles
        tile_001.jpg    # .jpg .jpeg .png .tif .tiff, any case

Manifest CSV: ``bag_id,path[,tile_label][,label]``, paths relative to the manifest's folder
unless absolute. Loading only lists files (fast); :func:`check_bags` decodes every tile.
Every mistake in the input is a one-line :class:`HistomilError` naming the file or case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from histomil.callbacks import Log
from histomil.data.csv_rows import read_csv_rows
from histomil.data.images import IMAGE_EXTENSIONS, read_rgb
from histomil.errors import BadTileError, HistomilError
from histomil.files import natural_key

LABEL_FILES = ("labels.csv", "df.csv")  # looked for in the bag root, in this order
IGNORED_FILES = {"thumbs.db", "desktop.ini", "__macosx"}  # compared lower-case; hidden names are ignored too
ON_BAD_TILE = ("error", "skip")

_logger = logging.getLogger("histomil.data")


@dataclass(frozen=True)
class Bag:
    """One bag: its id (the case), its tiles in order, and its label (None when unknown)."""

    bag_id: str
    tile_paths: tuple[Path, ...]
    label: int | None

    def __len__(self) -> int:
        return len(self.tile_paths)


# --------------------------------------------------------------------------------------------- CSV


def _read_csv(path: str | Path, required: Sequence[str], what: str,
              alternatives: dict[str, Sequence[str]] | None = None) -> tuple[Path, list[str], list[tuple[int, dict]]]:
    """Rows of a CSV as dicts keyed by lower-cased, stripped column names, with line numbers.

    ``alternatives`` maps a required column to other accepted names (e.g. case -> bag_id).
    """
    path = Path(path)
    names, rows = read_csv_rows(path, what)
    columns = [n.lower() for n in names]
    alternatives = alternatives or {}
    for name in required:
        if name not in columns and not any(alt in columns for alt in alternatives.get(name, ())):
            wanted = " or ".join([name, *alternatives.get(name, ())])
            raise HistomilError(f"{path}: {what} has no '{wanted}' column (columns: {', '.join(columns) or 'none'}; "
                                f"expected {', '.join(required)})")
    if not rows:
        raise HistomilError(f"{path}: {what} has a header but no rows")
    return path, columns, rows


def _parse_label(value: str, path: Path, line: int, who: str) -> int:
    if value == "0":
        return 0
    if value == "1":
        return 1
    if value == "":
        raise HistomilError(f"{path}: line {line}: {who} has no label (expected 0 or 1)")
    raise HistomilError(f"{path}: line {line}: {who} has label {value!r}, expected 0 or 1")


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """Bag labels from a CSV with columns ``case,y_true`` (0 = negative, 1 = positive)."""
    path, _, rows = _read_csv(path, ("case", "y_true"), "labels CSV")
    labels: dict[str, int] = {}
    for line, row in rows:
        case = row["case"]
        if not case:
            raise HistomilError(f"{path}: line {line}: empty case id")
        if case in labels:
            raise HistomilError(f"{path}: line {line}: case {case} appears more than once")
        labels[case] = _parse_label(row["y_true"], path, line, f"case {case}")
    return labels


def read_tile_truth(path: str | Path) -> dict[tuple[str, str], int]:
    """Known tile labels from ``case,path,tile_label`` (``bag_id`` accepted for ``case``).

    Returns ``{(case, path as written in the CSV): label}``; rows with an empty tile_label
    (unknown) are left out.
    """
    path, columns, rows = _read_csv(path, ("case", "path", "tile_label"), "tile labels CSV",
                                    alternatives={"case": ("bag_id",)})
    case_col = "case" if "case" in columns else "bag_id"
    truth: dict[tuple[str, str], int] = {}
    for line, row in rows:
        case, tile = row[case_col], row["path"]
        if not case or not tile:
            raise HistomilError(f"{path}: line {line}: empty {case_col if not case else 'path'}")
        if row["tile_label"] == "":
            continue
        key = (case, tile)
        if key in truth:
            raise HistomilError(f"{path}: line {line}: tile {tile} of case {case} appears more than once")
        truth[key] = _parse_label(row["tile_label"], path, line, f"tile {tile}")
    return truth


# ------------------------------------------------------------------------------------------ loading


def _check_mode(on_bad_tile: str) -> None:
    if on_bad_tile not in ON_BAD_TILE:
        raise HistomilError(f"on_bad_tile must be 'error' or 'skip', not {on_bad_tile!r}")


def _logger_or(log: Log | None) -> Log:
    return log if log is not None else _logger.warning


def _bad(message: str, on_bad_tile: str, log: Log) -> None:
    """A bad tile or stray file: raise in 'error' mode, log and go on in 'skip' mode."""
    if on_bad_tile == "error":
        raise HistomilError(message)
    log(f"skipped: {message}")


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _few(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _list_tiles(folder: Path, on_bad_tile: str, log: Log) -> tuple[Path, ...]:
    """Image files directly inside one bag folder, in natural file-name order."""
    tiles = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    except OSError as e:
        raise HistomilError(f"{folder}: cannot list bag folder ({e.strerror or e})") from None
    for entry in entries:
        if _ignored(entry.name):
            continue
        path = folder / entry.name
        if entry.is_dir():
            _bad(f"{path}: unexpected sub-folder inside a bag folder (tiles must sit directly in it)", on_bad_tile, log)
        elif not entry.is_file():
            _bad(f"{path}: not a regular file (broken link?)", on_bad_tile, log)
        elif not _is_image_name(entry.name):
            _bad(f"{path}: not a tile image (tiles must be {', '.join(IMAGE_EXTENSIONS)})", on_bad_tile, log)
        else:
            tiles.append(path)
    return tuple(tiles)


def _find_labels_csv(root: Path, labels_csv: str | Path | None) -> Path | None:
    if labels_csv is not None:
        return Path(labels_csv)
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    return None


def load_bag_folders(root: str | Path, labels_csv: str | Path | None = None, require_labels: bool = True,
                     on_bad_tile: str = "error", log: Log | None = None) -> list[Bag]:
    """Bags from ``root/<case>/<tiles>``, labelled from ``case,y_true`` (default root/labels.csv or root/df.csv).

    With ``require_labels=False`` no CSV is needed and unlabelled bags get label None. Files are
    only listed here, not decoded (see :func:`check_bags`).
    """
    _check_mode(on_bad_tile)
    log = _logger_or(log)
    root = Path(root)
    if not root.exists():
        raise HistomilError(f"{root}: bag folder not found")
    if not root.is_dir():
        raise HistomilError(f"{root}: not a folder (expected one sub-folder of tiles per case)")

    csv_path = _find_labels_csv(root, labels_csv)
    if csv_path is None and require_labels:
        raise HistomilError(f"{root}: no labels CSV (looked for {' and '.join(LABEL_FILES)}; "
                            "pass labels_csv with columns case,y_true)")
    labels = read_labels_csv(csv_path) if csv_path is not None else None

    folders = sorted((p for p in root.iterdir() if p.is_dir() and not _ignored(p.name)),
                     key=lambda p: natural_key(p.name))
    if not folders:
        loose = sum(1 for p in root.iterdir() if p.is_file() and _is_image_name(p.name))
        extra = (f"; it holds {loose} image files directly, put each case's tiles in a sub-folder named "
                 "by the case") if loose else ""
        raise HistomilError(f"{root}: no bag sub-folders (expected one sub-folder of tiles per case){extra}")

    if labels is not None:
        names = {p.name for p in folders}
        no_folder = sorted((c for c in labels if c not in names), key=natural_key)
        if no_folder:
            raise HistomilError(f"{csv_path}: {len(no_folder)} case(s) have no bag folder in {root}: {_few(no_folder)}")
        no_row = [p.name for p in folders if p.name not in labels]
        if no_row and require_labels:
            raise HistomilError(f"{csv_path}: {len(no_row)} bag folder(s) in {root} have no row: {_few(no_row)}")

    bags = []
    for folder in folders:
        tiles = _list_tiles(folder, on_bad_tile, log)
        if not tiles:
            raise HistomilError(f"{folder}: bag folder holds no tiles ({', '.join(IMAGE_EXTENSIONS)})")
        label = labels.get(folder.name) if labels is not None else None
        bags.append(Bag(folder.name, tiles, label))
    return bags


def load_manifest(manifest_csv: str | Path, labels_csv: str | Path | None = None, require_labels: bool = False,
                  on_bad_tile: str = "error", log: Log | None = None) -> list[Bag]:
    """Bags from a manifest CSV ``bag_id,path[,tile_label][,label]``; tiles keep the manifest's order.

    Labels come from ``labels_csv`` (case,y_true) or from a ``label`` column, which must be constant
    within a bag. Missing files and non-image names are errors (logged and skipped in 'skip' mode).
    """
    _check_mode(on_bad_tile)
    log = _logger_or(log)
    manifest, columns, rows = _read_csv(manifest_csv, ("bag_id", "path"), "manifest")
    base = manifest.parent
    has_label = "label" in columns
    tiles: dict[str, list[Path]] = {}
    seen: dict[str, set[Path]] = {}
    bag_label_values: dict[str, set[str]] = {}
    for line, row in rows:
        bag_id, rel = row["bag_id"], row["path"]
        if not bag_id or not rel:
            raise HistomilError(f"{manifest}: line {line}: empty {'bag_id' if not bag_id else 'path'}")
        if "tile_label" in columns and row["tile_label"] not in ("", "0", "1"):
            raise HistomilError(f"{manifest}: line {line}: tile_label {row['tile_label']!r}, expected 0, 1 or empty")
        if has_label:
            bag_label_values.setdefault(bag_id, set()).add(row["label"])
        tiles.setdefault(bag_id, [])
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        if path in seen.setdefault(bag_id, set()):
            raise HistomilError(f"{manifest}: line {line}: tile {rel} is listed twice in bag {bag_id}")
        seen[bag_id].add(path)
        if not _is_image_name(path.name):
            _bad(f"{path}: not a tile image (manifest line {line}; tiles must be {', '.join(IMAGE_EXTENSIONS)})",
                 on_bad_tile, log)
        elif not path.is_file():
            _bad(f"{path}: file not found (manifest line {line})", on_bad_tile, log)
        else:
            tiles[bag_id].append(path)

    manifest_labels: dict[str, int | None] = {}
    for bag_id, values in bag_label_values.items():
        if len(values) > 1:
            raise HistomilError(f"{manifest}: bag {bag_id} has differing labels in the label column: "
                                f"{', '.join(sorted(repr(v) for v in values))}")
        value = next(iter(values))
        if value not in ("", "0", "1"):
            raise HistomilError(f"{manifest}: bag {bag_id} has label {value!r} in the label column, expected 0 or 1")
        manifest_labels[bag_id] = None if value == "" else int(value)

    labels: dict[str, int | None] = dict(manifest_labels)
    if labels_csv is not None:
        csv_labels = read_labels_csv(labels_csv)
        no_bag = sorted((c for c in csv_labels if c not in tiles), key=natural_key)
        if no_bag:
            raise HistomilError(f"{labels_csv}: {len(no_bag)} case(s) have no bag in {manifest}: {_few(no_bag)}")
        for bag_id, value in manifest_labels.items():
            if value is not None and bag_id in csv_labels and csv_labels[bag_id] != value:
                raise HistomilError(f"{manifest}: bag {bag_id} has label {value} "
                                    f"but {labels_csv} says {csv_labels[bag_id]}")
        labels = {bag_id: csv_labels.get(bag_id, manifest_labels.get(bag_id)) for bag_id in tiles}
    if require_labels:
        unlabelled = sorted((b for b in tiles if labels.get(b) is None), key=natural_key)
        if unlabelled:
            source = labels_csv if labels_csv is not None else f"{manifest} (label column)"
            raise HistomilError(f"{source}: {len(unlabelled)} bag(s) have no label: {_few(unlabelled)}")

    bags = []
    for bag_id in sorted(tiles, key=natural_key):
        if not tiles[bag_id]:
            raise HistomilError(f"{manifest}: bag {bag_id} has no usable tiles")
        bags.append(Bag(bag_id, tuple(tiles[bag_id]), labels.get(bag_id)))
    return bags


def load_bags(source: str | Path, labels_csv: str | Path | None = None, require_labels: bool = True,
              on_bad_tile: str = "error", log: Log | None = None) -> list[Bag]:
    """Bags from a folder of bag folders or from a manifest ``.csv``."""
    source = Path(source)
    if source.is_dir():
        return load_bag_folders(source, labels_csv, require_labels, on_bad_tile, log)
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_manifest(source, labels_csv, require_labels, on_bad_tile, log)
    if not source.exists():
        raise HistomilError(f"{source}: not found (expected a folder of bag folders or a manifest .csv)")
    raise HistomilError(f"{source}: expected a folder of bag folders or a manifest .csv")


def check_bags(bags: Sequence[Bag], on_bad_tile: str = "error", log: Log | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[Bag]:
    """Decode every tile; raise on the first bad one, or in 'skip' mode drop (and log) bad tiles.

    ``progress(done, total)`` is called after each tile. A bag left with no tiles is an error.
    """
    _check_mode(on_bad_tile)
    log = _logger_or(log)
    total = sum(len(bag.tile_paths) for bag in bags)
    done = 0
    checked = []
    for bag in bags:
        kept = []
        for tile in bag.tile_paths:
            try:
                read_rgb(tile)
                kept.append(tile)
            except BadTileError as e:
                if on_bad_tile == "error":
                    raise
                log(f"skipped: {e}")
            done += 1
            if progress is not None:
                progress(done, total)
        if not kept:
            raise HistomilError(f"bag {bag.bag_id}: none of its {len(bag.tile_paths)} tiles can be read "
                                f"(first: {bag.tile_paths[0] if bag.tile_paths else 'none'})")
        checked.append(bag if len(kept) == len(bag.tile_paths) else replace(bag, tile_paths=tuple(kept)))
    return checked
