"""The section-stack data contract: one way to read a stack out of AnnData or SpatialData.

Every step of the pipeline calls :func:`resolve_stack` first. It turns an
:class:`~anndata.AnnData` (squidpy layout) or a :class:`~spatialdata.SpatialData` plus a
``library_key`` into an ordered :class:`SectionStack` of :class:`Section` s, each with its
spot centres (full-resolution pixels of the section's own image), spot radius, and access
to its image at a chosen resolution. Validation happens here, once, with messages that say
what is wrong and how to fix it.

Writing results back is done on :attr:`SectionStack.table` (the AnnData that annotates the
spots; inside a SpatialData it is the table element) and, for spatial transformations, with
:meth:`SectionStack.set_transformation`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._utils import is_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "Section",
    "SectionStack",
    "check_image_resolution",
    "get_table",
    "resolve_stack",
    "to_uint8_rgb",
    "validate_counts",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Section:
    """One tissue section of a stack.

    Attributes
    ----------
    name
        Section name, the value of ``obs[library_key]``.
    rows
        Integer positions of the section's spots in the table (``table[rows]``).
    spatial
        Spot centres ``(x, y)`` in the section's own frame: full-resolution image pixels.
    spot_radius
        Spot radius in the same pixels.
    sample
        The sample (patient) the section belongs to, or ``None``.
    image_key
        Name of the image element (SpatialData) or library id (legacy AnnData); ``None``
        when the section has no image.
    shapes_key
        Name of the shapes element holding the spots (SpatialData only).
    image_scale
        Pixels of the image's finest level per frame pixel (1 for a full-resolution image).
    image_shape
        ``(height, width)`` of the finest image level, or ``None``.
    """

    name: str
    rows: np.ndarray
    spatial: np.ndarray
    spot_radius: float
    sample: str | None = None
    image_key: str | None = None
    shapes_key: str | None = None
    image_scale: float = 1.0
    image_shape: tuple[int, int] | None = None

    @property
    def n_spots(self) -> int:
        """Number of spots in the section."""
        return len(self.rows)

    @property
    def has_image(self) -> bool:
        """Whether the section has an H&E image."""
        return self.image_key is not None


@dataclass(eq=False)
class SectionStack:
    """An ordered stack of sections resolved from AnnData or SpatialData.

    Use :func:`resolve_stack` to make one.
    """

    data: Any
    table: Any
    library_key: str
    sections: tuple[Section, ...]
    sample_key: str | None = None
    _by_name: dict[str, Section] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.sections}

    # -- access -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Section names in stacking order."""
        return [s.name for s in self.sections]

    @property
    def is_spatialdata(self) -> bool:
        """Whether the stack was resolved from a SpatialData."""
        return is_spatialdata(self.data)

    def __len__(self) -> int:
        return len(self.sections)

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections)

    def __getitem__(self, name: str) -> Section:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidStackError(
                f"Unknown section {name!r}. The stack has sections {self.names} "
                f"(values of obs[{self.library_key!r}])."
            ) from None

    def samples(self) -> dict[str | None, list[Section]]:
        """Sections grouped by sample, each group in stacking order."""
        out: dict[str | None, list[Section]] = {}
        for s in self.sections:
            out.setdefault(s.sample, []).append(s)
        return out

    def image(self, name: str, *, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image of a section as ``(height, width, channels)`` ``uint8``.

        Parameters
        ----------
        name
            Section name.
        max_side
            If given, the coarsest stored resolution whose long side is still at least
            ``max_side`` pixels is read (multiscale images and legacy ``hires``/``lowres``
            images alike); nothing finer is decoded. ``None`` reads the finest level.

        Returns
        -------
        The image array and ``scale``, a length-2 array ``(sx, sy)``: pixels of the returned
        array per frame pixel, so that ``section.spatial * scale`` are spot centres in it.
        """
        section = self[name]
        if section.image_key is None:
            raise InvalidStackError(
                f"Section {name!r} has no image. Add an image element named "
                f"{Key.sdata.image(name)!r} (SpatialData) or an entry under "
                f"uns['spatial'][{name!r}]['images'] (AnnData), or leave the section out."
            )
        if self.is_spatialdata:
            return _sdata_image(self.data, section, max_side)
        return _legacy_image(self.table, section, max_side)

    # -- writing back -----------------------------------------------------------------
    def set_transformation(
        self, name: str, matrix: np.ndarray, *, to_coordinate_system: str = Key.sdata.aligned
    ) -> None:
        """Attach an affine map from a section's frame to a common coordinate system.

        ``matrix`` is a 3x3 homogeneous matrix acting on ``(x, y, 1)`` in the section's
        frame (full-resolution pixels). On a SpatialData it is written to the section's
        image and shapes elements (composed after their own map to the frame); a legacy
        AnnData has no transformations, so this does nothing there.
        """
        if not self.is_spatialdata:
            return
        from spatialdata.transformations import (
            Affine,
            get_transformation,
            set_transformation,
        )
        from spatialdata.transformations import (
            Sequence as TSequence,
        )

        section = self[name]
        frame = Key.sdata.coordinate_system(name)
        affine = Affine(
            np.asarray(matrix, dtype=float), input_axes=("x", "y"), output_axes=("x", "y")
        )
        for key in (section.image_key, section.shapes_key):
            if key is None:
                continue
            element = self.data[key]
            to_frame = get_transformation(element, to_coordinate_system=frame)
            set_transformation(
                element,
                TSequence([to_frame, affine]),
                to_coordinate_system=to_coordinate_system,
            )


# ---------------------------------------------------------------------------------------
def get_table(data: AnnData | SpatialData, *, table_key: str = Key.sdata.table) -> AnnData:
    """The AnnData annotating the spots: ``data`` itself, or ``data[table_key]``."""
    if is_spatialdata(data):
        if table_key not in data.tables:
            raise InvalidStackError(
                f"The SpatialData has no table {table_key!r} (it has {list(data.tables)}). "
                "Add the spot table with spatialdata.models.TableModel.parse(..., "
                f"region=[...]) under sdata.tables[{table_key!r}], or pass table_key=."
            )
        return data.tables[table_key]
    from anndata import AnnData

    if not isinstance(data, AnnData):
        raise TypeError(
            f"Expected an AnnData or a SpatialData, got {type(data).__name__}. "
            "Read your data with asign_sc.io (read_her2st, read_visium_stack) or build an "
            "AnnData with obs[library_key] and obsm['spatial']."
        )
    return data


def resolve_stack(
    data: AnnData | SpatialData,
    *,
    library_key: str = Key.obs.library,
    sections: Sequence[str] | None = None,
    sample_key: str | None = None,
    spatial_key: str = Key.obsm.spatial,
    spot_radius: float | None = None,
    require_images: bool = False,
    min_sections: int = 1,
    table_key: str = Key.sdata.table,
) -> SectionStack:
    """Resolve AnnData or SpatialData into an ordered, validated :class:`SectionStack`.

    Parameters
    ----------
    data
        A SpatialData with one table annotating one circles element per section, or an
        AnnData in squidpy's layout (``obsm[spatial_key]``, ``uns['spatial'][library]``).
    library_key
        Column of ``obs`` naming each spot's section. Categories of a categorical column
        give the stacking order; otherwise sections are stacked in order of appearance.
    sections
        Sections to use and their order. Default: all, in stacking order.
    sample_key
        Column of ``obs`` naming the sample (patient) of each spot when one object holds
        several stacks. A section must belong to exactly one sample.
    spatial_key
        ``obsm`` key of the spot centres (full-resolution pixels) for an AnnData.
    spot_radius
        Spot radius (units of ``obsm[spatial_key]``) of a plain AnnData's sections that have
        no ``uns['spatial'][section]['scalefactors']``. Without either the radius is unknown
        (NaN): steps that need no radius work, the others say to pass ``spot_radius=``.
    require_images
        Raise if a section has no image.
    min_sections
        Raise if fewer sections are resolved (3D steps need at least 2).
    table_key
        Name of the table element of a SpatialData.

    Returns
    -------
    The resolved stack; ``data`` is not modified.
    """
    table = get_table(data, table_key=table_key)
    if library_key not in table.obs:
        raise InvalidStackError(
            f"obs[{library_key!r}] is missing: asign_sc needs a column naming each spot's "
            f"section. obs has {list(table.obs.columns)}; pass library_key= to use one of "
            "them."
        )
    if table.n_obs == 0:
        raise InvalidStackError("The table has no spots (n_obs == 0).")
    if not table.obs_names.is_unique:
        dup = table.obs_names[table.obs_names.duplicated()].unique()[:5].tolist()
        raise InvalidStackError(
            f"Spot ids (obs_names) are not unique, e.g. {dup}. Make them unique, e.g. "
            "with adata.obs_names_make_unique() or by prefixing the section name."
        )
    labels = table.obs[library_key]
    if labels.isna().any():
        raise InvalidStackError(
            f"{int(labels.isna().sum())} spots have no section in obs[{library_key!r}]. "
            "Assign every spot to a section or drop those spots."
        )
    order = _stack_order(labels)
    if sections is not None:
        sections = [str(s) for s in sections]
        dup = sorted({s for s in sections if sections.count(s) > 1})
        if dup:
            raise InvalidStackError(f"Section names given twice in sections=: {dup}.")
        unknown = [s for s in sections if s not in order]
        if unknown:
            raise InvalidStackError(
                f"Unknown section(s) {unknown}: obs[{library_key!r}] has {order}."
            )
        order = sections
    if len(order) < min_sections:
        raise InvalidStackError(
            f"This step needs at least {min_sections} sections but the stack has "
            f"{len(order)} ({order}). Add more sections or check obs[{library_key!r}]."
        )

    samples = _sample_of_sections(table, library_key, sample_key, order)
    label_values = labels.astype(str).to_numpy()
    if is_spatialdata(data):
        built = [
            _sdata_section(data, table, name, np.flatnonzero(label_values == name), samples[name])
            for name in order
        ]
    else:
        built = [
            _legacy_section(
                table,
                name,
                np.flatnonzero(label_values == name),
                samples[name],
                spatial_key,
                spot_radius,
            )
            for name in order
        ]
    for section in built:
        _check_section(section, require_images=require_images)
    return SectionStack(
        data=data,
        table=table,
        library_key=library_key,
        sections=tuple(built),
        sample_key=sample_key,
    )


def validate_counts(
    table: AnnData,
    counts_layer: str | None = None,
    *,
    rows: np.ndarray | Mapping[str, np.ndarray] | None = None,
    what: str = "measured sections",
    layer: str | None = None,
) -> None:
    """Check that the expression matrix holds raw counts: numeric, finite, non-negative integers.

    Parameters
    ----------
    table
        The spot table.
    counts_layer
        Layer holding raw counts; ``None`` means ``X``.
    rows
        Only these rows are checked (the measured sections); rows of sections whose
        expression is unknown may hold anything. A mapping ``{section: rows}`` also makes a
        section whose counts are all zero an error (naming the section). ``None``: all rows.
    what
        How the messages call the checked rows, e.g. ``"known sections"``.
    layer
        Former name of ``counts_layer``; use ``counts_layer``.

    Raises
    ------
    InvalidStackError
        Missing layer, non-numeric, NaN/infinite, negative or non-integer values (such as
        log-normalised data; the message names the layers that do hold counts), or an
        all-zero section.
    """
    if layer is not None:
        if counts_layer is not None and counts_layer != layer:
            raise TypeError("Pass counts_layer= only (layer= is its former name).")
        counts_layer = layer
    if counts_layer is not None and counts_layer not in table.layers:
        raise InvalidStackError(
            f"layers[{counts_layer!r}] is missing; the table has layers {list(table.layers)}. "
            "Pass counts_layer=None to use X, or one of those layers."
        )
    where = f"layers[{counts_layer!r}]" if counts_layer is not None else "X"
    full = table.layers[counts_layer] if counts_layer is not None else table.X
    if full is None:
        raise InvalidStackError(f"{where} is empty: the table holds no expression values.")
    by_section = dict(rows) if isinstance(rows, Mapping) else None
    if by_section is not None:
        rows = np.concatenate([np.asarray(r, dtype=int) for r in by_section.values()] or [[]])
        rows = rows.astype(int)
    matrix = full[rows] if rows is not None else full
    values = _matrix_values(matrix)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
        raise InvalidStackError(
            f"{where} has dtype {values.dtype}, not numbers. Store raw counts as integers or "
            "floats, e.g. adata.X = adata.X.astype('float32')."
        )
    if values.size and not np.all(np.isfinite(values)):
        raise InvalidStackError(
            f"{where} holds NaN or infinite values in {what}. Counts must be finite; mark "
            "sections without measurements as unknown (known_sections=) instead of filling "
            "them with NaN."
        )
    if values.size and values.min() < 0:
        raise InvalidStackError(
            f"{where} holds negative values in {what} (min {values.min():g}): asign_sc "
            f"expects raw counts. {_counts_hint(table, counts_layer)}"
        )
    fractional = _non_integer(values)
    if fractional.size:
        raise InvalidStackError(
            f"{where} holds non-integer values in {what} (e.g. "
            f"{', '.join(f'{v:.4g}' for v in fractional[:3])}): it looks normalised or "
            f"log-transformed, and asign_sc normalises raw counts itself. "
            f"{_counts_hint(table, counts_layer)}"
        )
    if by_section:
        empty = [
            name
            for name, section_rows in by_section.items()
            if len(section_rows) and not _matrix_values(full[np.asarray(section_rows)]).any()
        ]
        if empty:
            raise InvalidStackError(
                f"{where} is all zero in section(s) {empty} of the {what}: nothing was "
                "measured there. Check counts_layer=, or leave those sections out of "
                "known_sections=."
            )


def _matrix_values(matrix: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (for sparse: the explicit entries)."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def _non_integer(values: np.ndarray, *, limit: int = 3) -> np.ndarray:
    """Up to ``limit`` values with a fractional part (beyond float32 rounding)."""
    if not values.size or np.issubdtype(values.dtype, np.integer):
        return values[:0].ravel()
    flat = values.ravel()
    bad = np.abs(flat - np.round(flat)) > 1e-3
    return flat[bad][:limit]


def _counts_hint(table: AnnData, counts_layer: str | None) -> str:
    """Say which layers hold raw counts (non-negative integers), to pass as counts_layer=."""
    candidates = []
    for name in [None, *table.layers]:
        if name == counts_layer:
            continue
        matrix = table.X if name is None else table.layers[name]
        values = _matrix_values(matrix) if matrix is not None else np.empty(0)
        if (
            np.issubdtype(values.dtype, np.number)
            and values.size
            and np.all(np.isfinite(values))
            and values.min() >= 0
            and not _non_integer(values, limit=1).size
        ):
            candidates.append(name)
    if candidates:
        return f"Pass counts_layer={candidates[0]!r}, which holds raw counts" + (
            " (X)." if candidates[0] is None else "."
        )
    return (
        "Pass counts_layer= naming a layer of raw counts, or store raw counts in X "
        f"(the table has layers {list(table.layers)}, none of them raw counts)."
    )


#: Fewest image pixels across a spot window for image features to mean anything.
MIN_WINDOW_PX = 16


def check_image_resolution(stack: SectionStack, window: float) -> list[str]:
    """Warn about sections whose images show a spot window in fewer than a few pixels.

    Parameters
    ----------
    stack
        The resolved stack.
    window
        Side of the smallest feature window, in full-resolution (frame) pixels.

    Returns
    -------
    The sections warned about.
    """
    small = {
        s.name: window * s.image_scale
        for s in stack
        if s.has_image and window * s.image_scale < MIN_WINDOW_PX
    }
    if small:
        logger.warning(
            "The spot window (%.0f px of the section frame) is only %s px wide in the images "
            "of sections %s (fewer than %d px): image features there carry little "
            "information. Use higher-resolution images.",
            window,
            ", ".join(f"{v:.1f}" for v in small.values()),
            list(small),
            MIN_WINDOW_PX,
        )
    return list(small)


# -- helpers ----------------------------------------------------------------------------
def _stack_order(labels: pd.Series) -> list[str]:
    if isinstance(labels.dtype, pd.CategoricalDtype):
        present = set(labels.astype(str).unique())
        return [str(c) for c in labels.cat.categories if str(c) in present]
    logger.info("obs library column is not categorical: sections stacked in order of appearance")
    return [str(v) for v in pd.unique(labels.astype(str))]


def _sample_of_sections(
    table: AnnData, library_key: str, sample_key: str | None, order: list[str]
) -> dict[str, str | None]:
    if sample_key is None:
        return dict.fromkeys(order)
    if sample_key not in table.obs:
        raise InvalidStackError(
            f"obs[{sample_key!r}] is missing (sample_key=). obs has {list(table.obs.columns)}."
        )
    pairs = table.obs[[library_key, sample_key]].astype(str).drop_duplicates()
    counts = pairs.groupby(library_key).size()
    bad = counts[counts > 1].index.tolist()
    if bad:
        raise InvalidStackError(
            f"Sections {bad} have spots in several samples of obs[{sample_key!r}]; each "
            "section must belong to one sample. Give sections unique names per sample."
        )
    mapping = dict(zip(pairs[library_key], pairs[sample_key], strict=True))
    return {name: mapping[name] for name in order}


def _check_section(section: Section, *, require_images: bool) -> None:
    name = section.name
    if not np.all(np.isfinite(section.spatial)):
        raise InvalidStackError(
            f"Section {name!r} has spots with NaN/infinite coordinates; drop or fix them."
        )
    # NaN: unknown (a plain AnnData without spot_radius=); steps that need it check it.
    if np.isinf(section.spot_radius) or section.spot_radius <= 0:
        raise InvalidStackError(
            f"Section {name!r} has spot radius {section.spot_radius}; it must be a positive "
            "number of pixels (shapes 'radius' column or scalefactors['spot_diameter_fullres'])."
        )
    if require_images and not section.has_image:
        raise InvalidStackError(
            f"Section {name!r} has no image, but this step reads images. Add an image "
            f"element named {Key.sdata.image(name)!r} with a transformation to coordinate "
            f"system {Key.sdata.coordinate_system(name)!r}, or leave the section out with "
            "sections=."
        )
    if section.image_shape is not None:
        h, w = section.image_shape
        xy = section.spatial * section.image_scale
        outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
        if outside.any():
            first = xy[np.flatnonzero(outside)[0]]
            raise InvalidStackError(
                f"{int(outside.sum())} spot(s) of section {name!r} lie outside its "
                f"{w}x{h} px image (first at x={first[0]:.1f}, y={first[1]:.1f} image px). "
                "Check that the coordinates are (x, y) = (column, row) in full-resolution "
                "pixels and that the scale factors match the image."
            )


def _legacy_section(
    table: AnnData,
    name: str,
    rows: np.ndarray,
    sample: str | None,
    spatial_key: str,
    spot_radius: float | None = None,
) -> Section:
    if spatial_key not in table.obsm:
        raise InvalidStackError(
            f"obsm[{spatial_key!r}] is missing: an AnnData stack needs spot centres "
            "(x, y) in full-resolution pixels there (squidpy layout)."
        )
    spatial = np.asarray(table.obsm[spatial_key], dtype=float)[rows, :2]
    library = table.uns.get(Key.uns.spatial, {}).get(name)
    if library is None:
        # A plain AnnData (section column + spot centres), as squidpy's graph functions take:
        # no image, and the spot radius only if given (steps that need it say so).
        return Section(
            name=name,
            rows=rows,
            spatial=spatial,
            spot_radius=float("nan") if spot_radius is None else float(spot_radius),
            sample=sample,
        )
    scalefactors = library.get(Key.legacy.scalefactors, {})
    if Key.legacy.spot_diameter not in scalefactors:
        raise InvalidStackError(
            f"uns['spatial'][{name!r}]['scalefactors'] has no "
            f"{Key.legacy.spot_diameter!r}: the spot size in full-resolution pixels is needed."
        )
    radius = float(scalefactors[Key.legacy.spot_diameter]) / 2
    images = library.get(Key.legacy.images, {})
    image_key, scale, shape = None, 1.0, None
    if images:
        best = _legacy_best_image(images, scalefactors, max_side=None, section=name)
        image_key = name
        scale = _legacy_scalef(scalefactors, best, name)
        shape = tuple(np.asarray(images[best]).shape[:2])
    return Section(
        name=name,
        rows=rows,
        spatial=spatial,
        spot_radius=radius,
        sample=sample,
        image_key=image_key,
        image_scale=scale,
        image_shape=shape,
    )


def _legacy_scalef(scalefactors: dict, image_name: str, section: str) -> float:
    key = f"tissue_{image_name}_scalef"
    if key not in scalefactors:
        raise InvalidStackError(
            f"uns['spatial'][{section!r}]['scalefactors'] has no {key!r} for image "
            f"{image_name!r}: the image's scale relative to full-resolution pixels is needed."
        )
    return float(scalefactors[key])


def _legacy_best_image(images: dict, scalefactors: dict, max_side: int | None, section: str) -> str:
    ranked = sorted(images, key=lambda k: max(np.asarray(images[k]).shape[:2]))
    if max_side is not None:
        for key in ranked:
            if max(np.asarray(images[key]).shape[:2]) >= max_side:
                return key
    return ranked[-1]


def _legacy_image(
    table: AnnData, section: Section, max_side: int | None
) -> tuple[np.ndarray, np.ndarray]:
    library = table.uns[Key.uns.spatial][section.name]
    images, scalefactors = library[Key.legacy.images], library[Key.legacy.scalefactors]
    key = _legacy_best_image(images, scalefactors, max_side, section.name)
    image = to_uint8_rgb(np.asarray(images[key]), what=f"The image of section {section.name!r}")
    scale = _legacy_scalef(scalefactors, key, section.name)
    return image, np.array([scale, scale])


def to_uint8_rgb(image: np.ndarray, *, what: str = "The image") -> np.ndarray:
    """An image as ``(y, x, 3)`` ``uint8`` RGB, converted from any common layout and dtype.

    Layouts: ``(y, x)`` grey and ``(y, x, 1)`` are repeated to RGB; ``(y, x, 2)`` (grey +
    alpha) and ``(y, x, 4)`` (RGBA) are composited over white (the slide background).
    Values: ``uint8`` as is; other integers with values in 0-255 as is, in 0-65535 (16 bit)
    scaled by 255/65535; floats in [0, 1] scaled by 255, in [0, 255] rounded.

    Parameters
    ----------
    image
        The image, channels last.
    what
        How messages name the image, e.g. ``"the image of section 'S1'"``.

    Raises
    ------
    InvalidStackError
        Another shape, an empty image, boolean or complex values, NaN/infinite, negative
        values or values beyond 16 bit (the message names the dtype and the range).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise InvalidStackError(
            f"{what} has shape {image.shape}; expected (y, x) grey or (y, x, c) with c = 1, "
            "2, 3 or 4 channels last (transpose a (c, y, x) array with "
            "image.transpose(1, 2, 0))."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidStackError(f"{what} is empty (shape {image.shape}).")
    dtype = image.dtype
    if dtype != np.uint8:
        image = _rescale_to_uint8(image, what)
    if image.shape[-1] in (2, 4):
        alpha = image[..., -1:].astype(np.float32) / 255.0
        colour = image[..., :-1].astype(np.float32)
        image = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _rescale_to_uint8(image: np.ndarray, what: str) -> np.ndarray:
    dtype = image.dtype
    numeric = np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    if not numeric:
        raise InvalidStackError(
            f"{what} has dtype {dtype}; an H&E image needs integer or float intensities "
            "(e.g. uint8 RGB)."
        )
    if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(image)):
        raise InvalidStackError(f"{what} (dtype {dtype}) holds NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < 0:
        raise InvalidStackError(
            f"{what} (dtype {dtype}) has negative values (min {low:g}); intensities must "
            "be 0-255 (8 bit), 0-65535 (16 bit) or, for floats, 0-1."
        )
    if np.issubdtype(dtype, np.floating):
        if high <= 1.0:
            return np.round(image * 255.0).astype(np.uint8)
        if high <= 255.0:
            return np.round(image).astype(np.uint8)
        raise InvalidStackError(
            f"{what} has dtype {dtype} with values up to {high:g}; float images must lie in "
            "[0, 1] or [0, 255]. Rescale it, e.g. (image / image.max() * 255).astype('uint8')."
        )
    if high <= 255:
        return image.astype(np.uint8)
    if high <= 65535:
        logger.info("%s has dtype %s (16 bit): scaled to 8 bit by 255/65535", what, dtype)
        return np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    raise InvalidStackError(
        f"{what} has dtype {dtype} with values up to {high:g}, beyond 16 bit; rescale it to "
        "8 bit (0-255) first."
    )


# -- SpatialData ------------------------------------------------------------------------
def _table_regions(table: AnnData) -> tuple[str, str, list[str]]:
    attrs = table.uns.get("spatialdata_attrs")
    if not attrs:
        raise InvalidStackError(
            "The table is not annotating any element (no uns['spatialdata_attrs']). Parse it "
            "with spatialdata.models.TableModel.parse(table, region=[...], region_key=..., "
            "instance_key=...)."
        )
    region = attrs["region"]
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    return attrs["region_key"], attrs["instance_key"], regions


def _linear_part(matrix: np.ndarray) -> float:
    """Isotropic scale of a 3x3 affine; raises if the map is not a uniform scaling."""
    linear = matrix[:2, :2]
    sx, sy = np.hypot(linear[0, 0], linear[1, 0]), np.hypot(linear[0, 1], linear[1, 1])
    return float(np.sqrt(sx * sy))


def _to_frame(element: Any, frame: str, what: str, section: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(element, get_all=True)
    if frame not in transformations:
        raise InvalidStackError(
            f"The {what} of section {section!r} has no transformation to coordinate system "
            f"{frame!r} (it has {sorted(transformations)}). Each section's image and spots "
            "need a map to a coordinate system named after the section (full-resolution "
            "pixels), e.g. set_transformation(element, Identity(), "
            f"to_coordinate_system={frame!r})."
        )
    return transformations[frame].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def _sdata_section(
    sdata: SpatialData, table: AnnData, name: str, rows: np.ndarray, sample: str | None
) -> Section:
    import geopandas as gpd

    region_key, instance_key, regions = _table_regions(table)
    section_regions = pd.unique(table.obs[region_key].astype(str).to_numpy()[rows])
    if len(section_regions) != 1:
        raise InvalidStackError(
            f"Spots of section {name!r} are annotated by {len(section_regions)} elements "
            f"({list(section_regions)}) in obs[{region_key!r}]; each section needs exactly one "
            "shapes element of spots."
        )
    shapes_key = str(section_regions[0])
    if shapes_key not in regions or shapes_key not in sdata.shapes:
        problem = "not a shapes element" if shapes_key not in sdata.shapes else "not a table region"
        raise InvalidStackError(
            f"Section {name!r} refers to region {shapes_key!r}, which is {problem}"
            f" (shapes: {list(sdata.shapes)}, table regions: {regions}). Make "
            f"obs[{region_key!r}], the table's region and the shapes names agree."
        )
    shapes: gpd.GeoDataFrame = sdata.shapes[shapes_key]
    if "radius" not in shapes.columns:
        raise InvalidStackError(
            f"Shapes element {shapes_key!r} of section {name!r} has no 'radius' column: spots "
            "must be circles (ShapesModel.parse(coords, geometry=0, radius=...))."
        )
    ids = table.obs[instance_key].to_numpy()[rows]
    if pd.Index(ids).has_duplicates:
        raise InvalidStackError(
            f"Section {name!r} has duplicated spot ids in obs[{instance_key!r}]; every spot "
            "of a shapes element needs its own instance id."
        )
    missing = ~pd.Index(ids).isin(shapes.index)
    if missing.any():
        raise InvalidStackError(
            f"{int(missing.sum())} table rows of section {name!r} have instance ids that "
            f"shapes element {shapes_key!r} lacks (e.g. {ids[missing][:3].tolist()}). The "
            f"table's obs[{instance_key!r}] must match the shapes' index."
        )
    frame = Key.sdata.coordinate_system(name)
    to_frame = _to_frame(shapes, frame, "spots", name)
    matched = shapes.loc[ids]
    xy = np.column_stack([matched.geometry.x.to_numpy(), matched.geometry.y.to_numpy()])
    spatial = (np.c_[xy, np.ones(len(xy))] @ to_frame.T)[:, :2]
    radius = float(np.median(matched["radius"].to_numpy(dtype=float))) * _linear_part(to_frame)

    image_key = _find_image(sdata, name)
    scale, shape = 1.0, None
    if image_key is not None:
        image = sdata.images[image_key]
        image_to_frame = _to_frame(image, frame, "image", name)
        if (
            not np.allclose(image_to_frame[:2, 2], 0)
            or not np.isclose(image_to_frame[0, 1], 0)
            or not np.isclose(image_to_frame[0, 0], image_to_frame[1, 1])
        ):
            raise InvalidStackError(
                f"The image of section {name!r} maps to coordinate system {frame!r} by "
                f"{image_to_frame[:2].tolist()}; asign_sc needs a uniform scaling (the image "
                "is the section's frame, possibly downsampled). Put the section's frame in "
                "the image's pixels and map the spots onto it instead."
            )
        scale = 1.0 / image_to_frame[0, 0]
        level0 = _image_levels(image)[0]
        shape = (int(level0.sizes["y"]), int(level0.sizes["x"]))
    return Section(
        name=name,
        rows=rows,
        spatial=spatial,
        spot_radius=radius,
        sample=sample,
        image_key=image_key,
        shapes_key=shapes_key,
        image_scale=scale,
        image_shape=shape,
    )


def _find_image(sdata: SpatialData, name: str) -> str | None:
    for candidate in (Key.sdata.image(name), name):
        if candidate in sdata.images:
            return candidate
    return None


def _image_levels(image: Any) -> list[Any]:
    """DataArrays of an image element, finest first (single-scale images give one)."""
    import xarray as xr

    if isinstance(image, xr.DataArray):
        return [image]
    levels = sorted(image.children, key=lambda k: int(k.removeprefix("scale")))
    return [next(iter(image[level].ds.data_vars.values())) for level in levels]


def _sdata_image(
    sdata: SpatialData, section: Section, max_side: int | None
) -> tuple[np.ndarray, np.ndarray]:
    levels = _image_levels(sdata.images[section.image_key])
    chosen = levels[0]
    if max_side is not None:
        for level in levels:
            if max(level.sizes["y"], level.sizes["x"]) >= max_side:
                chosen = level
    array = np.asarray(chosen.transpose("y", "x", "c").values)
    h0, w0 = section.image_shape
    scale = section.image_scale * np.array([chosen.sizes["x"] / w0, chosen.sizes["y"] / h0])
    return to_uint8_rgb(array, what=f"The image of section {section.name!r}"), scale
