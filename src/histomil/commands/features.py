"""``histomil features extract``: encode every distinct tile of a bag dataset once, one HDF5 file per bag."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from histomil.config import validate_options
from histomil.devices import DEVICE_HELP, resolve_device
from histomil.errors import HistomilError
from histomil.hardware import PRECISIONS, check_precision
from histomil.ui import log, progress_bars, show_result, user_errors

if TYPE_CHECKING:
    from histomil.callbacks import Progress
    from histomil.features.extract import ExtractionSummary
    from histomil.features.shards import Shard
    from histomil.pipeline import FeatureConfig

SHARD_HELP = ("I/N: encode only shard I of N (0-based) of the bags, e.g. a SLURM job array's "
              "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; the last shard to finish writes the index. "
              "Under torchrun each rank takes its share without it.")


@user_errors
def features_extract(
    source: Path = typer.Argument(..., help="A study folder (from 'bags make'), a bag root folder, or a manifest CSV."),
    out: Path = typer.Argument(..., help="Output folder for the per-bag feature files."),
    labels: Optional[Path] = typer.Option(None, help="Labels CSV for a bag root (default root/labels.csv or df.csv)."),
    encoder: str = typer.Option("efficientnet_lite0", help="Tile encoder: efficientnet_lite0, a preset (uni_v2, virchow2, ...) or timm:<architecture>; 'histomil encoders' lists them."),
    weights: Optional[Path] = typer.Option(None, help="Weights file (.safetensors, .pth, .bin) for a preset or timm: encoder (default: the local Hugging Face cache)."),
    precision: str = typer.Option("auto", help="auto (default: bf16 where the hardware computes it natively, else fp32), fp32 or bf16."),
    runtime: str = typer.Option("auto", help="What runs the encoder: auto (OpenVINO for fp32 on the CPU when installed, else torch), torch, openvino or onnxruntime."),
    batch_size: int = typer.Option(64, help="Tiles per encoder batch."),
    workers: int = typer.Option(1, help="Decoding threads (decoding overlaps encoding); 0 decodes in the main thread."),
    cache: Optional[Path] = typer.Option(None, help="Tile feature cache folder (default OUT/cache)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops; 'skip' logs bad tiles and leaves them out."),
    overwrite: bool = typer.Option(False, help="Re-write feature files that already exist."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
) -> None:
    """Encode every distinct tile once and write one HDF5 feature file per bag (resumable).

    Under ``torchrun --nproc-per-node N -m histomil features extract ...`` (or with ``--shard I/N``)
    each process encodes its share of the bags into the same OUT."""
    from histomil.features.runtimes import RUNTIMES
    from histomil.features.shards import choose_shard
    from histomil.pipeline import FeatureConfig, extract_study
    from histomil.training.distributed import rank_device, world

    if precision not in PRECISIONS:
        raise HistomilError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    check_precision(precision, resolve_device(device))
    if runtime not in RUNTIMES:
        raise HistomilError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    cfg = validate_options(FeatureConfig, dict(encoder=encoder, weights=str(weights) if weights else None, precision=precision, runtime=runtime, batch_size=batch_size,
                                                workers=workers, on_bad_tile=on_bad_tile, device=device))  # before any work
    here = world()
    part = choose_shard(shard, here.rank, here.world_size)
    cfg = cfg.model_copy(update={"device": str(rank_device(resolve_device(device)))})  # cuda:LOCAL_RANK under torchrun
    with progress_bars() as progress:
        if (source / "study.json").is_file():
            summaries = extract_study(source, out, cfg, cache, log=log, progress=progress, shard=part)
        else:
            summaries = {source.name: extract_bag_source(source, out, labels, cfg, cache, overwrite, part, progress)}
    who = f"shard {part.label}: " if part is not None else ""
    for name, s in summaries.items():
        changed = f", {s.n_changed} redone as their tiles or settings changed" if s.n_changed else ""
        relabelled = f", {s.n_relabelled} relabelled" if s.n_relabelled else ""
        show_result(f"{who}{name}: {s.n_bags} bags ({s.n_written} written, {s.n_skipped_existing} already done{changed}{relabelled}), "
                    f"{s.n_unique_tiles} distinct tiles, {s.n_encoded} encoded, {len(s.bad_tiles)} bad tiles skipped")


def extract_bag_source(source: Path, out: Path, labels: Path | None, cfg: FeatureConfig, cache: Path | None,
                       overwrite: bool, shard: Shard | None, progress: Progress) -> ExtractionSummary:
    """``features extract`` of a bag root or manifest (not a study): this process's bags (all, or its
    ``shard``'s), then the folder's index (labels.csv, tiles.csv) once every shard has finished."""
    from histomil.data.bags import load_bags
    from histomil.features import shards
    from histomil.features.cache import FeatureCache
    from histomil.features.encoders import build_encoder
    from histomil.features.extract import copy_sidecars, extract_bags
    from histomil.features.runtimes import with_runtime

    bags = load_bags(source, labels, require_labels=False, on_bad_tile=cfg.on_bad_tile, log=log)
    unlabelled = sum(b.label is None for b in bags)
    if unlabelled:  # fine for predict; train and evaluate would refuse them only later
        warnings.warn(f"{source}: {unlabelled} of {len(bags)} bags have no label (not in a labels CSV); "
                      "their feature files can be predicted on, not trained or evaluated on", stacklevel=1)
    enc = with_runtime(build_encoder(cfg.encoder, precision=cfg.precision, channels_last=True, weights=cfg.weights,
                                     device=cfg.device), cfg.runtime)
    fc = FeatureCache.for_encoder(cache or out / "cache", enc)
    mine = shard.take(bags, key=lambda b: b.bag_id) if shard is not None else bags
    if shard is not None:
        shards.begin(out, shard)
    summary = extract_bags(mine, out, enc, fc, cfg.batch_size, cfg.workers, cfg.on_bad_tile, overwrite, log, progress, shard=shard)

    def write_index(_items: list[str]) -> None:
        if source.is_dir():
            copy_sidecars(source, out)
        ids = {f"{b.bag_id}.h5" for b in bags}
        others = sorted(p.name for p in out.glob("*.h5") if p.name not in ids)
        if others:  # e.g. bags removed from the source since an earlier extraction
            warnings.warn(f"{out}: {len(others)} feature file(s) belong to no bag of {source} (first: {others[0]});"
                          " training on this folder would use them too: delete them if they are stale", stacklevel=1)

    if shard is None:
        write_index([])
        shards.forget_shards(out)
    else:
        shards.finish(out, shard, [b.bag_id for b in mine])
        if shards.merge_when_complete(out, write_index):
            log(f"{out}: every shard has finished; labels and index written")
    return summary
