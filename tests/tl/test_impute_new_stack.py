"""impute(method="network") on a stack of another patient: images and graph only."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from asign_sc import InvalidStackError
from asign_sc.tl import evaluate, fit_asign, impute

from .test_fit_impute import FAST, make_stack, per_gene_pcc, truth_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    adata = make_stack(seed=0)
    return fit_asign(adata, known_sections=["S0"], n_top_genes=20, device="cpu", **FAST)


def _other_patient(seed: int):
    """A stack whose section names the model never saw (the training tissue, renamed).

    ``make_stack``'s seed also draws the gene programs, so only seed 0 matches the model's
    tissue; renaming is what makes the stack "new" to :func:`impute`.
    """
    adata = make_stack(seed=seed)
    names = adata.obs["section"].astype(str).str.replace("S", "P", regex=False)
    adata.obs["section"] = pd.Categorical(names, categories=sorted(set(names)))
    adata.uns["spatial"] = {
        k.replace("S", "P"): v for k, v in adata.uns["spatial"].items()
    }
    return adata


def test_network_imputes_a_new_stack_without_known_sections(model, caplog):
    new = _other_patient(seed=0)
    with caplog.at_level("INFO", logger="asign_sc.tl._impute"):
        impute(new, model, method="network", device="cpu")
    assert "from images alone" in caplog.text
    pred = new.obsm["asign"]
    assert list(pred.columns) == model.genes
    assert np.isfinite(pred.to_numpy()).all()
    # Image-only prediction of tissue like the training one tracks the truth.
    assert per_gene_pcc(pred.to_numpy(), truth_of(new, model.genes)) > 0.3
    assert len(new.uns["asign"]["impute"]["known_sections"]) == 0


def test_explicit_empty_known_sections_gives_the_same_network_prediction(model):
    a, b = _other_patient(seed=0), _other_patient(seed=0)
    impute(a, model, method="network", device="cpu")
    impute(b, model, method="network", known_sections=[], device="cpu")
    np.testing.assert_allclose(a.obsm["asign"].to_numpy(), b.obsm["asign"].to_numpy())


def test_asign_without_known_sections_says_what_to_do(model):
    new = _other_patient(seed=0)
    with pytest.raises(InvalidStackError, match="method='network'"):
        impute(new, model, method="asign", known_sections=[], device="cpu")
    with pytest.raises(InvalidStackError, match="not sections of this stack"):
        impute(new, model, method="asign", device="cpu")


def test_evaluate_scores_an_image_only_imputation_without_baselines(model):
    new = _other_patient(seed=0)
    impute(new, model, method="network", device="cpu")
    with pytest.raises(ValueError, match=re.escape("or baselines=()")):
        evaluate(new, sections=["P1", "P2"])
    scores = evaluate(new, sections=["P1", "P2"], baselines=())
    assert scores["method"].nunique() == 1  # the imputation only, no baseline rows
    overall = scores.query("section == 'all' and metric == 'pcc_gene'")["value"].item()
    assert overall > 0.3
