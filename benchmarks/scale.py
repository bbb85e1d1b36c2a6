"""How MIL heads scale with bag size: wall time and peak memory of inference and of one training step.

For each registry model and each bag size N (default 100, 1,000, 10,000, 100,000 instances of
1280-d features, the width of a large foundation-model encoder), one FRESH subprocess per
measurement builds the model on random features and measures:

* ``infer``: ``histomil.training.trainer.predict`` on the bag (eval mode, no gradients, one forward
  pass and the softmax): what ``histomil predict`` does per bag;
* ``infer_bf16``: the same with ``precision="bf16"`` (bfloat16 autocast, ``histomil predict --precision bf16``);
* ``train``: ``model.train()``, forward, the trainer's bag loss, backward and one Adam step.

Every worker first applies ``histomil.runtime.keep_freed_memory()``, as histomil's own prediction and
training do.

Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (torch allocates outside Python's
heap, so ``tracemalloc`` would miss it): ``peak_mb`` is the process peak, ``delta_mb`` the growth
over the baseline taken once the model, optimizer and input exist (i.e. the activations/gradients).
Memory comes from the first (cold) call; time is the median of 3 calls after it when a call takes
under 2 s, else of 1 more call. A (model, mode) whose time exceeded ``--max-seconds`` or whose
delta would exceed ``--max-gb`` (linear extrapolation from the previous size) is skipped at the
larger sizes and marked so; a subprocess is killed after 3x ``--max-seconds``. CPU only.

    python benchmarks/scale.py --out benchmarks/results/ --threads 2
    python benchmarks/scale.py --out /tmp/s --sizes 10 100 --models abmil --threads 1   # smoke test

Writes ``scale.csv``, ``scale.json`` (rows, log-log slopes over N >= 1000, machine) and
``scale.png`` (log-log time vs bag size) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, size_cells, training_step, write_json, write_text

SIZES = (100, 1_000, 10_000, 100_000)
MODES = ("infer", "infer_bf16", "train")
MODE_TITLES = {"infer": "inference (predict, fp32)", "infer_bf16": "inference (predict, bf16 autocast)", "train": "one training step"}
DIM = 1280


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def worker(model_name: str, n: int, mode: str, threads: int, dim: int) -> dict:
    """One measurement in this (fresh) process; returns a result row."""
    import torch

    from histomil.models.registry import build_model
    from histomil.runtime import keep_freed_memory
    from histomil.training.trainer import predict

    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, dim, 2)
    x = torch.randn(1, n, dim)
    y = torch.tensor([1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4) if mode == "train" else None

    def call() -> None:
        if mode.startswith("infer"):
            predict(model, [x[0]], precision="bf16" if mode == "infer_bf16" else "fp32")
        else:
            training_step(model, opt, x, y)

    base = _maxrss_mb()
    t0 = time.perf_counter()
    call()
    cold = time.perf_counter() - t0
    peak = _maxrss_mb()
    times = []
    for _ in range(3 if cold < 2.0 else 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"model": model_name, "n": n, "mode": mode, "threads": threads, "status": "ok",
            "seconds": statistics.median(times), "cold_seconds": cold,
            "peak_mb": round(peak, 1), "delta_mb": round(peak - base, 1)}


def measure(model_name: str, n: int, mode: str, threads: int, dim: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, str(n), mode, "--threads", str(threads), "--dim", str(dim)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    row = {"model": model_name, "n": n, "mode": mode, "threads": threads}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"killed after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**row, "status": f"failed: {last[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slopes(rows: list[dict], min_n: int = 1000) -> dict[str, dict[str, float]]:
    """Least-squares slope of log10(time) vs log10(N) over N >= ``min_n`` (1 = linear)."""
    out: dict[str, dict[str, float]] = {}
    for r0 in rows:
        key = (r0["model"], r0["mode"])
        pts = [(r["n"], r["seconds"]) for r in rows if (r["model"], r["mode"]) == key and r["status"] == "ok" and r["n"] >= min_n]
        if len(pts) >= 2:
            lx, ly = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
            out.setdefault(key[0], {})[key[1]] = round(float(np.polyfit(lx, ly, 1)[0]), 3)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histomil.files import atomic_write

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, mode in zip(axes, modes):
        for k, m in enumerate(dict.fromkeys(r["model"] for r in rows)):
            pts = [(r["n"], r["seconds"]) for r in rows if r["model"] == m and r["mode"] == mode and r["status"] == "ok"]
            if pts:  # tab20 and alternating line styles: 11+ models stay distinguishable
                ax.loglog(*zip(*pts), marker="o", label=m, color=plt.cm.tab20(k % 20), linestyle=("-", "--")[k % 2])
        ax.set_title(MODE_TITLES[mode])
        ax.set_xlabel("instances per bag")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], sl: dict[str, dict[str, float]]) -> str:
    """One table per mode: seconds (and activation/gradient memory growth) per bag size, plus the slope."""
    sizes = sorted({r["n"] for r in rows})
    out = []
    for mode in MODES:
        if not any(r["mode"] == mode for r in rows):
            continue
        out.append(f"**{MODE_TITLES[mode]}**: seconds "
                   "(peak RSS growth over the model+input baseline, MB)\n")
        out.append("| model | " + " | ".join(f"N={n:,}" for n in sizes) + " | log-log slope (N>=1000) |")
        out.append("|---|" + "---|" * (len(sizes) + 1))
        for m in dict.fromkeys(r["model"] for r in rows if r["mode"] == mode):
            cells = size_cells(rows, "model", m, mode, sizes, lambda r: f"{r['seconds']:.3g} s ({r['delta_mb']:.0f})")
            slope = sl.get(m, {}).get(mode)
            out.append(f"| {m} | " + " | ".join(cells) + f" | {slope if slope is not None else '—'} |")
        out.append("")
    return "\n".join(out) + "\n"


def write_outputs(a: argparse.Namespace, rows: list[dict], t_start: float, host: dict | None = None) -> None:
    """(Re)write scale.csv, scale.json and scale.png from the rows so far (after every model/mode)."""
    a.out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "mode", "n", "threads", "status", "seconds", "cold_seconds", "peak_mb", "delta_mb"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(a.out / "scale.csv", buf.getvalue())
    sl = slopes(rows)
    write_json(a.out / "scale.json", {"settings": {"sizes": sorted(a.sizes), "dim": a.dim, "threads": a.threads,
                                                   "max_seconds": a.max_seconds, "max_gb": a.max_gb},
                                      "machine": host or machine(), "rows": rows, "loglog_slopes_n_ge_1000": sl,
                                      "total_seconds": round(time.perf_counter() - t_start, 1)})
    plot(rows, a.out / "scale.png")
    write_text(a.out / "scale.md", markdown(rows, sl))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--models", nargs="+", default=None, help="default: every registry model")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--max-gb", type=float, default=8.0)
    p.add_argument("--from-json", type=Path, help="only re-render outputs from an earlier scale.json")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "N", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.worker[2], a.threads, a.dim)))
        return 0
    if a.out is None:
        p.error("--out is required")
    if a.from_json:  # re-render the CSV/table/plot of a finished (or interrupted) run
        data = json.loads(a.from_json.read_text())
        for key, value in data["settings"].items():
            setattr(a, key, value)
        write_outputs(a, data["rows"], time.perf_counter() - data.get("total_seconds", 0.0), data.get("machine"))
        return 0
    from histomil.models.registry import model_names

    models = a.models or model_names()
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for m in models:
        for mode in a.modes:
            prev: dict | None = None
            for n in sorted(a.sizes):
                skip = None
                if prev is not None and prev["status"] != "ok":
                    skip = f"skipped: smaller bag {prev['status']}"
                elif prev is not None and prev["seconds"] > a.max_seconds:
                    skip = f"skipped: {prev['n']} instances took {prev['seconds']:.0f} s > {a.max_seconds:.0f} s"
                elif prev is not None and prev["delta_mb"] * n / prev["n"] > a.max_gb * 1024:
                    skip = f"skipped: memory extrapolated over {a.max_gb:g} GB"
                row = {"model": m, "n": n, "mode": mode, "threads": a.threads, "status": skip} if skip else \
                    measure(m, n, mode, a.threads, a.dim, timeout=3 * a.max_seconds)
                rows.append(row)
                prev = row
                msg = f"{row['seconds']:.4f} s, peak {row['peak_mb']:.0f} MB (+{row['delta_mb']:.0f})" if row["status"] == "ok" else row["status"]
                print(f"{m} {mode} N={n}: {msg}", flush=True)
            write_outputs(a, rows, t_start)
    return 0 if all(r["status"] == "ok" or str(r["status"]).startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
