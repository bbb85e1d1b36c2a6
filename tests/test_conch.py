"""CONCH v1.5's image tower (histomil.features.conch): the checkpoint layout TRIDENT reads strictly, the
attentional pooler's arithmetic, the 448-px position embedding, and extraction from a checkpoint file
against a forward pass written out independently in this test.

The published weights are gated and nothing is downloaded: a tiny trunk (timm's ViT-Ti/16 with layer
scale) stands in for the ViT-L/16 in the extraction test; the ViT-L layout is checked on the meta device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from histomil.errors import HistomilError
from histomil.features.conch import AttentionalPooler, ConchVisionTower, positions_for_448
from histomil.features.encoders import build_encoder, timm_kwargs
from histomil.features.foundation import preset_encoder
from histomil.features.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

CONCH = PRESETS["conch_v15"]
#: the pooler and final norm of the checkpoint (TRIDENT's CONCHVisionTower), name -> shape
HEAD_LAYOUT = {
    "attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_q.weight": (768,), "attn_pool_contrast.ln_q.bias": (768,),
    "attn_pool_contrast.ln_k.weight": (1024,), "attn_pool_contrast.ln_k.bias": (1024,),
    "attn_pool_contrast.to_q.weight": (768, 768), "attn_pool_contrast.to_kv.weight": (1536, 1024),
    "attn_pool_contrast.to_out.weight": (768, 768), "ln_contrast.weight": (768,), "ln_contrast.bias": (768,),
}


def test_tower_has_the_checkpoints_layout_on_meta() -> None:
    with torch.device("meta"):
        tower = ConchVisionTower(timm.create_model(CONCH.arch, pretrained=False, **timm_kwargs(CONCH)))
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert {k: v for k, v in shapes.items() if not k.startswith("trunk.")} == HEAD_LAYOUT
    trunk = {k for k in shapes if k.startswith("trunk.")}
    assert len([k for k in trunk if k.endswith(".ls1.gamma")]) == 24  # ViT-L: 24 blocks with layer scale
    assert shapes["trunk.pos_embed"] == (1, 1 + 28 * 28, 1024) and shapes["trunk.patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert {"trunk.cls_token", "trunk.norm.weight", "trunk.blocks.23.attn.qkv.bias"} <= trunk
    assert not any(k.startswith(("trunk.head", "trunk.fc_norm", "trunk.reg_token")) for k in trunk)
    assert tower.dim == CONCH.dim == 768 and CONCH.input_size == 448


def test_pooler_is_multi_head_cross_attention_of_the_normed_query_over_the_normed_tokens() -> None:
    torch.manual_seed(0)
    pool = AttentionalPooler(d_model=32, context_dim=24, n_head=4, n_queries=1)
    with torch.no_grad():
        for ln in (pool.ln_q, pool.ln_k):
            ln.weight.normal_()
            ln.bias.normal_()
    tokens = torch.randn(3, 10, 24)
    mha = torch.nn.MultiheadAttention(32, 4, bias=False, kdim=24, vdim=24, batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(pool.to_q.weight)
        mha.k_proj_weight.copy_(pool.to_kv.weight[:32])
        mha.v_proj_weight.copy_(pool.to_kv.weight[32:])
        mha.out_proj.weight.copy_(pool.to_out.weight)
        query = pool.ln_q(pool.query).expand(3, -1, -1)
        ref, _ = mha(query, pool.ln_k(tokens), pool.ln_k(tokens), need_weights=False)
        got = pool(tokens)
    assert got.shape == (3, 1, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_position_embedding_for_448_px_tiles() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = positions_for_448(pos)
    assert out.shape == (1, 1 + 28 * 28, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0], atol=0, rtol=0)
    constant = positions_for_448(torch.full((1, 1 + 14 * 14, 8), 0.25))
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))  # interpolation keeps a constant grid
    # DINO's scale factor (28.1 / 14) samples the grid differently from resizing to 28 x 28
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (out[:, 1:] - by_size).abs().max() > 1e-3
    # another grid is first brought to 14 x 14 (bilinear), as the reference loader does
    big = torch.randn(1, 1 + 28 * 28, 8)
    small = F.interpolate(big[:, 1:].reshape(1, 28, 28, 8).permute(0, 3, 1, 2), size=(14, 14), mode="bilinear",
                          align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    torch.testing.assert_close(positions_for_448(big), positions_for_448(torch.cat([big[:, :1], small], 1)))
    with pytest.raises(ValueError, match="not a square grid"):
        positions_for_448(torch.randn(1, 1 + 15, 8))


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """CONCH v1.5's forward written out from the checkpoint's tensors: patch embedding, class token, the
    14 x 14 position grid upsampled to 28 x 28 at the forward pass (bicubic, scale factor 28.1 / 14),
    pre-norm blocks with layer scale, final norm, one query attending over all tokens, layer norm."""
    t = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    width = t["cls_token"].shape[-1]
    h = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    h = torch.cat([t["cls_token"].expand(len(x), -1, -1), h], 1)
    grid = t["pos_embed"][:, 1:].reshape(1, 14, 14, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, width)
    h = h + torch.cat([t["pos_embed"][:, :1], grid], 1)
    ln = lambda v, p, eps=1e-6: F.layer_norm(v, (v.shape[-1],), t[f"{p}.weight"], t[f"{p}.bias"], eps)  # noqa: E731
    n_blocks = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}"
        qkv = F.linear(ln(h, f"{b}.norm1"), t[f"{b}.attn.qkv.weight"], t[f"{b}.attn.qkv.bias"])
        q, k, v = qkv.unflatten(-1, (3, 3, -1)).permute(2, 0, 3, 1, 4)  # 3 heads (ViT-Ti)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        h = h + t[f"{b}.ls1.gamma"] * F.linear(a.transpose(1, 2).flatten(2), t[f"{b}.attn.proj.weight"], t[f"{b}.attn.proj.bias"])
        m = F.gelu(F.linear(ln(h, f"{b}.norm2"), t[f"{b}.mlp.fc1.weight"], t[f"{b}.mlp.fc1.bias"]))
        h = h + t[f"{b}.ls2.gamma"] * F.linear(m, t[f"{b}.mlp.fc2.weight"], t[f"{b}.mlp.fc2.bias"])
    tokens = ln(h, "norm")
    p = {k[len("attn_pool_contrast."):]: v for k, v in state.items() if k.startswith("attn_pool_contrast.")}
    kv = F.layer_norm(tokens, (width,), p["ln_k.weight"], p["ln_k.bias"]) @ p["to_kv.weight"].T
    keys, values = kv.chunk(2, -1)
    query = F.layer_norm(p["query"], (768,), p["ln_q.weight"], p["ln_q.bias"]) @ p["to_q.weight"].T
    split = lambda z: z.unflatten(-1, (heads, -1)).transpose(-2, -3)  # noqa: E731
    attn = torch.softmax(split(query) @ split(keys).transpose(-1, -2) / (768 // heads) ** 0.5, -1)
    pooled = (attn @ split(values)).transpose(-2, -3).flatten(-2) @ p["to_out.weight"].T
    return F.layer_norm(pooled[:, 0], (768,), state["ln_contrast.weight"], state["ln_contrast.bias"], 1e-5)


@pytest.fixture(scope="module")
def tiny_conch(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, dict[str, torch.Tensor]]:
    """A CONCH v1.5 preset with a ViT-Ti/16 trunk and a checkpoint in the published layout (14 x 14 grid,
    random values, the layer norms and layer scales too, so none is left at its identity)."""
    preset = dataclasses.replace(CONCH, name="tiny_conch", arch="vit_tiny_patch16_224",
                                 timm_kwargs={**CONCH.timm_kwargs, "depth": 2})
    torch.manual_seed(0)
    with torch.device("meta"):
        layout = ConchVisionTower(timm.create_model(preset.arch, pretrained=False, **timm_kwargs(preset))).state_dict()
    state = {k: 0.2 * torch.randn(v.shape) + (1.0 if k.endswith((".weight", "gamma")) and v.dim() == 1 else 0.0)
             for k, v in layout.items()}
    state["trunk.pos_embed"] = torch.randn(1, 1 + 14 * 14, 192) * 0.2  # the checkpoint's grid, not the 448-px one
    path = tmp_path_factory.mktemp("conch") / "pytorch_model_vision.bin"
    torch.save(state, path)
    return preset, path, state


def test_checkpoint_extracts_the_forward_written_out_from_its_tensors(tiny_conch, ebhi_table: Path) -> None:
    preset, path, state = tiny_conch
    encoder = preset_encoder(preset, weights=path, precision="fp32")
    assert encoder.info.dim == 768 and encoder.info.input_size == 448 and encoder.info.weights.startswith("sha256:")
    tiles = sorted(ebhi_table.parent.glob("tiles/*/*.jpg"))[:2]
    from histomil.data.images import read_rgb
    from histomil.features.tile_encoder import fit_tile

    arr = np.stack([fit_tile(read_rgb(p), encoder.info) for p in tiles])  # 224-px EBHI tiles, resized to 448
    got = encoder.encode(arr)
    with torch.no_grad():
        ref = reference_forward(state, encoder.preprocess(arr), heads=8).numpy()
    assert got.shape == (2, 768)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)


def test_checkpoints_of_another_layout_are_refused_in_one_line(tiny_conch, tmp_path: Path) -> None:
    preset, _, state = tiny_conch
    for name, bad in (("missing", {k: v for k, v in state.items() if not k.startswith("ln_contrast")}),
                      ("grid", {**state, "trunk.pos_embed": torch.randn(1, 1 + 15, 192)})):
        torch.save(bad, tmp_path / f"{name}.bin")
        with pytest.raises(HistomilError) as err:
            preset_encoder(preset, weights=tmp_path / f"{name}.bin", precision="fp32")
        assert str(tmp_path / f"{name}.bin") in str(err.value) and "\n" not in str(err.value)


def test_conch_v15_builds_by_name_with_random_weights() -> None:
    """The preset itself (ViT-L/16 at 448 px) builds by name; random weights are recorded as such."""
    encoder = build_encoder("conch_v15", pretrained=False, precision="fp32")
    assert encoder.info.weights == "random" and encoder.info.dim == 768
    assert encoder.info.mean == (0.485, 0.456, 0.406) and encoder.info.interpolation == "bilinear"
