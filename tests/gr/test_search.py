from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from asign_sc.gr import _search
from asign_sc.gr._search import (
    cosine_top_k_per_row,
    dot32,
    feature_neighbors,
    overlap_pairs,
    rowwise_dot,
    top_k_per_row,
    within_neighbors,
)


def _unit(rng, n, dim):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("small", "block"),
    [(1 << 20, 1 << 24), (0, 7), (0, 64), (0, 1 << 24)],  # numpy; torch: many, few, one block
)
def test_feature_neighbors_is_exact_in_both_directions(monkeypatch, small, block):
    monkeypatch.setattr(_search, "_SMALL_ELEMENTS", small)
    monkeypatch.setattr(_search, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 37, 6), _unit(rng, 23, 6)
    b_of_a, a_of_b = feature_neighbors(a, b, 5)
    sim = a @ b.T
    assert b_of_a.shape == (37, 5) and a_of_b.shape == (23, 5)
    for i in range(37):
        assert set(b_of_a[i]) == set(np.argsort(-sim[i])[:5])
    for j in range(23):
        assert set(a_of_b[j]) == set(np.argsort(-sim[:, j])[:5])


@pytest.mark.parametrize("small", [0, 1 << 20])
def test_feature_neighbors_with_k_larger_than_a_section(monkeypatch, small):
    monkeypatch.setattr(_search, "_SMALL_ELEMENTS", small)
    rng = np.random.default_rng(1)
    b_of_a, a_of_b = feature_neighbors(_unit(rng, 3, 4), _unit(rng, 10, 4), 5)
    assert b_of_a.shape == (3, 5) and a_of_b.shape == (10, 3)
    assert all(set(row) == {0, 1, 2} for row in a_of_b)


def test_within_neighbors_excludes_self_even_with_duplicates():
    xy = np.array([[0.0, 0.0]] * 4 + [[10.0, 0.0], [20.0, 0.0]])
    rows, cols, dist = within_neighbors(cKDTree(xy), 2)
    assert np.all(rows != cols)
    assert np.bincount(rows).tolist() == [2] * 6
    assert np.all(dist[rows < 4] == 0)  # coincident spots neighbour each other
    rows, cols, _ = within_neighbors(cKDTree(xy[:1]), 8)
    assert rows.size == 0 and cols.size == 0


def test_overlap_pairs_keeps_coincident_spots_and_the_bound():
    a = np.array([[0.0, 0.0], [100.0, 0.0]])
    b = np.array([[0.0, 0.0], [50.0, 0.0], [160.0, 0.0]])
    rows, cols, dist = overlap_pairs(cKDTree(a), cKDTree(b), 55.0)
    got = sorted(zip(rows.tolist(), cols.tolist(), dist.tolist(), strict=True))
    assert got == [(0, 0, 0.0), (0, 1, 50.0), (1, 1, 50.0)]


def test_top_k_per_row_orders_by_weight_then_column():
    rows = np.array([0, 0, 0, 1, 1, 2])
    cols = np.array([5, 3, 4, 1, 2, 0])
    weights = np.array([0.5, 0.9, 0.5, 0.1, 0.2, 1.0])
    keep = top_k_per_row(rows, cols, weights, 2)
    assert list(zip(rows[keep].tolist(), cols[keep].tolist(), strict=True)) == [
        (0, 3),
        (0, 4),
        (1, 2),
        (1, 1),
        (2, 0),
    ]
    assert top_k_per_row(rows[:0], cols[:0], weights[:0], 3).size == 0


def test_rowwise_dot_in_blocks(monkeypatch):
    monkeypatch.setattr(_search, "_GATHER_ELEMENTS", 10)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    rows, cols = rng.integers(0, 20, 50), rng.integers(0, 30, 50)
    got = rowwise_dot(a, b, rows, cols)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, (a[rows].astype(float) * b[cols]).sum(1), rtol=1e-12)


def test_top_k_per_row_unsorted_input_and_long_rows_agree_with_a_global_sort():
    rng = np.random.default_rng(3)
    # Mostly short rows and one very long one (takes the global-sort path).
    rows = np.r_[rng.integers(0, 50, 400), np.full(5000, 7)]
    cols = rng.permutation(len(rows))
    weights = rng.integers(0, 5, len(rows)).astype(float)  # many ties
    for sl in (slice(0, 400), slice(None)):
        r, c, w = rows[sl], cols[sl], weights[sl]
        keep = top_k_per_row(r, c, w, 3)
        expected = np.lexsort((c, -w, r))
        rank = np.arange(len(r)) - np.searchsorted(r[expected], r[expected])
        assert keep.tolist() == expected[rank < 3].tolist()


def test_dot32_is_within_its_error_bound():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(50, 300)).astype(np.float32)
    rows, cols = rng.integers(0, 50, 200), rng.integers(0, 50, 200)
    got = dot32(values, rows, cols)
    exact = (values[rows].astype(float) * values[cols]).sum(1)
    bound = (
        300 * 2.0**-24 * np.linalg.norm(values[rows], axis=1) * np.linalg.norm(values[cols], axis=1)
    )
    assert got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound) and np.any(got != exact)
    assert dot32(values, rows[:0], cols[:0]).size == 0


def test_cosine_top_k_per_row_is_the_float64_ranking_despite_near_ties():
    rng = np.random.default_rng(5)
    n_queries, n_candidates, dim = 10, 30, 256
    # Candidates are near-copies of their query: cosines within 1e-6 of 1, which float32
    # does not resolve (a float32 ranking differs in 40 of the 60 edges).
    queries = rng.normal(size=(n_queries, dim))
    offsets = rng.uniform(1e-4, 1e-3, (n_queries * n_candidates, 1))
    near = np.repeat(queries, n_candidates, axis=0) + offsets * rng.normal(size=(len(offsets), dim))
    values = np.concatenate([queries, near]).astype(np.float32)
    norms = np.sqrt((values.astype(float) ** 2).sum(1))
    rows = np.repeat(np.arange(n_queries), n_candidates)
    cols = n_queries + np.arange(len(rows))
    iou = np.where(rng.random(len(rows)) < 0.1, 1e-7, 0.0)
    keep, weights = cosine_top_k_per_row(values, norms, rows, cols, iou, 6)
    cosine = (values[rows].astype(float) * values[cols]).sum(1) / (norms[rows] * norms[cols])
    exact = iou + np.maximum(cosine, 0)
    expected = top_k_per_row(rows, cols, exact, 6)
    assert keep.tolist() == expected.tolist()
    np.testing.assert_allclose(weights, exact[expected], rtol=0, atol=1e-12)
    float32 = iou + dot32(values, rows, cols) / (norms[rows] * norms[cols])
    assert set(top_k_per_row(rows, cols, float32, 6)) != set(expected)
    empty = cosine_top_k_per_row(values, norms, rows[:0], cols[:0], iou[:0], 6)
    assert empty[0].size == 0 and empty[1].size == 0


def test_cosine_top_k_per_row_leaves_out_zero_weights():
    values = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    norms = np.sqrt((values.astype(float) ** 2).sum(1))
    rows, cols = np.array([0, 0, 0]), np.array([1, 2, 3])
    keep, weights = cosine_top_k_per_row(values, norms, rows, cols, np.zeros(3), 3)
    assert cols[keep].tolist() == [3]  # orthogonal and opposite features weigh 0
    np.testing.assert_allclose(weights, [np.sqrt(0.5)])
