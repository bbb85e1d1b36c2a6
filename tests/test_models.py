"""Attention MIL layers, ABMIL and the model registry."""

from __future__ import annotations

import pytest
import torch

from histomil.errors import HistomilError
from histomil.models.base import MILOutput
from histomil.models.layers import AttentionPool, masked_softmax
from histomil.models.registry import MODELS, build_model, model_options

D = 12

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "gated_abmil", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, D, 2, embed_dim=16, attn_dim=8, **kw).eval()


# --- masked softmax ----------------------------------------------------------------------


def test_masked_softmax_matches_softmax_over_real_entries_and_zeroes_padding():
    scores = torch.tensor([[1.0, 2.0, 3.0, 50.0], [0.5, -1.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = masked_softmax(scores, mask, dim=-1)
    assert torch.allclose(w[0, :3], torch.softmax(scores[0, :3], dim=0))
    assert torch.allclose(w[1, :2], torch.softmax(scores[1, :2], dim=0))
    assert w[0, 3].item() == 0.0 and w[1, 2:].abs().sum().item() == 0.0
    assert torch.allclose(w.sum(-1), torch.ones(2))


def test_masked_softmax_fully_masked_bag_raises_not_nan():
    with pytest.raises(ValueError, match="fully masked"):
        masked_softmax(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


def test_masked_softmax_no_gradient_into_padding():
    scores = torch.randn(1, 4, requires_grad=True)
    w = masked_softmax(scores, torch.tensor([[True, True, False, False]]))
    (w * torch.arange(4.0)).sum().backward()
    assert scores.grad[0, 2:].abs().sum().item() == 0.0
    assert scores.grad[0, :2].abs().sum().item() > 0.0


# --- attention pooling -------------------------------------------------------------------


def test_gated_attention_matches_the_paper_formula():
    torch.manual_seed(1)
    pool = AttentionPool(D, attn_dim=5, gated=True).eval()
    h = torch.randn(2, 7, D)
    pooled, a = pool(h)
    ref_scores = pool.w(torch.tanh(pool.V(h)) * torch.sigmoid(pool.U(h))).squeeze(-1)
    ref_a = torch.softmax(ref_scores, dim=1)
    assert torch.allclose(a, ref_a, atol=1e-6)
    assert torch.allclose(pooled, (ref_a.unsqueeze(-1) * h).sum(1), atol=1e-6)


def test_plain_attention_has_no_gate_and_matches_formula():
    torch.manual_seed(2)
    pool = AttentionPool(D, attn_dim=5, gated=False).eval()
    assert pool.U is None
    h = torch.randn(1, 6, D)
    _, a = pool(h)
    ref = torch.softmax(pool.w(torch.tanh(pool.V(h))).squeeze(-1), dim=1)
    assert torch.allclose(a, ref, atol=1e-6)


# --- ABMIL invariances -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abmil", "gated_abmil"])
def test_output_invariant_to_tile_permutation(name):
    model = _model(name)
    x = torch.randn(1, 15, D)
    perm = torch.randperm(15)
    out, out_p = model(x), model(x[:, perm])
    assert isinstance(out, MILOutput)
    assert torch.allclose(out.logits, out_p.logits, atol=1e-5)
    assert torch.allclose(out.attention[0, perm], out_p.attention[0], atol=1e-6)


@pytest.mark.parametrize("name", ["abmil", "gated_abmil"])
def test_padded_bag_in_batch_equals_bag_alone(name):
    model = _model(name)
    short, long = torch.randn(5, D), torch.randn(11, D)
    x = torch.zeros(2, 11, D)
    x[0, :5], x[1] = short, long
    x[0, 5:] = 100.0  # garbage in the padding must not matter
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, :5] = True
    mask[1] = True
    batched = model(x, mask)
    alone_short, alone_long = model(short[None]), model(long[None])
    assert torch.allclose(batched.logits[0], alone_short.logits[0], atol=1e-5)
    assert torch.allclose(batched.logits[1], alone_long.logits[0], atol=1e-5)
    assert torch.allclose(batched.attention[0, :5], alone_short.attention[0], atol=1e-6)
    assert batched.attention[0, 5:].abs().sum().item() == 0.0
    assert torch.allclose(batched.attention.sum(1), torch.ones(2), atol=1e-6)


def test_one_tile_bag_gets_all_attention():
    out = _model()(torch.randn(1, 1, D))
    assert out.attention.shape == (1, 1)
    assert out.attention.item() == pytest.approx(1.0)
    assert torch.isfinite(out.logits).all()


def test_fully_masked_bag_is_a_clear_error():
    with pytest.raises(ValueError, match="no tiles"):
        _model()(torch.randn(2, 4, D), torch.tensor([[True] * 4, [False] * 4]))


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = _model(dropout=0.5)
    x = torch.randn(3, 9, D)
    a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)
    model.train()
    torch.manual_seed(5)
    c = model(x)
    torch.manual_seed(6)
    d = model(x)
    assert not torch.equal(c.logits, d.logits)


def test_shapes_classes_and_no_embedding_option():
    model = build_model("abmil", D, 3, embed_dim=None, attn_dim=4).eval()
    out = model(torch.randn(4, 6, D))
    assert out.logits.shape == (4, 3) and out.attention.shape == (4, 6)
    assert out.extras["bag_embedding"].shape == (4, D)  # pooled raw features when embed_dim=None
    assert torch.allclose(out.probs.sum(-1), torch.ones(4), atol=1e-6)


def test_gradients_reach_every_parameter():
    model = _model().train()
    model(torch.randn(2, 5, D)).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


# --- registry ----------------------------------------------------------------------------


def test_registry_names_and_gating():
    assert {"abmil", "gated_abmil"} <= set(MODELS)
    assert build_model("gated_abmil", D).pool.U is not None
    assert build_model("abmil", D).pool.U is None
    opts = model_options("gated_abmil")
    assert opts["gated"] is True and opts["embed_dim"] == 512 and opts["dropout"] == 0.25


def test_registry_unknown_name_lists_valid_models():
    with pytest.raises(HistomilError, match="unknown model 'clam_xl'.*abmil.*gated_abmil"):
        build_model("clam_xl", D)


def test_registry_unknown_option_lists_valid_options():
    with pytest.raises(HistomilError, match="unknown option.*hidden.*valid options.*attn_dim"):
        build_model("abmil", D, hidden=3)


def test_registry_bad_option_value_is_histomil_error():
    with pytest.raises(HistomilError, match="dropout"):
        build_model("abmil", D, dropout=1.5)
