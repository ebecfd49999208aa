"""tl.evaluate: metrics beside baselines, on a synthetic stack with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from asign_sc.gr import build_3d_graph
from asign_sc.pp._expression import log_normalize
from asign_sc.tl import evaluate, impute


@pytest.fixture
def imputed(synthetic_small):
    sdata, truth = synthetic_small
    table = sdata.tables["table"]
    table.obsm["spatial_aligned"] = truth.tissue_xy
    build_3d_graph(sdata)
    impute(sdata, method="propagation", known_sections=["S1"], n_top_genes=15)
    return sdata


def _set_prediction(table, values):
    genes = list(table.obsm["asign"].columns)
    table.obsm["asign"] = pd.DataFrame(values, index=table.obs_names, columns=genes)
    return genes


def test_perfect_prediction_scores_one_and_mean_profile_zero(imputed):
    table = imputed.tables["table"]
    genes = list(table.obsm["asign"].columns)
    counts = table.X.toarray()
    exact = log_normalize(counts[:, [table.var_names.get_loc(g) for g in genes]], counts.sum(1))
    _set_prediction(table, exact)
    scores = evaluate(imputed, sections=["S2", "S3"], baselines=("mean",))
    overall = scores[scores["section"] == "all"].set_index(["method", "metric"])["value"]
    assert overall["asign", "pcc_gene"] == pytest.approx(1.0)
    assert overall["asign", "pcc_spot"] == pytest.approx(1.0)
    assert overall["asign", "mse"] == pytest.approx(0.0, abs=1e-10)
    assert overall["mean", "pcc_gene"] == 0.0
    assert overall["mean", "pcc_spot"] > 0.3  # the paper's metric rewards the mean profile
    assert {"S2", "S3"} <= set(scores["section"])


def test_baselines_are_scored_beside_the_method_and_stored(imputed):
    table = imputed.tables["table"]
    before = table.obsm["asign"].copy()
    scores = evaluate(imputed, sections=["S2", "S3"], spearman=True)
    assert set(scores["method"]) == {"asign", "mean", "propagation"}
    assert set(scores["metric"]) == {
        "pcc_gene",
        "pcc_gene_top50",
        "pcc_spot",
        "mse",
        "mae",
        "spearman_gene",
    }
    overall = scores[scores["section"] == "all"].set_index(["method", "metric"])["value"]
    # the imputation under test *is* propagation here: identical scores
    assert overall["asign", "pcc_gene"] == pytest.approx(overall["propagation", "pcc_gene"])
    assert np.isfinite(overall["propagation", "pcc_gene"])
    # baselines never touch the user's data beyond the documented keys
    pd.testing.assert_frame_equal(table.obsm["asign"], before)
    assert "baseline" not in table.obsm
    column = table.var["asign_eval_pcc_propagation"]
    assert column.notna().sum() == before.shape[1]
    summary = table.uns["asign_eval"]["summary"]
    assert summary["asign"]["pcc_gene"] == pytest.approx(overall["asign", "pcc_gene"])


def test_known_section_is_flagged_and_constant_truth_counted(imputed, caplog):
    table = imputed.tables["table"]
    with caplog.at_level("WARNING"):
        evaluate(imputed, sections=["S1"], baselines=())
    assert "were known to the imputation" in caplog.text
    genes = list(table.obsm["asign"].columns)
    rows = (table.obs["section"] == "S2").to_numpy()
    X = table.X.tolil()
    X[np.flatnonzero(rows)[:, None], table.var_names.get_loc(genes[0])] = 0
    table.X = X.tocsr()
    scores = evaluate(imputed, sections=["S2"], baselines=())
    row = scores[(scores["metric"] == "pcc_gene")].iloc[0]
    assert row["n_genes_undefined"] == 1 and row["n_genes"] == len(genes)


def test_no_imputation(synthetic_small):
    sdata, _ = synthetic_small
    with pytest.raises(ValueError, match="No imputation under key 'asign'"):
        evaluate(sdata, sections=["S2"])


def test_errors(imputed):
    with pytest.raises(ValueError, match="Unknown baselines"):
        evaluate(imputed, sections=["S2"], baselines=("magic",))
    with pytest.raises(ValueError, match="were not imputed"):
        evaluate(imputed, sections=["S2"], genes=["not_a_gene"])


def test_top_variable_genes_are_chosen_on_the_known_section(imputed, monkeypatch):
    from asign_sc.tl import _evaluate

    monkeypatch.setattr(_evaluate, "N_VARIABLE", 3)
    table = imputed.tables["table"]
    scores = evaluate(imputed, sections=["S2", "S3"], baselines=())
    genes = list(table.obsm["asign"].columns)
    counts = table.X.toarray()
    known = (table.obs["section"] == "S1").to_numpy()
    cols = [table.var_names.get_loc(g) for g in genes]
    values = log_normalize(counts[known][:, cols], counts[known].sum(1))
    top = np.argsort(-values.var(0), kind="stable")[:3]
    per_gene = table.var.loc[genes, "asign_eval_pcc_asign"].to_numpy()
    row = scores.query("section == 'all' and metric == 'pcc_gene_top3'").iloc[0]
    assert row["value"] == pytest.approx(np.nanmean(per_gene[top]))
    assert row["n_genes"] == 3
