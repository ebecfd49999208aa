"""``pl.sections``: a gene on every section over its H&E, measured beside imputed."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from asign_sc._docs import doc_params
from asign_sc._keys import Key
from asign_sc._stack import Section, SectionStack, resolve_stack
from asign_sc.pl._common import PLOT_DOCS, finish, imputed_values, measured_values
from asign_sc.pp._expression import DEFAULT_TARGET_SUM

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["sections"]

logger = logging.getLogger(__name__)


@doc_params(**PLOT_DOCS)
def sections(
    data: AnnData | SpatialData,
    color: str,
    *,
    key: str = Key.layers.imputed,
    sections: Sequence[str] | None = None,
    compare: Literal["truth"] | None = "truth",
    coordinate_system: Literal["section", "aligned"] = "section",
    registration_key: str = Key.sdata.aligned,
    img: bool = True,
    crop: bool = True,
    scalebar: bool = True,
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
    return_fig: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure | None:
    """Expression of one gene on every section, over its H&E, measured beside imputed.

    One column per section. With ``compare="truth"`` the top row is the measured expression
    and the bottom row the imputed one (a section without counts gets an empty "not
    measured" panel); otherwise one row with the imputation, which on the known sections
    holds their measured values (except ``method="network"``; the titles say which). All
    panels share one colour scale, so a colour means the same expression everywhere, and
    one size, so the sections compare at a glance. Spots are drawn as discs of their true
    radius, by :func:`squidpy.pl.spatial_scatter` (same look and arguments).

    Parameters
    ----------
    data
        The stack holding an imputation (:func:`asign_sc.tl.impute`).
    color
        Gene to show (a ``var_name`` that was imputed).
    key
        ``key_added`` of the imputation: its values ``obsm[key]`` and parameters ``uns[key]``.
    sections
        Sections to show, in order. Default: all, in stacking order.
    compare
        ``"truth"``: add the measured expression, ``log1p`` counts per ``target_sum`` of
        the imputation (its scale). ``None``: the imputation only.
    coordinate_system
        ``"section"``: each section as it lies on its slide (its own pixel frame).
        ``"aligned"``: every section in the registered frame of
        :func:`asign_sc.tl.register_sections` (its image warped by the stored affine matrix,
        its spots at ``obsm['spatial_aligned']``), all panels with the same extent, so
        the same place of the tissue is at the same place in every panel.
    registration_key
        ``key_added`` of the registration used with ``coordinate_system="aligned"``.
    img
        Draw each section's H&E below its spots.
    crop
        Zoom each panel to its section's spots (``"aligned"``: to all sections' spots),
        with a margin of one spot diameter (as :func:`squidpy.pl.spatial_scatter`'s
        ``crop_coord``); ``False`` shows the whole slide.
    scalebar
        Draw a scale bar in µm in each panel when the pixel size is known
        (``uns['asign_stack']['microns_per_pixel']``, written by the readers; in the
        aligned frame, the reference section's).
    library_key
        ``obs`` column naming each spot's section.
    spatial_key
        ``obsm`` key of spot centres in each section's image pixels (legacy AnnData).
    counts_layer
        Layer of raw counts for the measured panels; default the imputation's, else ``X``.
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
    {show_save}
    ax
        Axes to draw into, one per panel (row by row); a new figure if ``None``.

    Returns
    -------
    The figure with ``show=False`` or ``return_fig=True``, else ``None``. Panel titles
    name the section and what is shown.

    Raises
    ------
    KeyError
        ``color`` was not imputed, ``obsm[key]`` is missing, or (``"aligned"``) the stack
        has no registration under ``registration_key``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if compare not in ("truth", None):
        raise ValueError(f"compare must be 'truth' or None, got {compare!r}.")
    if coordinate_system not in ("section", "aligned"):
        raise ValueError(
            f"coordinate_system must be 'section' or 'aligned', got {coordinate_system!r}."
        )
    stack = resolve_stack(
        data,
        library_key=library_key,
        sections=sections,
        spatial_key=spatial_key,
        require_images=img,
    )
    table = stack.table
    record = table.uns.get(Key.uns.params(key), {}).get("impute", {})
    imputed = imputed_values(table, color, key=key)
    known = {str(s) for s in np.atleast_1d(record.get("known_sections", []))}
    measured_input = record.get("method") != "network"  # known spots keep their counts
    names = stack.names
    rows_of = {"imputed": imputed}
    measured_ok: dict[str, bool] = {}
    if compare == "truth":
        if counts_layer is None:
            counts_layer = _none(record.get("counts_layer", record.get("layer")))
        target_sum = float(record.get("target_sum", DEFAULT_TARGET_SUM))
        truth, has = measured_values(table, color, layer=counts_layer, target_sum=target_sum)
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
    fig, grid = _grid(ax, nrows, ncols, figsize=figsize, dpi=dpi)

    if coordinate_system == "aligned":
        adata, boxes = _aligned_table(
            stack, rows_of, registration_key=registration_key, max_side=max_side, img=img,
            crop=crop,
        )  # fmt: skip
    else:
        adata = _panel_table(stack, rows_of, max_side=max_side, img=img)
        boxes = {n: _spot_box(stack[n]) if crop else _slide_box(stack[n]) for n in names}
        boxes = _same_aspect(boxes)
    for i, name in enumerate(names):
        block, col = divmod(i, ncols)
        for k, kind in enumerate(kinds):
            panel = grid[block * len(kinds) + k, col]
            if kind == "measured" and not measured_ok.get(name, False):
                _empty(panel, f"{name}: not measured")
                continue
            factors = adata.uns["spatial"][name][Key.legacy.scalefactors]
            scalef = factors[Key.legacy.hires_scalef]
            microns = factors.get(_MICRONS)
            _scatter(
                adata,
                kind,
                name,
                library_key=library_key,
                ax=panel,
                img=img,
                size=size,
                cmap=cmap,
                norm=norm,
                img_alpha=img_alpha,
                alpha=alpha,
                title=_title(name, kind, known=name in known, compare=compare,
                             measured_input=measured_input),
                **({"scalebar_dx": microns / scalef, "scalebar_units": "um",
                    "scalebar_kwargs": _SCALEBAR} if scalebar and microns else {}),
            )  # fmt: skip
            x0, y0, x1, y1 = (v * scalef for v in boxes[name])
            panel.set_xlim(x0, x1)
            panel.set_ylim(y1, y0)
            panel.set_aspect("equal")
    for panel in grid.ravel()[len(names) * len(kinds) :]:
        if not panel.has_data() and not panel.images:
            panel.set_axis_off()
    if ax is None:
        for i in range(len(names), n_blocks * ncols):
            block, col = divmod(i, ncols)
            for k in range(len(kinds)):
                grid[block * len(kinds) + k, col].set_axis_off()
    if compare == "truth":
        scale = "measured / imputed"
    elif known and measured_input:
        scale = "imputed; known: measured"
    else:
        scale = "imputed"
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=list(grid.ravel()),
        shrink=0.6,
        label=f"{color}\nlog1p counts per {_short(record.get('target_sum', DEFAULT_TARGET_SUM))}"
        f"\n({scale})",
    )
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi)


#: ``scalefactors`` entry (ours, beside squidpy's) with the pixel size of a panel's frame.
_MICRONS = "microns_per_pixel"
_SCALEBAR = {"location": "lower right", "frameon": False, "font_properties": {"size": "small"}}


def _title(name: str, kind: str, *, known: bool, compare: str | None, measured_input: bool) -> str:
    if kind == "measured":
        return f"{name}: measured"
    if not known:
        return f"{name}: imputed"
    if not measured_input:
        return f"{name}: predicted (known)"
    return f"{name}: input (known)" if compare == "truth" else f"{name}: measured (known)"


def _grid(
    ax: Axes | Sequence[Axes] | None,
    nrows: int,
    ncols: int,
    *,
    figsize: tuple[float, float] | None,
    dpi: float | None,
) -> tuple[Figure, np.ndarray]:
    import matplotlib.pyplot as plt

    if ax is None:
        fig, grid = plt.subplots(
            nrows,
            ncols,
            figsize=figsize or (2.8 * ncols + 0.8, 2.8 * nrows),
            dpi=dpi,
            squeeze=False,
            layout="constrained",
        )
        return fig, grid
    axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
    if len(axes) != nrows * ncols:
        raise ValueError(
            f"ax has {len(axes)} axes but {nrows * ncols} panels are needed "
            f"({nrows} rows x {ncols} columns)."
        )
    grid = np.asarray(axes, dtype=object).reshape(nrows, ncols)
    return grid[0, 0].figure, grid


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


def _slide_box(section: Section) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the whole slide image (the spots' box without an image)."""
    if not section.has_image:
        return _spot_box(section)
    h, w = section.image_shape
    return (0.0, 0.0, w / section.image_scale, h / section.image_scale)


def _same_aspect(
    boxes: dict[str, tuple[float, float, float, float]],
) -> dict[str, tuple[float, float, float, float]]:
    """Widen or heighten boxes about their centres to one width/height ratio (equal panels)."""
    ratio = max((x1 - x0) / max(y1 - y0, 1e-9) for x0, y0, x1, y1 in boxes.values())
    out = {}
    for name, (x0, y0, x1, y1) in boxes.items():
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        w, h = max(w, h * ratio), max(h, w / ratio)
        out[name] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return out


def _microns(table: AnnData, name: str) -> float | None:
    """Pixel size of a section's own frame, as the readers record it, or ``None``."""
    record = table.uns.get(Key.uns.stack, {})
    value = record.get(_MICRONS, {}).get(name) if isinstance(record, dict) else None
    return float(value) if value is not None and np.isfinite(float(value)) else None


def _aligned_table(
    stack: SectionStack,
    values: dict[str, np.ndarray],
    *,
    registration_key: str,
    max_side: int,
    img: bool,
    crop: bool,
) -> tuple[AnnData, dict[str, tuple[float, float, float, float]]]:
    """Like :func:`_panel_table`, in the registered frame: images warped, spots aligned.

    Every section's image is resampled onto one grid over the common extent (``max_side``
    pixels on its long side) with the stored affine matrix; spots sit at
    ``obsm['spatial_aligned']`` (which includes any non-linear part of the registration).
    Coordinates are shifted so that the extent starts at the origin, as squidpy expects.
    """
    from asign_sc.tl._registration import registration_key as keys_of
    from asign_sc.tl._registration_init import warp_to

    table = stack.table
    obsm_key, uns_key = keys_of(registration_key)
    if uns_key not in table.uns or obsm_key not in table.obsm:
        raise KeyError(
            f"coordinate_system='aligned' needs a registration: uns[{uns_key!r}] / "
            f"obsm[{obsm_key!r}] are missing. Run asign_sc.tl.register_sections(data, "
            f"key_added={registration_key!r}) first, or use coordinate_system='section'."
        )
    record = table.uns[uns_key]
    matrices = {str(k): np.asarray(v, dtype=float) for k, v in record["matrices"].items()}
    missing = [n for n in stack.names if n not in matrices]
    if missing:
        raise KeyError(
            f"Sections {missing} have no matrix in uns[{uns_key!r}]['matrices']; register "
            "them or leave them out with sections=."
        )
    aligned = np.asarray(table.obsm[obsm_key], dtype=float)[:, :2]
    if crop:
        corners = [
            np.r_[aligned[s.rows] - 3 * s.spot_radius, aligned[s.rows] + 3 * s.spot_radius]
            for s in stack.sections
        ]
    else:
        corners = []
        for s in stack.sections:
            x0, y0, x1, y1 = _slide_box(s)
            box = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]])
            corners.append((box @ matrices[s.name].T)[:, :2])
    points = np.vstack(corners)
    origin, end = points.min(axis=0), points.max(axis=0)
    span = end - origin
    d = max_side / max(float(span.max()), 1e-9)
    shape = (max(1, round(span[1] * d)), max(1, round(span[0] * d)))
    reference = record.get("reference", "")

    adata = _panel_table(stack, values, max_side=max_side, img=False)
    for section in stack.sections:
        matrix = matrices[section.name]
        stretch = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
        ref = reference.get(section.sample, "") if isinstance(reference, dict) else reference
        entry = adata.uns["spatial"][section.name]
        factors = entry[Key.legacy.scalefactors]
        factors[Key.legacy.spot_diameter] = 2.0 * section.spot_radius * stretch
        factors[Key.legacy.hires_scalef] = d
        factors[_MICRONS] = _microns(table, str(ref))
        if img and section.has_image:
            image, scale = stack.image(section.name, max_side=max_side)
            kwargs = {"dst_offset": origin}
            warped = warp_to(image, matrix, scale, (d, d), shape, order=1, **kwargs)
            inside = warp_to(np.ones(image.shape[:2]), matrix, scale, (d, d), shape, order=0,
                             **kwargs) > 0.5  # fmt: skip
            warped[~inside] = 255.0  # white outside the slide, as the paper around it
            entry[Key.legacy.images] = {Key.legacy.hires: np.clip(warped, 0, 255).astype(np.uint8)}
    rows = np.concatenate([s.rows for s in stack.sections])
    adata.obsm["spatial"] = aligned[rows] - origin
    box = (0.0, 0.0, float(span[0]), float(span[1]))
    return adata, dict.fromkeys(stack.names, box)


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
                _MICRONS: _microns(stack.table, section.name),
            }
        }
        if img and section.has_image:
            image, scale = _uniform(*stack.image(section.name, max_side=max_side))
            entry[Key.legacy.images] = {Key.legacy.hires: image}
            entry[Key.legacy.scalefactors][Key.legacy.hires_scalef] = scale
        uns[section.name] = entry
    return AnnData(obs=obs, obsm={"spatial": np.vstack(spatial)}, uns={"spatial": uns})


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
    with warnings.catch_warnings():
        # squidpy's docstrings name keys its docrep templates lack ("'n_jobs' is not a valid
        # key!"): a SyntaxWarning about squidpy's own docs, shown once at its first import
        warnings.filterwarnings("ignore", message=".* is not a valid key!", category=SyntaxWarning)
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
