"""pl.metrics: image comparison, what the panels show, errors."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc


@pytest.fixture(scope="module")
def sdata(evaluated_stack):
    return evaluated_stack


def test_metrics_matches_reference_image(sdata, tmp_path, check_image):
    fig = asc.pl.metrics(sdata, figsize=(10, 3), dpi=50, show=False)
    check_image(fig, "metrics.png", tmp_path, dpi=50)


def test_panels_show_per_gene_pcc_of_the_evaluation(sdata):
    var = sdata.tables["table"].var
    fig = asc.pl.metrics(sdata, n_genes=3, show=False)
    # the mean profile's per-gene PCC is the same for every gene: no scatter for it
    mean = var["asign_eval_pcc_mean"].dropna()
    assert mean.nunique() <= 1
    assert len(fig.axes) == 3  # propagation scatter + distribution + best/worst
    method, baseline = var["asign_eval_pcc_asign"], var["asign_eval_pcc_propagation"]
    scored = method.notna()
    share = (method[scored] > baseline[scored]).mean()
    scatter = fig.axes[0]
    assert scatter.get_title() == f"vs propagation: better on {share:.0%}"
    # the colours of the points are named in a legend
    assert [t.get_text() for t in scatter.get_legend().get_texts()] == ["better", "not better"]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["asign", "mean", "propagation"]
    bars = fig.axes[-1]
    labels = [t.get_text() for t in bars.get_yticklabels()]
    ranked = method[scored].sort_values(ascending=False)
    assert labels == [*ranked.index[:3], *ranked.index[-3:]]
    assert all(t.get_fontsize() >= 8 for t in bars.get_yticklabels())  # readable gene names
    plt.close(fig)


def test_draws_into_given_axes(sdata):
    fig, axes = plt.subplots(1, 3)
    assert asc.pl.metrics(sdata, ax=axes, show=False) is fig
    assert all(ax.has_data() for ax in axes)
    with pytest.raises(ValueError, match="ax has 2 axes but this figure has 3"):
        asc.pl.metrics(sdata, ax=axes[:2], show=False)
    plt.close(fig)


def test_errors(sdata):
    with pytest.raises(KeyError, match=r"asign_sc\.tl\.evaluate"):
        asc.pl.metrics(sdata, key="nothing", show=False)
    with pytest.raises(ValueError, match="were not evaluated"):
        asc.pl.metrics(sdata, baselines=["similarity"], show=False)
