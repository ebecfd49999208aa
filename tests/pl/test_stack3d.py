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
