"""Metric functions against scipy/numpy references on random data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from asign_sc.tl._metrics import (
    mae_per_gene,
    mse_per_gene,
    pcc_per_gene,
    pcc_per_spot,
    spearman_per_gene,
)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, size=(40, 7))
    pred = truth + rng.normal(0, 1.0, size=truth.shape)
    return truth, pred


def test_pcc_matches_scipy(pair):
    truth, pred = pair
    np.testing.assert_allclose(
        pcc_per_gene(truth, pred), [stats.pearsonr(truth[:, g], pred[:, g])[0] for g in range(7)]
    )
    np.testing.assert_allclose(
        pcc_per_spot(truth, pred), [stats.pearsonr(truth[i], pred[i])[0] for i in range(40)]
    )


def test_spearman_matches_scipy(pair):
    truth, pred = pair
    expected = [stats.spearmanr(truth[:, g], pred[:, g])[0] for g in range(7)]
    np.testing.assert_allclose(spearman_per_gene(truth, pred), expected)


def test_errors_match_numpy(pair):
    truth, pred = pair
    np.testing.assert_allclose(mse_per_gene(truth, pred), ((truth - pred) ** 2).mean(0))
    np.testing.assert_allclose(mae_per_gene(truth, pred), np.abs(truth - pred).mean(0))


def test_constant_vectors_give_nan_not_zero(pair):
    truth, pred = pair
    pred = pred.copy()
    pred[:, 2] = 3.0  # a constant prediction (e.g. the mean profile) has no correlation
    truth = truth.copy()
    truth[:, 4] = 1.0 + 1e-15 * np.arange(40)  # constant up to rounding
    pcc = pcc_per_gene(truth, pred)
    assert np.isnan(pcc[2]) and np.isnan(pcc[4])
    assert np.isfinite(np.delete(pcc, [2, 4])).all()


def test_perfect_prediction_scores_one(pair):
    truth, _ = pair
    np.testing.assert_allclose(pcc_per_gene(truth, truth), 1.0)
    np.testing.assert_allclose(pcc_per_gene(truth, 2 * truth + 1), 1.0)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        pcc_per_gene(np.zeros((3, 2)), np.zeros((2, 3)))
