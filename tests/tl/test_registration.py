"""tl.register_sections: known rigid transforms recovered, storage, QC, failure modes, her2st."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from asign_sc import InvalidStackError
from asign_sc._stack import resolve_stack
from asign_sc.io._build import SectionInput, build_spatialdata
from asign_sc.tl import register_sections
from asign_sc.tl._registration_init import warp_to

#: Full-resolution pixels per image pixel of the test images (images are "hires" copies).
FULL = 4.0


def _rigid(degrees: float, tx: float = 0.0, ty: float = 0.0, *, flip: bool = False) -> np.ndarray:
    t = np.radians(degrees)
    m = np.array([[np.cos(t), -np.sin(t), tx], [np.sin(t), np.cos(t), ty], [0.0, 0.0, 1.0]])
    return m @ np.diag([-1.0, 1.0, 1.0]) if flip else m


def _about(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    shift = np.eye(3)
    shift[:2, 2] = centre
    return shift @ matrix @ np.linalg.inv(shift)


def tissue_image(size: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image of an asymmetric lobed tissue on white glass, and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    theta, r = np.arctan2(yy, xx), np.hypot(xx, yy)
    outline = 0.3 * (
        1 + 0.18 * np.cos(3 * theta + 1.0) + 0.12 * np.sin(2 * theta) + 0.06 * np.cos(theta)
    )
    inside = r < outline
    field = ndi.gaussian_filter(rng.normal(size=(size, size)), size / 25)
    field = (field - field.min()) / np.ptp(field)
    nuclei = ndi.gaussian_filter(
        (rng.random((size, size)) < 0.04 * (0.3 + field)).astype(float), 0.8
    )
    nuclei = np.clip(nuclei / nuclei.max() * 2.5, 0, 1)
    pink, purple = np.array([236.0, 160.0, 190.0]), np.array([120.0, 70.0, 150.0])
    tissue = pink * (1 - 0.6 * field[..., None]) + purple * 0.6 * field[..., None]
    tissue = tissue * (1 - nuclei[..., None]) + np.array([60.0, 30.0, 110.0]) * nuclei[..., None]
    rgb = np.where(inside[..., None], tissue, np.array([242.0, 240.0, 244.0]))
    rgb = rgb + rng.normal(0, 2.0, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), inside


def rigid_stack(placements: list[np.ndarray], *, size: int = 320, seed: int = 0):
    """Sections cut from ONE tissue, each placed on its slide by a known rigid map.

    ``placements[i]`` maps tissue-frame full-resolution pixels to section i's pixels
    (rotation about the image centre plus a shift). Returns the SpatialData and, per
    section, the true map from its full-resolution pixels to the tissue frame.
    """
    image, inside = tissue_image(size, seed)
    centre = np.array([size, size]) * FULL / 2
    rows, cols = np.nonzero(inside[:: size // 16, :: size // 16])
    grid = np.column_stack([cols, rows]) * (size // 16) * FULL + FULL * 2
    sections, truth = [], {}
    scale = np.array([1 / FULL, 1 / FULL])
    for i, placement in enumerate(placements):
        to_section = _about(placement, centre)
        name = f"R{i + 1}"
        truth[name] = np.linalg.inv(to_section)
        warped = warp_to(image.astype(np.float32), to_section, scale, scale, image.shape[:2])
        covered = warp_to(
            np.ones(image.shape[:2]), to_section, scale, scale, image.shape[:2], order=0
        )
        warped[covered < 0.5] = (242, 240, 244)
        spots = (np.c_[grid, np.ones(len(grid))] @ to_section.T)[:, :2]
        n = len(spots)
        sections.append(
            SectionInput(
                name=name,
                counts=np.random.default_rng(i).poisson(3.0, size=(n, 5)),
                genes=[f"g{j}" for j in range(5)],
                obs=pd.DataFrame(index=[f"{name}_{j}" for j in range(n)]),
                spatial=spots,
                spot_radius=2 * FULL,
                image=np.clip(warped, 0, 255).astype(np.uint8),
                image_scale=1 / FULL,
            )
        )
    return build_spatialdata(sections), truth


def spot_errors(sdata, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Max distance (full-resolution px) of obsm['spatial_aligned'] from the true positions."""
    table = sdata.tables["table"]
    record = table.uns["asign_registration"]
    ref = record["reference"]
    errors = {}
    for section in resolve_stack(sdata):
        xy = section.spatial
        expected = (
            np.c_[xy, np.ones(len(xy))] @ (np.linalg.inv(truth[ref]) @ truth[section.name]).T
        )[:, :2]
        got = table.obsm["spatial_aligned"][section.rows]
        errors[section.name] = float(np.linalg.norm(got - expected, axis=1).max())
    return errors


# -- known rigid transforms ------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered_rigid():
    # large rotations both ways, a shift, and a mirrored section; the middle one (R2) is the
    # reference and the others chain through it
    placements = [
        _rigid(140.0, 60.0, -40.0),
        _rigid(10.0, -30.0, 20.0),
        _rigid(-95.0, 40.0, 50.0, flip=True),
    ]
    sdata, truth = rigid_stack(placements)
    register_sections(sdata, max_side=320, show_progress_bar=False)
    return sdata, truth


def test_known_rigid_transforms_are_recovered(registered_rigid):
    sdata, truth = registered_rigid
    errors = spot_errors(sdata, truth)
    # full-resolution pixels (the images are 4x downsampled); measured: < 0.1 px
    assert max(errors.values()) < 2.0, errors
    qc = sdata.tables["table"].uns["asign_registration"]["qc"]
    assert qc.loc["R2", "path"] == "reference"
    assert qc.loc["R3", "flipped"] and not qc.loc["R1", "flipped"]
    assert qc.loc["R1", "rotation_deg"] == pytest.approx(-130.0, abs=1.0)  # 10 - 140
    for name in ("R1", "R3"):
        assert qc.loc[name, "dice_after"] > 0.97
        assert qc.loc[name, "dice_after"] > qc.loc[name, "dice_before"] + 0.1
        assert qc.loc[name, "ncc_after"] > qc.loc[name, "ncc_before"]
        assert qc.loc[name, "path"].endswith("+ ants")


def test_matrices_and_spatialdata_transformations_agree(registered_rigid):
    from spatialdata import transform

    sdata, _ = registered_rigid
    table = sdata.tables["table"]
    record = table.uns["asign_registration"]
    np.testing.assert_allclose(record["matrices"]["R2"], np.eye(3))
    # chaining: R1 -> R2 is the pair map, R3 -> R2 its own pair map
    np.testing.assert_allclose(record["matrices"]["R1"], record["pair_matrices"]["R1"])
    for section in resolve_stack(sdata):
        moved = transform(sdata.shapes[section.shapes_key], to_coordinate_system="aligned")
        xy = np.column_stack([moved.geometry.x, moved.geometry.y])
        ids = table.obs["spot_id"].to_numpy()[section.rows]
        np.testing.assert_allclose(xy[ids], table.obsm["spatial_aligned"][section.rows], atol=1e-6)


def test_moments_only_and_keypoint_paths_agree():
    placements = [_rigid(0.0), _rigid(-160.0, 30.0, 10.0, flip=True)]
    sdata, truth = rigid_stack(placements, seed=1)
    register_sections(sdata, init="moments", max_side=320, show_progress_bar=False, reference="R1")
    qc = sdata.tables["table"].uns["asign_registration"]["qc"]
    assert qc.loc["R2", "path"] == "moments + ants"
    assert qc.loc["R2", "flipped"]
    assert max(spot_errors(sdata, truth).values()) < 2.0


def test_keypoints_fall_back_to_moments_when_too_few_inliers():
    sdata, truth = rigid_stack([_rigid(0.0), _rigid(70.0, -20.0, 0.0)], seed=2)
    register_sections(sdata, min_inliers=100_000, max_side=320, show_progress_bar=False)
    qc = sdata.tables["table"].uns["asign_registration"]["qc"]
    moved = qc.index[qc["path"] != "reference"][0]
    assert qc.loc[moved, "path"] == "moments + ants"
    assert "min_inliers" in qc.loc[moved, "note"]
    assert max(spot_errors(sdata, truth).values()) < 2.0


def test_a_keypoint_map_that_overlays_the_tissue_skips_the_moment_sweep(monkeypatch):
    from asign_sc.tl import _registration

    calls = []
    sweep = _registration.moment_init
    monkeypatch.setattr(
        _registration,
        "moment_init",
        lambda *args, **kwargs: calls.append(1) or sweep(*args, **kwargs),
    )
    sdata, truth = rigid_stack([_rigid(0.0), _rigid(70.0, -20.0, 0.0)], seed=2)
    register_sections(sdata, max_side=320, show_progress_bar=False)
    qc = sdata.tables["table"].uns["asign_registration"]["qc"]
    moved = qc.index[qc["path"] != "reference"][0]
    # Dice >= 0.9: no moment map could beat it by the 0.1 slack, so none is computed
    assert qc.loc[moved, "path"] == "keypoints + ants"
    assert qc.loc[moved, "dice_init"] >= 0.9
    assert calls == []
    assert max(spot_errors(sdata, truth).values()) < 2.0


def test_no_flip_allowed_keeps_proper_rotations():
    sdata, truth = rigid_stack([_rigid(0.0), _rigid(-100.0, 0.0, 0.0, flip=True)], seed=1)
    register_sections(
        sdata, allow_flip=False, max_side=320, show_progress_bar=False, reference="R1"
    )
    record = sdata.tables["table"].uns["asign_registration"]
    assert np.linalg.det(record["matrices"]["R2"][:2, :2]) > 0
    assert not record["qc"]["flipped"].any()
    # a mirrored section cannot be brought onto its neighbour by a rotation
    assert spot_errors(sdata, truth)["R2"] > 50.0


def test_affine_and_syn_write_consistent_results():
    from spatialdata import transform

    sdata, truth = rigid_stack([_rigid(0.0), _rigid(35.0, 20.0, -10.0)], seed=4)
    register_sections(
        sdata, transform="affine", max_side=320, show_progress_bar=False, key_added="affine"
    )
    table = sdata.tables["table"]
    assert "spatial_affine" in table.obsm and "asign_registration_affine" in table.uns
    section = resolve_stack(sdata)["R1"]  # R2, the middle of two, is the reference
    moved = transform(sdata.shapes[section.shapes_key], to_coordinate_system="affine")
    np.testing.assert_allclose(
        np.column_stack([moved.geometry.x, moved.geometry.y]),
        table.obsm["spatial_affine"][section.rows],
        atol=1e-6,
    )
    register_sections(
        sdata, transform="syn", max_side=320, show_progress_bar=False, key_added="syn"
    )
    record = table.uns["asign_registration_syn"]
    assert record["params"]["transform"] == "syn"
    # the spots follow the warp, so they differ slightly from the affine part ...
    linear = (np.c_[section.spatial, np.ones(section.n_spots)] @ record["matrices"]["R1"].T)[:, :2]
    shift = np.linalg.norm(table.obsm["spatial_syn"][section.rows] - linear, axis=1)
    assert 0 < shift.max() < 40.0
    # ... and stay close to the truth (identical tissue: the warp has nothing to add)
    ref = record["reference"]
    expected = (
        np.c_[section.spatial, np.ones(section.n_spots)]
        @ (np.linalg.inv(truth[ref]) @ truth["R1"]).T
    )[:, :2]
    assert np.linalg.norm(table.obsm["spatial_syn"][section.rows] - expected, axis=1).mean() < 6.0


# -- synthetic_stack (sections that differ, as real adjacent sections do) --------------------
def test_synthetic_stack_with_flips_and_large_rotations(synthetic_small):
    sdata, truth = synthetic_small
    register_sections(sdata, max_side=256, show_progress_bar=False)
    qc = sdata.tables["table"].uns["asign_registration"]["qc"]
    ref = sdata.tables["table"].uns["asign_registration"]["reference"]
    for name in qc.index:
        expected_flip = truth.flipped[name] != truth.flipped[ref]
        assert qc.loc[name, "flipped"] == expected_flip
    moved = qc.index[qc["path"] != "reference"]
    assert (qc.loc[moved, "dice_after"] > 0.85).all()
    assert (qc.loc[moved, "dice_after"] > qc.loc[moved, "dice_before"]).all()


def test_each_sample_is_registered_onto_its_own_reference():
    placements = [_rigid(0.0), _rigid(50.0, 10.0, 0.0), _rigid(-30.0), _rigid(120.0, 0.0, 20.0)]
    sdata, truth = rigid_stack(placements, size=200, seed=7)
    table = sdata.tables["table"]
    table.obs["sample"] = np.where(table.obs["section"].isin(["R1", "R2"]), "A", "B")
    register_sections(sdata, sample_key="sample", max_side=200, show_progress_bar=False)
    record = table.uns["asign_registration"]
    assert dict(record["reference"]) == {"A": "R2", "B": "R4"}
    qc = record["qc"]
    assert qc.loc["R1", "target"] == "R2" and qc.loc["R3", "target"] == "R4"
    assert list(qc.loc[["R2", "R4"], "path"]) == ["reference", "reference"]
    stack = resolve_stack(sdata)
    for moving, ref in (("R1", "R2"), ("R3", "R4")):
        xy = np.c_[stack[moving].spatial, np.ones(stack[moving].n_spots)]
        expected = xy @ (np.linalg.inv(truth[ref]) @ truth[moving]).T
        got = table.obsm["spatial_aligned"][stack[moving].rows]
        assert np.linalg.norm(got - expected[:, :2], axis=1).max() < 2.0
    with pytest.raises(InvalidStackError, match="samples"):
        register_sections(sdata, sample_key="sample", reference="R2", show_progress_bar=False)


# -- storage, copy, user matrices ------------------------------------------------------------
def test_copy_leaves_input_untouched_and_uns_is_writable(tmp_path):
    sdata, _ = rigid_stack([_rigid(0.0), _rigid(20.0, 10.0, 0.0)], seed=5)
    out = register_sections(sdata, copy=True, max_side=320, show_progress_bar=False)
    assert "spatial_aligned" not in sdata.tables["table"].obsm
    table = out.tables["table"]
    assert table.obsm["spatial_aligned"].shape == (table.n_obs, 2)
    params = table.uns["asign_registration"]["params"]
    assert params["transform"] == "rigid" and params["sample_key"] == "None"
    table.write_h5ad(tmp_path / "registered.h5ad")
    import anndata

    back = anndata.read_h5ad(tmp_path / "registered.h5ad")
    qc = back.uns["asign_registration"]["qc"]
    assert list(qc.index) == ["R1", "R2"]
    np.testing.assert_allclose(
        back.uns["asign_registration"]["matrices"]["R2"],
        table.uns["asign_registration"]["matrices"]["R2"],
    )


def test_user_matrices_skip_registration_and_need_no_images():
    from anndata import AnnData

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(20, 2))
    adata = AnnData(
        X=rng.poisson(2.0, size=(20, 3)).astype(np.float32),
        obs=pd.DataFrame(
            {"section": pd.Categorical(["a"] * 10 + ["b"] * 10)},
            index=[f"spot{i}" for i in range(20)],
        ),
        obsm={"spatial": xy},
        uns={"spatial": {s: {"scalefactors": {"spot_diameter_fullres": 5.0}} for s in "ab"}},
    )
    shift = _rigid(90.0, 100.0, 0.0)
    register_sections(adata, matrices={"a": np.eye(3), "b": shift[:2]}, show_progress_bar=False)
    record = adata.uns["asign_registration"]
    np.testing.assert_allclose(record["matrices"]["b"], shift)
    np.testing.assert_allclose(
        adata.obsm["spatial_aligned"][10:], (np.c_[xy[10:], np.ones(10)] @ shift.T)[:, :2]
    )
    assert list(record["qc"]["path"]) == ["user", "user"]


# -- failure modes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sections():
    return rigid_stack([_rigid(0.0), _rigid(15.0)], size=160, seed=6)


def test_one_section_is_refused(two_sections):
    sdata, _ = two_sections
    with pytest.raises(InvalidStackError, match="at least 2"):
        register_sections(sdata, sections=["R1"], show_progress_bar=False)


def test_missing_image_is_refused(two_sections):
    from spatialdata import SpatialData

    sdata, _ = two_sections
    no_image = SpatialData(
        images={"R1_image": sdata.images["R1_image"]},
        shapes=dict(sdata.shapes),
        tables={"table": sdata.tables["table"].copy()},
    )
    with pytest.raises(InvalidStackError, match="R2"):
        register_sections(no_image, show_progress_bar=False)


def test_blank_image_is_refused(two_sections):
    sdata, _ = two_sections
    from anndata import AnnData

    table = sdata.tables["table"]
    image = resolve_stack(sdata).image("R1")[0]
    blank = np.full_like(image, 240)
    adata = AnnData(
        X=table.X.copy(),
        obs=table.obs[["section"]].copy(),
        obsm={"spatial": np.asarray(table.obsm["spatial"])},
        uns={
            "spatial": {
                s: {
                    "images": {"hires": img},
                    "scalefactors": {"spot_diameter_fullres": 8.0, "tissue_hires_scalef": 1 / FULL},
                }
                for s, img in (("R1", image), ("R2", blank))
            }
        },
    )
    with pytest.raises(InvalidStackError, match="No tissue found in the image of section 'R2'"):
        register_sections(adata, show_progress_bar=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"transform": "elastic"}, ValueError, "transform must be"),
        ({"init": "magic"}, ValueError, "init must be"),
        ({"channel": "eosin"}, ValueError, "channel must be"),
        ({"max_side": 10}, ValueError, "at least 64"),
        ({"reference": "R9"}, InvalidStackError, "Unknown section 'R9'"),
        ({"matrices": {"R1": np.eye(3)}}, ValueError, "lacks sections"),
        ({"matrices": {"R1": np.eye(3), "R2": np.zeros((3, 3))}}, ValueError, "3x3 affine"),
        ({"matrices": {"R1": np.eye(3), "R2": np.eye(3), "R7": np.eye(3)}}, ValueError, "not in"),
        ({"client": "tcp://127.0.0.1:8786"}, ValueError, "dask.distributed.Client"),
    ],
)
def test_bad_arguments_are_refused(two_sections, kwargs, error, match):
    sdata, _ = two_sections
    with pytest.raises(error, match=match):
        register_sections(sdata, show_progress_bar=False, **kwargs)


@pytest.mark.slow  # two worker processes start and import ANTs: ~20 s on 2 cores
def test_dask_client_gives_the_in_process_registration(registered_rigid):
    distributed = pytest.importorskip("distributed")
    sdata, _ = registered_rigid
    table = sdata.tables["table"]
    local = table.uns["asign_registration"]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = register_sections(sdata, max_side=320, client=client, copy=True)
        ran = client.run(lambda: 1)
    assert len(ran) == 2
    remote = out.tables["table"].uns["asign_registration"]
    assert "2 workers" in remote["params"]["client"]
    assert "workers" not in str(local["params"]["client"])
    # Equal up to numerical noise: the workers run torch (SIFT) and ANTs with other thread
    # counts than this process, which moves the optimum by hundredths of a pixel (measured:
    # < 0.1 full-resolution px; the spots are 16 px wide).
    for name, matrix in local["matrices"].items():
        np.testing.assert_allclose(remote["matrices"][name][:2, :2], matrix[:2, :2], atol=1e-3)
        np.testing.assert_allclose(remote["matrices"][name][:2, 2], matrix[:2, 2], atol=0.5)
    np.testing.assert_allclose(
        out.tables["table"].obsm["spatial_aligned"], table.obsm["spatial_aligned"], atol=0.5
    )
    pd.testing.assert_frame_equal(
        remote["qc"][["target", "path", "flipped", "order_suspect"]],
        local["qc"][["target", "path", "flipped", "order_suspect"]],
    )
    pd.testing.assert_frame_equal(
        remote["qc"][["dice_after", "ncc_after"]],
        local["qc"][["dice_after", "ncc_after"]],
        atol=0.01,
    )


# -- real data -------------------------------------------------------------------------------
def _light_copy(sdata, max_side: int = 1000):
    """Patient C with one coarse image level per section (registration reads no finer one).

    Leaves the session fixture untouched and avoids copying the full-resolution images.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale

    from asign_sc._stack import _image_levels

    stack = resolve_stack(sdata)
    images, shapes = {}, {}
    for section in stack:
        levels = _image_levels(sdata.images[section.image_key])
        level = [lv for lv in levels if max(lv.sizes["x"], lv.sizes["y"]) >= max_side][-1]
        factor = section.image_shape[1] / level.sizes["x"]
        images[section.image_key] = Image2DModel.parse(
            np.asarray(level.values),
            dims=("c", "y", "x"),
            transformations={section.name: Scale([factor, factor], axes=("x", "y"))},
        )
        circles = sdata.shapes[section.shapes_key]
        shapes[section.shapes_key] = ShapesModel.parse(
            np.column_stack([circles.geometry.x, circles.geometry.y]),
            geometry=0,
            radius=circles["radius"].to_numpy(),
            index=circles.index.copy(),
            transformations={section.name: Identity()},
        )
    return SpatialData(images=images, shapes=shapes, tables={"table": sdata.tables["table"].copy()})


@pytest.mark.her2st
@pytest.mark.slow
def test_her2st_patient_c_sections_land_on_each_other(her2st_c):
    sdata = _light_copy(her2st_c)
    register_sections(sdata, show_progress_bar=False)
    record = sdata.tables["table"].uns["asign_registration"]
    qc = record["qc"]
    assert record["reference"] == "C4"
    # max_side="auto": ST spots 145 px across on ~9,900 px images need 274 px, raised to 500
    assert record["params"]["max_side"] == 500
    assert list(qc.index) == ["C2", "C3", "C4", "C5", "C6"]
    moved = qc.index != "C4"
    # measured: pairs 0.18-0.81 before, 0.985-0.989 after; with C4 0.35-0.81 -> 0.977-0.989
    assert (qc.loc[moved, "dice_after"] >= 0.90).all(), qc
    assert (qc.loc[moved, "dice_reference_after"] >= 0.90).all(), qc
    assert (qc.loc[moved, "dice_after"] > qc.loc[moved, "dice_before"]).all()
    assert (qc.loc[moved, "ncc_after"] > qc.loc[moved, "ncc_before"]).all()
    assert not qc["flipped"].any()
    # adjacent sections of one block: small rotations, no scaling
    assert (qc["rotation_deg"].abs() < 20).all()
    # same spot pitch in the aligned frame (rigid: distances preserved)
    aligned = sdata.tables["table"].obsm["spatial_aligned"]
    assert np.isfinite(aligned).all()


@pytest.mark.her2st
@pytest.mark.slow
def test_her2st_auto_working_size_places_spots_as_the_finer_one_does(her2st_c):
    sdata = _light_copy(her2st_c)
    auto = register_sections(sdata, show_progress_bar=False, copy=True)
    fine = register_sections(sdata, show_progress_bar=False, copy=True, max_side=1000)
    shift = np.linalg.norm(
        auto.tables["table"].obsm["spatial_aligned"] - fine.tables["table"].obsm["spatial_aligned"],
        axis=1,
    )
    radius = resolve_stack(sdata)["C4"].spot_radius  # 72.7 full-resolution pixels
    # measured: median 7.9 px, max 36 px; max_side=1000 twice (ANTs' own spread): 3.8, 16
    assert np.median(shift) < 0.2 * radius
    assert shift.max() < 0.75 * radius


def _section(image_side: int, spot_radius: float, image_scale: float = 1.0):
    from asign_sc._stack import Section

    return Section(
        name="S",
        rows=np.arange(3),
        spatial=np.zeros((3, 2)),
        spot_radius=spot_radius,
        image_key="img",
        image_scale=image_scale,
        image_shape=(image_side // 2, image_side),
    )


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        # her2st ST: 145 px spots on 9,900 px images need 274 px; the floor is 500
        ([_section(9900, 72.7)], 500),
        # 12 px spots on a 3,072 px image: 4 px per spot diameter
        ([_section(3072, 6.0)], 1024),
        # the same in a downsampled image (0.25 image pixels per frame pixel)
        ([_section(3072, 24.0, image_scale=0.25)], 1024),
        # the most demanding section decides
        ([_section(3072, 12.0), _section(3072, 6.0)], 1024),
        # tiny spots: the ceiling
        ([_section(20000, 8.0)], 2000),
        # unknown radius (plain AnnData without spot_radius=)
        ([_section(9900, float("nan"))], 1000),
        # never longer than the image
        ([_section(300, 10.0)], 300),
    ],
)
def test_auto_max_side_follows_the_spot_size(sections, expected):
    from asign_sc.tl._registration import _auto_max_side

    assert _auto_max_side(sections) == expected


def test_max_side_must_be_auto_or_pixels(two_sections):
    sdata, _ = two_sections
    with pytest.raises(ValueError, match="'auto' or a number of pixels"):
        register_sections(sdata, max_side="fine", show_progress_bar=False)


# -- stacking order ----------------------------------------------------------------------------
def test_identical_sections_raise_no_order_warning(registered_rigid):
    qc = registered_rigid[0].tables["table"].uns["asign_registration"]["qc"]
    for column in ("order_neighbour_similarity", "order_best_match", "order_best_similarity"):
        assert column in qc
    assert not qc["order_suspect"].any()
    assert "suggested_order" not in registered_rigid[0].tables["table"].uns["asign_registration"]


def test_sections_in_the_wrong_order_are_flagged_with_the_likely_order(caplog):
    from asign_sc.datasets import synthetic_stack

    # one volume cut into 4 sections: neighbours resemble each other most
    sdata, _ = synthetic_stack(n_sections=4, n_spots_per_section=40, image_size=320, seed=1)
    options = {"max_side": 320, "allow_flip": False, "show_progress_bar": False}
    with caplog.at_level("WARNING", logger="asign_sc.tl._registration"):
        register_sections(sdata, **options)
    entry = sdata.tables["table"].uns["asign_registration"]
    assert not entry["qc"]["order_suspect"].any() and "suggested_order" not in entry
    assert "stacking order" not in caplog.text

    with caplog.at_level("WARNING", logger="asign_sc.tl._registration"):
        register_sections(sdata, sections=["S1", "S3", "S2", "S4"], **options)
    entry = sdata.tables["table"].uns["asign_registration"]
    assert entry["qc"].loc[["S3", "S2"], "order_suspect"].all()
    assert entry["qc"].loc["S1", "order_best_match"] == "S2"
    assert list(entry["suggested_order"]) == ["S1", "S2", "S3", "S4"]
    assert "may be out of stacking order" in caplog.text
    assert "in the order ['S1', 'S2', 'S3', 'S4']" in caplog.text


def test_progress_keyword_is_deprecated_not_dropped(registered_rigid):
    matrices = {s: np.eye(3) for s in ("R1", "R2", "R3")}
    with pytest.warns(FutureWarning, match="show_progress_bar"):
        out = register_sections(registered_rigid[0], matrices=matrices, progress=False, copy=True)
    assert out.tables["table"].uns["asign_registration"]["params"]["transform"] == "user"


# -- repeatability ----------------------------------------------------------------------------
def test_ants_seed_is_set_for_the_call_and_restored():
    import ants

    from asign_sc.tl._registration_ants import ants_seed

    before = ants.config._random_seed
    with ants_seed(0) as extra:
        assert extra == {}
        assert ants.config._random_seed == 1  # ANTs reads 0 as "seed from the clock"
    assert ants.config._random_seed == before


def test_registration_repeats_to_the_bit_with_one_itk_thread():
    """Same seed, same result: ANTs' metric sampling is seeded (antspyx ignores random_seed=)."""
    script = (
        "import numpy as np\n"
        "from asign_sc.datasets import synthetic_stack\n"
        "from asign_sc.tl import register_sections\n"
        "runs = []\n"
        "for _ in range(2):\n"
        "    sdata, _ = synthetic_stack(n_sections=3, n_spots_per_section=40, image_size=256)\n"
        "    register_sections(sdata, show_progress_bar=False, seed=3)\n"
        "    runs.append(np.asarray(sdata.tables['table'].obsm['spatial_aligned']))\n"
        "print(float(np.abs(runs[0] - runs[1]).max()))\n"
    )
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0
