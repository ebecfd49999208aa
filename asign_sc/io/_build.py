"""Assemble per-section inputs into a SpatialData that follows the stack contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key

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
    coordinate system. ``image`` (``(y, x, c)`` ``uint8``) may be downsampled; then
    ``image_scale`` is its pixels per full-resolution pixel (e.g. Visium's
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
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise InvalidStackError(f"Duplicated section names: {names}.")
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
    return SpatialData(images=images, shapes=shapes, tables={Key.sdata.table: table})


def _stack_table(
    sections: Sequence[SectionInput], *, library_key: str, sample: str | None
) -> AnnData:
    from anndata import AnnData

    genes = pd.Index(pd.unique(np.concatenate([np.asarray(s.genes, dtype=str) for s in sections])))
    blocks, obs, spatial = [], [], []
    obsm_keys = set.intersection(*(set(s.obsm) for s in sections)) if sections else set()
    for s in sections:
        counts = sp.csr_matrix(s.counts, dtype=np.float32)
        if counts.shape != (len(s.obs), len(s.genes)):
            raise InvalidStackError(
                f"Section {s.name!r}: counts are {counts.shape} but there are {len(s.obs)} "
                f"spots and {len(s.genes)} genes."
            )
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
