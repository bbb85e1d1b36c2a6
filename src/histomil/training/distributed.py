"""Running one histomil command as several processes under ``torchrun`` (torch.distributed).

``torchrun --nproc-per-node N -m histomil ...`` starts N copies of a command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their environment. This
module reads them (:func:`world`), sets the process group up and down (:func:`distributed_session`:
gloo on CPU, nccl on CUDA), and offers the few collective steps the commands need: :func:`barrier`,
:func:`shard_indices` (the same split on every rank, every rank the same length), :func:`all_gather`
and :func:`broadcast`. Without torchrun every function is a cheap no-op for a world of one process,
so callers need no second code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from histomil.errors import HistomilError

T = TypeVar("T")

# How long a rank waits for the others at a collective step before giving up (a dead rank).
DEFAULT_TIMEOUT = timedelta(minutes=30)
# ... when the ranks run whole jobs (cross-validation folds) between two collective steps.
FOLD_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Rank, world size and local rank from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a single process when they are absent. Inconsistent values -> HistomilError."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {k: os.environ.get(k) for k in names}
    if raw["WORLD_SIZE"] is None and raw["RANK"] is None:
        return World()
    values = {}
    for key in names:
        text = raw[key] if raw[key] is not None else ("0" if key == "LOCAL_RANK" else None)
        try:
            values[key] = int(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise HistomilError(f"environment: {key}={raw[key]!r} is not an integer (set by torchrun with RANK and WORLD_SIZE)") from None
    rank, size, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local < 0:
        raise HistomilError(f"environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} are inconsistent")
    return World(rank=rank, world_size=size, local_rank=local)


# Set inside local_only(): this process works alone although torchrun started several.
_alone = False


def is_main() -> bool:
    """Whether this process writes shared outputs (rank 0, the only process, or inside :func:`local_only`)."""
    if _alone:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world().is_main


def active() -> bool:
    """Whether a process group of more than one process is set up (and not set aside by :func:`local_only`)."""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local_only() -> Iterator[None]:
    """Inside the block this process trains and writes on its own, as if torchrun had started one process
    (e.g. one cross-validation fold per rank): no DDP wrapper, no collective steps, its own files."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def jobs_of_rank(n_jobs: int) -> list[int]:
    """The indices of ``n_jobs`` independent jobs (e.g. folds) this rank runs: ``i % world_size == rank``
    (all of them for one process)."""
    here = world() if not _alone else World()
    return [i for i in range(n_jobs) if i % here.world_size == here.rank]


def rank_device(device: torch.device) -> torch.device:
    """The device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per
    process), anything else is returned unchanged."""
    if device.type == "cuda" and device.index is None and world().distributed:
        return torch.device("cuda", world().local_rank)
    return device


@contextmanager
def distributed_session(device: torch.device | str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Set up torch.distributed for the block when torchrun started this process (gloo for CPU,
    nccl for CUDA) and tear it down after; a plain process gets ``World()`` and nothing happens.

    A process group that already exists (set up by the caller) is used as is and left alone."""
    info = world()
    if not info.distributed or (dist.is_available() and dist.is_initialized()):
        yield info
        return
    if not dist.is_available():
        raise HistomilError("torchrun started several processes but this PyTorch has no torch.distributed")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
    try:
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise HistomilError(f"rank {info.rank}: cannot join the other {info.world_size - 1} processes ({backend}: {first})") from None
    try:
        yield info
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank reaches this point (no-op for one process)."""
    if active():
        dist.barrier()


def shard_indices(n: int, rank: int, world_size: int, *, seed: int | None = None, epoch: int = 0, pad: bool = True) -> np.ndarray:
    """The indices of ``range(n)`` that ``rank`` of ``world_size`` processes handles.

    With ``seed`` the order is a permutation drawn from ``(seed, epoch)`` (the same on every rank, a
    new one every epoch); without, the natural order. Rank r takes positions r, r + W, r + 2W, ...
    so the shards are disjoint and together cover every index. ``pad=True`` repeats the first
    indices of the order so every rank gets ``ceil(n / W)`` indices (the same number of steps on every
    rank, as DistributedDataParallel needs); ``pad=False`` gives shards whose sizes differ by one at most.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise HistomilError(f"shard {rank}/{world_size}: rank must be in 0..{world_size - 1}")
    if seed is None:
        order = np.arange(n)
    else:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    if pad and n > 0 and n % world_size:
        extra = world_size - n % world_size
        order = np.concatenate([order, np.resize(order, extra)])
    return order[rank::world_size]


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank; ``[obj]`` alone."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable value); ``obj`` itself for one process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train (gradients averaged over
    ranks at every step), else ``model`` itself. The wrapper shares the model's parameters, so
    checkpoints are saved from ``model``. ``find_unused_parameters``: some MIL heads (CLAM's per-class
    instance classifiers) leave parameters out of a step."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a new tensor; ``value`` itself for one process)."""
    if not active():
        return value
    out = value.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
