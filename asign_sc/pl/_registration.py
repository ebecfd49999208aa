"""``pl.registration``: sections overlaid before and after :func:`asign_sc.tl.register_sections`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asign_sc._docs import doc_params
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc.pl._common import PLOT_DOCS, finish, panel_axes
from asign_sc.pp._tissue import tissue_channel, tissue_mask
from asign_sc.tl._registration import registration_key
from asign_sc.tl._registration_init import warp_to

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["registration"]

logger = logging.getLogger(__name__)


@doc_params(**PLOT_DOCS)
def registration(
    data: AnnData | SpatialData,
    *,
    library_key: str = Key.obs.library,
    sections: Sequence[str] | None = None,
    key: str = Key.sdata.aligned,
    max_side: int = 400,
    spots: bool = True,
    spot_size: float = 2.0,
    palette: Sequence[str] | None = None,
    alpha: float = 0.18,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    title: bool = True,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure | None:
    """Overlay of the sections before and after registration, one colour per section.

    Each section's tissue is outlined in its colour (the tissue-mask contour) over a light
    tint of the same colour, on a grey shading of the stain where any section has tissue;
    optionally the spot centres are drawn on top. Left: the sections as they lie on their
    slides (own pixel frames overlaid). Right: the sections in the aligned frame
    (full-resolution pixels of the reference section). Where sections agree, their
    outlines coincide; misregistration shows as outlines that do not. One legend below
    the panels names the colours.

    Parameters
    ----------
    data
        The registered AnnData or SpatialData (after :func:`asign_sc.tl.register_sections`).
    library_key
        ``obs`` column naming each spot's section.
    sections
        Sections to draw, in order. Default: the registered ones.
    key
        ``key_added`` of the registration to show (:func:`asign_sc.tl.register_sections`).
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
        Opacity of each section's colour tint over its tissue (tints of overlapping
        sections are composited, so they stay light and their hues stay apart).
    figsize, dpi
        Figure size in inches and resolution. Default size: 10 x 5.
    title
        Write panel titles with the mean tissue-mask Dice with the reference section.
    {show_save}
    ax
        Two axes (before, after), or one axes whose cell of its figure's grid is split in
        two.

    Returns
    -------
    The figure with ``show=False`` or ``return_fig=True``, else ``None``;
    ``fig.axes[0]`` is "before", ``fig.axes[1]`` "after".

    Raises
    ------
    KeyError
        The data has not been registered with this ``key``.
    InvalidStackError
        A section to draw has no image.
    """
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D

    obsm_key, uns_key = registration_key(key)
    stack = resolve_stack(data, library_key=library_key, sections=sections)
    table = stack.table
    if uns_key not in table.uns or obsm_key not in table.obsm:
        raise KeyError(
            f"No registration under uns[{uns_key!r}] / obsm[{obsm_key!r}]. Run "
            f"asign_sc.tl.register_sections(data, key_added={key!r}) first, or pass key=."
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

    fig, axes = panel_axes(ax, 2, figsize=figsize or (10, 5.4), dpi=dpi)
    identity = {name: np.eye(3) for name in names}
    panels = (
        (axes[0], identity, Key.obsm.spatial, "before: own frames"),
        (axes[1], matrices, obsm_key, f"after: aligned to {_reference(record)}"),
    )
    for panel, transforms, spots_key, label in panels:
        extent = _extent(layers, transforms)
        rgb, masks, frame = _composite(layers, transforms, colors, extent, max_side, alpha)
        panel.imshow(rgb, extent=frame, interpolation="bilinear")
        for mask, color in zip(masks, colors, strict=True):
            if mask.any():
                panel.contour(
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
                panel.scatter(xy[rows, 0], xy[rows, 1], s=spot_size, color=color, linewidths=0)
        panel.set_xlim(extent[0], extent[2])
        panel.set_ylim(extent[3], extent[1])
        panel.set_aspect("equal")
        panel.set_xticks([])
        panel.set_yticks([])
        if title:
            panel.set_title(_title(record, label, before=transforms is identity), fontsize=9)
    handles = [
        Line2D([], [], color=color, lw=2, label=name)
        for name, color in zip(names, colors, strict=True)
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(len(names), 8), frameon=False,
        fontsize="small",
    )  # fmt: skip
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi)


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
    """Grey stain shading under light colour tints, one per section, composited in order.

    Each section's tint covers its tissue with opacity ``alpha`` (alpha compositing, so
    overlaps stay light and keep both hues rather than averaging to brown); the stain,
    averaged over the sections covering a pixel, darkens the result a little so tissue
    structure stays visible. Outlines are drawn by the caller from the returned masks.
    """
    span = extent[2:] - extent[:2]
    d = max_side / span.max()
    shape = (max(1, round(span[1] * d)), max(1, round(span[0] * d)))
    canvas = np.ones((*shape, 3))
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
        tint = alpha * mask[..., None]
        canvas = canvas * (1.0 - tint) + tint * color[None, None, :]
        stain_sum += mask * np.clip(stain, 0.0, 1.0)
        count += mask
        masks.append(mask)
    shade = 1.0 - 0.35 * stain_sum / np.maximum(count, 1)
    canvas = canvas * shade[..., None]
    frame = (extent[0], extent[0] + shape[1] / d, extent[1] + shape[0] / d, extent[1])
    return np.clip(canvas, 0.0, 1.0), masks, frame
