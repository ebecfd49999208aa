"""Macenko stain normalisation of H&E images before the encoder (``extract_features``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from asign_sc._errors import InvalidStackError
from asign_sc._stack import SectionStack

__all__ = ["STAIN_METHODS", "StainTransform", "fit_stain_transforms"]

STAIN_METHODS = ("macenko",)
"""Values of ``extract_features(stain_normalization=)`` besides ``None``."""

#: Long side (pixels) of the pyramid level the stain vectors are estimated on: enough
#: tissue pixels for stable percentiles, a fraction of a second to estimate.
ESTIMATION_SIDE = 2048
#: Transmitted light intensity and optical-density threshold of transparent pixels
#: (Macenko et al. 2009; torchstain's defaults).
LIGHT = 240.0
BETA = 0.15
#: Fewest stained pixels (optical density above ``BETA`` in every channel) to estimate on.
MIN_STAINED_PIXELS = 1000


@dataclass(frozen=True)
class StainTransform:
    """One section's Macenko transform onto a reference H&E stain.

    Pixels are unmixed into haematoxylin and eosin concentrations with the section's stain
    vectors, rescaled so that the section's 99th-percentile concentrations match the
    reference's, and mixed again with the reference stain vectors (Macenko et al., ISBI
    2009).

    Parameters
    ----------
    stain_vectors
        ``(3, 2)`` optical-density stain vectors of the section (haematoxylin, eosin).
    max_concentrations
        99th percentile of the section's two stain concentrations.
    reference_vectors, reference_max_concentrations
        The same for the reference stain.
    """

    stain_vectors: np.ndarray
    max_concentrations: np.ndarray
    reference_vectors: np.ndarray
    reference_max_concentrations: np.ndarray

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """``(h, w, 3)`` ``uint8`` RGB pixels in this section's stain to the reference stain."""
        # torchstain normalises a whole image and re-estimates its stains from it; the tiles
        # of a section must share the section's estimate, so the mixing step is written here:
        # torchstain's formula, LIGHT * exp(-OD @ unmix.T * scale @ reference.T), with the
        # three matrices folded into one and the optical density of a uint8 value looked up.
        density, mixing = self._tables
        mixed = LIGHT * np.exp(-(density[pixels.reshape(-1, 3)] @ mixing))
        return np.minimum(mixed, 255).astype(np.uint8).reshape(pixels.shape)

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Optical density of each uint8 value, and the ``(3, 3)`` unmix-rescale-remix map."""
        density = -np.log((np.arange(256, dtype=np.float32) + 1.0) / LIGHT)
        scale = self.reference_max_concentrations / self.max_concentrations
        mixing = (np.linalg.pinv(self.stain_vectors).T * scale) @ self.reference_vectors.T
        return density, mixing.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form recorded in ``uns``."""
        return {
            "stain_vectors": self.stain_vectors.round(6).tolist(),
            "max_concentrations": self.max_concentrations.round(6).tolist(),
        }


def _reference() -> tuple[np.ndarray, np.ndarray]:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normalizer = NumpyMacenkoNormalizer()
    return np.asarray(normalizer.HERef, float), np.asarray(normalizer.maxCRef, float)


def _estimate(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A section's stain vectors and maximal concentrations (torchstain's estimate)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    density = -np.log((image.reshape(-1, 3).astype(np.float32) + 1.0) / LIGHT)
    stained = int((density >= BETA).all(axis=1).sum())
    if stained < MIN_STAINED_PIXELS:
        raise InvalidStackError(
            f"Section {name!r}: only {stained} stained pixels (optical density >= {BETA} in "
            "every channel) at the estimation resolution, too few to estimate its H&E stain "
            "vectors. Is the image an H&E stain with tissue? Pass stain_normalization=None "
            "to embed the image as it is."
        )
    normalizer = NumpyMacenkoNormalizer()
    # fit() estimates the given image's stain vectors and stores them as the reference
    normalizer.fit(image, Io=LIGHT, beta=BETA)
    vectors = np.asarray(normalizer.HERef, float)
    maxima = np.asarray(normalizer.maxCRef, float)
    if not (np.isfinite(vectors).all() and np.isfinite(maxima).all() and (maxima > 0).all()):
        raise InvalidStackError(
            f"Section {name!r}: the H&E stain estimate is degenerate (maximal concentrations "
            f"{maxima.round(3).tolist()}). Pass stain_normalization=None for this stack."
        )
    return vectors, maxima


def fit_stain_transforms(stack: SectionStack, method: str) -> dict[str, StainTransform]:
    """Each section's transform onto the reference stain, estimated at a coarse level.

    Parameters
    ----------
    stack
        Sections with images.
    method
        ``"macenko"`` (checked by :func:`~asign_sc.tl.extract_features`): onto torchstain's
        reference H&E (a standard slide), so every section and every stack is mapped onto
        the same stain.

    Returns
    -------
    The transform of each section, by name.
    """
    reference_vectors, reference_maxima = _reference()
    transforms = {}
    for section in stack:
        image, _ = stack.image(section.name, max_side=ESTIMATION_SIDE)
        vectors, maxima = _estimate(np.asarray(image)[..., :3], section.name)
        transforms[section.name] = StainTransform(
            vectors, maxima, reference_vectors, reference_maxima
        )
    return transforms
