"""Test-time augmentation of an image encoder: the 8 rotations and flips of H&E, averaged."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from asign_sc.models.encoders._registry import Encoder

__all__ = ["DihedralAverage", "dihedral_average"]

#: Quarter turns and horizontal flip of the 8 symmetries of a square (the dihedral group D4).
DIHEDRAL = tuple((turns, flip) for turns in range(4) for flip in (False, True))


class DihedralAverage(nn.Module):
    """Average a feature extractor over the 8 rotations and flips of its input.

    An H&E section has no preferred orientation, so the 8 symmetries of a window are equally
    valid views of it. Each view is encoded, its feature map turned back into the original
    orientation, and the 8 maps averaged: the result is equivariant (a rotated window gives
    the rotated map) and its pooled vector invariant. Outputs without a spatial grid
    (``(B, C)`` vectors) are averaged as they are.

    Parameters
    ----------
    module
        Maps a normalised ``(B, 3, H, W)`` batch to ``(B, C, h, w)`` maps or ``(B, C)``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode the 8 views of ``images`` and average them in the input's orientation."""
        total = None
        for turns, flip in DIHEDRAL:
            view = torch.rot90(images, turns, dims=(2, 3))
            view = torch.flip(view, dims=(3,)) if flip else view
            features = self.module(view)
            if features.ndim == 4:  # undo the transform on the map: flip first, then turn
                features = torch.flip(features, dims=(3,)) if flip else features
                features = torch.rot90(features, -turns, dims=(2, 3))
            total = features if total is None else total + features
        return total / len(DIHEDRAL)


def dihedral_average(encoder: Encoder) -> Encoder:
    """The encoder with test-time augmentation over the 8 rotations and flips of H&E.

    Pass the result to :func:`asign_sc.tl.extract_features` (``encoder=``). It costs 8 times
    the encoder's time; on her2st patient C it raised the ridge baseline's per-gene PCC by
    about +0.005 (top-50 genes +0.015), see the accuracy benchmark's notes.

    Parameters
    ----------
    encoder
        A resolved encoder (:func:`~asign_sc.models.encoders.get_encoder`) whose module is a
        ``torch.nn.Module``.

    Returns
    -------
    A new :class:`Encoder`; its name, fingerprint (the feature cache key) and parameters say
    that it averages over the 8 views.
    """
    if not isinstance(encoder.module, nn.Module):
        raise TypeError(
            f"dihedral_average needs an encoder whose module is a torch.nn.Module, got "
            f"{type(encoder.module).__name__}; wrap your function in a Module."
        )
    return dataclasses.replace(
        encoder,
        name=f"{encoder.name}+dihedral",
        module=DihedralAverage(encoder.module),
        fingerprint=None if encoder.fingerprint is None else f"{encoder.fingerprint}+dihedral",
        conv_bn=[(f"module.{conv}", f"module.{bn}") for conv, bn in encoder.conv_bn],
        params={**encoder.params, "test_time_augmentation": "dihedral"},
    )
