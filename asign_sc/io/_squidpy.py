"""squidpy's / scanpy's per-library ``uns['spatial']`` for a stack's table.

:func:`squidpy.pl.spatial_scatter` and :func:`scanpy.pl.spatial` read spot centres from
``obsm['spatial']`` and, per library, an image and its scale factors from
``uns['spatial'][library_id]``. A SpatialData keeps these in its elements; this module
copies them next to the table so the table plots as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc._utils import is_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["HIRES_SIDE", "LOWRES_SIDE", "add_squidpy_spatial", "squidpy_libraries"]

logger = logging.getLogger(__name__)

#: Long side in pixels (at least) of the ``'hires'`` image of each section (a pyramid level).
HIRES_SIDE = 1000
#: Long side in pixels (at least) of the ``'lowres'`` image of each section (a pyramid level).
LOWRES_SIDE = 400
#: Scale-factor key of each image key.
_SCALEF = {Key.legacy.hires: Key.legacy.hires_scalef, Key.legacy.lowres: Key.legacy.lowres_scalef}


def squidpy_libraries(
    stack: SectionStack, *, resolutions: Mapping[str, int | None]
) -> tuple[np.ndarray, dict[str, dict]]:
    """Spot centres and per-section ``uns['spatial']`` entries of a stack.

    Parameters
    ----------
    stack
        A resolved stack.
    resolutions
        Image keys to store (``'hires'`` and/or ``'lowres'``) and, for each, the long side in
        pixels the stored image reaches at least: the coarsest stored pyramid level that
        large (the finest when the image is smaller), never resampled, so its
        ``tissue_{key}_scalef`` is exact. ``None``: full resolution.

    Returns
    -------
    ``obsm['spatial']`` (``(n_obs, 2)`` spot centres in full-resolution pixels of each
    section's image) and ``{section: {'images': {key: uint8 (h, w, 3)}, 'scalefactors':
    {'tissue_{key}_scalef': s, 'spot_diameter_fullres': d}, 'metadata': {}}}``. Sections
    without an image get empty ``'images'`` and only the spot diameter.
    """
    spatial = np.empty((stack.table.n_obs, 2), dtype=float)
    libraries = {}
    for section in stack:
        spatial[section.rows] = section.spatial
        scalefactors = {Key.legacy.spot_diameter: 2.0 * section.spot_radius}
        images = {}
        for key, side in resolutions.items() if section.has_image else ():
            image, scale = stack.image(section.name, max_side=side)
            # Pyramid levels are rounded to whole pixels, so sx and sy differ by less than
            # one pixel over the image; the legacy layout has a single factor.
            scalefactors[_SCALEF[key]] = float(np.mean(scale))
            images[key] = np.ascontiguousarray(image)
        libraries[section.name] = {
            Key.legacy.images: images,
            Key.legacy.scalefactors: scalefactors,
            "metadata": {},
        }
    return spatial, libraries


def add_squidpy_spatial(
    sdata: SpatialData,
    *,
    library_key: str = Key.obs.library,
    table_key: str = Key.sdata.table,
    hires_side: int | None = HIRES_SIDE,
    lowres_side: int | None = LOWRES_SIDE,
) -> None:
    """Write squidpy's ``obsm['spatial']`` and per-section ``uns['spatial']`` into the table.

    The readers (:func:`asign_sc.io.read_her2st`, :func:`asign_sc.io.read_visium_stack`,
    :func:`asign_sc.io.build_spatialdata`, :func:`asign_sc.io.from_legacy_anndata`) call
    this, so a stack's table works directly with
    ``squidpy.pl.spatial_scatter(table, color=gene, layer="asign", library_key="section")``
    and, per section, ``scanpy.pl.spatial(table[table.obs.section == s], library_id=s)``.
    Call it yourself on a SpatialData built elsewhere. It is stored with the table, so it
    survives ``sdata.write`` / :func:`spatialdata.read_zarr`.

    Parameters
    ----------
    sdata
        A SpatialData that follows the stack contract.
    library_key
        ``obs`` column naming each spot's section (the squidpy ``library_key``).
    table_key
        Name of the table element.
    hires_side, lowres_side
        Long side in pixels the ``'hires'`` / ``'lowres'`` image of each section reaches at
        least (the coarsest pyramid level that large; ``None``: full resolution).

    Returns
    -------
    Nothing; sets ``table.obsm['spatial']`` (spot centres in full-resolution pixels of each
    section's image) and ``table.uns['spatial'][section]`` with ``'images'`` (``'hires'``,
    ``'lowres'``) and ``'scalefactors'`` (``'tissue_hires_scalef'``,
    ``'tissue_lowres_scalef'``, ``'spot_diameter_fullres'``).

    Raises
    ------
    InvalidStackError
        The stack breaks the data contract (e.g. spots outside their image); the readers
        therefore refuse such a stack as they build it.
    """
    if not is_spatialdata(sdata):
        raise TypeError(
            f"add_squidpy_spatial expects a SpatialData, got {type(sdata).__name__}. An "
            "AnnData in squidpy's layout already has uns['spatial']."
        )
    for name, side in (("hires_side", hires_side), ("lowres_side", lowres_side)):
        if side is not None and side < 1:
            raise ValueError(f"{name} must be a positive number of pixels or None, got {side}.")
    stack = resolve_stack(sdata, library_key=library_key, table_key=table_key)
    spatial, libraries = squidpy_libraries(
        stack, resolutions={Key.legacy.hires: hires_side, Key.legacy.lowres: lowres_side}
    )
    table = sdata.tables[table_key]
    table.obsm[Key.obsm.spatial] = spatial
    table.uns[Key.uns.spatial] = libraries
    logger.debug(
        "Added obsm[%r] and uns[%r] (squidpy layout) for %d sections.",
        Key.obsm.spatial,
        Key.uns.spatial,
        len(libraries),
    )
