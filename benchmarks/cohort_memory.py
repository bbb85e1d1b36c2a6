"""Peak memory and speed of training on a cohort streamed from its feature files (issue 14, item 5).

Writes synthetic TRIDENT-style feature files (``features`` float16 (N, D), ``coords`` with
``patch_size_level0``; N drawn uniformly from ``--tiles LO HI``), then trains one epoch of gated ABMIL
on the first S of them for every S in ``--slides``, each run in a fresh process (so getrusage's peak
resident memory is that run's own), ``--repeats`` times:

* ``stream``: :func:`histomil.features.lazy.lazy_features_folder` + the streaming trainer (one file
  read at a time, ``prefetch`` bags read ahead in a background thread);
* ``memory`` (only for S in ``--eager-slides``): :func:`histomil.features.formats.load_features_folder`,
  every bag in memory as float32 (today's path), for comparison.

Training bags are capped at ``--max-instances`` random tiles (TrainConfig.max_instances, training
only); validation (``--val`` slides, default 10) runs on every tile. Reported per run: seconds to scan (read and
check every file once, digest), seconds of the epoch (training + validation), training bags/s, peak
RSS (MiB). Positive slides (every second one) carry 5 % of tiles shifted by +0.5 in 16 dimensions.

    python benchmarks/cohort_memory.py --data /tmp/cohort_mem --slides 200 800 --eager-slides 200 --out runs/cohort_memory

Writes ``OUT/cohort_memory.json`` and ``OUT/cohort_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_cohort(folder: Path, n: int, tiles: tuple[int, int], dim: int, seed: int) -> None:
    """``n`` TRIDENT-like float16 feature files + labels.csv in ``folder`` (kept when already complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(tiles[0], tiles[1] + 1, size=n)
    rows = ["case,y_true"]
    for i, size in enumerate(sizes):
        name, label = f"slide_{i:04d}", i % 2
        rows.append(f"{name},{label}")
        path = folder / f"{name}.h5"
        if path.exists():
            continue
        feats = rng.standard_normal((int(size), dim), dtype=np.float32)
        if label:
            hit = rng.choice(int(size), max(1, int(size) // 20), replace=False)
            feats[hit, :16] += 0.5
        side = int(np.ceil(np.sqrt(size)))
        coords = np.stack([np.arange(size) % side, np.arange(size) // side], axis=1) * 256
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats.astype(np.float16))
            c = f.create_dataset("coords", data=coords.astype(np.int64))
            c.attrs["patch_size_level0"] = 256
            c.attrs["name"] = name
            f.attrs["encoder"] = "synthetic"
        tmp.rename(path)
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def subset(folder: Path, dest: Path, n: int) -> Path:
    """A folder of links to the first ``n`` slides of ``folder`` (with their labels)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = (folder / "labels.csv").read_text().splitlines()
    (dest / "labels.csv").write_text("\n".join(rows[: n + 1]) + "\n")
    for row in rows[1 : n + 1]:
        link = dest / f"{row.split(',')[0]}.h5"
        if not link.exists():
            link.symlink_to((folder / link.name).resolve())
    return dest


def child(args: argparse.Namespace) -> None:
    """One run in this process: load (lazily or not), train one epoch, print a JSON line."""
    import torch

    from histomil.features.formats import load_features_folder
    from histomil.features.lazy import lazy_features_folder
    from histomil.training.streaming import peak_memory
    from histomil.training.trainer import TrainConfig, train

    torch.set_num_threads(1)
    read = lazy_features_folder if args.mode == "stream" else load_features_folder
    t0 = time.perf_counter()
    train_bags, val_bags = read(args.train_dir), read(args.val_dir)
    scan_s = time.perf_counter() - t0
    cfg = TrainConfig(model="gated_abmil", epochs=1, min_epochs=0, max_instances=args.max_instances, seed=args.seed)
    t0 = time.perf_counter()
    result = train(train_bags, val_bags, cfg, args.run_dir)
    epoch_s = time.perf_counter() - t0
    row = result.history[-1]
    print(json.dumps({"mode": args.mode, "slides": len(train_bags), "tiles": int(sum(len(b) for b in train_bags)),
                      "scan_s": scan_s, "epoch_s": epoch_s, "train_bags_per_s": len(train_bags) / row["seconds"],
                      "val_loss": row["val_loss"], **peak_memory("cpu")}))


def mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder for the synthetic feature files (reused)")
    p.add_argument("--out", type=Path, default=Path("runs/cohort_memory"))
    p.add_argument("--slides", type=int, nargs="+", default=[200, 800])
    p.add_argument("--eager-slides", type=int, nargs="*", default=[200], help="slide counts also run fully in memory")
    p.add_argument("--val", type=int, default=10, help="validation slides (full bags)")
    p.add_argument("--tiles", type=int, nargs=2, default=[2000, 6000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--max-instances", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    p.add_argument("--train-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--val-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    t0 = time.perf_counter()
    write_cohort(args.data / "all", max(args.slides), tuple(args.tiles), args.dim, args.seed)
    write_cohort(args.data / f"val_{args.val}", args.val, tuple(args.tiles), args.dim, args.seed + 1)
    print(f"synthetic files ready in {time.perf_counter() - t0:.0f} s", flush=True)
    runs = []
    plan = [("stream", s) for s in args.slides] + [("memory", s) for s in args.eager_slides]
    for repeat in range(args.repeats):
        for mode, n in plan:
            train_dir = subset(args.data / "all", args.data / f"first_{n}", n)
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--train-dir", str(train_dir),
                   "--val-dir", str(args.data / f"val_{args.val}"), "--run-dir", str(args.out / f"run_{mode}_{n}_{repeat}"),
                   "--max-instances", str(args.max_instances), "--seed", str(args.seed), "--data", str(args.data)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append({**json.loads(out.strip().splitlines()[-1]), "repeat": repeat})
            print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"CPU: {cpu_name()}, 1 training thread; {args.repeats} runs each, mean ± sd; "
             f"tiles per slide {args.tiles[0]}-{args.tiles[1]} x {args.dim}-d float16 files, training bags capped at "
             f"{args.max_instances} random tiles, {args.val} validation slides on every tile.", "",
             "| path | slides | tiles (train) | scan s | epoch s | train bags/s (epoch incl. validation) | peak RSS MiB |", "|---|---:|---:|---|---|---|---|"]
    for mode, n in plan:
        rs = [r for r in runs if r["mode"] == mode and r["slides"] == n]
        lines.append(f"| {mode} | {n} | {rs[0]['tiles']:,} | {mean_sd([r['scan_s'] for r in rs], '.1f')} | "
                     f"{mean_sd([r['epoch_s'] for r in rs], '.1f')} | {mean_sd([r['train_bags_per_s'] for r in rs], '.2f')} | "
                     f"{mean_sd([r['peak_rss_mib'] for r in rs], '.0f')} |")
    (args.out / "cohort_memory.json").write_text(json.dumps({"cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()},
                                                             "runs": runs}, indent=1))
    (args.out / "cohort_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
