"""pl.stack_3d: image comparison, one level per section, errors."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc


@pytest.fixture(scope="module")
def sdata(imputed_stack):
    return imputed_stack()


def test_stack_3d_matches_reference_image(sdata, tmp_path, check_image):
    fig = asc.pl.stack_3d(sdata, "Gene011", figsize=(4, 3.5), dpi=50, show=False)
    check_image(fig, "stack_3d.png", tmp_path, dpi=50)


def test_levels_follow_stacking_order_and_aligned_xy(sdata):
    fig = asc.pl.stack_3d(sdata, "Gene011", section_spacing=10.0, outline=False, show=False)
    ax = fig.axes[0]
    xs, ys, zs = ax.collections[0]._offsets3d
    table = sdata.tables["table"]
    aligned = table.obsm["spatial_aligned"]
    order = np.argsort(table.obs["section"].cat.codes.to_numpy(), kind="stable")
    np.testing.assert_allclose(np.c_[xs, ys], aligned[order])
    np.testing.assert_allclose(np.unique(zs), [0.0, 10.0, 20.0])
    plt.close(fig)


def test_categorical_obs_column_gets_one_layer_per_category(sdata):
    fig = asc.pl.stack_3d(sdata, "section", outline=False, show=False)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["S1", "S2", "S3"]
    plt.close(fig)


def test_errors(sdata):
    with pytest.raises(KeyError, match="'NOPE' is not in obsm"):
        asc.pl.stack_3d(sdata, "NOPE", show=False)
    with pytest.raises(KeyError, match="not registered"):
        asc.pl.stack_3d(sdata, "Gene011", spatial_key="nowhere", show=False)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="3D axes"):
        asc.pl.stack_3d(sdata, "Gene011", ax=ax, show=False)
    plt.close(fig)


def test_section_labels_sit_beside_their_own_level(sdata):
    fig = asc.pl.stack_3d(sdata, "Gene011", section_spacing=10.0, show=False)
    ax = fig.axes[0]
    aligned = sdata.tables["table"].obsm["spatial_aligned"]
    section = sdata.tables["table"].obs["section"].astype(str).to_numpy()
    for level, name in enumerate(["S1", "S2", "S3"]):
        label = next(t for t in ax.texts if t.get_text() == name)
        x, y, z = label._x, label._y, label._z
        assert z == level * 10.0  # at its own level, not the next one up
        pts = aligned[section == name]
        assert x > pts[:, 0].max() and pts[:, 1].min() <= y <= pts[:, 1].max()
    plt.close(fig)


def test_colour_bar_says_the_known_section_is_measured(sdata):
    fig = asc.pl.stack_3d(sdata, "Gene011", show=False)
    assert fig.axes[-1].get_ylabel() == "Gene011\n(measured on S2, imputed elsewhere)"
    plt.close(fig)
    fig = asc.pl.stack_3d(sdata, "Gene011", sections=["S1", "S3"], show=False)
    assert fig.axes[-1].get_ylabel() == "Gene011 (imputed)"
    plt.close(fig)


def test_interactive_view_is_a_plotly_figure_coloured_by_the_gene(sdata, tmp_path):
    pytest.importorskip("plotly")
    fig = asc.pl.stack_3d(sdata, "Gene011", interactive=True, section_spacing=10.0,
                          show=False)  # fmt: skip
    spots = next(t for t in fig.data if t.mode == "markers")
    table = sdata.tables["table"]
    order = np.argsort(table.obs["section"].cat.codes.to_numpy(), kind="stable")
    np.testing.assert_allclose(spots.marker.color, table.obsm["asign"]["Gene011"].to_numpy()[order])
    np.testing.assert_allclose(np.unique(spots.z), [0.0, 10.0, 20.0])
    assert spots.marker.colorbar.title.text == "Gene011<br>(measured on S2, imputed elsewhere)"
    labels = next(t for t in fig.data if t.mode == "text")
    assert list(labels.text) == ["S1", "S2", "S3"] and list(labels.z) == [0.0, 10.0, 20.0]
    assert fig.layout.scene.yaxis.autorange == "reversed"  # y down, as on the slide
    asc.pl.stack_3d(sdata, "Gene011", interactive=True, save=tmp_path / "s.html")
    assert "plotly" in (tmp_path / "s.html").read_text()[:5000].lower()
    with pytest.raises(ValueError, match="saved as HTML"):
        asc.pl.stack_3d(sdata, "Gene011", interactive=True, save=tmp_path / "s.png")
    categorical = asc.pl.stack_3d(sdata, "section", interactive=True, return_fig=True)
    assert [t.name for t in categorical.data if t.mode == "markers"] == ["S1", "S2", "S3"]


def test_interactive_is_shown_once_and_not_returned(sdata, monkeypatch):
    pytest.importorskip("plotly")
    import plotly.graph_objects as go

    shown = []
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    assert asc.pl.stack_3d(sdata, "Gene011", interactive=True) is None
    assert len(shown) == 1


def test_interactive_without_plotly_names_the_extra(sdata, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_plotly(name, *args, **kwargs):
        if name == "plotly" or name.startswith("plotly."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    with pytest.raises(ImportError, match=r'pip install "asign-sc\[interactive\]"'):
        asc.pl.stack_3d(sdata, "Gene011", interactive=True)
    fig = asc.pl.stack_3d(sdata, "Gene011", show=False)  # the static view still works
    assert fig.axes[0].name == "3d"
    plt.close(fig)
