"""Tiny end-to-end runs for the protocol and report tests: a fast stand-in encoder and a 2-fold
cross-validation config on the example tiles (the real encoder is exercised by test_pipeline)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from histomil.features.encoders import EncoderInfo, TileEncoder
from histomil.resources import example_tile_table

FAST_ENCODER = "test_colour_stats"  # registered by the ``fast_encoder`` fixture (conftest.py)


class ColourStats(nn.Module):
    """A fast stand-in encoder: mean and variance of each colour on a 4x4 grid."""

    num_features = 96

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.cat([mean, F.adaptive_avg_pool2d(x * x, 4).flatten(1) - mean**2], dim=1)


def colour_stats_encoder(pretrained: bool = True, precision: str = "fp32", channels_last: bool = False) -> TileEncoder:
    info = EncoderInfo(name=FAST_ENCODER, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=96)
    return TileEncoder(ColourStats(), info, precision=precision, channels_last=channels_last).eval()


TINY_CROSSVAL = {
    "columns": {"path": "path", "label": "tumor", "patient": "case_id", "split": "split"},  # split 'test' = held out
    "folds": 2,
    "val_fraction": 0.3,
    "seeds": [0],
    "study": {
        "bag_size": 10, "train_bags": 12, "val_bags": 8, "test_bags": 8,
        "train_witnesses": [1, 5], "val_witnesses": [1, 5], "test_witnesses": [5, 1],
    },
    # a fast encoder keeps the whole run to seconds
    "features": {"encoder": FAST_ENCODER, "precision": "fp32", "batch_size": 64, "workers": 0},
    "train": {"epochs": 2, "min_epochs": 1, "batch_size": 4, "lr": 0.001},
    "threshold": {"rule": "youden"},
    "bootstrap_resamples": 200,
}


def write_tiny_crossval_config(path: Path) -> Path:
    """``TINY_CROSSVAL`` on the example tile table, written as YAML to ``path``."""
    path.write_text(yaml.safe_dump({"tiles": str(example_tile_table()), **TINY_CROSSVAL}))
    return path
