"""io.add_squidpy_spatial: every read stack's table plots with squidpy and scanpy as it is."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc


@pytest.fixture(scope="module")
def imputed():
    sdata, _ = asc.datasets.synthetic_stack(
        n_sections=3, n_spots_per_section=40, image_size=1100, n_genes=12
    )
    asc.tl.impute(sdata, method="overlap", known_sections=["S2"], n_top_genes=8,
                  spatial_key="spatial")  # fmt: skip
    return sdata


def _gene(table) -> str:
    return str(table.obsm["asign"].columns[0])


def test_readers_write_per_section_images_and_exact_scale_factors(imputed):
    table = imputed.tables["table"]
    assert set(table.uns["spatial"]) == {"S1", "S2", "S3"}
    for name, library in table.uns["spatial"].items():
        factors = library["scalefactors"]
        hires, lowres = library["images"]["hires"], library["images"]["lowres"]
        # 1100 px slide, factor-2 pyramid: hires is the full level, lowres the 550 px one
        assert hires.shape == (1100, 1100, 3) and lowres.shape == (550, 550, 3)
        assert factors["tissue_hires_scalef"] == pytest.approx(1.0)
        assert factors["tissue_lowres_scalef"] == pytest.approx(0.5)
        radius = imputed.shapes[f"{name}_spots"]["radius"].iloc[0]
        assert factors["spot_diameter_fullres"] == pytest.approx(2 * radius)
        # the same slide, half the resolution (pixel noise aside)
        assert np.abs(lowres.astype(float) - hires[::2, ::2]).mean() < 8
    rows = table.obs["section"] == "S1"
    centres = np.c_[imputed.shapes["S1_spots"].geometry.x, imputed.shapes["S1_spots"].geometry.y]
    np.testing.assert_allclose(table.obsm["spatial"][rows.to_numpy()], centres)


def test_squidpy_spatial_scatter_on_the_table_as_it_is(imputed):
    import squidpy as sq

    table = imputed.tables["table"]
    gene = _gene(table)
    sq.pl.spatial_scatter(table, color=gene, layer="asign", library_key="section")
    fig = plt.gcf()
    panels = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(panels) == 3
    first = panels[0].collections[0]
    rows = (table.obs["section"] == "S1").to_numpy()
    values = table.layers["asign"][:, table.var_names.get_loc(gene)].toarray().ravel()
    np.testing.assert_allclose(np.sort(first.get_array()), np.sort(values[rows]), rtol=1e-6)
    assert panels[0].images  # the section's H&E below its spots
    plt.close("all")


def test_scanpy_spatial_per_section_on_the_table_as_it_is(imputed):
    import scanpy as sc

    table = imputed.tables["table"]
    gene = _gene(table)
    one = table[table.obs["section"] == "S3"]
    axes = sc.pl.spatial(one, library_id="S3", color=gene, layer="asign", show=False)
    ax = axes[0]
    # scanpy draws discs at hires pixels: spot centres times tissue_hires_scalef (1 here)
    discs = ax.collections[0].get_paths()
    centres = np.array([path.vertices.mean(axis=0) for path in discs])
    np.testing.assert_allclose(
        np.sort(centres[:, 0]), np.sort(one.obsm["spatial"][:, 0]), rtol=0.01
    )
    assert ax.images and ax.images[0].get_array().shape[:2] == (1100, 1100)
    plt.close("all")


def test_kept_on_zarr_round_trip(imputed, tmp_path):
    import spatialdata as sd
    import squidpy as sq

    imputed.write(tmp_path / "s.zarr")
    table = sd.read_zarr(tmp_path / "s.zarr").tables["table"]
    before = imputed.tables["table"].uns["spatial"]
    for name, library in before.items():
        back = table.uns["spatial"][name]
        assert back["scalefactors"] == pytest.approx(library["scalefactors"])
        for key, image in library["images"].items():
            np.testing.assert_array_equal(back["images"][key], image)
    sq.pl.spatial_scatter(table, color=_gene(table), layer="asign", library_key="section")
    plt.close("all")


def test_to_legacy_anndata_shares_the_layout(imputed):
    legacy = asc.io.to_legacy_anndata(imputed, max_side=400)
    table = imputed.tables["table"]
    for name in ("S1", "S2", "S3"):
        ours, theirs = table.uns["spatial"][name], legacy.uns["spatial"][name]
        np.testing.assert_array_equal(theirs["images"]["hires"], ours["images"]["lowres"])
        assert theirs["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.5)
    np.testing.assert_allclose(legacy.obsm["spatial"], table.obsm["spatial"])


def test_add_squidpy_spatial_refuses_bad_input(imputed):
    with pytest.raises(TypeError, match="expects a SpatialData"):
        asc.io.add_squidpy_spatial(imputed.tables["table"])
    with pytest.raises(ValueError, match="lowres_side must be a positive"):
        asc.io.add_squidpy_spatial(imputed, lowres_side=0)


def test_a_stack_breaking_the_contract_is_refused_as_it_is_built():
    from dataclasses import replace

    from asign_sc.io import SectionInput, build_spatialdata

    rng = np.random.default_rng(0)
    image = np.full((100, 120, 3), 200, dtype=np.uint8)
    spots = np.c_[rng.uniform(20, 100, 10), rng.uniform(20, 80, 10)]
    good = SectionInput(
        name="s0", counts=rng.poisson(3, (10, 4)), genes=list("abcd"),
        obs=pd.DataFrame(index=[f"s0_{i}" for i in range(10)]), spatial=spots, spot_radius=3.0,
        image=image,
    )  # fmt: skip
    other = pd.DataFrame(index=[f"s1_{i}" for i in range(10)])
    sdata = build_spatialdata([good, replace(good, name="s1", obs=other)])
    assert set(sdata.tables["table"].uns["spatial"]) == {"s0", "s1"}
    wrong_unit = replace(good, name="s1", obs=other, spatial=spots * 10)
    with pytest.raises(asc.InvalidStackError, match=r"section 's1' lie outside its"):
        build_spatialdata([good, wrong_unit])
