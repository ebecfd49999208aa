"""to_legacy_anndata / from_legacy_anndata: squidpy's layout and round trips."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from asign_sc import InvalidStackError, Key
from asign_sc._stack import resolve_stack
from asign_sc.io import SectionInput, build_spatialdata, from_legacy_anndata, to_legacy_anndata


@pytest.fixture(scope="module")
def synthetic():
    from asign_sc.datasets import synthetic_stack

    sdata, _ = synthetic_stack(n_sections=2, image_size=256, n_spots_per_section=40)
    return sdata


def _gradient_section(name: str, *, side: tuple[int, int], image_scale: float, seed: int):
    """A section whose image encodes full-res x in red and y in green (to check scales)."""
    rng = np.random.default_rng(seed)
    h, w = side
    yy, xx = np.mgrid[0:h, 0:w] / image_scale  # full-resolution coordinates of each pixel
    full_h, full_w = h / image_scale, w / image_scale
    image = np.stack([255 * xx / full_w, 255 * yy / full_h, np.full_like(xx, 128)], axis=-1).astype(
        np.uint8
    )
    n = 25
    spatial = rng.uniform(0.1, 0.9, size=(n, 2)) * [full_w, full_h]
    return SectionInput(
        name=name,
        counts=sp.csr_matrix(rng.poisson(4, size=(n, 6)).astype(np.float32)),
        genes=[f"g{i}" for i in range(6)],
        obs=pd.DataFrame({"quality": rng.uniform(size=n)}, index=[f"{name}_{i}" for i in range(n)]),
        spatial=spatial,
        spot_radius=7.5,
        image=image,
        image_scale=image_scale,
        microns_per_pixel=0.9,
    )


def _assert_same_stack(a, b):
    stack_a, stack_b = resolve_stack(a), resolve_stack(b)
    assert stack_a.names == stack_b.names
    for s_a in stack_a:
        s_b = stack_b[s_a.name]
        np.testing.assert_array_equal(
            stack_a.table.obs_names[s_a.rows], stack_b.table.obs_names[s_b.rows]
        )
        np.testing.assert_allclose(s_b.spatial, s_a.spatial)
        assert s_b.spot_radius == pytest.approx(s_a.spot_radius)
        np.testing.assert_array_equal(
            stack_b.table.X[s_b.rows].toarray(), stack_a.table.X[s_a.rows].toarray()
        )
    assert list(stack_b.table.var_names) == list(stack_a.table.var_names)


def test_legacy_layout(synthetic):
    adata = to_legacy_anndata(synthetic, max_side=100)
    stack = resolve_stack(synthetic)
    assert isinstance(adata, AnnData)
    assert adata.n_obs == stack.table.n_obs
    assert "spatialdata_attrs" not in adata.uns
    assert list(adata.uns[Key.uns.spatial]) == stack.names
    for section in stack:
        library = adata.uns["spatial"][section.name]
        hires = library["images"]["hires"]
        assert hires.dtype == np.uint8 and hires.shape == (256, 256, 3)
        assert library["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1.0)
        assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
            2 * section.spot_radius
        )
        np.testing.assert_allclose(adata.obsm["spatial"][section.rows], section.spatial)
    # The legacy object is a copy: writing to it leaves the SpatialData alone.
    adata.obs["new"] = 1
    assert "new" not in synthetic.tables["table"].obs
    # the stack's own squidpy layout (hires + lowres, io.add_squidpy_spatial) is untouched
    assert "lowres" in synthetic.tables["table"].uns["spatial"]["S1"]["images"]


def test_squidpy_spatial_scatter_runs_on_legacy_output(synthetic):
    import matplotlib.pyplot as plt
    import squidpy as sq

    adata = to_legacy_anndata(synthetic)
    sq.pl.spatial_scatter(adata, library_key="section", color=[adata.var_names[0]])
    fig = plt.gcf()
    # One panel (plus colour bar) per section, each showing the hires image.
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(resolve_stack(synthetic))
    plt.close("all")


def test_round_trip_preserves_stack_and_reorders_sections(synthetic):
    from spatialdata import deepcopy

    sdata = deepcopy(synthetic)
    table = sdata.tables["table"]
    table.obs["section"] = table.obs["section"].cat.reorder_categories(["S2", "S1"])
    table.layers["counts"] = table.X.copy()
    table.obsm["X_pca"] = np.arange(table.n_obs * 2, dtype=float).reshape(-1, 2)
    table.obs["label"] = pd.Categorical(np.where(np.arange(table.n_obs) % 2, "a", "b"))
    table.uns["note"] = {"x": 1}

    legacy = to_legacy_anndata(sdata)
    back = from_legacy_anndata(legacy)
    _assert_same_stack(sdata, back)
    new = back.tables["table"]
    assert resolve_stack(back).names == ["S2", "S1"]
    # Rows are grouped by section in stacking order; everything per row follows them.
    order = table.obs_names.get_indexer(new.obs_names)
    np.testing.assert_array_equal(new.layers["counts"].toarray(), table.X[order].toarray())
    np.testing.assert_array_equal(new.obsm["X_pca"], table.obsm["X_pca"][order])
    assert list(new.obs["label"]) == list(table.obs["label"].iloc[order])
    assert list(new.var["program"]) == list(table.var["program"])
    assert new.uns["note"] == {"x": 1}
    assert new.uns[Key.uns.stack]["microns_per_pixel"] == pytest.approx(
        table.uns[Key.uns.stack]["microns_per_pixel"]
    )
    for name in ["S1", "S2"]:
        image, scale = resolve_stack(back).image(name)
        np.testing.assert_array_equal(image, resolve_stack(sdata).image(name)[0])
        np.testing.assert_allclose(scale, 1.0)


@pytest.mark.parametrize(
    ("side", "image_scale", "max_side", "expected_shape", "expected_scale"),
    [
        # full-res 1200 x 1000 image, pyramid 1200/600: max_side 500 -> the 600 level
        ((1000, 1200), 1.0, 500, (500, 600), 0.5),
        ((1000, 1200), 1.0, 2000, (1000, 1200), 1.0),  # smaller than max_side: finest
        ((1000, 1200), 1.0, None, (1000, 1200), 1.0),
        # a Visium-like hires image (0.15 of full res) is kept at its own scale
        ((540, 600), 0.15, 2000, (540, 600), 0.15),
    ],
)
def test_image_survives_at_the_documented_scale(
    side, image_scale, max_side, expected_shape, expected_scale
):
    sdata = build_spatialdata(
        [
            _gradient_section("A", side=side, image_scale=image_scale, seed=0),
            _gradient_section("B", side=side, image_scale=image_scale, seed=1),
        ]
    )
    legacy = to_legacy_anndata(sdata, max_side=max_side)
    for name in ["A", "B"]:
        library = legacy.uns["spatial"][name]
        hires = library["images"]["hires"]
        scalef = library["scalefactors"]["tissue_hires_scalef"]
        assert hires.shape[:2] == expected_shape
        assert scalef == pytest.approx(expected_scale)
        # Spot centres scaled by tissue_hires_scalef land where the image encodes them.
        rows = resolve_stack(sdata)[name].rows
        xy = legacy.obsm["spatial"][rows]
        px = np.floor(xy * scalef).astype(int)
        full_h, full_w = side[0] / image_scale, side[1] / image_scale
        np.testing.assert_allclose(hires[px[:, 1], px[:, 0], 0], 255 * xy[:, 0] / full_w, atol=4)
        np.testing.assert_allclose(hires[px[:, 1], px[:, 0], 1], 255 * xy[:, 1] / full_h, atol=4)

    back = from_legacy_anndata(legacy)
    _assert_same_stack(sdata, back)
    stack = resolve_stack(back, require_images=True)
    for name in ["A", "B"]:
        assert stack[name].image_scale == pytest.approx(expected_scale)
        image, _ = stack.image(name)
        np.testing.assert_array_equal(image, legacy.uns["spatial"][name]["images"]["hires"])
    assert back.tables["table"].uns[Key.uns.stack]["microns_per_pixel"]["A"] == 0.9


def test_hand_made_legacy_anndata(tmp_path):
    """Interleaved rows, hires and lowres images, extra obsm/obsp/raw, written to h5ad."""
    rng = np.random.default_rng(0)
    sections = ["s0", "s1"]
    n = 20
    obs = pd.DataFrame(
        {"section": pd.Categorical(np.tile(sections, n // 2), categories=sections[::-1])},
        index=[f"spot{i}" for i in range(n)],
    )
    adata = AnnData(X=rng.poisson(2, (n, 5)).astype(np.float32), obs=obs)
    adata.var["gene_ids"] = [f"E{i}" for i in range(5)]
    adata.obsm["spatial"] = rng.uniform(100, 900, size=(n, 2))
    adata.obsp["distances"] = sp.random(n, n, density=0.2, format="csr", random_state=0)
    adata.raw = adata.copy()
    adata.uns["spatial"] = {
        s: {
            "images": {
                "hires": rng.integers(0, 256, (500, 500, 3), dtype=np.uint8),
                "lowres": rng.integers(0, 256, (150, 150, 3), dtype=np.uint8),
            },
            "scalefactors": {
                "spot_diameter_fullres": 40.0,
                "tissue_hires_scalef": 0.5,
                "tissue_lowres_scalef": 0.15,
            },
        }
        for s in sections
    }
    adata.write_h5ad(tmp_path / "legacy.h5ad")
    adata = ad.read_h5ad(tmp_path / "legacy.h5ad")
    before = adata.copy()

    sdata = from_legacy_anndata(adata)
    table = sdata.tables["table"]
    stack = resolve_stack(sdata)
    assert stack.names == ["s1", "s0"]
    order = adata.obs_names.get_indexer(table.obs_names)
    np.testing.assert_array_equal(order, [*range(1, n, 2), *range(0, n, 2)])
    np.testing.assert_array_equal(table.X.toarray(), adata.X[order])
    assert sp.issparse(table.X) and table.X.dtype == np.float32
    assert list(table.var["gene_ids"]) == list(adata.var["gene_ids"])
    np.testing.assert_array_equal(
        table.obsp["distances"].toarray(), adata.obsp["distances"][order][:, order].toarray()
    )
    np.testing.assert_array_equal(table.raw.X, adata.raw.X[order])
    for name in sections:
        assert stack[name].spot_radius == 20.0
        assert stack[name].image_scale == 0.5  # the larger (hires) image is kept
        np.testing.assert_array_equal(
            stack.image(name)[0], adata.uns["spatial"][name]["images"]["hires"]
        )
    # The input is left as it was.
    assert adata.obs_names.equals(before.obs_names)
    assert list(adata.obs.columns) == ["section"]
    assert set(adata.uns["spatial"]) == set(sections)

    # And back to legacy, then h5ad: the legacy output is writable.
    legacy = to_legacy_anndata(sdata)
    legacy.write_h5ad(tmp_path / "again.h5ad")
    again = ad.read_h5ad(tmp_path / "again.h5ad")
    np.testing.assert_array_equal(
        again.uns["spatial"]["s0"]["images"]["hires"], adata.uns["spatial"]["s0"]["images"]["hires"]
    )


def test_section_without_image_round_trips():
    section = _gradient_section("A", side=(300, 300), image_scale=1.0, seed=0)
    section.image = None
    sdata = build_spatialdata([section])
    legacy = to_legacy_anndata(sdata)
    assert legacy.uns["spatial"]["A"]["images"] == {}
    assert "tissue_hires_scalef" not in legacy.uns["spatial"]["A"]["scalefactors"]
    back = from_legacy_anndata(legacy)
    assert not resolve_stack(back)["A"].has_image
    _assert_same_stack(sdata, back)


def test_errors(synthetic):
    legacy = to_legacy_anndata(synthetic)
    with pytest.raises(TypeError, match="expects a SpatialData"):
        to_legacy_anndata(legacy)
    with pytest.raises(TypeError, match="It already is a SpatialData"):
        from_legacy_anndata(synthetic)
    with pytest.raises(ValueError, match="max_side must be a positive"):
        to_legacy_anndata(synthetic, max_side=0)
    with pytest.raises(InvalidStackError, match=r"obs\['slide'\] is missing"):
        to_legacy_anndata(synthetic, library_key="slide")

    dup = legacy.copy()
    dup.var_names = ["G"] * dup.n_vars
    with pytest.raises(InvalidStackError, match="var_names_make_unique"):
        from_legacy_anndata(dup)
    no_uns = legacy.copy()
    del no_uns.uns["spatial"]["S2"]
    with pytest.raises(InvalidStackError, match=r"uns\['spatial'\]\['S2'\] is missing"):
        from_legacy_anndata(no_uns)
    no_scalef = legacy.copy()
    del no_scalef.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(InvalidStackError, match="tissue_hires_scalef"):
        from_legacy_anndata(no_scalef)
    empty = legacy.copy()
    empty.X = None
    with pytest.raises(InvalidStackError, match="X is empty"):
        from_legacy_anndata(empty)
