"""CPU runtimes for the tile encoder: tiles/s and feature agreement, measured side by side in one run.

    python benchmarks/cpu_encoders.py                         # -> benchmarks/results/cpu_encoders.{json,csv,md}
    python benchmarks/cpu_encoders.py --out /tmp/c --quick    # smoke test: a few tiles, no compile, seconds

Needs ``pip install onnxruntime onnx openvino`` (``pip install -e '.[dev]'`` has them); rows whose
package is missing are kept with the reason. Optional: ``timm`` (it pulls in torchvision) adds
ViT-S/16 rows with random weights; the encoder registry has no ViT yet.

1. **Encoder alone** (``encode`` table): the shipped EfficientNet-Lite0 (ImageNet weights) encoding
   ``--tiles`` tiles already decoded in memory (uint8 -> preprocess -> network -> float32
   features, :meth:`TileEncoder.encode` at ``--batch-size``), with ``--threads`` threads, one path
   after another within each repetition (interleaved, so a load spike hits every path alike), best
   of ``--repeats`` after one warm-up call per path (which also does compilation / conversion,
   timed separately as ``build s``). Also the CPU seconds (user + system, every thread of this
   process) per 1,000 tiles of the fastest pass: steadier than wall time when other jobs share the
   cores. Tiles: a seeded pick of distinct real EBHI tiles (``--data``), or random uint8
   (``--random``). Paths:

   * ``torch fp32 eager`` (the reference for feature differences), ``torch fp32 channels_last``;
   * ``torch bf16 eager``, ``torch bf16 channels_last``: autocast to bfloat16, on only the first
     ``--bf16-tiles`` tiles (same batch size): on a CPU without AVX512-BF16/AMX, bf16 is emulated
     and an order of magnitude slower, so the full tile count would take minutes per pass;
   * ``torch.compile fp32``: ``torch.compile`` (inductor) of the channels_last backbone; skipped with
     the error when it fails;
   * ``ONNX Runtime fp32``: the backbone exported to ONNX in memory, CPU execution provider;
   * ``OpenVINO fp32``: the backbone through ``torch.export`` and ``openvino.convert_model``, CPU
     plugin, inference precision pinned to f32.

   The two runtimes are built by :mod:`histomil.features.runtimes`, exactly as feature extraction
   builds them. For every path: the largest absolute feature difference from torch fp32 eager on
   the same tiles, that divided by the largest absolute reference feature (``rel``), the worst
   per-tile relative L2 distance and the lowest cosine similarity.

2. **End to end** (``extract`` table): :func:`histomil.features.extract.extract_bags`, what
   ``histomil features extract`` runs (hash, decode in 1 thread overlapping the encoder, encode,
   write cache shards and one HDF5 per bag of 40) on ``--e2e-tiles`` EBHI tile files, fp32, per
   runtime (torch = channels_last as the CLI builds it), into a fresh folder with an empty cache
   each pass; best of ``--repeats``, interleaved. Also one run of the ``histomil features extract``
   command per runtime on a manifest of the same bags, wall time including Python start-up, model
   build and graph conversion (the one-off cost per run).

Writes ``cpu_encoders.json`` (every pass time, settings, machine), ``cpu_encoders.csv`` (one row per
encoder path), ``cpu_encoders_extract.csv`` and ``cpu_encoders.md`` (tables and the decision) to ``--out``.
The decision rule: an alternative runtime is worth offering when it is at least ``--min-speedup``
times the best torch fp32 path and its features are within ``FEATURE_TOLERANCE`` (relative to the
feature scale) of torch fp32 eager.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pick_tiles, write_json, write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ebhi"
BAG_SIZE = 40
LITE0 = "EfficientNet-Lite0"
VIT = "ViT-S/16 (random weights)"


# --- machine ---------------------------------------------------------------------------------------


def cpu_description() -> dict[str, Any]:
    """CPU model name, family/model numbers and flags of interest from /proc/cpuinfo, torch's capability."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "vendor_id", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")
    return {
        "cpu_model_name": info.get("model name", "unknown"),
        "cpu_vendor": info.get("vendor_id", ""),
        "cpu_family": info.get("cpu family", ""),
        "cpu_model": info.get("model", ""),
        "cpu_flags_of_interest": [f for f in wanted if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "numpy": np.__version__}
    for name in ("openvino", "onnxruntime", "onnx", "timm"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


# --- tiles -----------------------------------------------------------------------------------------


# --- encoder paths ---------------------------------------------------------------------------------


class EncoderPath:
    """One way of running an encoder: how to build it and on how many tiles it is timed.

    (A plain class, not a dataclass: the smoke tests load this file without registering it as a module.)
    """

    def __init__(self, model: str, name: str, precision: str, build: Callable[[], Any], n_tiles: int) -> None:
        self.model, self.name, self.precision, self.build, self.n_tiles = model, name, precision, build, n_tiles
        self.encoder: Any = None
        self.status = "ok"
        self.build_seconds = float("nan")
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.features: np.ndarray | None = None


def lite0(precision: str, channels_last: bool) -> Callable[[], Any]:
    def build() -> Any:
        from histomil.features.encoders import build_encoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on emulating hardware warns; measuring it is the point
            return build_encoder("efficientnet_lite0", precision=precision, channels_last=channels_last)

    return build


def compiled(base: Callable[[], Any]) -> Callable[[], Any]:
    def build() -> Any:
        enc = base()
        enc.backbone.forward_features = torch.compile(enc.backbone.forward_features, dynamic=False)
        return enc

    return build


def on_runtime(base: Callable[[], Any], runtime: str) -> Callable[[], Any]:
    def build() -> Any:
        from histomil.features.runtimes import with_runtime

        return with_runtime(base(), runtime)

    return build


def vit_small(precision: str) -> Callable[[], Any]:
    """ViT-S/16 from timm with random weights, as a TileEncoder (pooled 384-d pre-logits)."""

    def build() -> Any:
        import timm

        from histomil.features.encoders import EncoderInfo, TileEncoder

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)

            def forward_features(self, x: torch.Tensor) -> torch.Tensor:
                return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

        backbone = Pooled()
        info = EncoderInfo("vit_small_random", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), backbone.vit.num_features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TileEncoder(backbone, info, precision=precision).eval()

    return build


def encoder_paths(a: argparse.Namespace) -> list[EncoderPath]:
    n, nb = a.tiles, min(a.bf16_tiles, a.tiles)
    paths = [
        EncoderPath(LITE0, "torch fp32 eager", "fp32", lite0("fp32", False), n),
        EncoderPath(LITE0, "torch fp32 channels_last", "fp32", lite0("fp32", True), n),
        EncoderPath(LITE0, "torch bf16 eager", "bf16", lite0("bf16", False), nb),
        EncoderPath(LITE0, "torch bf16 channels_last", "bf16", lite0("bf16", True), nb),
        EncoderPath(LITE0, "torch.compile fp32 (channels_last)", "fp32", compiled(lite0("fp32", True)), n),
        EncoderPath(LITE0, "ONNX Runtime fp32", "fp32", on_runtime(lite0("fp32", True), "onnxruntime"), n),
        EncoderPath(LITE0, "OpenVINO fp32", "fp32", on_runtime(lite0("fp32", True), "openvino"), n),
    ]
    if a.no_compile:
        paths[4].status = "skipped: --no-compile"
    if a.vit_tiles > 0:
        nv, nvb = min(a.vit_tiles, a.tiles), min(a.vit_bf16_tiles, a.vit_tiles, a.tiles)
        paths += [
            EncoderPath(VIT, "torch fp32 eager", "fp32", vit_small("fp32"), nv),
            EncoderPath(VIT, "torch bf16 eager", "bf16", vit_small("bf16"), nvb),
            EncoderPath(VIT, "ONNX Runtime fp32", "fp32", on_runtime(vit_small("fp32"), "onnxruntime"), nv),
            EncoderPath(VIT, "OpenVINO fp32", "fp32", on_runtime(vit_small("fp32"), "openvino"), nv),
        ]
    if a.paths:
        paths = [p for p in paths if p.name in a.paths or p.name == "torch fp32 eager"]  # the reference stays
    return paths


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads: torch's, the runtimes', decoding)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def bench_encoders(a: argparse.Namespace, pixels: np.ndarray, log: Callable[[str], None]) -> list[dict[str, Any]]:
    paths = encoder_paths(a)
    for p in paths:  # build + warm-up (one batch; compiles/converts), timed together as the one-off cost
        if p.status != "ok":
            continue
        try:
            t0 = time.perf_counter()
            p.encoder = p.build()
            p.encoder.encode(pixels[: min(a.batch_size, p.n_tiles)], batch_size=a.batch_size)
            p.build_seconds = time.perf_counter() - t0
            log(f"{p.model} / {p.name}: built and warmed up in {p.build_seconds:.1f} s")
        except Exception as exc:  # noqa: BLE001 - any failure becomes the row's status
            p.status = f"failed: {short_error(exc)}"
            p.encoder = None
            log(f"{p.model} / {p.name}: {p.status}")
    for rep in range(a.repeats):
        for p in paths:
            if p.status != "ok":
                continue
            c0, t0 = cpu_seconds(), time.perf_counter()
            feats = p.encoder.encode(pixels[: p.n_tiles], batch_size=a.batch_size)
            p.seconds.append(time.perf_counter() - t0)
            p.cpu_seconds.append(cpu_seconds() - c0)
            p.features = feats
            log(f"pass {rep + 1}/{a.repeats} {p.model} / {p.name}: {p.n_tiles / p.seconds[-1]:.1f} tiles/s")

    from histomil.features.runtimes import FEATURE_TOLERANCE

    rows = []
    refs = {p.model: p.features for p in paths if p.name == "torch fp32 eager" and p.features is not None}
    for p in paths:
        row: dict[str, Any] = {
            "model": p.model, "path": p.name, "precision": p.precision, "status": p.status, "n_tiles": p.n_tiles,
            "batch_size": a.batch_size, "build_seconds": p.build_seconds, "seconds": p.seconds,
            "cpu_seconds": p.cpu_seconds,
        }
        if p.seconds:
            row["tiles_per_s"] = p.n_tiles / min(p.seconds)
            row["tiles_per_s_median"] = p.n_tiles / statistics.median(p.seconds)
            row["cpu_s_per_1000_tiles"] = 1000 * min(p.cpu_seconds) / p.n_tiles
        ref = refs.get(p.model)
        if p.features is not None and ref is not None:
            r = ref[: p.n_tiles].astype(np.float64)
            d = p.features.astype(np.float64) - r
            scale = float(np.abs(r).max())
            norms = np.linalg.norm(r, axis=1)
            cos = (p.features * r).sum(1) / np.maximum(np.linalg.norm(p.features, axis=1) * norms, 1e-12)
            row.update({
                "max_abs_diff": float(np.abs(d).max()),
                "feature_scale": scale,
                "rel_max_abs_diff": float(np.abs(d).max()) / scale if scale > 0 else float("nan"),
                "max_tile_rel_l2": float((np.linalg.norm(d, axis=1) / np.maximum(norms, 1e-12)).max()),
                "min_cosine": float(cos.min()),
            })
            row["within_tolerance"] = bool(row["rel_max_abs_diff"] <= FEATURE_TOLERANCE)
        rows.append(row)
        p.encoder = None  # free memory before the end-to-end part
    return rows


# --- end to end ------------------------------------------------------------------------------------


def as_bags(paths: list[Path]) -> list:
    from histomil.data.bags import Bag

    return [Bag(f"bag{i // BAG_SIZE:04d}", tuple(paths[i : i + BAG_SIZE]), None) for i in range(0, len(paths), BAG_SIZE)]


def extract_once(bags: list, encoder: Any, batch_size: int, cpu_used: list[float] | None = None) -> float:
    """Seconds of one ``extract_bags`` run into a fresh folder with an empty cache (its CPU seconds into ``cpu_used[0]``)."""
    cpu_used = [0.0] if cpu_used is None else cpu_used
    from histomil.features.cache import FeatureCache
    from histomil.features.extract import extract_bags

    tmp = Path(tempfile.mkdtemp(prefix="histomil-cpu-encoders-"))
    try:
        cache = FeatureCache.for_encoder(tmp / "cache", encoder)
        c0, t0 = cpu_seconds(), time.perf_counter()
        summary = extract_bags(bags, tmp / "features", encoder, cache, batch_size, 1)
        seconds = time.perf_counter() - t0
        cpu_used[0] = cpu_seconds() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(b) for b in bags)
    if summary.n_encoded != n or summary.n_written != len(bags):
        raise RuntimeError(f"encoded {summary.n_encoded} of {n} tiles, wrote {summary.n_written} of {len(bags)} bags")
    return seconds


def cli_once(manifest: Path, runtime: str, batch_size: int, threads: int) -> float:
    """Wall seconds of one ``histomil features extract`` process (start-up, build, conversion included)."""
    exe = Path(sys.executable).with_name("histomil")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "histomil.cli"]
    out = Path(tempfile.mkdtemp(prefix="histomil-cpu-encoders-cli-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        t0 = time.perf_counter()
        subprocess.run([*cmd, "features", "extract", str(manifest), str(out / "features"), "--precision", "fp32",
                        "--runtime", runtime, "--batch-size", str(batch_size)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return time.perf_counter() - t0
    except subprocess.CalledProcessError as exc:
        raise RuntimeError((exc.stderr or "").strip().splitlines()[-1:] or [str(exc)]) from None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_extract(a: argparse.Namespace, tiles: list[Path], log: Callable[[str], None]) -> list[dict[str, Any]]:
    from histomil.features.encoders import build_encoder
    from histomil.features.runtimes import with_runtime

    bags = as_bags(tiles)
    warm = as_bags(tiles[: a.batch_size])
    work = Path(tempfile.mkdtemp(prefix="histomil-cpu-encoders-manifest-"))
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["bag_id", "path"])
        for b in bags:
            w.writerows([b.bag_id, str(Path(p).resolve())] for p in b.tile_paths)
    rows: list[dict[str, Any]] = []
    encoders: dict[str, Any] = {}
    for runtime in a.runtimes:
        row: dict[str, Any] = {"runtime": runtime, "precision": "fp32", "n_tiles": len(tiles), "n_bags": len(bags),
                               "status": "ok", "seconds": [], "cpu_seconds": [], "cli_seconds": float("nan")}
        try:
            t0 = time.perf_counter()
            enc = with_runtime(build_encoder("efficientnet_lite0", precision="fp32", channels_last=True), runtime)
            row["build_seconds"] = time.perf_counter() - t0
            extract_once(warm, enc, a.batch_size)  # warm-up: allocator, HDF5, decode thread
            encoders[runtime] = enc
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"failed: {short_error(exc)}"
        rows.append(row)
    for rep in range(a.repeats):
        for row in rows:
            if row["status"] == "ok":
                used = [0.0]
                row["seconds"].append(extract_once(bags, encoders[row["runtime"]], a.batch_size, used))
                row["cpu_seconds"].append(used[0])
                log(f"extract pass {rep + 1}/{a.repeats} {row['runtime']}: {len(tiles) / row['seconds'][-1]:.1f} tiles/s")
    encoders.clear()
    for row in rows:
        if row["seconds"]:
            row["tiles_per_s"] = len(tiles) / min(row["seconds"])
            row["tiles_per_s_median"] = len(tiles) / statistics.median(row["seconds"])
            row["cpu_s_per_1000_tiles"] = 1000 * min(row["cpu_seconds"]) / len(tiles)
    if not a.no_cli:
        for row in rows:
            if row["status"] != "ok":
                continue
            try:
                row["cli_seconds"] = cli_once(manifest, row["runtime"], a.batch_size, a.threads)
                log(f"histomil features extract --runtime {row['runtime']}: {row['cli_seconds']:.1f} s")
            except Exception as exc:  # noqa: BLE001
                row["cli_status"] = f"failed: {short_error(exc)}"
    shutil.rmtree(work, ignore_errors=True)
    return rows


# --- report ----------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if not isinstance(x, (int, float)) or x != x:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def decide(rows: list[dict[str, Any]], min_speedup: float) -> dict[str, Any]:
    """The fastest alternative fp32 runtime of the default encoder that clears the bar, if any."""
    lite = [r for r in rows if r["model"] == LITE0 and r.get("tiles_per_s")]
    torch_fp32 = [r for r in lite if r["precision"] == "fp32" and r["path"].startswith("torch")]
    if not torch_fp32:
        return {"choice": None, "reason": "no torch fp32 measurement"}
    best_torch = max(torch_fp32, key=lambda r: r["tiles_per_s"])
    candidates = []
    for r in lite:
        if r["path"] in ("ONNX Runtime fp32", "OpenVINO fp32"):
            r["speedup_vs_best_torch_fp32"] = r["tiles_per_s"] / best_torch["tiles_per_s"]
            if r["speedup_vs_best_torch_fp32"] >= min_speedup and r.get("within_tolerance"):
                candidates.append(r)
    out: dict[str, Any] = {"best_torch_fp32": best_torch["path"], "best_torch_fp32_tiles_per_s": best_torch["tiles_per_s"],
                           "min_speedup": min_speedup}
    if not candidates:
        out.update(choice=None, reason=f"no alternative runtime is >= {min_speedup}x {best_torch['path']} with matching features")
        return out
    best = max(candidates, key=lambda r: r["tiles_per_s"])
    out.update(choice=best["path"], speedup=best["speedup_vs_best_torch_fp32"], rel_max_abs_diff=best["rel_max_abs_diff"],
               reason=f"{best['path']} is {best['speedup_vs_best_torch_fp32']:.2f}x {best_torch['path']} "
                      f"with features within {best['rel_max_abs_diff']:.1e} of the feature scale")
    return out


def markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Tile encoder on the CPU: runtimes side by side",
        "",
        f"CPU: **{m['cpu_model_name']}** (vendor {m['cpu_vendor']}, family {m['cpu_family']} model {m['cpu_model']}; "
        f"flags {', '.join(m['cpu_flags_of_interest']) or 'none of interest'}), torch CPU capability "
        f"{m['torch_cpu_capability']}, {s['threads']} thread(s), {m['cpu_count']} CPU(s); load average before "
        f"{m['loadavg_1_5_15']}, after {result['loadavg_after']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "Regenerate: `" + " ".join(["python benchmarks/cpu_encoders.py", *result["argv"]]) + "`",
        "",
        f"## Encoder alone, tiles/s ({s['tile_source']}, batch {s['batch_size']}, best of {s['repeats']} interleaved passes after a warm-up)",
        "",
        "| model | path | tiles | tiles/s (best) | tiles/s (median) | vs fp32 eager | CPU s / 1k tiles | build + warm-up s | max abs diff | rel (÷ max abs feature) | min cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {r["model"]: r.get("tiles_per_s") for r in result["encoders"] if r["path"] == "torch fp32 eager"}
    for r in result["encoders"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['path']} | — | {r['status']} | | | | | | | |")
            continue
        base = ref.get(r["model"])
        ratio = f"{r['tiles_per_s'] / base:.2f}x" if base else "—"
        diff = "0 (reference)" if r["path"] == "torch fp32 eager" else fmt(r.get("max_abs_diff"), 2)
        rel = "—" if r["path"] == "torch fp32 eager" else fmt(r.get("rel_max_abs_diff"), 2)
        lines.append(f"| {r['model']} | {r['path']} | {r['n_tiles']} | {fmt(r['tiles_per_s'])} | "
                     f"{fmt(r['tiles_per_s_median'])} | {ratio} | {fmt(r['cpu_s_per_1000_tiles'])} | {fmt(r['build_seconds'], 2)} | {diff} | {rel} | "
                     f"{fmt(r.get('min_cosine'), 7)} |")
    lines += [
        "",
        f"bf16 rows encode only the first {s['bf16_tiles']} tiles (ViT: {s['vit_bf16_tiles']}; ViT fp32 rows: "
        f"{s['vit_tiles']}): bf16 is emulated on CPUs without AVX512-BF16/AMX, an order of magnitude slower. "
        "Differences are from torch fp32 eager of the same model on the same tiles. ViT row: "
        f"{result['timm']}.",
    ]
    if result.get("extract"):
        e = result["extract"]
        lines += [
            "",
            f"## End to end: `extract_bags` (what `histomil features extract` runs), fp32, tiles/s",
            "",
            f"{e[0]['n_tiles']} EBHI JPEG tiles in {e[0]['n_bags']} bags of up to {BAG_SIZE}: hash, decode (1 thread, overlapping "
            "the encoder), encode, write cache shards and one HDF5 per bag, into a fresh folder with an empty cache; best "
            f"of {s['repeats']} interleaved passes after a warm-up. CLI: one `histomil features extract <manifest> --precision "
            "fp32 --runtime R` process, wall seconds including start-up, model build and graph conversion.",
            "",
            "| runtime | tiles/s (best) | tiles/s (median) | vs torch | CPU s / 1k tiles | build s (in process) | CLI wall s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = next((r.get("tiles_per_s") for r in e if r["runtime"] == "torch"), None)
        for r in e:
            if r["status"] != "ok":
                lines.append(f"| {r['runtime']} | {r['status']} | | | | | |")
                continue
            ratio = f"{r['tiles_per_s'] / base:.2f}x" if base else "—"
            cli = fmt(r.get("cli_seconds"), 3) if "cli_status" not in r else r["cli_status"]
            lines.append(f"| {r['runtime']} | {fmt(r['tiles_per_s'])} | {fmt(r['tiles_per_s_median'])} | {ratio} | {fmt(r['cpu_s_per_1000_tiles'])} | "
                         f"{fmt(r.get('build_seconds'), 2)} | {cli} |")
    d = result["decision"]
    lines += ["", "## Decision", "", f"Rule: an alternative runtime must be >= {d.get('min_speedup')}x the best torch fp32 path "
              f"(here {d.get('best_torch_fp32')}, {fmt(d.get('best_torch_fp32_tiles_per_s'))} tiles/s) with features within "
              f"{result['tolerance']:.0e} of the feature scale. Result: "
              + (f"**{d['choice']}**: {d['reason']}." if d.get("choice") else f"none: {d['reason']}."), ""]
    return "\n".join(lines)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cpu_encoders.json", result)
    keys = ["model", "path", "precision", "status", "n_tiles", "batch_size", "tiles_per_s", "tiles_per_s_median",
            "cpu_s_per_1000_tiles", "build_seconds", "max_abs_diff", "feature_scale", "rel_max_abs_diff", "max_tile_rel_l2", "min_cosine",
            "within_tolerance", "speedup_vs_best_torch_fp32"]
    m = result["machine"]
    extra = {"cpu": m["cpu_model_name"], "cpu_capability": m["torch_cpu_capability"], "threads": result["settings"]["threads"],
             "loadavg_1": m["loadavg_1_5_15"][0]}

    def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[*columns, *extra], extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**{k: r.get(k, "") for k in columns}, **extra})

    write_csv(out / "cpu_encoders.csv", result["encoders"], keys)
    if result.get("extract"):
        write_csv(out / "cpu_encoders_extract.csv", result["extract"],
                  ["runtime", "precision", "status", "n_tiles", "n_bags", "tiles_per_s", "tiles_per_s_median", "cpu_s_per_1000_tiles",
                   "build_seconds", "cli_seconds"])
    write_text(out / "cpu_encoders.md", markdown(result))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="EBHI folder with tiles.csv (default ../shared/data/ebhi)")
    p.add_argument("--random", action="store_true", help="random uint8 tiles instead of EBHI (no end-to-end part)")
    p.add_argument("--tiles", type=int, default=None, help="tiles per fp32 pass (default 256; quick 8)")
    p.add_argument("--bf16-tiles", type=int, default=None, help="tiles per bf16 pass (default 16; quick 2)")
    p.add_argument("--vit-tiles", type=int, default=None, help="tiles per ViT pass, 0: no ViT rows (default 64 when timm imports; quick 0)")
    p.add_argument("--vit-bf16-tiles", type=int, default=16, help="tiles per ViT bf16 pass (default 16)")
    p.add_argument("--paths", nargs="+", default=None, help="encoder paths to run by name (torch fp32 eager always runs)")
    p.add_argument("--e2e-tiles", type=int, default=None, help="tiles for the end-to-end part, 0 skips it (default 256; quick 8)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default 64, the CLI default; quick 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed passes per path, best kept (default 3; quick 1)")
    p.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"], help="end-to-end runtimes")
    p.add_argument("--min-speedup", type=float, default=1.3)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling on 2 cores)")
    p.add_argument("--no-cli", action="store_true", help="skip the histomil features extract process runs")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny counts, no compile, no CLI, no ViT")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    a.tiles = a.tiles or (8 if q else 256)
    a.bf16_tiles = a.bf16_tiles or (2 if q else 16)
    a.batch_size = a.batch_size or (4 if q else 64)
    a.repeats = a.repeats or (1 if q else 3)
    a.e2e_tiles = (8 if q else 256) if a.e2e_tiles is None else a.e2e_tiles
    a.no_compile = a.no_compile or q
    a.no_cli = a.no_cli or q
    if a.vit_tiles is None:
        try:
            import timm  # noqa: F401

            a.vit_tiles = 0 if q else 64
        except ImportError:
            a.vit_tiles = 0
    torch.set_num_threads(a.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    mach = {**machine(), **cpu_description()}
    if a.random:
        pixels = np.random.default_rng(a.seed).integers(0, 256, (a.tiles, 224, 224, 3), dtype=np.uint8)
        tiles, source = [], f"{a.tiles} random uint8 tiles, 224x224"
    else:
        from histomil.data.images import read_rgb
        from histomil.errors import HistomilError

        try:
            tiles = pick_tiles(a.data, max(a.tiles, a.e2e_tiles), a.seed)
        except HistomilError as exc:
            raise SystemExit(f"{exc} (or use --random)") from None
        pixels = np.stack([read_rgb(t) for t in tiles[: a.tiles]])
        source = f"{a.tiles} real EBHI tiles ({pixels.shape[1]}x{pixels.shape[2]}, distinct, seed {a.seed})"
    from histomil.features.runtimes import FEATURE_TOLERANCE

    result: dict[str, Any] = {
        "argv": argv,
        "machine": mach,
        "versions": versions(),
        "tolerance": FEATURE_TOLERANCE,
        "settings": {"tile_source": source, "tiles": a.tiles, "bf16_tiles": a.bf16_tiles, "vit_tiles": a.vit_tiles,
                     "vit_bf16_tiles": a.vit_bf16_tiles,
                     "e2e_tiles": 0 if a.random else a.e2e_tiles, "batch_size": a.batch_size, "threads": a.threads,
                     "repeats": a.repeats, "compile": not a.no_compile},
        "timm": ("timm vit_small_patch16_224, random weights (the encoder registry has no ViT yet)" if a.vit_tiles
                 else "no ViT row (timm not installed, or --vit-tiles 0)"),
    }
    result["encoders"] = bench_encoders(a, pixels, log)
    result["decision"] = decide(result["encoders"], a.min_speedup)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(a.out, result)
    if tiles and a.e2e_tiles > 0:
        result["extract"] = bench_extract(a, tiles[: a.e2e_tiles], log)
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        write_outputs(a.out, result)
    log(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
