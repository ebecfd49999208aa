"""Cohort fits (the paper's protocol): one object, several samples, one model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from asign_sc.tl import evaluate, fit_asign, impute

from .test_fit_impute import FAST, make_stack

pytestmark = pytest.mark.usefixtures("one_thread")


def cohort() -> ad.AnnData:
    """Two tumours ("P", "Q") of three sections each, in one AnnData with a sample column."""
    parts = []
    for name, seed in (("P", 0), ("Q", 1)):
        part = make_stack(seed=seed)
        part.obs_names = [f"{name}_{i}" for i in part.obs_names]
        part.obs["section"] = pd.Categorical([f"{name}{s}" for s in part.obs["section"]])
        part.obs["sample"] = name
        part.uns["spatial"] = {f"{name}{k}": v for k, v in part.uns["spatial"].items()}
        parts.append(part)
    graph = sp.block_diag([p.obsp["spatial3d_connectivities"] for p in parts], format="csr")
    spatial = {k: v for p in parts for k, v in p.uns["spatial"].items()}
    out = ad.concat(parts, merge="same")
    order = [f"{n}S{s}" for n in "PQ" for s in range(3)]
    out.obs["section"] = pd.Categorical(out.obs["section"].astype(str), categories=order)
    out.obsp["spatial3d_connectivities"] = graph
    out.uns["spatial"] = spatial
    return out


def test_one_model_for_a_cohort_imputes_each_sample_from_its_own_known_section():
    adata = cohort()
    # every section of the training sample P, one section of the target sample Q
    known = ["PS0", "PS1", "PS2", "QS0"]
    model = fit_asign(adata, known_sections=known, n_top_genes=10, device="cpu", **FAST)
    assert model.known_sections == known
    held_out = adata.obs.loc[model.run["validation_obs"][0]]
    assert set(held_out["section"]) <= set(known)  # from the measured sections of both samples
    assert set(held_out["sample"]) == {"P", "Q"}
    impute(adata, model)
    q = (adata.obs["sample"] == "Q").to_numpy()
    imputed = adata.obsm["asign"].to_numpy()
    assert np.isfinite(imputed).all()
    scores = evaluate(adata, sections=["QS1", "QS2"], baselines=("propagation",))
    overall = scores.query("section == 'all' and metric == 'pcc_gene'").set_index("method")
    assert overall.loc["asign", "value"] > 0.2
    # the propagation baseline never crosses samples: Q's unknown spots only see QS0
    edited = adata.copy()
    x = edited.X.toarray()
    x[(edited.obs["section"] == "PS1").to_numpy()] *= 3
    edited.X = sp.csr_matrix(x)
    genes = list(adata.obsm["asign"].columns)
    for data, key in ((adata, "a"), (edited, "b")):
        impute(
            data,
            method="propagation",
            known_sections=known,
            genes=genes,
            key_added=key,
            layer_added=key,
        )
    np.testing.assert_allclose(adata.obsm["a"].to_numpy()[q], edited.obsm["b"].to_numpy()[q])
