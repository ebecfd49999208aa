"""Candidate search (spatial and feature space) and per-spot top-k selection for the 3D graph.

Everything here works on one section or one pair of sections at a time, so memory grows
with the number of spots, never with the number of pairs.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "cosine_top_k_per_row",
    "dot32",
    "feature_neighbors",
    "overlap_pairs",
    "rowwise_dot",
    "top_k_per_row",
    "within_neighbors",
]

#: Elements of one block of the similarity matrix in :func:`feature_neighbors` (float32).
_BLOCK_ELEMENTS = 1 << 24
#: Up to this many elements, :func:`feature_neighbors` uses one numpy matrix instead.
_SMALL_ELEMENTS = 1 << 20
#: Elements of the gathered rows of one block in :func:`rowwise_dot`.
_GATHER_ELEMENTS = 1 << 20


def within_neighbors(tree: cKDTree, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest other spots of every spot of one section.

    Parameters
    ----------
    tree
        KD-tree of the section's spot centres.
    k
        Neighbours per spot; fewer when the section has at most ``k`` spots.

    Returns
    -------
    ``(rows, cols, distances)`` with positions local to the section. A spot never
    neighbours itself; coincident spots (distance 0) neighbour each other.
    """
    n = tree.n
    q = min(k + 1, n)
    if q < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=float)
    dist, idx = tree.query(tree.data, k=q, workers=-1)
    dist, idx = dist.reshape(n, q), idx.reshape(n, q)
    is_self = idx == np.arange(n)[:, None]
    # With more than q coincident spots a row may not list the spot itself: drop its
    # farthest neighbour instead, so every row keeps q - 1 others.
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    rows = np.broadcast_to(np.arange(n)[:, None], (n, q))[keep]
    return rows.astype(np.int64), idx[keep].astype(np.int64), dist[keep]


def overlap_pairs(
    tree_a: cKDTree, tree_b: cKDTree, max_distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of spots of two sections whose centres are at most ``max_distance`` apart.

    With ``max_distance = r_a + r_b`` these are exactly the pairs whose discs overlap. The
    KD-tree dual traversal touches only nearby pairs, so the cost is linear in the number
    of spots plus the number of pairs found.

    Returns
    -------
    ``(rows, cols, distances)``: positions in section a, positions in section b, distances.
    """
    pairs = tree_a.sparse_distance_matrix(tree_b, max_distance, output_type="ndarray")
    return pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(float)


def feature_neighbors(
    unit_a: np.ndarray, unit_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` most cosine-similar spots of b for every spot of a, and vice versa.

    Parameters
    ----------
    unit_a
        L2-normalised features of section a, ``(n_a, dim)``.
    unit_b
        L2-normalised features of section b, ``(n_b, dim)``.
    k
        Neighbours per spot (at most the size of the other section).

    Returns
    -------
    ``(b_of_a, a_of_b)``: ``(n_a, min(k, n_b))`` positions in b and ``(n_b, min(k, n_a))``
    positions in a, in no particular order.

    Notes
    -----
    Exact search by blocks of the similarity matrix ``unit_a @ unit_b.T``: each block is
    computed once (a matrix product with :mod:`torch`) and serves both directions, a top-k
    along its rows for the spots of a and a running top-k along its columns for those of
    b (one numpy matrix when the whole of it is small). Memory is bounded by the block
    size; time is ``O(n_a * n_b * dim)``, so this serves small sections (her2st) and
    reference results; :mod:`asign_sc.gr._ann` is the sub-quadratic search for large
    ones. Written here because no library does the exact search well:
    :class:`sklearn.neighbors.NearestNeighbors`' brute force is 2-3x slower on CPU and
    would compute every block twice (once per direction), and faiss' exact
    :class:`faiss.IndexFlatIP` too searches once per direction.
    """
    n_a, n_b = len(unit_a), len(unit_b)
    k_b, k_a = min(k, n_b), min(k, n_a)
    b_of_a = np.empty((n_a, k_b), dtype=np.int64)
    if n_a == 0 or n_b == 0 or k == 0:
        return b_of_a, np.empty((n_b, k_a), dtype=np.int64)
    if n_a * n_b <= _SMALL_ELEMENTS:
        # One small matrix: numpy avoids torch's per-call threading overhead.
        sim = np.asarray(unit_a, dtype=np.float32) @ np.asarray(unit_b, dtype=np.float32).T
        b_of_a = np.argpartition(-sim, k_b - 1, axis=1)[:, :k_b]
        a_of_b = np.argpartition(-sim, k_a - 1, axis=0)[:k_a].T
        return b_of_a.astype(np.int64), np.ascontiguousarray(a_of_b, dtype=np.int64)

    import torch

    fa = torch.from_numpy(np.ascontiguousarray(unit_a, dtype=np.float32))
    fb = torch.from_numpy(np.ascontiguousarray(unit_b, dtype=np.float32))
    block = max(1, _BLOCK_ELEMENTS // n_b)
    best_values = torch.full((0, n_b), -torch.inf)
    best_index = torch.empty((0, n_b), dtype=torch.int64)
    with torch.inference_mode():
        for start in range(0, n_a, block):
            sim = fa[start : start + block] @ fb.T
            b_of_a[start : start + block] = torch.topk(sim, k_b, dim=1, sorted=False).indices
            top = torch.topk(sim, min(k_a, sim.shape[0]), dim=0, sorted=False)
            values = torch.cat([best_values, top.values])
            index = torch.cat([best_index, top.indices + start])
            keep = torch.topk(values, min(k_a, values.shape[0]), dim=0, sorted=False).indices
            best_values = torch.gather(values, 0, keep)
            best_index = torch.gather(index, 0, keep)
    return b_of_a, best_index.T.contiguous().numpy()


def rowwise_dot(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(a[rows] * b[cols]).sum(1)`` in float64, by blocks (never all gathered rows at once)."""
    out = np.empty(len(rows), dtype=float)
    step = max(1, _GATHER_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, len(rows), step):
        sl = slice(start, start + step)
        out[sl] = np.einsum("ij,ij->i", a[rows[sl]], b[cols[sl]], dtype=float)
    return out


def dot32(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(values[rows] * values[cols]).sum(1)`` in float32 (faiss' SIMD kernel, no gathered copy).

    ``values`` must be float32 and C-contiguous. The error is at most ``dim * 2**-24 /
    (1 - dim * 2**-24)`` times ``|values[rows]| |values[cols]|`` (any summation order).
    """
    import faiss

    rows = np.ascontiguousarray(rows, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.float32)
    if len(rows):
        faiss.pairwise_indexed_inner_product(
            values.shape[1],
            len(rows),
            faiss.swig_ptr(values),
            faiss.swig_ptr(rows),
            faiss.swig_ptr(values),
            faiss.swig_ptr(cols),
            faiss.swig_ptr(out),
        )
    return out


def cosine_top_k_per_row(
    values: np.ndarray,
    norms: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    base: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` positive weights ``base + max(cosine, 0)`` of every row, cosine in float64.

    Parameters
    ----------
    values
        Features, float32 and C-contiguous ``(n, dim)``.
    norms
        Their L2 norms (float64, positive).
    rows
        Row of each candidate (a position in ``values``).
    cols
        Column of each candidate (unique per row; a position in ``values``).
    base
        The rest of each candidate's weight (the IoU).
    k
        Candidates kept per row.

    Returns
    -------
    ``(keep, weights)``: positions into the candidate arrays as :func:`top_k_per_row`
    returns them, and their weights (float64 cosine).

    Notes
    -----
    The same choice as ranking every candidate by its float64 weight, at a fraction of the
    cost: float32 cosines (:func:`dot32`, several times faster than a float64 product of
    gathered rows) rank all candidates, and float64 ones are computed only for those
    within twice the float32 error bound of each row's ``k``-th float32 weight, the only
    ones that can be among the float64 top ``k``.
    """
    if len(rows) == 0 or k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=float)
    dim = values.shape[1]
    unit_error = dim * 2.0**-24
    # Twice the bound (rounding of the norms' division included with room to spare).
    margin = 4 * unit_error / (1 - unit_error)
    scale = norms[rows] * norms[cols]
    rough = base + np.maximum(dot32(values, rows, cols) / scale, 0.0)
    first = top_k_per_row(rows, cols, rough, k)
    threshold = np.full(int(rows.max()) + 1, np.inf)
    np.minimum.at(threshold, rows[first], rough[first])
    maybe = np.flatnonzero(rough >= threshold[rows] - margin)
    exact = base[maybe] + np.maximum(
        rowwise_dot(values, values, rows[maybe], cols[maybe]) / scale[maybe], 0.0
    )
    positive = exact > 0
    maybe, exact = maybe[positive], exact[positive]
    keep = top_k_per_row(rows[maybe], cols[maybe], exact, k)
    return maybe[keep], exact[keep]


def top_k_per_row(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest weights of every row (ties: smaller column first).

    Parameters
    ----------
    rows
        Row of each candidate.
    cols
        Column of each candidate (unique per row).
    weights
        Weight of each candidate (finite).
    k
        Candidates kept per row.

    Returns
    -------
    Positions into the candidate arrays, grouped by increasing row and sorted by
    decreasing weight within a row.
    """
    m = len(rows)
    if m == 0 or k == 0:
        return np.empty(0, dtype=np.int64)
    key = rows.astype(np.int64) * (int(cols.max()) + 1) + cols
    order = np.arange(m) if np.all(key[1:] > key[:-1]) else np.argsort(key, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    counts = np.diff(np.r_[starts, m])
    width = int(counts.max())
    if len(starts) * width > 4 * m + (1 << 20):
        # A few rows with very many candidates: one global sort beats padding every row.
        ranked = np.lexsort((cols[order], -weights[order], sorted_rows))
        rank = np.arange(m) - np.repeat(starts, counts)  # groups keep their place in ranked
        return order[ranked[rank < k]]
    # Rows padded to the longest one; a stable sort per row keeps the column order of ties.
    group = np.repeat(np.arange(len(starts)), counts)
    padded = np.full((len(starts), width), np.inf)
    padded[group, np.arange(m) - starts[group]] = -weights[order]
    best = np.argsort(padded, axis=1, kind="stable")[:, :k]
    valid = best < counts[:, None]
    return order[(starts[:, None] + best)[valid]]
