"""Throughput on CPU: feature extraction in tiles/s, MIL training and inference in bags/s.

Three parts, all in this process, with ``--threads`` intra-op torch threads (recorded):

1. **Feature extraction** on ``--tiles`` real EBHI JPEG tiles (224 x 224, distinct contents, a
   seeded random pick from ``--data``/tiles.csv), measured in the same run so the table shows how
   close the pipeline comes to its slower stage:

   * ``decode``: :func:`histomil.data.images.read_rgb` over the files, in the main process;
   * ``encode``: the shipped EfficientNet-Lite0 (:func:`build_encoder`, channels_last as the CLI
     builds it) encoding the already decoded tiles, in memory, with :meth:`TileEncoder.encode`
     at ``--batch-size``, per precision (bf16, fp32);
   * ``pipeline``: :func:`histomil.features.extract.extract_bags`, what ``histomil features
     extract`` calls, from files to feature files: hash every tile, decode in ``--workers``
     background thread(s) while the main thread encodes, write the cache shards and one HDF5 file
     per bag of 40 tiles, into a fresh folder (empty cache) each pass. Building the encoder and
     listing the bags (one-off setup) are not timed.

   Also ``hash``: :func:`tile_digests` alone, the serial first step of the pipeline. One warm-up
   pass first (which also puts the files in the OS page cache, so no pass reads from disk), then
   the median of ``--repeats`` passes. ``pipeline / slower stage`` = pipeline tiles/s divided by
   min(decode, encode) tiles/s. A second table gives the CPU seconds (user + system, this process
   and its workers) per 1,000 tiles of each stage: steadier than wall time on a shared machine, and
   the system share shows time lost to page faults (memory freshly mapped for each batch).

2. **MIL heads on cached features**: bags of 40 instances x 1280 (the EfficientNet-Lite0 width,
   random values), every registry model, batches of 1 and 16 bags. ``infer`` is
   :func:`histomil.training.trainer.predict` (eval, no grad, the trainer's padding + masks);
   ``train`` is the trainer's own epoch loop (``trainer.train_epoch``: collate with masks,
   forward, :func:`bag_loss`, backward, Adam step) over ``--feature-bags`` bags. One warm-up pass,
   then passes until ``--min-seconds`` have elapsed (at least 3, at most 50); the median pass.

3. **End to end from pixels**: bags of 40 EBHI tiles through :func:`build_pixel_model`:
   EfficientNet-Lite0 at 224 px (finetune none and all) and the original CNN at 256 px (tiles
   resized, finetune all, its concatenation head), per precision, with the pixel trainer's other
   defaults (gated_abmil head, tile_chunk 8, channels_last, augment_p 0.2, 1 worker). ``infer`` is
   :func:`predict_pixels`, ``train`` the pixel trainer's epoch loop (``pixels.train_epoch``:
   decode + augment in a DataLoader worker, forward, loss, backward, Adam with the trainer's
   head/encoder learning-rate groups), one bag per step, both from the files. One pass over
   ``--pixel-bags`` + 1 bags: the first bag is the warm-up and the rate is over the remaining
   ``--pixel-bags`` (from the progress callback that follows each bag). Inference does not depend
   on ``finetune`` (the encoder runs without gradients), so it is measured once per backbone and
   precision. ``load s/bag`` is reading, augmenting and preprocessing one bag in one process
   (what the worker does per bag, overlapped with the step).

    python benchmarks/throughput.py --out benchmarks/results/ --threads 2
    python benchmarks/throughput.py --out /tmp/t --quick --threads 1      # smoke test, seconds

Writes ``throughput.json`` (every pass time, settings, machine, load average before and after) and
``throughput.md`` (tables) to ``--out``, rewritten after each part.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pick_tiles, write_json, write_text

from histomil.hardware import resolve_precision

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ebhi"
BAG_SIZE = 40
DIM = 1280  # EfficientNet-Lite0 feature width
PARTS = ("extract", "features", "pixels")
QUICK_MODELS = ["abmil", "transmil"]


# --- helpers -------------------------------------------------------------------------------------


def timed_passes(fn: Callable[[], Any], min_repeats: int, min_seconds: float = 0.0, max_repeats: int = 50) -> list[float]:
    """Seconds of each call of ``fn``: at least ``min_repeats`` calls, more until ``min_seconds`` in all."""
    times: list[float] = []
    while len(times) < min_repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds so far of this process plus its finished children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def with_cpu(fn: Callable[..., list[float]], *args: Any) -> tuple[list[float], dict[str, float]]:
    """Run ``fn(*args)`` (which returns pass times); also the mean user and system CPU seconds per pass.

    CPU time does not count the time spent waiting for a core, so it is steadier than wall time on a
    busy machine; system time is mostly the kernel zeroing freshly mapped memory (page faults).
    """
    u0, s0 = cpu_seconds()
    times = fn(*args)
    u1, s1 = cpu_seconds()
    return times, {"user": (u1 - u0) / len(times), "sys": (s1 - s0) / len(times)}


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def fmt(x: float | None) -> str:
    """Three significant digits, thousands separated; '—' for missing."""
    if x is None or not math.isfinite(x):
        return "—"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def with_seconds(bags_per_s: float | None) -> str:
    """'0.25 (4 s)': a rate with the seconds per bag."""
    if not bags_per_s or not math.isfinite(bags_per_s):
        return "—"
    return f"{fmt(bags_per_s)} ({fmt(1 / bags_per_s)} s)"


def as_bags(paths: list[Path], size: int, prefix: str = "bag", labelled: bool = True) -> list:
    """Consecutive bags of ``size`` tiles (the last may be smaller), labels alternating 0/1."""
    from histomil.data.bags import Bag

    return [Bag(f"{prefix}{i // size:04d}", tuple(paths[i : i + size]), (i // size) % 2 if labelled else None)
            for i in range(0, len(paths), size)]


# --- 1. feature extraction -----------------------------------------------------------------------


def extract_once(bags: list, encoder: Any, batch_size: int, workers: int) -> float:
    """Seconds of one ``extract_bags`` run (what the CLI calls) into a fresh folder with an empty cache."""
    from histomil.features.cache import FeatureCache
    from histomil.features.extract import extract_bags

    tmp = Path(tempfile.mkdtemp(prefix="histomil-throughput-"))
    try:
        cache = FeatureCache.for_encoder(tmp / "cache", encoder)
        t0 = time.perf_counter()
        summary = extract_bags(bags, tmp / "features", encoder, cache, batch_size, workers)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_tiles = sum(len(b) for b in bags)
    if summary.n_encoded != n_tiles or summary.n_written != len(bags):
        raise RuntimeError(f"pipeline encoded {summary.n_encoded} of {n_tiles} tiles, wrote {summary.n_written} bags")
    return seconds


def bench_extract(a: argparse.Namespace, tiles: list[Path], log: Callable[[str], None]) -> dict[str, Any]:
    from histomil.data.images import read_rgb
    from histomil.features.encoders import build_encoder
    from histomil.features.extract import tile_digests

    n = len(tiles)
    decoded: list[np.ndarray] = []

    def decode() -> None:
        decoded[:] = [read_rgb(p) for p in tiles]

    decode()  # warm-up: also puts every file in the page cache
    shapes = sorted({t.shape for t in decoded})
    decode_times, decode_cpu = with_cpu(timed_passes, decode, a.repeats)
    log(f"decode: {rate(n, statistics.median(decode_times)):.0f} tiles/s")
    hash_times = timed_passes(partial(tile_digests, tiles), a.repeats)
    log(f"hash: {rate(n, statistics.median(hash_times)):.0f} tiles/s")
    pixels = np.stack(decoded)
    bags = as_bags(tiles, BAG_SIZE, labelled=False)
    warm_bags = as_bags(tiles[: min(n, a.batch_size)], BAG_SIZE, prefix="warm", labelled=False)

    rows = []
    for precision in a.precisions:
        enc = build_encoder("efficientnet_lite0", precision=precision, channels_last=True)
        enc.encode(pixels[: a.batch_size], batch_size=a.batch_size)  # warm-up
        encode_times, encode_cpu = with_cpu(timed_passes, partial(enc.encode, pixels, batch_size=a.batch_size), a.repeats)
        log(f"encode {precision}: {rate(n, statistics.median(encode_times)):.1f} tiles/s")

        extract_once(warm_bags, enc, a.batch_size, a.workers)  # warm-up (worker start, HDF5, allocator)
        pipeline_times, pipeline_cpu = with_cpu(lambda: [extract_once(bags, enc, a.batch_size, a.workers)  # noqa: B023
                                                         for _ in range(a.repeats)])
        dec, encd, pipe = (rate(n, statistics.median(t)) for t in (decode_times, encode_times, pipeline_times))
        slower = "decode" if dec < encd else "encode"
        rows.append({
            "precision": precision,
            "decode_tiles_per_s": dec,
            "encode_tiles_per_s": encd,
            "pipeline_tiles_per_s": pipe,
            "hash_tiles_per_s": rate(n, statistics.median(hash_times)),
            "slower_stage": slower,
            "pipeline_over_slower_stage": pipe / min(dec, encd),
            "decode_seconds": decode_times,
            "encode_seconds": encode_times,
            "pipeline_seconds": pipeline_times,
            "hash_seconds": hash_times,
            "cpu_seconds_per_pass": {"decode": decode_cpu, "encode": encode_cpu, "pipeline": pipeline_cpu},
        })
        log(f"pipeline {precision}: {pipe:.1f} tiles/s = {pipe / min(dec, encd):.2f} of {slower}")
    return {"n_tiles": n, "tile_shapes": [list(s) for s in shapes], "n_bags": len(bags), "rows": rows}


# --- 2. MIL heads on cached features -------------------------------------------------------------


def bench_features(a: argparse.Namespace, models: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    from histomil.models.registry import build_model
    from histomil.training import trainer
    from histomil.training.tasks import build_task
    from histomil.training.trainer import TrainConfig, predict

    g = torch.Generator().manual_seed(a.seed)
    n = a.feature_bags
    feats = [torch.randn(BAG_SIZE, DIM, generator=g) for _ in range(n)]
    y = torch.tensor([i % 2 for i in range(n)])
    device = torch.device("cpu")
    rows = []
    for name in models:
        torch.manual_seed(a.seed)
        model = build_model(name, DIM, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)  # as trainer.train
        for bs in a.batch_sizes:
            config = TrainConfig(model=name, batch_size=bs)
            task = build_task(config)  # classification, as trainer.train fits it
            task.fit(y.numpy(), y.numpy())
            rng = np.random.default_rng(a.seed)
            calls = {
                "infer": partial(predict, model, feats, batch_size=bs),
                "train": partial(trainer.train_epoch, model, optimizer, feats, y.numpy(), config, rng, task, device),
            }
            for mode, fn in calls.items():
                fn()  # warm-up pass
                times = timed_passes(fn, 1 if a.quick else 3, a.min_seconds)
                bps = rate(n, statistics.median(times))
                rows.append({"model": name, "batch_size": bs, "mode": mode, "bags_per_s": bps,
                             "bags_per_pass": n, "pass_seconds": times})
                log(f"{name} bs={bs} {mode}: {bps:.1f} bags/s ({len(times)} passes)")
    return rows


# --- 3. end to end from pixels -------------------------------------------------------------------


def pixel_configs(a: argparse.Namespace) -> list[dict[str, Any]]:
    """EfficientNet-Lite0 at 224 px with each ``--pixel-heads`` head and ``--finetune`` mode, and the original
    CNN at 256 px (its own concatenation head), at each precision."""
    out = []
    for precision in a.precisions:
        for head in a.pixel_heads:
            for finetune in a.finetune:
                out.append({"backbone": "efficientnet_lite0", "tile_px": 224, "head": head, "finetune": finetune,
                            "precision": precision})
        out.append({"backbone": "original", "tile_px": 256, "head": None, "finetune": "all", "precision": precision})
    return out


class Stamps(list):
    """A progress callback that records when each bag finished (``perf_counter``), after a start stamp."""

    def __init__(self) -> None:
        super().__init__([time.perf_counter()])

    def __call__(self, _stage: str, _done: int, _total: int) -> None:
        self.append(time.perf_counter())


def load_bag(paths: tuple[Path, ...], prep: Any, augment_p: float, seed: int) -> Any:
    """What a pixel DataLoader worker does per training bag: read, augment, preprocess."""
    from histomil.data.augment import augment_tile
    from histomil.data.images import read_rgb

    rng = np.random.default_rng(seed)
    return prep([augment_tile(read_rgb(p), rng, augment_p) for p in paths])


def _bag_rate(stamps: list[float]) -> tuple[float, list[float]]:
    """Bags/s after the first (warm-up) bag, from the times each bag finished; and the per-bag seconds."""
    steps = list(np.diff(stamps))
    return rate(len(steps), stamps[-1] - stamps[0]), [float(s) for s in steps]


def bench_pixels(a: argparse.Namespace, paths: list[Path], log: Callable[[str], None]) -> list[dict[str, Any]]:
    from histomil.training import pixels
    from histomil.training.pixels import (
        PixelTrainConfig,
        build_pixel_model,
        predict_pixels,
    )

    bags = as_bags(paths, a.pixel_tiles, prefix="pix")
    device = torch.device("cpu")
    y = torch.tensor([int(b.label) for b in bags])
    rows = []
    infer_done: dict[tuple, dict[str, Any]] = {}
    for spec in pixel_configs(a):
        kwargs = {"bag_size": a.pixel_tiles} if spec["backbone"] == "original" else {}
        head_name = {"model": spec["head"]} if spec["head"] else {}
        config = PixelTrainConfig(backbone=spec["backbone"], finetune=spec["finetune"], precision=spec["precision"],
                                  input_size=spec["tile_px"], model_kwargs=kwargs, num_workers=1,
                                  seed=a.seed, **head_name).resolved()
        torch.manual_seed(a.seed)
        model = build_pixel_model(config, 2, spec["tile_px"])
        row: dict[str, Any] = {**spec, "head": config.model, "tiles_per_bag": a.pixel_tiles,
                               "tile_chunk": config.tile_chunk, "channels_last": config.channels_last,
                               "augment_p": config.augment_p,
                               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

        key = (spec["backbone"], spec["tile_px"], spec["precision"], config.model)
        if key not in infer_done:
            stamps = Stamps()
            predict_pixels(model, bags, num_workers=1, progress=stamps)
            bps, steps = _bag_rate(stamps[1:])
            load = timed_passes(partial(load_bag, bags[0].tile_paths, model.prep, config.augment_p, a.seed), 3)
            infer_done[key] = {"infer_bags_per_s": bps, "infer_step_seconds": steps,
                               "infer_first_bag_seconds": stamps[1] - stamps[0],
                               "load_seconds_per_bag": statistics.median(load)}
            log(f"pixels {spec['backbone']} {spec['tile_px']}px {spec['precision']} infer: {bps:.3g} bags/s")
        row.update(infer_done[key])

        optimizer = pixels.pixel_optimizer(model, config)  # what train_pixels uses
        stamps = Stamps()
        # the trainer shuffles the bags; the first one to finish is the warm-up whichever it is
        pixels.train_epoch(model, optimizer, bags, y, config, np.random.default_rng(a.seed), device, stamps)
        bps, steps = _bag_rate(stamps[1:])
        row.update({"train_bags_per_s": bps, "train_step_seconds": steps, "train_first_bag_seconds": stamps[1] - stamps[0]})
        log(f"pixels {spec['backbone']} {spec['tile_px']}px finetune={spec['finetune']} {spec['precision']} "
            f"train: {bps:.3g} bags/s")
        rows.append(row)
    return rows


# --- output --------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    out = [(f"# Throughput ({s['threads']} torch thread(s); load average before "
            f"{result['machine']['loadavg_1_5_15']}, after {result.get('loadavg_after', '—')})\n")]
    ex = result.get("extract")
    if ex:
        out.append(f"## Feature extraction, tiles/s\n\n{ex['n_tiles']} EBHI JPEG tiles "
                   f"({' / '.join('x'.join(map(str, t[:2])) for t in ex['tile_shapes'])} px), EfficientNet-Lite0 "
                   f"(channels_last), batch {s['batch_size']}, {s['workers']} decode thread(s), pipeline into "
                   f"{ex['n_bags']} bag(s) of up to {BAG_SIZE}; median of {s['repeats']} passes after a warm-up.\n")
        out.append("| precision | decode | encode | full pipeline | pipeline / slower stage | hash (pipeline step 1) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in ex["rows"]:
            out.append(f"| {r['precision']} | {fmt(r['decode_tiles_per_s'])} | {fmt(r['encode_tiles_per_s'])} | "
                       f"{fmt(r['pipeline_tiles_per_s'])} | {r['pipeline_over_slower_stage']:.2f} of {r['slower_stage']} | "
                       f"{fmt(r['hash_tiles_per_s'])} |")
        out.append("\ndecode: `read_rgb` in one process. encode: `TileEncoder.encode` on decoded tiles in memory. "
                   "full pipeline: `extract_bags` (what `histomil features extract` runs), files to feature files, "
                   "empty cache. hash: `tile_digests` alone.\n")
        out.append("CPU seconds per 1,000 tiles, user + system (system share), this process and its decode "
                   "worker(s) if any: steadier than wall time when other jobs share the cores.\n")
        out.append("| precision | decode | encode | full pipeline |")
        out.append("|---|---:|---:|---:|")
        for r in ex["rows"]:
            cells = []
            for stage in ("decode", "encode", "pipeline"):
                c = r["cpu_seconds_per_pass"][stage]
                total = c["user"] + c["sys"]
                cells.append(f"{fmt(1000 * total / ex['n_tiles'])} ({100 * c['sys'] / total:.0f}% sys)" if total > 0 else "—")
            out.append(f"| {r['precision']} | " + " | ".join(cells) + " |")
        out.append("")
    feats = result.get("features")
    if feats:
        bss = s["batch_sizes"]
        out.append(f"## MIL heads on cached features, bags/s\n\nBags of {BAG_SIZE} x {DIM}; {s['feature_bags']} bags a "
                   f"pass, median pass after a warm-up (passes until {s['min_seconds']:g} s). infer: `predict` "
                   "(eval, no grad); train: the trainer's epoch loop (forward, bag loss, backward, Adam step).\n")
        cols = [(mode, bs) for mode in ("infer", "train") for bs in bss]
        out.append("| model | " + " | ".join(f"{m} (batch {bs})" for m, bs in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for name in dict.fromkeys(r["model"] for r in feats):
            cells = []
            for mode, bs in cols:
                r = next((r for r in feats if r["model"] == name and r["mode"] == mode and r["batch_size"] == bs), None)
                cells.append(fmt(r["bags_per_s"]) if r else "—")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    pix = result.get("pixels")
    if pix:
        out.append(f"## End to end from pixels, bags/s\n\nBags of {s['pixel_tiles']} EBHI tiles read from files, one "
                   f"bag per step; rate over {s['pixel_bags']} bag(s) after a warm-up bag (seconds per bag in "
                   "brackets). Inference does not depend on finetune (measured once per backbone, head and precision). "
                   "load: read + augment + preprocess one bag in one process (done in a worker, overlapped).\n")
        out.append("| backbone | tile px | head | finetune | precision | infer | train | load s/bag |")
        out.append("|---|---:|---|---|---|---:|---:|---:|")
        for r in pix:
            out.append(f"| {r['backbone']} | {r['tile_px']} | {r['head']} | {r['finetune']} | {r['precision']} | "
                       f"{with_seconds(r['infer_bags_per_s'])} | {with_seconds(r['train_bags_per_s'])} | {fmt(r['load_seconds_per_bag'])} |")
        out.append("")
    return "\n".join(out) + "\n"


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    write_json(out / "throughput.json", result)
    write_text(out / "throughput.md", markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="EBHI folder with tiles.csv (default ../shared/data/ebhi)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 16 tiles, 2 models, 1 pixel bag of 4 tiles, bf16 only; numbers meaningless")
    p.add_argument("--tiles", type=int, default=None, help="tiles for feature extraction (default 512; quick 16)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch (default 64, the CLI default; quick 8)")
    p.add_argument("--workers", type=int, default=1, help="pipeline decode threads (the CLI default)")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=None,
                   help="encoder precisions, extraction and pixels (default bf16 fp32; quick: what precision auto picks here)")
    p.add_argument("--repeats", type=int, default=None, help="extraction passes, median (default 3; quick 1)")
    p.add_argument("--models", nargs="+", default=None, help="default: every registry model (quick: abmil transmil)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--feature-bags", type=int, default=None, help="bags per pass on cached features (default 64; quick 16)")
    p.add_argument("--min-seconds", type=float, default=None, help="time per cached-feature measurement (default 1; quick 0)")
    p.add_argument("--pixel-heads", nargs="+", default=["gated_abmil"],
                   help="MIL heads on the EfficientNet-Lite0 pixel model (default gated_abmil, the trainer's)")
    p.add_argument("--finetune", nargs="+", choices=["none", "last_blocks", "all"], default=["none", "all"],
                   help="EfficientNet-Lite0 finetune modes from pixels")
    p.add_argument("--pixel-bags", type=int, default=None, help="timed pixel bags per config, after one warm-up bag (default 3; quick 1)")
    p.add_argument("--pixel-tiles", type=int, default=None, help="tiles per pixel bag (default 40; quick 4)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    a.tiles = a.tiles or (16 if q else 512)
    a.repeats = a.repeats or (1 if q else 3)
    a.feature_bags = a.feature_bags or (16 if q else 64)
    a.min_seconds = a.min_seconds if a.min_seconds is not None else (0.0 if q else 1.0)
    a.pixel_bags = a.pixel_bags or (1 if q else 3)
    a.pixel_tiles = a.pixel_tiles or (4 if q else BAG_SIZE)
    # quick (the smoke test): only what this machine runs fast; bf16 is emulated, 12-19x slower, without
    # AVX512-BF16 / AMX (histomil.hardware)
    a.precisions = a.precisions or ([resolve_precision("auto")] if q else ["bf16", "fp32"])
    if q and a.batch_size == 64:
        a.batch_size = 8
    for name in ("tiles", "batch_size", "workers", "repeats", "feature_bags", "pixel_bags", "pixel_tiles", "threads"):
        if getattr(a, name) < (0 if name == "workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'workers' else 1}")
    if min(a.batch_sizes) < 1:
        p.error("--batch-sizes must be at least 1")

    from histomil.errors import HistomilError
    from histomil.models.registry import model_names

    models = a.models or (QUICK_MODELS if q else model_names())
    unknown = sorted(set(models) - set(model_names()))
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(model_names())}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "out"}
    settings.update({"models": models, "bag_size": BAG_SIZE, "feature_dim": DIM,
                     "interop_threads": torch.get_num_interop_threads(),
                     # allocator and threading settings change these numbers a lot (e.g. MALLOC_MMAP_THRESHOLD_)
                     "env": {k: v for k, v in os.environ.items()
                             if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_", "HISTOMIL_")) or k == "LD_PRELOAD"}})
    result: dict[str, Any] = {"settings": settings, "machine": machine()}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        need = max(a.tiles if "extract" in a.parts else 0, (a.pixel_bags + 1) * a.pixel_tiles if "pixels" in a.parts else 0)
        tiles = pick_tiles(a.data, need, a.seed) if need else []
        parts = {
            "extract": lambda: bench_extract(a, tiles[: a.tiles], log),
            "features": lambda: bench_features(a, models, log),
            "pixels": lambda: bench_pixels(a, tiles[: (a.pixel_bags + 1) * a.pixel_tiles], log),
        }
        for part in PARTS:
            if part in a.parts:
                result[part] = parts[part]()
                result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                result["total_seconds"] = round(time.perf_counter() - t_start, 1)
                write_outputs(a.out, result)
    except HistomilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    log(f"done; wrote {a.out / 'throughput.json'} and {a.out / 'throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
