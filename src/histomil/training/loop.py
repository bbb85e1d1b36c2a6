"""The training loop shared by :func:`histomil.training.trainer.train` (MIL heads on cached features)
and :func:`histomil.training.pixels.train_pixels` (tile encoder + MIL head from pixels).

:func:`run_training` runs epochs until ``config.epochs`` or early stopping; the caller supplies
what differs between the two trainers as a :class:`Trainable` built by a callable (inside the
seeded block, so model initialisation is reproducible): the model, optimizer and numpy Generator,
one training epoch, the validation metrics, and how to save the best model. The loop owns the rest:

* ``history.csv``: one row per epoch (:data:`HISTORY_COLUMNS`), rewritten atomically after every
  epoch so a crash keeps every finished epoch.
* ``model.pt``: written by ``Trainable.save_best`` whenever an epoch improves the monitored metric.
* ``last.pt``: the full training state after the latest epoch (weights, optimizer, torch and numpy
  RNG states, history, early-stopping state, the config and the data's identity), so
  ``run_training(..., resume=True)`` continues exactly where an interrupted run stopped and ends
  with the same result as an uninterrupted one; resuming refuses changed options, and starts afresh
  (with a one-line warning) when the data changed, feature values included.
* One process trains in ``out_dir`` at a time (:func:`histomil.files.exclusive_output`); the
  temp files a killed run left there are removed when the next one starts.
* Early stopping: not before ``config.min_epochs``, after ``config.patience`` epochs without
  improvement. ``val_auc`` ties (common at 1.0) are broken by ``val_loss``.
* Denormal floats are flushed to zero (:func:`histomil.runtime.flush_denormals`) and freed
  memory is kept for reuse (:func:`histomil.runtime.keep_freed_memory`).
* ``training.json``: how the run ended (epochs, best epoch, early stop), the number of processes and
  the peak memory of each (:func:`histomil.training.streaming.peak_memory`), rewritten after every epoch.
* Under torchrun (:mod:`.distributed`) every rank runs this loop; rank 0 alone holds the folder lock and
  writes the files, every rank takes rank 0's history row (so all stop at the same epoch), and on resume
  every rank reads the same ``last.pt`` (``out_dir`` on a file system all ranks see) and must agree.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histomil.devices import device_record
from histomil.errors import HistomilError
from histomil.files import atomic_write, exclusive_output, remove_temp_leftovers, write_json
from histomil.runtime import flush_denormals, keep_freed_memory
from histomil.training import distributed
from histomil.training.checkpoint_file import atomic_torch_save, read_checkpoint_dict
from histomil.training.common import check_finite, seeded
from histomil.training.streaming import peak_memory

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"]
STATE_FORMAT = "histomil-train-state"
# Config fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "threads"})
# How a changed part of a run's data identity is named in the restart notice.
_IDENTITY_WORDS = {"fingerprint": "bags, labels or feature values", "in_dim": "feature dimension",
                   "n_classes": "number of classes", "monitor": "monitored metric",
                   "ranks": "number of torchrun processes"}


@dataclass
class RunResult:
    """What a training run produced (on features or end to end from pixels); paths point into ``out_dir``."""

    out_dir: Path
    model_path: Path
    history_path: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    stopped_early: bool
    monitor: str  # the metric actually monitored (val_auc falls back to val_loss on a one-class val set)
    n_classes: int
    last_path: Path  # the training state to resume from
    peak_memory: dict[str, float]  # this process's peak_rss_mib (and peak_cuda_mib on CUDA), see training.json


@dataclass
class Trainable:
    """What one trainer gives :func:`run_training`: the trained objects and three callables.

    * ``train_epoch()``: one pass over the training bags (updating ``model`` with ``optimizer``,
      drawing randomness from ``rng`` and torch's RNG) -> ``(train_loss, train_acc)``, or a dict of
      history columns holding ``train_loss`` (a task's own columns, :mod:`histomil.training.tasks`).
    * ``validate()``: -> ``(val_loss, val_acc, val_auc)`` on the validation bags, or a dict holding ``val_loss``.
    * ``save_best(path, row)``: write the best checkpoint (model.pt) for the history ``row`` of an
      epoch that improved the monitored metric.

    ``model``, ``optimizer`` and ``rng`` are saved to ``last.pt`` and restored on resume.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    train_epoch: Callable[[], tuple[float, float] | dict[str, float]]
    validate: Callable[[], tuple[float, float, float] | dict[str, float]]
    save_best: Callable[[Path, dict[str, Any]], None]


@dataclass
class EpochState:
    """Where a run stands: the finished epochs, the best one so far, and whether it stopped early."""

    epoch: int = 0
    best_epoch: int = 0
    best_value: float | None = None
    best_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False

    def improves(self, row: dict[str, float], monitor: str) -> bool:
        """Whether the epoch of ``row`` beats the best so far on ``monitor`` (NaN never does)."""
        value = row[monitor]
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if monitor == "val_loss":
            return value < self.best_value
        # val_auc: higher is better; an equal AUC (common once it reaches 1.0) is broken by val_loss.
        return value > self.best_value or (value == self.best_value and row["val_loss"] < (self.best_loss or math.inf))

    def mark_best(self, row: dict[str, Any], monitor: str) -> None:
        """Record ``row`` (an epoch that improved the monitored metric) as the best so far."""
        self.best_epoch, self.best_value, self.best_loss = row["epoch"], float(row[monitor]), row["val_loss"]

    def end_epoch(self, row: dict[str, Any], history_path: Path | None, min_epochs: int, patience: int) -> None:
        """Append ``row`` to the history (rewriting history.csv unless None) and apply the early-stopping rule."""
        self.history.append(row)
        if history_path is not None:
            write_history(history_path, self.history)
        self.epoch = row["epoch"]
        self.stopped = self.epoch >= min_epochs and self.epoch - self.best_epoch >= patience

    def best_row(self) -> dict[str, float]:
        return dict(next((r for r in self.history if r["epoch"] == self.best_epoch), {}))


def run_training(
    build: Callable[[], Trainable],
    config: Any,
    out_dir: str | Path,
    *,
    device: torch.device,
    monitor: str,
    n_classes: int,
    fingerprint: str,
    checks: dict[str, Any] | None = None,
    resumable_changes: Collection[str] = RESUMABLE_CHANGES,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train until ``config.epochs`` or early stopping; see the module docstring for the files.

    ``config``: a pydantic model with ``epochs``, ``lr``, ``patience``, ``min_epochs``, ``seed``
    and ``threads``; ``build()`` is called with torch's RNG seeded from ``config.seed`` (forked:
    the caller's RNG is left untouched) and ``config.threads`` CPU threads, which stay in effect
    for the whole run. ``resume=True`` continues from ``last.pt`` when ``fingerprint`` (the data),
    ``n_classes`` and ``checks`` (further values, e.g. the feature dimension) match, and starts
    afresh with a warning when they do not; a config field other than ``resumable_changes`` that
    changed is an error. Without a ``last.pt`` it starts afresh; a finished run is returned as is.
    A fresh start first deletes the ``model.pt``, ``last.pt`` and ``history.csv`` of an earlier run.
    ``on_epoch`` is called after each epoch (once its files are written) with the history row plus
    ``best_epoch`` and ``improved``.
    """
    flush_denormals()
    keep_freed_memory()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"model": out_dir / "model.pt", "last": out_dir / "last.pt", "history": out_dir / "history.csv"}
    identity = {"fingerprint": fingerprint, **(checks or {}), "n_classes": int(n_classes), "monitor": monitor}
    ranks = distributed.world().world_size if distributed.active() else 1
    if ranks > 1:  # recorded in last.pt; a single-process run records none (as before torchrun existed)
        identity["ranks"] = ranks

    main = distributed.is_main()  # under torchrun only rank 0 writes
    with exclusive_output(out_dir, "training") if main else nullcontext(), seeded(device, config.seed, config.threads):
        for path in paths.values():  # temp files of a killed run (its finished files are kept)
            if main:
                remove_temp_leftovers(out_dir, path.name)
        run = build()
        if main:
            write_device_record(out_dir / "environment.json", device, str(getattr(config, "precision", "fp32")))
        restored = None
        if resume and paths["last"].exists():
            restored = restore_state(paths["last"], run, config, device, identity, resumable_changes)
        agree_on_start(restored, out_dir)
        if restored is None and main:  # a fresh start: nothing of an earlier run may stay beside the new one
            for path in paths.values():
                path.unlink(missing_ok=True)
        state = restored if restored is not None else EpochState()
        if restored is not None and main:
            write_history(paths["history"], state.history)

        while state.epoch < config.epochs and not state.stopped:
            epoch = state.epoch + 1
            t0 = time.perf_counter()
            trained = run.train_epoch()
            trained = trained if isinstance(trained, dict) else dict(zip(("train_loss", "train_acc"), trained))
            check_finite(trained["train_loss"], epoch, out_dir, config.lr)
            validated = run.validate()
            validated = validated if isinstance(validated, dict) else dict(zip(("val_loss", "val_acc", "val_auc"), validated))
            row = {
                "epoch": epoch,
                **trained,
                **validated,
                "lr": float(run.optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - t0,
            }
            row = distributed.broadcast(row)  # every rank decides on rank 0's numbers
            improved = state.improves(row, monitor)
            if improved:
                state.mark_best(row, monitor)
                if main:
                    run.save_best(paths["model"], row)
            state.end_epoch(row, paths["history"] if main else None, config.min_epochs, config.patience)
            memory = distributed.all_gather(peak_memory(device))
            if main:
                save_state(paths["last"], state, run, config, device, identity)
                write_json(out_dir / "training.json", run_summary(state, monitor, memory))
            if on_epoch is not None and main:
                on_epoch({**row, "best_epoch": state.best_epoch, "improved": improved})
        distributed.barrier()  # the other ranks return once rank 0's files are written

    return RunResult(
        out_dir=out_dir,
        model_path=paths["model"],
        history_path=paths["history"],
        last_path=paths["last"],
        history=list(state.history),
        best_epoch=state.best_epoch,
        best_metrics=state.best_row(),
        epochs_run=state.epoch,
        stopped_early=state.stopped,
        monitor=monitor,
        n_classes=int(n_classes),
        peak_memory=peak_memory(device),
    )


def agree_on_start(restored: EpochState | None, out_dir: Path) -> None:
    """Under torchrun: every rank must resume from the same epoch (or all start afresh)."""
    epochs = distributed.all_gather(None if restored is None else restored.epoch)
    if len(set(epochs)) > 1:
        raise HistomilError(f"{out_dir}: the ranks found different training states to resume from (epochs {epochs}); "
                            "put the run folder on a file system every rank sees")
    distributed.barrier()  # nobody deletes last.pt while another rank still reads it


def run_summary(state: EpochState, monitor: str, memory: list[dict[str, float]]) -> dict[str, Any]:
    """What training.json holds: how the run stands and every rank's peak memory (MiB)."""
    return {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped,
        "monitor": monitor,
        "best_metrics": state.best_row(),
        "world_size": len(memory),
        "peak_memory": memory[0],
        "peak_memory_per_rank": memory,
    }


def best_extra(row: dict[str, Any], monitor: str, y_train: np.ndarray, n_val_bags: int, n_classes: int) -> dict[str, Any]:
    """What a best checkpoint (model.pt) records about the epoch and data that produced it."""
    return {
        "best_epoch": row["epoch"],
        "monitor": monitor,
        "metrics": dict(row),
        "n_train_bags": len(y_train),
        "n_val_bags": n_val_bags,
        # class counts for class targets (values and (time, event) pairs have none)
        **({"train_class_counts": np.bincount(y_train, minlength=n_classes).tolist()} if y_train.dtype.kind in "iu" else {}),
    }


# --- files -------------------------------------------------------------------------------


def write_device_record(path: Path, device: torch.device, precision: str) -> None:
    """``environment.json``: where the run trains (device, its name, precision), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(device_record(device, precision), indent=2) + "\n")


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite history.csv atomically (full float precision, so it reads back exactly). The columns are
    the rows' own (:data:`HISTORY_COLUMNS` for classification; a task's columns otherwise)."""
    columns = list(history[0]) if history else HISTORY_COLUMNS
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in history:
            writer.writerow([int(row["epoch"])] + [repr(float(row[c])) for c in columns[1:]])
        fh.flush()
        os.fsync(fh.fileno())


def save_state(
    path: Path, state: EpochState, run: Trainable, config: Any, device: torch.device, identity: dict[str, Any]
) -> None:
    """Write ``last.pt``: everything :func:`restore_state` needs to continue the run exactly."""
    payload = {
        "format": STATE_FORMAT,
        "config": config.model_dump(mode="json"),
        **identity,
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_value": state.best_value,
        "best_loss": state.best_loss,
        "stopped": state.stopped,
        "history": state.history,
        "model_state": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer_state": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_rng": json.dumps(run.rng.bit_generator.state),
    }
    atomic_torch_save(payload, path)


def restore_state(
    path: Path,
    run: Trainable,
    config: Any,
    device: torch.device,
    identity: dict[str, Any],
    resumable_changes: Collection[str] = RESUMABLE_CHANGES,
) -> EpochState | None:
    """Load ``last.pt`` into model, optimizer and RNGs after checking it belongs to this run.

    Changed options (other than ``resumable_changes``) are refused; changed data (``identity``: the
    bags, labels and feature values, their dimension, the classes) give a one-line warning and None:
    the run must start afresh, as nothing trained on the old data may carry over."""
    data = read_checkpoint_dict(path, what="training state to resume from")
    if data.get("format") != STATE_FORMAT:
        raise HistomilError(f"{path}: not a histomil training state (last.pt)")
    before, ranks = int(data.get("ranks", 1)), int(identity.get("ranks", 1))
    if before != ranks:  # every process takes its share of each step: another count changes the steps
        raise HistomilError(
            f"{path}: cannot resume, the run was trained by {before} process(es) and this is {ranks} (each "
            f"process takes its share of every step); resume it with {before} (torchrun --nproc-per-node "
            f"{before}), or start afresh in another --out (train-pixels: --no-resume)"
        )
    saved = data["config"]
    now = config.model_dump(mode="json")
    # an option the run's histomil did not have yet: the run used its default
    defaults = {k: f.default for k, f in type(config).model_fields.items() if not f.is_required()}
    changed = sorted(k for k in now if k not in resumable_changes and saved.get(k, defaults.get(k)) != now[k])
    if changed:
        raise HistomilError(f"{path}: cannot resume, training options changed since the run started: {', '.join(changed)}")
    changed = [_IDENTITY_WORDS.get(k, k) for k, v in identity.items() if data.get(k) != v]
    if changed:
        warnings.warn(f"{path.parent}: the data changed since the interrupted run ({', '.join(changed)}); "
                      "training starts afresh", stacklevel=3)
        return None
    run.model.load_state_dict(data["model_state"])
    run.optimizer.load_state_dict(data["optimizer_state"])
    torch.set_rng_state(data["torch_rng"])
    if device.type == "cuda" and data.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(data["cuda_rng"], device)
    run.rng.bit_generator.state = json.loads(data["numpy_rng"])
    return EpochState(
        epoch=int(data["epoch"]),
        best_epoch=int(data["best_epoch"]),
        best_value=data["best_value"],
        best_loss=data["best_loss"],
        history=[dict(r) for r in data["history"]],
        stopped=bool(data["stopped"]),
    )
