"""``pl.registration``: sections overlaid before and after :func:`asign_sc.tl.register_sections`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc.pp._tissue import tissue_channel, tissue_mask
from asign_sc.tl._registration import registration_key
from asign_sc.tl._registration_init import warp_to

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["registration"]

logger = logging.getLogger(__name__)


def registration(
    data: AnnData | SpatialData,
    *,
    library_key: str = Key.obs.library,
    sections: Sequence[str] | None = None,
    key_added: str = Key.sdata.aligned,
    max_side: int = 400,
    spots: bool = True,
    spot_size: float = 2.0,
    palette: Sequence[str] | None = None,
    alpha: float = 0.45,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    title: bool = True,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Overlay of the sections before and after registration, one colour per section.

    Each section's tissue (its stain channel inside the tissue mask) is drawn as a
    translucent layer in its colour, with the mask outline and, optionally, the spot
    centres on top. Left: the sections as they lie on their slides (own pixel frames
    overlaid). Right: the sections in the aligned frame (full-resolution pixels of the
    reference section). Where sections agree, colours mix to grey; misregistration shows
    as coloured fringes and outlines that do not coincide.

    Parameters
    ----------
    data
        The registered AnnData or SpatialData (after :func:`asign_sc.tl.register_sections`).
    library_key
        ``obs`` column naming each spot's section.
    sections
        Sections to draw, in order. Default: the registered ones.
    key_added
        ``key_added`` of the registration to show.
    max_side
        Long side in pixels of each rendered panel (and of the image level read).
    spots
        Draw spot centres (``obsm['spatial']`` before, ``obsm['spatial_aligned']`` after,
        so SyN displacements are visible).
    spot_size
        Marker size of the spot centres.
    palette
        One matplotlib colour per section. Default: ``tab10``.
    alpha
        Opacity of tissue covered by one section; it grows to 1 where all overlap.
    figsize, dpi
        Figure size in inches and resolution. Default size: 10 x 5.
    title
        Write panel titles with the mean tissue-mask Dice with the reference section.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only when not saving.
    save
        Write the figure to this path (format from the suffix).

    Returns
    -------
    The figure; ``fig.axes[0]`` is "before", ``fig.axes[1]`` "after".

    Raises
    ------
    KeyError
        The data has not been registered with this ``key_added``.
    InvalidStackError
        A section to draw has no image.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D

    obsm_key, uns_key = registration_key(key_added)
    stack = resolve_stack(data, library_key=library_key, sections=sections)
    table = stack.table
    if uns_key not in table.uns or obsm_key not in table.obsm:
        raise KeyError(
            f"No registration under uns[{uns_key!r}] / obsm[{obsm_key!r}]. Run "
            f"asign_sc.tl.register_sections(data, key_added={key_added!r}) first."
        )
    record = table.uns[uns_key]
    matrices = {str(k): np.asarray(v, dtype=float) for k, v in record["matrices"].items()}
    names = [name for name in stack.names if name in matrices]
    if sections is None:
        order = [str(n) for n in record["order"]]
        names = [name for name in order if name in names]
    missing = [name for name in stack.names if name not in matrices]
    if missing:
        raise KeyError(
            f"Sections {missing} have no matrix in uns[{uns_key!r}]['matrices']; register them "
            "or leave them out with sections=."
        )
    colors = list(palette) if palette is not None else _default_palette(len(names))
    if len(colors) < len(names):
        raise ValueError(f"palette has {len(colors)} colours for {len(names)} sections.")
    colors = [np.asarray(to_rgb(c)) for c in colors[: len(names)]]
    layers = {name: _layer(stack, name, max_side) for name in names}

    fig, axes = plt.subplots(1, 2, figsize=figsize or (10, 5), dpi=dpi)
    identity = {name: np.eye(3) for name in names}
    panels = (
        (axes[0], identity, Key.obsm.spatial, "before: own frames"),
        (axes[1], matrices, obsm_key, f"after: aligned to {_reference(record)}"),
    )
    for ax, transforms, spots_key, label in panels:
        extent = _extent(layers, transforms)
        rgb, masks, frame = _composite(layers, transforms, colors, extent, max_side, alpha)
        ax.imshow(rgb, extent=frame, interpolation="bilinear")
        for mask, color in zip(masks, colors, strict=True):
            if mask.any():
                ax.contour(
                    mask.astype(float),
                    levels=[0.5],
                    colors=[color],
                    linewidths=0.8,
                    extent=frame,
                    origin="upper",
                )
        if spots:
            xy = np.asarray(table.obsm[spots_key], dtype=float)
            for name, color in zip(names, colors, strict=True):
                rows = stack[name].rows
                ax.scatter(xy[rows, 0], xy[rows, 1], s=spot_size, color=color, linewidths=0)
        ax.set_xlim(extent[0], extent[2])
        ax.set_ylim(extent[3], extent[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(_title(record, label, before=transforms is identity), fontsize=9)
    handles = [
        Line2D([], [], marker="s", linestyle="", color=color, label=name)
        for name, color in zip(names, colors, strict=True)
    ]
    axes[1].legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=dpi)
    if show or (show is None and save is None and _interactive()):
        plt.show()
    return fig


def _interactive() -> bool:
    import matplotlib

    return matplotlib.get_backend().lower() not in {"agg", "pdf", "svg", "ps", "cairo", "template"}


def _default_palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _reference(record: dict) -> str:
    reference = record.get("reference", "")
    if isinstance(reference, dict):
        return ", ".join(str(v) for v in reference.values())
    return str(reference)


def _title(record: dict, label: str, *, before: bool) -> str:
    qc = record.get("qc")
    column = "dice_reference_before" if before else "dice_reference_after"
    if qc is None or column not in qc:
        return label
    values = np.asarray(qc[column], dtype=float)
    values = values[np.isfinite(values)]
    return f"{label}\nmean tissue Dice with reference {values.mean():.3f}" if values.size else label


class _Layer:
    """A section's image at display resolution: stain channel, tissue mask, scale."""

    def __init__(self, channel: np.ndarray, mask: np.ndarray, scale: np.ndarray):
        self.channel, self.mask, self.scale = channel, mask, scale


def _layer(stack: SectionStack, name: str, max_side: int) -> _Layer:
    if not stack[name].has_image:
        raise InvalidStackError(
            f"Section {name!r} has no image to draw; leave it out with sections=."
        )
    image, scale = stack.image(name, max_side=max_side)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    long_side = max(image.shape[:2])
    if long_side > 2 * max_side:
        from skimage.transform import resize

        factor = max_side / long_side
        shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
        scale = scale * np.array([shape[1] / image.shape[1], shape[0] / image.shape[0]])
        image = resize(image, shape, anti_aliasing=True, preserve_range=True).astype(np.uint8)
    mask = tissue_mask(image)
    return _Layer(tissue_channel(image, channel="grey") * mask, mask, np.asarray(scale, float))


def _extent(layers: dict[str, _Layer], transforms: dict[str, np.ndarray]) -> np.ndarray:
    """``(x0, y0, x1, y1)`` covering every section's tissue in the target frame, plus 5 %."""
    corners = []
    for name, layer in layers.items():
        rows, cols = np.nonzero(layer.mask)
        if rows.size == 0:
            rows, cols = np.array([0, layer.mask.shape[0]]), np.array([0, layer.mask.shape[1]])
        x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
        box = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=float) / layer.scale
        corners.append((np.c_[box, np.ones(4)] @ transforms[name].T)[:, :2])
    corners = np.vstack(corners)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    pad = 0.05 * (hi - lo).max()
    return np.r_[lo - pad, hi + pad]


def _composite(
    layers: dict[str, _Layer],
    transforms: dict[str, np.ndarray],
    colors: list[np.ndarray],
    extent: np.ndarray,
    max_side: int,
    alpha: float,
) -> tuple[np.ndarray, list[np.ndarray], tuple[float, float, float, float]]:
    """Tissue in the mean colour of the sections covering each pixel, shaded by the stain.

    Where all sections overlap, their colours average to a neutral tone; tissue covered by
    one section only keeps that section's colour, so misregistration shows as coloured
    fringes. Opacity grows with the number of sections covering a pixel.
    """
    span = extent[2:] - extent[:2]
    d = max_side / span.max()
    shape = (max(1, round(span[1] * d)), max(1, round(span[0] * d)))
    colour_sum = np.zeros((*shape, 3))
    stain_sum = np.zeros(shape)
    count = np.zeros(shape)
    masks = []
    for (name, layer), color in zip(layers.items(), colors, strict=True):
        kwargs = {"dst_offset": extent[:2]}
        mask = (
            warp_to(layer.mask, transforms[name], layer.scale, (d, d), shape, order=0, **kwargs)
            > 0.5
        )
        stain = warp_to(
            layer.channel, transforms[name], layer.scale, (d, d), shape, order=1, **kwargs
        )
        colour_sum += mask[..., None] * color[None, None, :]
        stain_sum += mask * np.clip(stain, 0.0, 1.0)
        count += mask
        masks.append(mask)
    covered = count > 0
    safe = np.maximum(count, 1)
    mean_colour = colour_sum / safe[..., None]
    shade = 1.0 - 0.6 * (stain_sum / safe)
    opacity = np.where(covered, alpha + (1.0 - alpha) * count / max(len(layers), 1), 0.0)
    canvas = (1.0 - opacity[..., None]) + opacity[..., None] * mean_colour * shade[..., None]
    frame = (extent[0], extent[0] + shape[1] / d, extent[1] + shape[0] / d, extent[1])
    return np.clip(canvas, 0.0, 1.0), masks, frame
