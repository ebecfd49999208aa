"""Assemble per-section inputs into a SpatialData that follows the stack contract."""

from __future__ import annotations

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


@dataclass
class SectionInput:
    """Everything needed to add one section to a stack.

    ``spatial`` and ``spot_radius`` are in full-resolution pixels: the section's own
    coordinate system. ``image`` (``(y, x, c)``, ideally ``uint8`` RGB; other layouts and
    dtypes are converted as :func:`asign_sc._stack.to_uint8_rgb` says) may be downsampled;
    then ``image_scale`` is its pixels per full-resolution pixel (e.g. Visium's
    ``tissue_hires_scalef``).
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
            factors = pyramid_scale_factors(s.image.shape[:2])
            to_frame = (
                Identity()
                if s.image_scale == 1
                else Scale([1 / s.image_scale] * 2, axes=("x", "y"))
            )
            images[Key.sdata.image(s.name)] = Image2DModel.parse(
                np.ascontiguousarray(s.image),
                dims=("y", "x", "c"),
                c_coords=["r", "g", "b"][: s.image.shape[2]],
                scale_factors=factors or None,
                chunks=(s.image.shape[2], 2048, 2048),
                transformations={Key.sdata.coordinate_system(s.name): to_frame},
            )
            # Compute the pyramid once now (dask would otherwise downsample from full
            # resolution at every read of a coarse level).
            images[Key.sdata.image(s.name)] = images[Key.sdata.image(s.name)].persist()
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
