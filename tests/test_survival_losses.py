"""Cox partial likelihood (Efron and Breslow ties) and the discrete-time hazard loss: hand-computed
values, scikit-survival's Cox likelihood, and batches without events."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.linear_model.coxph import CoxPHOptimizer

from histomil.errors import HistomilError
from histomil.training.survival_losses import (
    bin_index,
    cox_loss,
    discrete_hazard_loss,
    discrete_risk,
    discrete_survival,
    time_bins,
)


def test_cox_loss_hand_computed_ties() -> None:
    # two events tied at t=1 (risks 0 and ln 2, i.e. hazards 1 and 2), one bag censored at t=2 (hazard 1).
    # Breslow: log L = (0 + ln2) - 2 ln(1 + 2 + 1) = -3 ln2; per event 3 ln2 / 2.
    # Efron: log L = ln2 - ln 4 - ln(4 - 3/2) = ln 0.2; per event ln5 / 2.
    risk = torch.tensor([0.0, math.log(2.0), 0.0], dtype=torch.float64)
    time = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    event = torch.tensor([1, 1, 0])
    assert float(cox_loss(risk, time, event, "breslow")) == pytest.approx(3 * math.log(2) / 2)
    assert float(cox_loss(risk, time, event, "efron")) == pytest.approx(math.log(5) / 2)
    # the order of the bags does not matter
    perm = torch.tensor([2, 0, 1])
    assert float(cox_loss(risk[perm], time[perm], event[perm])) == pytest.approx(math.log(5) / 2)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_loss_matches_scikit_survival(ties: str) -> None:
    rng = np.random.default_rng(3)
    n = 40
    x = rng.normal(size=(n, 2))
    time = rng.integers(1, 8, n).astype(float)  # many tied times
    event = rng.random(n) < 0.7
    w = np.array([0.8, -0.5])
    # scikit-survival averages over all samples; cox_loss over events
    expected = CoxPHOptimizer(x, event, time, np.zeros(2), ties).nlog_likelihood(w) * n / event.sum()
    got = cox_loss(torch.from_numpy(x @ w), torch.from_numpy(time), torch.from_numpy(event), ties)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_cox_loss_gradient_and_no_event_batch() -> None:
    risk = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    time = torch.tensor([1.0, 2.0, 3.0])
    loss = cox_loss(risk, time, torch.tensor([0, 0, 0]))
    assert float(loss.detach()) == 0.0  # no event: no term, the batch is skipped
    loss.backward()
    assert risk.grad is not None and torch.all(risk.grad == 0)
    risk.grad = None
    cox_loss(risk, time, torch.tensor([1, 0, 0])).backward()
    # d/dr_0 of -(r_0 - log sum exp r) = softmax_0 - 1 < 0: the loss pushes the event's risk up
    assert float(risk.grad[0]) < 0 and float(risk.grad[1]) > 0 and float(risk.grad[2]) > 0
    with pytest.raises(HistomilError, match="ties"):
        cox_loss(risk, time, torch.tensor([1, 0, 0]), "exact")  # type: ignore[arg-type]


def test_discrete_hazard_loss_hand_computed() -> None:
    edges = torch.tensor([1.0])  # bins [0, 1) and [1, inf)
    logits = torch.zeros(3, 2)  # every hazard 1/2
    time = torch.tensor([0.5, 1.5, 2.0])
    event = torch.tensor([1, 0, 1])
    # event in bin 0: -log h0 = ln2; censored in bin 1: -log S(1) = 2 ln2; event in bin 1: -log S(0) - log h1 = 2 ln2
    assert float(discrete_hazard_loss(logits, time, event, edges)) == pytest.approx(5 * math.log(2) / 3)
    assert bin_index(time, edges).tolist() == [0, 1, 1]
    assert discrete_survival(logits)[0].tolist() == pytest.approx([0.5, 0.25])
    # a larger hazard in the first bin means less expected survival, so more risk
    risky = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    r = discrete_risk(risky)
    assert float(r[0]) > float(r[1])


def test_time_bins_from_training_event_quantiles() -> None:
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100, 200], dtype=float)
    event = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    # the censored times 100 and 200 do not move the edges: quartiles of 1..8
    assert time_bins(time, event, 4).tolist() == pytest.approx(np.quantile(np.arange(1, 9), [0.25, 0.5, 0.75]).tolist())
    with pytest.raises(HistomilError, match="no event"):
        time_bins(time, np.zeros(10), 4)
    with pytest.raises(HistomilError, match="fewer bins"):
        time_bins(np.array([1.0, 1.0, 1.0, 2.0]), np.ones(4), 4)


def test_batch_memory_grows_with_bags_per_step() -> None:
    from histomil.training.survival_losses import batch_memory_bytes

    # 32 bags x 40 tiles x (1280 features + 768 hidden) floats + the 32 x 32 risk-set matrix
    assert batch_memory_bytes(32, 40, 1280) == 4 * (32 * 40 * 2048 + 32 * 32)
    assert batch_memory_bytes(64, 40, 1280) > 1.99 * batch_memory_bytes(32, 40, 1280)
