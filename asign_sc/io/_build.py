"""Assemble per-section inputs into a SpatialData that follows the stack contract."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import to_uint8_rgb

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["SectionInput", "build_spatialdata", "pyramid_scale_factors"]

#: Pyramid levels are added while the next level's long side stays at or above this.
_MIN_PYRAMID_SIDE = 512
#: Side of the dask chunks of every pyramid level (2048 px of uint8 RGB: 12 MB).
_CHUNK = 2048
#: Output rows of a pyramid level computed at once (bounds the uint16 temporaries).
_HALVE_ROWS = 512


@dataclass
class SectionInput:
    """Everything needed to add one section to a stack.

    ``spatial`` and ``spot_radius`` are in full-resolution pixels: the section's own
    coordinate system. ``image`` (``(y, x, c)``, ideally ``uint8`` RGB; other layouts and
    dtypes are converted as :func:`asign_sc._stack.to_uint8_rgb` says) may be downsampled;
    then ``image_scale`` is its pixels per full-resolution pixel (e.g. Visium's
    ``tissue_hires_scalef``). A ``uint8`` RGB image is not copied: the finest level of the
    SpatialData's image reads the array itself, so do not modify it afterwards.
    """

    name: str
    counts: sp.spmatrix | np.ndarray
    genes: Sequence[str]
    obs: pd.DataFrame
    spatial: np.ndarray
    spot_radius: float
    image: np.ndarray | None = None
    image_scale: float = 1.0
    microns_per_pixel: float | None = None
    obsm: Mapping[str, np.ndarray] = field(default_factory=dict)


def pyramid_scale_factors(shape: tuple[int, ...]) -> list[int]:
    """Factors of 2 until the long side would drop below ``_MIN_PYRAMID_SIDE`` pixels."""
    side, factors = max(shape), []
    while side // 2 >= _MIN_PYRAMID_SIDE:
        factors.append(2)
        side //= 2
    return factors


def build_spatialdata(
    sections: Sequence[SectionInput],
    *,
    sample: str | None = None,
    library_key: str = Key.obs.library,
) -> SpatialData:
    """Build the contract's SpatialData from per-section inputs (in stacking order).

    Genes are the union over sections in order of first appearance; a gene absent from a
    section's matrix has zero counts there (the file simply had no column for it).

    Images become ``(y, x, 3)`` ``uint8``: grey is repeated to RGB, RGBA is composited over
    white, 16-bit integers are scaled by 255/65535 and floats in [0, 1] by 255.

    Raises
    ------
    InvalidStackError
        No sections, duplicated names, a section without spots, spot centres that are not
        a finite ``(n, 2)`` array, a non-positive spot radius, counts whose shape does not
        match the spots and genes, duplicated genes, or an image that cannot be converted
        (the message names the section and the dtype).
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from asign_sc.io._squidpy import add_squidpy_spatial

    if not sections:
        raise InvalidStackError("No sections given: pass one SectionInput per section.")
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise InvalidStackError(f"Duplicated section names: {names}.")
    sections = [_checked(s) for s in sections]
    images, shapes = {}, {}
    for s in sections:
        frame = {Key.sdata.coordinate_system(s.name): Identity()}
        shapes[Key.sdata.spots(s.name)] = ShapesModel.parse(
            np.asarray(s.spatial, dtype=float),
            geometry=0,
            radius=np.full(len(s.spatial), float(s.spot_radius)),
            index=pd.RangeIndex(len(s.spatial)),
            transformations=frame,
        )
        if s.image is not None:
            to_frame = (
                Identity()
                if s.image_scale == 1
                else Scale([1 / s.image_scale] * 2, axes=("x", "y"))
            )
            images[Key.sdata.image(s.name)] = _multiscale_image(
                Image2DModel, s.image, {Key.sdata.coordinate_system(s.name): to_frame}
            )
    table = _stack_table(sections, library_key=library_key, sample=sample)
    table = TableModel.parse(
        table,
        region=[Key.sdata.spots(n) for n in names],
        region_key=Key.obs.region,
        instance_key=Key.obs.instance,
    )
    sdata = SpatialData(images=images, shapes=shapes, tables={Key.sdata.table: table})
    add_squidpy_spatial(sdata, library_key=library_key)  # the table plots with squidpy/scanpy
    return sdata


def _multiscale_image(model: type, image: np.ndarray, transformations: dict):
    """The image as a multiscale element whose levels are in memory, computed once.

    spatialdata's own pyramid (``scale_factors=``) is lazy: xarray's ``coarsen().mean()``
    in float64 over dask chunks, recomputed at every read unless persisted, and dask's
    ``from_array`` copies the whole image first. Here the element's structure (levels,
    coordinates, transformations) comes from ``model.parse`` as before, and each level's
    data is replaced by :func:`_halve` of the previous level, byte-identical to
    ``coarsen(boundary="trim", side="right").mean().astype(uint8)`` (checked in the tests)
    at a fraction of the time; the finest level reads ``image`` itself, chunk by chunk.
    """
    import xarray as xr

    factors = pyramid_scale_factors(image.shape[:2])
    element = model.parse(
        _dask_view(image),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"][: image.shape[2]],
        scale_factors=factors or None,
        chunks=(image.shape[2], _CHUNK, _CHUNK),
        transformations=transformations,
    )
    if not factors:
        return element
    level = image
    for index in range(1, len(factors) + 1):
        level = _halve(level)
        node = element[f"scale{index}"].to_dataset()
        (variable,) = node.data_vars
        if node[variable].shape != (level.shape[2], *level.shape[:2]):
            raise RuntimeError(  # spatialdata changed how it trims odd sides
                f"Pyramid level {index} is {node[variable].shape}, computed {level.shape}."
            )
        node[variable] = node[variable].copy(data=_dask_view(level))
        element[f"scale{index}"] = xr.DataTree(node)
    return element


def _halve(level: np.ndarray) -> np.ndarray:
    """``(y, x, c)`` ``uint8`` level -> the next one: floor of the mean of 2 x 2 blocks.

    As xarray's ``coarsen(..., boundary="trim", side="right")``, an odd side drops its
    *first* row or column. Sums in ``uint16`` over bands of rows, so the temporaries stay
    small; the mean of four integers is exact, and its floor is what ``astype(uint8)`` of
    the float mean gives.
    """
    first_row, first_col = level.shape[0] % 2, level.shape[1] % 2
    height, width = level.shape[0] // 2, level.shape[1] // 2
    out = np.empty((height, width, level.shape[2]), dtype=np.uint8)
    for start in range(0, height, _HALVE_ROWS):
        stop = min(start + _HALVE_ROWS, height)
        band = level[first_row + 2 * start : first_row + 2 * stop, first_col:].astype(np.uint16)
        rows = band[0::2] + band[1::2]
        out[start:stop] = (rows[:, 0::2] + rows[:, 1::2]) // 4
    return out


def _dask_view(image: np.ndarray):
    """``(y, x, c)`` array -> ``(c, y, x)`` dask array whose chunks are views of it.

    ``dask.array.from_array`` copies a NumPy array whole before cutting it into chunks (a
    second full-resolution copy of every section while a stack is built); here the chunks
    put in the graph are slices of ``image`` itself, as ``from_array`` puts its copy's. Each
    chunk is a graph value of its own, so a distributed client ships only the chunks a task
    reads. The random name spares hashing the pixels.
    """
    import itertools

    import dask.array as da
    from dask.array.core import slices_from_chunks
    from dask.highlevelgraph import HighLevelGraph

    planar = image.transpose(2, 0, 1)
    chunks = da.core.normalize_chunks((image.shape[2], _CHUNK, _CHUNK), planar.shape)
    name = f"image-{uuid.uuid4().hex}"
    blocks = itertools.product(*(range(len(sizes)) for sizes in chunks))
    graph = {
        (name, *block): planar[where]
        for block, where in zip(blocks, slices_from_chunks(chunks), strict=True)
    }
    return da.Array(
        HighLevelGraph.from_collections(name, graph, dependencies=()),
        name,
        chunks,
        dtype=image.dtype,
        meta=np.empty((0, 0, 0), dtype=image.dtype),
    )


def _checked(section: SectionInput) -> SectionInput:
    """Validate one section's input; returns it with the image as ``(y, x, 3)`` ``uint8``.

    The input itself is not modified (a new :class:`SectionInput` is returned).
    """
    name = section.name
    if not isinstance(name, str) or not name:
        raise InvalidStackError(f"Section name {name!r} is not a non-empty string.")
    spatial = np.asarray(section.spatial)
    if spatial.ndim != 2 or spatial.shape[1] != 2:
        raise InvalidStackError(
            f"Section {name!r}: spatial has shape {spatial.shape}; expected (n_spots, 2) "
            "spot centres (x, y) in full-resolution pixels."
        )
    if len(spatial) == 0:
        raise InvalidStackError(
            f"Section {name!r} has no spots (0 rows in spatial). Leave the section out, or "
            "check its spot positions file."
        )
    if not np.issubdtype(spatial.dtype, np.number) or not np.all(np.isfinite(spatial)):
        raise InvalidStackError(
            f"Section {name!r}: spot centres must be finite numbers (spatial has dtype "
            f"{spatial.dtype}); drop or fix spots without a position."
        )
    if len(section.obs) != len(spatial):
        raise InvalidStackError(
            f"Section {name!r}: obs has {len(section.obs)} rows but spatial {len(spatial)} spots."
        )
    try:
        radius = float(section.spot_radius)
        scale = float(section.image_scale)
    except (TypeError, ValueError):
        radius = scale = float("nan")
    if not np.isfinite(radius) or radius <= 0:
        raise InvalidStackError(
            f"Section {name!r}: spot_radius {section.spot_radius!r} must be a positive number "
            "of full-resolution pixels."
        )
    if not np.isfinite(scale) or scale <= 0:
        raise InvalidStackError(
            f"Section {name!r}: image_scale {section.image_scale!r} must be a positive number "
            "(image pixels per full-resolution pixel)."
        )
    genes = pd.Index(np.asarray(section.genes, dtype=str))
    if genes.has_duplicates:
        raise InvalidStackError(
            f"Section {name!r} has duplicated gene names, e.g. "
            f"{genes[genes.duplicated()].unique()[:5].tolist()}. Make them unique first "
            "(adata.var_names_make_unique())."
        )
    counts = section.counts if sp.issparse(section.counts) else np.asarray(section.counts)
    values = counts.data if sp.issparse(counts) else counts
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
        raise InvalidStackError(f"Section {name!r}: counts have dtype {values.dtype}, not numbers.")
    if counts.shape != (len(spatial), len(genes)):
        raise InvalidStackError(
            f"Section {name!r}: counts are {counts.shape} but there are {len(spatial)} "
            f"spots and {len(genes)} genes."
        )
    for key, value in section.obsm.items():
        if np.shape(value)[:1] != (len(spatial),):
            raise InvalidStackError(
                f"Section {name!r}: obsm[{key!r}] has shape {np.shape(value)}; it needs one "
                f"row per spot ({len(spatial)})."
            )
    image = section.image
    if image is not None:
        image = to_uint8_rgb(image, what=f"The image of section {name!r}")
    return replace(
        section, spatial=spatial.astype(float), spot_radius=radius, image_scale=scale, image=image
    )


def _stack_table(
    sections: Sequence[SectionInput], *, library_key: str, sample: str | None
) -> AnnData:
    from anndata import AnnData

    genes = pd.Index(pd.unique(np.concatenate([np.asarray(s.genes, dtype=str) for s in sections])))
    blocks, obs, spatial = [], [], []
    obsm_keys = set.intersection(*(set(s.obsm) for s in sections)) if sections else set()
    for s in sections:
        counts = sp.csr_matrix(s.counts, dtype=np.float32)
        columns = genes.get_indexer(np.asarray(s.genes, dtype=str))
        remap = sp.csr_matrix(
            (np.ones(len(columns), np.float32), (np.arange(len(columns)), columns)),
            shape=(len(columns), len(genes)),
        )
        blocks.append(counts @ remap)
        frame = s.obs.copy()
        frame[library_key] = s.name
        frame[Key.obs.region] = Key.sdata.spots(s.name)
        frame[Key.obs.instance] = np.arange(len(frame))
        if sample is not None:
            frame[Key.obs.sample] = sample
        obs.append(frame)
        spatial.append(np.asarray(s.spatial, dtype=float))
    obs_frame = pd.concat(obs)
    names = [s.name for s in sections]
    obs_frame[library_key] = pd.Categorical(obs_frame[library_key], categories=names, ordered=True)
    obs_frame[Key.obs.region] = pd.Categorical(obs_frame[Key.obs.region])
    if sample is not None:
        obs_frame[Key.obs.sample] = pd.Categorical(obs_frame[Key.obs.sample])
    adata = AnnData(
        X=sp.vstack(blocks, format="csr"),
        obs=obs_frame,
        var=pd.DataFrame(index=genes),
    )
    adata.obsm[Key.obsm.spatial] = np.vstack(spatial)
    for key in sorted(obsm_keys):
        adata.obsm[key] = np.vstack([np.asarray(s.obsm[key]) for s in sections])
    microns = {s.name: s.microns_per_pixel for s in sections if s.microns_per_pixel is not None}
    adata.uns[Key.uns.stack] = {
        "library_key": library_key,
        "sections": np.asarray(names, dtype=object),
        "spot_radius_px": {s.name: float(s.spot_radius) for s in sections},
    }
    if microns:
        adata.uns[Key.uns.stack]["microns_per_pixel"] = microns
    return adata
