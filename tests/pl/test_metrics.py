"""pl.metrics: image comparison, what the panels show, errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.testing.compare import compare_images

import asign_sc as asc

BASELINE = Path(__file__).parent / "baseline"
#: compare_images RMS tolerance (0-255): absorbs font rendering, not a moved panel or spot.
TOLERANCE = 8.0


def imputed_stack(method: str = "overlap", known: str = "S2"):
    """Synthetic 3-section stack, aligned by the true maps, imputed from one section."""
    sdata, truth = asc.datasets.synthetic_stack(
        n_sections=3, n_spots_per_section=60, image_size=256, n_genes=20
    )
    sdata.tables["table"].obsm["spatial_aligned"] = np.asarray(truth.tissue_xy)
    asc.gr.build_3d_graph(sdata)
    asc.tl.impute(sdata, method=method, known_sections=[known], n_top_genes=15)
    return sdata


def check_image(fig, name: str, tmp_path: Path, dpi: float) -> None:
    actual = tmp_path / name
    fig.savefig(actual, dpi=dpi)
    plt.close(fig)
    expected = BASELINE / name
    if not expected.exists():  # first run: store the reference, then look at it
        expected.parent.mkdir(exist_ok=True)
        expected.write_bytes(actual.read_bytes())
        pytest.fail(f"No reference image yet; wrote {expected}. Check it and rerun.")
    result = compare_images(str(expected), str(actual), tol=TOLERANCE)
    assert result is None, result


@pytest.fixture(scope="module")
def sdata():
    data = imputed_stack()
    asc.tl.evaluate(data, sections=["S1", "S3"], baselines=("mean", "propagation"))
    return data


def test_metrics_matches_reference_image(sdata, tmp_path):
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
