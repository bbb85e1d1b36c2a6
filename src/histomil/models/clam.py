"""CLAM: clustering-constrained attention MIL (Lu et al. 2021, Nature Biomedical Engineering).

Written from the paper (not from the GPL reference code):

* fc: Linear(D, 512) + ReLU + Dropout turns frozen tile features into embeddings h_k.
* Gated attention network (512 -> 256) with one branch (CLAM-SB) or one branch per class
  (CLAM-MB). SB: one attention-pooled bag embedding and a linear classifier over the classes.
  MB: class c pools its own embedding z_c with its own attention and a per-class linear layer
  gives logit c.
* Instance-level clustering: one binary instance classifier per class. For a bag of class y, the
  k most attended tiles (of branch y) are pseudo-labelled positive and the k least attended
  negative for instance classifier y. With ``mutually_exclusive`` (the paper's subtyping
  setting, default) the k most attended tiles of every other class c's branch (SB: the single
  branch) are also pseudo-labelled negative for instance classifier c.
* Instance loss: smooth top-1 SVM (Berrada et al. 2018, alpha = 1, tau = 1), as in the paper, or
  cross-entropy (``instance_loss="ce"``). Total loss = 0.7 * bag loss + 0.3 * instance loss.

The instance loss needs the bag label, so ``forward(x, mask, y)`` accepts labels; when ``y`` is
given the model returns ``extras["aux_loss"] = (1 - bag_weight) * instance_loss`` and
``extras["loss_weight_bag"] = bag_weight``, which the trainer uses as
``loss = loss_weight_bag * CE(logits, y) + aux_loss``.

k is capped per bag at half its real tiles for the in-class top/bottom split (so the two sets
never overlap) and at its real tiles for the out-of-class top-k; a one-tile bag has no in-class
pair and only contributes out-of-class terms. Padding never enters top-k.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.layers import masked_softmax
from histomil.models.pooling import check_bags, check_dropout, heatmap_class


def smooth_svm_loss(scores: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), averaged over rows.

    L = tau * log sum_j exp((alpha * [j != y] + s_j) / tau) - s_y, i.e. tau * CE((s + margin) / tau).
    """
    margin = alpha * (1.0 - F.one_hot(target, scores.shape[-1]).to(scores.dtype))
    return tau * F.cross_entropy((scores + margin) / tau, target)


class GatedAttentionBranches(nn.Module):
    """Gated attention scores for ``n_branches`` branches: w_b^T (tanh(V h) * sigmoid(U h))."""

    def __init__(self, dim: int, attn_dim: int, n_branches: int, dropout: float) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.V(h) * self.U(h))  # (B, N, n_branches)


class CLAM(nn.Module):
    """CLAM-SB (``multi_branch=False``) or CLAM-MB; ``forward(x, mask=None, y=None) -> MILOutput``.

    ``attention``: SB's single branch, MB's branch of the heatmap class (class 1 when binary, else
    the predicted class). ``instance_scores`` (B, N, C): each class's instance classifier logit
    for "positive cluster" minus "negative cluster".
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        multi_branch: bool = False,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        instance_loss: Literal["svm", "ce"] = "svm",
        mutually_exclusive: bool = True,
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2 or embed_dim < 1 or attn_dim < 1 or k_sample < 1:
            raise ValueError("in_dim, embed_dim, attn_dim and k_sample must be >= 1 and n_classes >= 2")
        check_dropout(dropout)
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"instance_loss must be 'svm' or 'ce', got {instance_loss!r}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.multi_branch = multi_branch
        self.k_sample, self.bag_weight = k_sample, bag_weight
        self.instance_loss, self.mutually_exclusive = instance_loss, mutually_exclusive
        self.fc = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        n_branches = n_classes if multi_branch else 1
        self.attention = GatedAttentionBranches(embed_dim, attn_dim, n_branches, dropout)
        if multi_branch:  # one linear score per class, on that class's own pooled embedding
            self.bag_weight_vectors = nn.Parameter(torch.empty(n_classes, embed_dim))
            self.bag_bias = nn.Parameter(torch.zeros(n_classes))
            nn.init.kaiming_uniform_(self.bag_weight_vectors, a=5**0.5)  # as nn.Linear
            bound = 1.0 / embed_dim**0.5
            nn.init.uniform_(self.bag_bias, -bound, bound)
        else:
            self.classifier = nn.Linear(embed_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, y: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        h = self.fc(x)  # (B, N, E)
        raw = self.attention(h).transpose(1, 2)  # (B, K, N), K branches
        weights = masked_softmax(raw, mask.unsqueeze(1).expand_as(raw), dim=-1)
        pooled = torch.bmm(weights, h)  # (B, K, E)
        if self.multi_branch:
            logits = (pooled * self.bag_weight_vectors).sum(-1) + self.bag_bias
            cls = heatmap_class(logits)
            attention = weights.gather(1, cls.view(-1, 1, 1).expand(-1, 1, weights.shape[2])).squeeze(1)
        else:
            logits = self.classifier(pooled.squeeze(1))
            attention = weights.squeeze(1)
        inst = torch.stack([clf(h) for clf in self.instance_classifiers], dim=2)  # (B, N, C, 2)
        extras: dict[str, torch.Tensor] = {"bag_embedding": pooled.squeeze(1) if not self.multi_branch else pooled}
        if y is not None:
            inst_loss = self._instance_loss(raw, inst, mask, y.to(device=x.device, dtype=torch.long).view(-1))
            extras["instance_loss"] = inst_loss
            extras["aux_loss"] = (1.0 - self.bag_weight) * inst_loss
            extras["loss_weight_bag"] = torch.tensor(self.bag_weight, device=x.device)
        return MILOutput(logits=logits, attention=attention, instance_scores=inst[..., 1] - inst[..., 0], extras=extras)

    def branch_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, N) attention of each branch over the real tiles: K = n_classes for CLAM-MB (class-wise
        attention heatmaps), 1 for CLAM-SB."""
        mask = check_bags(x, mask)
        raw = self.attention(self.fc(x)).transpose(1, 2)
        return masked_softmax(raw, mask.unsqueeze(1).expand_as(raw), dim=-1)

    def _instance_loss(self, raw: torch.Tensor, inst: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over bags of the mean over supervised instance classifiers of the clustering loss."""
        if y.shape[0] != raw.shape[0]:
            raise ValueError(f"got {y.shape[0]} labels for {raw.shape[0]} bags")
        if bool(((y < 0) | (y >= self.n_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.n_classes - 1}]")
        per_bag = []
        for b in range(raw.shape[0]):
            real = mask[b].nonzero().squeeze(1)
            n = real.numel()
            label = int(y[b])
            terms = []
            for c in range(self.n_classes):
                branch = c if self.multi_branch else 0
                scores = raw[b, branch, real]
                logits_c = inst[b, real, c]  # (n, 2)
                if c == label:
                    k = min(self.k_sample, n // 2)
                    if k == 0:
                        continue
                    top = scores.topk(k).indices
                    bottom = (-scores).topk(k).indices
                    idx = torch.cat([top, bottom])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(raw.device)
                elif self.mutually_exclusive:
                    k = min(self.k_sample, n)
                    idx = scores.topk(k).indices
                    target = torch.zeros(k, dtype=torch.long, device=raw.device)
                else:
                    continue
                terms.append(self._loss(logits_c[idx], target))
            if terms:
                per_bag.append(torch.stack(terms).mean())
        if not per_bag:
            return raw.new_zeros(())
        return torch.stack(per_bag).mean()

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.instance_loss == "ce":
            return F.cross_entropy(logits, target)
        return smooth_svm_loss(logits, target)

