"""read_her2st on the real her2st subset (../shared/data/her2st)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from asign_sc import InvalidStackError
from asign_sc._stack import resolve_stack
from asign_sc.io import read_her2st

pytestmark = pytest.mark.her2st


def test_patient_c_is_the_five_imaged_sections(her2st_c):
    stack = resolve_stack(her2st_c, require_images=True, min_sections=2)
    assert stack.names == ["C2", "C3", "C4", "C5", "C6"]
    table = her2st_c.tables["table"]
    assert table.obs["section"].cat.ordered
    assert set(table.obs["sample"]) == {"C"}
    for section in stack:
        assert 170 <= section.n_spots <= 195
        h, w = section.image_shape
        assert 9000 < h < 10500 and 9000 < w < 10500
        xy = section.spatial
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        # 100 um spots at a 200 um pitch of ~291 px: radius ~73 px
        assert 65 < section.spot_radius < 80
    assert {"ERBB2", "GAPDH", "KRT19"} <= set(table.var_names)
    assert table.X.dtype == np.float32
    counts = table.X.data
    assert (counts >= 0).all() and np.allclose(counts, np.round(counts))
    assert 0.6 < np.mean(list(table.uns["asign_stack"]["microns_per_pixel"].values())) < 0.8


def test_counts_match_the_release_file(her2st_path, her2st_c):
    import pandas as pd

    raw = pd.read_csv(her2st_path / "counts" / "C4.tsv.gz", sep="\t", index_col=0)
    table = her2st_c.tables["table"]
    spot = raw.index[7]
    row = table[f"C4_{spot}"]
    for gene in ("ERBB2", "KRT19", raw.columns[100]):
        assert row[:, gene].X.toarray().item() == raw.loc[spot, gene]
    # genes absent from a section's file are zero there, not missing
    absent = table.var_names.difference(raw.columns)
    assert len(absent) > 0
    assert row[:, absent].X.sum() == 0


def test_section_without_image_is_left_out_with_a_warning(her2st_path, caplog):
    with caplog.at_level(logging.WARNING):
        sdata = read_her2st(her2st_path, patient="C", images=False, sections=["C1", "C2"])
    assert list(sdata.tables["table"].obs["section"].cat.categories) == ["C1", "C2"]
    assert len(sdata.images) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sdata = read_her2st(her2st_path, patient="C", sections=["C1", "C2"])
    assert list(sdata.images) == ["C2_image"]  # C1 named explicitly: read without an image
    stack = resolve_stack(sdata)
    assert not stack["C1"].has_image and stack["C2"].has_image


def test_aligned_coordinates_for_patients_with_alignment(her2st_path):
    sdata = read_her2st(
        her2st_path, patient="B", images=False, coordinates="aligned", sections=["B1", "B2"]
    )
    table = sdata.tables["table"]
    assert table.obsm["spatial_aligned"].shape == (table.n_obs, 2)
    first = table.obs["section"] == "B1"  # the reference: identity
    np.testing.assert_allclose(table.obsm["spatial_aligned"][first], table.obsm["spatial"][first])


def test_errors(her2st_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'counts/' folder"):
        read_her2st(tmp_path, patient="C")
    with pytest.raises(FileNotFoundError, match="No counts for patient 'Z'"):
        read_her2st(her2st_path, patient="Z")
    with pytest.raises(InvalidStackError, match=r"\['C9'\] have no counts file"):
        read_her2st(her2st_path, patient="C", sections=["C9"])
