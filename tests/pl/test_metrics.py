"""pl.metrics: image comparison, what the panels show, errors."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc


@pytest.fixture(scope="module")
def sdata(imputed_stack):
    data = imputed_stack()
    asc.tl.evaluate(data, sections=["S1", "S3"], baselines=("mean", "propagation"))
    return data


def test_metrics_matches_reference_image(sdata, tmp_path, check_image):
    fig = asc.pl.metrics(sdata, figsize=(10, 3), dpi=50, show=False)
    check_image(fig, "metrics.png", tmp_path, dpi=50)


def test_panels_show_per_gene_pcc_of_the_evaluation(sdata):
    var = sdata.tables["table"].var
    fig = asc.pl.metrics(sdata, n_genes=3, show=False)
    assert len(fig.axes) == 4  # two baselines + distribution + best/worst
    method, baseline = var["asign_eval_pcc_asign"], var["asign_eval_pcc_propagation"]
    scored = method.notna()
    share = (method[scored] > baseline[scored]).mean()
    assert fig.axes[1].get_title() == f"vs propagation: better on {share:.0%}"
    bars = fig.axes[-1]
    labels = [t.get_text() for t in bars.get_yticklabels()]
    ranked = method[scored].sort_values(ascending=False)
    assert labels == [*ranked.index[:3], *ranked.index[-3:]]
    plt.close(fig)


def test_errors(sdata):
    with pytest.raises(KeyError, match=r"asign_sc\.tl\.evaluate"):
        asc.pl.metrics(sdata, key="nothing", show=False)
    with pytest.raises(ValueError, match="were not evaluated"):
        asc.pl.metrics(sdata, baselines=["similarity"], show=False)
