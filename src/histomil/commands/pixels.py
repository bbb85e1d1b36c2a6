"""``histomil train-pixels``: end-to-end MIL training from tile images (see :mod:`histomil.training.pixels`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from histomil.config import read_mapping
from histomil.devices import resolve_device
from histomil.ui import log, progress_bars, show_result, user_errors


@user_errors
def train_pixels_cmd(
    train: Path = typer.Argument(..., help="Training bags: a bag root folder (one sub-folder of tiles per bag) or a manifest CSV."),
    val: Path = typer.Option(..., "--val", help="Validation bags (folder or manifest)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model.pt (best), last.pt (to resume from), history.csv."),
    labels: Optional[Path] = typer.Option(None, help="Labels CSV (case,y_true) for the training bags; default root/labels.csv or df.csv."),
    val_labels: Optional[Path] = typer.Option(None, help="Labels CSV for the validation bags."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON config (keys of PixelTrainConfig); options below override it."),
    backbone: Optional[str] = typer.Option(None, help="efficientnet_lite0 (ImageNet, default) or original (the original project's CNN)."),
    model: Optional[str] = typer.Option(None, help="MIL head: gated_abmil, abmil, original_concat (default: gated_abmil / original_concat for --backbone original)."),
    finetune: Optional[str] = typer.Option(None, help="efficientnet: none (frozen), last_blocks (default) or all."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs."),
    bags_per_step: Optional[int] = typer.Option(None, help="Bags per optimizer step (per torchrun process; gradients accumulated bag by bag). Default 1."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the head (and of the original CNN)."),
    encoder_lr: Optional[float] = typer.Option(None, help="Learning rate of the fine-tuned encoder (default lr/10)."),
    weight_decay: Optional[float] = typer.Option(None, help="Adam weight decay."),
    augment_p: Optional[float] = typer.Option(None, help="Probability of each flip / rotation / transpose (0 = off)."),
    precision: Optional[str] = typer.Option(None, help="Encoder precision: auto (default: bf16 where the device computes it natively, else fp32), fp32 or bf16."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory layout for the encoder (default on: faster on CPU)."),
    tile_chunk: Optional[int] = typer.Option(None, help="Encode K tiles at a time with activation checkpointing (0 = all at once)."),
    input_size: Optional[int] = typer.Option(None, help="Resize tiles to this size (default 224 / the native tile size for original)."),
    max_tiles: Optional[int] = typer.Option(None, help="Randomly sub-sample training bags larger than this."),
    monitor: Optional[str] = typer.Option(None, help="val_loss or val_auc."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs."),
    min_epochs: Optional[int] = typer.Option(None, help="Never stop before this epoch."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    workers: Optional[int] = typer.Option(None, help="Tile-decoding worker processes (0 = main process)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N or auto."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (0 = all cores; 1 is faster when other jobs share the CPU)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops at the first unreadable tile; 'skip' decodes every tile first and leaves bad ones out."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run from OUT/last.pt (same bags and options; default), or start afresh."),
) -> None:
    """Train a tile encoder and a MIL head together, end to end from the tile images.

    Resumable: rerunning the same command after an interruption (even kill -9) continues from the
    last finished epoch and ends as an uninterrupted run would have.

    Under ``torchrun --nproc-per-node N -m histomil train-pixels ...`` the N processes train one model
    with DistributedDataParallel (gloo on CPU, nccl on CUDA), each on 1/N of every step's bags: N
    processes with --bags-per-step b take the steps of one process with N x b. Rank 0 writes the run folder.
    """
    from histomil.data.bags import check_bags, load_bags
    from histomil.training.distributed import distributed_session
    from histomil.training.pixels import PixelTrainConfig, train_pixels

    raw: dict = read_mapping(config) if config is not None else {}
    options = dict(backbone=backbone, model=model, finetune=finetune, epochs=epochs, bags_per_step=bags_per_step,
                   lr=lr, encoder_lr=encoder_lr, weight_decay=weight_decay, augment_p=augment_p, precision=precision,
                   channels_last=channels_last, input_size=input_size, max_tiles=max_tiles, monitor=monitor, patience=patience,
                   min_epochs=min_epochs, seed=seed, num_workers=workers, device=device, threads=threads)
    raw.update({k: v for k, v in options.items() if v is not None})
    if tile_chunk is not None:
        raw["tile_chunk"] = tile_chunk or None
    cfg = PixelTrainConfig.parse(raw, str(config) if config is not None else "train-pixels options")

    # a GPU asked for and absent is refused here, before the tiles are read
    with distributed_session(resolve_device(cfg.device)) as world:  # one process unless under torchrun
        say = log if world.is_main else _quiet  # every rank reads the bags; rank 0 tells about them
        train_bags = load_bags(train, labels, require_labels=True, on_bad_tile=on_bad_tile, log=say)
        val_bags = load_bags(val, val_labels, require_labels=True, on_bad_tile=on_bad_tile, log=say)
        with progress_bars() as bars:
            progress = bars if world.is_main else None  # one set of bars, rank 0's
            if on_bad_tile == "skip":
                train_bags = check_bags(train_bags, "skip", say, _stage(progress, "checking training tiles"))
                val_bags = check_bags(val_bags, "skip", say, _stage(progress, "checking validation tiles"))
            if resume and (out / "last.pt").is_file():
                say(f"resuming from {out / 'last.pt'}")
            result = train_pixels(train_bags, val_bags, cfg, out, progress=progress, resume=resume,
                                  on_epoch=lambda row: bars("epochs", int(row["epoch"]), cfg.epochs))
    if not world.is_main:
        return
    best = result.best_metrics
    show_result(f"best epoch {result.best_epoch} of {result.epochs_run}: val_loss {best.get('val_loss', float('nan')):.4f}, "
                f"val_acc {best.get('val_acc', float('nan')):.3f}, val_auc {best.get('val_auc', float('nan')):.3f}; "
                f"model saved to {result.model_path}")


def _stage(progress: Callable[[str, int, int], None] | None, name: str) -> Callable[[int, int], None] | None:
    """``progress`` for one named stage (None without progress bars)."""
    return None if progress is None else (lambda done, total: progress(name, done, total))


def _quiet(message: str) -> None:
    """A log that drops its lines (the other ranks')."""
