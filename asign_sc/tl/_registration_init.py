"""Initial (global) alignment of two sections: keypoint matches, or tissue-mask moments.

All matrices here are 3x3 homogeneous maps acting on ``(x, y, 1)`` in *full-resolution*
pixels, from the moving section's frame to the fixed section's frame. Images come at a
working resolution with ``scale = (sx, sy)`` working pixels per full-resolution pixel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Reflection x -> -x, the one mirror the moment and keypoint searches add to rotations.
_MIRROR = np.diag([-1.0, 1.0, 1.0])


@dataclass
class PreparedSection:
    """One section at the working resolution, as the registration sees it."""

    name: str
    channel: np.ndarray
    """Stain channel (bright = tissue), zero outside the tissue mask."""
    mask: np.ndarray
    scale: np.ndarray
    """``(sx, sy)``: working pixels per full-resolution pixel."""
    _keypoints: dict = field(default_factory=dict, repr=False)

    @property
    def to_working(self) -> np.ndarray:
        """3x3 map from full-resolution to working pixels."""
        return np.diag([self.scale[0], self.scale[1], 1.0])


@dataclass
class InitResult:
    """An initial transform and how it was found."""

    matrix: np.ndarray
    path: str
    """``"keypoints"`` or ``"moments"``."""
    n_matches: int
    n_inliers: int
    dice: float
    """Tissue-mask Dice of the fixed section and the moving one under ``matrix``."""
    flipped: bool
    note: str = ""


# -- resampling ----------------------------------------------------------------------------
def warp_to(
    image: np.ndarray,
    matrix: np.ndarray,
    src_scale: np.ndarray,
    dst_scale: np.ndarray,
    dst_shape: tuple[int, int],
    *,
    order: int = 1,
    dst_offset: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a (moving) working-resolution image into a (fixed) working grid.

    ``matrix`` maps moving full-resolution ``(x, y)`` to fixed full-resolution ``(x, y)``;
    ``dst_offset`` is the full-resolution ``(x, y)`` of the destination grid's pixel
    ``(0, 0)`` (default: the origin). Works on 2D arrays and on ``(h, w, c)`` stacks.
    """
    from scipy import ndimage as ndi

    to_dst = np.diag([dst_scale[0], dst_scale[1], 1.0])
    if dst_offset is not None:
        shift = np.eye(3)
        shift[:2, 2] = -np.asarray(dst_offset, dtype=float)
        to_dst = to_dst @ shift
    to_src = np.diag([src_scale[0], src_scale[1], 1.0])
    # destination pixel (x, y) -> source pixel (x, y), then in (row, col) order for scipy
    back = to_src @ np.linalg.inv(matrix) @ np.linalg.inv(to_dst)
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    back_rc = swap @ back @ swap
    kwargs = {"matrix": back_rc[:2, :2], "offset": back_rc[:2, 2], "order": order, "cval": 0.0}
    if image.ndim == 2:
        out = ndi.affine_transform(image.astype(np.float32), output_shape=dst_shape, **kwargs)
    else:
        out = np.stack(
            [
                ndi.affine_transform(
                    image[..., c].astype(np.float32), output_shape=dst_shape, **kwargs
                )
                for c in range(image.shape[-1])
            ],
            axis=-1,
        )
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (0 when both are empty)."""
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 0.0


def mask_dice(moving: PreparedSection, fixed: PreparedSection, matrix: np.ndarray) -> float:
    """Dice of the fixed tissue mask and the moving one mapped by ``matrix``."""
    warped = warp_to(moving.mask, matrix, moving.scale, fixed.scale, fixed.mask.shape, order=0)
    return dice(warped > 0.5, fixed.mask)


# -- moments -------------------------------------------------------------------------------
def _mask_moments(section: PreparedSection) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and covariance of the tissue mask in full-resolution pixels."""
    rows, cols = np.nonzero(section.mask)
    xy = np.column_stack([cols / section.scale[0], rows / section.scale[1]])
    return xy.mean(axis=0), np.cov(xy, rowvar=False)


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _about_centroids(linear: np.ndarray, mu_moving: np.ndarray, mu_fixed: np.ndarray) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = mu_fixed - linear @ mu_moving
    return matrix


def _coarse(section: PreparedSection, max_side: int = 256) -> PreparedSection:
    """A copy with the mask at most ``max_side`` pixels long, for cheap Dice scoring."""
    from skimage.transform import resize

    factor = min(1.0, max_side / max(section.mask.shape))
    if factor == 1.0:
        return section
    shape = tuple(max(1, round(n * factor)) for n in section.mask.shape)
    mask = resize(section.mask.astype(np.float32), shape, order=1, anti_aliasing=True) > 0.5
    scale = section.scale * np.array(
        [shape[1] / section.mask.shape[1], shape[0] / section.mask.shape[0]]
    )
    return PreparedSection(section.name, section.channel, mask, scale)


def moment_init(
    moving: PreparedSection,
    fixed: PreparedSection,
    *,
    allow_flip: bool = True,
    n_angles: int = 72,
    coarse_side: int = 256,
) -> InitResult:
    """Align tissue-mask centroids and principal axes; pick the best orientation by Dice.

    Candidates are the four sign combinations of the principal axes (two rotations and two
    mirror images) and, because principal axes are ill-defined for roundish tissue, a sweep
    of ``n_angles`` rotations (and their mirror images) about the centroids. The candidate
    with the highest tissue-mask Dice wins, scored on masks at most ``coarse_side`` pixels
    long.
    """
    mu_m, cov_m = _mask_moments(moving)
    mu_f, cov_f = _mask_moments(fixed)
    _, vec_m = np.linalg.eigh(cov_m)
    _, vec_f = np.linalg.eigh(cov_f)
    candidates = []
    for sx in (1.0, -1.0):
        for sy in (1.0, -1.0):
            linear = vec_f @ np.diag([sx, sy]) @ vec_m.T
            candidates.append(linear)
    for theta in np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False):
        candidates.append(_rotation(theta))
        candidates.append(_rotation(theta) @ _MIRROR[:2, :2])
    if not allow_flip:
        candidates = [c for c in candidates if np.linalg.det(c) > 0]
    small_m, small_f = _coarse(moving, coarse_side), _coarse(fixed, coarse_side)
    scored = []
    for linear in candidates:
        matrix = _about_centroids(linear, mu_m, mu_f)
        scored.append((mask_dice(small_m, small_f, matrix), matrix))
    _, best = max(scored, key=lambda item: item[0])
    return InitResult(
        matrix=best,
        path="moments",
        n_matches=0,
        n_inliers=0,
        dice=mask_dice(moving, fixed, best),
        flipped=bool(np.linalg.det(best[:2, :2]) < 0),
    )


# -- keypoints -----------------------------------------------------------------------------
def _keypoints(image: np.ndarray, n_features: int) -> tuple[np.ndarray, object]:
    """SIFT keypoint centres ``(x, y)`` in ``image`` pixels and their descriptors (kornia)."""
    import kornia.feature as KF
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    sift = KF.SIFTFeature(num_features=n_features, upright=False)
    with torch.inference_mode():
        lafs, _, descriptors = sift(tensor)
    return KF.get_laf_center(lafs)[0].numpy().astype(float), descriptors[0]


def _section_keypoints(
    section: PreparedSection, n_features: int, mirrored: bool
) -> tuple[np.ndarray, object]:
    key = (n_features, mirrored)
    if key not in section._keypoints:
        image = section.channel[:, ::-1] if mirrored else section.channel
        section._keypoints[key] = _keypoints(image, n_features)
    return section._keypoints[key]


def keypoint_init(
    moving: PreparedSection,
    fixed: PreparedSection,
    *,
    n_features: int = 1000,
    ratio: float = 0.9,
    residual: float = 3.0,
    allow_flip: bool = True,
    seed: int = 0,
) -> InitResult | None:
    """Rigid transform from SIFT matches (kornia) and RANSAC; ``None`` when nothing matches.

    SIFT is rotation invariant but not mirror invariant, so a flipped section is matched
    from its mirror image as well and the variant with more inliers wins. ``residual`` is
    the RANSAC inlier threshold in working pixels.
    """
    import kornia.feature as KF
    from skimage.measure import ransac
    from skimage.transform import EuclideanTransform

    xy_f, desc_f = _section_keypoints(fixed, n_features, mirrored=False)
    best: InitResult | None = None
    for mirrored in (False, True) if allow_flip else (False,):
        xy_m, desc_m = _section_keypoints(moving, n_features, mirrored=mirrored)
        if len(xy_m) < 3 or len(xy_f) < 3:
            continue
        _, idx = KF.match_snn(desc_m, desc_f, ratio)
        idx = idx.numpy()
        if len(idx) < 3:
            continue
        # with mirrored=True, src are pixels of the mirror image; undone after the fit
        src, dst = xy_m[idx[:, 0]], xy_f[idx[:, 1]]
        # kornia's RANSAC estimates homographies, affine maps and fundamental matrices only;
        # a section-to-section map is rigid (2 points determine it), which skimage's
        # RANSAC with EuclideanTransform fits directly and with the right number of samples.
        model, inliers = ransac(
            (src, dst),
            EuclideanTransform,
            min_samples=2,
            residual_threshold=residual,
            max_trials=1000,
            stop_probability=0.999,
            rng=seed,
        )
        if model is None or inliers is None:
            continue
        working = np.asarray(model.params, dtype=float)
        if mirrored:
            unmirror = np.array(
                [[-1.0, 0.0, moving.channel.shape[1] - 1], [0.0, 1.0, 0.0], [0, 0, 1]]
            )
            working = working @ unmirror
        matrix = np.linalg.inv(fixed.to_working) @ working @ moving.to_working
        result = InitResult(
            matrix=matrix,
            path="keypoints",
            n_matches=len(idx),
            n_inliers=int(inliers.sum()),
            dice=float("nan"),
            flipped=mirrored,
        )
        if best is None or result.n_inliers > best.n_inliers:
            best = result
    if best is not None:
        best.dice = mask_dice(moving, fixed, best.matrix)
    return best
