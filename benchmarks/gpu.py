"""GPU throughput: tile extraction (tiles/s) per encoder, the pipeline's share of the encoder's own
speed, and MIL training / inference (bags/s), as one markdown table for RESULTS.md.

One prepared script for a machine with a CUDA GPU (``--device cuda``); it runs on the CPU too
(``--device cpu --quick``, seconds) so it is tested where no GPU is. Everything runs in this process
on ``--device``:

1. **Extraction**, per encoder of ``--encoders`` (default: EfficientNet-Lite0 with its shipped
   weights; UNI (ViT-L/16), CONCH v1.5 (ViT-L/16 at 448 px + attentional pooler) and Virchow2 (ViT-H/14)
   **with random weights**: the speed of a network
   does not depend on its weights, and this script downloads nothing). On ``--tiles`` distinct real
   EBHI JPEG tiles (224 x 224):

   * ``encoder``: :meth:`TileEncoder.encode` on the tiles already decoded in memory (host to device
     copy through pinned memory, preprocessing, forward), at ``--batch-size``;
   * ``pipeline``: :func:`histomil.features.extract.extract_bags`, what ``histomil features
     extract`` runs, files to HDF5 feature files (hashing, JPEG decoding in ``--workers`` threads
     overlapping the GPU, the tile cache, one file per bag of 40 tiles), into a fresh folder;
   * ``pipeline / encoder``: the fraction of the encoder's own speed the whole pipeline keeps.

   One warm-up pass (cuDNN autotuning, the OS page cache), then mean ± sd over ``--repeats``
   passes; the GPU is synchronised before each clock read.

2. **MIL heads** on random features (bags of ``--bag-tiles`` x ``--dim``, the width of a ViT-L
   encoder): ``train`` is one histomil training step per bag (forward, the trainer's bag loss,
   backward, Adam), ``infer`` a forward pass without gradients, per model of ``--models``.

    python benchmarks/gpu.py --device cuda --out benchmarks/results/gpu      # on a GPU machine, ~3 min
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu             # smoke test

Writes ``gpu.json`` (every pass time, settings, device) and ``gpu.md`` (the table) to ``--out``;
``--table gpu.json`` prints the table of an earlier run again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pick_tiles, training_step, write_json, write_text  # noqa: E402

from histomil.devices import device_record, resolve_device  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebhi"
FULL_ENCODERS = "efficientnet_lite0,uni_v1,conch_v15,virchow2"
QUICK_ENCODERS = "efficientnet_lite0,timm:vit_tiny_patch16_224"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def build(name: str, precision: str, device: torch.device) -> Any:
    """The encoder as the CLI builds it (channels_last, torch runtime), random weights except Lite0."""
    from histomil.features.encoders import build_encoder

    return build_encoder(name, pretrained=name == "efficientnet_lite0", precision=precision, channels_last=True,
                         device=device)


def bench_extraction(a: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from histomil.data.bags import Bag
    from histomil.data.images import read_rgb
    from histomil.features.cache import FeatureCache
    from histomil.features.extract import extract_bags
    from histomil.features.tile_encoder import fit_tile

    paths = pick_tiles(a.data, a.tiles, a.seed)
    bags = [Bag(f"bag{i // 40:04d}", tuple(paths[i : i + 40]), (i // 40) % 2) for i in range(0, len(paths), 40)]
    rows = []
    for name in a.encoders.split(","):
        encoder = build(name, a.precision, device)
        tiles = np.stack([fit_tile(read_rgb(p), encoder.info) for p in paths])
        encode = timed(lambda: encoder.encode(tiles, a.batch_size), device, a.repeats)

        def pipeline() -> None:
            tmp = Path(tempfile.mkdtemp(prefix="histomil-gpu-"))
            try:
                cache = FeatureCache.for_encoder(tmp / "cache", encoder)
                summary = extract_bags(bags, tmp / "features", encoder, cache, a.batch_size, a.workers)
                if summary.n_encoded != len(paths):
                    raise RuntimeError(f"pipeline encoded {summary.n_encoded} of {len(paths)} tiles")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        piped = timed(pipeline, device, a.repeats)
        enc_rate, pipe_rate = len(paths) / statistics.mean(encode), len(paths) / statistics.mean(piped)
        rows.append({"encoder": name, "weights": encoder.info.weights, "dim": encoder.info.dim,
                     "input": encoder.info.input_size, "precision": encoder.precision, "encode_s": encode,
                     "pipeline_s": piped, "encoder_tiles_per_s": enc_rate, "pipeline_tiles_per_s": pipe_rate,
                     "pipeline_fraction": pipe_rate / enc_rate})
        log(f"{name}: encoder {enc_rate:.0f} tiles/s, pipeline {pipe_rate:.0f} tiles/s ({pipe_rate / enc_rate:.0%})")
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_mil(a: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from histomil.models.registry import build_model

    gen = torch.Generator().manual_seed(a.seed)
    bags = [torch.randn(1, a.bag_tiles, a.dim, generator=gen).to(device) for _ in range(a.mil_bags)]
    labels = [torch.tensor([i % 2], device=device) for i in range(a.mil_bags)]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=a.precision_resolved == "bf16")
    rows = []
    for name in a.models.split(","):
        torch.manual_seed(a.seed)
        model = build_model(name, a.dim).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def train() -> None:
            for x, y in zip(bags, labels):
                training_step(model, opt, x, y)

        @torch.no_grad()
        def infer() -> None:
            model.eval()
            with torch.autocast(**autocast):
                for x in bags:
                    model(x)

        t_train, t_infer = timed(train, device, a.repeats), timed(infer, device, a.repeats)
        row = {"model": name, "train_s": t_train, "infer_s": t_infer,
               "train_bags_per_s": a.mil_bags / statistics.mean(t_train),
               "infer_bags_per_s": a.mil_bags / statistics.mean(t_infer)}
        rows.append(row)
        log(f"{name}: train {row['train_bags_per_s']:.0f} bags/s, infer {row['infer_bags_per_s']:.0f} bags/s")
    return rows


def fmt(x: float) -> str:
    """A rate: whole numbers from 10 up, two significant digits below (CPU smoke tests are slow)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def rate(n: int, seconds: list[float]) -> str:
    """``n`` items per second over the timed passes: mean ± sd of the passes' rates."""
    rates = [n / t for t in seconds]
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return f"{fmt(statistics.mean(rates))} ± {fmt(sd)}"


def markdown(result: dict[str, Any]) -> str:
    env, s = result["environment"], result["settings"]
    tiles, bags = s["tiles"], s["mil_bags"]
    lines = [f"Device: {env['device']} ({env['device_name']}), precision {env['precision']}, torch {result['machine']['torch']}, "
             f"{result['machine']['cpu_count']} CPU cores. {tiles} distinct EBHI tiles, batch {s['batch_size']}, "
             f"{s['workers']} decoding threads; mean ± sd over {s['repeats']} timed passes after a warm-up. Encoders other "
             "than EfficientNet-Lite0 have random weights (speed only; no download).", "",
             "| encoder | weights | dim | input | encoder tiles/s | pipeline tiles/s | pipeline / encoder |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["extraction"]:
        weights = "random" if r["weights"] == "random" else "shipped"
        fraction = statistics.mean(r["encode_s"]) / statistics.mean(r["pipeline_s"])
        lines.append(f"| {r['encoder']} | {weights} | {r['dim']} | {r['input']} | {rate(tiles, r['encode_s'])} | "
                     f"{rate(tiles, r['pipeline_s'])} | {fraction:.0%} |")
    lines += ["", f"MIL heads, bags of {s['bag_tiles']} tiles x {s['dim']} features, one bag per step:", "",
              "| model | train bags/s | inference bags/s |", "|---|---:|---:|"]
    for r in result["mil"]:
        lines.append(f"| {r['model']} | {rate(bags, r['train_s'])} | {rate(bags, r['infer_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto")
    p.add_argument("--out", type=Path, help="folder for gpu.json and gpu.md (required unless --table)")
    p.add_argument("--table", type=Path, help="print the markdown table of an earlier run's gpu.json and stop")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="EBHI folder with tiles.csv")
    p.add_argument("--encoders", default=None, help=f"comma-separated (default {FULL_ENCODERS}; --quick: {QUICK_ENCODERS})")
    p.add_argument("--models", default="gated_abmil,transmil")
    p.add_argument("--precision", default="auto", help="auto (bf16 where the device computes it natively), fp32, bf16")
    p.add_argument("--tiles", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8, help="decoding threads of the pipeline")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bag-tiles", type=int, default=2000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--mil-bags", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test on the CPU")
    a = p.parse_args(argv)
    if a.table is not None:
        print(markdown(json.loads(a.table.read_text())), end="")
        return 0
    if a.out is None:
        p.error("--out is required")
    if a.quick:
        a.tiles, a.batch_size, a.workers, a.repeats = 8, 4, 1, 1
        a.bag_tiles, a.dim, a.mil_bags = 20, 32, 2
    a.encoders = a.encoders or (QUICK_ENCODERS if a.quick else FULL_ENCODERS)
    from histomil.hardware import resolve_precision

    device = resolve_device(a.device)
    a.precision_resolved = resolve_precision(a.precision, device)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result: dict[str, Any] = {
        "environment": device_record(device, a.precision_resolved), "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    result["extraction"] = bench_extraction(a, device, log)
    result["mil"] = bench_mil(a, device, log)
    write_json(a.out / "gpu.json", result)
    write_text(a.out / "gpu.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
