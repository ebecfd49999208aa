from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from asign_sc.gr import _ann
from asign_sc.gr._ann import (
    EXACT_MAX_WORK,
    approximate_feature_neighbors,
    choose_feature_search,
    search_threads,
)
from asign_sc.gr._search import feature_neighbors


def _sections(values: np.ndarray, n_sections: int) -> list[np.ndarray]:
    return np.array_split(np.arange(len(values)), n_sections)


def _recall(values: np.ndarray, sections: list[np.ndarray], found: dict, k: int) -> float:
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    hits = total = 0
    for i in range(len(sections)):
        for j in range(i + 1, len(sections)):
            exact_ij, exact_ji = feature_neighbors(unit[sections[i]], unit[sections[j]], k)
            for exact, got in ((exact_ij, found[i, j]), (exact_ji, found[j, i])):
                hits += sum(len(set(e) & set(g)) for e, g in zip(exact, got, strict=True))
                total += exact.size
    return hits / total


def test_choose_feature_search_by_the_largest_pair_of_sections():
    assert choose_feature_search("exact", [[10**6, 10**6]], 1280) == "exact"
    assert choose_feature_search("approximate", [[3, 4]], 2) == "approximate"
    # 180-700 spots per section with 1280-d features (her2st): exact.
    assert choose_feature_search("auto", [[700, 180, 650]], 1280) == "exact"
    assert choose_feature_search("auto", [[20_000] * 5], 64) == "approximate"
    edge = EXACT_MAX_WORK // 64
    assert choose_feature_search("auto", [[edge, 1], [1, 1]], 64) == "exact"
    assert choose_feature_search("auto", [[1, 1], [edge + 1, 1]], 64) == "approximate"


# 32-d: searched as they are; 200-d: on 64 principal axes.
@pytest.mark.parametrize("dim", [32, 200])
def test_approximate_neighbors_recall_the_exact_ones(dim, clustered_features):
    values = clustered_features(4000, dim, seed=dim)
    norms = np.linalg.norm(values.astype(float), axis=1)
    sections = _sections(values, 4)
    found = approximate_feature_neighbors(values, norms, sections, 12)
    assert set(found) == {(i, j) for i in range(4) for j in range(4) if i != j}
    assert all(v.shape == (1000, 12) for v in found.values())
    assert all((v >= 0).all() and (v < 1000).all() for v in found.values())
    assert _recall(values, sections, found, 12) >= 0.99  # 0.9998 (32-d), 0.9999 (200-d)


def test_approximate_neighbors_are_deterministic(clustered_features):
    values = clustered_features(1500, 100, seed=3)
    norms = np.linalg.norm(values.astype(float), axis=1)
    sections = _sections(values, 3)
    first = approximate_feature_neighbors(values, norms, sections, 5)
    with search_threads(2):
        second = approximate_feature_neighbors(values, norms, sections, 5)
    for key, value in first.items():
        np.testing.assert_array_equal(np.sort(value, axis=1), np.sort(second[key], axis=1))


def test_approximate_neighbors_with_k_larger_than_a_section(clustered_features):
    values = clustered_features(13, 8, seed=4)
    norms = np.linalg.norm(values.astype(float), axis=1)
    sections = [np.arange(3), np.arange(3, 13)]
    found = approximate_feature_neighbors(values, norms, sections, 5)
    assert found[0, 1].shape == (3, 5) and found[1, 0].shape == (10, 3)
    # A small section is searched whole: every spot finds all three of section 0.
    assert all(set(row) == {0, 1, 2} for row in found[1, 0])
    assert all(len(set(row)) == 5 for row in found[0, 1])


@pytest.mark.parametrize("n", [30, 500])  # fewer spots than dimensions, and more
def test_principal_axes_are_the_leading_singular_vectors(n):
    rng = np.random.default_rng(6)
    values = (rng.normal(size=(n, 100)) * np.linspace(3, 0.1, 100)).astype(np.float32)
    norms = np.linalg.norm(values.astype(float), axis=1)
    axes = _ann._principal_axes(values, norms, np.arange(n), 8, seed=0)
    assert axes.shape == (8, 100) and axes.dtype == np.float32
    np.testing.assert_allclose(axes @ axes.T, np.eye(8), atol=1e-5)
    _, _, vt = np.linalg.svd(values / norms[:, None], full_matrices=False)
    np.testing.assert_allclose(np.abs(axes @ vt[:8].T), np.eye(8), atol=1e-4)
    assert _ann._principal_axes(values[:, :8], norms, np.arange(n), 8, seed=0) is None


def test_search_threads_restores_the_settings():
    from threadpoolctl import threadpool_info

    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    with search_threads(1):
        assert faiss.omp_get_max_threads() == 1 and torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert faiss.omp_get_max_threads() == faiss_before
    assert torch.get_num_threads() == torch_before
    with search_threads(None):
        assert faiss.omp_get_max_threads() == faiss_before
