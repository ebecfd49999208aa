"""ANTs (antspyx) refinement of a section pair, and conversions to 3x3 pixel matrices.

Conventions, checked by ``tests/tl/test_registration.py`` against known transforms:

* a working-resolution image ``(rows, cols)`` is handed to ANTs *transposed* (index 0 = x)
  with spacing ``1 / scale``, so ANTs' physical point ``(p0, p1)`` is the full-resolution
  pixel ``(x, y)`` and no axis swapping or flipping is needed anywhere else;
* ANTs' forward transform of ``registration(fixed, moving)`` maps *fixed* physical points to
  *moving* ones (it is what resamples the moving image); our matrices map moving to fixed,
  so they are its inverse.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from asign_sc.tl._registration_init import PreparedSection

logger = logging.getLogger(__name__)

#: ANTs type_of_transform of each user-facing ``transform`` (the linear stage).
_LINEAR = {"rigid": "Rigid", "affine": "Affine", "syn": "Affine"}


@dataclass
class RefineResult:
    """Outcome of the ANTs refinement of one pair."""

    matrix: np.ndarray
    """Linear (affine) part, moving -> fixed, full-resolution pixels."""
    map_points: Callable[[np.ndarray], np.ndarray] | None
    """For SyN: moving full-resolution ``(x, y)`` -> fixed ones (linear part and warp)."""


def to_ants(section: PreparedSection, margin: float = 0.1):
    """The section's masked stain channel as an ANTs image in full-resolution pixel space.

    Cropped to the tissue's bounding box plus ``margin`` of its size on each side (the
    rest is zero and only costs time); the crop's origin keeps physical points equal to
    full-resolution pixels of the whole image.
    """
    import ants

    rows, cols = np.nonzero(section.mask)
    height, width = section.mask.shape
    pad_r = int(np.ceil(margin * (rows.max() - rows.min() + 1))) + 2
    pad_c = int(np.ceil(margin * (cols.max() - cols.min() + 1))) + 2
    r0, r1 = max(0, rows.min() - pad_r), min(height, rows.max() + 1 + pad_r)
    c0, c1 = max(0, cols.min() - pad_c), min(width, cols.max() + 1 + pad_c)
    crop = section.channel[r0:r1, c0:c1]
    sx, sy = float(section.scale[0]), float(section.scale[1])
    return ants.from_numpy(
        np.ascontiguousarray(crop.T, dtype=np.float32),
        origin=(c0 / sx, r0 / sy),
        spacing=(1.0 / sx, 1.0 / sy),
    )


def ants_transform_matrix(transform, length: float = 1000.0) -> np.ndarray:
    """3x3 matrix of an ANTs linear transform, from where it sends three points.

    Reading ``parameters``/``fixed_parameters`` would depend on the transform class
    (Euler, similarity, affine: each orders and centres its parameters differently); the
    images of the origin and two axis points determine any affine map exactly.
    """
    p0 = np.asarray(transform.apply_to_point((0.0, 0.0)), dtype=float)
    px = np.asarray(transform.apply_to_point((length, 0.0)), dtype=float)
    py = np.asarray(transform.apply_to_point((0.0, length)), dtype=float)
    matrix = np.eye(3)
    matrix[:2, 0] = (px - p0) / length
    matrix[:2, 1] = (py - p0) / length
    matrix[:2, 2] = p0
    return matrix


def write_ants_affine(matrix: np.ndarray, path: str) -> str:
    """Write a 3x3 map (ANTs direction: fixed -> moving physical points) as an ITK .mat."""
    import ants

    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=2,
        matrix=np.asarray(matrix[:2, :2], dtype=float),
        translation=np.asarray(matrix[:2, 2], dtype=float),
    )
    ants.write_transform(transform, path)
    return path


@contextmanager
def ants_seed(seed: int) -> Iterator[dict]:
    """Seed ANTs' metric sampling for the calls inside; yields the keyword arguments to add.

    antspyx 0.6 ignores ``registration(random_seed=)`` (it lands in ``**kwargs``) and passes
    ``--random-seed`` to ANTs only from its module setting ``ants.config._random_seed``, so
    an unseeded registration samples differently on every run. Its public switch,
    ``ants.set_ants_deterministic``, would also pin ITK to one thread for the whole process
    and reseed numpy's and Python's global generators; here only the seed is set, and the
    previous value is restored. Older antspyx without that setting take the keyword. ANTs
    reads a seed of 0 as "seed from the clock", so ``seed + 1`` is passed.

    Repeatable to the bit with one ITK thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``);
    with several, ANTs sums the metric over threads in a varying order.
    """
    ants_value = int(seed) + 1  # ANTs: 0 means the system clock
    import ants

    config = getattr(ants, "config", None)
    if config is None or not hasattr(config, "_random_seed"):
        yield {"random_seed": ants_value}
        return
    previous = config._random_seed
    config._random_seed = ants_value
    try:
        yield {}
    finally:
        config._random_seed = previous


def ants_refine(
    moving: PreparedSection,
    fixed: PreparedSection,
    init: np.ndarray,
    *,
    transform: str,
    seed: int = 0,
    iterations: tuple[int, ...] = (100, 100, 50, 20),
    shrink_factors: tuple[int, ...] = (8, 4, 2, 1),
    smoothing_sigmas: tuple[float, ...] = (3, 2, 1, 0),
    syn_iterations: tuple[int, ...] = (100, 70, 50, 20),
) -> RefineResult:
    """Refine ``init`` (moving -> fixed, full-resolution pixels) with ``ants.registration``.

    Mutual information (Mattes) on the masked stain channels, a multi-resolution linear
    stage of type ``transform`` (``"rigid"`` or ``"affine"``; ``"syn"`` runs an affine
    stage and then SyN on top of it).
    """
    import ants

    if transform not in _LINEAR:
        raise ValueError(f"transform must be one of {sorted(_LINEAR)}, got {transform!r}.")
    fixed_img, moving_img = to_ants(fixed), to_ants(moving)
    with tempfile.TemporaryDirectory(prefix="asign_ants_") as tmp, ants_seed(seed) as seeded:
        init_path = write_ants_affine(np.linalg.inv(init), os.path.join(tmp, "init.mat"))
        linear = ants.registration(
            fixed_img,
            moving_img,
            type_of_transform=_LINEAR[transform],
            initial_transform=[init_path],
            outprefix=os.path.join(tmp, "lin_"),
            aff_iterations=iterations,
            aff_shrink_factors=shrink_factors,
            aff_smoothing_sigmas=smoothing_sigmas,
            **seeded,
        )
        # the output transform is the initial one composed with the optimised stage
        fwd = ants_transform_matrix(ants.read_transform(linear["fwdtransforms"][-1]))
        matrix = np.linalg.inv(fwd)
        if transform != "syn":
            return RefineResult(matrix=matrix, map_points=None)
        affine_path = write_ants_affine(fwd, os.path.join(tmp, "affine.mat"))
        syn = ants.registration(
            fixed_img,
            moving_img,
            type_of_transform="SyNOnly",
            initial_transform=[affine_path],
            outprefix=os.path.join(tmp, "syn_"),
            reg_iterations=syn_iterations,
            **seeded,
        )
        warp_paths = [p for p in syn["invtransforms"] if p.endswith((".nii.gz", ".nii"))]
        if not warp_paths:
            raise RuntimeError(f"ANTs SyN returned no inverse warp field: {syn['invtransforms']}.")
        # read the inverse warp into memory: the temporary folder goes away
        inverse_warp = ants.image_read(warp_paths[0])
    return RefineResult(matrix=matrix, map_points=_syn_point_mapper(inverse_warp, matrix))


def _syn_point_mapper(inverse_warp, matrix: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Moving -> fixed point map of an affine stage followed by a SyN warp.

    ANTs moves points with the inverse of the image transforms. The fixed->moving image
    transform is ``affine(warp(p))``; points go moving -> fixed by ``affine^-1`` and then
    the inverse warp, which is a displacement field on the fixed grid.
    """
    import ants

    def map_points(xy: np.ndarray) -> np.ndarray:
        import pandas as pd

        linear = (np.c_[xy, np.ones(len(xy))] @ matrix.T)[:, :2]
        with tempfile.TemporaryDirectory(prefix="asign_ants_") as tmp:
            path = os.path.join(tmp, "inverse_warp.nii.gz")
            ants.image_write(inverse_warp, path)
            points = pd.DataFrame({"x": linear[:, 0], "y": linear[:, 1]})
            # apply_transforms_to_points moves points with the *inverse* of what the
            # transform does to images: passing the forward-image inverse warp would go the
            # wrong way, so the inverse field is the one that maps points moving -> fixed.
            moved = ants.apply_transforms_to_points(2, points, [path])
        return moved[["x", "y"]].to_numpy(dtype=float)

    return map_points
