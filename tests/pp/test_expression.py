from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from asign_sc import InvalidStackError
from asign_sc.pp import expression_targets, log_normalize, select_genes


def _stack(counts: np.ndarray, spatial: np.ndarray, sections: list[str]) -> ad.AnnData:
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(
            {"section": pd.Categorical(sections, categories=sorted(set(sections)))},
            index=[f"s{i}" for i in range(len(sections))],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(counts.shape[1])]),
    )
    adata.obsm["spatial"] = spatial.astype(float)
    adata.uns["spatial"] = {
        s: {"scalefactors": {"spot_diameter_fullres": 50.0}} for s in set(sections)
    }
    return adata


def test_log_normalize_matches_scanpy():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(20, 8)).astype(float)
    counts[3] = 0
    expected = ad.AnnData(counts.copy())
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    got = log_normalize(sp.csr_matrix(counts), counts.sum(1), target_sum=1e4)
    np.testing.assert_allclose(got, expected.X, rtol=1e-5)
    assert got.dtype == np.float32 and np.all(got[3] == 0)


def test_select_genes_top_mean_over_known_sections_only():
    counts = np.array([[1, 5, 0, 2], [1, 5, 0, 2], [9, 0, 50, 0], [9, 0, 50, 0]], dtype=float)
    adata = _stack(counts, np.zeros((4, 2)), ["A", "A", "B", "B"])
    assert select_genes(adata, known_sections=["A"], n_top_genes=2) == ["g1", "g3"]
    assert select_genes(adata, known_sections=["B"], n_top_genes=2) == ["g2", "g0"]
    with pytest.raises(InvalidStackError, match="not sections"):
        select_genes(adata, known_sections=["Z"])
    with pytest.raises(ValueError, match="exceeds"):
        select_genes(adata, known_sections=["A"], n_top_genes=10)


def test_select_genes_rejects_non_counts():
    counts = np.array([[1, -5], [1, 5]], dtype=float)
    adata = _stack(counts, np.zeros((2, 2)), ["A", "B"])
    with pytest.raises(InvalidStackError, match="negative"):
        select_genes(adata, known_sections=["A"], n_top_genes=1)


def test_region_and_global_targets_sum_counts_in_windows():
    # a row of 4 spots 100 px apart in section A; one far away in section B
    spatial = np.array([[0, 0], [100, 0], [200, 0], [300, 0], [0, 0]], dtype=float)
    counts = np.array([[1, 0], [2, 1], [3, 0], [4, 4], [7, 7]], dtype=float)
    adata = _stack(counts, spatial, ["A", "A", "A", "A", "B"])
    out = expression_targets(
        adata, genes=["g0"], sections=["A"], region_size=150, global_size=450, target_sum=10
    )
    assert list(out["spot"].index) == ["s0", "s1", "s2", "s3"]
    totals = counts[:4].sum(1)
    np.testing.assert_allclose(out["spot"]["g0"], np.log1p(counts[:4, 0] / totals * 10), rtol=1e-6)
    # region (side 150): itself and neighbours within 75 px -> only itself
    np.testing.assert_allclose(out["region"].to_numpy(), out["spot"].to_numpy())
    # global (side 450): neighbours within 225 px, same section only (B's spot excluded)
    members = [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3]]
    expected = [np.log1p(counts[m, 0].sum() / totals[m].sum() * 10) for m in members]
    np.testing.assert_allclose(out["global"]["g0"], expected, rtol=1e-6)
