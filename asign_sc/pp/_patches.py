"""Square windows cropped from a section image around spot centres, padded at the border."""

from __future__ import annotations

import numpy as np

__all__ = ["crop_windows", "window_boxes"]


def window_boxes(centers: np.ndarray, size: float | tuple[float, float]) -> np.ndarray:
    """Integer pixel boxes of square windows centred on points.

    Parameters
    ----------
    centers
        ``(n, 2)`` window centres ``(x, y)`` in pixels of the image the windows are cut from.
    size
        Window side in the same pixels, or ``(width, height)``. Rounded to whole pixels
        (at least 1), so all windows have the same shape.

    Returns
    -------
    ``(n, 4)`` ``int64`` array of ``(x0, y0, x1, y1)`` (``x1``/``y1`` exclusive); boxes may
    extend past the image.
    """
    centers = np.asarray(centers, dtype=float)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must have shape (n, 2) (x, y), got {centers.shape}.")
    if not np.all(np.isfinite(centers)):
        raise ValueError("centers contain NaN or infinite values.")
    width, height = (size, size) if np.isscalar(size) else size
    if not (width > 0 and height > 0):
        raise ValueError(f"Window size must be positive, got {size!r}.")
    w, h = max(1, round(float(width))), max(1, round(float(height)))
    x0 = np.floor(centers[:, 0] - w / 2 + 0.5).astype(np.int64)
    y0 = np.floor(centers[:, 1] - h / 2 + 0.5).astype(np.int64)
    return np.column_stack([x0, y0, x0 + w, y0 + h])


def crop_windows(
    image: np.ndarray,
    centers: np.ndarray,
    size: float | tuple[float, float],
    *,
    pad_value: int | float | tuple[int, ...] = 255,
    return_mask: bool = False,
    origin: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Crop square windows centred on points, padding where they leave the image.

    Parameters
    ----------
    image
        ``(height, width)`` or ``(height, width, channels)`` array.
    centers
        ``(n, 2)`` window centres ``(x, y)`` in pixels of ``image``.
    size
        Window side in pixels of ``image`` (or ``(width, height)``); rounded to whole pixels.
    pad_value
        Fill value outside the image, a scalar or one value per channel. The default, white,
        is what empty glass looks like on an H&E slide, so a window at the border shows no
        invented tissue (mirroring would).
    return_mask
        Also return a per-pixel ``bool`` mask of the pixels that lie inside the image.
    origin
        Integer pixel ``(x, y)`` of ``image``'s top-left corner in a larger image that
        ``centers`` refer to: ``image`` is then a tile of it, and windows are placed exactly
        as in the larger image (pixels outside the tile count as outside). With a tile that
        holds every in-image pixel of the windows, the result equals cropping the larger one.

    Returns
    -------
    ``windows``, an ``(n, h, w[, channels])`` array of ``image``'s dtype, and either the
    fraction of each window that lies inside the image (``(n,)`` float, 1 for a window fully
    inside) or, with ``return_mask=True``, the ``(n, h, w)`` mask.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (height, width[, channels]), got shape {image.shape}.")
    boxes = window_boxes(centers, size)
    if origin != (0, 0):
        x, y = (int(v) for v in origin)
        if (x, y) != tuple(origin):
            raise ValueError(f"origin must be two integers (x, y), got {origin!r}.")
        boxes -= np.array([x, y, x, y], dtype=np.int64)
    n = len(boxes)
    h, w = int(boxes[0, 3] - boxes[0, 1]) if n else 0, int(boxes[0, 2] - boxes[0, 0]) if n else 0
    height, width = image.shape[:2]
    out = np.empty((n, h, w, *image.shape[2:]), dtype=image.dtype)
    out[...] = np.asarray(pad_value, dtype=image.dtype)
    mask = np.zeros((n, h, w), dtype=bool) if return_mask else None
    inside = np.zeros(n, dtype=float)
    # Plain slicing per window: each copy is one contiguous block, and nothing bigger than
    # the windows themselves is allocated (padding the whole slide would copy ~300 MB).
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        out[i, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = image[cy0:cy1, cx0:cx1]
        inside[i] = (cx1 - cx0) * (cy1 - cy0) / (h * w)
        if mask is not None:
            mask[i, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = True
    return out, (mask if mask is not None else inside)
