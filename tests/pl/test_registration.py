"""pl.registration: image comparison against a stored reference, and clear errors."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from asign_sc.pl import registration
from asign_sc.tl import register_sections


def _rotation(degrees: float, tx: float, ty: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), tx], [np.sin(t), np.cos(t), ty], [0.0, 0.0, 1.0]])


def _stack():
    """Three drawn sections (an ellipse with a notch and a stripe), placed by known maps.

    A legacy AnnData, registered with the known matrices (``matrices=``), so the picture
    depends on the plotting code only, not on registration numerics.
    """
    from anndata import AnnData

    size, full = 120, 2.0  # images are 2x downsampled copies of the "full resolution"
    placements = [_rotation(25, 30, -10), _rotation(0, 0, 0), _rotation(-40, -20, 25)]
    centre = np.array([size, size]) * full / 2
    images, spatial, sections, aligned = {}, [], [], {}
    grid = np.array([[x, y] for x in range(60, 190, 26) for y in range(80, 170, 26)], float)
    for i, placement in enumerate(placements):
        name = f"P{i + 1}"
        shift = np.eye(3)
        shift[:2, 2] = centre
        to_section = shift @ placement @ np.linalg.inv(shift)  # tissue frame -> section
        aligned[name] = np.linalg.inv(to_section)
        yy, xx = (np.mgrid[:size, :size] + 0.5) * full
        tx, ty = (np.stack([xx, yy, np.ones_like(xx)], -1) @ aligned[name].T)[..., :2].transpose(
            2, 0, 1
        )
        tissue = ((tx - 120) / 80) ** 2 + ((ty - 125) / 55) ** 2 < 1
        tissue &= ~((tx > 180) & (np.abs(ty - 125) < 12))  # a notch: orientation is visible
        stripe = tissue & (np.abs(tx - 100) < 10)
        image = np.empty((size, size, 3))
        image[:] = (242, 240, 244)
        image[tissue] = (225, 140, 185)
        image[stripe] = (90, 50, 130)
        images[name] = image.astype(np.uint8)
        spatial.append((np.c_[grid, np.ones(len(grid))] @ to_section.T)[:, :2])
        sections += [name] * len(grid)
    adata = AnnData(
        X=np.ones((len(sections), 2), dtype=np.float32),
        obs=pd.DataFrame(
            {"section": pd.Categorical(sections, categories=list(images), ordered=True)},
            index=[f"s{i}" for i in range(len(sections))],
        ),
        obsm={"spatial": np.vstack(spatial)},
        uns={
            "spatial": {
                name: {
                    "images": {"hires": image},
                    "scalefactors": {"tissue_hires_scalef": 1 / full, "spot_diameter_fullres": 8.0},
                }
                for name, image in images.items()
            }
        },
    )
    ref = np.linalg.inv(aligned["P2"])
    register_sections(
        adata, matrices={k: ref @ v for k, v in aligned.items()}, show_progress_bar=False
    )
    return adata


def test_registration_plot_matches_reference_image(tmp_path, check_image):
    adata = _stack()
    fig = registration(adata, max_side=120, figsize=(4, 2), dpi=60, title=False, show=False)
    assert len(fig.axes) == 2
    check_image(fig, "registration.png", tmp_path, dpi=60)


def test_after_panel_overlays_sections_and_titles_report_dice(tmp_path):
    adata = _stack()
    fig = registration(adata, max_side=120, save=tmp_path / "r.png")
    before, after = fig.axes
    assert "before" in before.get_title() and "after: aligned to P2" in after.get_title()
    # known maps: the sections overlap up to resampling of 120-px masks
    dice_after = float(after.get_title().rsplit(" ", 1)[-1])
    dice_before = float(before.get_title().rsplit(" ", 1)[-1])
    assert dice_after > 0.95 and dice_before < dice_after - 0.1
    # three scatter layers of spot centres per panel, the after ones on top of each other
    offsets = [c.get_offsets() for c in after.collections if c.get_offsets().shape[0] == 20]
    assert len(offsets) == 3
    np.testing.assert_allclose(offsets[0], offsets[2], atol=1e-6)
    assert (tmp_path / "r.png").stat().st_size > 0
    plt.close(fig)


def test_unregistered_data_is_refused():
    adata = _stack()
    del adata.uns["asign_registration"]
    with pytest.raises(KeyError, match="register_sections"):
        registration(adata, show=False)


def test_short_palette_is_refused():
    with pytest.raises(ValueError, match="palette has 1 colours for 3 sections"):
        registration(_stack(), palette=["red"], show=False)


def test_one_legend_names_every_section_and_outlines_keep_their_hues():
    from matplotlib.colors import to_hex
    from matplotlib.contour import ContourSet

    fig = registration(_stack(), max_side=120, show=False)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["P1", "P2", "P3"]
    hues = [to_hex(h.get_color()) for h in legend.legend_handles]
    for ax in fig.axes:  # each panel outlines each section in its legend colour
        outlines = [to_hex(c.get_edgecolor()[0]) for c in ax.collections
                    if isinstance(c, ContourSet)]  # fmt: skip
        assert sorted(set(outlines)) == sorted(hues)
    # where the three sections overlap the tint stays light (no brown): bright pixels
    rgb = fig.axes[1].images[0].get_array()
    tissue = rgb.min(axis=-1) < 0.99
    assert np.median(rgb[tissue].mean(axis=-1)) > 0.55
    plt.close(fig)


def test_given_axes_and_key():
    adata = _stack()
    fig, axes = plt.subplots(1, 2)
    assert registration(adata, ax=axes, max_side=60, show=False) is fig
    assert all(ax.images for ax in axes)
    plt.close(fig)
    with pytest.raises(KeyError, match=r"key_added='other'"):
        registration(adata, key="other", show=False)
