"""Streaming feature extraction: bag tiles in, one HDF5 feature file per bag out.

Decoding runs in background threads while the main thread encodes, so the two overlap (the JPEG
decoder and torch both release the GIL). Threads, not worker processes: on a 2-core machine a forked
decoding process cost a third of the pipeline's speed in copy-on-write page faults and pickling
(``benchmarks/throughput.py``, bf16: 114 tiles/s with one decoding process, 171 decoding in the main
thread, 180 with one decoding thread; the encoder alone 190).
Each distinct tile (by content hash) is encoded once through :class:`FeatureCache`; memory holds
one batch of pixels at a time and does not grow with the number of bags. Bags whose feature file
already exists from the same tiles (content digest), encoder and precision are skipped, so an
interrupted run resumes where it stopped and a changed bag is encoded again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histomil.callbacks import Progress
from histomil.data.bags import Bag
from histomil.data.images import file_digest, read_rgb
from histomil.errors import BadTileError, HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.shards import Shard
from histomil.features.store import FeatureBag, read_feature_bag, write_feature_bag
from histomil.features.tile_encoder import fit_tile
from histomil.files import atomic_write, exclusive_output, remove_temp_leftovers

CONTENT_DIGEST = "content_digest"  # feature file attribute: digest of the bag's tile names and bytes


@dataclass
class ExtractionSummary:
    """What one extraction did, for the CLI to print and tests to check."""

    n_bags: int = 0
    n_written: int = 0
    n_skipped_existing: int = 0
    n_changed: int = 0  # feature files written again because their tiles, encoder or precision changed
    n_relabelled: int = 0  # feature files whose label alone changed, rewritten without encoding
    n_unique_tiles: int = 0
    n_encoded: int = 0
    bad_tiles: list[str] = field(default_factory=list)


def _decode(key: str, path: str, size: int, fit: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[str, np.ndarray | None, str | None]:
    """(key, RGB tile resized to ``size`` (or made even by ``fit``) if needed, None) or (key, None, the error)."""
    try:
        rgb = read_rgb(path)
    except BadTileError as exc:
        return key, None, str(exc)
    if fit is not None:
        rgb = fit(rgb)
    elif rgb.shape[0] != size or rgb.shape[1] != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return key, rgb, None


def decoded_batches(
    items: Sequence[tuple[str, str]], size: int, batch_size: int, workers: int = 1,
    fit: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Batches of decoded ``(key, path)`` tiles, in order. With ``workers`` > 0, that many threads decode
    each batch together (a batch is split into one piece per thread, so the first batch is ready as soon
    as a thread's share of it is) and up to two batches ahead of the consumer; with 0, each batch is
    decoded when asked for. JPEG decoding releases the GIL, so threads use as many cores."""
    items = list(items)

    def piece(start: int, stop: int) -> list[tuple[str, np.ndarray | None, str | None]]:
        return [_decode(k, p, size, fit) for k, p in items[start:stop]]

    starts = range(0, len(items), batch_size)
    if workers <= 0:
        yield from (piece(s, s + batch_size) for s in starts)
        return
    step = max(1, -(-batch_size // workers))  # ceil: one piece per thread
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histomil-decode") as pool:
        ahead: deque[list[Future]] = deque()
        for s in starts:
            stop = min(s + batch_size, len(items))
            ahead.append([pool.submit(piece, a, min(a + step, stop)) for a in range(s, stop, step)])
            if len(ahead) > 2:
                yield [tile for f in ahead.popleft() for tile in f.result()]
        while ahead:
            yield [tile for f in ahead.popleft() for tile in f.result()]


def tile_digests(paths: Sequence[Path], progress: Progress | None = None, workers: int = 4) -> dict[str, str]:
    """Content hash of every distinct tile file (symlinked copies are hashed once), in ``workers``
    threads (hashing releases the GIL)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    real = {p: os.path.realpath(p) for p in unique}
    files = list(dict.fromkeys(real.values()))
    by_real: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="histomil-hash") as pool:
        for i, (f, digest) in enumerate(zip(files, pool.map(file_digest, files))):
            by_real[f] = digest
            if progress and (i % 256 == 0 or i == len(files) - 1):
                progress("hashing tiles", i + 1, len(files))
    return {p: by_real[real[p]] for p in unique}


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
    for batch in decoded_batches(items, info.input_size, batch_size, num_workers, fit=partial(fit_tile, info=info)):
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


def _bag_digest(bag: Bag, digests: dict[str, str]) -> str:
    """Digest of a bag's input: its tiles' file names and content hashes, in order (added, removed,
    renamed, reordered or changed tiles all change it; moving the whole folder does not)."""
    h = hashlib.sha256()
    for p in bag.tile_paths:
        h.update(f"{Path(p).name}\t{digests[str(p)]}\n".encode())
    return h.hexdigest()


def _reuse(path: Path, bag: Bag, digest: str, attrs: dict, identity: Sequence[str]) -> tuple[str, FeatureBag | None]:
    """What to do with a feature file already written for ``bag``: ``("keep", None)`` when it was made
    from the same tile content with the same encoder (every ``identity`` attribute: name, weights,
    preprocessing, precision) and runtime, ``("relabel", file)`` when
    only the bag's label changed, ``("new", None)`` when there is none and ``("redo", None)`` otherwise."""
    if not path.exists():
        return "new", None
    try:
        fb = read_feature_bag(path)
    except HistomilError:
        return "redo", None
    same = all(fb.attrs.get(k) == attrs.get(k) for k in identity)  # absent on both sides: None == None
    same_runtime = fb.attrs.get("runtime", "torch") == attrs.get("runtime", "torch")  # files before runtimes: torch
    if not (same and same_runtime and fb.attrs.get(CONTENT_DIGEST) == digest and 0 < len(fb) <= len(bag.tile_paths)):
        return "redo", None
    return ("keep", None) if fb.label == bag.label else ("relabel", fb)


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
    shard: Shard | None = None,
) -> ExtractionSummary:
    """Write ``out_dir/<bag_id>.h5`` for every bag, encoding each distinct tile once.

    A feature file already there is kept only when it records the same tile content (``content_digest``:
    the tiles' names and bytes), encoder, precision and runtime; a changed label alone is rewritten in
    place, anything else is encoded again. One process writes ``out_dir`` at a time, and the temp files
    of a killed one are removed first. ``bags`` of one ``shard`` of a sharded extraction (see
    :mod:`histomil.features.shards`) are written beside the other shards': each shard holds its own
    lock and removes only its own files' leftovers."""
    if on_bad_tile not in ("error", "skip"):
        raise HistomilError(f"--on-bad-tile must be 'error' or 'skip', not {on_bad_tile!r}")
    out_dir = Path(out_dir)
    if shard is None:
        with exclusive_output(out_dir, "features extract"):
            remove_temp_leftovers(out_dir, "*.h5")
            return _write_bags(bags, out_dir, encoder, cache, batch_size, num_workers, on_bad_tile, overwrite, log, progress)
    with exclusive_output(out_dir, f"features extract, shard {shard.label}", shard.lock_name):
        remove_temp_leftovers(out_dir, "*.h5", {f"{b.bag_id}.h5" for b in bags})
        return _write_bags(bags, out_dir, encoder, cache, batch_size, num_workers, on_bad_tile, overwrite, log, progress)


def _write_bags(
    bags: Sequence[Bag],
    out_dir: Path,
    encoder: torch.nn.Module,
    cache: FeatureCache,
    batch_size: int,
    num_workers: int,
    on_bad_tile: str,
    overwrite: bool,
    log: Callable[[str], None] | None,
    progress: Progress | None,
) -> ExtractionSummary:
    """:func:`extract_bags` once it holds ``out_dir``."""
    attrs = encoder.feature_attrs()  # encoder, precision, runtime, hardware
    identity = ["encoder", "precision", *(f.name for f in fields(encoder.info))]  # not the hardware: it may change
    summary = ExtractionSummary(n_bags=len(bags))
    digests = tile_digests([Path(p) for b in bags for p in b.tile_paths], progress, num_workers)
    bag_digests = {b.bag_id: _bag_digest(b, digests) for b in bags}
    todo = []
    for b in bags:
        path = out_dir / f"{b.bag_id}.h5"
        action, old = ("redo", None) if overwrite else _reuse(path, b, bag_digests[b.bag_id], attrs, identity)
        if action == "relabel":  # same features, corrected label: rewrite the file without encoding
            write_feature_bag(path, replace(old, label=b.label))  # type: ignore[arg-type]
            summary.n_relabelled += 1
        elif action != "keep":
            todo.append(b)
            summary.n_changed += action == "redo"
    summary.n_skipped_existing = len(bags) - len(todo)
    all_paths = [str(p) for b in todo for p in b.tile_paths]
    summary.n_unique_tiles = len({digests[p] for p in all_paths})
    first_path: dict[str, str] = {}
    for p in all_paths:
        first_path.setdefault(digests[p], p)
    missing = cache.missing(digests[p] for p in all_paths)
    bad_keys = set(
        encode_into_cache(
            [(k, first_path[k]) for k in missing], encoder, cache, batch_size, num_workers,
            on_bad_tile=on_bad_tile, log=log, progress=progress,
        )
    )
    summary.n_encoded = len(missing) - len(bad_keys)  # bad tiles skipped were not encoded
    summary.bad_tiles = sorted(first_path[k] for k in bad_keys)
    for i, bag in enumerate(todo):
        paths = [str(p) for p in bag.tile_paths if digests[str(p)] not in bad_keys]
        if not paths:
            raise HistomilError(f"bag {bag.bag_id}: every tile is unreadable, the bag is empty")
        feats = cache.get_many([digests[p] for p in paths])
        write_feature_bag(
            out_dir / f"{bag.bag_id}.h5",
            FeatureBag(bag_id=bag.bag_id, features=feats, tile_paths=paths, label=bag.label,
                       attrs={**attrs, CONTENT_DIGEST: bag_digests[bag.bag_id]}),
        )
        summary.n_written += 1
        if progress:
            progress("writing bag features", i + 1, len(todo))
    return summary


def copy_sidecars(src_dir: Path, out_dir: Path) -> None:
    """Copy a bag folder's labels, regression targets (targets.csv: a composed study's tumour fractions)
    and tile-truth CSVs beside its feature files (atomically: a reader never sees half a labels.csv)."""
    for name in ("labels.csv", "df.csv", "targets.csv", "tiles.csv"):
        if (src_dir / name).is_file():
            with atomic_write(out_dir / ("labels.csv" if name == "df.csv" else name)) as tmp:
                shutil.copyfile(src_dir / name, tmp)
