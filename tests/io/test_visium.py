"""read_visium_stack on tiny Space Ranger output folders written by the tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from asign_sc import InvalidStackError, Key
from asign_sc._stack import resolve_stack
from asign_sc.io import read_visium_stack

FULLRES = 4000  # side of the (not written) full-resolution image
HIRES_SCALEF = 0.15  # hires image: 600 x 600 px
LOWRES_SCALEF = 0.045
SPOT_DIAMETER = 89.5
GENES = ["GAPDH", "ACTB", "MT-CO1", "ACTB", "ERBB2"]  # a duplicated symbol, as in real data
GENE_IDS = [f"ENSG{i:011d}" for i in range(len(GENES))]


def _write_spaceranger(
    folder: Path,
    *,
    n_spots: int = 12,
    seed: int = 0,
    positions: str = "tissue_positions.csv",
    prefix: str = "",
    hires: bool = True,
    genes: list[str] = GENES,
    gene_ids: list[str] = GENE_IDS,
) -> dict:
    """Write a minimal Space Ranger ``outs/`` folder; return what was written."""
    rng = np.random.default_rng(seed)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    # Same barcodes in every folder, as on real Visium slides.
    barcodes = [f"AAAC{i:04d}-1" for i in range(n_spots)]
    counts = sp.csr_matrix(rng.poisson(3.0, size=(n_spots, len(genes))).astype(np.int32))
    by_gene = counts.T.tocsr()  # the h5 file stores genes x barcodes, CSC by barcode
    with h5py.File(folder / f"{prefix}filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        csc = by_gene.tocsc()
        m["data"] = csc.data
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array([len(genes), n_spots], dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array(gene_ids, dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])
    rows, cols = rng.integers(100, FULLRES - 100, size=(2, n_spots))
    table = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": np.arange(n_spots),
            "array_col": np.arange(n_spots) * 2,
            "pxl_row_in_fullres": rows,
            "pxl_col_in_fullres": cols,
        }
    )
    header = positions == "tissue_positions.csv"  # Space Ranger 2 writes a header
    table.to_csv(spatial / positions, index=False, header=header)
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "tissue_hires_scalef": HIRES_SCALEF,
                "tissue_lowres_scalef": LOWRES_SCALEF,
                "fiducial_diameter_fullres": 144.6,
                "spot_diameter_fullres": SPOT_DIAMETER,
            }
        )
    )
    images = {}
    for name, scalef, write in (("hires", HIRES_SCALEF, hires), ("lowres", LOWRES_SCALEF, True)):
        side = round(FULLRES * scalef)
        image = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        if write:
            Image.fromarray(image).save(spatial / f"tissue_{name}_image.png")
        images[name] = image
    return {
        "counts": counts.toarray(),
        "barcodes": barcodes,
        "xy": np.c_[cols, rows].astype(float),
        "images": images,
    }


def test_reads_two_sections_into_the_contract(tmp_path):
    a = _write_spaceranger(tmp_path / "slideA", n_spots=12, seed=0)
    b = _write_spaceranger(
        tmp_path / "slideB", n_spots=9, seed=1, positions="tissue_positions_list.csv"
    )
    sdata = read_visium_stack([tmp_path / "slideB", tmp_path / "slideA"], sample="P1")

    table = sdata.tables[Key.sdata.table]
    stack = resolve_stack(sdata, require_images=True)
    assert stack.names == ["slideB", "slideA"]  # given order, folder names
    assert list(table.obs[Key.obs.library].cat.categories) == ["slideB", "slideA"]
    assert (table.obs[Key.obs.sample] == "P1").all()
    # Gene symbols made unique, Ensembl ids kept.
    assert list(table.var_names) == ["GAPDH", "ACTB", "MT-CO1", "ACTB-1", "ERBB2"]
    assert list(table.var["gene_ids"]) == GENE_IDS
    for name, truth in (("slideB", b), ("slideA", a)):
        section = stack[name]
        rows = section.rows
        # Same barcodes on both slides: spot ids are prefixed, barcodes kept.
        assert list(table.obs_names[rows]) == [f"{name}_{bc}" for bc in truth["barcodes"]]
        assert list(table.obs["barcode"].iloc[rows]) == truth["barcodes"]
        np.testing.assert_array_equal(table.X[rows].toarray(), truth["counts"])
        np.testing.assert_allclose(section.spatial, truth["xy"])
        assert section.spot_radius == pytest.approx(SPOT_DIAMETER / 2)
        assert section.image_scale == pytest.approx(HIRES_SCALEF)
        image, scale = stack.image(name)
        np.testing.assert_array_equal(image, truth["images"]["hires"])
        np.testing.assert_allclose(scale, HIRES_SCALEF)
        assert "in_tissue" in table.obs and "array_row" in table.obs
    microns = table.uns[Key.uns.stack]["microns_per_pixel"]
    assert microns["slideA"] == pytest.approx(55.0 / SPOT_DIAMETER)


def test_names_prefixed_counts_file_and_lowres_fallback(tmp_path, caplog):
    truth = _write_spaceranger(tmp_path / "S1" / "outs", prefix="lib7_", hires=False)
    with caplog.at_level(logging.WARNING, logger="asign_sc"):
        sdata = read_visium_stack(tmp_path / "S1" / "outs")  # one folder, named by its parent
    assert "lowres" in caplog.text
    stack = resolve_stack(sdata)
    assert stack.names == ["S1"]
    assert stack["S1"].image_scale == pytest.approx(LOWRES_SCALEF)
    np.testing.assert_array_equal(stack.image("S1")[0], truth["images"]["lowres"])


def test_gene_union_over_sections_with_different_genes(tmp_path):
    _write_spaceranger(tmp_path / "a", genes=["G1", "G2"], gene_ids=["E1", "E2"])
    b = _write_spaceranger(tmp_path / "b", genes=["G2", "G3"], gene_ids=["E2", "E3"], seed=2)
    sdata = read_visium_stack([tmp_path / "a", tmp_path / "b"])
    table = sdata.tables[Key.sdata.table]
    assert list(table.var_names) == ["G1", "G2", "G3"]
    assert list(table.var["gene_ids"]) == ["E1", "E2", "E3"]
    rows = resolve_stack(sdata)["b"].rows
    np.testing.assert_array_equal(table[rows, ["G2", "G3"]].X.toarray(), b["counts"])
    assert table[rows, "G1"].X.sum() == 0


def test_errors(tmp_path):
    for name in ("x", "y"):
        _write_spaceranger(tmp_path / "one" / name)
    _write_spaceranger(tmp_path / "two" / "x")
    with pytest.raises(InvalidStackError, match=r"\['x'\] occur more than once.*sections="):
        read_visium_stack([tmp_path / "one" / "x", tmp_path / "two" / "x"])
    with pytest.raises(InvalidStackError, match="more than once"):
        read_visium_stack([tmp_path / "one" / "x", tmp_path / "one" / "y"], sections=["a", "a"])
    with pytest.raises(ValueError, match="one name per folder"):
        read_visium_stack([tmp_path / "one" / "x"], sections=["a", "b"])
    # A single name as a string names the single folder (not one section per character).
    one = read_visium_stack(tmp_path / "one" / "x", sections="xy")
    assert resolve_stack(one).names == ["xy"]
    with pytest.raises(ValueError, match="paths is empty"):
        read_visium_stack([])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_visium_stack([tmp_path / "missing"])
    (tmp_path / "one" / "y" / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks spatial/scalefactors_json\.json"):
        read_visium_stack([tmp_path / "one" / "y"])
    with pytest.raises(FileNotFoundError, match=r"lacks raw_feature_bc_matrix\.h5"):
        read_visium_stack([tmp_path / "one" / "x"], counts_file="raw_feature_bc_matrix.h5")


def test_barcodes_without_position_are_an_error(tmp_path):
    _write_spaceranger(tmp_path / "s")
    positions = tmp_path / "s" / "spatial" / "tissue_positions.csv"
    frame = pd.read_csv(positions)
    frame.iloc[1:].to_csv(positions, index=False)
    with pytest.raises(InvalidStackError, match="no position in the tissue positions file"):
        read_visium_stack([tmp_path / "s"])


def test_section_without_images_is_read_without_image(tmp_path, caplog):
    _write_spaceranger(tmp_path / "s", hires=False)
    (tmp_path / "s" / "spatial" / "tissue_lowres_image.png").unlink()
    with caplog.at_level(logging.WARNING, logger="asign_sc"):
        sdata = read_visium_stack([tmp_path / "s"])
    assert "read without an image" in caplog.text
    assert not resolve_stack(sdata)["s"].has_image
    assert len(sdata.images) == 0


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda s: (s / "filtered_feature_bc_matrix.h5").write_bytes(b""), r"is not an HDF5 file"),
        (
            lambda s: (s / "spatial" / "scalefactors_json.json").write_text('{"spot_diam'),
            r"scalefactors_json\.json is not valid JSON",
        ),
        (
            lambda s: (s / "spatial" / "scalefactors_json.json").write_text(
                json.dumps({"tissue_hires_scalef": 0.15, "tissue_lowres_scalef": 0.045})
            ),
            r"scalefactors_json\.json lacks \['spot_diameter_fullres'\]",
        ),
        (
            lambda s: (s / "spatial" / "scalefactors_json.json").write_text(
                json.dumps({"spot_diameter_fullres": 89.5, "tissue_lowres_scalef": 0.045})
            ),
            r"lacks \['tissue_hires_scalef'\]",
        ),
        (
            lambda s: _truncate(s / "spatial" / "tissue_hires_image.png"),
            r"could not read .*tissue_hires_image\.png",
        ),
    ],
)
def test_broken_files_are_named_with_their_section(tmp_path, damage, match):
    _write_spaceranger(tmp_path / "good")
    _write_spaceranger(tmp_path / "broken", seed=1)
    damage(tmp_path / "broken")
    with pytest.raises(InvalidStackError, match=match) as error:
        read_visium_stack([tmp_path / "good", tmp_path / "broken"])
    message = str(error.value)
    assert message.startswith("Section 'broken'") and str(tmp_path / "broken") in message
