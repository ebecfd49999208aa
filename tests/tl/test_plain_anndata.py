"""A plain AnnData (section column + obsm['spatial']) goes wherever no image is needed."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from asign_sc import InvalidStackError
from asign_sc.gr import build_3d_graph
from asign_sc.pp._expression import log_normalize
from asign_sc.tl import evaluate, impute


def plain_stack(n_sections: int = 3, side: int = 10, n_genes: int = 12, seed: int = 0):
    """Counts driven by a smooth field shared across sections; no uns['spatial'], no image."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 200.0
    centres = rng.uniform(0, side * 200, size=(4, 2))
    loadings = rng.normal(size=(4, n_genes))
    xy, counts, sections = [], [], []
    for s in range(n_sections):
        pts = grid + rng.normal(scale=10, size=grid.shape)
        field = np.exp(-((pts[:, None] - centres[None]) ** 2).sum(-1) / (2 * 400.0**2))
        counts.append(rng.poisson(np.exp(1.5 + field @ loadings)))
        xy.append(pts)
        sections += [f"L{s}"] * len(pts)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.concatenate(counts).astype(np.float32)),
        obs=pd.DataFrame(
            {"section": pd.Categorical(sections, categories=[f"L{s}" for s in range(n_sections)])},
            index=[f"spot{i}" for i in range(len(sections))],
        ),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = np.concatenate(xy)
    return adata


def test_graph_propagation_and_evaluation_on_a_plain_anndata():
    adata = plain_stack()
    with pytest.raises(InvalidStackError, match="spot_radius="):
        build_3d_graph(adata, spatial_key="spatial")
    build_3d_graph(adata, spatial_key="spatial", spot_radius=50.0)
    impute(adata, method="propagation", known_sections=["L0"], n_top_genes=8)
    scores = evaluate(adata, sections=["L1", "L2"])
    overall = scores.query("section == 'all' and metric == 'pcc_gene'").set_index("method")
    assert set(overall.index) == {"asign", "mean", "propagation"}
    assert overall.loc["asign", "value"] == pytest.approx(overall.loc["propagation", "value"])
    assert overall.loc["asign", "value"] > 0.3  # the field is shared across sections
    # overlap needs aligned coordinates and, on a plain AnnData, only the spot centres
    impute(
        adata,
        method="overlap",
        known_sections=["L0"],
        spatial_key="spatial",
        n_top_genes=8,
        key_added="nearest",
        layer_added="nearest",
    )
    assert np.isfinite(adata.obsm["nearest"].to_numpy()).all()


def test_evaluate_scores_any_layer_against_the_counts():
    adata = plain_stack(seed=1)
    counts = adata.X.toarray()
    exact = log_normalize(counts, counts.sum(1))
    adata.layers["perfect"] = sp.csr_matrix(exact)
    noisy = exact + np.random.default_rng(0).normal(scale=2.0, size=exact.shape)
    adata.layers["noisy"] = noisy
    perfect = evaluate(adata, sections=["L1"], layer="perfect", baselines=())
    value = perfect.query("metric == 'pcc_gene'")["value"].item()
    assert value == pytest.approx(1.0)
    worse = evaluate(
        adata, sections=["L1"], layer="noisy", known_sections=["L0"], baselines=("mean",)
    )
    assert worse.query("metric == 'pcc_gene' and method == 'noisy'")["value"].item() < 0.9
    assert set(worse["method"]) == {"noisy", "mean"}
    assert "asign_eval_pcc_noisy" in adata.var
    with pytest.raises(ValueError, match="known_sections="):
        evaluate(adata, sections=["L1"], layer="noisy")
    with pytest.raises(ValueError, match="layers\\['missing'\\] is missing"):
        evaluate(adata, sections=["L1"], layer="missing", baselines=())


def test_evaluate_refuses_an_all_zero_section():
    adata = plain_stack(seed=2)
    adata.layers["pred"] = sp.csr_matrix(log_normalize(adata.X.toarray(), adata.X.sum(1).A1))
    x = adata.X.toarray()
    x[(adata.obs.section == "L2").to_numpy()] = 0
    adata.X = sp.csr_matrix(x)
    with pytest.raises(InvalidStackError, match="all zero in section"):
        evaluate(adata, sections=["L1", "L2"], layer="pred", baselines=())
