"""``histomil synth-cohort`` (a synthetic slide cohort with known tumour tiles) and ``histomil localise``
(how well heatmap scores find those tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histomil.config import validate_options
from histomil.ui import progress_bars, show_result, user_errors


@user_errors
def synth_cohort_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder to create: slides/, cohort.csv, truth.csv, cohort.json, README.md.")],
    tiles: Annotated[Path | None, typer.Option("--tiles", help="Tile table CSV (path, 0/1 tumour label, patient); default: the EBHI-Seg example tiles shipped with histomil.")] = None,
    patients: Annotated[int, typer.Option("--patients", help="Synthetic patients.")] = 12,
    positive_fraction: Annotated[float, typer.Option("--positive-fraction", help="Fraction of patients with tumour.")] = 0.5,
    multi_slide_fraction: Annotated[float, typer.Option("--multi-slide-fraction", help="Fraction of patients with 2..--max-slides slides.")] = 0.3,
    max_slides: Annotated[int, typer.Option("--max-slides", help="Most slides of one patient.")] = 3,
    grid_min: Annotated[int, typer.Option("--grid-min", help="Fewest tissue tiles along a slide side.")] = 4,
    grid_max: Annotated[int, typer.Option("--grid-max", help="Most tissue tiles along a slide side.")] = 6,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile side in pixels (the table's tiles must have it).")] = 224,
    mpp: Annotated[float, typer.Option("--mpp", help="Level-0 micrometres per pixel written to the slides.")] = 0.5,
    no_mpp_slides: Annotated[int, typer.Option("--no-mpp-slides", help="Slides written without resolution tags.")] = 2,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Fraction of patients per class held out as split 'test'.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same cohort.")] = 0,
    path_col: Annotated[str, typer.Option("--path-column", help="Tile table column with the tile path.")] = "path",
    label_col: Annotated[str, typer.Option("--label-column", help="Tile table column with the 0/1 tumour label (empty excludes).")] = "tumor",
    patient_col: Annotated[str, typer.Option("--patient-column", help="Tile table column with the patient id.")] = "case_id",
    attribution: Annotated[str | None, typer.Option("--attribution", help="Source attribution written with the cohort (default: EBHI-Seg, CC BY 4.0).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a synthetic cohort already in --out.")] = False,
) -> None:
    """Build pyramidal TIFF slides of real tiles with tumour at known positions, patients, labels and truth."""
    from histomil.data.synthetic_cohort import SynthCohortSpec, build_cohort
    from histomil.resources import example_tile_table

    options = dict(patients=patients, positive_fraction=positive_fraction, multi_slide_fraction=multi_slide_fraction,
                   max_slides=max_slides, grid_min=grid_min, grid_max=grid_max, tile_size=tile_size, mpp=mpp,
                   no_mpp_slides=no_mpp_slides, test_fraction=test_fraction, seed=seed)
    if attribution is not None:
        options["attribution"] = attribution
    spec = validate_options(SynthCohortSpec, options)
    with progress_bars() as progress:
        s = build_cohort(tiles or example_tile_table(), out, spec, overwrite=overwrite, progress=progress,
                         label_col=label_col, patient_col=patient_col, path_col=path_col)
    show_result(f"{s['n_patients']} patients ({s['n_positive_patients']} with tumour, {s['n_test_patients']} held out "
                f"as test), {s['n_slides']} slides ({s['n_tumour_slides']} with tumour) written to {out}")
    if spec.no_mpp_slides:
        show_result(f"{spec.no_mpp_slides} slide(s) have no resolution in their header: tile with --slide-mpp {spec.mpp}")


@user_errors
def localise_cmd(
    truth: Annotated[Path, typer.Argument(help="Truth table: slide, x, y, size, is_tumour per tile (truth.csv of synth-cohort).")],
    sources: Annotated[list[Path], typer.Argument(help="Heatmap GeoJSON files (<slide>_tiles.geojson) or folders holding them (searched recursively).")],
    out: Annotated[Path | None, typer.Option("--out", help="JSON file for the per-slide rows and the summary.")] = None,
) -> None:
    """Score heatmaps against known tumour tiles: attention AUC per slide (mean ± sd) and the top-1 hit rate."""
    from histomil.evaluation.localisation import geojson_scores, localise, read_truth
    from histomil.files import write_json

    known = read_truth(truth)
    rows, summary = localise(geojson_scores(sources), known)
    if out is not None:
        write_json(out, {"summary": summary, "slides": rows})
    if summary["auc_mean"] is None:
        show_result(f"{summary['n_slides']} slides scored; none has both tumour and other tiles, so no AUC")
        return
    sd = f" ± {summary['auc_sd']:.3f}" if summary["auc_sd"] is not None else ""
    show_result(f"{summary['n_slides']} slides, {summary['n_tumour_slides']} with tumour: attention AUC "
                f"{summary['auc_mean']:.3f}{sd} (min {summary['auc_min']:.3f}, {summary['n_auc_slides']} slides), "
                f"top-1 tile is tumour in {summary['top1_hit_rate']:.0%}" + (f"; written to {out}" if out else ""))
