"""Whole-slide commands: ``histomil tile``, ``histomil features slides``, ``histomil heatmap`` and
slide prediction (``histomil predict`` on slide files).

Options are declared with ``Annotated`` so every parameter keeps a plain Python default: the
functions can be registered with typer (``app.command("tile")(tile_cmd)``) and also called
directly from Python, e.g. ``predict_slides_cmd(model, [source], out)`` when ``histomil predict``
finds slides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histomil.config import check_range
from histomil.devices import DEVICE_HELP, resolve_device
from histomil.errors import HistomilError
from histomil.hardware import PRECISIONS
from histomil.ui import log, progress_bars, show_result, user_errors

# ---------------------------------------------------------------------------- shared options

SlidesArg = Annotated[list[Path], typer.Argument(help="Slide files (.svs .ndpi .mrxs .tif ...) or folders of them.")]
TileSizeOpt = Annotated[int, typer.Option("--tile-size", help="Tile side in pixels at the target resolution.")]
MppOpt = Annotated[float | None, typer.Option("--mpp", help="Target micrometres per pixel (default 0.5, about 20x).")]
MagOpt = Annotated[float | None, typer.Option("--magnification", help="Target magnification instead of --mpp, e.g. 20.")]
SlideMppOpt = Annotated[float | None, typer.Option("--slide-mpp", help="Scan um/px for slides whose header has none.")]
SlideMagOpt = Annotated[
    float | None, typer.Option("--slide-magnification", help="Objective power for slides whose header has none.")
]
MinTissueOpt = Annotated[float, typer.Option("--min-tissue", help="Keep tiles at least this fraction tissue.")]
OnBadSlideOpt = Annotated[str, typer.Option("--on-bad-slide", help="'error' stops at a bad slide; 'skip' lists it and goes on.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Tiles per encoder batch.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Tile-reading worker processes (reading overlaps encoding).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="Encoder precision: auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16.")]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="Weights file (.safetensors, .pth, .bin) of a preset or timm: encoder (default: the local "
                                   "Hugging Face cache)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
ScaleOpt = Annotated[str, typer.Option("--scale", help="Heatmap colours: 'rank' (percentile among tiles) or 'linear'.")]
CoordsOpt = Annotated[
    Path | None,
    typer.Option("--coords", help="Folder of tile coordinates (histomil tile or CLAM <slide>.h5, TRIDENT <slide>_patches.h5): "
                                  "the tiles to encode instead of tiling, or, with --features, where tiles and tile size come from."),
]
FeaturesOpt = Annotated[
    Path | None,
    typer.Option("--features", help="Cached features instead of encoding: a feature file or a folder of <slide>.h5/.pt "
                                    "(histomil, CLAM, TRIDENT or STAMP); no encoder is built."),
]
AllowMismatchOpt = Annotated[
    bool,
    typer.Option("--allow-encoder-mismatch", help="With --features: use features whose recorded encoder differs from the "
                                                  "model's (only when you know they are interchangeable)."),
]
LayoutOpt = Annotated[
    str,
    typer.Option("--layout", help="File layout: histomil (self-describing), clam (h5_files/ pt_files/ patches/), "
                                  "trident (features_<encoder>/ patches/) or stamp (float16 feats, coords in um)."),
]
TileSizeLevel0Opt = Annotated[
    int | None,
    typer.Option("--tile-size-level0", help="With --features: tile side in level-0 pixels, for files that do not record it "
                                            "(CLAM h5_files) and no --coords."),
]


def tiling_spec(
    tile_size: int = 224,
    mpp: float | None = None,
    magnification: float | None = None,
    slide_mpp: float | None = None,
    slide_magnification: float | None = None,
    min_tissue: float = 0.5,
):
    """A :class:`TilingSpec` from command options; invalid combinations -> one-line HistomilError."""
    from pydantic import ValidationError

    from histomil.slides.tiling import TilingSpec

    if mpp is not None and magnification is not None:
        raise HistomilError("give --mpp or --magnification, not both")
    raw: dict = {"tile_size": tile_size, "min_tissue": min_tissue}
    for key, value in (("mpp", mpp), ("magnification", magnification), ("slide_mpp", slide_mpp),
                       ("slide_magnification", slide_magnification)):
        if value is not None:
            raw[key] = value
    try:
        return TilingSpec(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "tiling"
        raise HistomilError(f"invalid tiling option {where}: {err.get('msg', exc)}") from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HistomilError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def model_encoder(model: Path, weights: Path | None, precision: str, device: str = "cpu") -> object | None:
    """The checkpoint's encoder built with ``--weights`` (None without: predict_slides builds it itself)."""
    if weights is None:
        return None
    from histomil.features.encoders import build_encoder
    from histomil.training.checkpoint import load_checkpoint

    name = (load_checkpoint(model)[1].get("encoder_info") or {}).get("name")
    if not name:
        raise HistomilError(f"{model}: the model does not record its encoder, so --weights has nothing to apply to")
    return build_encoder(str(name), precision=precision, channels_last=True, weights=weights, device=device)


def _check_batching(batch_size: int, workers: int) -> None:
    check_range("--batch-size", batch_size, 1)
    check_range("--workers", workers, 0)


# ---------------------------------------------------------------------------------- commands


@user_errors
def tile_cmd(
    slides: SlidesArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder: <slide>.h5 coordinates, mask and tile previews.")],
    tile_size: TileSizeOpt = 224,
    mpp: MppOpt = None,
    magnification: MagOpt = None,
    slide_mpp: SlideMppOpt = None,
    slide_magnification: SlideMagOpt = None,
    min_tissue: MinTissueOpt = 0.5,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write the tiles as JPEG files, one folder per slide.")] = False,
    on_bad_slide: OnBadSlideOpt = "error",
) -> None:
    """Find the tissue and cut each slide into tiles at a fixed resolution (coordinates, previews, optional JPEGs)."""
    from histomil.slides.features import find_slides
    from histomil.slides.tiling import tile_slides

    _check_choice("--on-bad-slide", on_bad_slide, ("error", "skip"))
    spec = tiling_spec(tile_size, mpp, magnification, slide_mpp, slide_magnification, min_tissue)
    paths = find_slides(slides)
    with progress_bars() as progress:
        summary = tile_slides(paths, out, spec, save_images=save_images, on_bad_slide=on_bad_slide,  # type: ignore[arg-type]
                              log=log, progress=progress)
    show_result(f"{len(summary.written)} slides tiled ({sum(summary.n_tiles.values())} tiles), "
                f"{len(summary.skipped)} skipped; written to {out}")


@user_errors
def slide_features_cmd(
    slides: SlidesArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder: one <slide>.h5 feature file per slide.")],
    encoder: Annotated[str, typer.Option("--encoder", help="Tile encoder: efficientnet_lite0, a preset (uni_v2, virchow2, ...) or timm:<architecture>; 'histomil encoders' lists them.")] = "efficientnet_lite0",
    weights: WeightsOpt = None,
    precision: PrecisionOpt = "auto",
    runtime: Annotated[str, typer.Option("--runtime", help="What runs the encoder: auto (OpenVINO for fp32 on the CPU when installed, else torch), torch, openvino or onnxruntime.")] = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 1,
    tile_size: TileSizeOpt = 224,
    mpp: MppOpt = None,
    magnification: MagOpt = None,
    slide_mpp: SlideMppOpt = None,
    slide_magnification: SlideMagOpt = None,
    min_tissue: MinTissueOpt = 0.5,
    coords: CoordsOpt = None,
    on_bad_slide: OnBadSlideOpt = "error",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-encode slides whose feature file is complete.")] = False,
    layout: LayoutOpt = "histomil",
    device: DeviceOpt = "auto",
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: encode only shard I of N (0-based) of the slides, "
                                              "e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; the last shard to "
                                              "finish writes the --layout export. Under torchrun each rank takes its "
                                              "share without it.")] = None,
) -> None:
    """Encode tiles straight from the slides into one HDF5 per slide (resumable); --layout also writes
    them as CLAM, TRIDENT or STAMP write theirs (the histomil files then go to OUT/histomil).

    Under ``torchrun --nproc-per-node N -m histomil features slides ...`` (or with ``--shard I/N``)
    each process encodes its share of the slides into the same OUT."""
    from histomil.features import shards
    from histomil.features.encoders import build_encoder
    from histomil.features.export import EXPORT_LAYOUTS, export_features
    from histomil.features.runtimes import RUNTIMES, with_runtime
    from histomil.slides.features import extract_slide_features, find_slides
    from histomil.training.distributed import rank_device, world

    _check_choice("--precision", precision, PRECISIONS)
    _check_choice("--runtime", runtime, RUNTIMES)
    _check_choice("--on-bad-slide", on_bad_slide, ("error", "skip"))
    _check_choice("--layout", layout, ("histomil", *EXPORT_LAYOUTS))
    dev = rank_device(resolve_device(device))  # cuda:LOCAL_RANK under torchrun
    here = world()
    part = shards.choose_shard(shard, here.rank, here.world_size)
    _check_batching(batch_size, workers)
    spec = tiling_spec(tile_size, mpp, magnification, slide_mpp, slide_magnification, min_tissue)
    enc = with_runtime(build_encoder(encoder, precision=precision, channels_last=True, weights=weights, device=dev), runtime)
    paths = find_slides(slides)
    mine = part.take(paths, key=lambda p: p.name) if part is not None else paths
    own = out if layout == "histomil" else out / "histomil"
    if part is not None:
        shards.begin(own, part)
    with progress_bars() as progress:
        s = extract_slide_features(mine, own, enc, spec, coords_dir=coords, batch_size=batch_size,
                                   num_workers=workers, on_bad_slide=on_bad_slide,  # type: ignore[arg-type]
                                   overwrite=overwrite, log=log, progress=progress) if mine else None

    def export(stems: list[str]) -> None:
        if layout != "histomil" and stems:
            export_features([own / f"{stem}.h5" for stem in stems], out, layout, log=log)

    done = sorted(s.files) if s is not None else []
    if part is None:
        export(done)
        shards.forget_shards(own)
    else:
        shards.finish(own, part, done)
        shards.merge_when_complete(own, export)
    if s is None:
        show_result(f"shard {part.label}: no slides to encode")  # more shards than slides
        return
    n = sum(s.n_tiles.values())
    rate = f", {n / s.seconds:.0f} tiles/s" if s.written and s.seconds > 0 else ""
    who = f"shard {part.label}: " if part is not None else ""
    show_result(f"{who}{len(s.written)} slides encoded ({n} tiles{rate}), {len(s.existing)} already done, "
                f"{len(s.skipped)} skipped; written to {out}")


@user_errors
def heatmap_cmd(
    model: Annotated[Path, typer.Argument(help="A model checkpoint (model.pt).")],
    slide: Annotated[Path, typer.Argument(help="One slide file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: heatmap PNG, tiles GeoJSON, features, predictions.csv.")],
    scale: ScaleOpt = "rank",
    tile_size: TileSizeOpt = 224,
    mpp: MppOpt = None,
    magnification: MagOpt = None,
    slide_mpp: SlideMppOpt = None,
    slide_magnification: SlideMagOpt = None,
    min_tissue: MinTissueOpt = 0.5,
    coords: CoordsOpt = None,
    features: FeaturesOpt = None,
    tile_size_level0: TileSizeLevel0Opt = None,
    allow_encoder_mismatch: AllowMismatchOpt = False,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 1,
    precision: PrecisionOpt = "auto",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    by_class: Annotated[bool, typer.Option("--by-class", help="Classification models: also one heatmap per class (CLAM-MB's class branches; attention x class score otherwise).")] = False,
) -> None:
    """Draw the model's attention over one slide (PNG) and export the tiles for QuPath (GeoJSON).

    With --features the slide is not encoded: the features (any layout histomil reads) are predicted
    and drawn where the tiler cut them.
    """
    from histomil.slides.heatmap import SCALES
    from histomil.slides.predict_slides import predict_slides

    _check_choice("--scale", scale, SCALES)
    _check_choice("--precision", precision, PRECISIONS)
    resolve_device(device)
    if slide.is_dir():
        raise HistomilError(f"{slide}: is a folder; heatmap takes one slide file (use 'histomil predict' for a folder)")
    _check_batching(batch_size, workers)
    spec = tiling_spec(tile_size, mpp, magnification, slide_mpp, slide_magnification, min_tissue)
    with progress_bars() as progress:
        rows = predict_slides(model, [slide], out, spec, coords_dir=coords, features=features,
                              encoder=model_encoder(model, weights, precision, device),
                              tile_size_level0=tile_size_level0, allow_encoder_mismatch=allow_encoder_mismatch,
                              scale=scale,  # type: ignore[arg-type]
                              precision=precision, batch_size=batch_size, num_workers=workers, log=log,
                              progress=progress, device=device, class_heatmaps=by_class)
    row = rows[0]
    if "prediction" in row:  # regression / survival
        show_result(f"{slide.name}: prediction {row['prediction']}; heatmap {out / row['heatmap']}, QuPath objects {out / row['geojson']}")
        return
    show_result(f"{slide.name}: p = {row['prob_positive']}, class {row['predicted_class']}; "
                f"heatmap {out / row['heatmap']}, QuPath objects {out / row['geojson']}")


@user_errors
def predict_slides_cmd(
    model: Annotated[Path, typer.Argument(help="A model checkpoint (model.pt).")],
    slides: SlidesArg,
    out: Annotated[
        Path,
        typer.Option("--out", help="Output folder (predictions.csv, heatmaps/, features/); a path ending in .csv "
                                   "names the CSV and puts the rest in a folder of the same name beside it."),
    ],
    top_k: Annotated[int, typer.Option("--top-k", help="How many highest-attention tiles to list per slide.")] = 5,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Decision threshold (default: the model's).")] = None,
    scale: ScaleOpt = "rank",
    heatmaps: Annotated[bool, typer.Option("--heatmaps/--no-heatmaps", help="Draw a heatmap and GeoJSON per slide.")] = True,
    tile_size: TileSizeOpt = 224,
    mpp: MppOpt = None,
    magnification: MagOpt = None,
    slide_mpp: SlideMppOpt = None,
    slide_magnification: SlideMagOpt = None,
    min_tissue: MinTissueOpt = 0.5,
    coords: CoordsOpt = None,
    features: FeaturesOpt = None,
    tile_size_level0: TileSizeLevel0Opt = None,
    allow_encoder_mismatch: AllowMismatchOpt = False,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 1,
    on_bad_slide: OnBadSlideOpt = "error",
    precision: PrecisionOpt = "auto",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Predict unlabelled slides: tile, encode with the model's encoder (or read --features), predict; CSV plus heatmaps."""
    from histomil.slides.heatmap import SCALES
    from histomil.slides.predict_slides import predict_slides

    _check_choice("--scale", scale, SCALES)
    _check_choice("--on-bad-slide", on_bad_slide, ("error", "skip"))
    _check_choice("--precision", precision, PRECISIONS)
    resolve_device(device)
    _check_batching(batch_size, workers)
    check_range("--threshold", threshold, 0, 1)
    check_range("--top-k", top_k, 0)
    spec = tiling_spec(tile_size, mpp, magnification, slide_mpp, slide_magnification, min_tissue)
    out = Path(out)
    csv_path = None
    if out.suffix.lower() == ".csv":
        csv_path, out = out, out.with_suffix("")
    with progress_bars() as progress:
        rows = predict_slides(model, slides, out, spec, csv_path=csv_path, coords_dir=coords, features=features,
                              encoder=model_encoder(model, weights, precision, device),
                              tile_size_level0=tile_size_level0, allow_encoder_mismatch=allow_encoder_mismatch,
                              top_k=top_k,
                              threshold=threshold, scale=scale, heatmaps=heatmaps,  # type: ignore[arg-type]
                              precision=precision, batch_size=batch_size, num_workers=workers, on_bad_slide=on_bad_slide,  # type: ignore[arg-type]
                              log=log, progress=progress, device=device)
    done = [r for r in rows if r["predicted_class"] != ""]
    n_pos = sum(int(r["predicted_class"]) == 1 for r in done)
    show_result(f"{len(done)} slides predicted ({n_pos} positive), {len(rows) - len(done)} skipped; "
                f"written to {csv_path or out / 'predictions.csv'}")


@user_errors
def export_features_cmd(
    sources: Annotated[list[Path], typer.Argument(help="Slide feature files of 'histomil features slides', or folders of them.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder, laid out as the tool writes its own.")],
    layout: Annotated[str, typer.Option("--layout", help="clam, trident or stamp.")],
    slide_mpp: Annotated[float | None, typer.Option("--slide-mpp", help="Level-0 um/px, for files of slides whose header had none (STAMP needs it).")] = None,
    slide_magnification: Annotated[float | None, typer.Option("--slide-magnification", help="Objective power, for files of slides whose header had none (TRIDENT needs it).")] = None,
) -> None:
    """Write histomil slide feature files as CLAM, TRIDENT or STAMP write theirs, with their meaning of every attribute."""
    from histomil.features.export import EXPORT_LAYOUTS, export_features

    _check_choice("--layout", layout, EXPORT_LAYOUTS)
    written = export_features(sources, out, layout, slide_mpp=slide_mpp, slide_magnification=slide_magnification, log=log)
    show_result(f"{len(written)} {layout} files written to {out}")
