"""A seed ensemble: several trained MIL models whose class probabilities (or values) are averaged.

One training run is one draw. On the EBHI witness study (benchmarks/RESULTS.md section 11) two seeds of
the same recipe reached 0.99 at W = 1 while the third called half of the negative bags positive with
ROC-AUC 1.0; the mean of the three models' probabilities gave 1.000 / 1.000 / 1.000 / 0.995. With label
smoothing the members' probabilities are bounded, so a single confidently wrong member is outvoted.

The ensemble is an ordinary MIL model (``forward(x, mask) -> MILOutput``): its logits are the log of
the mean probability (so a softmax gives the mean back) and its attention the members' mean attention
(each sums to 1 over a bag, so the mean does too). ``histomil ensemble`` builds one from trained
checkpoints; evaluate, predict, heatmaps and reports then use it like any other model.

Regression members each output a standardised value that their own training mean and sd turn back
into target units, so :class:`MeanValueEnsemble` averages ``output_i * sd_i + mean_i`` (in target
units) and is saved with a regression task of mean 0 and sd 1: the usual prediction path returns that
mean unchanged.
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


class MeanValueEnsemble(nn.Module):
    """Average regression members' predictions in target units: ``mean_i(output_i * sds[i] + means[i])``.

    Each member was trained on its own standardised target, so raw outputs are not comparable; the
    members' (mean, sd) are buffers (float64, saved with the weights) and the output is in float64 so
    the ensemble equals the mean of the members' own predictions to rounding."""

    def __init__(self, members: list[nn.Module], means: list[float], sds: list[float]) -> None:
        super().__init__()
        if not members or len(means) != len(members) or len(sds) != len(members):
            raise ValueError(f"a value ensemble needs one mean and sd per member ({len(members)} members, "
                             f"{len(means)} means, {len(sds)} sds)")
        dims = {int(getattr(m, "in_dim", -1)) for m in members}
        if len(dims) != 1:
            raise ValueError(f"ensemble members differ in feature dimension {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.in_dim, self.n_classes = dims.pop(), 1
        self.register_buffer("means", torch.tensor([float(v) for v in means], dtype=torch.float64))
        self.register_buffer("sds", torch.tensor([float(v) for v in sds], dtype=torch.float64))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        outs = [m(x, mask) for m in self.members]
        values = torch.stack([o.logits.double()[:, :1] * self.sds[i] + self.means[i] for i, o in enumerate(outs)]).mean(0)
        attention = None
        if all(o.attention is not None for o in outs):
            attention = torch.stack([o.attention.float() for o in outs]).mean(0)  # type: ignore[union-attr]
        return MILOutput(logits=values, attention=attention)
