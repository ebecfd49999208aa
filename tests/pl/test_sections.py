"""pl.sections: image comparison, shared colour scale, truth on the model scale, errors."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc
from asign_sc._stack import resolve_stack


@pytest.fixture(scope="module")
def sdata(imputed_stack):
    return imputed_stack()


def test_sections_matches_reference_image(sdata, tmp_path, check_image):
    fig = asc.pl.sections(sdata, "Gene011", max_side=128, figsize=(6, 4), dpi=50, show=False)
    check_image(fig, "sections.png", tmp_path, dpi=50)


def test_sections_uncropped_matches_reference_image(sdata, tmp_path, check_image):
    fig = asc.pl.sections(
        sdata, "Gene011", crop=False, max_side=128, figsize=(6, 4), dpi=50, show=False
    )
    check_image(fig, "sections_uncropped.png", tmp_path, dpi=50)


def test_crop_zooms_each_panel_to_its_spots(sdata):
    whole = asc.pl.sections(sdata, "Gene011", crop=False, show=False)
    cropped = asc.pl.sections(sdata, "Gene011", show=False)

    def widths(fig):
        panels = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
        return np.array([abs(np.diff(ax.get_xlim())[0]) for ax in panels])

    # Spots cover part of each synthetic slide: cropping shrinks the first panel to the
    # spots' extent plus one spot diameter of margin on each side.
    section = resolve_stack(sdata).sections[0]
    slide_width = section.image_shape[1] / section.image_scale
    extent = np.ptp(section.spatial[:, 0]) + 6 * section.spot_radius
    expected = min(extent, slide_width) / slide_width
    ratio = widths(cropped) / widths(whole)
    assert np.all(ratio < 1)
    assert ratio[0] == pytest.approx(expected, rel=0.1)


def test_panels_share_one_colour_scale_and_truth_is_log_normalised(sdata, tmp_path):
    table = sdata.tables["table"]
    fig = asc.pl.sections(sdata, "Gene011", img=False, save=tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    panels = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(panels) == 6  # 3 sections x (measured, imputed)
    limits = {ax.collections[0].get_clim() for ax in panels}
    assert len(limits) == 1
    counts = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    g = table.var_names.get_loc("Gene011")
    truth = np.log1p(counts[:, g] / counts.sum(1) * 1e4)
    imputed = table.obsm["asign"]["Gene011"].to_numpy()
    lo, hi = limits.pop()
    np.testing.assert_allclose(
        [lo, hi], [min(truth.min(), imputed.min()), max(truth.max(), imputed.max())], rtol=1e-5
    )
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == "S1: measured" and titles[4] == "S2: input (known)"
    # measured panel of S1 holds S1's log-normalised counts, in the stack's spot order
    rows = np.flatnonzero(table.obs["section"].astype(str) == "S1")
    np.testing.assert_allclose(
        np.sort(panels[0].collections[0].get_array()), np.sort(truth[rows]), rtol=1e-5
    )
    plt.close(fig)


def test_imputed_only_and_percentile_limits(sdata):
    fig = asc.pl.sections(
        sdata, "Gene011", compare=None, layer="asign", vmax="p90", img=False, show=False
    )
    panels = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(panels) == 3
    imputed = sdata.tables["table"].obsm["asign"]["Gene011"].to_numpy()
    assert panels[0].collections[0].get_clim()[1] == pytest.approx(np.percentile(imputed, 90))
    plt.close(fig)


def test_bad_color_and_missing_layer_are_refused(sdata):
    with pytest.raises(KeyError, match="'NOPE' is not in obsm"):
        asc.pl.sections(sdata, "NOPE", show=False)
    with pytest.raises(KeyError, match=r"layers\['missing'\] is missing"):
        asc.pl.sections(sdata, "Gene011", layer="missing", show=False)
    with pytest.raises(KeyError, match="obsm\\['other'\\] is missing"):
        asc.pl.sections(sdata, "Gene011", key="other", show=False)
    with pytest.raises(ValueError, match="compare must be"):
        asc.pl.sections(sdata, "Gene011", compare="measured", show=False)
    not_imputed = next(
        g for g in sdata.tables["table"].var_names
        if g not in sdata.tables["table"].obsm["asign"].columns
    )  # fmt: skip
    with pytest.raises(ValueError, match="was not imputed"):
        asc.pl.sections(sdata, not_imputed, layer="asign", show=False)


def test_draws_into_given_axes(sdata):
    fig, axes = plt.subplots(1, 3)
    out = asc.pl.sections(sdata, "Gene011", compare=None, img=False, ax=list(axes), show=False)
    assert out is fig and all(ax.collections for ax in axes)
    with pytest.raises(ValueError, match="ax has 3 axes but 6 panels"):
        asc.pl.sections(sdata, "Gene011", ax=list(axes), show=False)
    plt.close(fig)
