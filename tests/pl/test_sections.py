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


def _panels(fig):
    return [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]


def _centres(ax) -> np.ndarray:
    """Spot centres as drawn (circle patches, or marker offsets)."""
    paths = ax.collections[0].get_paths()
    centres = np.array([path.vertices.mean(axis=0) for path in paths])
    return centres if len(paths) > 1 else np.asarray(ax.collections[0].get_offsets())


def test_crop_zooms_each_panel_to_its_spots_and_panels_are_equal(sdata):
    whole = asc.pl.sections(sdata, "Gene011", crop=False, show=False)
    cropped = asc.pl.sections(sdata, "Gene011", show=False)

    def spans(fig):
        return np.array([(np.ptp(ax.get_xlim()), np.ptp(ax.get_ylim())) for ax in _panels(fig)])

    stack = resolve_stack(sdata)
    for fig in (whole, cropped):
        # one width/height ratio for every panel, so they are drawn at one size
        ratios = spans(fig)[:, 0] / spans(fig)[:, 1]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)
        sizes = {tuple(np.round(ax.get_position().size, 3)) for ax in _panels(fig)}
        assert len(sizes) == 1
    assert np.all(spans(cropped) < spans(whole))
    for ax, section in zip(_panels(cropped)[:3], stack.sections, strict=True):
        lo, hi = section.spatial.min(axis=0), section.spatial.max(axis=0)
        x0, x1 = sorted(ax.get_xlim())
        y0, y1 = sorted(ax.get_ylim())
        assert x0 <= lo[0] - section.spot_radius and x1 >= hi[0] + section.spot_radius
        assert y0 <= lo[1] - section.spot_radius and y1 >= hi[1] + section.spot_radius
    plt.close("all")


def test_scale_bar_in_microns_from_the_recorded_pixel_size(sdata):
    from matplotlib_scalebar.scalebar import ScaleBar

    microns = sdata.tables["table"].uns["asign_stack"]["microns_per_pixel"]
    fig = asc.pl.sections(sdata, "Gene011", compare=None, img=False, show=False)
    for ax, name in zip(_panels(fig), ["S1", "S2", "S3"], strict=True):
        bars = [a for a in ax.artists if isinstance(a, ScaleBar)]
        assert len(bars) == 1 and bars[0].units == "um"
        assert bars[0].dx == pytest.approx(microns[name])  # spots drawn at scale factor 1
    plt.close(fig)
    fig = asc.pl.sections(sdata, "Gene011", compare=None, img=False, scalebar=False, show=False)
    assert not any(ax.artists for ax in _panels(fig))
    plt.close(fig)


def test_no_scale_bar_without_a_pixel_size(sdata):
    table = sdata.tables["table"]
    microns = table.uns["asign_stack"].pop("microns_per_pixel")
    try:
        fig = asc.pl.sections(sdata, "Gene011", compare=None, img=False, show=False)
    finally:
        table.uns["asign_stack"]["microns_per_pixel"] = microns
    assert not any(ax.artists for ax in _panels(fig))
    plt.close(fig)


def test_aligned_frame_puts_every_section_in_one_registered_extent(sdata, tmp_path, check_image):
    fig = asc.pl.sections(sdata, "Gene011", coordinate_system="aligned", compare=None,
                          max_side=128, figsize=(6, 2.4), dpi=50, show=False)  # fmt: skip
    panels = _panels(fig)
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in panels}
    assert len(limits) == 1  # the same extent: a place in the tissue is at one place
    table = sdata.tables["table"]
    aligned = table.obsm["spatial_aligned"]
    section = table.obs["section"].astype(str).to_numpy()
    centres = [_centres(ax) for ax in panels]
    points = [aligned[section == name] for name in ["S1", "S2", "S3"]]
    # display = (aligned - origin) * scale, with one origin and scale for every panel
    design = np.c_[np.vstack(points).ravel(), np.tile([[1, 0], [0, 1]], (len(aligned), 1))]
    fit, *_ = np.linalg.lstsq(design, np.vstack(centres).ravel(), rcond=None)
    np.testing.assert_allclose(design @ fit, np.vstack(centres).ravel(), atol=1e-6 * fit[0] * 100)
    assert fit[0] > 0
    check_image(fig, "sections_aligned.png", tmp_path, dpi=50)


def test_aligned_needs_a_registration(sdata):
    table = sdata.tables["table"]
    record = table.uns.pop("asign_registration")
    try:
        with pytest.raises(KeyError, match="coordinate_system='aligned' needs a registration"):
            asc.pl.sections(sdata, "Gene011", coordinate_system="aligned", show=False)
    finally:
        table.uns["asign_registration"] = record
    with pytest.raises(ValueError, match="coordinate_system must be"):
        asc.pl.sections(sdata, "Gene011", coordinate_system="global", show=False)


def test_panels_share_one_colour_scale_and_truth_is_log_normalised(sdata, tmp_path):
    table = sdata.tables["table"]
    fig = asc.pl.sections(sdata, "Gene011", img=False, save=tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    panels = _panels(fig)
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
    fig = asc.pl.sections(sdata, "Gene011", compare=None, vmax="p90", img=False, show=False)
    panels = _panels(fig)
    assert len(panels) == 3
    # without the measured row the known section shows its measured input, titled so
    assert [ax.get_title() for ax in panels] == ["S1: imputed", "S2: measured (known)",
                                                 "S3: imputed"]  # fmt: skip
    imputed = sdata.tables["table"].obsm["asign"]["Gene011"].to_numpy()
    assert panels[0].collections[0].get_clim()[1] == pytest.approx(np.percentile(imputed, 90))
    plt.close(fig)


def test_bad_color_and_missing_layer_are_refused(sdata):
    with pytest.raises(KeyError, match="'NOPE' is not in obsm"):
        asc.pl.sections(sdata, "NOPE", show=False)
    with pytest.raises(KeyError, match="obsm\\['other'\\] is missing"):
        asc.pl.sections(sdata, "Gene011", key="other", show=False)
    with pytest.raises(ValueError, match="compare must be"):
        asc.pl.sections(sdata, "Gene011", compare="measured", show=False)
    not_imputed = next(
        g for g in sdata.tables["table"].var_names
        if g not in sdata.tables["table"].obsm["asign"].columns
    )  # fmt: skip
    with pytest.raises(KeyError, match="in var_names but was not imputed"):
        asc.pl.sections(sdata, not_imputed, show=False)


def test_draws_into_given_axes(sdata):
    fig, axes = plt.subplots(1, 3)
    out = asc.pl.sections(sdata, "Gene011", compare=None, img=False, ax=list(axes), show=False)
    assert out is fig and all(ax.collections for ax in axes)
    with pytest.raises(ValueError, match="ax has 3 axes but 6 panels"):
        asc.pl.sections(sdata, "Gene011", ax=list(axes), show=False)
    plt.close(fig)


def test_first_squidpy_import_shows_no_docstring_warning():
    # squidpy's docrep templates warn "'n_jobs' is not a valid key!" (a SyntaxWarning, shown
    # by default) at its first import, which pl.sections does; in a fresh process, as a user's
    import subprocess
    import sys

    script = (
        "from asign_sc.pl._sections import _scatter\n"
        "try:\n"
        "    _scatter(None, 'gene', 'S1', library_key='section', ax=None)\n"
        "except KeyError:  # no img: the import is what is tested\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::SyntaxWarning", "-c", script],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "is not a valid key" not in result.stderr
