"""Smooth across-section edge weights: a Gaussian of distance, the IoU at distance 0."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from asign_sc.gr._overlap import circle_iou

__all__ = ["gaussian_overlap"]


def gaussian_overlap(
    distance: ArrayLike, r1: ArrayLike, r2: ArrayLike, width: ArrayLike
) -> np.ndarray:
    """Disc overlap at distance 0 times a Gaussian of the centre distance.

    ``IoU(0; r1, r2) * exp(-d² / (2 width²))`` with ``IoU(0; r1, r2) = min(r1, r2)² /
    max(r1, r2)²``, the :func:`circle_iou` of concentric discs. Unlike the IoU it never
    reaches 0, so spots a pitch or two apart (residual misalignment of sections) stay
    connected, with a weight that falls smoothly with the distance.

    Parameters
    ----------
    distance
        Distance between the two centres (non-negative). Arrays broadcast together.
    r1
        Radius of the first disc (positive).
    r2
        Radius of the second disc (positive).
    width
        Standard deviation of the Gaussian (positive), in the units of ``distance``.

    Returns
    -------
    Weights in ``(0, 1]``, ``float64``: 1 for coincident discs of equal radius.

    See Also
    --------
    circle_iou : the overlap it equals at distance 0.
    """
    d = np.asarray(distance, dtype=float)
    w = np.asarray(width, dtype=float)
    if np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("The kernel width must be finite and positive.")
    at_zero = circle_iou(np.zeros_like(d), r1, r2)  # checks d and the radii too
    if np.any(~np.isfinite(d)) or np.any(d < 0):
        raise ValueError("Centre distances must be finite and non-negative.")
    return at_zero * np.exp(-0.5 * (d / w) ** 2)
