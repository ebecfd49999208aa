"""``pl.sections``: a gene on every section over its H&E, measured beside imputed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from asign_sc._keys import Key
from asign_sc._stack import Section, SectionStack, resolve_stack
from asign_sc.pl._common import finish, imputed_values, measured_values
from asign_sc.pp._expression import DEFAULT_TARGET_SUM

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["sections"]

logger = logging.getLogger(__name__)


def sections(
    data: AnnData | SpatialData,
    color: str,
    *,
    layer: str | None = None,
    key: str = Key.layers.imputed,
    sections: Sequence[str] | None = None,
    compare: Literal["truth"] | None = "truth",
    img: bool = True,
    crop: bool = True,
    library_key: str = Key.obs.library,
    spatial_key: str = Key.obsm.spatial,
    counts_layer: str | None = None,
    max_side: int = 600,
    size: float = 1.0,
    cmap: str | Colormap = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    img_alpha: float | None = None,
    alpha: float = 1.0,
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Expression of one gene on every section, over its H&E, measured beside imputed.

    One column per section. With ``compare="truth"`` the top row is the measured expression
    and the bottom row the imputed one (a section without counts gets an empty "not
    measured" panel); otherwise one row of imputed panels. All panels share one colour
    scale, so a colour means the same expression everywhere. Spots are drawn as discs of
    their true radius, by :func:`squidpy.pl.spatial_scatter` (same look and arguments).

    Parameters
    ----------
    data
        The stack holding an imputation (:func:`asign_sc.tl.impute`).
    color
        Gene to show (a ``var_name`` that was imputed).
    layer
        Read imputed values from ``layers[layer]`` (e.g. ``"asign"``); default
        ``obsm[key]``.
    key
        ``key_added`` of the imputation: ``obsm[key]`` and its parameters ``uns[key]``.
    sections
        Sections to show, in order. Default: all, in stacking order.
    compare
        ``"truth"``: add the measured expression, ``log1p`` counts per ``target_sum`` of
        the imputation (its scale). ``None``: imputed only.
    img
        Draw each section's H&E below its spots.
    library_key
        ``obs`` column naming each spot's section.
    spatial_key
        ``obsm`` key of spot centres in each section's image pixels (legacy AnnData).
    counts_layer
        Layer of raw counts for the measured panels; default the imputation's, else ``X``.
    crop
        Zoom each panel to its section's spots, with a margin of one spot diameter (as
        :func:`squidpy.pl.spatial_scatter`'s ``crop_coord``); ``False`` shows the whole
        slide.
    max_side
        Long side in pixels of the H&E level read (the coarsest stored level at least this
        large).
    size
        Spot diameter as a multiple of the true one (``1``: spots at their true size).
    cmap, vmin, vmax
        Colour map and its shared limits: numbers, or percentiles of all values shown as
        ``"p1"``, ``"p99"`` (scanpy's convention). Default: their minimum and maximum.
    img_alpha, alpha
        Opacity of the H&E and of the spots.
    ncols
        Sections per row of panels; default all in one row.
    figsize, dpi
        Figure size in inches (default: 3 per panel) and resolution.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only when not saving.
    save
        Write the figure to this path.
    ax
        Axes to draw into, one per panel (row by row); a new figure if ``None``.

    Returns
    -------
    The figure. Panel titles name the section and what is shown.

    Raises
    ------
    KeyError
        ``color`` was not imputed, or ``layer`` / ``obsm[key]`` is missing.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if compare not in ("truth", None):
        raise ValueError(f"compare must be 'truth' or None, got {compare!r}.")
    stack = resolve_stack(
        data,
        library_key=library_key,
        sections=sections,
        spatial_key=spatial_key,
        require_images=img,
    )
    table = stack.table
    record = table.uns.get(Key.uns.params(key), {}).get("impute", {})
    imputed = imputed_values(table, color, layer=layer, key=key)
    known = {str(s) for s in np.atleast_1d(record.get("known_sections", []))}
    names = stack.names
    rows_of = {"imputed": imputed}
    measured_ok: dict[str, bool] = {}
    if compare == "truth":
        layer_counts = counts_layer if counts_layer is not None else _none(record.get("layer"))
        target_sum = float(record.get("target_sum", DEFAULT_TARGET_SUM))
        truth, has = measured_values(table, color, layer=layer_counts, target_sum=target_sum)
        rows_of = {"measured": truth, "imputed": imputed}
        measured_ok = {n: bool(has[stack[n].rows].any()) for n in names}
        if not any(measured_ok.values()):
            logger.warning("No section has counts of %r; the measured row is empty.", color)

    shown = [imputed[stack[n].rows] for n in names]
    if compare == "truth":
        shown += [truth[stack[n].rows] for n in names if measured_ok[n]]
    shown = np.concatenate(shown)
    shown = shown[np.isfinite(shown)]
    lo = _limit(vmin, shown, default=0.0)
    hi = _limit(vmax, shown, default=100.0)
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)

    ncols = min(ncols or len(names), len(names))
    n_blocks = -(-len(names) // ncols)
    kinds = list(rows_of)
    nrows = n_blocks * len(kinds)
    if ax is None:
        fig, grid = plt.subplots(
            nrows,
            ncols,
            figsize=figsize or (2.8 * ncols + 0.8, 2.8 * nrows),
            dpi=dpi,
            squeeze=False,
            layout="constrained",
        )
    else:
        axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
        if len(axes) != nrows * ncols:
            raise ValueError(
                f"ax has {len(axes)} axes but {nrows * ncols} panels are needed "
                f"({nrows} rows x {ncols} columns)."
            )
        grid = np.asarray(axes, dtype=object).reshape(nrows, ncols)
        fig = grid[0, 0].figure

    adata = _panel_table(stack, rows_of, max_side=max_side, img=img)
    for i, name in enumerate(names):
        block, col = divmod(i, ncols)
        for k, kind in enumerate(kinds):
            panel = grid[block * len(kinds) + k, col]
            tag = " (known)" if name in known else ""
            if kind == "imputed" and name in known and compare == "truth":
                title = f"{name}: input (known)"
            else:
                title = f"{name}: {kind}{tag}"
            if kind == "measured" and not measured_ok.get(name, False):
                _empty(panel, f"{name}: not measured")
                continue
            _scatter(
                adata,
                kind,
                name,
                library_key=library_key,
                ax=panel,
                crop_coord=_spot_box(stack[name]) if crop else None,
                img=img,
                size=size,
                cmap=cmap,
                norm=norm,
                img_alpha=img_alpha,
                alpha=alpha,
                title=title,
            )
    for panel in grid.ravel()[len(names) * len(kinds) :]:
        if not panel.has_data() and not panel.images:
            panel.set_axis_off()
    if ax is None:
        for i in range(len(names), n_blocks * ncols):
            block, col = divmod(i, ncols)
            for k in range(len(kinds)):
                grid[block * len(kinds) + k, col].set_axis_off()
    scale = "imputed" if compare is None else "measured / imputed"
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=list(grid.ravel()),
        shrink=0.6,
        label=f"{color}\nlog1p counts per {_short(record.get('target_sum', DEFAULT_TARGET_SUM))}"
        f" ({scale})",
    )
    finish(fig, show=show, save=save, dpi=dpi)
    return fig


def _limit(value: float | str | None, shown: np.ndarray, *, default: float) -> float:
    """A colour limit: a number, a percentile ``"p99"`` of the values shown, or min/max."""
    if isinstance(value, str):
        if not value.startswith("p"):
            raise ValueError(
                f"A colour limit must be a number or 'pNN' (percentile), got {value!r}."
            )
        percentile = float(value[1:])
    elif value is not None:
        return float(value)
    else:
        percentile = default
    return float(np.percentile(shown, percentile)) if shown.size else default / 100.0


def _spot_box(section: Section) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` around a section's spots, one spot diameter of margin."""
    margin = 3.0 * section.spot_radius
    lo = section.spatial.min(axis=0) - margin
    hi = section.spatial.max(axis=0) + margin
    return (max(float(lo[0]), 0.0), max(float(lo[1]), 0.0), float(hi[0]), float(hi[1]))


def _none(value: object) -> object:
    return None if value is None or value == "None" else value


def _short(target_sum: object) -> str:
    value = float(target_sum)  # type: ignore[arg-type]
    exponent = np.log10(value)
    return f"1e{int(exponent)}" if exponent.is_integer() else f"{value:g}"


def _panel_table(
    stack: SectionStack, values: dict[str, np.ndarray], *, max_side: int, img: bool
) -> AnnData:
    """A legacy squidpy-layout AnnData of the spots, one library per section.

    :func:`squidpy.pl.spatial_scatter` reads images and spot sizes from
    ``uns['spatial'][library]``; SpatialData inputs and pyramid levels are mapped onto that
    layout here, with each section's image at a display resolution and its scale factor.
    """
    import pandas as pd
    from anndata import AnnData

    rows = np.concatenate([s.rows for s in stack.sections])
    obs = pd.DataFrame(
        {kind: v[rows] for kind, v in values.items()},
        index=stack.table.obs_names[rows],
    )
    obs[stack.library_key] = pd.Categorical(
        np.concatenate([[s.name] * s.n_spots for s in stack.sections]), categories=stack.names
    )
    spatial, uns = [], {}
    for section in stack.sections:
        spatial.append(section.spatial)
        entry = {
            Key.legacy.scalefactors: {
                Key.legacy.spot_diameter: 2.0 * section.spot_radius,
                Key.legacy.hires_scalef: 1.0,
            }
        }
        if img and section.has_image:
            image, scale = _uniform(*stack.image(section.name, max_side=max_side))
            entry[Key.legacy.images] = {Key.legacy.hires: image}
            entry[Key.legacy.scalefactors][Key.legacy.hires_scalef] = scale
        uns[section.name] = entry
    adata = AnnData(obs=obs, obsm={"spatial": np.vstack(spatial)}, uns={"spatial": uns})
    return adata


def _uniform(image: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, float]:
    """Resample so both axes share one scale factor (squidpy takes a scalar)."""
    sx, sy = (float(v) for v in np.ravel(scale)[:2])
    if abs(sx - sy) <= 1e-3 * max(sx, sy):
        return image, sx
    from skimage.transform import resize

    s = max(sx, sy)
    shape = (round(image.shape[0] * s / sy), round(image.shape[1] * s / sx))
    image = resize(image, shape, preserve_range=True, anti_aliasing=False).astype(np.uint8)
    return image, s


def _scatter(adata: AnnData, kind: str, name: str, *, library_key: str, ax: Axes, **kw) -> None:
    import squidpy as sq

    img = kw.pop("img")
    title = kw.pop("title")
    has_image = Key.legacy.images in adata.uns["spatial"][name]
    sq.pl.spatial_scatter(
        adata,
        color=kind,
        library_id=[name],
        library_key=library_key,
        shape="circle",
        img=img and has_image,
        img_res_key=Key.legacy.hires,
        colorbar=False,
        title=title,
        frameon=False,
        ax=ax,
        **kw,
    )
    ax.set_xlabel("")
    ax.set_ylabel("")


def _empty(ax: Axes, title: str) -> None:
    ax.set_axis_off()
    ax.set_title(title, fontsize="medium", color="0.4")
