"""Feature bags read from their files when used, so a cohort larger than memory can be trained on.

A :class:`LazyFeatureBag` is a :class:`~histomil.features.store.FeatureBag` that keeps only what a
trainer needs up front (bag id, label, attributes, the number of tiles and the feature dimension,
and a digest of the feature values) and reads ``features``, ``tile_paths`` and ``coords`` from its
file, through the one reader :func:`histomil.features.formats.load_any_features`, each time they are
accessed. Nothing is cached: holding many lazy bags costs a few hundred bytes each.

:func:`scan_feature_bag` reads each file once when the bag is made, one file at a time, so every
check of the eager reader (layout, shape, NaN/inf values, encoder, geometry) fails before training
starts and not hours into it, and the digest lets a resumed run tell whether the data changed
without reading the cohort again. :func:`lazy_features_folder` is
:func:`histomil.features.formats.load_features_folder` with lazy bags.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.features.formats import load_any_features, load_features_folder
from histomil.features.store import FeatureBag


def features_digest(features: np.ndarray) -> str:
    """SHA-256 of a bag's feature values as float32 (what training sees), hex."""
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).data).hexdigest()


class LazyFeatureBag(FeatureBag):
    """A bag whose features stay in its file until accessed (see the module docstring)."""

    def __init__(self, path: str | Path, bag_id: str, label: int | None, n_tiles: int, dim: int, digest: str,
                 attrs: dict[str, Any], options: dict[str, Any], stat: tuple[int, int]) -> None:
        self.path = Path(path)
        self.bag_id = bag_id
        self.label = label
        self.target: tuple[float, ...] | None = None  # regression / survival target, when the file has one
        self.attrs = attrs
        self.n_tiles = int(n_tiles)
        self.dim = int(dim)
        self.digest = digest
        self.options = options  # mpp, tile_size, coords_dir: what load_any_features needs again
        self.stat = stat  # (size, mtime_ns) when scanned: a file replaced since is refused

    def load(self) -> FeatureBag:
        """The whole bag from its file, checked against what the scan saw."""
        st = _stat(self.path)
        if st != self.stat:
            raise HistomilError(f"{self.path}: feature file changed since it was read at the start of this run; start again")
        bag = load_any_features(self.path, **self.options)
        if bag.features.shape != (self.n_tiles, self.dim):
            raise HistomilError(f"{self.path}: features now have shape {bag.features.shape}, "
                                f"({self.n_tiles}, {self.dim}) when the run started")
        bag.bag_id, bag.label, bag.attrs = self.bag_id, self.label, self.attrs
        if self.target is not None:
            bag.target = self.target
        return bag

    @property  # type: ignore[override]
    def features(self) -> np.ndarray:
        """(N, D) float32, read from the file now."""
        return self.load().features

    @property  # type: ignore[override]
    def tile_paths(self) -> list[str]:
        return self.load().tile_paths

    @property  # type: ignore[override]
    def coords(self) -> np.ndarray | None:
        return self.load().coords

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_tiles, self.dim

    def __len__(self) -> int:
        return self.n_tiles

    def __repr__(self) -> str:
        return f"LazyFeatureBag({self.bag_id!r}, {self.n_tiles}x{self.dim}, label={self.label}, path={str(self.path)!r})"

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyFeatureBag) and (self.path, self.digest, self.label) == (other.path, other.digest, other.label)


class LazyCombinedBag(LazyFeatureBag):
    """One bag of the tiles of several lazy bags (e.g. all the slides of a patient), put together by
    ``combine`` (a function of the loaded parts) each time it is read; shape and digest from the parts."""

    def __init__(self, bag_id: str, parts: Sequence[LazyFeatureBag], label: int | None, attrs: dict[str, Any],
                 combine: Callable[[list[FeatureBag]], FeatureBag]) -> None:
        if not parts:
            raise HistomilError(f"bag {bag_id!r}: no parts to combine")
        self.parts = list(parts)
        self.combine = combine
        self.path = self.parts[0].path
        self.bag_id, self.label, self.attrs, self.target = bag_id, label, attrs, None
        self.n_tiles = sum(p.n_tiles for p in self.parts)
        self.dim = self.parts[0].dim
        self.digest = hashlib.sha256("|".join(p.digest for p in self.parts).encode()).hexdigest()
        self.options, self.stat = {}, (0, 0)

    def load(self) -> FeatureBag:
        bag = self.combine([p.load() for p in self.parts])
        bag.bag_id, bag.label, bag.attrs = self.bag_id, self.label, self.attrs
        if self.target is not None:  # a patient's regression / survival target (evaluation/target_cv.with_targets)
            bag.target = self.target
        return bag

    def __repr__(self) -> str:
        return f"LazyCombinedBag({self.bag_id!r}, {len(self.parts)} parts, {self.n_tiles}x{self.dim}, label={self.label})"


def bag_digest(bag: FeatureBag) -> str:
    """The digest of a bag's features: a lazy bag's from its scan, an in-memory bag's computed now (the same value)."""
    return bag.digest if isinstance(bag, LazyFeatureBag) else features_digest(bag.features)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HistomilError(f"{path}: feature file is gone or unreadable ({exc.strerror})") from None
    return int(st.st_size), int(st.st_mtime_ns)


def scan_feature_bag(path: str | Path, mpp: float | None = None, label: int | None = None,
                     check: Callable[[FeatureBag], None] | None = None, **options: Any) -> LazyFeatureBag:
    """Read and check one feature file (any layout :func:`load_any_features` reads) and keep only its
    description: a :class:`LazyFeatureBag`. Same arguments as :func:`load_any_features`; ``check``: a
    further check of the bag read (e.g. :func:`histomil.features.validate.check_feature_bag`)."""
    path = Path(path)
    stat = _stat(path)
    opts = {"mpp": mpp, **options}
    bag = load_any_features(path, label=label, **opts)
    if check is not None:
        check(bag)
    lazy = LazyFeatureBag(path, bag.bag_id, bag.label, bag.features.shape[0], bag.features.shape[1],
                          features_digest(bag.features), bag.attrs, opts, stat)
    lazy.target = getattr(bag, "target", None)
    return lazy


def lazy_features_folder(folder: str | Path, labels_csv: str | Path | None = None, require_labels: bool = True,
                         **options: Any) -> list[LazyFeatureBag]:
    """:func:`histomil.features.formats.load_features_folder` (same labels, checks and options) with
    :class:`LazyFeatureBag` bags: the folder is read once, one file at a time, and nothing stays in memory."""
    return load_features_folder(folder, labels_csv, require_labels, read=scan_feature_bag, **options)  # type: ignore[return-value]


def in_memory_bytes(bags: list[FeatureBag]) -> int:
    """Bytes the bags' features take as float32 once loaded (lazy bags from their scanned shape)."""
    return sum(4 * int(np.prod(b.shape)) for b in bags)


#: ``stream="auto"`` keeps a cohort in memory while its float32 features (times the processes on this
#: machine) take at most this share of the physical memory, and streams it from the files otherwise.
MEMORY_SHARE = 0.25


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def read_training_folder(folder: str | Path, stream: str = "auto", processes: int = 1, **options: Any) -> list[FeatureBag]:
    """The labelled bags of a feature folder for training: in memory (``stream="off"``, one read, the
    fast path), as :class:`LazyFeatureBag` (``"on"``: only one bag at a time in memory), or (``"auto"``)
    scanned lazily and then loaded into memory when ``processes`` copies of their float32 features fit
    in :data:`MEMORY_SHARE` of the physical memory. ``options``: those of :func:`lazy_features_folder`."""
    if stream not in ("auto", "on", "off"):
        raise HistomilError(f"stream must be auto, on or off, not {stream!r}")
    if stream == "off":
        return load_features_folder(folder, require_labels=True, **options)
    bags = lazy_features_folder(folder, require_labels=True, **options)
    if stream == "auto" and fits_in_memory(bags, processes):
        return [b.load() for b in bags]
    return list(bags)


def fits_in_memory(bags: list[FeatureBag], processes: int = 1) -> bool:
    """Whether ``processes`` copies of the bags' float32 features fit in :data:`MEMORY_SHARE` of the
    physical memory (the ``stream="auto"`` rule; True where the OS does not say how much there is)."""
    total = physical_memory_bytes()
    return total is None or in_memory_bytes(bags) * max(1, processes) <= MEMORY_SHARE * total
