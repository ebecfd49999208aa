"""synthetic_stack: determinism, geometry, ground truth and a plausible H&E look."""

from __future__ import annotations

import numpy as np
import pytest

from asign_sc._stack import resolve_stack
from asign_sc.datasets import synthetic_stack


def test_same_seed_same_stack_other_seed_other_stack():
    kwargs = {"n_sections": 2, "n_spots_per_section": 40, "image_size": 160, "n_genes": 8}
    a, ta = synthetic_stack(seed=5, **kwargs)
    b, tb = synthetic_stack(seed=5, **kwargs)
    c, _ = synthetic_stack(seed=6, **kwargs)
    assert (a.tables["table"].X != b.tables["table"].X).nnz == 0
    np.testing.assert_array_equal(resolve_stack(a).image("S1")[0], resolve_stack(b).image("S1")[0])
    np.testing.assert_array_equal(ta.transforms["S2"], tb.transforms["S2"])
    assert (
        a.tables["table"].n_obs != c.tables["table"].n_obs
        or (a.tables["table"].X != c.tables["table"].X).nnz > 0
    )


def test_transforms_map_spots_into_one_tissue_frame(synthetic_small):
    sdata, truth = synthetic_small
    stack = resolve_stack(sdata, require_images=True, min_sections=3)
    for section in stack:
        matrix = truth.transforms[section.name]
        mapped = section.spatial @ matrix[:2, :2].T + matrix[:2, 2]
        np.testing.assert_allclose(mapped, truth.tissue_xy[section.rows], atol=1e-9)
        # rigid: rotation (+ mirror), no scaling
        np.testing.assert_allclose(np.abs(np.linalg.det(matrix[:2, :2])), 1.0)


def test_transforms_recoverable_from_spots_and_images(synthetic_small):
    """Recoverable in principle: a section and its neighbour overlap once mapped by the truth."""
    from scipy.spatial import cKDTree

    sdata, truth = synthetic_small
    stack = resolve_stack(sdata)
    a, b = stack["S1"], stack["S2"]

    def to_frame(s):
        return s.spatial @ truth.transforms[s.name][:2, :2].T + truth.transforms[s.name][:2, 2]

    dist, _ = cKDTree(to_frame(a)).query(to_frame(b))
    pitch = 4 * a.spot_radius
    assert np.median(dist) < pitch  # the spot clouds coincide in the tissue frame
    # while on the slides they do not (random pose)
    dist_raw, _ = cKDTree(a.spatial).query(b.spatial)
    assert np.median(dist_raw) > 0 or not np.allclose(
        truth.transforms["S1"], truth.transforms["S2"]
    )


def test_tissue_types_look_and_express_differently(synthetic_small):
    sdata, truth = synthetic_small
    stack = resolve_stack(sdata)
    table = sdata.tables["table"]
    colours = {}
    for section in stack:
        image, _ = stack.image(section.name)
        xy = np.round(section.spatial).astype(int)
        for t, (x, y) in zip(truth.tissue_type.iloc[section.rows], xy, strict=True):
            colours.setdefault(t, []).append(
                image[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(0)
            )
    means = {t: np.mean(v, axis=0) for t, v in colours.items() if len(v) > 5}
    assert len(means) >= 3
    spread = max(np.abs(means[a] - means[b]).max() for a in means for b in means)
    assert spread > 15  # grey levels: types are visibly different
    # marker genes are higher in their own type
    for t in means:
        markers = table.var_names[table.var["program"] == t]
        if len(markers) == 0:
            continue
        expr = truth.expression[markers]
        inside = (truth.tissue_type == t).to_numpy()
        assert expr[inside].mean().mean() > 2 * expr[~inside].mean().mean()


def test_background_is_bright_and_tissue_darker(synthetic_small):
    sdata, _ = synthetic_small
    image, _ = resolve_stack(sdata).image("S1")
    corners = np.concatenate([image[:8, :8].reshape(-1, 3), image[-8:, -8:].reshape(-1, 3)])
    assert corners.mean() > 225
    assert image.reshape(-1, 3).mean(0).min() < corners.mean(0).min() - 10


def test_counts_are_overdispersed_integers(synthetic_small):
    sdata, truth = synthetic_small
    counts = sdata.tables["table"].X.toarray()
    assert np.allclose(counts, np.round(counts)) and counts.min() >= 0
    mean = truth.expression.to_numpy()
    high = mean > 5
    assert (counts[high] - mean[high]).var() > mean[high].mean()  # NB, not Poisson


def test_flip_marks_mirrored_sections():
    _, truth = synthetic_stack(
        n_sections=4, n_spots_per_section=20, image_size=128, n_genes=5, flip=True
    )
    assert truth.flipped == {"S1": False, "S2": True, "S3": False, "S4": True}
    for name, mirrored in truth.flipped.items():
        assert (np.linalg.det(truth.transforms[name][:2, :2]) < 0) == mirrored


@pytest.mark.parametrize(
    "kwargs", [{"n_sections": 0}, {"n_tissue_types": 9}, {"image_size": 10}, {"flip": "x"}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_stack(**kwargs)


def _fingerprint(sdata, truth) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    table = sdata.tables["table"]
    for name in sorted(sdata.images):
        digest.update(np.ascontiguousarray(sdata.images[name].values).tobytes())
    digest.update(np.ascontiguousarray(table.X.toarray()).tobytes())
    digest.update(np.ascontiguousarray(table.obsm["spatial"]).tobytes())
    digest.update("".join(table.obs_names).encode())
    digest.update(np.ascontiguousarray(truth.expression.to_numpy()).tobytes())
    digest.update(truth.tissue_type.cat.codes.to_numpy().tobytes())
    for matrix in truth.transforms.values():
        digest.update(matrix.tobytes())
    return digest.hexdigest()


def test_default_demo_stack_is_unchanged():
    """The demo stack (default arguments) is byte for byte what it was before the simulation
    was made faster (images, counts, spots, truth): results and figures made from it stay."""
    assert _fingerprint(*synthetic_stack()) == "dbc3d94fa204ab5c9051b30591d7fa9a"


@pytest.mark.parametrize(("size", "n_types"), [(203, 6), (256, 1), (330, 3)])
def test_tissue_maps_equal_interpolating_every_pixel(size, n_types):
    """Cells whose corners agree skip the interpolation: the maps are still exactly those of
    interpolating the coarse fields at every pixel."""
    from scipy import ndimage

    from asign_sc.datasets._synthetic import (
        _apply,
        _slide_to_tissue,
        _tissue_maps,
        _Volume,
        _with_z,
    )

    rng = np.random.default_rng(size)
    volume = _Volume(rng, 0.32 * size, n_types, 5)
    to_tissue = _slide_to_tissue(0.7, np.array([size / 2, size / 2 + 9]), mirror=True)
    inside, types = _tissue_maps(volume, to_tissue, 11.0, size)

    step = 4
    coarse = np.arange(0, size + step, step, dtype=float) + 0.5
    xs, ys = np.meshgrid(coarse, coarse)
    xyz = _with_z(_apply(to_tissue, np.c_[xs.ravel(), ys.ravel()]), 11.0)
    fine = np.arange(size, dtype=float) / step
    rows, cols = np.meshgrid(fine, fine, indexing="ij")
    fields = [volume._field(w, xyz).reshape(xs.shape) for w in volume.type_waves]
    expected_types = np.argmax(
        np.stack([ndimage.map_coordinates(f, [rows, cols], order=1) for f in fields]), axis=0
    )
    margin = volume.margin(xyz).reshape(xs.shape)
    expected_inside = ndimage.map_coordinates(margin, [rows, cols], order=1) >= 0
    np.testing.assert_array_equal(types, expected_types)
    np.testing.assert_array_equal(inside, expected_inside)
    assert 0 < inside.mean() < 1 and (n_types == 1 or len(np.unique(types[inside])) > 1)


def test_programs_seed_makes_tumours_of_one_disease():
    kwargs = {"n_sections": 1, "n_spots_per_section": 40, "image_size": 160, "n_genes": 8}
    profiles = []
    for seed, programs_seed in ((1, 9), (2, 9), (3, None)):
        _, truth = synthetic_stack(seed=seed, programs_seed=programs_seed, **kwargs)
        # the type programs without the gradient genes: mean log expression of each type
        log_mean = np.log(truth.expression).groupby(truth.tissue_type.to_numpy()).mean()
        profiles.append(log_mean)
    shared = profiles[0].index.intersection(profiles[1].index)
    # tumours 1 and 2 share the programs (up to the gradients); tumour 3 has its own
    close = np.corrcoef(
        profiles[0].loc[shared].to_numpy().ravel(), profiles[1].loc[shared].to_numpy().ravel()
    )[0, 1]
    other = profiles[2].index.intersection(profiles[0].index)
    far = np.corrcoef(
        profiles[0].loc[other].to_numpy().ravel(), profiles[2].loc[other].to_numpy().ravel()
    )[0, 1]
    assert close > 0.9 > far
