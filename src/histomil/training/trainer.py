"""Train a MIL model on cached feature bags: seeded, resumable, with early stopping.

The epoch loop, its files and resuming are :func:`histomil.training.loop.run_training`'s (shared
with end-to-end training from pixels); this module supplies one training epoch
(:func:`train_epoch`), the validation metrics and the best checkpoint. Files written to ``out_dir``:

* ``history.csv``: one row per epoch (epoch, train_loss, train_acc, val_loss, val_acc, val_auc, lr,
  seconds), rewritten atomically after every epoch so a crash keeps every finished epoch.
* ``model.pt``: the best checkpoint so far by the monitored metric (see :mod:`.checkpoint_file`). A
  survival model's ``extra`` also keeps its training bags' times, events, predicted risks and their median
  at that epoch (``survival_train``, :meth:`histomil.training.survival_task.SurvivalTask.training_record`), so
  ``histomil evaluate`` splits risk groups and estimates censoring as a cross-validation fold does.
* ``last.pt``: the full training state after the latest epoch (weights, optimizer, RNG states,
  history, early-stopping counters), so ``train(..., resume=True)`` continues exactly where an
  interrupted run stopped and ends with the same result as an uninterrupted one.

Randomness: model init and dropout use torch's RNG seeded from ``config.seed`` (forked, so the
caller's global RNG is left untouched); bag order and tile sub-sampling use a numpy Generator
seeded from the same seed. Same data + same config -> the same history and weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
from pydantic import Field
from torch import nn

from histomil.config import one_of
from histomil.devices import compute_precision, resolve_device
from histomil.hardware import check_precision
from histomil.errors import HistomilError
from histomil.features.lazy import LazyFeatureBag, features_digest
from histomil.features.store import FeatureBag
from histomil.features.validate import training_encoder_info
from histomil.models.registry import build_model, model_names
from histomil.runtime import flush_denormals, keep_freed_memory
from histomil.training import distributed
from histomil.training.checkpoint_file import save_checkpoint
from histomil.training.common import (
    bag_loss,
    check_nonempty,
    parse_config,
    takes_labels,
    torch_threads,
)
from histomil.training.loop import HISTORY_COLUMNS, STATE_FORMAT, RunResult, Trainable, best_extra, run_training
from histomil.training.streaming import bag_lengths, bag_tensors, draw_tile_subsets
from histomil.training.survival_task import TRAINING_KEY, SurvivalTask
from histomil.training.task_base import Task, model_objectives
from histomil.training.tasks import TASK_NAMES, build_task

# Re-exported: these were defined here before the shared loop and are imported from here elsewhere.
__all__ = [
    "HISTORY_COLUMNS", "STATE_FORMAT", "RunResult", "TrainConfig", "TrainResult", "bag_loss", "predict",
    "takes_labels", "torch_threads", "train", "train_epoch", "validation_metrics",
]


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Training options (all have defaults; unknown keys are an error)."""

    model: str = "gated_abmil"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(100, ge=1)  # maximum number of epochs
    lr: float = Field(5e-4, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(1, ge=1)  # bags per optimizer step; >1 pads with masks
    max_instances: int | None = Field(None, ge=1)  # random tile sub-sampling of larger bags (training only)
    # What a bag's target is (histomil.training.tasks): a class, a continuous value or (time, event).
    task: Literal["classification", "regression", "survival"] = "classification"
    loss: str | None = None  # the task's loss (None: its default; regression: mse or huber)
    task_options: dict[str, Any] = Field(default_factory=dict)  # task-specific, e.g. {"huber_delta": 0.5}
    # val_loss, or a higher-is-better score of the task (classification val_auc; regression val_r2, ...)
    monitor: str = "val_loss"
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(10, ge=0)  # early stopping never triggers before this epoch
    seed: int = 0
    class_weights: bool = False  # inverse-frequency weighted cross-entropy for unbalanced classes
    # Targets 1 - eps/2 and eps/2 instead of 1 and 0. Without it the loss reaches ~1e-5 within two epochs and
    # pushes logits to +-20: held-out patients then land on one side of 0.5 and the outcome flips with the
    # training seed or bf16 rounding of the features (README, "Why the training defaults are what they are").
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    # CPU threads while training (0 = torch's default). MIL heads on features are small: one thread is
    # about as fast as two on an idle 2-core machine and over 10x faster when another process competes.
    threads: int = Field(1, ge=0)

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return one_of(name, model_names(), "model")  # when the config is read, not after features are extracted

    @pydantic.model_validator(mode="after")
    def _known_task_options(self) -> TrainConfig:
        assert self.task in TASK_NAMES
        build_task(self).check_monitor(self.monitor)  # loss, options and monitor checked when the config is read
        return self

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "training config") -> TrainConfig:
        """Validate a dict (e.g. from YAML); problems -> one-line HistomilError naming ``source``."""
        return parse_config(cls, data, source)


@dataclass
class TrainResult(RunResult):
    """What :func:`train` produced; paths point into ``out_dir``."""

    in_dim: int


def train(
    train_bags: Sequence[FeatureBag],
    val_bags: Sequence[FeatureBag],
    config: TrainConfig,
    out_dir: str | Path,
    encoder_info: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``config.model`` on ``train_bags``, early-stop and select on ``val_bags``.

    ``on_epoch`` is called after each epoch (once its files are written) with the history row
    plus ``best_epoch`` and ``improved``. ``resume=True`` continues from ``out_dir/last.pt`` when it
    exists (and starts afresh when it does not); a finished run is returned as is.
    """
    in_dim = _check_bags(train_bags, val_bags)
    encoder_info = _normalise_encoder_info(encoder_info) if encoder_info is not None else training_encoder_info([*train_bags, *val_bags])
    task = build_task(config)
    y_train, y_val = task.targets(train_bags, "training"), task.targets(val_bags, "validation")
    task.fit(y_train, y_val)
    n_classes = task.output_size()  # the model's outputs per bag: classes, 1 value, 1 risk or time bins
    monitor = task.monitor(config.monitor, y_val)
    device = distributed.rank_device(resolve_device(config.device))  # cuda -> cuda:LOCAL_RANK under torchrun

    def build() -> Trainable:  # called with torch's RNG seeded from config.seed
        model = build_model(config.model, in_dim, n_classes, **config.model_kwargs).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        rng = np.random.default_rng(config.seed)
        train_x, val_x = bag_tensors(train_bags), bag_tensors(val_bags)  # streamed from files for lazy bags
        train_model = distributed.wrap_model(model, device)  # DistributedDataParallel under torchrun

        def save_best(path: Path, row: dict[str, Any]) -> None:
            extra = {**best_extra(row, monitor, y_train, len(val_bags), n_classes), "task": task.state()}
            if isinstance(task, SurvivalTask):  # what evaluating this model on other bags needs of its training bags
                extra[TRAINING_KEY] = task.training_record(y_train, eval_logits(model, train_x, device))
            save_checkpoint(path, model, config.model, config.model_kwargs, n_classes, encoder_info, config,
                            extra=extra, in_dim=in_dim)

        return Trainable(
            model, optimizer, rng,
            train_epoch=lambda: train_epoch(train_model, optimizer, train_x, y_train, config, rng, task, device),
            validate=lambda: validation_metrics(model, val_x, y_val, task, device),
            save_best=save_best,
        )

    run = run_training(build, config, out_dir, device=device, monitor=monitor, n_classes=n_classes,
                       fingerprint=_fingerprint(train_bags, val_bags), checks={"in_dim": in_dim},
                       resume=resume, on_epoch=on_epoch)
    return TrainResult(**vars(run), in_dim=in_dim)


@torch.no_grad()
def predict(
    model: nn.Module,
    bags: Sequence[FeatureBag] | Sequence[np.ndarray],
    batch_size: int = 16,
    precision: str = "fp32",
    task: Task | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class probabilities (or, for another ``task``, its :meth:`Task.predict` row: a value, a risk) and
    tile attention for each bag, in input order.

    Runs in eval mode without gradients, in padded batches of similar-size bags. Each attention
    array has the bag's real length (n_tiles,); models without attention give NaNs.
    ``precision="bf16"`` runs the model under bfloat16 autocast: about half the CPU time on
    large bags (CPUs with avx512_bf16); probabilities stay close to fp32 (tests bound them within 0.02).
    ``fp16`` (a CUDA GPU without bf16) autocasts to float16.
    Lazy bags (:mod:`histomil.features.lazy`) are read from their files one batch at a time, every tile.
    """
    device = next(model.parameters(), torch.empty(0)).device
    if precision not in ("fp32", "bf16", "fp16"):
        raise HistomilError(f"precision must be 'fp32', 'bf16' or 'fp16', not {precision!r}")
    check_precision(precision, device)
    keep_freed_memory()  # large bags allocate 100s of MB per layer (histomil.runtime)
    flush_denormals()
    arrays = [b if isinstance(b, FeatureBag) else FeatureBag(f"#{i}", b, []) for i, b in enumerate(bags)]
    for b in arrays:
        if len(b.shape) != 2 or b.shape[0] == 0:
            raise HistomilError(f"bag {b.bag_id}: no tiles to predict on (features shape {tuple(b.shape)})")
    feats = bag_tensors(arrays)  # streamed from their files for lazy bags
    was_training = model.training
    model.eval()
    try:
        with compute_precision(device, precision):
            outputs = _forward_all(model, feats, batch_size, device)
    finally:
        model.train(was_training)
    results = []
    for (logits, attention), n_tiles in zip(outputs, bag_lengths(feats)):
        probs = task.predict(logits.unsqueeze(0))[0] if task is not None else torch.softmax(logits.double(), dim=-1).numpy()
        att = attention.numpy() if attention is not None else np.full(n_tiles, np.nan, dtype=np.float32)
        results.append((probs, att))
    return results


# --- one epoch ---------------------------------------------------------------------------


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    feats: list[torch.Tensor],
    y_train: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
    task: Task,
    device: torch.device,
) -> dict[str, float]:
    """One pass over the training bags -> ``{"train_loss": mean loss, **task.train_metrics}``.

    Bags in an order drawn from ``rng``, ``config.batch_size`` bags (zero-padded, masked) per
    optimizer step; bags above ``config.max_instances`` tiles are sub-sampled with ``rng``. The
    loss of a step is ``task.loss`` on its bags plus the model's own objectives (:func:`model_objectives`).
    Under torchrun (``model`` in DistributedDataParallel) every rank draws the same order and tile
    subsets and trains on its share of the order (:func:`distributed.shard_indices`), so R ranks with
    ``batch_size`` b take the steps one process takes with ``batch_size`` R x b; loss and metrics are
    over all ranks' bags. Streamed bags (:class:`~histomil.training.streaming.BagTensors`) are read ahead
    in the epoch's order.
    """
    model.train()
    labels_in = takes_labels(distributed.unwrap_model(model)) and task.feeds_labels
    y = task.target_tensor(y_train, device)
    order = rng.permutation(len(feats))
    subsets = draw_tile_subsets(order, bag_lengths(feats), config.max_instances, rng)  # the same draws on every rank
    here = distributed.world()
    order = order[distributed.shard_indices(len(order), here.rank, here.world_size)] if distributed.active() else order
    if hasattr(feats, "plan"):
        feats.plan(order)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    outputs = []
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        batch = []
        for i in idx:
            f = feats[i]
            if i in subsets:
                f = f[torch.from_numpy(subsets[i])]
            batch.append(f)
        x, mask = _collate(batch, device)
        target = y[torch.from_numpy(idx).to(device)]
        out = model(x, mask, y=target) if labels_in else model(x, mask)
        loss = model_objectives(out, task.loss(out.logits, target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(idx)
        outputs.append(out.logits.detach().double())
    epoch_logits = torch.cat(outputs)  # in the epoch's bag order
    if distributed.active():  # every rank's bags, in rank order
        total_loss = distributed.all_reduce_sum(total_loss)
        parts = distributed.all_gather((epoch_logits.cpu(), order))
        epoch_logits, order = torch.cat([lg for lg, _ in parts]), np.concatenate([o for _, o in parts])
    return {"train_loss": float(total_loss) / len(order), **task.train_metrics(epoch_logits, y_train[order])}


@torch.no_grad()
def validation_metrics(
    model: nn.Module, feats: list[torch.Tensor], y: np.ndarray, task: Task, device: torch.device
) -> dict[str, float]:
    """The task's validation columns (``val_loss``, classification ``val_acc`` and ``val_auc``, ...) of the
    model (in eval mode) on the bags ``feats`` with targets ``y``."""
    model.eval()
    logits = torch.stack([lg for lg, _ in _forward_all(model, feats, 16, device)]).double()
    return task.validation_metrics(logits, y)


@torch.no_grad()
def eval_logits(model: nn.Module, feats: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The model's logits (n, outputs; float64) of the bags ``feats`` in eval mode, as validation computes
    them; the model's mode is restored after (a survival checkpoint's training risks are taken mid-run)."""
    was_training = model.training
    model.eval()
    try:
        return torch.stack([lg for lg, _ in _forward_all(model, feats, 16, device)]).double()
    finally:
        model.train(was_training)


# --- batching ----------------------------------------------------------------------------


def _collate(feats: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero-pad to (B, N, D) plus a (B, N) mask; a single bag needs no mask."""
    if len(feats) == 1:
        return feats[0].unsqueeze(0).to(device), None
    lengths = torch.tensor([f.shape[0] for f in feats])
    x = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)
    mask = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return x, mask


def _forward_all(
    model: nn.Module,
    feats: list[torch.Tensor],
    batch_size: int,
    device: torch.device,
    max_padded_tiles: int = 262_144,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run the model over all bags in batches of similar length; outputs on CPU, in input order.

    Sorting by length keeps padding small; ``max_padded_tiles`` bounds B * N_max so a few huge
    slide bags do not blow up memory.
    """
    lengths = bag_lengths(feats)  # streamed bags know theirs without being read
    order = sorted(range(len(feats)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    for i in order:  # ascending length, so the newest bag sets N_max of its batch
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= max_padded_tiles:
            batches[-1].append(i)
        else:
            batches.append([i])
    if hasattr(feats, "plan"):
        feats.plan([i for batch in batches for i in batch])
    results: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(feats)
    for batch in batches:
        x, mask = _collate([feats[i] for i in batch], device)
        out = model(x, mask)
        # float32, except a float64 output (a regression ensemble's mean in target units) kept exact
        logits = (out.logits if out.logits.dtype == torch.float64 else out.logits.float()).cpu()
        attention = out.attention.float().cpu() if out.attention is not None else None
        for j, i in enumerate(batch):
            att = attention[j, : lengths[i]].clone() if attention is not None else None
            results[i] = (logits[j], att)
    return results  # type: ignore[return-value]


# --- checks, state, files ----------------------------------------------------------------


def _check_bags(train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag]) -> int:
    """Validate the bags' features (their targets are the task's to check); returns the feature dim."""
    check_nonempty(train_bags, val_bags)
    dim = None
    for split, b in [("training", b) for b in train_bags] + [("validation", b) for b in val_bags]:
        shape = b.shape  # a lazy bag's from its file, checked (values included) when it was scanned
        if len(shape) != 2 or shape[0] == 0:
            raise HistomilError(f"{split} bag {b.bag_id!r} has no tiles (features shape {shape})")
        if dim is None:
            dim = int(shape[1])
        elif shape[1] != dim:
            raise HistomilError(
                f"{split} bag {b.bag_id!r} has {shape[1]}-dim features, others have {dim} (mixed encoders?)"
            )
        if not isinstance(b, LazyFeatureBag) and not np.isfinite(b.features).all():
            raise HistomilError(f"{split} bag {b.bag_id!r} has NaN or infinite features")
    return int(dim)  # type: ignore[arg-type]


def _normalise_encoder_info(info: dict[str, Any]) -> dict[str, Any]:
    """Accept a feature file's attrs as encoder info: its ``encoder`` key becomes ``name``."""
    info = dict(info)
    if "name" not in info and "encoder" in info:
        info["name"] = info.pop("encoder")
    return info


def _fingerprint(train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag]) -> str:
    """Identifies the data of a run (ids, labels, sizes, order and the feature values themselves), so a
    resumed run on changed data starts afresh instead of mixing (2,000 bags of 40 x 1280 features, 410 MB,
    hash in 0.3 s on the project's AMD EPYC)."""
    h = hashlib.sha256()
    for split, bags in (("train", train_bags), ("val", val_bags)):
        for b in bags:
            target = "" if b.target is None else f"|{b.target}"  # regression / survival targets (none before tasks)
            h.update(f"{split}|{b.bag_id}|{b.label}{target}|{tuple(b.shape)}\n".encode())
            h.update((b.digest if isinstance(b, LazyFeatureBag) else features_digest(b.features)).encode())
    return h.hexdigest()
