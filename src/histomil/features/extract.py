"""Streaming feature extraction: bag tiles in, one HDF5 feature file per bag out.

Decoding runs in background threads while the main thread encodes, so the two overlap (the JPEG
decoder and torch both release the GIL). Threads, not worker processes: on a 2-core machine a forked
decoding process cost a third of the pipeline's speed in copy-on-write page faults and pickling
(``benchmarks/throughput.py``, bf16: 114 tiles/s with one decoding process, 171 decoding in the main
thread, 180 with one decoding thread; the encoder alone 190).
Each distinct tile (by content hash) is encoded once through :class:`FeatureCache`; memory holds
one batch of pixels at a time and does not grow with the number of bags. Bags whose feature file
already exists are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histomil.data.bags import Bag
from histomil.data.images import file_digest, read_rgb
from histomil.errors import BadTileError, HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.store import FeatureBag, read_feature_bag, write_feature_bag

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ExtractionSummary:
    """What one extraction did, for the CLI to print and tests to check."""

    n_bags: int = 0
    n_written: int = 0
    n_skipped_existing: int = 0
    n_unique_tiles: int = 0
    n_encoded: int = 0
    bad_tiles: list[str] = field(default_factory=list)


def _decode(key: str, path: str, size: int) -> tuple[str, np.ndarray | None, str | None]:
    """(key, RGB tile resized to ``size`` if needed, None) or (key, None, the error) for a bad tile."""
    try:
        rgb = read_rgb(path)
    except BadTileError as exc:
        return key, None, str(exc)
    if rgb.shape[0] != size or rgb.shape[1] != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return key, rgb, None


def decoded_batches(
    items: Sequence[tuple[str, str]], size: int, batch_size: int, workers: int = 1
) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Batches of decoded ``(key, path)`` tiles, in order. With ``workers`` > 0, that many threads decode
    up to ``2 * workers`` batches ahead of the consumer; with 0, each batch is decoded when asked for."""
    items = list(items)

    def batch(start: int) -> list[tuple[str, np.ndarray | None, str | None]]:
        return [_decode(k, p, size) for k, p in items[start : start + batch_size]]

    starts = range(0, len(items), batch_size)
    if workers <= 0:
        yield from (batch(s) for s in starts)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histomil-decode") as pool:
        ahead: deque[Future] = deque()
        for s in starts:
            ahead.append(pool.submit(batch, s))
            if len(ahead) > 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def tile_digests(paths: Sequence[Path], progress: Progress | None = None) -> dict[str, str]:
    """Content hash of every distinct tile file (symlinked copies are hashed once)."""
    by_real: dict[str, str] = {}
    out: dict[str, str] = {}
    unique = list(dict.fromkeys(str(p) for p in paths))
    for i, p in enumerate(unique):
        real = str(Path(p).resolve())
        if real not in by_real:
            try:
                by_real[real] = file_digest(p)
            except OSError as exc:
                raise BadTileError(p, f"cannot read file ({exc.strerror or exc})") from None
        out[p] = by_real[real]
        if progress and (i % 256 == 0 or i == len(unique) - 1):
            progress("hashing tiles", i + 1, len(unique))
    return out


def encode_into_cache(
    items: Sequence[tuple[str, str]],
    encoder: torch.nn.Module,
    cache: FeatureCache,
    batch_size: int = 64,
    num_workers: int = 1,
    shard_size: int = 1024,
    on_bad_tile: str = "error",
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Encode (key, path) tiles not yet in ``cache``; returns the keys of bad tiles skipped."""
    info = encoder.info
    pending_keys: list[str] = []
    pending_feats: list[np.ndarray] = []
    bad: list[str] = []
    done = 0
    for batch in decoded_batches(items, info.input_size, batch_size, num_workers):
        good = [(k, rgb) for k, rgb, err in batch if err is None]
        for key, _, err in batch:
            if err is not None:
                if on_bad_tile != "skip":
                    raise HistomilError(err)
                bad.append(key)
                if log:
                    log(f"skipped bad tile {err}")
        if good:
            feats = encoder.encode(np.stack([rgb for _, rgb in good]), batch_size=batch_size)
            pending_keys.extend(k for k, _ in good)
            pending_feats.append(feats)
        done += len(batch)
        if len(pending_keys) >= shard_size:
            cache.add(pending_keys, np.concatenate(pending_feats))
            pending_keys, pending_feats = [], []
        if progress:
            progress("encoding tiles", done, len(items))
    if pending_keys:
        cache.add(pending_keys, np.concatenate(pending_feats))
    return bad


def _existing_ok(path: Path, n_tiles_max: int, attrs: dict) -> bool:
    """Whether a feature file already written can be kept: same encoder, precision and runtime, plausible size."""
    if not path.exists():
        return False
    try:
        fb = read_feature_bag(path)
    except HistomilError:
        return False
    same_precision = fb.attrs.get("precision", attrs.get("precision")) == attrs.get("precision")
    same_runtime = fb.attrs.get("runtime", "torch") == attrs.get("runtime", "torch")  # files before runtimes: torch
    return fb.attrs.get("encoder") == attrs["encoder"] and same_precision and same_runtime and 0 < len(fb) <= n_tiles_max


def extract_bags(
    bags: Sequence[Bag],
    out_dir: str | Path,
    encoder: torch.nn.Module,
    cache: FeatureCache,
    batch_size: int = 64,
    num_workers: int = 1,
    on_bad_tile: str = "error",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> ExtractionSummary:
    """Write ``out_dir/<bag_id>.h5`` for every bag, encoding each distinct tile once."""
    if on_bad_tile not in ("error", "skip"):
        raise HistomilError(f"--on-bad-tile must be 'error' or 'skip', not {on_bad_tile!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attrs = encoder.feature_attrs()  # encoder, precision, runtime, hardware
    summary = ExtractionSummary(n_bags=len(bags))
    todo = [
        b for b in bags if overwrite or not _existing_ok(out_dir / f"{b.bag_id}.h5", len(b.tile_paths), attrs)
    ]
    summary.n_skipped_existing = len(bags) - len(todo)
    all_paths = [str(p) for b in todo for p in b.tile_paths]
    digests = tile_digests([Path(p) for p in all_paths], progress)
    summary.n_unique_tiles = len(set(digests.values()))
    first_path: dict[str, str] = {}
    for p, k in digests.items():
        first_path.setdefault(k, p)
    missing = cache.missing(digests[p] for p in all_paths)
    summary.n_encoded = len(missing)
    bad_keys = set(
        encode_into_cache(
            [(k, first_path[k]) for k in missing], encoder, cache, batch_size, num_workers,
            on_bad_tile=on_bad_tile, log=log, progress=progress,
        )
    )
    summary.bad_tiles = sorted(first_path[k] for k in bad_keys)
    for i, bag in enumerate(todo):
        paths = [str(p) for p in bag.tile_paths if digests[str(p)] not in bad_keys]
        if not paths:
            raise HistomilError(f"bag {bag.bag_id}: every tile is unreadable, the bag is empty")
        feats = cache.get_many([digests[p] for p in paths])
        write_feature_bag(
            out_dir / f"{bag.bag_id}.h5",
            FeatureBag(bag_id=bag.bag_id, features=feats, tile_paths=paths, label=bag.label, attrs=attrs),
        )
        summary.n_written += 1
        if progress:
            progress("writing bag features", i + 1, len(todo))
    return summary


def copy_sidecars(src_dir: Path, out_dir: Path) -> None:
    """Copy a bag folder's labels and tile-truth CSVs beside its feature files."""
    for name in ("labels.csv", "df.csv", "tiles.csv"):
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / ("labels.csv" if name == "df.csv" else name))
