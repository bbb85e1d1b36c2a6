"""Sharded extraction: one feature folder written by several processes, each a disjoint share.

``--shard I/N`` (a SLURM job array: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) and
``torchrun --nproc-per-node N -m histomil features ...`` (rank I of N) give process I the items
(bags or slides) at positions I, I + N, I + 2N ... of the sorted list, so every process computes the
same split without talking to the others, and writes only its own feature files.

How the folder's index is merged without a coordinator. Each feature folder a sharded run writes
gets ``.shards/part-I-of-N.json`` from shard I once all its items are written (the items it covered);
a shard removes its own part when it starts, and parts of another N, so a folder is complete exactly
when the N parts of one sharding are there. The shard that finds the N parts complete writes the
folder's index (the ``labels.csv`` / ``tiles.csv`` beside bag features, the ``--layout`` export of
slide features) under a file lock, so whichever shard finishes last does it, once, and a rerun of a
finished shard does it again identically. No barrier: a barrier waits a bounded time, and shards of
unequal slides finish hours apart. Readers (:func:`histomil.features.formats.feature_files_any`)
refuse a folder whose parts are incomplete, naming the shards still missing, so a dead shard is never
silently a smaller cohort; rerunning the same command resumes it (finished files are skipped). A
single-process run removes ``.shards`` when it completes the whole folder.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import filelock

from histomil.errors import HistomilError
from histomil.files import atomic_write

T = TypeVar("T")
PARTS_DIR = ".shards"
_PART = re.compile(r"^part-(?P<index>\d+)-of-(?P<count>\d+)\.json$")
MERGE_TIMEOUT_S = 600.0  # how long a finishing shard waits for another one merging the same folder


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def take(self, items: Sequence[T], key: Callable[[T], str] = str) -> list[T]:
        """This shard's items: positions index, index + count, ... of ``items`` sorted by ``key``."""
        ordered = sorted(items, key=key)
        return ordered[self.index :: self.count]

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def lock_name(self) -> str:
        """The output-folder lock of this shard (shards of one run write one folder side by side)."""
        return f".histomil-shard-{self.index}-of-{self.count}.lock"

    @property
    def part_name(self) -> str:
        return f"part-{self.index}-of-{self.count}.json"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> Shard(I, N); anything else, or I outside 0..N-1 -> HistomilError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise HistomilError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shard I of N, counting from 0)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise HistomilError(f"--shard {text!r}: I must be in 0..N-1 and N >= 1")
    return Shard(index, count)


def choose_shard(option: str | None, rank: int, world_size: int) -> Shard | None:
    """The shard of this process: ``--shard I/N``, or rank/world size under torchrun, or None (one process)."""
    if option is not None and world_size > 1:
        raise HistomilError(f"--shard {option} under torchrun ({world_size} processes): each process already takes "
                            "its rank's share; give one or the other")
    if option is not None:
        return parse_shard(option)
    return Shard(rank, world_size) if world_size > 1 else None


def begin(folder: Path, shard: Shard) -> None:
    """Mark ``folder`` incomplete while ``shard`` works: its own part and parts of other shardings go."""
    parts = folder / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    for path in parts.iterdir():
        match = _PART.match(path.name)
        if match and (int(match["count"]) != shard.count or path.name == shard.part_name):
            path.unlink(missing_ok=True)


def finish(folder: Path, shard: Shard, items: Sequence[str]) -> None:
    """Record that ``shard`` wrote all its ``items`` into ``folder`` (atomically)."""
    path = folder / PARTS_DIR / shard.part_name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"shard": shard.label, "items": list(items)}, indent=1) + "\n")


def missing_shards(folder: Path) -> tuple[int, list[int]]:
    """(N, the shard indices whose parts are missing) of the sharding recorded in ``folder``; (0, [])
    when ``folder`` was not written by shards."""
    parts = folder / PARTS_DIR
    if not parts.is_dir():
        return 0, []
    found = [(int(m["index"]), int(m["count"])) for m in (_PART.match(p.name) for p in parts.iterdir()) if m]
    counts = {c for _, c in found}
    if not counts:  # a shard started and none finished yet
        return -1, []
    count = max(counts)  # one sharding at a time: begin() removes the parts of any other
    done = {i for i, c in found if c == count}
    return count, [i for i in range(count) if i not in done]


def check_complete(folder: Path) -> None:
    """HistomilError when shards still write ``folder`` or one of them died before finishing."""
    count, missing = missing_shards(folder)
    if count == -1 or missing:
        which = "no shard has finished yet" if count == -1 else \
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing[:8])}{' ...' if len(missing) > 8 else ''} not finished"
        raise HistomilError(f"{folder}: an incomplete sharded extraction ({which}); wait for it, or rerun the same "
                            "command for the missing shards (finished files are kept)")


def merge_when_complete(folder: Path, merge: Callable[[list[str]], None]) -> bool:
    """Call ``merge(all items)`` when every shard of ``folder`` has finished; True when it did. Under a
    file lock, so two shards finishing together merge one after the other, never at once."""
    parts = folder / PARTS_DIR
    with filelock.FileLock(parts / ".merge.lock", timeout=MERGE_TIMEOUT_S):
        count, missing = missing_shards(folder)
        if count <= 0 or missing:
            return False
        items: list[str] = []
        for i in range(count):
            items += json.loads((parts / f"part-{i}-of-{count}.json").read_text())["items"]
        merge(items)
        return True


def forget_shards(folder: Path) -> None:
    """A single process wrote the whole folder: earlier shard records no longer apply."""
    shutil.rmtree(folder / PARTS_DIR, ignore_errors=True)
