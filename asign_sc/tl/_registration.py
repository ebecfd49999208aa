"""``tl.register_sections``: align a stack of H&E sections into one coordinate system.

As in the paper (§III-B, appendix D): neighbouring sections are registered pairwise and the
pair transforms are chained to a reference section (the middle one by default), which is
left untransformed. Each pair is initialised from keypoint matches (or tissue-mask moments)
and refined with ANTs.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from asign_sc._allocator import reuses_freed_memory
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc._utils import copy_data, sanitize_uns
from asign_sc.pp._tissue import tissue_channel, tissue_mask
from asign_sc.tl._registration_init import (
    InitResult,
    PreparedSection,
    dice,
    keypoint_init,
    mask_dice,
    moment_init,
    warp_to,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from distributed import Client
    from spatialdata import SpatialData

__all__ = ["register_sections", "registration_key"]

logger = logging.getLogger(__name__)

_TRANSFORMS = ("rigid", "affine", "syn")
_INITS = ("keypoints", "moments")
#: A keypoint initialisation is kept unless its tissue-mask Dice is this much below the
#: moment initialisation's (a wrong model can still gather a few chance inliers).
_KEYPOINT_DICE_SLACK = 0.1
#: ANTs' result is rejected (and the initialisation kept, with a warning) when it lowers the
#: tissue-mask Dice by more than this.
_ANTS_DICE_DROP = 0.05
#: Smoothing (fraction of the long image side) of the stain channels compared in the QC.
_QC_SIGMA = 0.005
#: Smoothing of the stain channels compared by the stacking-order check: tissue regions,
#: which change slowly through a volume, not structures that differ from cut to cut.
_ORDER_SIGMA = 0.02
#: Another order of a sample's sections whose neighbour pairs are this much more alike makes
#: the given stacking order suspect: the sum of their dissimilarities (1 - NCC) is shorter by
#: this fraction, and by at least _ORDER_MIN_GAIN (near-identical sections compare as noise).
_ORDER_MARGIN = 0.1
_ORDER_MIN_GAIN = 0.02
#: The order check's own tissue-moment fits of non-neighbours score their candidate maps on
#: masks this long: it compares tissue regions (smoothed by _ORDER_SIGMA), not outlines, and
#: fits every pair of a sample's sections.
_ORDER_COARSE_SIDE = 128
#: Stacks up to this many sections get the best order by exhaustive search (else greedy).
_ORDER_EXHAUSTIVE = 8
#: A stored image level up to this factor longer than ``max_side`` is registered as it is;
#: a longer one is downsampled to ``max_side`` (pyramids halve: the level read can be up to
#: twice as long, which would cost up to 4x the pixels in ANTs and the QC).
_MAX_SIDE_SLACK = 1.1
#: ``max_side="auto"``: the working image is made long enough for a spot diameter to span
#: this many working pixels (ANTs then places the sections to a fraction of a working pixel,
#: well under a spot radius) ...
_AUTO_PIXELS_PER_SPOT = 4
#: ... and at least this long (tissue masks and keypoints need the tissue's outline), at
#: most this long (ANTs' time grows with the pixels; pass an int for finer work).
_AUTO_MIN_SIDE = 500
_AUTO_MAX_SIDE = 2000
#: ``max_side="auto"`` when a section's spot radius is unknown.
_AUTO_UNKNOWN_RADIUS_SIDE = 1000

PointMap = Callable[[np.ndarray], np.ndarray]


def registration_key(key_added: str = Key.sdata.aligned) -> tuple[str, str]:
    """The ``obsm`` and ``uns`` keys :func:`register_sections` writes for a ``key_added``.

    ``"aligned"`` (the default) gives ``obsm['spatial_aligned']`` and
    ``uns['asign_registration']``; any other name ``k`` gives ``obsm['spatial_k']`` and
    ``uns['asign_registration_k']``.
    """
    obsm_key = f"{Key.obsm.spatial}_{key_added}"
    uns_key = (
        Key.uns.registration
        if key_added == Key.sdata.aligned
        else f"{Key.uns.registration}_{key_added}"
    )
    return obsm_key, uns_key


@reuses_freed_memory
def register_sections(
    data: AnnData | SpatialData,
    *,
    library_key: str = Key.obs.library,
    sections: Sequence[str] | None = None,
    sample_key: str | None = None,
    reference: str | None = None,
    transform: Literal["rigid", "affine", "syn"] = "rigid",
    init: Literal["keypoints", "moments"] = "keypoints",
    max_side: int | Literal["auto"] = "auto",
    channel: Literal["grey", "hematoxylin", "od"] = "grey",
    allow_flip: bool = True,
    min_inliers: int = 10,
    keypoint_max_side: int = 400,
    matrices: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    check_order: bool = True,
    client: Client | None = None,
    show_progress_bar: bool = True,
    key_added: str = Key.sdata.aligned,
    copy: bool = False,
    progress: bool | None = None,
) -> AnnData | SpatialData | None:
    """Register the sections of a stack onto a reference section from their H&E images.

    Neighbouring sections are registered pairwise, each towards the reference (the middle
    section by default), and the pair transforms are composed along the stack, as in the
    paper. For each pair, on a downsampled copy of the images:

    1. tissue masks (:func:`asign_sc.pp.tissue_mask`) keep slide background and debris out
       of the fit, and the stain ``channel`` (:func:`asign_sc.pp.tissue_channel`) is zeroed
       outside them;
    2. initialisation (``init="keypoints"``): SIFT keypoints (kornia) are matched and a
       rigid map is fitted by RANSAC, also from the mirror image so a flipped section is
       found; if fewer than ``min_inliers`` matches agree, or the keypoint map overlaps
       the tissue clearly worse than the moment map, the moment initialisation is used:
       centroids and principal axes of the tissue masks, all axis sign combinations
       (rotations and mirror images) and a sweep of rotations, the best by tissue-mask
       Dice (computed only when the keypoint map's tissue Dice is below 0.9: above, no
       moment map could replace it). The QC table says which path was taken and why;
    3. refinement with ANTs (``ants.registration``, Mattes mutual information):
       ``"rigid"``, ``"affine"``, or ``"syn"`` (an affine stage, then SyN). A flip found at
       initialisation is kept (ANTs refines on top of it).

    Parameters
    ----------
    data
        SpatialData with one image per section (or a legacy AnnData with images under
        ``uns['spatial'][section]['images']``).
    library_key
        ``obs`` column naming each spot's section.
    sections
        Sections to register, in stacking order. Default: all, in stacking order.
    sample_key
        ``obs`` column naming the sample when the object holds several stacks; each sample
        is registered onto its own reference section.
    reference
        Section that stays fixed (its frame becomes the aligned frame). Default: the middle
        section (of each sample). With ``sample_key``, name one reference per sample or
        leave it ``None``.
    transform
        ``"rigid"`` (rotation + translation, default), ``"affine"``, or ``"syn"``
        (affine + diffeomorphic warp). With ``"syn"``, the affine part is what the
        spatialdata transformation holds, and spot centres in ``obsm`` also follow the warp.
    init
        ``"keypoints"`` (SIFT + RANSAC, falling back to moments) or ``"moments"`` only.
    max_side
        Long side in pixels of the image the registration works on (its precision: a
        working pixel is ``1 / max_side`` of the section): the coarsest stored level at
        least this long is read, and downsampled to ``max_side`` if it is more than 10 %
        longer. Nothing finer is decoded. ``"auto"``: the precision the spots need, a
        spot diameter spanning 4 working pixels (ANTs aligns to a fraction of a pixel), in
        500-2,000 pixels (1,000 when a section's spot radius is unknown); the value used is
        logged and kept in ``params``. On her2st patient C (ST spots 145 pixels across
        on 9,900-pixel images) that is 500 pixels: the spots land a median 8-9 pixels
        (an eighth of a spot radius) from where they do at 1,000 pixels, about twice
        ANTs' own run-to-run spread there, in less than half the time.
    channel
        Stain channel given to ANTs and to the keypoint detector: ``"grey"``,
        ``"hematoxylin"`` or ``"od"`` (optical density).
    allow_flip
        Consider mirror-image orientations (sections put on the slide face down). A flip
        found is logged and reported in the QC table's ``flipped`` column.
    min_inliers
        Fewest RANSAC inliers for a keypoint initialisation to be used.
    keypoint_max_side
        Long side of the (further downsampled) images keypoints are detected on: the shape
        of tissue structures, not single cells, matches between adjacent sections.
    matrices
        Pre-computed alignment instead of registration: a 3x3 matrix (or 2x3) per section,
        mapping its full-resolution ``(x, y)`` pixels to the aligned frame. Every section
        needs one; images are then optional (QC is computed where all sections have one).
        To provide spot coordinates directly instead, write them (``(x, y)`` in one common
        frame) to ``obsm['spatial_aligned']`` and skip this function: downstream steps
        only read that key.
    seed
        Seed of RANSAC and of ANTs' metric sampling.
    check_order
        After registering, compare every pair of sections of a sample in the aligned frame
        (smoothed stain channels, on the downsampled images already made): when another
        order of the sections has clearly better-matching neighbours, warn, naming it. The
        QC table has the columns either way. (Adjacent sections of a volume resemble each
        other most; a stack in the wrong order still registers pairwise, with a plausible
        Dice, but its spots end up in the wrong places.)
    client
        A :class:`dask.distributed.Client`: each section pair is registered by a task on its
        cluster (the downsampled sections are prepared here and sent to the workers once
        each), with the same results as in-process. ``None``: every pair is registered in
        this process, one after the other. See the "Scaling out" page of the documentation.
    show_progress_bar
        Show a progress bar over the section pairs.
    key_added
        Name of the coordinate system written to the SpatialData's images and spots. The
        ``obsm``/``uns`` keys follow from it (:func:`registration_key`).
    copy
        Return a registered copy instead of writing into ``data``.
    progress
        Former name of ``show_progress_bar`` (deprecated).

    Returns
    -------
    ``None``, or the registered copy when ``copy=True``. Written:

    - per section, a spatialdata ``Sequence([to_section_frame, Affine])`` transformation
      to coordinate system ``key_added`` on its image and shapes elements (SpatialData);
    - ``table.obsm['spatial_aligned']``: spot centres ``(x, y)`` in the reference
      section's full-resolution pixels (including the SyN displacement for ``"syn"``);
    - ``table.uns['asign_registration']``: ``matrices`` (section -> 3x3, section frame
      to aligned frame), ``pair_matrices`` (section -> 3x3 onto its neighbour),
      ``reference``, ``order``, ``params``, and ``qc``, a DataFrame with one row per
      section:

      - ``target``: the neighbour it was registered onto;
      - ``path``: ``"keypoints"``, ``"moments"``, ``"reference"`` or ``"user"``, with
        ``" + ants"`` when refined, or ``" (ants rejected)"`` when ANTs lowered the
        tissue Dice by more than 0.05 and the initialisation was kept (with a warning);
        ``note`` says why keypoints were not used;
      - ``flipped``, ``rotation_deg``: orientation of the section in the aligned frame;
      - ``n_matches``, ``n_inliers``: keypoint matches and RANSAC inliers;
      - similarity with the target before (sections overlaid as they lie on their
        slides), after initialisation (``dice_init``) and after refinement: tissue-mask
        Dice ``dice_*``; NCC ``ncc_*`` and normalised mutual information ``nmi_*``
        (1-2) of the stain channels over the tissue both share, smoothed by 0.5 % of
        the image side (adjacent sections share structures, not cells); for ``"syn"``
        these use the affine part;
      - ``dice_reference_before``, ``dice_reference_after``: with the reference
        section, through the composed transform;
      - ``order_neighbour_similarity``: the best similarity (NCC of the stain channels
        smoothed by 2 % of the image side, over the tissue both share) with a given
        neighbour, in the aligned frame; ``order_best_match`` and
        ``order_best_similarity``: the most similar section of the sample;
        ``order_suspect``: the section has other neighbours in an order of the sample whose
        neighbour dissimilarities (1 - NCC) sum to at least 10 % less than the given
        order's (with ``check_order``), which is then added to the ``uns`` entry as
        ``suggested_order``;
      - ``seconds``: time spent on the pair.

    Raises
    ------
    InvalidStackError
        Fewer than two sections, a section without an image (unless ``matrices`` are
        given), an unknown ``reference``, or an image without tissue (empty tissue mask).
    ValueError
        Unknown ``transform``/``init``/``channel``, or ``matrices`` that are not
        invertible 3x3 / 2x3 matrices for every section.

    Notes
    -----
    ANTs uses as many threads as ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` allows (all
    cores by default); set that environment variable to share a machine (on a Dask
    cluster: in the workers' environment). With ``seed`` fixed, a registration repeats to
    the bit on one ITK thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, set before the
    process starts); on several, ANTs adds up its metric in a varying order and positions
    can differ by a few pixels between runs.
    """
    if progress is not None:
        warnings.warn(
            "register_sections(progress=) is deprecated; use show_progress_bar=.",
            FutureWarning,
            stacklevel=2,
        )
        show_progress_bar = progress
    _check_options(transform, init, channel, max_side, keypoint_max_side, client)
    stack = resolve_stack(
        data,
        library_key=library_key,
        sections=sections,
        sample_key=sample_key,
        require_images=matrices is None,
        min_sections=2,
    )
    if copy:
        data = copy_data(data)
        stack = resolve_stack(
            data, library_key=library_key, sections=sections, sample_key=sample_key, min_sections=2
        )
    groups = _groups(stack)
    references = _references(stack, groups, reference)
    if max_side == "auto":
        max_side = _auto_max_side(stack)

    if matrices is not None:
        composed = _check_matrices(stack, matrices)
        images = all(s.has_image for s in stack)
        prepared = {s.name: _prepare(stack, s.name, max_side, channel) for s in stack if images}
        pair_matrices, point_maps = dict(composed), {}
        records = {name: {"target": "", "path": "user"} for name in composed}
    else:
        prepared = {s.name: _prepare(stack, s.name, max_side, channel) for s in stack}
        pair_matrices, point_maps, records = _register_pairs(
            prepared,
            groups,
            references,
            show_progress_bar=show_progress_bar,
            transform=transform,
            init=init,
            allow_flip=allow_flip,
            min_inliers=min_inliers,
            keypoint_max_side=keypoint_max_side,
            seed=seed,
            client=client,
        )
        composed = _compose(groups, references, pair_matrices)

    aligned = _aligned_spots(stack, groups, references, pair_matrices, point_maps, composed)
    suggested: dict[str | None, list[str]] = {}
    if prepared:
        _reference_qc(prepared, groups, references, composed, records)
        if check_order:
            suggested = _order_check(prepared, groups, composed, records, allow_flip=allow_flip)
    _write(
        stack,
        composed=composed,
        pair_matrices=pair_matrices,
        aligned=aligned,
        records=records,
        references=references,
        groups=groups,
        params={
            "library_key": library_key,
            "sample_key": sample_key,
            "transform": transform if matrices is None else "user",
            "init": init,
            "max_side": max_side,
            "channel": channel,
            "allow_flip": allow_flip,
            "min_inliers": min_inliers,
            "keypoint_max_side": keypoint_max_side,
            "seed": seed,
            "check_order": check_order,
            "key_added": key_added,
            "client": _client_record(client),
        },
        key_added=key_added,
        suggested=suggested,
    )
    return data if copy else None


# -- set-up ----------------------------------------------------------------------------------
def _check_options(
    transform: str, init: str, channel: str, max_side: int, keypoint_max_side: int, client: Any
) -> None:
    if client is not None and not callable(getattr(client, "submit", None)):
        raise ValueError(
            f"client must be a dask.distributed.Client (or None), got {type(client).__name__}."
        )
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}.")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
    if channel not in ("grey", "hematoxylin", "od"):
        raise ValueError(f"channel must be 'grey', 'hematoxylin' or 'od', got {channel!r}.")
    if max_side == "auto":
        max_side = _AUTO_MIN_SIDE
    elif isinstance(max_side, bool) or not isinstance(max_side, int | np.integer):
        raise ValueError(f"max_side must be 'auto' or a number of pixels, got {max_side!r}.")
    if max_side < 64 or keypoint_max_side < 64:
        raise ValueError(
            f"max_side ({max_side}) and keypoint_max_side ({keypoint_max_side}) must be at "
            "least 64 pixels."
        )


def _auto_max_side(stack: SectionStack) -> int:
    """``max_side="auto"``: the working long side at which a spot spans a few pixels.

    The most demanding section decides (the smallest spots relative to their image), within
    :data:`_AUTO_MIN_SIDE` and :data:`_AUTO_MAX_SIDE`, and never longer than the largest image.
    """
    needed, longest = [], 0
    for section in stack:
        if not section.has_image or section.image_shape is None:
            continue
        long_side = max(section.image_shape)
        longest = max(longest, long_side)
        diameter = 2.0 * section.spot_radius * section.image_scale
        needed.append(
            long_side * _AUTO_PIXELS_PER_SPOT / diameter
            if np.isfinite(diameter) and diameter > 0
            else _AUTO_UNKNOWN_RADIUS_SIDE
        )
    if not needed:
        return _AUTO_UNKNOWN_RADIUS_SIDE
    side = int(np.clip(np.ceil(max(needed)), _AUTO_MIN_SIDE, _AUTO_MAX_SIDE))
    side = min(side, longest) if longest else side
    logger.info(
        "Registering at a working long side of %d pixels (max_side='auto', from the spot "
        "size; pass max_side= to change it).",
        side,
    )
    return side


def _client_record(client: Client | None) -> str | None:
    """The scheduler address and worker count of a Dask client, for the record."""
    if client is None:
        return None
    from asign_sc.tl._features import _describe_client  # imports torch: only when needed

    return _describe_client(client)


def _groups(stack: SectionStack) -> dict[str | None, list[str]]:
    """Section names per sample, in stacking order; every sample needs two sections."""
    groups = {sample: [s.name for s in group] for sample, group in stack.samples().items()}
    for sample, names in groups.items():
        if len(names) < 2:
            raise InvalidStackError(
                f"Sample {sample!r} has only one section ({names[0]!r}): registration needs "
                "at least two sections per sample. Leave it out with sections=."
            )
    return groups


def _register_pairs(
    prepared: dict[str, PreparedSection],
    groups: dict[str | None, list[str]],
    references: dict[str | None, str],
    *,
    show_progress_bar: bool,
    client: Client | None = None,
    **options: Any,
) -> tuple[dict[str, np.ndarray], dict[str, PointMap], dict[str, dict]]:
    """Register every section onto its neighbour towards the reference (``_register_pair``)."""
    from tqdm.auto import tqdm

    pair_matrices: dict[str, np.ndarray] = {}
    point_maps: dict[str, PointMap] = {}
    records: dict[str, dict] = {}
    pairs = [
        (moving, target)
        for sample, names in groups.items()
        for moving, target in _pairs(names, references[sample])
    ]
    if client is None:
        results = (
            (moving, _register_pair(prepared[moving], prepared[target], **options))
            for moving, target in pairs
        )
    else:
        results = _pairs_on_client(client, prepared, pairs, options)
    for moving, (matrix, point_map, record) in tqdm(
        results, total=len(pairs), desc="registering", disable=not show_progress_bar
    ):
        pair_matrices[moving], records[moving] = matrix, record
        if point_map is not None:
            point_maps[moving] = point_map
    for reference_name in references.values():
        pair_matrices[reference_name] = np.eye(3)
        records[reference_name] = {"target": "", "path": "reference"}
    return pair_matrices, point_maps, records


def _pairs_on_client(
    client: Client,
    prepared: dict[str, PreparedSection],
    pairs: list[tuple[str, str]],
    options: dict[str, Any],
) -> Iterator[tuple[str, tuple[np.ndarray, PointMap | None, dict]]]:
    """Section pairs as tasks on a ``dask.distributed`` client, results as they complete.

    Each prepared section goes to the cluster once (``scatter``) and serves both pairs it
    belongs to; the pairs are independent (each is registered onto its neighbour, and the
    maps are composed here afterwards), so they run in any order on any worker.
    """
    from distributed import as_completed

    names = list(dict.fromkeys(name for pair in pairs for name in pair))
    shipped = dict(
        zip(names, client.scatter([prepared[n] for n in names], hash=False), strict=True)
    )
    futures = {
        client.submit(
            _register_pair, shipped[moving], shipped[target], pure=False, **options
        ): moving
        for moving, target in pairs
    }
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        client.cancel(list(futures))


def _references(
    stack: SectionStack, groups: dict[str | None, list[str]], reference: str | None
) -> dict[str | None, str]:
    if reference is None:
        return {sample: names[len(names) // 2] for sample, names in groups.items()}
    section = stack[reference]  # raises for an unknown name
    if len(groups) > 1:
        raise InvalidStackError(
            f"reference={reference!r} names one section, but the stack holds "
            f"{len(groups)} samples ({list(groups)}). Leave reference=None (middle section "
            "of each sample) or register one sample at a time with sections=."
        )
    return {section.sample: reference}


def _pairs(names: list[str], reference: str) -> list[tuple[str, str]]:
    """(moving, target) pairs, each section towards the reference, nearest first."""
    r = names.index(reference)
    below = [(names[i], names[i + 1]) for i in range(r - 1, -1, -1)]
    above = [(names[i], names[i - 1]) for i in range(r + 1, len(names))]
    return below + above


def _prepare(stack: SectionStack, name: str, max_side: int, channel: str) -> PreparedSection:
    image, scale = stack.image(name, max_side=max_side)
    long_side = max(image.shape[:2])
    if long_side > _MAX_SIDE_SLACK * max_side:
        from skimage.transform import resize

        factor = max_side / long_side
        shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
        scale = scale * np.array([shape[1] / image.shape[1], shape[0] / image.shape[0]])
        image = (resize(image, shape, anti_aliasing=True, preserve_range=True)).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    mask = tissue_mask(image)
    if mask.sum() < 0.001 * mask.size:
        raise InvalidStackError(
            f"No tissue found in the image of section {name!r} (the tissue mask covers "
            f"{100 * mask.mean():.2f}% of it). Check that the image is an H&E of the section "
            "(not blank or inverted), or pass matrices= to align it yourself."
        )
    stain = tissue_channel(image, channel=channel) * mask
    return PreparedSection(name=name, channel=stain, mask=mask, scale=np.asarray(scale, float))


def _check_matrices(
    stack: SectionStack, matrices: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    unknown = sorted(set(matrices) - set(stack.names))
    if unknown:
        raise ValueError(
            f"matrices= names sections that are not in the stack: {unknown} "
            f"(sections: {stack.names})."
        )
    missing = [name for name in stack.names if name not in matrices]
    if missing:
        raise ValueError(
            f"matrices= lacks sections {missing}; give a matrix for every section "
            "(np.eye(3) for the reference)."
        )
    out = {}
    for name in stack.names:
        matrix = np.asarray(matrices[name], dtype=float)
        if matrix.shape == (2, 3):
            matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
        if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
            raise ValueError(
                f"matrices[{name!r}] must be a 3x3 affine matrix (last row 0, 0, 1) or 2x3, "
                f"got shape {matrix.shape}."
            )
        if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
            raise ValueError(f"matrices[{name!r}] is not invertible: {matrix.tolist()}.")
        out[name] = matrix
    return out


# -- one pair ------------------------------------------------------------------------------
def _keypoint_level(section: PreparedSection, max_side: int) -> PreparedSection:
    """The section further downsampled for keypoint detection (cached on the section)."""
    cached = section._keypoints.get("level")
    if cached is not None and cached[0] == max_side:
        return cached[1]
    from skimage.transform import resize

    factor = min(1.0, max_side / max(section.channel.shape))
    shape = tuple(max(1, round(n * factor)) for n in section.channel.shape)
    channel = resize(section.channel, shape, order=1, anti_aliasing=factor < 1.0)
    mask = resize(section.mask.astype(np.float32), shape, order=1, anti_aliasing=factor < 1.0) > 0.5
    scale = section.scale * np.array(
        [shape[1] / section.channel.shape[1], shape[0] / section.channel.shape[0]]
    )
    small = PreparedSection(section.name, channel.astype(np.float32), mask, scale)
    section._keypoints["level"] = (max_side, small)
    return small


def _initialise(
    moving: PreparedSection,
    fixed: PreparedSection,
    *,
    init: str,
    allow_flip: bool,
    min_inliers: int,
    keypoint_max_side: int,
    seed: int,
) -> tuple[InitResult, InitResult | None]:
    if init == "moments":
        return moment_init(moving, fixed, allow_flip=allow_flip), None
    keypoints = keypoint_init(
        _keypoint_level(moving, keypoint_max_side),
        _keypoint_level(fixed, keypoint_max_side),
        allow_flip=allow_flip,
        seed=seed,
    )
    if keypoints is not None:
        keypoints.dice = mask_dice(moving, fixed, keypoints.matrix)
        if keypoints.n_inliers >= min_inliers and keypoints.dice >= 1.0 - _KEYPOINT_DICE_SLACK:
            # no moment map can beat it by the slack (a Dice is at most 1): the rotation
            # sweep (~150 resampled masks, most of the initialisation's time) is skipped
            return keypoints, keypoints
    moments = moment_init(moving, fixed, allow_flip=allow_flip)
    if keypoints is None:
        moments.note = "no keypoint matches"
        return moments, None
    if keypoints.n_inliers < min_inliers:
        moments.note = f"{keypoints.n_inliers} keypoint inliers < min_inliers={min_inliers}"
        return moments, keypoints
    if keypoints.dice < moments.dice - _KEYPOINT_DICE_SLACK:
        moments.note = (
            f"keypoint map rejected: tissue Dice {keypoints.dice:.3f} vs {moments.dice:.3f} "
            "from moments"
        )
        return moments, keypoints
    return keypoints, keypoints


def _register_pair(
    moving: PreparedSection,
    fixed: PreparedSection,
    *,
    transform: str,
    init: str,
    allow_flip: bool,
    min_inliers: int,
    keypoint_max_side: int,
    seed: int,
) -> tuple[np.ndarray, PointMap | None, dict]:
    from asign_sc.tl._registration_ants import ants_refine

    start = time.perf_counter()
    chosen, keypoints = _initialise(
        moving,
        fixed,
        init=init,
        allow_flip=allow_flip,
        min_inliers=min_inliers,
        keypoint_max_side=keypoint_max_side,
        seed=seed,
    )
    refined = ants_refine(moving, fixed, chosen.matrix, transform=transform, seed=seed)
    matrix, point_map = refined.matrix, refined.map_points
    dice_after = mask_dice(moving, fixed, matrix)
    path = f"{chosen.path} + ants"
    if dice_after < chosen.dice - _ANTS_DICE_DROP:
        logger.warning(
            "ANTs lowered the tissue-mask Dice of %s onto %s from %.3f to %.3f; keeping the %s "
            "initialisation (see uns QC 'path').",
            moving.name,
            fixed.name,
            chosen.dice,
            dice_after,
            chosen.path,
        )
        matrix, point_map, dice_after = chosen.matrix, None, chosen.dice
        path = f"{chosen.path} (ants rejected)"
    flipped = bool(np.linalg.det(matrix[:2, :2]) < 0)
    if flipped:
        logger.info(
            "Section %s is mirrored relative to %s (flip detected).", moving.name, fixed.name
        )
    before = _pair_similarity(moving, fixed, np.eye(3))
    after = _pair_similarity(moving, fixed, matrix)
    record = {
        "target": fixed.name,
        "path": path,
        "note": chosen.note,
        "n_matches": keypoints.n_matches if keypoints is not None else 0,
        "n_inliers": keypoints.n_inliers if keypoints is not None else 0,
        "dice_before": before["dice"],
        "dice_init": chosen.dice,
        "dice_after": after["dice"] if point_map is None else dice_after,
        "ncc_before": before["ncc"],
        "ncc_after": after["ncc"],
        "nmi_before": before["nmi"],
        "nmi_after": after["nmi"],
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "Registered %s onto %s (%s): tissue Dice %.3f -> %.3f, NCC %.3f -> %.3f.",
        moving.name,
        fixed.name,
        path,
        record["dice_before"],
        record["dice_after"],
        record["ncc_before"],
        record["ncc_after"],
    )
    return matrix, point_map, record


def _rotation_deg(matrix: np.ndarray) -> float:
    linear = matrix[:2, :2]
    if np.linalg.det(linear) < 0:
        linear = linear @ np.diag([-1.0, 1.0])
    return float(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))


def _pair_similarity(
    moving: PreparedSection,
    fixed: PreparedSection,
    matrix: np.ndarray,
    *,
    sigma_fraction: float = _QC_SIGMA,
) -> dict:
    """Tissue Dice, NCC and NMI of the moving section mapped by ``matrix`` onto the fixed one.

    NCC and NMI compare the stain channels over the tissue both sections share, smoothed
    by :data:`_QC_SIGMA` of the image's long side: adjacent sections share tissue
    structures, not single cells, so unsmoothed channels barely correlate even when aligned.
    They are computed on :func:`_smoothed` copies (smoothed once per section, in its own
    frame, then mapped: for the rigid and affine maps here that is the same as smoothing
    after mapping, up to interpolation); the Dice uses the full working resolution.
    """
    from skimage.metrics import normalized_mutual_information

    shape = fixed.mask.shape
    warped_mask = warp_to(moving.mask, matrix, moving.scale, fixed.scale, shape, order=0) > 0.5
    out = {"dice": dice(warped_mask, fixed.mask), "ncc": float("nan"), "nmi": float("nan")}
    small_moving, small_fixed = _smoothed(moving, sigma_fraction), _smoothed(fixed, sigma_fraction)
    small_shape = small_fixed.mask.shape
    warped = warp_to(
        small_moving.channel, matrix, small_moving.scale, small_fixed.scale, small_shape, order=1
    )
    shared = small_fixed.mask & (
        warp_to(
            small_moving.mask, matrix, small_moving.scale, small_fixed.scale, small_shape, order=0
        )
        > 0.5
    )
    if shared.sum() < 16:
        return out
    a = warped[shared].astype(float)
    b = small_fixed.channel[shared].astype(float)
    if a.std() > 0 and b.std() > 0:
        out["ncc"] = float(np.corrcoef(a, b)[0, 1])
        out["nmi"] = float(normalized_mutual_information(a, b, bins=32))
    return out


def _smoothed(section: PreparedSection, sigma_fraction: float) -> PreparedSection:
    """The section's stain channel smoothed by ``sigma_fraction`` of its long side, subsampled.

    A Gaussian of ``sigma`` pixels leaves nothing finer than about ``sigma`` pixels, so the
    smoothed channel is kept every ``sigma / 2`` pixels: the comparisons in
    :func:`_pair_similarity` then warp a grid up to ``(sigma / 2)^2`` times smaller, and the
    smoothing runs once per section instead of once per comparison. Cached on the section.
    """
    key = ("smoothed", sigma_fraction)
    cached = section._keypoints.get(key)
    if cached is not None:
        return cached
    from scipy import ndimage as ndi

    sigma = sigma_fraction * max(section.mask.shape)
    step = max(1, int(sigma // 2))
    channel = ndi.gaussian_filter(section.channel.astype(np.float32), sigma)[::step, ::step]
    small = PreparedSection(
        section.name, channel, section.mask[::step, ::step], section.scale / step
    )
    section._keypoints[key] = small
    return small


# -- chaining and writing ------------------------------------------------------------------
def _compose(
    groups: dict[str | None, list[str]],
    references: dict[str | None, str],
    pair_matrices: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Section frame -> reference frame: the product of pair maps along the stack."""
    composed: dict[str, np.ndarray] = {}
    for sample, names in groups.items():
        r = names.index(references[sample])
        composed[names[r]] = np.eye(3)
        for i in range(r - 1, -1, -1):
            composed[names[i]] = composed[names[i + 1]] @ pair_matrices[names[i]]
        for i in range(r + 1, len(names)):
            composed[names[i]] = composed[names[i - 1]] @ pair_matrices[names[i]]
    return composed


def _aligned_spots(
    stack: SectionStack,
    groups: dict[str | None, list[str]],
    references: dict[str | None, str],
    pair_matrices: dict[str, np.ndarray],
    point_maps: dict[str, PointMap],
    composed: dict[str, np.ndarray],
) -> np.ndarray:
    out = np.full((stack.table.n_obs, 2), np.nan)
    for sample, names in groups.items():
        r = names.index(references[sample])
        for i, name in enumerate(names):
            xy = stack[name].spatial
            if not point_maps:
                xy = (np.c_[xy, np.ones(len(xy))] @ composed[name].T)[:, :2]
            else:  # follow every pair's own map (SyN warps do not compose as matrices)
                path = range(i, r) if i < r else range(i, r, -1)
                for j in path:
                    step = names[j]
                    if step in point_maps:
                        xy = point_maps[step](xy)
                    else:
                        xy = (np.c_[xy, np.ones(len(xy))] @ pair_matrices[step].T)[:, :2]
            out[stack[name].rows] = xy
    return out


def _reference_qc(
    prepared: dict[str, PreparedSection],
    groups: dict[str | None, list[str]],
    references: dict[str | None, str],
    composed: dict[str, np.ndarray],
    records: dict[str, dict],
) -> None:
    for sample, names in groups.items():
        ref = prepared[references[sample]]
        # user matrices may map to any common frame: compare in the reference's own frame
        to_ref = np.linalg.inv(composed[ref.name])
        for name in names:
            records[name]["dice_reference_before"] = mask_dice(prepared[name], ref, np.eye(3))
            records[name]["dice_reference_after"] = mask_dice(
                prepared[name], ref, to_ref @ composed[name]
            )


def _order_check(
    prepared: dict[str, PreparedSection],
    groups: dict[str | None, list[str]],
    composed: dict[str, np.ndarray],
    records: dict[str, dict],
    *,
    allow_flip: bool,
) -> dict[str | None, list[str]]:
    """Compare every pair of sections in the aligned frame; flag a suspect stacking order.

    Returns the order the images suggest, per sample whose order is suspect.
    """
    suggested = {}
    for sample, names in groups.items():
        n = len(names)
        similarity = np.full((n, n), np.nan)
        for i, j in itertools.combinations(range(n), 2):
            a, b = prepared[names[i]], prepared[names[j]]
            # Given neighbours: their own registration (chained through the stack, it maps
            # one onto the other). Other pairs: the better of the chained map and their own
            # tissue-moment fit, which does not depend on the given order.
            matrices = [np.linalg.inv(composed[b.name]) @ composed[a.name]]
            if j - i > 1:
                matrices.append(
                    moment_init(
                        a, b, allow_flip=allow_flip, n_angles=36, coarse_side=_ORDER_COARSE_SIDE
                    ).matrix
                )
            similarity[i, j] = similarity[j, i] = _nanmax(
                [_pair_similarity(a, b, m, sigma_fraction=_ORDER_SIGMA)["ncc"] for m in matrices]
            )
        logger.debug("Stacking-order check, NCC between sections %s:\n%s", names, similarity)
        scores = np.nan_to_num(similarity, nan=-1.0)
        order = _likely_order(scores)
        if order[0] > order[-1]:
            order = order[::-1]  # of the two directions, the one closer to the given order
        given_distance = sum(1.0 - scores[i, i + 1] for i in range(n - 1))
        gain = given_distance - sum(1.0 - scores[a, b] for a, b in itertools.pairwise(order))
        reordered = order not in (list(range(n)), list(range(n))[::-1])
        suspect = reordered and gain > max(_ORDER_MARGIN * given_distance, _ORDER_MIN_GAIN)
        position = {k: p for p, k in enumerate(order)}
        for i, name in enumerate(names):
            neighbours = [j for j in (i - 1, i + 1) if 0 <= j < n]
            best = int(np.argmax(np.where(np.eye(n, dtype=bool)[i], -np.inf, scores[i])))
            suggested_neighbours = {k for k in order if abs(position[k] - position[i]) == 1}
            records[name].update(
                order_neighbour_similarity=_nanmax([similarity[i, j] for j in neighbours]),
                order_best_match=names[best],
                order_best_similarity=float(similarity[i, best]),
                order_suspect=bool(suspect and suggested_neighbours != set(neighbours)),
            )
        if not suspect:
            continue
        suggested[sample] = [names[k] for k in order]
        logger.warning(
            "Sections%s may be out of stacking order: placed as %s, neighbouring sections "
            "match worse (sum of 1 - NCC of the aligned images %.2f higher) than in the "
            "order %s. "
            "If that is the true order, give the sections in it (the categories of "
            "obs[library_key], or sections=) and register again; see order_* in the "
            "registration QC table.",
            "" if sample is None else f" of sample {sample!r}",
            names,
            gain,
            suggested[sample],
        )
    return suggested


def _nanmax(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if np.isfinite(v)]
    return max(finite) if finite else float("nan")


def _likely_order(scores: np.ndarray) -> list[int]:
    """The path through all sections with the largest sum of neighbour similarities."""
    n = len(scores)
    if n <= _ORDER_EXHAUSTIVE:
        best, best_total = list(range(n)), -np.inf
        for path in itertools.permutations(range(n)):
            if path[0] > path[-1]:
                continue  # each path once (its reverse is the same stack)
            total = sum(scores[a, b] for a, b in itertools.pairwise(path))
            if total > best_total:
                best, best_total = list(path), total
        return best
    # greedy: grow a chain from the most similar pair, at whichever end fits best
    i, j = np.unravel_index(
        np.argmax(np.where(np.eye(n, dtype=bool), -np.inf, scores)), scores.shape
    )
    chain, left = [int(i), int(j)], set(range(n)) - {int(i), int(j)}
    while left:
        head = max(left, key=lambda k: scores[chain[0], k])
        tail = max(left, key=lambda k: scores[chain[-1], k])
        if scores[chain[0], head] > scores[chain[-1], tail]:
            chain.insert(0, head)
            left.remove(head)
        else:
            chain.append(tail)
            left.remove(tail)
    return chain


def _write(
    stack: SectionStack,
    *,
    composed: dict[str, np.ndarray],
    pair_matrices: dict[str, np.ndarray],
    aligned: np.ndarray,
    records: dict[str, dict],
    references: dict[str | None, str],
    groups: dict[str | None, list[str]],
    params: dict,
    key_added: str,
    suggested: dict[str | None, list[str]],
) -> None:
    obsm_key, uns_key = registration_key(key_added)
    for name, matrix in composed.items():
        stack.set_transformation(name, matrix, to_coordinate_system=key_added)
    table = stack.table
    table.obsm[obsm_key] = aligned
    qc = _qc_frame(stack.names, records, composed)
    order = [name for names in groups.values() for name in names]
    table.uns[uns_key] = {
        "matrices": {name: np.asarray(composed[name], dtype=float) for name in order},
        "pair_matrices": {name: np.asarray(pair_matrices[name], dtype=float) for name in order},
        "reference": (
            next(iter(references.values()))
            if len(references) == 1
            else {str(k): v for k, v in references.items()}
        ),
        "order": np.asarray(order, dtype=object),
        "qc": qc,
        "params": sanitize_uns(params),
    }
    if suggested:
        table.uns[uns_key]["suggested_order"] = (
            np.asarray(next(iter(suggested.values())), dtype=object)
            if len(suggested) == 1
            else {str(k): np.asarray(v, dtype=object) for k, v in suggested.items()}
        )
    extra = (
        f" and a transformation to coordinate system {key_added!r} on each section's "
        "image and spots"
        if stack.is_spatialdata
        else ""
    )
    logger.info(
        "Registered %d sections onto %s: added obsm[%r], uns[%r]%s.",
        len(order),
        ", ".join(references.values()),
        obsm_key,
        uns_key,
        extra,
    )


def _qc_frame(
    names: list[str], records: dict[str, dict], composed: dict[str, np.ndarray]
) -> pd.DataFrame:
    rows = []
    for name in names:
        record = dict(records[name])
        # orientation of the section in the aligned frame (not of its pair map)
        record["rotation_deg"] = _rotation_deg(composed[name])
        record["flipped"] = bool(np.linalg.det(composed[name][:2, :2]) < 0)
        rows.append(record)
    columns = [
        "target",
        "path",
        "note",
        "flipped",
        "n_matches",
        "n_inliers",
        "rotation_deg",
        "dice_before",
        "dice_init",
        "dice_after",
        "ncc_before",
        "ncc_after",
        "nmi_before",
        "nmi_after",
        "dice_reference_before",
        "dice_reference_after",
        "order_neighbour_similarity",
        "order_best_match",
        "order_best_similarity",
        "order_suspect",
        "seconds",
    ]
    frame = pd.DataFrame(rows, index=pd.Index(names, name="section")).reindex(columns=columns)
    frame["target"] = frame["target"].fillna("").astype(str)
    frame["path"] = frame["path"].fillna("").astype(str)
    frame["note"] = frame["note"].fillna("").astype(str)
    frame["order_best_match"] = frame["order_best_match"].fillna("").astype(str)
    for column in ("flipped", "order_suspect"):
        # missing (reference, no order check) is False; mapped, not fillna'd on an object
        # column (pandas' FutureWarning about downcasting reached the user's notebook)
        frame[column] = frame[column].map(lambda value: bool(value) if pd.notna(value) else False)
        frame[column] = frame[column].astype(bool)
    for column in ("n_matches", "n_inliers"):
        frame[column] = frame[column].fillna(0).astype(int)
    return frame
