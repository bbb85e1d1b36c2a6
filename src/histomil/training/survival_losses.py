"""Survival losses for MIL heads: Cox partial likelihood and the discrete-time hazard likelihood.

**Cox** (:func:`cox_loss`): the model outputs one number per bag, its log hazard ratio (risk). The
loss is the negative log partial likelihood over the bags *of one batch*, divided by the batch's
number of events. Tied event times use **Efron's** approximation by default (``ties="breslow"`` is the
cruder one); both agree with scikit-survival's ``CoxPHOptimizer`` (tests). The partial likelihood
compares each event with the bags still at risk, so one batch must hold several bags:

* ``batch_size`` in the training config is the number of bags per optimizer step; a Cox task refuses
  fewer than 2. The memory of a step grows linearly with it: the padded bags and the per-tile hidden
  layers, ``batch_size x max_tiles x (in_dim + hidden) x 4`` bytes of forward activations
  (:func:`batch_memory_bytes`; gated ABMIL's default hidden widths 512 + 2 x 128 = 768), e.g. 32 bags x 40
  tiles x (1280 + 768) floats = 10.5 MB, about twice that with the gradients; the risk-set matrix is
  only ``batch_size^2``. Slide-sized bags (10,000 tiles) make the same batch 2.6 GB.
* A batch without any event has no term in the partial likelihood: its loss is 0 (with a gradient of
  zeros), so it is **skipped**, not an error. With censoring c and batch size B that happens with
  probability about c^B (0.3^16 = 4e-9), so it matters only for tiny batches.

**Discrete time** (:func:`discrete_hazard_loss`, Zadeh & Schmid 2020; Chen et al. 2021): the model
outputs ``n_bins`` logits, the hazard of each time bin is their sigmoid, and the bins are cut at
quantiles of the training event times (:func:`time_bins`). A bag with an event in bin k contributes
``-log S(k-1) - log h(k)``, a bag censored in bin k ``-log S(k)`` (it survived bin k), where
``S(k) = prod_{j<=k} (1 - h(j))``. Its risk for ranking is minus the expected number of bins
survived, ``-sum_k S(k)`` (:func:`discrete_risk`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from histomil.errors import HistomilError

Ties = Literal["efron", "breslow"]


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: Ties = "efron") -> torch.Tensor:
    """Negative log Cox partial likelihood of ``risk`` (B,) per event; 0 for a batch without events.

    ``time`` (B,) follow-up times, ``event`` (B,) 1 = event, 0 = censored. Computed with a B x B
    risk-set mask and log-sum-exp, so it is exact and stable for any risk scale.
    """
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    ev = event.reshape(-1).to(torch.bool)
    if not (risk.shape == time.shape == ev.shape):
        raise HistomilError(f"Cox loss: {risk.numel()} risks, {time.numel()} times, {ev.numel()} events")
    if ties not in ("efron", "breslow"):
        raise HistomilError(f"Cox loss: ties must be 'efron' or 'breslow', not {ties!r}")
    n_events = int(ev.sum())
    if n_events == 0:
        return risk.sum() * 0.0  # no event: no term; keeps the graph so backward() works
    t_ev, r_ev = time[ev], risk[ev]
    at_risk = time.unsqueeze(0) >= t_ev.unsqueeze(1)  # (E, B): bag j still at risk at event i's time
    log_w = torch.zeros(at_risk.shape, dtype=risk.dtype, device=risk.device).masked_fill(~at_risk, -torch.inf)
    if ties == "efron":
        # events tied with event i: weight 1 - l/d (l = i's rank among its d tied events) inside the risk set
        tied = (time.unsqueeze(0) == t_ev.unsqueeze(1)) & ev.unsqueeze(0)  # (E, B)
        d = tied.sum(dim=1, keepdim=True).to(risk.dtype)
        same = t_ev.unsqueeze(0) == t_ev.unsqueeze(1)  # (E, E) tied events
        rank = torch.tril(same.to(risk.dtype), diagonal=-1).sum(dim=1, keepdim=True)  # 0..d-1 in input order
        frac = torch.where(tied, torch.log1p(-rank / d).expand_as(tied), torch.zeros_like(log_w))
        log_w = log_w + frac
    log_denominator = torch.logsumexp(risk.unsqueeze(0) + log_w, dim=1)
    return -(r_ev - log_denominator).sum() / n_events


def time_bins(train_time: np.ndarray, train_event: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins - 1,) at quantiles of the training event times; bin k holds times in
    [edge k-1, edge k), the first from 0 and the last to infinity. Too few distinct event times for
    ``n_bins`` is one error line."""
    if n_bins < 2:
        raise HistomilError(f"discrete-time survival needs at least 2 time bins, got {n_bins}")
    events = np.asarray(train_time, dtype=np.float64)[np.asarray(train_event).astype(bool)]
    if events.size == 0:
        raise HistomilError("discrete-time survival: the training bags hold no event to place time bins")
    edges = np.unique(np.quantile(events, np.arange(1, n_bins) / n_bins))
    if edges.size != n_bins - 1:
        raise HistomilError(
            f"discrete-time survival: {n_bins} time bins need {n_bins} distinct event-time quantiles; "
            f"the training bags give {edges.size + 1} (use fewer bins)"
        )
    return edges


def bin_index(time: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin (0..n_bins-1) of each time, for inner ``edges`` from :func:`time_bins`."""
    return torch.bucketize(time.contiguous(), edges.to(time.dtype).contiguous(), right=True)


def discrete_hazard_loss(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean negative log likelihood of the discrete-time hazard model (see the module docstring).

    ``logits`` (B, n_bins) hazard logits; ``edges`` (n_bins - 1,) inner bin edges.
    """
    if logits.dim() != 2 or logits.shape[1] != edges.numel() + 1:
        raise HistomilError(f"discrete-time loss: logits of shape {tuple(logits.shape)} for {edges.numel() + 1} bins")
    k = bin_index(time.reshape(-1).to(logits.dtype), edges).unsqueeze(1)  # (B, 1)
    ev = event.reshape(-1).to(logits.dtype).unsqueeze(1)
    log_h = F.logsigmoid(logits)  # log hazard of each bin
    log_1mh = F.logsigmoid(-logits)  # log(1 - hazard)
    log_s = torch.cumsum(log_1mh, dim=1)  # log S(k) = survived bins 0..k
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # log S(k-1), S(-1) = 1
    uncensored = log_s_prev.gather(1, k) + log_h.gather(1, k)
    censored = log_s.gather(1, k)
    return -(ev * uncensored + (1 - ev) * censored).mean()


def discrete_survival(logits: torch.Tensor) -> torch.Tensor:
    """S(k) for each bin k (B, n_bins): the probability of surviving bins 0..k."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def discrete_risk(logits: torch.Tensor) -> torch.Tensor:
    """A risk score per bag (B,), higher = earlier: minus the expected number of bins survived."""
    return -discrete_survival(logits).sum(dim=1)


def batch_memory_bytes(batch_size: int, max_tiles: int, in_dim: int, hidden: int = 768) -> int:
    """Forward activation memory (fp32 bytes) of one step on ``batch_size`` bags padded to ``max_tiles``
    tiles: the features and ``hidden`` per-tile hidden units (gated ABMIL: 512 + 2 x 128), plus the Cox
    risk-set matrix (batch_size^2). An estimate for choosing ``batch_size``; gradients about double it."""
    return 4 * (batch_size * max_tiles * (in_dim + hidden) + batch_size * batch_size)
