"""DSMIL: dual-stream MIL (Li, Li & Eliceiri 2021, CVPR), written from the paper.

* Max-instance stream: a linear instance classifier scores every tile for every class; the
  stream's score for class c is the max over real tiles and its argmax is the critical instance m_c.
* Bag stream: queries q_k = Linear-Tanh-Linear(h_k) (dim 128) and values v_k = Linear(h_k). For
  each class c, attention A_kc = softmax_k(<q_k, q_{m_c}> / sqrt(128)) (distance to the critical
  instance), bag embedding B_c = sum_k A_kc v_k, and a Conv1d over the class rows of B (classes as
  channels, kernel = embedding width, as in the paper) gives the bag-stream scores.
* Logits = 0.5 * (max-instance scores + bag-stream scores).

Training deviation: the paper sums one loss per stream; here the trainer's cross-entropy is on
the averaged logits (both streams still get gradient), which keeps class-weighted losses uniform
across models.

``attention`` is column A[:, c] for the heatmap class c (class 1 when binary, else the predicted
class); ``instance_scores`` are the instance classifier's logits (B, N, C).
"""

from __future__ import annotations

import torch
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.layers import masked_softmax
from histomil.models.pooling import check_bags, check_dropout, heatmap_class, masked_max


class DSMIL(nn.Module):
    """Dual-stream MIL: ``forward(x (B, N, D), mask (B, N) | None) -> MILOutput``."""

    permutation_invariant = True

    def __init__(
        self, in_dim: int, n_classes: int = 2, q_dim: int = 128, v_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1 or q_dim < 1 or (v_dim is not None and v_dim < 1):
            raise ValueError("in_dim, q_dim and v_dim must be >= 1 and n_classes (outputs: classes, or 1 for a value or risk) >= 1")
        check_dropout(dropout)
        v_dim = in_dim if v_dim is None else v_dim
        self.in_dim, self.n_classes, self.q_dim = in_dim, n_classes, q_dim
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(in_dim, q_dim), nn.Tanh(), nn.Linear(q_dim, q_dim))
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, v_dim))
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=v_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        inst = self.instance_classifier(x)  # (B, N, C)
        max_scores = masked_max(inst, mask)  # (B, C)
        critical = inst.detach().masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)  # (B, C)
        q = self.query(x)  # (B, N, Q)
        v = self.value(x)  # (B, N, V)
        q_crit = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        sim = torch.bmm(q_crit, q.transpose(1, 2)) / self.q_dim**0.5  # (B, C, N)
        attn = masked_softmax(sim, mask.unsqueeze(1).expand_as(sim), dim=-1)
        bag_emb = torch.bmm(attn, v)  # (B, C, V)
        bag_scores = self.bag_classifier(bag_emb).squeeze(-1)  # (B, C)
        logits = 0.5 * (max_scores + bag_scores)
        cls = heatmap_class(logits)
        attention = attn.gather(1, cls.view(-1, 1, 1).expand(-1, 1, attn.shape[2])).squeeze(1)
        extras = {"max_scores": max_scores, "bag_scores": bag_scores, "bag_embedding": bag_emb}
        return MILOutput(logits=logits, attention=attention, instance_scores=inst, extras=extras)
