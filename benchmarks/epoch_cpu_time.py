"""CPU seconds per training epoch (not wall time), to tell a denormal slowdown from a loaded machine.

Trains the demo's train config on a feature folder (train/, val/) and prints each epoch's process CPU
time beside its wall time, and the mean of the last three epochs over epochs 2-4 (training runs on one
thread, so CPU time does not include waiting for a core):

    python benchmarks/epoch_cpu_time.py runs/seeds_demo_bf16/seed_1/features --seed 1 --out runs/epoch_cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from histomil.features.formats import load_feature_dataset
from histomil.pipeline import load_config
from histomil.resources import demo_config_path
from histomil.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("features", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = load_config(demo_config_path()).train.model_copy(update={"seed": a.seed})
    train_bags = load_feature_dataset(a.features / "train", require_labels=True)
    val_bags = load_feature_dataset(a.features / "val", require_labels=True)
    rows: list[dict] = []
    last = [time.process_time()]

    def on_epoch(row: dict) -> None:
        now = time.process_time()
        rows.append({"epoch": row["epoch"], "cpu_s": round(now - last[0], 3), "wall_s": round(row["seconds"], 3)})
        last[0] = now

    train(train_bags, val_bags, cfg, a.out, on_epoch=on_epoch)
    cpu = [r["cpu_s"] for r in rows]
    ratio = (sum(cpu[-3:]) / 3) / (sum(cpu[1:4]) / 3) if len(cpu) >= 5 else float("nan")
    print(json.dumps({"epochs": rows, "late_over_early_cpu": round(ratio, 3)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
