"""The ``histomil`` command line: one command with a sub-command per pipeline step.

bags make / bags check -> features extract -> train -> evaluate -> predict, plus ``run`` (all steps
from one config file) and ``demo`` (``run`` on the example tiles shipped with histomil).
Every user error is printed as one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from histomil.config import check_range, parse_overrides, read_mapping, validate, validate_options
from histomil.errors import HistomilError
from histomil.hardware import PRECISIONS
from histomil.ui import log as _log
from histomil.ui import progress_bars, show_result, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multiple instance learning for histology.")
bags_app = typer.Typer(no_args_is_help=True, help="Compose and check bag datasets.")
features_app = typer.Typer(no_args_is_help=True, help="Extract tile features into per-bag HDF5 files.")
app.add_typer(bags_app, name="bags")
app.add_typer(features_app, name="features")


def _print_version(value: bool) -> None:
    if value:
        from histomil import __version__

        typer.echo(f"histomil {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Multiple instance learning for histology."""


def _witnesses(text: str) -> tuple[int, int]:
    from histomil.data.compose import parse_witnesses

    return parse_witnesses(text)


@bags_app.command("make")
@user_errors
def bags_make(
    tile_table: Path = typer.Argument(..., help="CSV with one row per tile: path, instance label, patient id."),
    out: Path = typer.Argument(..., help="Study folder to create (one sub-folder per split)."),
    bag_size: int = typer.Option(40, help="Tiles per bag (K)."),
    train_bags: int = typer.Option(2000, help="Training bags."),
    val_bags: int = typer.Option(100, help="Validation bags."),
    test_bags: int = typer.Option(1000, help="Bags in each test set."),
    train_witnesses: str = typer.Option("20", help="Tumour tiles per positive training bag: 'W' or a range 'LO-HI' drawn per bag."),
    val_witnesses: str = typer.Option("20", help="Witnesses per positive validation bag: 'W' or 'LO-HI'."),
    test_witnesses: str = typer.Option("20,10,5,1", help="Comma-separated W, one test set each."),
    split_fractions: str = typer.Option("0.6,0.2,0.2", help="Fractions of patients for train,val,test."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same study."),
    link: str = typer.Option("symlink", help="How tiles enter bag folders: symlink, hardlink or copy."),
    path_col: str = typer.Option("path", help="Tile table column with the tile path (relative to the CSV)."),
    label_col: str = typer.Option("tumor", help="Column with the tile label (1 tumour, 0 non-tumour, empty = excluded)."),
    patient_col: str = typer.Option("case_id", help="Column with the patient id (splits never share a patient)."),
    split_col: Optional[str] = typer.Option(None, help="Column with a fixed split (train/val/test) per patient."),
    overwrite: bool = typer.Option(False, help="Replace an existing study folder."),
) -> None:
    """Compose a whole MIL study (train / val / test sets at several witness counts) from a tile table."""
    from histomil.data.compose import (
        StudySpec,
        compose_study,
        format_counts,
        read_tile_table,
    )

    try:
        witness_ranges = dict(train_witnesses=_witnesses(train_witnesses), val_witnesses=_witnesses(val_witnesses))
        fractions = tuple(float(f) for f in split_fractions.split(","))
        tests = [int(w) for w in test_witnesses.split(",") if w.strip()]
    except ValueError:
        raise HistomilError("--split-fractions and --test-witnesses take comma-separated numbers") from None
    spec = validate(
        StudySpec,
        dict(
            bag_size=bag_size,
            train_bags=train_bags,
            val_bags=val_bags,
            test_bags=test_bags,
            test_witnesses=tests,
            split_fractions=fractions,
            seed=seed,
            link=link,
            **witness_ranges,
        ),
        "invalid study options",
    )
    table = read_tile_table(tile_table, path_col, label_col, patient_col, split_col)
    with progress_bars() as progress:
        study = compose_study(table, spec, out, progress=lambda s, d, t: progress(f"composing {s}", d, t), overwrite=overwrite)
    show_result(format_counts(study))
    show_result(f"study written to {out}")


@bags_app.command("check")
@user_errors
def bags_check(
    root: Path = typer.Argument(..., help="Bag root folder (one sub-folder per bag) or manifest CSV."),
    labels: Optional[Path] = typer.Option(None, help="Labels CSV (case,y_true); default root/labels.csv or root/df.csv."),
    unlabelled: bool = typer.Option(False, help="Bags have no labels (prediction input)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops at the first bad tile; 'skip' logs and skips it."),
) -> None:
    """Decode every tile of a bag dataset and report problems."""
    from histomil.data.bags import check_bags, load_bags

    bags = load_bags(root, labels, require_labels=not unlabelled, on_bad_tile=on_bad_tile, log=_log)
    with progress_bars() as progress:
        good = check_bags(bags, on_bad_tile=on_bad_tile, log=_log, progress=lambda d, t: progress("checking tiles", d, t))
    n_tiles = sum(len(b.tile_paths) for b in good)
    labels_seen = [b.label for b in good if b.label is not None]
    show_result(f"{len(good)} bags, {n_tiles} readable tiles, {sum(labels_seen)} positive / "
                f"{len(labels_seen) - sum(labels_seen)} negative")


@features_app.command("extract")
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
                                                workers=workers, on_bad_tile=on_bad_tile))  # before any work
    with progress_bars() as progress:
        if (source / "study.json").is_file():
            summaries = extract_study(source, out, cfg, cache, log=_log, progress=progress)
        else:
            bags = load_bags(source, labels, require_labels=False, on_bad_tile=on_bad_tile, log=_log)
            unlabelled = sum(b.label is None for b in bags)
            if unlabelled:  # fine for predict; train and evaluate would refuse them only later
                warnings.warn(f"{source}: {unlabelled} of {len(bags)} bags have no label (not in a labels CSV); "
                              "their feature files can be predicted on, not trained or evaluated on", stacklevel=1)
            enc = with_runtime(build_encoder(encoder, precision=precision, channels_last=True, weights=weights), runtime)
            fc = FeatureCache.for_encoder(cache or out / "cache", enc)
            summaries = {source.name: extract_bags(bags, out, enc, fc, batch_size, workers, on_bad_tile, overwrite, _log, progress)}
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


def _train_config(config: Path | None, **options: object):
    """A TrainConfig from an optional YAML/JSON file, overridden by the command-line options given."""
    from histomil.training.trainer import TrainConfig

    given = {key: value for key, value in options.items() if value is not None}
    if config is None:
        return validate_options(TrainConfig, given)
    return validate(TrainConfig, {**read_mapping(config), **given}, str(config))


@app.command("train")
@user_errors
def train_cmd(
    train_features: Path = typer.Argument(..., help="Feature folder of the training bags."),
    val: Path = typer.Option(..., "--val", help="Feature folder of the validation bags."),
    out: Path = typer.Option(..., "--out", help="Run folder: model.pt, last.pt, history.csv, config."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON training config (keys of TrainConfig); options below override it."),
    model: Optional[str] = typer.Option(None, help="Model name, e.g. gated_abmil, abmil."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Bags per step."),
    monitor: Optional[str] = typer.Option(None, help="val_loss or val_auc."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs."),
    min_epochs: Optional[int] = typer.Option(None, help="Never stop before this epoch."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
) -> None:
    """Train a MIL model on cached features, with early stopping and a resumable run folder.

    Feature folders of any layout (histomil, CLAM h5_files/pt_files, TRIDENT, STAMP), labelled by a
    labels.csv (case,y_true) beside the files (or a histomil file's own label)."""
    from histomil.features.formats import load_features_folder
    from histomil.features.validate import training_encoder_info
    from histomil.training.trainer import train

    cfg = _train_config(config, model=model, epochs=epochs, lr=lr, batch_size=batch_size, monitor=monitor,
                        patience=patience, min_epochs=min_epochs, seed=seed)
    train_bags = load_features_folder(train_features, require_labels=True)
    val_bags = load_features_folder(val, require_labels=True)
    encoder_info = training_encoder_info([*train_bags, *val_bags])
    with progress_bars() as progress:
        result = train(train_bags, val_bags, cfg, out, encoder_info=encoder_info,
                       on_epoch=lambda row: progress("training epochs", int(row["epoch"]), cfg.epochs), resume=True)
    show_result(f"best epoch {result.best_epoch}: {result.best_metrics}; model saved to {out / 'model.pt'}")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    model: Path = typer.Argument(..., help="A model checkpoint (model.pt)."),
    test_sets: list[Path] = typer.Argument(..., help="One or more labelled feature folders."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, metrics.md, predictions and plots."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the one stored in the model, 0.5)."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Use features of another encoder than the model's (normally refused)."),
) -> None:
    """Evaluate one model on several test sets: metrics table (JSON + markdown) and plots.

    Test sets are feature folders of any layout (histomil, CLAM, TRIDENT, STAMP) with a labels.csv."""
    from histomil.evaluation.evaluate import evaluate_sets
    from histomil.reports.tables import metrics_markdown

    check_range("--threshold", threshold, 0, 1)
    names = [p.name for p in test_sets]
    if len(set(names)) != len(names):
        names = [str(p) for p in test_sets]
    with progress_bars() as progress:
        results = evaluate_sets(model, dict(zip(names, test_sets)), out, threshold, progress,
                                allow_encoder_mismatch=allow_encoder_mismatch)
    show_result(metrics_markdown(results))
    show_result(f"written to {out}")


@app.command("predict")
@user_errors
def predict_cmd(
    model: Path = typer.Argument(..., help="A model checkpoint (model.pt)."),
    source: Path = typer.Argument(..., help="Unlabelled bag folders (one sub-folder of tiles per bag), a manifest CSV, or feature files (a folder or one file; histomil, CLAM, TRIDENT, STAMP)."),
    out: Path = typer.Option(..., "--out", help="CSV to write."),
    top_k: int = typer.Option(5, help="How many highest-attention tiles to list per bag."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the model's)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops; 'skip' logs bad tiles and leaves them out."),
    mpp: float = typer.Option(0.5, help="Slides only: tile resolution in micrometres per pixel."),
    slide_mpp: Optional[float] = typer.Option(None, help="The scan resolution (um/px) when the slide header has none; STAMP features: turns their micrometre coordinates into level-0 pixels."),
    coords: Optional[Path] = typer.Option(None, "--coords", help="Feature pt files: the CLAM/TRIDENT patches folder with their coordinates."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Use features of another encoder than the model's (normally refused)."),
    precision: str = typer.Option("auto", help="Bags: precision of the encoder (image bags) and the MIL head: auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16."),
    weights: Optional[Path] = typer.Option(None, help="Images and slides: weights file of the model's preset or timm: encoder (default: the local Hugging Face cache)."),
) -> None:
    """Predict unlabelled bags or slides: probability, class and the tiles that drove the decision.

    A slide file or a folder of slides is tiled, encoded and predicted in one call, with a heatmap per
    slide (see also 'histomil predict-slides' for every tiling option).
    """
    from histomil.evaluation.predict import predict_source
    from histomil.slides.features import is_slide_source

    check_range("--threshold", threshold, 0, 1)
    check_range("--top-k", top_k, 0)
    if is_slide_source(source):
        from histomil.commands.slides import predict_slides_cmd

        predict_slides_cmd(model, [source], out, top_k=top_k, threshold=threshold, mpp=mpp, slide_mpp=slide_mpp,
                           on_bad_slide="skip" if on_bad_tile == "skip" else "error", weights=weights)
        return

    with progress_bars() as progress:
        rows = predict_source(model, source, out, top_k, threshold, on_bad_tile, _log, progress, precision,
                              slide_mpp=slide_mpp, coords_dir=coords, allow_encoder_mismatch=allow_encoder_mismatch,
                              weights=weights)
    n_pos = sum(r["predicted_class"] for r in rows)
    show_result(f"{len(rows)} bags predicted ({n_pos} positive); written to {out}")


@app.command("ensemble")
@user_errors
def ensemble_cmd(
    models: list[Path] = typer.Argument(..., help="Two or more model checkpoints on the same features (e.g. one recipe, several seeds)."),
    out: Path = typer.Option(..., "--out", help="The ensemble checkpoint to write (use it like any model.pt)."),
) -> None:
    """Combine trained models into one that averages their probabilities (a seed ensemble).

    One seed can land a whole test patient's bags on the wrong side of 0.5 while another does not; the
    mean of several seeds' probabilities is steadier (benchmarks/RESULTS.md, section 11).
    """
    from histomil.training.checkpoint import combine_checkpoints

    combine_checkpoints(list(models), out)
    show_result(f"ensemble of {len(models)} models written to {out}")


@app.command("compare")
@user_errors
def compare_cmd(
    features: Path = typer.Argument(..., help="A study's feature folder (with train, val and test_* sub-folders)."),
    out: Path = typer.Option(..., "--out", help="Folder for per-run results, compare.json and compare.md."),
    models: str = typer.Option("mean_pool,max_pool,abmil,gated_abmil", help="Comma-separated model names."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; every model uses the same ones."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON training config shared by all models."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Bags per step."),
    threshold: float = typer.Option(0.5, help="Decision threshold for accuracy."),
) -> None:
    """Train and evaluate several models on the same study and seeds; one table of accuracy and AUC."""
    from histomil.evaluation.compare import compare_markdown, compare_models

    check_range("--threshold", threshold, 0, 1)
    base = _train_config(config, epochs=epochs, batch_size=batch_size)
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    from histomil.models.registry import model_names

    unknown = [m for m in model_list if m not in model_names()]
    if unknown:
        raise HistomilError(f"unknown model {unknown[0]!r}; known: {', '.join(model_names())}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise HistomilError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    with progress_bars() as progress:
        summary = compare_models(features, model_list, seed_list, out, base, threshold, _log, progress)
    tests = list(next(iter(summary.values())))
    show_result(compare_markdown(summary, tests, len(seed_list)))
    show_result(f"written to {out / 'compare.md'}")


@app.command("run")
@user_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Study run config (YAML): tile table, study, features, train."),
    out: Path = typer.Option(..., "--out", help="Run folder (re-running resumes finished steps)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set study.train_bags=500."),
) -> None:
    """Compose bags, extract features, train and evaluate, timing each step."""
    from histomil.pipeline import load_config

    cfg = load_config(config, parse_overrides(set_))
    _run_and_print(cfg, out)


def _run_and_print(cfg, out: Path) -> None:
    from histomil.pipeline import run_study
    from histomil.reports.tables import metrics_markdown

    with progress_bars() as progress:
        results = run_study(cfg, out, log=_log, progress=progress)
    show_result(metrics_markdown(results))
    timings = json.loads((out / "timings.json").read_text())
    show_result("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    show_result(f"results in {out / 'evaluation'}")


@app.command("demo")
@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Run folder for the demo."),
    set_: list[str] = typer.Option([], "--set", help="Override a demo config key, e.g. --set train.epochs=5."),
) -> None:
    """Build a small study from the shipped example tiles, train gated attention MIL, print the table."""
    from histomil.pipeline import load_config
    from histomil.resources import demo_config_path

    _log("histomil demo: example H&E tiles from EBHI-Seg (CC BY 4.0, Shi et al. 2023), bags of 40, "
         "test sets with W = 20, 10, 5, 1 tumour tiles")
    cfg = load_config(demo_config_path(), parse_overrides(set_))
    _run_and_print(cfg, out)


def _register_commands() -> None:
    """Commands that live in histomil.commands (slides, end-to-end pixels, cross-validation)."""
    from histomil.commands import crossval, encoders, pixels, report, slides

    app.command("tile")(slides.tile_cmd)
    features_app.command("slides")(slides.slide_features_cmd)
    features_app.command("export")(slides.export_features_cmd)
    app.command("heatmap")(slides.heatmap_cmd)
    app.command("predict-slides")(slides.predict_slides_cmd)
    app.command("train-pixels")(pixels.train_pixels_cmd)
    app.command("crossval")(crossval.crossval_cmd)
    app.command("report")(report.report_cmd)
    app.command("encoders")(encoders.encoders_cmd)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    app()
