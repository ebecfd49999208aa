"""benchmarks/encoders.py: every encoder setting scored and reported, on a tiny synthetic stack."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders(load_benchmark):
    return load_benchmark("encoders")


def test_settings_are_scored_and_reported(encoders):
    base = encoders.accuracy.synthetic_table()
    # stand-in for another encoder: the same features, scaled per dimension
    other = base.copy()
    scale = np.linspace(0.5, 2.0, other.obsm["X_asign_spot"].shape[1], dtype=np.float32)
    for key in [k for k in other.obsm if k.startswith("X_asign")]:
        other.obsm[key] = other.obsm[key] * scale
    names = [encoders.variant_name("efficientnet_lite0", "none"), "efficientnet_lite2, Macenko"]
    assert names[1] == encoders.variant_name("efficientnet_lite2", "macenko")
    lite0 = "efficientnet_lite0"
    assert encoders.variant_name(lite0, "none", "head") == f"{lite0}, last map (head)"
    assert encoders.variant_name(lite0, "none", "5,6") == f"{lite0}, stages 5,6"
    rows = encoders.accuracy.run_feature_variants(
        base, dict(zip(names, (None, other), strict=True)), ["S1"], [0], encoders.METHODS
    )
    assert set(rows["variant"]) == set(names) and set(rows["method"]) == set(encoders.METHODS)
    summary = encoders.accuracy.summarise(rows)
    args = Namespace(argv=["--known", "S1"], threads=1)
    text = encoders.report(summary, args, 60)
    assert "`python benchmarks/encoders.py --known S1`" in text
    assert "| S1 | efficientnet_lite2, Macenko | ASIGN |" in text
    asign = summary[summary["method"] == "asign"].set_index("variant")["pcc_gene_mean"]
    assert f"efficientnet_lite0 {asign[names[0]]:.3f}" in text
