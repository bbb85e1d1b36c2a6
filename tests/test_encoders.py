"""Tile encoder: pretrained weights load right, preprocessing, determinism, bf16/channels_last, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import Conv2dSame, EfficientNetLite0
from histomil.features.encoders import ENCODERS, EncoderInfo, TileEncoder, build_encoder

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def encoder() -> TileEncoder:
    return build_encoder("efficientnet_lite0", pretrained=True, precision="fp32")  # the reference, on every CPU


@pytest.fixture(scope="module")
def real_tiles(ebhi_table: Path) -> np.ndarray:
    """Four real 224x224 H&E tiles, one from each of four tissue classes."""
    picked: dict[str, str] = {}
    with open(ebhi_table, newline="") as f:
        for row in csv.DictReader(f):
            picked.setdefault(row["tissue"], row["path"])
    paths = [picked[t] for t in sorted(picked)[:4]]
    return np.stack([np.asarray(Image.open(ebhi_table.parent / p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def cat_image() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = skimage_data.chelsea()  # (300, 451, 3) uint8, a cat
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top : top + s, left : left + s]  # centre square; preprocess resizes 300 -> 224


def _cat_logits(encoder: TileEncoder, cat_image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return encoder.backbone(encoder.preprocess(cat_image))[0]


def test_pretrained_weights_classify_cat(encoder: TileEncoder, cat_image: np.ndarray) -> None:
    logits = _cat_logits(encoder, cat_image)
    assert logits.shape == (1000,)
    probs = logits.softmax(-1)
    top5 = probs.topk(5).indices.tolist()
    assert CAT_CLASSES & set(top5), top5
    assert top5[0] in CAT_CLASSES, top5
    # Most of the probability mass sits on domestic-cat classes (0.89 with correct weights).
    assert probs[sorted(CAT_CLASSES)].sum().item() > 0.7


def test_symmetric_padding_would_change_logits(
    encoder: TileEncoder, cat_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TF-style asymmetric "same" padding matters: symmetric padding shifts the logits."""
    same = _cat_logits(encoder, cat_image)

    def symmetric(self: Conv2dSame, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.kernel_size[0] // 2, 1, self.groups)

    monkeypatch.setattr(Conv2dSame, "forward", symmetric)
    sym = _cat_logits(encoder, cat_image)
    assert (same - sym).abs().max().item() > 0.5


@pytest.mark.parametrize("size,expected", [(224, (0, 1)), (225, (1, 1)), (7, (1, 1)), (8, (0, 1))])
def test_same_padding_matches_tensorflow(size: int, expected: tuple[int, int]) -> None:
    conv = Conv2dSame(2, 3, 3, stride=2)
    assert conv._same_pad(size, 3, 2, 1) == expected
    x = torch.randn(1, 2, size, size)
    ref = F.conv2d(F.pad(x, (*expected, *expected)), conv.weight, None, 2)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)  # ceil(size / stride), as TensorFlow
    torch.testing.assert_close(out, ref)


def test_features_shape_dtype_and_determinism(encoder: TileEncoder, real_tiles: np.ndarray) -> None:
    a = encoder.encode(real_tiles)
    b = encoder.encode(real_tiles, batch_size=3)  # different batching: a full and a partial batch
    assert a.shape == (4, 1280) and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 6.0  # mean of ReLU6 maps
    np.testing.assert_array_equal(a, encoder.encode(real_tiles))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # different tissue tiles give different embeddings
    assert not np.allclose(a[0], a[1], atol=1e-3)
    # encode() is forward(preprocess()) without gradients
    with torch.no_grad():
        ref = encoder(encoder.preprocess(real_tiles[:2])).numpy()
    np.testing.assert_allclose(a[:2], ref, rtol=1e-4, atol=1e-5)
    assert encoder.encode(real_tiles[:0]).shape == (0, 1280)
    assert encoder.encode(real_tiles[0]).shape == (1, 1280)


def test_preprocess_normalises_and_resizes(encoder: TileEncoder, real_tiles: np.ndarray) -> None:
    tile = np.zeros((224, 224, 3), np.uint8)
    tile[:, :112] = 255
    x = encoder.preprocess(tile)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert x[0, :, :, :112].eq(1.0).all() and x[0, :, :, 112:].eq(-1.0).all()  # mean = std = 0.5

    # 256x256 tiles are resized to 224 like PIL's antialiased bilinear resize
    big = np.asarray(Image.fromarray(real_tiles[0]).resize((256, 256), Image.BICUBIC))
    x = encoder.preprocess(np.stack([big, big]))
    assert x.shape == (2, 3, 224, 224)
    pil = np.asarray(Image.fromarray(big).resize((224, 224), Image.BILINEAR)).astype(np.float32)
    ours = (x[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255
    assert np.abs(ours - pil).mean() < 1.0
    # and their features are close to those of the original 224 tile
    f = np.concatenate([encoder.encode(real_tiles[0]), encoder.encode(big)])
    cos = float(f[0] @ f[1] / np.linalg.norm(f[0]) / np.linalg.norm(f[1]))
    assert cos > 0.9


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 224, 224), np.uint8),  # grayscale batch
        np.zeros((2, 224, 224, 1), np.uint8),  # one channel
        np.zeros((2, 224, 224, 4), np.uint8),  # RGBA
        np.zeros((2, 224, 224, 3), np.float32),  # not uint8
        np.zeros((224, 3), np.uint8),
    ],
)
def test_rejects_non_rgb_uint8_tiles(encoder: TileEncoder, bad: np.ndarray) -> None:
    with pytest.raises(HistomilError, match=r"uint8 RGB.*\(B, H, W, 3\)"):
        encoder.encode(bad)


def test_bf16_channels_last_close_to_fp32(encoder: TileEncoder, real_tiles: np.ndarray) -> None:
    """The one encoder test of the bf16 path (emulated, 12-19x slower, on CPUs without AVX512-BF16/AMX)."""
    ref = encoder.encode(real_tiles)
    for precision, channels_last in [("bf16", True), ("fp32", True)]:
        fast = build_encoder(precision=precision, channels_last=channels_last)
        out = fast.encode(real_tiles)
        assert out.dtype == np.float32 and out.shape == ref.shape
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99, (precision, channels_last, cos)
        if precision == "fp32":
            np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_unknown_encoder_and_options_rejected() -> None:
    with pytest.raises(HistomilError, match="unknown encoder 'resnet9000'.*efficientnet_lite0"):
        build_encoder("resnet9000")
    with pytest.raises(HistomilError, match="precision"):
        build_encoder(pretrained=False, precision="fp16")
    assert "efficientnet_lite0" in ENCODERS


def test_encoder_info_round_trip(encoder: TileEncoder) -> None:
    info = encoder.info
    assert info == EncoderInfo("efficientnet_lite0", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1280)
    d = json.loads(json.dumps(info.to_dict()))
    assert d == {"name": "efficientnet_lite0", "input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "dim": 1280}
    assert EncoderInfo.from_dict({**d, "mean": np.array(d["mean"])}) == info
    with pytest.raises(HistomilError):
        EncoderInfo.from_dict({"name": "x"})


def test_trainable_and_encode_restores_mode() -> None:
    torch.manual_seed(0)
    enc = build_encoder(pretrained=False)
    model: EfficientNetLite0 = enc.backbone  # type: ignore[assignment]
    enc.train()
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).logsumexp(-1).mean() + enc(x).square().mean()
    loss.backward()
    assert model._conv_stem.weight.grad is not None and model._conv_stem.weight.grad.abs().sum() > 0
    assert model._fc.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters())
    enc.encode(np.zeros((1, 64, 64, 3), np.uint8))
    assert enc.training and model.training  # encode() switched to eval only temporarily
