"""``pl.stack_3d``: every section's spots in 3D, in the registered frame."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asign_sc._keys import Key
from asign_sc._stack import resolve_stack
from asign_sc.pl._common import finish, imputed_values

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["stack_3d"]


def stack_3d(
    data: AnnData | SpatialData,
    color: str,
    *,
    layer: str | None = None,
    key: str = Key.layers.imputed,
    sections: Sequence[str] | None = None,
    library_key: str = Key.obs.library,
    spatial_key: str = Key.obsm.spatial_aligned,
    section_spacing: float | None = None,
    size: float = 12.0,
    cmap: str | Colormap = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    elev: float = 22.0,
    azim: float = -60.0,
    outline: bool = True,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    ax: Axes | None = None,
) -> Figure:
    """All sections' spots in 3D: aligned ``(x, y)``, one level per section.

    Colour is the imputed expression of a gene, or an ``obs`` column (numbers with
    ``cmap``, categories with their ``uns[f"{color}_colors"]`` or ``tab10``). Each level is
    labelled with its section and, with ``outline``, framed by the convex hull of its spots,
    so the stack reads as a pile of slides.

    Drawn with matplotlib's ``mplot3d`` by hand: squidpy and spatialdata-plot have no 3D view.

    Parameters
    ----------
    data
        A registered stack (``obsm[spatial_key]``), usually imputed.
    color
        An imputed gene (``obsm[key]`` or ``layers[layer]``) or an ``obs`` column.
    layer, key
        Where imputed values are read, as in :func:`asign_sc.pl.sections`.
    sections
        Sections to show, in stacking order (bottom to top). Default: all.
    library_key
        ``obs`` column naming each spot's section.
    spatial_key
        ``obsm`` key of spot centres in the aligned frame.
    section_spacing
        Distance between levels in aligned-frame units; default a fifth of the tissue's
        extent, so the stack is legible (true spacing is rarely known in pixels).
    size
        Marker area in points squared.
    cmap, vmin, vmax
        Colour map and limits for numbers.
    elev, azim
        View angles in degrees.
    outline
        Draw each section's spot hull at its level.
    figsize, dpi
        Figure size in inches (default 6 x 5) and resolution.
    show, save
        As in :func:`asign_sc.pl.sections`.
    ax
        A 3D axes (``projection="3d"``) to draw into.

    Returns
    -------
    The figure.
    """
    import matplotlib.pyplot as plt

    stack = resolve_stack(data, library_key=library_key, sections=sections)
    table = stack.table
    if spatial_key not in table.obsm:
        raise KeyError(
            f"obsm[{spatial_key!r}] is missing: the stack is not registered. Run "
            "asign_sc.tl.register_sections(data) first, or pass spatial_key=."
        )
    xy = np.asarray(table.obsm[spatial_key], dtype=float)[:, :2]
    rows = np.concatenate([s.rows for s in stack.sections])
    level = np.concatenate([[i] * s.n_spots for i, s in enumerate(stack.sections)]).astype(float)
    span = np.ptp(xy[rows], axis=0).max() if len(rows) else 1.0
    spacing = float(section_spacing) if section_spacing is not None else span / 5.0
    z = level * spacing

    if ax is None:
        fig = plt.figure(figsize=figsize or (6, 5), dpi=dpi)
        ax = fig.add_subplot(projection="3d")
    elif getattr(ax, "name", "") != "3d":
        raise ValueError("ax must be a 3D axes: fig.add_subplot(projection='3d').")
    fig = ax.figure

    if outline:
        _outlines(ax, stack, xy, spacing)
    categorical = color in table.obs and not _is_numeric(table.obs[color])
    if categorical:
        series = table.obs[color].astype("category")
        cats = list(series.cat.categories)
        palette = table.uns.get(f"{color}_colors")
        if palette is None or len(palette) < len(cats):
            cm = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
            palette = [cm(i % cm.N) for i in range(len(cats))]
        codes = series.cat.codes.to_numpy()[rows]
        for c, cat in enumerate(cats):
            m = codes == c
            if m.any():
                ax.scatter(
                    xy[rows][m, 0], xy[rows][m, 1], z[m], s=size, color=palette[c], label=cat,
                    depthshade=False, linewidths=0,
                )  # fmt: skip
        ax.legend(loc="upper left", fontsize="small", frameon=False, title=color)
    else:
        if color in table.obs:
            values = table.obs[color].to_numpy(dtype=float)
            label = color
        else:
            values = imputed_values(table, color, layer=layer, key=key)
            label = f"{color} (imputed)"
        points = ax.scatter(
            xy[rows, 0], xy[rows, 1], z, c=values[rows], s=size, cmap=cmap, vmin=vmin, vmax=vmax,
            depthshade=False, linewidths=0,
        )  # fmt: skip
        fig.colorbar(points, ax=ax, shrink=0.55, pad=0.02, label=label)
    for i, section in enumerate(stack.sections):
        if section.n_spots:
            corner = xy[section.rows].min(axis=0)
            ax.text(corner[0], corner[1], i * spacing, f" {section.name}", fontsize="small")
    ax.set_zticks([])  # levels are labelled by name next to their spots
    ax.set_xlabel("x (aligned)")
    ax.set_ylabel("y (aligned)")
    ax.tick_params(labelsize="x-small")
    ax.invert_yaxis()  # image convention: y grows downwards, as on the slide
    ax.set_box_aspect((1.0, 1.0, 0.6))
    ax.view_init(elev=elev, azim=azim)
    finish(fig, show=show, save=save, dpi=dpi)
    return fig


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _outlines(ax, stack, xy: np.ndarray, spacing: float) -> None:
    from scipy.spatial import ConvexHull, QhullError

    for i, section in enumerate(stack.sections):
        pts = xy[section.rows]
        if len(pts) < 3:
            continue
        try:
            hull = pts[ConvexHull(pts).vertices]
        except QhullError:
            continue
        # pad by one spot radius so the outline frames the spots rather than cutting them
        centre = pts.mean(axis=0)
        direction = hull - centre
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        hull = hull + direction / np.maximum(norm, 1e-9) * section.spot_radius
        hull = np.vstack([hull, hull[:1]])
        ax.plot(hull[:, 0], hull[:, 1], np.full(len(hull), i * spacing), color="0.55", lw=0.8)
