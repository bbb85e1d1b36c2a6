"""End-to-end MIL from pixels: a tile encoder and a MIL head trained together, bag by bag.

Unlike :mod:`.trainer` (a MIL head on cached, frozen features), the tiles are decoded and
augmented every epoch and gradients can flow into the encoder, so it adapts to histology:

* ``backbone="efficientnet_lite0"``: the ImageNet EfficientNet-Lite0 (tiles resized to 224 px,
  scaled to [-1, 1]); ``finetune`` = ``"none"`` (frozen encoder: only the head learns, still on
  freshly augmented tiles), ``"last_blocks"`` (the last two stages, blocks 11-15, and the 1x1 head
  convolution) or ``"all"``. The encoder always runs with frozen BatchNorm statistics and without
  stochastic depth (eval mode): the tiles of one bag come from one case, so their batch statistics
  are poor estimates, and frozen statistics make chunked encoding exact.
* ``backbone="original"``: the original project's tile CNN trained from scratch (pixels 0..255 at
  the native tile size), by default with its order-dependent concatenation head
  (``model="original_concat"``, see :mod:`histomil.models.original`), or with any registry head.

The model (and its memory-bounded, checkpointed ``tile_chunk`` encoding) is
:mod:`.pixel_model`'s; tiles are read with :func:`~histomil.data.images.read_rgb`, augmented
(training only) and resized in DataLoader worker processes (:mod:`.pixel_data`). Randomness
(initialisation, dropout, bag order, tile sub-sampling, augmentation) derives from ``config.seed``
only, so a run is reproducible for a seed.

Several processes: under ``torchrun`` the model trains in DistributedDataParallel (gloo on CPU,
nccl on CUDA, one GPU per rank). Every rank draws the same bag order, tile sub-samples and
augmentation seeds and trains on its share of them (:func:`train_epoch`); validation is split over
the ranks and gathered. R ranks with ``bags_per_step`` b take the optimizer steps one process takes
with ``bags_per_step`` R x b (up to float rounding; dropout masks are drawn per rank). Each rank
runs its own ``num_workers`` tile-decoding workers. Rank 0 alone writes the run folder; a run
resumes only under the number of processes it started with.

The epoch loop is :func:`histomil.training.loop.run_training`, shared with :mod:`.trainer`. Files
written to ``out_dir``: ``history.csv`` (one row per epoch, as :mod:`.trainer`), ``model.pt``, the
best checkpoint by the monitored metric (kind ``"pixels"``;
:func:`~histomil.training.checkpoint.load_checkpoint` rebuilds it), and ``last.pt``, the training
state after the latest epoch, from which ``train_pixels(..., resume=True)`` continues exactly (for
instance after the process was killed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
from pydantic import Field
from torch import nn

from histomil.callbacks import Progress
from histomil.config import one_of
from histomil.data.bags import Bag
from histomil.data.images import read_rgb
from histomil.devices import resolve_device, to_device
from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import EfficientNetLite0, load_pretrained_lite0
from histomil.features.extract import tile_digests
from histomil.hardware import resolve_precision
from histomil.models.original import ConcatAttentionHead, OriginalTileCNN
from histomil.models.registry import build_model, model_names
from histomil.runtime import flush_denormals, keep_freed_memory
from histomil.training import distributed
from histomil.training.checkpoint_file import save_checkpoint
from histomil.training.common import (
    auc,
    bag_loss,
    check_nonempty,
    count_classes,
    labelled,
    labels,
    monitored_metric,
    parse_config,
)
from histomil.training.loop import RESUMABLE_CHANGES, RunResult, Trainable, best_extra, run_training
from histomil.training.pixel_data import TilePrep, TileTask, iter_bags
from histomil.training.pixel_model import EfficientNetEncoder, PixelMIL

__all__ = [
    "PixelTrainConfig", "PixelTrainResult", "build_pixel_model", "model_from_checkpoint", "pixel_optimizer", "predict_pixels", "predict_pixels_on_ranks", "train_epoch",
    "train_pixels",
]

BACKBONES = ("efficientnet_lite0", "original")
ORIGINAL_HEAD = "original_concat"  # the original's concatenation head (not in the feature-model registry)
LAST_BLOCKS = 5  # finetune="last_blocks": EfficientNet-Lite0 blocks 11-15 (the 192- and 320-channel stages)
EFFICIENTNET_SIZE = 224
# Options that may change between an interrupted run and its resumption (worker processes do not
# change the results: the tiles and their augmentation are seeded per bag).
PIXEL_RESUMABLE_CHANGES = RESUMABLE_CHANGES | {"num_workers"}



class PixelTrainConfig(pydantic.BaseModel, extra="forbid"):
    """Options of end-to-end training (unknown keys are an error). ``None`` = backbone default."""

    backbone: Literal["efficientnet_lite0", "original"] = "efficientnet_lite0"
    model: str | None = None  # MIL head: gated_abmil (efficientnet) / original_concat (original)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = True  # ImageNet weights for efficientnet_lite0 (False: tests only, see build_pixel_model)
    finetune: Literal["none", "last_blocks", "all"] | None = None  # last_blocks (efficientnet) / all (original)
    input_size: int | None = Field(None, ge=8)  # tiles are resized to this; 224 / native tile size
    epochs: int = Field(100, ge=1)
    # Bags per optimizer step (per torchrun rank): the gradient of their mean loss, accumulated one bag at
    # a time (memory of one bag). Like train's batch_size; R ranks x b bags = one process with R x b.
    bags_per_step: int = Field(1, ge=1)
    lr: float = Field(5e-4, ge=0)  # head (and original CNN) learning rate
    encoder_lr: float | None = Field(None, ge=0)  # lr / 10 for a pretrained encoder, lr for the original
    weight_decay: float = Field(1e-4, ge=0)
    augment_p: float = Field(0.2, ge=0, le=1)  # probability of each flip / rotation / transpose
    # bf16 = autocast of the encoder (head stays fp32); auto = bf16 where the device computes it natively
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True  # NHWC layout for the encoder: 1.3-1.5x faster training steps on our CPU
    tile_chunk: int | None = Field(8, ge=1)  # encode K tiles at a time, checkpointed; None = all at once
    max_tiles: int | None = Field(None, ge=1)  # random sub-sample of larger training bags
    monitor: Literal["val_loss", "val_auc"] = "val_loss"
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(10, ge=0)
    seed: int = 0
    num_workers: int = Field(1, ge=0)  # tile-decoding worker processes (0 = in the main process)
    device: str = "cpu"
    # CPU threads (0 = torch's default, all cores). Convolutions use them well on an idle machine, but
    # when other processes compete for the cores, 1 thread was several times faster than 2 on our CPU.
    threads: int = Field(0, ge=0)

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        # when the options are read, not after every tile was decoded
        return name if name is None else one_of(name, [*model_names(), ORIGINAL_HEAD], "model")

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "pixel training config") -> PixelTrainConfig:
        """Validate a dict; problems -> one-line HistomilError naming ``source``."""
        return parse_config(cls, data, source).resolved()

    def resolved(self) -> PixelTrainConfig:
        """A copy with the backbone defaults filled in; inconsistent options -> HistomilError."""
        original = self.backbone == "original"
        finetune = self.finetune or ("all" if original else "last_blocks")
        if original and finetune != "all":
            raise HistomilError("finetune applies to efficientnet_lite0; the original CNN is trained from scratch (finetune=all)")
        encoder_lr = self.encoder_lr
        if encoder_lr is None:
            encoder_lr = self.lr / 10 if (not original and self.pretrained) else self.lr
        return self.model_copy(update={
            "model": self.model or (ORIGINAL_HEAD if original else "gated_abmil"),
            "finetune": finetune,
            "encoder_lr": encoder_lr,
            "input_size": self.input_size or (None if original else EFFICIENTNET_SIZE),
        })


@dataclass
class PixelTrainResult(RunResult):
    """What :func:`train_pixels` produced; paths point into ``out_dir``."""

    config: PixelTrainConfig  # resolved (defaults filled in)


# --- model -------------------------------------------------------------------------------


def build_pixel_model(config: PixelTrainConfig, n_classes: int, input_size: int, pretrained: bool | None = None) -> PixelMIL:
    """Build encoder + head for a config; ``pretrained=None`` follows ``config.pretrained``.

    Sets ``requires_grad`` per ``config.finetune``. Uses torch's global RNG for initialisation.
    An EfficientNet without its ImageNet weights keeps frozen (identity) BatchNorm statistics and
    trains poorly from scratch: ``pretrained=False`` is for tests and for rebuilding checkpoints.
    """
    config = config.resolved()
    pretrained = config.pretrained if pretrained is None else pretrained
    encoder: nn.Module
    if config.backbone == "efficientnet_lite0":
        backbone = EfficientNetLite0()
        if pretrained:
            load_pretrained_lite0(backbone)
        encoder = EfficientNetEncoder(backbone)
        prep = TilePrep(input_size)
        for p in encoder.parameters():
            p.requires_grad_(config.finetune == "all")
        if config.finetune == "last_blocks":
            for module in (*backbone._blocks[-LAST_BLOCKS:], backbone._conv_head, backbone._bn1):
                for p in module.parameters():
                    p.requires_grad_(True)
    else:
        encoder = OriginalTileCNN(input_size)
        prep = TilePrep(input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), raw=True)
    dim = int(encoder.out_dim)
    head: nn.Module
    if config.model == ORIGINAL_HEAD:
        try:
            head = ConcatAttentionHead(dim, n_classes=n_classes, **config.model_kwargs)
        except (TypeError, ValueError) as exc:
            raise HistomilError(f"model {ORIGINAL_HEAD!r}: bad options {config.model_kwargs}: {exc}") from None
    else:
        head = build_model(str(config.model), dim, n_classes, **config.model_kwargs)
    precision = resolve_precision(config.precision, "cpu")  # train_pixels resolves it for its device first
    return PixelMIL(encoder, head, tile_chunk=config.tile_chunk, precision=precision,
                    channels_last=config.channels_last, prep=prep)


def model_from_checkpoint(data: dict[str, Any]) -> PixelMIL:
    """Rebuild an (untrained) pixel model from a checkpoint dict; the caller loads the weights."""
    try:
        config = PixelTrainConfig.model_validate({**data["train_config"], "device": "cpu"})
        input_size = int(data["encoder_info"]["input_size"])
    except (pydantic.ValidationError, KeyError, TypeError, ValueError) as exc:
        raise HistomilError(f"pixel checkpoint has a malformed training config ({str(exc).splitlines()[0]})") from None
    return build_pixel_model(config, int(data["n_classes"]), input_size, pretrained=False)


# --- training ----------------------------------------------------------------------------


def pixel_optimizer(model: PixelMIL, config: PixelTrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable weights: the head at ``config.lr``, the encoder's at ``config.encoder_lr``."""
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": config.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": config.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


def train_pixels(
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    config: PixelTrainConfig,
    out_dir: str | Path,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
    resume: bool = False,
) -> PixelTrainResult:
    """Train encoder + head end to end on tile bags; early-stop and select on ``val_bags``.

    ``config.bags_per_step`` bags per optimizer step (Adam; the encoder's trainable weights use
    ``encoder_lr``). ``on_epoch`` gets each history row plus ``best_epoch`` and ``improved``;
    ``progress(stage, done, total)`` reports bags within an epoch. ``resume=True`` continues from
    ``out_dir/last.pt`` when it exists (the same bags and options; ``epochs``, ``device``, ``threads``
    and ``num_workers`` may change), exactly as an uninterrupted run would have; a finished run is
    returned as is. Under torchrun the ranks train one model together (module docstring).
    """
    config = config.resolved()
    n_classes = _check_bags(train_bags, val_bags, config)
    y_train, y_val = labels(train_bags), labels(val_bags)
    monitor = monitored_metric(config.monitor, y_val)
    device = distributed.rank_device(resolve_device(config.device))  # cuda -> cuda:LOCAL_RANK under torchrun
    input_size = config.input_size or _native_size(train_bags[0])
    # the precision actually used is what the run records (history, checkpoints, last.pt)
    config = config.model_copy(update={"input_size": input_size, "precision": resolve_precision(config.precision, device)})

    def build() -> Trainable:  # called with torch's RNG seeded from config.seed
        model = build_pixel_model(config, n_classes, input_size).to(device)
        optimizer = pixel_optimizer(model, config)
        rng = np.random.default_rng(config.seed)
        y_train_t = torch.from_numpy(y_train).to(device)
        train_model = distributed.wrap_model(model, device)  # DistributedDataParallel under torchrun

        def validate() -> tuple[float, float, float]:
            outputs = predict_pixels_on_ranks(model, val_bags, num_workers=config.num_workers,
                                              progress=_stage(progress, "validating (bags)"))
            return _val_metrics(outputs, y_val, n_classes)

        def save_best(path: Path, row: dict[str, Any]) -> None:
            save_checkpoint(
                path, model, str(config.model), config.model_kwargs, n_classes,
                model.prep.info(config.backbone, model.in_dim) if model.prep else None, config,
                extra=best_extra(row, monitor, y_train, len(val_bags), n_classes),
                in_dim=model.in_dim, kind="pixels",
            )

        return Trainable(
            model, optimizer, rng,
            train_epoch=lambda: train_epoch(train_model, optimizer, train_bags, y_train_t, config, rng, device, progress),
            validate=validate,
            save_best=save_best,
        )

    run = run_training(build, config, out_dir, device=device, monitor=monitor, n_classes=n_classes,
                       fingerprint=_fingerprint(train_bags, val_bags),
                       resumable_changes=PIXEL_RESUMABLE_CHANGES, resume=resume, on_epoch=on_epoch)
    return PixelTrainResult(**vars(run), config=config)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, bags: Sequence[Bag], y: torch.Tensor,
                config: PixelTrainConfig, rng: np.random.Generator, device: torch.device,
                progress: Progress | None = None) -> tuple[float, float]:
    """One pass over the training bags -> ``(mean train loss, train accuracy)`` over every bag trained on.

    The bag order, tile sub-sampling (``config.max_tiles``), each bag's augmentation seed and the
    DataLoader's seed are drawn from ``rng``, so restoring ``rng`` (and torch's RNG, for dropout)
    repeats an epoch exactly. Each optimizer step takes ``config.bags_per_step`` bags in that order
    (fewer at the end of the epoch): every bag's loss divided by the step's bag count is
    backpropagated on its own (one bag's activations in memory), so the step follows the gradient
    of the bags' mean loss.

    Under torchrun (``model`` in DistributedDataParallel) every rank draws the same tasks from its
    ``rng`` and trains on positions r, r + R, ... of them (:func:`distributed.shard_indices`, padded
    so every rank takes as many steps), synchronising gradients on a step's last bag only. DDP
    averages the ranks' gradients, so R ranks x b bags per step = one process with R x b (exactly
    so when R divides the bag count; otherwise the first bags of the order are trained twice).
    Loss and accuracy are summed over the ranks. ``progress("training (bags)", done, total)`` after
    each of this rank's bags.
    """
    model.train()
    pixel_model = distributed.unwrap_model(model)
    tasks = []
    for i in rng.permutation(len(bags)):
        tiles = bags[i].tile_paths
        if config.max_tiles is not None and len(tiles) > config.max_tiles:
            keep = np.sort(rng.choice(len(tiles), config.max_tiles, replace=False))
            tiles = tuple(tiles[k] for k in keep)
        tasks.append(TileTask(int(i), tuple(tiles), int(rng.integers(2**63 - 1))))
    loader_seed = int(rng.integers(2**63 - 1))
    if distributed.active():
        here = distributed.world()
        tasks = [tasks[k] for k in distributed.shard_indices(len(tasks), here.rank, here.world_size)]
    per_step = config.bags_per_step
    no_sync = getattr(model, "no_sync", None)  # DDP: no gradient all-reduce before a step's last bag
    totals = torch.zeros(3, dtype=torch.float64)  # summed loss, correct bags, bags
    bags_iter = iter_bags(tasks, pixel_model.prep, config.augment_p, config.num_workers, loader_seed)
    for done, (i, tiles) in enumerate(bags_iter, 1):
        first = (done - 1) % per_step == 0
        in_step = min(per_step, len(tasks) - (done - 1) // per_step * per_step)  # bags of this step
        last = done % per_step == 0 or done == len(tasks)
        if first:
            optimizer.zero_grad(set_to_none=True)
        target = y[i : i + 1]
        with no_sync() if (no_sync is not None and not last) else nullcontext():
            out = model(to_device(tiles.unsqueeze(0), device), y=target)
            loss = bag_loss(out, target)
            (loss / in_step if in_step > 1 else loss).backward()
        if last:
            optimizer.step()
        correct = out.logits.detach().argmax(dim=-1).item() == int(target.item())
        totals += torch.tensor([float(loss.detach()), float(correct), 1.0], dtype=torch.float64)
        if progress is not None:
            progress("training (bags)", done, len(tasks))
    totals = distributed.all_reduce_sum(totals.to(device)).cpu() if distributed.active() else totals
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


@torch.no_grad()
def predict_pixels(model: PixelMIL, bags: Sequence[Bag], num_workers: int = 1,
                   progress: Progress | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class probabilities (C,) and tile attention (n_tiles,) for each bag, in input order.

    Runs in eval mode, without augmentation, on all tiles of each bag, one bag at a time.
    Attention is NaN for heads that have none.
    """
    keep_freed_memory()
    flush_denormals()
    if model.prep is None:
        raise HistomilError("pixel model has no tile preprocessing (build it with build_pixel_model)")
    for b in bags:
        if len(b.tile_paths) == 0:
            raise HistomilError(f"bag {b.bag_id}: no tiles to predict on")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(bags)
    tasks = [TileTask(i, tuple(b.tile_paths), 0) for i, b in enumerate(bags)]
    try:
        for done, (i, tiles) in enumerate(iter_bags(tasks, model.prep, 0.0, num_workers, 0), 1):
            out = model(to_device(tiles.unsqueeze(0), device))
            probs = torch.softmax(out.logits[0].double(), dim=-1).cpu().numpy()
            att = (out.attention[0].float().cpu().numpy() if out.attention is not None
                   else np.full(tiles.shape[0], np.nan, dtype=np.float32))
            results[i] = (probs, att)
            if progress is not None:
                progress("predicting", done, len(tasks))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def predict_pixels_on_ranks(model: PixelMIL, bags: Sequence[Bag], num_workers: int = 1,
                            progress: Progress | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`predict_pixels` of every bag on every rank, each rank predicting 1/R of them (validation
    costs as much as training here: every tile is encoded); one process predicts them all."""
    if not distributed.active():
        return predict_pixels(model, bags, num_workers, progress)
    here = distributed.world()
    mine = distributed.shard_indices(len(bags), here.rank, here.world_size, pad=False)
    outputs = predict_pixels(model, [bags[k] for k in mine], num_workers, progress)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(bags)
    for indices, part in distributed.all_gather((mine, outputs)):
        for k, out in zip(indices, part):
            results[int(k)] = out
    return results  # type: ignore[return-value]


def _val_metrics(outputs: list[tuple[np.ndarray, np.ndarray]], y: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    probs = np.stack([p for p, _ in outputs])
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-300, None))))
    acc = float(np.mean(probs.argmax(axis=1) == y))
    return loss, acc, auc(y, probs, n_classes)


def _stage(progress: Progress | None, name: str) -> Progress | None:
    return None if progress is None else (lambda _stage_name, done, total: progress(name, done, total))


# --- checks ------------------------------------------------------------------------------


def _check_bags(train_bags: Sequence[Bag], val_bags: Sequence[Bag], config: PixelTrainConfig) -> int:
    """Validate labels and bag sizes; returns the number of classes."""
    check_nonempty(train_bags, val_bags)
    bag_size = int(config.model_kwargs.get("bag_size", 40)) if config.model == ORIGINAL_HEAD else None
    for split, b in labelled(train_bags, val_bags):
        if len(b.tile_paths) == 0:
            raise HistomilError(f"{split} bag {b.bag_id!r} has no tiles")
        if bag_size is not None:
            n = len(b.tile_paths)
            if split == "training" and config.max_tiles is not None:
                n = min(n, config.max_tiles)
            if n != bag_size:
                raise HistomilError(
                    f"{split} bag {b.bag_id!r}: the original model needs bags of exactly {bag_size} tiles "
                    f"(it concatenates them in order), this one has {n}; use a size-agnostic head such as gated_abmil"
                )
    return count_classes(train_bags, val_bags)


def _fingerprint(train_bags: Sequence[Bag], val_bags: Sequence[Bag]) -> str:
    """Identifies the data of a run (ids, labels, tile file names and contents, order), so a resumed run
    on changed tiles starts afresh instead of mixing."""
    digests = tile_digests([Path(p) for b in [*train_bags, *val_bags] for p in b.tile_paths])
    h = hashlib.sha256()
    for split, bags in (("train", train_bags), ("val", val_bags)):
        for b in bags:
            tiles = "|".join(f"{Path(p).name}:{digests[str(p)]}" for p in b.tile_paths)
            h.update(f"{split}|{b.bag_id}|{b.label}|{len(b.tile_paths)}|{tiles}\n".encode())
    return h.hexdigest()


def _native_size(bag: Bag) -> int:
    """Side of the first tile of a bag (the original model's input size when none is given)."""
    tile = read_rgb(bag.tile_paths[0])
    h, w = tile.shape[:2]
    if h != w:
        raise HistomilError(f"{bag.tile_paths[0]}: tile is {w}x{h}, not square; set input_size to resize tiles")
    return int(h)
