"""Tissue masks and stain channels of H&E images (on a downsampled copy of the image).

Both functions work on plain ``(height, width, 3)`` RGB arrays, e.g. what
:meth:`asign_sc._stack.SectionStack.image` returns for ``max_side=1000``. They are the
image side of :func:`asign_sc.tl.register_sections`, and useful on their own to check what
the registration sees.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

__all__ = ["tissue_channel", "tissue_mask"]

logger = logging.getLogger(__name__)

Channel = Literal["grey", "hematoxylin", "od"]
_CHANNELS = ("grey", "hematoxylin", "od")
#: Optical density floor before taking logs (clean glass has ~0-0.1).
_MIN_OD = 0.02


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(
            f"Expected an RGB image of shape (height, width, 3), got shape {image.shape}. "
            "Pass channels last (e.g. image.transpose(1, 2, 0) for a cyx array)."
        )
    if min(image.shape[:2]) < 8:
        raise ValueError(f"The image is too small ({image.shape[:2]}); pass at least 8 x 8 pixels.")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    return image / 255.0 if image.max() > 1.0 else image


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density ``-log(I / I0)`` over the channels; 0 for white glass."""
    return -np.log(np.clip(rgb, 1.0 / 255.0, 1.0)).sum(axis=-1)


def tissue_channel(image: np.ndarray, *, channel: Channel = "grey") -> np.ndarray:
    """A single stain channel of an H&E image, bright where there is stain.

    Parameters
    ----------
    image
        RGB image, ``(height, width, 3)``, ``uint8`` or float in ``[0, 1]``.
    channel
        ``"grey"``: inverted luminance; ``"hematoxylin"``: the haematoxylin channel of the
        colour deconvolution of :func:`skimage.color.rgb2hed` (nuclei; robust to eosin and
        slide tint); ``"od"``: optical density summed over R, G and B.

    Returns
    -------
    ``float32`` array of shape ``(height, width)`` scaled to ``[0, 1]`` (robustly, by its
    0.5 and 99.5 percentiles for ``"hematoxylin"`` and ``"od"``).
    """
    if channel not in _CHANNELS:
        raise ValueError(f"channel must be one of {_CHANNELS}, got {channel!r}.")
    rgb = _check_rgb(image)
    if channel == "grey":
        from skimage.color import rgb2gray

        return (1.0 - rgb2gray(rgb)).astype(np.float32)
    if channel == "hematoxylin":
        from skimage.color import rgb2hed

        values = rgb2hed(rgb)[..., 0]
    else:
        values = _optical_density(rgb)
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def tissue_mask(
    image: np.ndarray,
    *,
    sigma: float | None = None,
    threshold: float | None = None,
    min_fraction: float = 0.1,
    closing: int | None = None,
    fill_holes: bool = True,
) -> np.ndarray:
    """Foreground (tissue) mask of an H&E image: slide background and small debris removed.

    The summed optical density is smoothed, thresholded (Otsu on its log by default),
    closed, hole-filled, and connected components smaller than ``min_fraction`` of the
    largest one are dropped (dust, pen marks, bubbles).

    Parameters
    ----------
    image
        RGB image, ``(height, width, 3)``; a downsampled copy (~500-2,000 px long side) is
        what this is meant for.
    sigma
        Gaussian smoothing in pixels of ``image`` before thresholding. Default: 0.2 % of
        the long side (at least 1 px).
    threshold
        Optical-density threshold (sum over RGB; glass is ~0-0.3, tissue > 0.5). Default:
        Otsu's threshold of the logarithm of the smoothed optical density.
    min_fraction
        Keep connected components of at least this fraction of the largest component's area.
    closing
        Radius in pixels of the morphological closing that bridges gaps in the tissue.
        Default: 0.5 % of the long side (at least 1 px).
    fill_holes
        Fill holes (lumen, fat) inside the tissue.

    Returns
    -------
    Boolean array of shape ``(height, width)``. It may be empty (all ``False``) for a
    blank image; callers decide whether that is an error.
    """
    from scipy import ndimage as ndi
    from skimage import filters, morphology

    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}.")
    rgb = _check_rgb(image)
    long_side = max(rgb.shape[:2])
    sigma = max(1.0, 0.002 * long_side) if sigma is None else float(sigma)
    closing = max(1, round(0.005 * long_side)) if closing is None else int(closing)
    od = ndi.gaussian_filter(_optical_density(rgb), sigma) if sigma > 0 else _optical_density(rgb)
    if threshold is None:
        if np.ptp(od) < 1e-3:
            return np.zeros(od.shape, dtype=bool)
        # Otsu on log optical density: glass is one mode and all tissue (pale eosin and
        # dark nuclei alike) the other; on linear OD, dark structures can pull the
        # threshold above pale tissue
        threshold = float(np.exp(filters.threshold_otsu(np.log(np.maximum(od, _MIN_OD)))))
    mask = od > threshold
    if closing > 0:  # padded, so tissue touching the border is not eroded by the closing
        mask = ndi.binary_closing(np.pad(mask, closing), structure=morphology.disk(closing))
        mask = mask[closing:-closing, closing:-closing]
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n > 1:
        areas = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
        mask = np.isin(labels, keep)
    return mask.astype(bool)
