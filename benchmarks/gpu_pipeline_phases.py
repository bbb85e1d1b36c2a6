"""Where the extraction pipeline's time goes on a GPU machine (RESULTS.md section 7): per 640-tile pass of
``extract_bags`` with EfficientNet-Lite0 (bf16, 8 decoding threads), the seconds spent hashing the tile
files, decoding + encoding them and writing the feature files; then the encoder and its preprocessing
alone, and a cProfile of one pass (main thread).

    PYTHONPATH=src python benchmarks/gpu_pipeline_phases.py DATA     # DATA: an EBHI folder with tiles.csv

Each phase is timed with the GPU synchronised around it (so the total is a little above gpu.py's).
"""

from __future__ import annotations

import cProfile
import collections
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pick_tiles  # noqa: E402

import histomil.features.extract as ex  # noqa: E402
from histomil.data.bags import Bag  # noqa: E402
from histomil.data.images import read_rgb  # noqa: E402
from histomil.features.cache import FeatureCache  # noqa: E402
from histomil.features.encoders import build_encoder  # noqa: E402

PHASES = ("tile_digests", "encode_into_cache", "write_feature_bag")
SECONDS: dict[str, float] = collections.defaultdict(float)


def clocked(name: str) -> None:
    """Replace ``histomil.features.extract.<name>`` by a version that adds its synchronised time to SECONDS."""
    fn = getattr(ex, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        SECONDS[name] += time.perf_counter() - t0
        return out

    setattr(ex, name, wrapper)


def main(data: Path, n_tiles: int = 640, batch: int = 256, workers: int = 8) -> None:
    for name in PHASES:
        clocked(name)
    encoder = build_encoder("efficientnet_lite0", precision="bf16", channels_last=True, device="cuda")
    paths = pick_tiles(data, n_tiles, 0)
    bags = [Bag(f"bag{i // 40:04d}", tuple(paths[i : i + 40]), (i // 40) % 2) for i in range(0, len(paths), 40)]

    def one_pass() -> float:
        tmp = Path(tempfile.mkdtemp())
        try:
            cache = FeatureCache.for_encoder(tmp / "cache", encoder)
            t0 = time.perf_counter()
            ex.extract_bags(bags, tmp / "features", encoder, cache, batch, workers)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp)

    one_pass()
    SECONDS.clear()
    total = sum(one_pass() for _ in range(3)) / 3
    print(f"total per pass {total:.3f} s;", ", ".join(f"{k} {v / 3:.3f} s" for k, v in SECONDS.items()))
    tiles = np.stack([read_rgb(p) for p in paths])
    encoder.encode(tiles, batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    encoder.encode(tiles, batch)
    torch.cuda.synchronize()
    print(f"encode only {time.perf_counter() - t0:.3f} s")
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch):
        encoder.preprocess(tiles[i : i + batch])
    torch.cuda.synchronize()
    print(f"preprocess only {time.perf_counter() - t0:.3f} s")
    profile = cProfile.Profile()
    profile.runcall(one_pass)
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
