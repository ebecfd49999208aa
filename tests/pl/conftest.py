"""Shared plot-test helpers: a small imputed synthetic stack and image comparison."""

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


def _imputed_stack(method: str = "overlap", known: str = "S2"):
    """Synthetic 3-section stack, registered by the true maps, imputed from one section."""
    sdata, truth = asc.datasets.synthetic_stack(
        n_sections=3, n_spots_per_section=60, image_size=256, n_genes=20
    )
    asc.tl.register_sections(sdata, matrices=truth.transforms)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial_aligned"], truth.tissue_xy)
    asc.gr.build_3d_graph(sdata)
    asc.tl.impute(sdata, method=method, known_sections=[known], n_top_genes=15)
    return sdata


def _check_image(fig, name: str, tmp_path: Path, dpi: float) -> None:
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


@pytest.fixture(scope="session")
def imputed_stack():
    """Factory: ``imputed_stack(method="overlap", known="S2")``."""
    return _imputed_stack


@pytest.fixture(scope="session")
def check_image():
    """``check_image(fig, name, tmp_path, dpi)``: compare with ``baseline/<name>``."""
    return _check_image


@pytest.fixture(scope="session")
def evaluated_stack():
    """The imputed stack, evaluated on S1 and S3 against the mean and propagation baselines."""
    data = _imputed_stack()
    asc.tl.evaluate(data, sections=["S1", "S3"], baselines=("mean", "propagation"))
    return data
