"""A seed ensemble: several trained MIL models whose class probabilities are averaged.

One training run is one draw. On the EBHI witness study (benchmarks/RESULTS.md section 11) two seeds of
the same recipe reached 0.99 at W = 1 while the third called half of the negative bags positive with
ROC-AUC 1.0; the mean of the three models' probabilities gave 1.000 / 1.000 / 1.000 / 0.995. With label
smoothing the members' probabilities are bounded, so a single confidently wrong member is outvoted.

The ensemble is an ordinary MIL model (``forward(x, mask) -> MILOutput``): its logits are the log of
the mean probability (so a softmax gives the mean back) and its attention the members' mean attention
(each sums to 1 over a bag, so the mean does too). ``histomil ensemble`` builds one from trained
checkpoints; evaluate, predict, heatmaps and reports then use it like any other model.
"""

from __future__ import annotations

import torch
from torch import nn

from histomil.models.base import MILOutput


class MeanProbabilityEnsemble(nn.Module):
    """Average the class probabilities (and attention) of ``members``, all taking the same features."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        dims = {int(getattr(m, "in_dim", -1)) for m in members}
        classes = {int(getattr(m, "n_classes", -1)) for m in members}
        if len(dims) != 1 or len(classes) != 1:
            raise ValueError(f"ensemble members differ in feature dimension {sorted(dims)} or classes {sorted(classes)}")
        self.members = nn.ModuleList(members)
        self.in_dim, self.n_classes = dims.pop(), classes.pop()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        outs = [m(x, mask) for m in self.members]
        probs = torch.stack([torch.softmax(o.logits.float(), dim=-1) for o in outs]).mean(0)
        attention = None
        if all(o.attention is not None for o in outs):
            attention = torch.stack([o.attention.float() for o in outs]).mean(0)  # type: ignore[union-attr]
        return MILOutput(logits=torch.log(probs.clamp_min(1e-30)), attention=attention)
