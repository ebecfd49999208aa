"""Convert between the contract's SpatialData and squidpy's legacy AnnData layout."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import resolve_stack
from asign_sc._utils import is_spatialdata
from asign_sc.io._build import SectionInput, build_spatialdata
from asign_sc.io._squidpy import squidpy_libraries

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["from_legacy_anndata", "to_legacy_anndata"]

logger = logging.getLogger(__name__)

#: ``uns`` entries that describe a table's place in a SpatialData; they are rebuilt, not copied.
_SPATIALDATA_ATTRS = "spatialdata_attrs"


def to_legacy_anndata(
    sdata: SpatialData,
    *,
    library_key: str = Key.obs.library,
    max_side: int | None = 2000,
    table_key: str = Key.sdata.table,
) -> AnnData:
    """Copy a stack's table into squidpy's legacy (scanpy Visium) AnnData layout.

    The result works with :func:`squidpy.pl.spatial_scatter` (``library_key=``),
    :func:`scanpy.pl.spatial` and any tool that reads ``uns['spatial']``.

    Parameters
    ----------
    sdata
        A SpatialData that follows the stack contract (e.g. from
        :func:`asign_sc.io.read_her2st` or :func:`asign_sc.io.read_visium_stack`).
    library_key
        Column of ``obs`` naming each spot's section.
    max_side
        Each section's image is stored as ``'hires'`` at the coarsest stored pyramid level
        whose long side is at least ``max_side`` pixels (at most twice that with factor-2
        pyramids; the finest level when the image is smaller). No resampling is done, so
        ``tissue_hires_scalef`` is exact. ``None`` stores full resolution.
    table_key
        Name of the table element.

    Returns
    -------
    A new AnnData (``sdata`` is not modified): the table's ``X``, ``obs``, ``var``,
    ``layers``, ``obsm``, ``obsp`` and ``uns``, with ``obsm['spatial']`` the spot centres
    ``(x, y)`` in full-resolution pixels of each section's own image and, per section,
    ``uns['spatial'][section] = {'images': {'hires': uint8 (h, w, 3)}, 'scalefactors':
    {'tissue_hires_scalef': s, 'spot_diameter_fullres': d}}``. Sections without an image
    get an empty ``'images'``.
    """
    if not is_spatialdata(sdata):
        raise TypeError(
            f"to_legacy_anndata expects a SpatialData, got {type(sdata).__name__}. An AnnData "
            "already is in the legacy layout (see from_legacy_anndata for the other way)."
        )
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels or None, got {max_side}.")
    stack = resolve_stack(sdata, library_key=library_key, table_key=table_key)
    adata = stack.table.copy()
    adata.uns.pop(_SPATIALDATA_ATTRS, None)

    spatial, libraries = squidpy_libraries(stack, resolutions={Key.legacy.hires: max_side})
    adata.obsm[Key.obsm.spatial] = spatial
    adata.uns[Key.uns.spatial] = libraries
    logger.info(
        "Legacy AnnData: %d spots in %d sections, obsm[%r] and uns[%r] (hires images with "
        "long side >= %s px).",
        adata.n_obs,
        len(stack),
        Key.obsm.spatial,
        Key.uns.spatial,
        max_side,
    )
    return adata


def from_legacy_anndata(
    adata: AnnData,
    *,
    library_key: str = Key.obs.library,
    spatial_key: str = Key.obsm.spatial,
) -> SpatialData:
    """Build a contract SpatialData from an AnnData in squidpy's legacy layout.

    Parameters
    ----------
    adata
        AnnData with ``obs[library_key]`` (the section of each spot; categories of a
        categorical column give the stacking order), ``obsm[spatial_key]`` (spot centres
        ``(x, y)`` in full-resolution pixels) and, per section,
        ``uns['spatial'][section]['scalefactors']['spot_diameter_fullres']`` plus optionally
        ``'images'`` (``'hires'``/``'lowres'`` with their ``tissue_*_scalef``).
    library_key
        Column of ``obs`` naming each spot's section.
    spatial_key
        ``obsm`` key of the spot centres.

    Returns
    -------
    SpatialData with per section ``{s}_image`` (the largest legacy image, as a multiscale
    image scaled onto full-resolution pixels) and ``{s}_spots`` in coordinate system ``s``,
    and one table. Spots are grouped by section in stacking order; ``X`` becomes CSR
    ``float32``; ``obs`` columns, ``var``, ``varm``, ``varp``, ``layers``, ``obsm``, ``obsp``,
    ``raw`` and ``uns`` (except ``'spatial'``, which the elements replace) are kept.
    ``obs['region']`` and ``obs['spot_id']`` are rewritten to link the table to the spots.
    ``adata`` is not modified.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(
            f"from_legacy_anndata expects an AnnData, got {type(adata).__name__}."
            + (" It already is a SpatialData." if is_spatialdata(adata) else "")
        )
    if adata.X is None:
        raise InvalidStackError(
            "adata.X is empty: the table needs expression values (raw counts) in X."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise InvalidStackError(
            f"Gene names (var_names) are not unique, e.g. {dup}. Call "
            "adata.var_names_make_unique() first."
        )
    stack = resolve_stack(adata, library_key=library_key, spatial_key=spatial_key)
    # resolve_stack accepts a plain AnnData (radius unknown); the legacy layout has one
    missing = [s.name for s in stack if not np.isfinite(s.spot_radius)]
    if missing:
        raise InvalidStackError(
            f"uns['spatial'][{missing[0]!r}] is missing (sections without it: {missing}): "
            "the legacy layout needs, per section, uns['spatial'][section]['scalefactors']"
            f"[{Key.legacy.spot_diameter!r}] (and optionally 'images'), as squidpy does."
        )
    previous = adata.uns.get(Key.uns.stack, {})
    microns = previous.get("microns_per_pixel", {}) if isinstance(previous, dict) else {}

    inputs = []
    for section in stack:
        image, scale = (None, (1.0, 1.0))
        if section.has_image:
            image, scale = stack.image(section.name)
        inputs.append(
            SectionInput(
                name=section.name,
                counts=adata.X[section.rows],
                genes=adata.var_names,
                obs=adata.obs.iloc[section.rows],
                spatial=section.spatial,
                spot_radius=section.spot_radius,
                image=image,
                image_scale=float(scale[0]),
                microns_per_pixel=microns.get(section.name),
            )
        )
    sdata = build_spatialdata(inputs, library_key=library_key)

    table = sdata.tables[Key.sdata.table]
    order = np.concatenate([section.rows for section in stack])
    source = adata[order]
    # build_spatialdata keeps obs_names and the gene order; check before copying by position.
    if not (table.obs_names.equals(source.obs_names) and table.var_names.equals(adata.var_names)):
        raise RuntimeError("Internal error: the built table's rows or genes are out of order.")
    table.var = adata.var.copy()
    for key in adata.varm:
        table.varm[key] = adata.varm[key].copy()
    for key in adata.varp:
        table.varp[key] = adata.varp[key].copy()
    for key in source.layers:
        table.layers[key] = source.layers[key].copy()
    for key in source.obsm:
        if key not in {spatial_key, Key.obsm.spatial}:
            value = source.obsm[key]
            table.obsm[key] = value.copy() if isinstance(value, pd.DataFrame) else np.array(value)
    for key in source.obsp:
        table.obsp[key] = source.obsp[key].copy()
    if adata.raw is not None:
        table.raw = adata.raw.to_adata()[order].copy()
    for key, value in adata.uns.items():
        if key not in {Key.uns.spatial, Key.uns.stack, _SPATIALDATA_ATTRS}:
            table.uns[key] = copy.deepcopy(value)
    logger.info(
        "SpatialData from legacy AnnData: %d spots in %d sections (%d with images).",
        table.n_obs,
        len(stack),
        sum(section.has_image for section in stack),
    )
    return sdata
