"""The section-stack data contract: resolution, image access and every validation error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from asign_sc import InvalidStackError, Key
from asign_sc._stack import get_table, resolve_stack, validate_counts
from asign_sc._utils import copy_data


def _legacy(n_sections: int = 3, n_spots: int = 10, image: bool = True) -> AnnData:
    rng = np.random.default_rng(0)
    sections = [f"s{i}" for i in range(n_sections)]
    obs = pd.DataFrame(
        {"section": pd.Categorical(np.repeat(sections, n_spots), categories=sections[::-1])},
        index=[f"spot{i}" for i in range(n_sections * n_spots)],
    )
    adata = AnnData(X=sp.csr_matrix(rng.poisson(2, (len(obs), 5)).astype(np.float32)), obs=obs)
    adata.obsm["spatial"] = rng.uniform(100, 900, size=(len(obs), 2))
    adata.uns["spatial"] = {
        s: {
            "scalefactors": {"spot_diameter_fullres": 40.0, "tissue_hires_scalef": 0.5},
            **({"images": {"hires": np.full((500, 500, 3), 200, np.uint8)}} if image else {}),
        }
        for s in sections
    }
    return adata


def test_legacy_anndata_resolves_in_category_order():
    adata = _legacy()
    stack = resolve_stack(adata)
    assert stack.names == ["s2", "s1", "s0"]
    section = stack["s1"]
    assert section.n_spots == 10
    assert section.spot_radius == 20.0
    assert section.image_scale == 0.5
    assert section.image_shape == (500, 500)
    np.testing.assert_array_equal(adata.obsm["spatial"][section.rows], section.spatial)
    image, scale = stack.image("s1")
    assert image.shape == (500, 500, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(scale, [0.5, 0.5])


def test_sections_argument_selects_and_orders():
    stack = resolve_stack(_legacy(), sections=["s0", "s2"])
    assert stack.names == ["s0", "s2"]


def test_spatialdata_resolves_spots_and_images(synthetic_small):
    sdata, _ = synthetic_small
    stack = resolve_stack(sdata, require_images=True, min_sections=2)
    assert stack.names == ["S1", "S2", "S3"]
    table = sdata.tables["table"]
    for section in stack:
        np.testing.assert_allclose(section.spatial, table.obsm["spatial"][section.rows])
        assert section.image_shape == (256, 256)
        assert section.shapes_key == Key.sdata.spots(section.name)
        image, scale = stack.image(section.name)
        assert image.shape == (256, 256, 3)
        np.testing.assert_allclose(scale, 1.0)


def test_coarse_level_is_read_for_max_side(her2st_c):
    stack = resolve_stack(her2st_c)
    image, scale = stack.image("C3", max_side=1000)
    assert 1000 <= max(image.shape[:2]) < 2000
    h0, w0 = stack["C3"].image_shape
    np.testing.assert_allclose(scale, [image.shape[1] / w0, image.shape[0] / h0])


def test_set_transformation_writes_affine_to_image_and_spots(synthetic_small):
    from spatialdata.transformations import get_transformation

    sdata, _ = synthetic_small
    stack = resolve_stack(sdata)
    matrix = np.array([[0.0, -1.0, 300.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    stack.set_transformation("S2", matrix)
    for element in (sdata.images["S2_image"], sdata.shapes["S2_spots"]):
        got = get_transformation(element, to_coordinate_system="aligned")
        np.testing.assert_allclose(got.to_affine_matrix(("x", "y"), ("x", "y")), matrix)
    # other coordinate systems stay
    assert "S2" in get_transformation(sdata.shapes["S2_spots"], get_all=True)


# -- validation ------------------------------------------------------------------------
def test_unknown_section_is_named():
    with pytest.raises(InvalidStackError, match=r"Unknown section\(s\) \['nope'\].*s0"):
        resolve_stack(_legacy(), sections=["s0", "nope"])
    stack = resolve_stack(_legacy())
    with pytest.raises(InvalidStackError, match="Unknown section 'x'"):
        stack["x"]


def test_duplicated_section_names_in_selection():
    with pytest.raises(InvalidStackError, match=r"given twice.*\['s1'\]"):
        resolve_stack(_legacy(), sections=["s1", "s1"])


def test_missing_library_key():
    with pytest.raises(InvalidStackError, match=r"obs\['batch'\] is missing.*library_key="):
        resolve_stack(_legacy(), library_key="batch")


def test_too_few_sections():
    with pytest.raises(InvalidStackError, match="at least 2 sections but the stack has 1"):
        resolve_stack(_legacy(n_sections=1), min_sections=2)


def test_section_without_image_when_required():
    adata = _legacy(image=False)
    assert not resolve_stack(adata)["s0"].has_image
    with pytest.raises(InvalidStackError, match="has no image, but this step reads images"):
        resolve_stack(adata, require_images=True)
    with pytest.raises(InvalidStackError, match="has no image"):
        resolve_stack(adata).image("s0")


def test_spots_outside_the_image():
    adata = _legacy()
    adata.obsm["spatial"][3] = [5000.0, 10.0]  # 2500 px in a 500 px hires image
    with pytest.raises(InvalidStackError, match=r"1 spot\(s\) of section 's0' lie outside"):
        resolve_stack(adata)


def test_duplicated_spot_ids():
    adata = _legacy()
    adata.obs_names = ["same"] * adata.n_obs
    with pytest.raises(InvalidStackError, match="not unique"):
        resolve_stack(adata)


def test_duplicated_instance_ids(synthetic_small):
    sdata, _ = synthetic_small
    table = sdata.tables["table"]
    first = table.obs.index[table.obs["section"] == "S1"][:2]
    table.obs.loc[first, "spot_id"] = 0
    with pytest.raises(InvalidStackError, match="duplicated spot ids"):
        resolve_stack(sdata)


def test_mismatched_table_and_shapes_regions(synthetic_small):
    sdata, _ = synthetic_small
    table = sdata.tables["table"]
    region = table.obs["region"].astype(str)
    region[table.obs["section"] == "S2"] = "S9_spots"
    table.obs["region"] = pd.Categorical(region)
    with pytest.raises(InvalidStackError, match="'S9_spots', which is not a shapes element"):
        resolve_stack(sdata)


def test_instance_ids_absent_from_shapes(synthetic_small):
    sdata, _ = synthetic_small
    table = sdata.tables["table"]
    idx = table.obs.index[table.obs["section"] == "S3"][0]
    table.obs.loc[idx, "spot_id"] = 10_000
    with pytest.raises(
        InvalidStackError, match="instance ids that shapes element 'S3_spots' lacks"
    ):
        resolve_stack(sdata)


def test_spots_without_section():
    adata = _legacy()
    adata.obs["section"] = adata.obs["section"].cat.add_categories("x")
    adata.obs.iloc[0, 0] = np.nan
    with pytest.raises(InvalidStackError, match="1 spots have no section"):
        resolve_stack(adata)


def test_not_anndata():
    with pytest.raises(TypeError, match="Expected an AnnData or a SpatialData"):
        get_table(np.zeros((3, 3)))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.array([["a", "b"], ["c", "d"]], dtype=object), "not numbers"),
        (np.array([[1.0, -2.0], [0.0, 1.0]]), "negative values"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite"),
    ],
)
def test_counts_validation(values, match):
    adata = AnnData(X=values)
    with pytest.raises(InvalidStackError, match=match):
        validate_counts(adata)


def test_counts_validation_only_checks_measured_rows():
    adata = AnnData(X=np.array([[1.0, 2.0], [np.nan, np.nan]]))
    validate_counts(adata, rows=np.array([0]))
    with pytest.raises(InvalidStackError, match=r"layers\['raw'\] is missing"):
        validate_counts(adata, layer="raw")


def test_resolving_never_modifies_the_input(synthetic_small):
    sdata, _ = synthetic_small
    table = sdata.tables["table"]
    before = (table.obs.copy(), table.X.copy(), dict(table.obsm), set(table.uns))
    stack = resolve_stack(sdata, min_sections=2)
    stack.image("S1")
    assert table.obs.equals(before[0])
    assert (table.X != before[1]).nnz == 0
    assert set(table.obsm) == set(before[2]) and set(table.uns) == before[3]


def test_copy_data_is_deep(synthetic_small):
    sdata, _ = synthetic_small
    copied = copy_data(sdata)
    copied.tables["table"].obsm["spatial"][:] = 0
    assert np.abs(sdata.tables["table"].obsm["spatial"]).sum() > 0


def test_log_normalised_counts_name_the_layer_to_pass():
    counts = np.array([[1.0, 3.0], [0.0, 2.0]], dtype=np.float32)
    adata = AnnData(X=np.log1p(counts), layers={"counts": counts})
    with pytest.raises(InvalidStackError, match=r"non-integer.*counts_layer='counts'"):
        validate_counts(adata)
    validate_counts(adata, "counts")
    # the other way round: raw counts in X, a normalised layer named as counts_layer
    adata = AnnData(X=counts, layers={"lognorm": np.log1p(counts)})
    with pytest.raises(InvalidStackError, match=r"layers\['lognorm'\].*counts_layer=None"):
        validate_counts(adata, counts_layer="lognorm")


def test_counts_validation_on_sparse_matrices_checks_stored_values():
    adata = AnnData(X=sp.csr_matrix(np.array([[0.0, 2.5], [0.0, 1.0]], dtype=np.float32)))
    with pytest.raises(InvalidStackError, match=r"X holds non-integer values .*2\.5"):
        validate_counts(adata)
    validate_counts(adata, rows=np.array([1]))


def test_all_zero_known_section_is_an_error():
    adata = AnnData(X=np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    sections = {"a": np.array([0]), "b": np.array([1, 2])}
    with pytest.raises(InvalidStackError, match=r"all zero in section\(s\) \['b'\] of the known"):
        validate_counts(adata, rows=sections, what="known sections")
    validate_counts(adata, rows={"a": np.array([0])})
    validate_counts(adata, rows=np.array([1, 2]))  # plain rows: no per-section check


def test_counts_validation_keeps_the_former_layer_keyword():
    adata = AnnData(X=np.zeros((2, 2)), layers={"raw": np.ones((2, 2))})
    validate_counts(adata, layer="raw")
    with pytest.raises(TypeError, match="counts_layer= only"):
        validate_counts(adata, "raw", layer="other")


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((4, 5, 3), 40000, np.uint16), 156),  # 16 bit scaled, not clipped to white
        (np.full((4, 5, 3), 200, np.uint16), 200),  # 8-bit values in a wider type
        (np.full((4, 5, 3), 0.5, np.float32), 128),  # [0, 1]
        (np.full((4, 5, 3), 100.0, np.float64), 100),  # [0, 255]
        (np.full((4, 5), 77, np.uint8), 77),  # grey
        (np.full((4, 5, 1), 77, np.int32), 77),
    ],
)
def test_images_of_any_dtype_become_uint8_rgb(image, expected):
    from asign_sc._stack import to_uint8_rgb

    out = to_uint8_rgb(image)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out == expected).all()


def test_rgba_is_composited_over_white():
    from asign_sc._stack import to_uint8_rgb

    image = np.zeros((2, 2, 4), np.uint8)
    image[0, 0] = [10, 20, 30, 255]  # opaque
    image[1, 1] = [10, 20, 30, 0]  # transparent: slide background
    out = to_uint8_rgb(image)
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.full((4, 5, 3), 70000, np.uint32), r"dtype uint32 with values up to 70000"),
        (np.full((4, 5, 3), -1, np.int16), r"dtype int16.*negative"),
        (np.full((4, 5, 3), 300.0), r"dtype float64 with values up to 300"),
        (np.full((4, 5, 3), np.nan), r"float64.*NaN"),
        (np.ones((4, 5, 3), bool), r"dtype bool"),
        (np.ones((3, 4, 5), np.uint8), r"shape \(3, 4, 5\)"),
        (np.ones((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_unconvertible_images_are_refused_naming_the_dtype(image, match):
    from asign_sc._stack import to_uint8_rgb

    with pytest.raises(InvalidStackError, match=match):
        to_uint8_rgb(image, what="The image of section 'S1'")


def test_spot_windows_of_a_few_pixels_warn(caplog):
    from asign_sc._stack import check_image_resolution

    adata = _legacy(image=True)  # spot diameter 40 px, images at scale 0.5
    stack = resolve_stack(adata)
    with caplog.at_level("WARNING", logger="asign_sc._stack"):
        assert check_image_resolution(stack, window=60.0) == []  # 30 image px
        assert caplog.text == ""
        assert check_image_resolution(stack, window=12.0) == ["s2", "s1", "s0"]  # 6 image px
    assert "only 6.0, 6.0, 6.0 px wide" in caplog.text
