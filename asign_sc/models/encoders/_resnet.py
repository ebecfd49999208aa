"""ResNet-50 (He et al., 2016) with torchvision's module names, and its ImageNet weights.

torchvision's own class is used when torchvision imports; otherwise this definition, whose
``state_dict`` keys and shapes are torchvision's (``conv1``, ``layer1.0.downsample.0``, ...;
the "v1.5" variant with the stride on the 3x3 convolution), so torchvision checkpoints load
into it unchanged. Written here because torchvision has no CPU build for every platform and
torch itself ships no model zoo.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "RESNET50_CHECKPOINTS",
    "ResNet50",
    "check_checkpoint_hash",
    "find_resnet50_weights",
    "resnet50_module",
]

#: torchvision's ImageNet-1k ResNet-50 checkpoints: file name -> (weights enum, top-1 %).
#: The 8 hex digits in each name are the start of the file's SHA-256 (torch.hub convention).
RESNET50_CHECKPOINTS = {
    "resnet50-0676ba61.pth": ("ResNet50_Weights.IMAGENET1K_V1", 76.130),
    "resnet50-11ad3fa6.pth": ("ResNet50_Weights.IMAGENET1K_V2", 80.858),
}


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's parameter names (``torchvision.models.resnet50``)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            downsample = nn.Sequential(
                nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
            )
            stage = [_Bottleneck(cin, width, stride, downsample)]
            stage += [_Bottleneck(width * 4, width) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_module() -> nn.Module:
    """An untrained ResNet-50: torchvision's class when it imports, else :class:`ResNet50`."""
    try:
        from torchvision.models import resnet50
    except ImportError:
        return ResNet50()
    return resnet50(weights=None)


def _torch_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_resnet50_weights() -> Path | None:
    """Find torchvision's ImageNet ResNet-50 checkpoint in torch's cache directory.

    The directory is ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints`` by
    default), where ``torchvision.models.resnet50(weights="IMAGENET1K_V1")`` stores it. The
    original ImageNet recipe (V1) is preferred, as in the paper.
    """
    directory = _torch_checkpoint_dir()
    for name in RESNET50_CHECKPOINTS:
        path = directory / name
        if path.is_file():
            return path
    return None


def check_checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file; raise if its name carries a torch.hub hash that differs."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    stem = path.name.split(".")[0]
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if path.name in RESNET50_CHECKPOINTS and not hexdigest.startswith(prefix):
        raise ValueError(
            f"{path} is corrupt: its SHA-256 starts with {hexdigest[:8]}, not {prefix} as its "
            "name says. Delete it and let torchvision download it again."
        )
    return hexdigest
