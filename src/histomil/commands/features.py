"""``histomil features extract``: encode every distinct tile of a bag dataset once, one HDF5 file per bag."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from histomil.config import validate_options
from histomil.devices import DEVICE_HELP, resolve_device
from histomil.errors import HistomilError
from histomil.hardware import PRECISIONS
from histomil.ui import log, progress_bars, show_result, user_errors


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
) -> None:
    """Encode every distinct tile once and write one HDF5 feature file per bag (resumable)."""
    from histomil.data.bags import load_bags
    from histomil.features.cache import FeatureCache
    from histomil.features.encoders import build_encoder
    from histomil.features.extract import copy_sidecars, extract_bags
    from histomil.features.runtimes import RUNTIMES, with_runtime
    from histomil.pipeline import FeatureConfig, extract_study

    if precision not in PRECISIONS:
        raise HistomilError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if runtime not in RUNTIMES:
        raise HistomilError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    cfg = validate_options(FeatureConfig, dict(encoder=encoder, weights=str(weights) if weights else None, precision=precision, runtime=runtime, batch_size=batch_size,
                                                workers=workers, on_bad_tile=on_bad_tile, device=device))  # before any work
    resolve_device(device)  # a GPU asked for and absent: refused before any work
    with progress_bars() as progress:
        if (source / "study.json").is_file():
            summaries = extract_study(source, out, cfg, cache, log=log, progress=progress)
        else:
            bags = load_bags(source, labels, require_labels=False, on_bad_tile=on_bad_tile, log=log)
            unlabelled = sum(b.label is None for b in bags)
            if unlabelled:  # fine for predict; train and evaluate would refuse them only later
                warnings.warn(f"{source}: {unlabelled} of {len(bags)} bags have no label (not in a labels CSV); "
                              "their feature files can be predicted on, not trained or evaluated on", stacklevel=1)
            enc = with_runtime(build_encoder(encoder, precision=precision, channels_last=True, weights=weights, device=device), runtime)
            fc = FeatureCache.for_encoder(cache or out / "cache", enc)
            summaries = {source.name: extract_bags(bags, out, enc, fc, batch_size, workers, on_bad_tile, overwrite, log, progress)}
            if source.is_dir():
                copy_sidecars(source, out)
            ids = {f"{b.bag_id}.h5" for b in bags}
            others = sorted(p.name for p in out.glob("*.h5") if p.name not in ids)
            if others:  # e.g. bags removed from the source since an earlier extraction
                warnings.warn(f"{out}: {len(others)} feature file(s) belong to no bag of {source} (first: {others[0]});"
                              " training on this folder would use them too: delete them if they are stale", stacklevel=1)
    for name, s in summaries.items():
        changed = f", {s.n_changed} redone as their tiles or settings changed" if s.n_changed else ""
        relabelled = f", {s.n_relabelled} relabelled" if s.n_relabelled else ""
        show_result(f"{name}: {s.n_bags} bags ({s.n_written} written, {s.n_skipped_existing} already done{changed}{relabelled}), "
                    f"{s.n_unique_tiles} distinct tiles, {s.n_encoded} encoded, {len(s.bad_tiles)} bad tiles skipped")
