"""Train a MIL model on cached feature bags: seeded, resumable, with early stopping.

Files written to ``out_dir``:

* ``history.csv``: one row per epoch (epoch, train_loss, train_acc, val_loss, val_acc, val_auc, lr,
  seconds), rewritten atomically after every epoch so a crash keeps every finished epoch.
* ``model.pt``: the best checkpoint so far by the monitored metric (see :mod:`.checkpoint`).
* ``last.pt``: the full training state after the latest epoch (weights, optimizer, RNG states,
  history, early-stopping counters), so ``train(..., resume=True)`` continues exactly where an
  interrupted run stopped and ends with the same result as an uninterrupted one.

Randomness: model init and dropout use torch's RNG seeded from ``config.seed`` (forked, so the
caller's global RNG is left untouched); bag order and tile sub-sampling use a numpy Generator
seeded from the same seed. Same data + same config -> the same history and weights.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.metrics import roc_auc_score
from torch import nn

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag, atomic_write
from histomil.models.base import MILOutput
from histomil.models.registry import build_model
from histomil.runtime import keep_freed_memory
from histomil.training.checkpoint import (
    atomic_torch_save,
    read_checkpoint_dict,
    save_checkpoint,
)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"]
STATE_FORMAT = "histomil-train-state"
# Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "device", "threads"}


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Training options (all have defaults; unknown keys are an error)."""

    model: str = "gated_abmil"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(100, ge=1)  # maximum number of epochs
    lr: float = Field(5e-4, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(1, ge=1)  # bags per optimizer step; >1 pads with masks
    max_instances: int | None = Field(None, ge=1)  # random tile sub-sampling of larger bags (training only)
    monitor: Literal["val_loss", "val_auc"] = "val_loss"
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(10, ge=0)  # early stopping never triggers before this epoch
    seed: int = 0
    class_weights: bool = False  # inverse-frequency weighted cross-entropy for unbalanced classes
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    # CPU threads while training (0 = torch's default). MIL heads on features are small: one thread is
    # about as fast as two on an idle 2-core machine and over 10x faster when another process competes.
    threads: int = Field(1, ge=0)

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "training config") -> TrainConfig:
        """Validate a dict (e.g. from YAML); problems -> one-line HistomilError naming ``source``."""
        return _parse_config(cls, data, source)


_C = TypeVar("_C", bound=pydantic.BaseModel)


def _parse_config(cls: type[_C], data: dict[str, Any], source: str) -> _C:
    """``cls.model_validate(data)``; every problem listed in one HistomilError line naming ``source``."""
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise HistomilError(f"{source}: {problems}") from None


def takes_labels(model: nn.Module) -> bool:
    """Whether the model's forward takes the bag labels ``y`` (e.g. CLAM's instance clustering)."""
    return "y" in inspect.signature(model.forward).parameters


def bag_loss(out: MILOutput, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the bag logits plus the model's own objectives.

    A model may scale the bag loss (``extras["loss_weight_bag"]``) and add auxiliary losses
    (``extras["aux_loss"]``): CLAM trains on 0.7 * bag loss + 0.3 * instance clustering loss.
    """
    loss = F.cross_entropy(out.logits, target, weight=weight)
    extras = out.extras or {}
    if "loss_weight_bag" in extras:
        loss = loss * extras["loss_weight_bag"]
    aux = extras.get("aux_loss")
    if aux is not None:
        loss = loss + aux
    return loss


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (0 leaves torch's setting alone)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class RunResult:
    """What a training run produced (here or end to end from pixels); paths point into ``out_dir``."""

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


@dataclass
class TrainResult(RunResult):
    """What :func:`train` produced; paths point into ``out_dir``."""

    last_path: Path
    in_dim: int


@dataclass
class _State:
    epoch: int = 0
    best_epoch: int = 0
    best_value: float | None = None
    best_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False

    def mark_best(self, row: dict[str, Any], monitor: str) -> None:
        """Record ``row`` (an epoch that improved the monitored metric) as the best so far."""
        self.best_epoch, self.best_value, self.best_loss = row["epoch"], float(row[monitor]), row["val_loss"]

    def end_epoch(self, row: dict[str, Any], history_path: Path, min_epochs: int, patience: int) -> None:
        """Append ``row`` to the history (rewriting history.csv) and apply the early-stopping rule."""
        self.history.append(row)
        _write_history(history_path, self.history)
        self.epoch = row["epoch"]
        self.stopped = self.epoch >= min_epochs and self.epoch - self.best_epoch >= patience

    def best_row(self) -> dict[str, float]:
        return dict(next((r for r in self.history if r["epoch"] == self.best_epoch), {}))


@dataclass
class _Run:
    """What ``last.pt`` saves besides the epoch state, and what resuming checks against."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    device: torch.device
    fingerprint: str
    in_dim: int
    n_classes: int
    monitor: str


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
    keep_freed_memory()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_dim, n_classes = _check_bags(train_bags, val_bags)
    encoder_info = _normalise_encoder_info(encoder_info) if encoder_info is not None else _encoder_info_from(train_bags, val_bags)
    y_train, y_val = _labels(train_bags), _labels(val_bags)
    monitor = _monitored(config.monitor, y_val)
    device = _device(config.device)
    paths = {"model": out_dir / "model.pt", "last": out_dir / "last.pt", "history": out_dir / "history.csv"}
    fingerprint = _fingerprint(train_bags, val_bags)

    with _seeded(device, config.seed, config.threads):
        model = build_model(config.model, in_dim, n_classes, **config.model_kwargs).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        rng = np.random.default_rng(config.seed)
        run = _Run(config, model, optimizer, rng, device, fingerprint, in_dim, n_classes, monitor)
        state = _State()
        if resume and paths["last"].exists():
            state = _restore(paths["last"], run)
            _write_history(paths["history"], state.history)

        weight = None
        if config.class_weights:
            counts = np.bincount(y_train, minlength=n_classes)
            weight = torch.tensor(len(y_train) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        train_x = [_as_tensor(b.features) for b in train_bags]
        val_x = [_as_tensor(b.features) for b in val_bags]
        y_train_t = torch.from_numpy(y_train).to(device)

        while state.epoch < config.epochs and not state.stopped:
            epoch = state.epoch + 1
            t0 = time.perf_counter()
            train_loss, train_acc = _train_epoch(model, optimizer, train_x, y_train_t, config, rng, weight, device)
            _check_finite(train_loss, epoch, out_dir, config.lr)
            val_loss, val_acc, val_auc = _evaluate(model, val_x, y_val, n_classes, device)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "val_auc": val_auc,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - t0,
            }
            improved = _improves(row, monitor, state)
            if improved:
                state.mark_best(row, monitor)
                save_checkpoint(
                    paths["model"],
                    model,
                    config.model,
                    config.model_kwargs,
                    n_classes,
                    encoder_info,
                    config,
                    extra=_best_extra(row, monitor, y_train, len(val_bags), n_classes),
                    in_dim=in_dim,
                )
            state.end_epoch(row, paths["history"], config.min_epochs, config.patience)
            _save_state(paths["last"], state, run)
            if on_epoch is not None:
                on_epoch({**row, "best_epoch": state.best_epoch, "improved": improved})

    return TrainResult(
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
        n_classes=n_classes,
        in_dim=in_dim,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    bags: Sequence[FeatureBag] | Sequence[np.ndarray],
    batch_size: int = 16,
    precision: str = "fp32",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class probabilities and tile attention for each bag, in input order.

    Runs in eval mode without gradients, in padded batches of similar-size bags. Each attention
    array has the bag's real length (n_tiles,); models without attention give NaNs.
    ``precision="bf16"`` runs the model under bfloat16 autocast: about half the CPU time on
    large bags (CPUs with avx512_bf16); probabilities stay close to fp32 (tests bound them within 0.02).
    """
    if precision not in ("fp32", "bf16"):
        raise HistomilError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    keep_freed_memory()  # large bags allocate 100s of MB per layer (histomil.runtime)
    feats = [_as_tensor(b.features if isinstance(b, FeatureBag) else b) for b in bags]
    for i, f in enumerate(feats):
        if f.dim() != 2 or f.shape[0] == 0:
            name = bags[i].bag_id if isinstance(bags[i], FeatureBag) else f"#{i}"  # type: ignore[union-attr]
            raise HistomilError(f"bag {name}: no tiles to predict on (features shape {tuple(f.shape)})")
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = _forward_all(model, feats, batch_size, device)
    finally:
        model.train(was_training)
    results = []
    for (logits, attention), f in zip(outputs, feats):
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        att = attention.numpy() if attention is not None else np.full(f.shape[0], np.nan, dtype=np.float32)
        results.append((probs, att))
    return results


# --- shared with end-to-end training (pixels.py) -----------------------------------------


def _labels(bags: Sequence[Any]) -> np.ndarray:
    """The bags' labels as an int64 array (the bags were checked to be labelled)."""
    return np.array([int(b.label) for b in bags], dtype=np.int64)


def _monitored(monitor: str, y_val: np.ndarray) -> str:
    """The metric to monitor: ``val_auc`` falls back to ``val_loss`` (with a warning) on a one-class val set."""
    if monitor == "val_auc" and len(np.unique(y_val)) < 2:
        # stacklevel 3: the warning points at the caller of train / train_pixels
        warnings.warn("validation bags all have one class, so AUC is undefined; monitoring val_loss instead", stacklevel=3)
        return "val_loss"
    return monitor


@contextmanager
def _seeded(device: torch.device, seed: int, threads: int) -> Iterator[None]:
    """Torch's RNG seeded with ``seed`` inside the block, forked so the caller's RNG is left untouched."""
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch_threads(threads):
        torch.manual_seed(seed)
        yield


def _check_finite(train_loss: float, epoch: int, out_dir: Path, lr: float) -> None:
    if not math.isfinite(train_loss):
        raise HistomilError(f"{out_dir}: training diverged at epoch {epoch} (train loss {train_loss}); lower lr (now {lr})")


def _best_extra(row: dict[str, Any], monitor: str, y_train: np.ndarray, n_val_bags: int, n_classes: int) -> dict[str, Any]:
    """What a best checkpoint (model.pt) records about the epoch and data that produced it."""
    return {
        "best_epoch": row["epoch"],
        "monitor": monitor,
        "metrics": dict(row),
        "n_train_bags": len(y_train),
        "n_val_bags": n_val_bags,
        "train_class_counts": np.bincount(y_train, minlength=n_classes).tolist(),
    }


def _check_nonempty(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> None:
    if not train_bags:
        raise HistomilError("no training bags")
    if not val_bags:
        raise HistomilError("no validation bags (early stopping and model selection need some)")


def _labelled(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """Each bag with its split ("training" / "validation"), once its label is checked."""
    for split, bags in (("training", train_bags), ("validation", val_bags)):
        for b in bags:
            if b.label is None or int(b.label) < 0:
                raise HistomilError(f"{split} bag {b.bag_id!r} has no label")
            yield split, b


def _n_classes(train_bags: Sequence[Any], val_bags: Sequence[Any]) -> int:
    """Number of classes of labelled bags; the training bags must hold at least two."""
    train_classes = {int(b.label) for b in train_bags}
    if len(train_classes) < 2:
        raise HistomilError(f"training bags all have label {train_classes.pop()}; need at least two classes")
    return max(2, max(int(b.label) for b in [*train_bags, *val_bags]) + 1)


# --- one epoch ---------------------------------------------------------------------------


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    feats: list[torch.Tensor],
    y: torch.Tensor,
    config: TrainConfig,
    rng: np.random.Generator,
    weight: torch.Tensor | None,
    device: torch.device,
) -> tuple[float, float]:
    model.train()
    labels_in = takes_labels(model)
    order = rng.permutation(len(feats))
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        batch = []
        for i in idx:
            f = feats[i]
            if config.max_instances is not None and f.shape[0] > config.max_instances:
                keep = np.sort(rng.choice(f.shape[0], config.max_instances, replace=False))
                f = f[torch.from_numpy(keep)]
            batch.append(f)
        x, mask = _collate(batch, device)
        target = y[torch.from_numpy(idx).to(device)]
        out = model(x, mask, y=target) if labels_in else model(x, mask)
        loss = bag_loss(out, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(idx)
        correct += (out.logits.detach().argmax(dim=-1) == target).sum()
    return float(total_loss) / len(feats), float(correct) / len(feats)


@torch.no_grad()
def _evaluate(
    model: nn.Module, feats: list[torch.Tensor], y: np.ndarray, n_classes: int, device: torch.device
) -> tuple[float, float, float]:
    model.eval()
    logits = torch.stack([lg for lg, _ in _forward_all(model, feats, 16, device)]).double()
    target = torch.from_numpy(y)
    loss = float(F.cross_entropy(logits, target))
    acc = float((logits.argmax(dim=-1) == target).double().mean())
    return loss, acc, _auc(y, torch.softmax(logits, dim=-1).numpy(), n_classes)


def _auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """ROC-AUC (one-vs-rest macro for >2 classes); NaN when a class is missing from ``y``."""
    if len(np.unique(y)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(n_classes))))


def _improves(row: dict[str, float], monitor: str, state: _State) -> bool:
    value = row[monitor]
    if not math.isfinite(value):
        return False
    if state.best_value is None:
        return True
    if monitor == "val_loss":
        return value < state.best_value
    # val_auc: higher is better; an equal AUC (common once it reaches 1.0) is broken by val_loss.
    return value > state.best_value or (value == state.best_value and row["val_loss"] < (state.best_loss or math.inf))


# --- batching ----------------------------------------------------------------------------


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.float()
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


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
    order = sorted(range(len(feats)), key=lambda i: feats[i].shape[0])
    batches: list[list[int]] = []
    for i in order:  # ascending length, so the newest bag sets N_max of its batch
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * feats[i].shape[0] <= max_padded_tiles:
            batches[-1].append(i)
        else:
            batches.append([i])
    results: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(feats)
    for batch in batches:
        x, mask = _collate([feats[i] for i in batch], device)
        out = model(x, mask)
        logits = out.logits.float().cpu()
        attention = out.attention.float().cpu() if out.attention is not None else None
        for j, i in enumerate(batch):
            att = attention[j, : feats[i].shape[0]].clone() if attention is not None else None
            results[i] = (logits[j], att)
    return results  # type: ignore[return-value]


# --- checks, state, files ----------------------------------------------------------------


def _check_bags(train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag]) -> tuple[int, int]:
    """Validate the bags; returns (feature dim, number of classes)."""
    _check_nonempty(train_bags, val_bags)
    dim = None
    for split, b in _labelled(train_bags, val_bags):
        f = b.features
        if f.ndim != 2 or f.shape[0] == 0:
            raise HistomilError(f"{split} bag {b.bag_id!r} has no tiles (features shape {f.shape})")
        if dim is None:
            dim = int(f.shape[1])
        elif f.shape[1] != dim:
            raise HistomilError(
                f"{split} bag {b.bag_id!r} has {f.shape[1]}-dim features, others have {dim} (mixed encoders?)"
            )
        if not np.isfinite(f).all():
            raise HistomilError(f"{split} bag {b.bag_id!r} has NaN or infinite features")
    return int(dim), _n_classes(train_bags, val_bags)  # type: ignore[arg-type]


def _encoder_info_from(train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag]) -> dict[str, Any] | None:
    """The encoder description stored in the feature files; mixing encoders is an error."""
    encoders = {str(b.attrs["encoder"]) for b in [*train_bags, *val_bags] if b.attrs.get("encoder")}
    if len(encoders) > 1:
        raise HistomilError(f"bags come from different encoders ({', '.join(sorted(encoders))}); extract features with one")
    if not encoders:
        return None
    attrs = train_bags[0].attrs
    keys = ("encoder", "input_size", "mean", "std", "feature_dim")
    info = {k: attrs[k] for k in keys if k in attrs}
    info["name"] = info.pop("encoder", encoders.pop())
    return info


def _normalise_encoder_info(info: dict[str, Any]) -> dict[str, Any]:
    """Accept a feature file's attrs as encoder info: its ``encoder`` key becomes ``name``."""
    info = dict(info)
    if "name" not in info and "encoder" in info:
        info["name"] = info.pop("encoder")
    return info


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HistomilError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HistomilError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def _fingerprint(train_bags: Sequence[FeatureBag], val_bags: Sequence[FeatureBag]) -> str:
    """Identifies the data of a run (ids, labels, sizes, order), to refuse resuming on other data."""
    h = hashlib.sha256()
    for split, bags in (("train", train_bags), ("val", val_bags)):
        for b in bags:
            h.update(f"{split}|{b.bag_id}|{b.label}|{b.features.shape}\n".encode())
    return h.hexdigest()


def _save_state(path: Path, state: _State, run: _Run) -> None:
    model, device = run.model, run.device
    payload = {
        "format": STATE_FORMAT,
        "config": run.config.model_dump(mode="json"),
        "fingerprint": run.fingerprint,
        "in_dim": run.in_dim,
        "n_classes": run.n_classes,
        "monitor": run.monitor,
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_value": state.best_value,
        "best_loss": state.best_loss,
        "stopped": state.stopped,
        "history": state.history,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_rng": json.dumps(run.rng.bit_generator.state),
    }
    atomic_torch_save(payload, path)


def _restore(path: Path, run: _Run) -> _State:
    """Load ``last.pt`` into model, optimizer and RNGs after checking it belongs to this run."""
    data = read_checkpoint_dict(path, what="training state to resume from")
    if data.get("format") != STATE_FORMAT:
        raise HistomilError(f"{path}: not a histomil training state (last.pt)")
    saved = data["config"]
    now = run.config.model_dump(mode="json")
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise HistomilError(f"{path}: cannot resume, training options changed since the run started: {', '.join(changed)}")
    if data["fingerprint"] != run.fingerprint or data["in_dim"] != run.in_dim or data["n_classes"] != run.n_classes:
        raise HistomilError(f"{path}: cannot resume, the training/validation bags differ from the interrupted run")
    if data["monitor"] != run.monitor:
        raise HistomilError(f"{path}: cannot resume, monitored metric changed ({data['monitor']} -> {run.monitor})")
    run.model.load_state_dict(data["model_state"])
    run.optimizer.load_state_dict(data["optimizer_state"])
    torch.set_rng_state(data["torch_rng"])
    if run.device.type == "cuda" and data.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(data["cuda_rng"], run.device)
    run.rng.bit_generator.state = json.loads(data["numpy_rng"])
    return _State(
        epoch=int(data["epoch"]),
        best_epoch=int(data["best_epoch"]),
        best_value=data["best_value"],
        best_loss=data["best_loss"],
        history=[dict(r) for r in data["history"]],
        stopped=bool(data["stopped"]),
    )


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite history.csv atomically (full float precision, so it reads back exactly)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HISTORY_COLUMNS)
        for row in history:
            writer.writerow([int(row["epoch"])] + [repr(float(row[c])) for c in HISTORY_COLUMNS[1:]])
        fh.flush()
        os.fsync(fh.fileno())
