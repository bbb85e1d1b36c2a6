"""``histomil train``, ``histomil ensemble`` and ``histomil compare``: MIL models on cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histomil.config import check_range, read_mapping, validate, validate_options
from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.ui import log, progress_bars, show_result, user_errors


def train_config(config: Path | None, **options: object):
    """A TrainConfig from an optional YAML/JSON file, overridden by the command-line options given."""
    from histomil.training.trainer import TrainConfig

    given = {key: value for key, value in options.items() if value is not None}
    if config is None:
        return validate_options(TrainConfig, given)
    return validate(TrainConfig, {**read_mapping(config), **given}, str(config))


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
    monitor: Optional[str] = typer.Option(None, help="val_loss, or a score of the task: val_auc (classification); val_r2, val_pearson, val_spearman (regression); val_cindex (survival)."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs."),
    min_epochs: Optional[int] = typer.Option(None, help="Never stop before this epoch."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    task: Optional[str] = typer.Option(None, help="What a bag's target is: classification (labels.csv case,y_true; the default), regression (targets.csv case,target) or survival (targets.csv case,time,event)."),
    loss: Optional[str] = typer.Option(None, help="The task's loss: regression mse (default) or huber; survival cox (default) or discrete."),
    targets: Optional[Path] = typer.Option(None, help="Regression / survival: the targets CSV of both folders (default: targets.csv beside each folder's files)."),
    stream: str = typer.Option("auto", help="on: read each bag from its file when training needs it (cohorts larger than "
                               "memory); off: load every bag first; auto: stream when the float32 features would take "
                               "over a quarter of this machine's memory."),
    device: Optional[str] = typer.Option(None, help="Where the model trains: cpu (the config's default), cuda, cuda:N or auto."),
) -> None:
    """Train a MIL model on cached features, with early stopping and a resumable run folder.

    Feature folders of any layout (histomil, CLAM h5_files/pt_files, TRIDENT, STAMP), labelled by a
    labels.csv (case,y_true) beside the files (or a histomil file's own label); --task regression / survival
    read targets.csv instead. --stream applies to every task.

    Under ``torchrun --nproc-per-node N -m histomil train ...`` the N processes train one model with
    DistributedDataParallel (gloo on CPU, nccl on CUDA), each on 1/N of every epoch's bags; rank 0
    writes the run folder."""
    from histomil.data.targets import read_task_training_folder
    from histomil.features.validate import training_encoder_info
    from histomil.training.distributed import distributed_session
    from histomil.training.trainer import train

    cfg = train_config(config, model=model, epochs=epochs, lr=lr, batch_size=batch_size, monitor=monitor,
                        patience=patience, min_epochs=min_epochs, seed=seed, device=device, task=task, loss=loss)
    resolve_device(cfg.device)  # a GPU asked for and absent: refused before the features are read
    with distributed_session(resolve_device(cfg.device)) as world:  # one process unless under torchrun
        # classes from labels.csv, or regression / survival targets from targets.csv: streamed alike
        train_bags, val_bags = (read_task_training_folder(f, cfg.task, targets, stream, processes=world.world_size)
                                for f in (train_features, val))
        encoder_info = training_encoder_info([*train_bags, *val_bags])
        with progress_bars() as progress:
            result = train(train_bags, val_bags, cfg, out, encoder_info=encoder_info,
                           on_epoch=lambda row: progress("training epochs", int(row["epoch"]), cfg.epochs), resume=True)
    if world.is_main:
        show_result(f"best epoch {result.best_epoch}: {result.best_metrics}; model saved to {out / 'model.pt'}")


@user_errors
def ensemble_cmd(
    models: list[Path] = typer.Argument(..., help="Two or more model checkpoints on the same features (e.g. one recipe, several seeds)."),
    out: Path = typer.Option(..., "--out", help="The ensemble checkpoint to write (use it like any model.pt)."),
) -> None:
    """Combine trained models into one that averages their probabilities (a seed ensemble); regression
    models into one that averages their predictions in target units.

    One seed can land a whole test patient's bags on the wrong side of 0.5 while another does not; the
    mean of several seeds' probabilities is steadier (benchmarks/RESULTS.md, section 11).
    """
    from histomil.training.checkpoint import combine_checkpoints

    combine_checkpoints(list(models), out)
    show_result(f"ensemble of {len(models)} models written to {out}")


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
    base = train_config(config, epochs=epochs, batch_size=batch_size)
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
        summary = compare_models(features, model_list, seed_list, out, base, threshold, log, progress)
    tests = list(next(iter(summary.values())))
    show_result(compare_markdown(summary, tests, len(seed_list)))
    show_result(f"written to {out / 'compare.md'}")
