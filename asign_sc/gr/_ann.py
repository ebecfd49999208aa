"""Approximate feature-space candidate search for the 3D graph (faiss HNSW on principal axes).

The exact search (:func:`asign_sc.gr._search.feature_neighbors`) costs ``n_a * n_b * dim``
per pair of sections, the square of the stack. Here every section gets one HNSW graph
(:class:`faiss.IndexHNSWFlat`, inner product) over its spots' unit features projected on
the stack's leading principal axes; each spot's shortlist in every other section comes
from that graph, and the shortlist is re-ranked by the exact cosine on the full features.
Build and search grow as ``n log n``; memory is linear in the number of spots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from itertools import combinations
from typing import Literal

import numpy as np

from asign_sc.gr._search import dot32

__all__ = [
    "EXACT_MAX_WORK",
    "approximate_feature_neighbors",
    "approximate_search_settings",
    "choose_feature_search",
    "faiss_threads",
    "search_threads",
]

#: ``"auto"`` searches exactly while ``n_a * n_b * dim`` (multiply-adds of the exact search)
#: stays at most this for every pair of sections of a stack: two sections of about 1,800
#: spots with 1280-d features, or 8,000 spots with 64-d ones (a fraction of a second each).
EXACT_MAX_WORK = 1 << 32
#: Dimension of the search space: the leading principal axes of the unit features (features
#: with at most this many dimensions are searched as they are).
SEARCH_DIM = 64
#: Shortlist of the approximate search per spot and other section, as a multiple of the
#: number of candidates kept after re-ranking by exact cosine.
SHORTLIST_FACTOR = 2
#: Spots (a seeded random sample of the stack) from which the principal axes are found.
AXES_SAMPLE = 10_000
#: HNSW graph degree, breadth while building it and least breadth of a search. Chosen on
#: the benchmark stacks and clustered test features: M = 16 builds 1.6x faster than 32 at
#: the same recall of the final edges; faiss' default efSearch (16) misses more.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 48
#: Rows of the features projected at a time (bounds the temporary unit copy).
_PROJECT_ROWS = 8192


def choose_feature_search(
    mode: Literal["auto", "exact", "approximate"], sizes: Sequence[Sequence[int]], dim: int
) -> Literal["exact", "approximate"]:
    """Resolve ``"auto"`` from the largest pair of sections of any stack.

    Parameters
    ----------
    mode
        ``"auto"``, ``"exact"`` or ``"approximate"``.
    sizes
        Number of spots of each section, one list per stack (sample).
    dim
        Feature dimension.

    Returns
    -------
    ``"exact"`` or ``"approximate"``.
    """
    if mode != "auto":
        return mode
    largest = max(
        (a * b for stack in sizes for a, b in combinations(stack, 2)),
        default=0,
    )
    return "exact" if largest * dim <= EXACT_MAX_WORK else "approximate"


def approximate_search_settings() -> dict[str, object]:
    """The settings of :func:`approximate_feature_neighbors`, to record with a result."""
    return {
        "index": "faiss.IndexHNSWFlat (inner product)",
        "M": HNSW_M,
        "ef_construction": HNSW_EF_CONSTRUCTION,
        "ef_search": f"max({HNSW_EF_SEARCH}, shortlist)",
        "search_dim": SEARCH_DIM,
        "axes_sample": AXES_SAMPLE,
        "shortlist": f"{SHORTLIST_FACTOR} * across_candidates, re-ranked by exact cosine",
    }


@contextlib.contextmanager
def faiss_threads(n_jobs: int | None) -> Iterator[None]:
    """Run faiss with ``n_jobs`` OpenMP threads (``None``: as set) and restore the setting."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_jobs or before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextlib.contextmanager
def search_threads(n_jobs: int | None) -> Iterator[None]:
    """``n_jobs`` threads for BLAS, OpenMP (faiss) and torch during the block; ``None``: as set."""
    if n_jobs is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n_jobs)
    try:
        with threadpool_limits(limits=n_jobs), faiss_threads(n_jobs):
            yield
    finally:
        torch.set_num_threads(before)


def approximate_feature_neighbors(
    values: np.ndarray,
    norms: np.ndarray,
    sections: Sequence[np.ndarray],
    k: int,
    *,
    seed: int = 0,
) -> dict[tuple[int, int], np.ndarray]:
    """About the ``k`` most cosine-similar spots of every other section, for every spot.

    Parameters
    ----------
    values
        Features of all spots of the table, float32 ``(n_obs, dim)``, C-contiguous.
    norms
        Their L2 norms (all positive).
    sections
        Table rows of each section of one stack.
    k
        Candidates per spot and other section.
    seed
        Seed of the sample from which the principal axes are found.

    Returns
    -------
    ``{(i, j): positions}``: for every ordered pair of sections, ``(n_i, min(k, n_j))``
    positions in section ``j``, ``-1`` where the search found fewer.

    Notes
    -----
    The shortlist of ``SHORTLIST_FACTOR * k`` spots per section comes from an HNSW graph
    of the section; the graph is built with one thread so that it, and the result, are
    the same for the same input (a multi-threaded build inserts in a varying order). The
    searches and the re-ranking use the threads faiss is set to (:func:`faiss_threads`).
    """
    import faiss

    axes = _principal_axes(values, norms, np.concatenate(sections), SEARCH_DIM, seed)
    vectors = [_search_vectors(values, norms, rows, axes) for rows in sections]
    indices = []
    for v in vectors:
        index = faiss.IndexHNSWFlat(v.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        with faiss_threads(1):
            index.add(v)
        indices.append(index)
    out: dict[tuple[int, int], np.ndarray] = {}
    for i, rows_i in enumerate(sections):
        for j, rows_j in enumerate(sections):
            if i == j:
                continue
            keep = min(k, len(rows_j))
            width = min(SHORTLIST_FACTOR * keep, len(rows_j))
            if keep == 0 or len(rows_i) == 0:
                out[i, j] = np.empty((len(rows_i), keep), dtype=np.int64)
                continue
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, width))
            _, shortlist = indices[j].search(vectors[i], width, params=params)
            out[i, j] = _rerank(values, norms, rows_i, rows_j, shortlist, keep)
    return out


def _principal_axes(
    values: np.ndarray, norms: np.ndarray, rows: np.ndarray, n_axes: int, seed: int
) -> np.ndarray | None:
    """Leading right singular vectors ``(n_axes, dim)`` of the unit features (not centred).

    Not centred, so that inner products of the projections approximate the cosines
    themselves (the best rank-``n_axes`` approximation of the Gram matrix of the sample).
    Found exactly from the eigenvectors of the sample's smaller Gram matrix (no random
    start, so the axes depend on the seeded sample only). ``None`` when the features have
    at most ``n_axes`` dimensions.
    """
    if values.shape[1] <= n_axes:
        return None
    from scipy.linalg import eigh

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, min(len(rows), AXES_SAMPLE), replace=False))
    unit = values[sample] / norms[sample, None].astype(np.float32)
    n, dim = unit.shape
    n_axes = min(n_axes, n)
    wide = dim > n  # eigenvectors of the n x n Gram matrix give the axes as unit.T @ u
    gram = (unit @ unit.T if wide else unit.T @ unit).astype(float)
    size = gram.shape[0]
    eigenvalues, vectors = eigh(gram, subset_by_index=[size - n_axes, size - 1])
    axes = (unit.T @ vectors / np.sqrt(np.maximum(eigenvalues, 1e-30))).T if wide else vectors.T
    return np.ascontiguousarray(axes[::-1], dtype=np.float32)


def _search_vectors(
    values: np.ndarray, norms: np.ndarray, rows: np.ndarray, axes: np.ndarray | None
) -> np.ndarray:
    """Unit features of ``rows`` projected on ``axes`` and normalised again, float32."""
    dim = values.shape[1] if axes is None else axes.shape[0]
    out = np.empty((len(rows), dim), dtype=np.float32)
    for start in range(0, len(rows), _PROJECT_ROWS):
        block = rows[start : start + _PROJECT_ROWS]
        unit = values[block] / norms[block, None].astype(np.float32)
        out[start : start + len(block)] = unit if axes is None else unit @ axes.T
    length = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.where(length > 0, length, 1)
    return out


def _rerank(
    values: np.ndarray,
    norms: np.ndarray,
    rows_i: np.ndarray,
    rows_j: np.ndarray,
    shortlist: np.ndarray,
    keep: int,
) -> np.ndarray:
    """The ``keep`` entries of each shortlist row with the largest exact cosine (float32)."""
    valid = shortlist >= 0
    query = np.broadcast_to(rows_i[:, None], shortlist.shape)[valid]
    found = rows_j[shortlist[valid]]
    cosine = np.full(shortlist.shape, -np.inf, dtype=np.float32)
    cosine[valid] = dot32(values, query, found) / (norms[query] * norms[found])
    if keep < shortlist.shape[1]:
        best = np.argpartition(-cosine, keep - 1, axis=1)[:, :keep]
        shortlist = np.take_along_axis(shortlist, best, axis=1)
    return np.ascontiguousarray(shortlist, dtype=np.int64)
