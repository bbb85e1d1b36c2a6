"""The contract every MIL model in histomil follows.

A model takes a batch of bags as a padded tensor ``x`` of shape (B, N, D) plus a boolean ``mask``
of shape (B, N) that is True for real tiles and False for padding, and returns a :class:`MILOutput`.
Bags are classified into ``n_classes`` classes with a softmax head (binary = 2 classes), so
``probs[:, 1]`` is the probability of the positive class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of B bags of (padded) size N."""

    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor | None = None  # (B, N) per-tile weights; 0 on padding
    instance_scores: torch.Tensor | None = None  # (B, N) or (B, N, C) per-tile scores, if the model has them
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # model-specific (e.g. auxiliary losses)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)
