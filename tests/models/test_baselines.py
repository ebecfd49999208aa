"""Pure baseline functions: arrays in, arrays out."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from asign_sc import InvalidStackError
from asign_sc.models import _baselines


@pytest.fixture
def linear():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10))
    w = rng.normal(size=(10, 4))
    y = (x @ w + 0.1 * rng.normal(size=(120, 4))).astype(np.float32)
    known = np.zeros(120, dtype=bool)
    known[:80] = True
    return x, y, known


def refit_loo_error(x, y, known, alpha):
    """Mean squared leave-one-out error of ridge refitted without each known spot."""
    xk, yk = x[known], y[known].astype(float)
    errors = []
    for i in range(len(xk)):
        keep = np.arange(len(xk)) != i
        xm, ym = xk[keep].mean(0), yk[keep].mean(0)
        a, b = xk[keep] - xm, yk[keep] - ym
        coef = a.T @ np.linalg.solve(a @ a.T + alpha * np.eye(len(a)), b)  # dual form: any width
        errors.append(((xk[i] - xm) @ coef + ym - yk[i]) ** 2)
    return np.mean(errors)


def test_ridge_recovers_a_linear_map_and_keeps_known_values(linear):
    x, y, known = linear
    out = _baselines.ridge(x, y, known)
    np.testing.assert_array_equal(out.values[known], y[known])
    resid = out.values[~known] - y[~known]
    assert np.sqrt((resid**2).mean()) < 0.2
    assert out.params["alpha"] > 0
    assert (out.uncertainty[~known] > 0).all() and (out.uncertainty[known] == 0).all()


def test_ridge_leave_one_out_error_is_exact(linear):
    """The closed-form leave-one-out error equals refitting without each spot."""
    x, y, known = linear
    alpha_rel = np.array([1.0])
    out = _baselines.ridge(x, y, known, alphas=alpha_rel)
    alpha = out.params["alpha"]
    assert out.params["loo_mse"] == pytest.approx(refit_loo_error(x, y, known, alpha), rel=1e-6)


def test_ridge_leave_one_out_is_exact_with_more_features_than_spots():
    """Wide features (as image embeddings are): the intercept's leverage matters."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 80))
    y = (x[:, :3] @ rng.normal(size=(3, 2)) + rng.normal(size=(30, 2))).astype(np.float32)
    known = np.arange(30) < 20
    out = _baselines.ridge(x, y, known, alphas=np.array([1e-4]))
    alpha = out.params["alpha"]
    assert out.params["loo_mse"] == pytest.approx(refit_loo_error(x, y, known, alpha), rel=1e-4)


def test_ridge_chooses_strong_shrinkage_for_pure_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40))
    y = rng.normal(size=(60, 3)).astype(np.float32)
    known = np.arange(60) < 40
    out = _baselines.ridge(x, y, known)
    # with nothing to learn the prediction shrinks towards the known mean
    spread = out.values[~known].std(0)
    assert (spread < 0.5 * y[known].std(0)).all()


def test_label_spreading_clamps_known_and_smooths():
    # a chain 0-1-2-3-4, spot 0 known with value 1, seed 0 elsewhere
    rows = np.array([0, 1, 1, 2, 2, 3, 3, 4])
    cols = np.array([1, 0, 2, 1, 3, 2, 4, 3])
    graph = sp.csr_matrix((np.ones(8), (rows, cols)), shape=(5, 5))
    seed = np.zeros((5, 1), dtype=np.float32)
    seed[0] = 1.0
    known = np.array([True, False, False, False, False])
    out = _baselines.label_spreading(graph, seed, known, alpha=0.5, n_iterations=100)
    v = out.values.ravel()
    assert v[0] == 1.0
    assert np.all(np.diff(v) < 0) and v[-1] > 0  # decays along the chain
    none = _baselines.label_spreading(graph, seed, known, alpha=0.0)
    np.testing.assert_array_equal(none.values, seed)
    with pytest.raises(ValueError, match="alpha"):
        _baselines.label_spreading(graph, seed, known, alpha=1.0)


def test_label_spreading_equals_the_float64_iteration():
    """Torch's float32 CSR product gives the documented float64 iteration."""
    rng = np.random.default_rng(0)
    n = 300
    rows, cols = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    graph = sp.coo_matrix((rng.uniform(0.1, 1, 3000), (rows, cols)), shape=(n, n)).tocsr()
    seed = rng.normal(size=(n, 7)).astype(np.float32)
    known = rng.random(n) < 0.2
    out = _baselines.label_spreading(graph, seed, known, alpha=0.7, n_iterations=30).values
    dense = graph.toarray()
    np.fill_diagonal(dense, 0)
    degree = dense.sum(1, keepdims=True)
    walk = np.divide(dense, degree, out=np.zeros_like(dense), where=degree > 0)
    walk[degree[:, 0] == 0, degree[:, 0] == 0] = 1.0  # isolated spots keep their seed
    expected = seed.astype(np.float64)
    for _ in range(30):
        expected = 0.7 * walk @ expected + 0.3 * seed
        expected[known] = seed[known]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(out[known], seed[known])


def test_label_spreading_of_a_non_canonical_scipy_matrix():
    """Duplicates and unsorted columns (valid scipy CSR) spread as the canonical matrix."""
    indptr = np.array([0, 3, 4, 6])
    indices = np.array([2, 0, 2, 1, 1, 0])  # row 0: unsorted, column 2 twice
    data = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(3, 3))
    assert not matrix.has_canonical_format
    canonical = matrix.copy()
    canonical.sum_duplicates()
    seed = np.arange(6, dtype=np.float32).reshape(3, 2)
    known = np.array([True, False, False])
    out = _baselines.label_spreading(matrix, seed, known, n_iterations=5).values
    expected = _baselines.label_spreading(canonical, seed, known, n_iterations=5).values
    np.testing.assert_allclose(out, expected)
    assert not matrix.has_canonical_format  # the caller's matrix is left as it was


def test_baselines_need_a_known_spot(linear):
    x, y, _ = linear
    with pytest.raises(InvalidStackError, match="No known spot"):
        _baselines.ridge(x, y, np.zeros(len(y), dtype=bool))
