"""benchmarks/stain.py: both variants scored and reported, on a tiny synthetic stack."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stain(load_benchmark):
    return load_benchmark("stain")


def test_both_variants_are_scored_and_compared(stain):
    base = stain.accuracy.synthetic_table()
    # stand-in for re-embedded images: the same features with a per-section shift
    features = base.copy()
    shift = base.obs["section"].cat.codes.to_numpy()[:, None].astype(np.float32)
    for key in [k for k in features.obsm if k.startswith("X_asign")]:
        features.obsm[key] = features.obsm[key] + (shift if features.obsm[key].ndim == 2 else 0)
    variants = dict(zip(stain.VARIANTS, (None, features), strict=True))
    rows = stain.accuracy.run_feature_variants(base, variants, ["S1"], [0], stain.METHODS)
    assert set(rows["variant"]) == set(stain.VARIANTS)
    assert set(rows["method"]) == set(stain.METHODS)
    summary = stain.accuracy.summarise(rows)
    args = Namespace(argv=["--known", "S1"], threads=1)
    text = stain.report(summary, args, 60.0)
    assert "`python benchmarks/stain.py --known S1`" in text
    asign = summary[summary["method"] == "asign"].set_index("variant")["pcc_gene_mean"]
    before, after = asign[stain.VARIANTS[0]], asign[stain.VARIANTS[1]]
    assert f"ASIGN {before:.3f} as scanned, {after:.3f} with stain normalisation" in text
