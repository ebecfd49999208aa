"""``pl.stack_3d``: every section's spots in 3D, in the registered frame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asign_sc._docs import doc_params
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc.pl._common import PLOT_DOCS, finish, imputed_values

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from plotly.graph_objects import Figure as PlotlyFigure
    from spatialdata import SpatialData

__all__ = ["stack_3d"]


@doc_params(**PLOT_DOCS)
def stack_3d(
    data: AnnData | SpatialData,
    color: str,
    *,
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
    interactive: bool = False,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
) -> Figure | PlotlyFigure | None:
    """All sections' spots in 3D: aligned ``(x, y)``, one level per section.

    Colour is the imputed expression of a gene, or an ``obs`` column (numbers with
    ``cmap``, categories with their ``uns[f"{{color}}_colors"]`` or ``tab10``). Each level is
    labelled with its section name beside its own spots and, with ``outline``, framed by the
    convex hull of its spots, so the stack reads as a pile of slides. On known sections the
    imputation holds the measured values (except with ``method="network"``), and the
    colour bar says so.

    Drawn with matplotlib's ``mplot3d`` (squidpy and spatialdata-plot have no 3D view), or
    with ``interactive=True`` as a rotatable, zoomable plotly figure for notebooks (hover
    shows each spot's name, section and value); that needs the optional extra
    ``pip install "asign-sc[interactive]"``.

    Parameters
    ----------
    data
        A registered stack (``obsm[spatial_key]``), usually imputed.
    color
        An imputed gene (a column of ``obsm[key]``) or an ``obs`` column.
    key
        ``key_added`` of the imputation (:func:`asign_sc.tl.impute`).
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
        Marker area in points squared (matplotlib); its square root is the plotly marker
        diameter in pixels.
    cmap, vmin, vmax
        Colour map and limits for numbers (with ``interactive=True`` a plotly colour scale
        name, e.g. ``"viridis"``).
    elev, azim
        View angles in degrees (matplotlib; the plotly view starts from the same side).
    outline
        Draw each section's spot hull at its level.
    interactive
        Return / show a plotly figure instead of a matplotlib one.
    figsize, dpi
        Figure size in inches (default 6 x 5) and resolution (plotly: 100 pixels per inch).
    show
        Show the figure. Default: in interactive use (a notebook or a GUI backend; always
        for plotly) and when not saving. A shown figure is not returned.
    save
        Write the figure to this path (matplotlib: format from the suffix; plotly: ``.html``).
    return_fig
        Return the figure instead of showing it.
    ax
        A 3D axes (``projection="3d"``) to draw into (matplotlib only).

    Returns
    -------
    The figure (a :class:`plotly.graph_objects.Figure` with ``interactive=True``) with
    ``show=False`` or ``return_fig=True``, else ``None``.

    Raises
    ------
    ImportError
        ``interactive=True`` without plotly installed (the message names the extra).
    """
    if interactive:
        go = _plotly()
        if ax is not None:
            raise ValueError("ax= draws into matplotlib axes; it cannot take interactive=True.")
    spots = _spots(data, color, key=key, sections=sections,
                   library_key=library_key, spatial_key=spatial_key,
                   section_spacing=section_spacing)  # fmt: skip
    if interactive:
        fig = _plotly_figure(
            go, spots, size=size, cmap=cmap, vmin=vmin, vmax=vmax, outline=outline,
            elev=elev, azim=azim, figsize=figsize or (6, 5),
        )  # fmt: skip
        return _finish_plotly(fig, show=show, save=save, return_fig=return_fig)
    return _matplotlib_figure(
        spots, size=size, cmap=cmap, vmin=vmin, vmax=vmax, elev=elev, azim=azim,
        outline=outline, figsize=figsize, dpi=dpi, show=show, save=save,
        return_fig=return_fig, ax=ax,
    )  # fmt: skip


@dataclass
class _Spots:
    """What both renderers draw: positions, levels, values or categories, labels."""

    stack: SectionStack
    xy: np.ndarray
    z: np.ndarray
    rows: np.ndarray
    spacing: float
    values: np.ndarray | None = None
    label: str = ""
    codes: np.ndarray | None = None
    categories: list[str] = field(default_factory=list)
    palette: list = field(default_factory=list)


def _spots(
    data: AnnData | SpatialData,
    color: str,
    *,
    key: str,
    sections: Sequence[str] | None,
    library_key: str,
    spatial_key: str,
    section_spacing: float | None,
) -> _Spots:
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
    spots = _Spots(stack=stack, xy=xy[rows], z=level * spacing, rows=rows, spacing=spacing)
    if color in table.obs and not _is_numeric(table.obs[color]):
        series = table.obs[color].astype("category")
        spots.categories = [str(c) for c in series.cat.categories]
        palette = table.uns.get(f"{color}_colors")
        if palette is None or len(palette) < len(spots.categories):
            cm = plt.get_cmap("tab10" if len(spots.categories) <= 10 else "tab20")
            palette = [cm(i % cm.N) for i in range(len(spots.categories))]
        spots.palette = list(palette)
        spots.codes = series.cat.codes.to_numpy()[rows]
        spots.label = color
    elif color in table.obs:
        spots.values = table.obs[color].to_numpy(dtype=float)[rows]
        spots.label = color
    else:
        spots.values = imputed_values(table, color, key=key)[rows]
        spots.label = _imputed_label(table, color, key, stack.names)
    return spots


def _imputed_label(table: AnnData, color: str, key: str, shown: list[str]) -> str:
    """Colour-bar label: which sections hold measured values in the imputation."""
    record = table.uns.get(Key.uns.params(key), {}).get("impute", {})
    known = [str(s) for s in np.atleast_1d(record.get("known_sections", [])) if str(s) in shown]
    if known and record.get("method") != "network":
        return f"{color}\n(measured on {', '.join(known)}, imputed elsewhere)"
    return f"{color} (imputed)"


def _matplotlib_figure(
    spots: _Spots, *, size, cmap, vmin, vmax, elev, azim, outline, figsize, dpi, show, save,
    return_fig, ax,
) -> Figure | None:  # fmt: skip
    import matplotlib.pyplot as plt

    if ax is None:
        fig = plt.figure(figsize=figsize or (6, 5), dpi=dpi)
        ax = fig.add_subplot(projection="3d")
    elif getattr(ax, "name", "") != "3d":
        raise ValueError("ax must be a 3D axes: fig.add_subplot(projection='3d').")
    fig = ax.figure
    xy, z = spots.xy, spots.z
    if outline:
        for level, hull in _hulls(spots):
            ax.plot(hull[:, 0], hull[:, 1], np.full(len(hull), level), color="0.55", lw=0.8)
    if spots.codes is not None:
        for c, cat in enumerate(spots.categories):
            m = spots.codes == c
            if m.any():
                ax.scatter(
                    xy[m, 0], xy[m, 1], z[m], s=size, color=spots.palette[c], label=cat,
                    depthshade=False, linewidths=0,
                )  # fmt: skip
        ax.legend(loc="upper left", fontsize="small", frameon=False, title=spots.label)
    else:
        points = ax.scatter(
            xy[:, 0], xy[:, 1], z, c=spots.values, s=size, cmap=cmap, vmin=vmin, vmax=vmax,
            depthshade=False, linewidths=0,
        )  # fmt: skip
        fig.colorbar(points, ax=ax, shrink=0.55, pad=0.08, label=spots.label)
    for name, position in _label_positions(spots):
        ax.text(*position, name, fontsize="small", ha="left", va="center")
    ax.set_zticks([])  # levels are labelled by name next to their spots
    ax.set_xlabel("x (aligned)")
    ax.set_ylabel("y (aligned)")
    ax.tick_params(labelsize="x-small")
    ax.invert_yaxis()  # image convention: y grows downwards, as on the slide
    ax.set_box_aspect((1.0, 1.0, 0.6))
    ax.view_init(elev=elev, azim=azim)
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi)


def _label_positions(spots: _Spots) -> list[tuple[str, tuple[float, float, float]]]:
    """Each section's name just past its own spots' right edge, at its own level."""
    span = np.ptp(spots.xy, axis=0).max() if len(spots.xy) else 1.0
    out, start = [], 0
    for i, section in enumerate(spots.stack.sections):
        pts = spots.xy[start : start + section.n_spots]
        start += section.n_spots
        if len(pts):
            x = pts[:, 0].max() + section.spot_radius + 0.04 * span
            out.append((section.name, (float(x), float(np.median(pts[:, 1])), i * spots.spacing)))
    return out


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as error:
        raise ImportError(
            "pl.stack_3d(..., interactive=True) draws with plotly, which is not installed. "
            'Install the optional extra: pip install "asign-sc[interactive]" (or pip install '
            "plotly), or leave interactive=False for the static matplotlib view."
        ) from error
    return go


def _plotly_figure(
    go, spots: _Spots, *, size, cmap, vmin, vmax, outline, elev, azim, figsize
) -> PlotlyFigure:  # fmt: skip
    table = spots.stack.table
    names = table.obs_names.to_numpy()[spots.rows]
    section = np.concatenate([[s.name] * s.n_spots for s in spots.stack.sections])
    marker = {"size": float(np.sqrt(size)), "line": {"width": 0}}
    traces = []
    if outline:
        for level, hull in _hulls(spots):
            traces.append(go.Scatter3d(
                x=hull[:, 0], y=hull[:, 1], z=np.full(len(hull), level), mode="lines",
                line={"color": "rgb(140,140,140)", "width": 2}, hoverinfo="skip",
                showlegend=False,
            ))  # fmt: skip
    if spots.codes is not None:
        from matplotlib.colors import to_hex

        for c, cat in enumerate(spots.categories):
            m = spots.codes == c
            traces.append(go.Scatter3d(
                x=spots.xy[m, 0], y=spots.xy[m, 1], z=spots.z[m], mode="markers", name=cat,
                marker={**marker, "color": to_hex(spots.palette[c])},
                text=names[m], hovertemplate="%{text}<br>" + f"{spots.label}: {cat}<extra></extra>",
            ))  # fmt: skip
    else:
        title = {"text": spots.label.replace("\n", "<br>"), "side": "right"}
        traces.append(go.Scatter3d(
            x=spots.xy[:, 0], y=spots.xy[:, 1], z=spots.z, mode="markers", showlegend=False,
            marker={**marker, "color": spots.values, "colorscale": str(cmap), "cmin": vmin,
                    "cmax": vmax, "colorbar": {"title": title}},
            customdata=np.c_[section, spots.values], text=names,
            hovertemplate="%{text} (%{customdata[0]})<br>value %{customdata[1]:.3f}<extra></extra>",
        ))  # fmt: skip
    labels = _label_positions(spots)
    traces.append(go.Scatter3d(
        x=[p[0] for _, p in labels], y=[p[1] for _, p in labels], z=[p[2] for _, p in labels],
        mode="text", text=[n for n, _ in labels], textposition="middle right",
        hoverinfo="skip", showlegend=False,
    ))  # fmt: skip
    fig = go.Figure(traces)
    eye = _camera_eye(elev, azim)
    fig.update_layout(
        width=int(figsize[0] * 100), height=int(figsize[1] * 100),
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
        scene={
            "xaxis": {"title": {"text": "x (aligned)"}},
            "yaxis": {"title": {"text": "y (aligned)"}, "autorange": "reversed"},
            "zaxis": {"title": {"text": ""}, "showticklabels": False},
            "aspectmode": "manual", "aspectratio": {"x": 1, "y": 1, "z": 0.6},
            "camera": {"eye": eye},
        },
        legend={"title": {"text": spots.label}} if spots.codes is not None else {},
    )  # fmt: skip
    return fig


def _camera_eye(elev: float, azim: float, distance: float = 2.0) -> dict[str, float]:
    e, a = np.radians(elev), np.radians(azim)
    return {
        "x": float(distance * np.cos(e) * np.cos(a)),
        "y": float(-distance * np.cos(e) * np.sin(a)),  # y axis reversed, as on the slide
        "z": float(distance * np.sin(e)),
    }


def _finish_plotly(
    fig: PlotlyFigure, *, show: bool | None, save: str | Path | None, return_fig: bool
) -> PlotlyFigure | None:
    if save is not None:
        if Path(save).suffix.lower() not in {".html", ".htm"}:
            raise ValueError(
                f"An interactive figure is saved as HTML; got save={str(save)!r}. Use a .html "
                "path, or interactive=False for an image."
            )
        fig.write_html(save, include_plotlyjs="cdn")
    if show is None:
        show = save is None and not return_fig
    if show:
        fig.show()
    return fig if return_fig or not show else None


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _hulls(spots: _Spots) -> list[tuple[float, np.ndarray]]:
    """Each section's spot hull (closed polygon) at its level, padded by one spot radius."""
    from scipy.spatial import ConvexHull, QhullError

    out, start = [], 0
    for i, section in enumerate(spots.stack.sections):
        pts = spots.xy[start : start + section.n_spots]
        start += section.n_spots
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
        out.append((i * spots.spacing, np.vstack([hull, hull[:1]])))
    return out
