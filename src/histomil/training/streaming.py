"""Training bags as tensors, streamed from their files when they do not all fit in memory.

:func:`bag_tensors` gives the trainer what it indexes during an epoch: for in-memory bags a plain
list of float32 tensors (the fast path, as before); as soon as one bag is a
:class:`~histomil.features.lazy.LazyFeatureBag`, a :class:`BagTensors` that reads each bag from its
file when the trainer asks for it. :meth:`BagTensors.plan` tells it the order of the coming epoch,
and a background thread then reads up to ``prefetch`` bags ahead while the model trains on the
current one (h5py and numpy's float16 -> float32 conversion run beside torch's compute).

Memory: at most ``prefetch + batch_size`` bags are in memory at once, whatever the number of
slides; a very large bag is still read whole (``TrainConfig.max_instances`` then keeps a random
subset of its tiles for the training step; validation and inference use every tile).
:func:`peak_memory` reports the process's peak resident memory (and CUDA memory) for the run's files.
"""

from __future__ import annotations

import resource
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from histomil.features.lazy import LazyFeatureBag
from histomil.features.store import FeatureBag

#: bags read ahead of the one being trained on (each is one slide's features, e.g. 40 MB for 10,000 x 1,024 fp32).
DEFAULT_PREFETCH = 2


def as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 tensor of a feature matrix (no copy when it is already float32 and contiguous)."""
    if isinstance(features, torch.Tensor):
        return features.float()
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


def is_streamed(bags: Sequence[FeatureBag]) -> bool:
    """Whether any bag keeps its features in its file."""
    return any(isinstance(b, LazyFeatureBag) for b in bags)


class BagTensors(Sequence[torch.Tensor]):
    """Bag ``i`` -> its (N, D) float32 tensor; lazy bags are read on access (see the module docstring).

    ``lengths`` holds every bag's tile count without reading anything, for length-sorted batching."""

    def __init__(self, bags: Sequence[FeatureBag], prefetch: int = DEFAULT_PREFETCH) -> None:
        self.bags = list(bags)
        self.lengths = [int(b.shape[0]) for b in self.bags]
        self.prefetch = max(0, int(prefetch))
        # in-memory bags are converted once, as on the in-memory path; lazy ones stay in their files
        self._ready: dict[int, torch.Tensor] = {
            i: as_tensor(b.features) for i, b in enumerate(self.bags) if not isinstance(b, LazyFeatureBag)
        }
        self._pending: deque[tuple[int, Future[torch.Tensor]]] = deque()
        self._upcoming: deque[int] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        i = int(i)
        if i in self._ready:
            return self._ready[i]
        if self._pending and self._pending[0][0] == i:
            _, future = self._pending.popleft()
            self._read_ahead()
            return future.result()  # a read error surfaces here, in the training thread
        if self._pending:  # asked for something else than planned: forget the plan
            self.cancel()
        return self._load(i)

    def plan(self, order: Sequence[int]) -> None:
        """The order the next accesses will follow: read ahead along it in a background thread."""
        self.cancel()
        if self.prefetch == 0:
            return
        self._upcoming = deque(int(i) for i in order if int(i) not in self._ready)
        self._read_ahead()

    def cancel(self) -> None:
        """Drop the read-ahead (reads under way finish and are discarded)."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._upcoming.clear()

    def close(self) -> None:
        """Stop the background thread (a later :meth:`plan` starts a new one)."""
        self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _read_ahead(self) -> None:
        while self._upcoming and len(self._pending) < self.prefetch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histomil-bag-reader")
            i = self._upcoming.popleft()
            self._pending.append((i, self._pool.submit(self._load, i)))

    def _load(self, i: int) -> torch.Tensor:
        return as_tensor(self.bags[i].features)


def bag_tensors(bags: Sequence[FeatureBag], prefetch: int = DEFAULT_PREFETCH) -> list[torch.Tensor] | BagTensors:
    """What the trainer indexes: a list of tensors for in-memory bags, a streaming
    :class:`BagTensors` when any bag is lazy."""
    if is_streamed(bags):
        return BagTensors(bags, prefetch)
    return [as_tensor(b.features) for b in bags]


def bag_lengths(feats: Sequence[torch.Tensor]) -> list[int]:
    """Tile counts of the bags the trainer holds, without reading streamed bags."""
    lengths = getattr(feats, "lengths", None)
    return list(lengths) if lengths is not None else [int(f.shape[0]) for f in feats]


def draw_tile_subsets(
    order: Sequence[int], lengths: Sequence[int], max_instances: int | None, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """The documented cap on large training bags: for each bag of ``order`` with more than
    ``max_instances`` tiles, ``max_instances`` distinct tile rows drawn at random from ``rng`` (sorted);
    bag index -> rows. Drawn for the whole epoch before it starts, in the epoch's order, from the tile
    counts alone: the same draws as drawing bag by bag during the epoch, without reading streamed bags,
    and the same on every rank. Validation and inference never sub-sample."""
    subsets: dict[int, np.ndarray] = {}
    if max_instances is None:
        return subsets
    for i in order:
        i = int(i)
        if lengths[i] > max_instances and i not in subsets:
            subsets[i] = np.sort(rng.choice(lengths[i], max_instances, replace=False))
    return subsets


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """The process's peak resident memory in MiB (``peak_rss_mib``, from getrusage: the peak of the
    whole process so far, not of one run) and, on CUDA, ``peak_cuda_mib`` (torch.cuda.max_memory_allocated)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}  # bytes on macOS, KiB on Linux
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out
