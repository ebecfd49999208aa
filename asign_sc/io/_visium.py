"""Reader for a stack of 10x Visium sections (one Space Ranger output folder each)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc.io._build import SectionInput, build_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_visium_stack"]

logger = logging.getLogger(__name__)

#: Visium spots are 55 um across (10x Genomics, Visium Spatial Gene Expression).
_SPOT_DIAMETER_UM = 55.0
_SCALEFACTORS = "spatial/scalefactors_json.json"
_POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")
#: Columns spatialdata-io adds to link its table to its own elements; ours are rebuilt.
_READER_COLUMNS = ("region", "spot_id")


def read_visium_stack(
    paths: Sequence[str | Path] | str | Path,
    *,
    sections: Sequence[str] | None = None,
    sample: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
) -> SpatialData:
    """Read several Visium (Space Ranger) output folders as one section stack.

    Each folder is read with :func:`spatialdata_io.visium` and re-assembled into the stack
    contract: the section's frame is full-resolution pixels (Space Ranger's
    ``pxl_*_in_fullres``), the image is the ``hires`` PNG scaled onto it by
    ``tissue_hires_scalef``.

    Parameters
    ----------
    paths
        Space Ranger output folders (each with the counts file and ``spatial/``), one per
        section, in stacking order.
    sections
        Section names, one per folder. Default: the folder names (the parent's name for a
        folder named ``outs``, as Space Ranger writes ``<sample>/outs``).
    sample
        Sample (patient) name written to ``obs['sample']``.
    counts_file
        Name of the counts file in each folder (a ``<library_id>_`` prefix is also found);
        e.g. ``"raw_feature_bc_matrix.h5"`` for all barcodes.

    Returns
    -------
    SpatialData with per section ``{s}_image`` (the hires image; the lowres image when there
    is no hires one) and ``{s}_spots`` (circles of radius ``spot_diameter_fullres / 2``) in
    coordinate system ``s``, and one table: raw counts in ``X`` (genes: union over sections,
    gene symbols made unique as ``var_names``, Ensembl ids in ``var['gene_ids']``),
    ``obs_names`` ``f"{section}_{barcode}"``, ``obs['barcode']``, ``obs['in_tissue']``,
    ``obs['array_row']``, ``obs['array_col']``, ``obs['section']`` ordered,
    ``obsm['spatial']`` (x, y full-resolution pixels).
    """
    folders = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not folders:
        raise ValueError("paths is empty: pass one Space Ranger output folder per section.")
    if isinstance(sections, str):
        sections = [sections]
    names = [_default_name(f) for f in folders] if sections is None else [str(s) for s in sections]
    if len(names) != len(folders):
        raise ValueError(
            f"sections names {len(names)} sections but paths gives {len(folders)} folders; "
            "pass one name per folder."
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidStackError(
            f"Section names {duplicated} occur more than once"
            + (" (folders with the same name)" if sections is None else "")
            + "; pass sections=[...] with one distinct name per folder."
        )

    read = [
        _read_section(folder, name, counts_file)
        for folder, name in zip(folders, names, strict=True)
    ]
    inputs = [section for section, _ in read]
    sdata = build_spatialdata(inputs, sample=sample)
    table = sdata.tables[Key.sdata.table]
    table.var = _gene_annotation([var for _, var in read], table.var_names)
    logger.info(
        "Read %d Visium sections (%s): %d spots, %d genes.",
        len(inputs),
        ", ".join(names),
        table.n_obs,
        table.n_vars,
    )
    return sdata


def _default_name(folder: Path) -> str:
    folder = folder.resolve()
    return folder.parent.name if folder.name == "outs" else folder.name


def _check_folder(folder: Path, counts_file: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass Space Ranger output folders.")
    missing = []
    if not any(
        p.name == counts_file or p.name.endswith(f"_{counts_file}") for p in folder.iterdir()
    ):
        missing.append(f"{counts_file} (or <library_id>_{counts_file})")
    if not (folder / _SCALEFACTORS).is_file():
        missing.append(_SCALEFACTORS)
    if not any((folder / p).is_file() for p in _POSITIONS):
        missing.append(" or ".join(_POSITIONS))
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a Space Ranger output folder: it lacks {', '.join(missing)}. Pass "
            "the folder holding the counts file and spatial/ (Space Ranger's outs/), or "
            "counts_file= naming the counts file."
        )


def _check_files(folder: Path, name: str, counts_file: str) -> None:
    """Open each input file once, so that a broken one is named (file and section)."""
    import h5py
    from PIL import Image

    where = f"Section {name!r}"
    counts = next(
        p
        for p in sorted(folder.iterdir())
        if p.name == counts_file or p.name.endswith(f"_{counts_file}")
    )
    if not h5py.is_hdf5(counts):
        raise InvalidStackError(
            f"{where}: {counts} is not an HDF5 file ({counts.stat().st_size} bytes; empty or "
            "truncated?). Copy it again from the Space Ranger output."
        )
    path = folder / _SCALEFACTORS
    try:
        scalefactors = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidStackError(f"{where}: {path} is not valid JSON ({error}).") from error
    needed = [Key.legacy.spot_diameter] + [
        key
        for level, key in (
            (Key.legacy.hires, Key.legacy.hires_scalef),
            (Key.legacy.lowres, Key.legacy.lowres_scalef),
        )
        if (folder / f"spatial/tissue_{level}_image.png").is_file()
    ]
    if not isinstance(scalefactors, dict):
        raise InvalidStackError(f"{where}: {path} holds {type(scalefactors).__name__}, not a dict.")
    lacking = [key for key in needed if key not in scalefactors]
    if lacking:
        raise InvalidStackError(
            f"{where}: {path} lacks {lacking} (it has {sorted(scalefactors)}); Space Ranger "
            "writes them for every run."
        )
    for level in (Key.legacy.hires, Key.legacy.lowres):
        image = folder / f"spatial/tissue_{level}_image.png"
        if not image.is_file():
            continue
        try:
            with Image.open(image) as handle:
                handle.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise InvalidStackError(
                f"{where}: could not read {image} ({type(error).__name__}: {error}); the file "
                "may be truncated. Copy it again, or remove it to read the section without it."
            ) from error


def _read_section(folder: Path, name: str, counts_file: str) -> tuple[SectionInput, pd.DataFrame]:
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    _check_folder(folder, counts_file)
    _check_files(folder, name, counts_file)
    try:
        with warnings.catch_warnings():
            # Both are about intermediate states the reader resolves itself (it makes gene
            # symbols unique and parses the table).
            warnings.filterwarnings("ignore", "Variable names are not unique", UserWarning)
            warnings.filterwarnings("ignore", "Converting `region_key", UserWarning)
            sdata = spatialdata_io.visium(folder, dataset_id=name, counts_file=counts_file)
    except Exception as error:  # anything the files still hold that spatialdata-io refuses
        raise InvalidStackError(
            f"Section {name!r}: spatialdata_io.visium could not read {folder} "
            f"({type(error).__name__}: {error})."
        ) from error
    table = sdata.tables["table"]
    if table.n_obs == 0:
        raise InvalidStackError(
            f"Section {name!r}: {folder / counts_file} holds no barcodes (spots)."
        )
    spots = sdata.shapes[name]
    spatial = np.asarray(table.obsm[Key.obsm.spatial], dtype=float)
    lacking = ~np.isfinite(spatial).all(axis=1)
    if lacking.any():
        raise InvalidStackError(
            f"Section {name!r} ({folder}): {int(lacking.sum())} barcodes of the counts file (e.g. "
            f"{table.obs_names[lacking][:3].tolist()}) have no position in the tissue "
            "positions file; the counts file and spatial/ come from different runs."
        )
    radii = spots["radius"].to_numpy(dtype=float)

    image, image_scale = None, 1.0
    for level in (Key.legacy.hires, Key.legacy.lowres):
        key = f"{name}_{level}_image"
        if key in sdata.images:
            element = sdata.images[key]
            to_frame = get_transformation(element, to_coordinate_system=name).to_affine_matrix(
                input_axes=("x", "y"), output_axes=("x", "y")
            )
            image = np.asarray(element.transpose("y", "x", "c").values)
            image_scale = 1.0 / float(to_frame[0, 0])
            if level == Key.legacy.lowres:
                logger.warning("%s: no hires image, using the lowres image.", folder)
            break
    if image is None:
        logger.warning(
            "%s: no spatial/tissue_hires_image.png or tissue_lowres_image.png; section %r is "
            "read without an image.",
            folder,
            name,
        )
    elif image.shape[-1] > 3:
        image = image[..., :3]  # PNGs may carry an alpha channel

    obs = table.obs.drop(columns=[c for c in _READER_COLUMNS if c in table.obs]).copy()
    obs.insert(0, "barcode", table.obs_names.astype(str))
    obs.index = [f"{name}_{barcode}" for barcode in table.obs_names]
    radius = float(radii[0])
    section = SectionInput(
        name=name,
        counts=table.X,
        genes=table.var_names,
        obs=obs,
        spatial=spatial,
        spot_radius=radius,
        image=image,
        image_scale=image_scale,
        microns_per_pixel=_SPOT_DIAMETER_UM / (2.0 * radius),
    )
    return section, table.var


def _gene_annotation(frames: Sequence[pd.DataFrame], genes: pd.Index) -> pd.DataFrame:
    """``var`` of the stack: each gene's annotation from the first section that has it."""
    merged = pd.concat(frames)
    if "gene_ids" in merged:
        ids = merged["gene_ids"].groupby(level=0).nunique()
        clash = ids.index[ids > 1]
        if len(clash):
            logger.warning(
                "Genes %s have different gene ids in different sections (different references?); "
                "var['gene_ids'] holds the first section's.",
                clash[:5].tolist(),
            )
    merged = merged[~merged.index.duplicated(keep="first")]
    return merged.reindex(genes)
