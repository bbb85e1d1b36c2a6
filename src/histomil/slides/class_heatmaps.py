"""Class-wise attention: which tiles speak for each class of a multi-class model, and their heatmaps.

Two definitions, by model:

* **CLAM-MB** (``clam_mb``): each class has its own attention branch (Lu et al. 2021); the map of
  class c is that branch's attention (:meth:`histomil.models.clam.CLAM.branch_attention`).
* **every other model**: the bag attention times each tile's class score, where a tile's class score is
  the model's probability of class c for a bag made of that tile alone. Attention says where the model
  looked; the class score says for which class that tile speaks (as CLAM's heatmaps weigh attention by
  the class probability). Models without attention use the class score alone.

:func:`class_scores` computes the (C, N) maps of one bag; :func:`write_class_heatmaps` paints one slide
heatmap per class (:func:`histomil.slides.heatmap.write_slide_heatmap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.models.clam import CLAM
from histomil.slides.heatmap import write_slide_heatmap
from histomil.slides.tiling import TilingSpec
from histomil.training.task_base import Task


@torch.no_grad()
def class_scores(model: nn.Module, bag: FeatureBag, task: Task, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, str]:
    """``(class probabilities (C,), per-class tile scores (C, N), what the scores are)`` of one bag."""
    from histomil.training.trainer import predict

    if task.name != "classification":
        raise HistomilError(f"bag {bag.bag_id}: class-wise heatmaps need a classification model, not {task.name}")
    (probs, attention), = predict(model, [bag], task=task)
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)).to(device)
    model.eval()
    if isinstance(model, CLAM) and model.multi_branch:
        return probs, model.branch_attention(x[None])[0].double().cpu().numpy(), "class attention branch (CLAM-MB)"
    tile_probs = np.concatenate([task.predict(model(x[i:i + batch_size, None, :], None).logits.double())
                                 for i in range(0, x.shape[0], batch_size)])  # (N, C): each tile as a bag of one
    if attention is None or not np.isfinite(attention).all():
        return probs, tile_probs.T, "class score of the tile alone"
    return probs, (np.asarray(attention, dtype=np.float64)[:, None] * tile_probs).T, "attention x class score"


def write_class_heatmaps(
    slide_path: str | Path,
    bag: FeatureBag,
    model: nn.Module,
    task: Task,
    out_dir: str | Path,
    class_names: Sequence[str] | None = None,
    spec: TilingSpec | None = None,
) -> list[Path]:
    """One heatmap PNG per class of ``bag`` (a slide's features, with coordinates) over ``slide_path``:
    ``<out_dir>/<bag_id>_class-<name>.png``; returns their paths."""
    if bag.coords is None:
        raise HistomilError(f"bag {bag.bag_id}: no tile coordinates, so no slide heatmap")
    probs, scores, kind = class_scores(model, bag, task)
    names = list(class_names) if class_names else [str(c) for c in range(scores.shape[0])]
    if len(names) != scores.shape[0]:
        raise HistomilError(f"{len(names)} class names for a model of {scores.shape[0]} classes")
    paths = []
    for c, name in enumerate(names):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        png, _ = write_slide_heatmap(slide_path, bag.coords, scores[c], Path(out_dir) / f"{bag.bag_id}_class-{safe}.png",
                                     bag=bag, spec=spec, title=f"{bag.bag_id}: {name} (p = {probs[c]:.3f})", label=kind)
        paths.append(png)
    return paths
