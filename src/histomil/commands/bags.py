"""``histomil bags make`` and ``histomil bags check``: compose a MIL study from a tile table, check bag folders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from histomil.config import validate
from histomil.errors import HistomilError
from histomil.ui import log, progress_bars, show_result, user_errors


def witness_range(text: str) -> tuple[int, int]:
    """A witness option ('W' or 'LO-HI') as a (low, high) range."""
    from histomil.data.study_spec import parse_witnesses

    return parse_witnesses(text)


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
    from histomil.data.compose import compose_study, format_counts
    from histomil.data.study_spec import StudySpec
    from histomil.data.tile_table import read_tile_table

    try:
        witness_ranges = dict(train_witnesses=witness_range(train_witnesses), val_witnesses=witness_range(val_witnesses))
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


@user_errors
def bags_check(
    root: Path = typer.Argument(..., help="Bag root folder (one sub-folder per bag) or manifest CSV."),
    labels: Optional[Path] = typer.Option(None, help="Labels CSV (case,y_true); default root/labels.csv or root/df.csv."),
    unlabelled: bool = typer.Option(False, help="Bags have no labels (prediction input)."),
    on_bad_tile: str = typer.Option("error", help="'error' stops at the first bad tile; 'skip' logs and skips it."),
) -> None:
    """Decode every tile of a bag dataset and report problems."""
    from histomil.data.bags import check_bags, load_bags

    bags = load_bags(root, labels, require_labels=not unlabelled, on_bad_tile=on_bad_tile, log=log)
    with progress_bars() as progress:
        good = check_bags(bags, on_bad_tile=on_bad_tile, log=log, progress=lambda d, t: progress("checking tiles", d, t))
    n_tiles = sum(len(b.tile_paths) for b in good)
    labels_seen = [b.label for b in good if b.label is not None]
    show_result(f"{len(good)} bags, {n_tiles} readable tiles, {sum(labels_seen)} positive / "
                f"{len(labels_seen) - sum(labels_seen)} negative")
