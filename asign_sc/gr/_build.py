"""The 3D spot graph of a section stack (paper §III-B, eq. 1)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from asign_sc._allocator import reuses_freed_memory
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import Section, SectionStack, get_table, resolve_stack
from asign_sc._utils import copy_data, sanitize_uns
from asign_sc.gr._ann import (
    approximate_feature_neighbors,
    approximate_search_settings,
    choose_feature_search,
    search_threads,
)
from asign_sc.gr._kernel import gaussian_overlap
from asign_sc.gr._overlap import circle_iou
from asign_sc.gr._search import (
    cosine_top_k_per_row,
    feature_neighbors,
    overlap_pairs,
    rowwise_dot,
    top_k_per_row,
    within_neighbors,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["build_3d_graph"]

logger = logging.getLogger(__name__)

#: Pooled spot-level embedding written by :func:`asign_sc.tl.extract_features` (its default
#: ``key_added="asign"``); used when ``features_key=None`` and it is present.
DEFAULT_FEATURE_KEY = Key.obsm.features("asign", "spot")

#: Pairs of spots of a stack above which the exact similarity search is worth a log line.
_MANY_PAIRS = 1e9

#: Values of ``feature_search``.
FEATURE_SEARCHES = ("auto", "exact", "approximate")

#: Values of ``across``.
ACROSS_MODES = ("kernel", "iou")

#: Defaults of the across-section kernel, in spot pitches, chosen by
#: ``benchmarks/propagation.py`` (label propagation on her2st patients A, B, D).
KERNEL_WIDTH = 2.0
ACROSS_RADIUS = 3.5

#: How the within-section weights are defined, recorded in the parameters.
WITHIN_WEIGHT = "min(1, pitch / distance)"
ACROSS_WEIGHT = {
    ("iou", "cosine"): "IoU + max(cosine, 0)",
    ("iou", None): "IoU",
    ("kernel", "cosine"): "IoU(0) * exp(-d^2 / (2 (kernel_width * pitch)^2)) * max(cosine, 0)",
    ("kernel", None): "IoU(0) * exp(-d^2 / (2 (kernel_width * pitch)^2))",
}


@dataclass
class _Edges:
    """Edges of one kind, as parallel arrays over global table positions."""

    rows: list[np.ndarray]
    cols: list[np.ndarray]
    weights: list[np.ndarray]
    distances: list[np.ndarray]

    @classmethod
    def empty(cls) -> _Edges:
        return cls([], [], [], [])

    def add(self, rows: np.ndarray, cols: np.ndarray, w: np.ndarray, d: np.ndarray) -> None:
        self.rows.append(rows)
        self.cols.append(cols)
        self.weights.append(w)
        self.distances.append(d)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)

        return (
            cat(self.rows, np.int64),
            cat(self.cols, np.int64),
            cat(self.weights, float),
            cat(self.distances, float),
        )


@reuses_freed_memory
def build_3d_graph(
    data: AnnData | SpatialData,
    *,
    library_key: str = Key.obs.library,
    sample_key: str | None = None,
    spatial_key: str = Key.obsm.spatial_aligned,
    spot_radius: float | Mapping[str, float] | None = None,
    features_key: str | None = None,
    n_neighs_within: int = 8,
    n_neighs_across: int = 12,
    max_section_gap: int | None = None,
    across: Literal["kernel", "iou"] = "kernel",
    kernel_width: float = KERNEL_WIDTH,
    across_radius: float = ACROSS_RADIUS,
    similarity: Literal["cosine"] | None = "cosine",
    across_candidates: int | None = None,
    feature_search: Literal["auto", "exact", "approximate"] = "auto",
    similarity_radius: float | None = None,
    section_spacing: float | None = None,
    symmetric: bool = False,
    n_jobs: int | None = None,
    key_added: str = Key.obsp.graph3d,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Build the 3D spot graph of a section stack: nearby spots within and across sections.

    Every spot gets two kinds of edges (paper §III-B):

    - **within its section**: its ``n_neighs_within`` nearest spots by Euclidean distance
      in ``obsm[spatial_key]``, weight ``min(1, pitch / distance)`` where ``pitch`` is the
      section's spot pitch (median distance of a spot to its nearest neighbour). This is
      the paper's inverse distance made unit-free: the first ring of a regular array gets
      1, the next rings 1/√2, 1/√3, ..., and coincident spots 1 (no division by zero).
    - **to the other sections of its sample**, by ``across``:

      - ``"kernel"`` (default): in **each** other section, its ``n_neighs_across`` nearest
        spots in the aligned frame within ``across_radius`` pitches, weight
        ``IoU(0) * exp(-d² / (2 (kernel_width * pitch)²))`` (:func:`gaussian_overlap`):
        a Gaussian of the centre distance ``d`` whose zero-distance limit is the disc
        overlap (IoU) of concentric spots (1 for equal radii), ``pitch`` the mean of the
        two sections' pitches. With features (``similarity="cosine"``) the weight is
        multiplied by ``max(cosine, 0)``.
      - ``"iou"``: the paper's eq. 1, the ``n_neighs_across`` spots of all other sections
        together with the largest weight ``IoU + max(cosine, 0)``, where IoU is the exact
        area overlap of the two spot discs in the aligned frame and cosine the similarity
        of the spots' image features. Without features the weight is the IoU alone.

      Cosine is clipped at 0 so that weights stay non-negative, as label propagation
      needs (for non-negative CNN features, as in the paper, the clip never binds).

    Why the kernel is the default: on legacy ST arrays (100 µm spots at a 200 µm pitch)
    the IoU is zero beyond one spot diameter, so with any residual misalignment most
    spots get 0-2 across edges, and label propagation over such a graph loses to a plain
    nearest-neighbour graph. With the kernel (12 per other section, width 2 pitches,
    radius 3.5 pitches) propagation beats that graph (8 within, 12 across) on her2st
    patients A, B and D (``benchmarks/propagation.py``, ``benchmarks/results/propagation.md``).
    The gain comes from the number of across neighbours: unit weights on as many nearest
    spots score the same; the kernel adds weights that fall smoothly with the distance
    (edge features for the network) and a radius that keeps far spots out.

    Edges of weight 0 are left out, so with ``across="iou"`` a spot whose disc overlaps
    nothing (and, with features, is not similar to anything) has fewer than
    ``n_neighs_across`` across edges, and with ``across="kernel"`` a spot with no spot of
    another section within ``across_radius`` pitches has none to that section. Spots of
    different samples are never connected.

    Parameters
    ----------
    data
        A section stack (see :func:`asign_sc.io.read_her2st`) with spot centres of all
        sections in one common frame in ``obsm[spatial_key]``.
    library_key
        Column of ``obs`` naming each spot's section; categories give the stacking order.
    sample_key
        Column of ``obs`` naming the sample (patient) of each spot when the object holds
        several stacks. Each sample gets its own graph; ``None``: one stack.
    spatial_key
        ``obsm`` key of spot centres ``(x, y)`` in the common frame: the default is written
        by :func:`asign_sc.tl.register_sections`; pass ``"spatial"`` for coordinates that
        are aligned already.
    spot_radius
        Spot radius in units of ``obsm[spatial_key]``, one number or one per section. Default:
        each section's radius (shapes ``radius`` or ``spot_diameter_fullres / 2``) carried
        into the frame of ``obsm[spatial_key]`` by the scale of the best affine map from the
        section's own coordinates to it (1 for a rigid registration).
    features_key
        Image features of the similarity term: the ``key_added`` of
        :func:`asign_sc.tl.extract_features` (its spot embedding
        ``obsm[f"X_{features_key}_spot"]``), or any ``obsm`` key of ``(n_obs, dim)``
        features (e.g. ``"X_pca"`` or a foundation model's embedding). Default: the spot
        embedding of ``extract_features(key_added="asign")`` when present; without
        features the across weight is the IoU alone (a logged note).
    n_neighs_within
        Edges per spot within its section.
    n_neighs_across
        Edges per spot to other sections of the same sample: per other section with
        ``across="kernel"`` (so ``n_neighs_across * (n_sections - 1)`` at most), top-k over
        all of them together with ``across="iou"``.
    max_section_gap
        Link a spot only to sections at most this many positions away in the stacking
        order (``1``: the adjacent sections only). Bounds the number of across edges per
        spot (at most ``2 * max_section_gap * n_neighs_across`` with ``across="kernel"``)
        however many sections a stack has, so the graph and everything trained on it grow
        linearly with the number of sections; values still reach farther sections over
        several propagation steps. ``None``: every other section of the sample.
    across
        ``"kernel"`` (default): nearest spots of each other section, weighted by a Gaussian
        of their distance; ``"iou"``: the paper's eq. 1 (disc overlap + feature similarity).
        The kernel needs one KD-tree query per ordered pair of sections and, with features,
        one dot product per edge: time linear in the number of edges (about 1 s for 30k
        spots in 5 sections, 56 edges per spot, on 2 busy CPU cores; no feature search, so
        with features it is faster than ``"iou"``, see ``benchmarks/graph.py``).
    kernel_width
        Standard deviation of the Gaussian of ``across="kernel"``, in spot pitches.
    across_radius
        Largest distance of an across edge with ``across="kernel"``, in spot pitches.
    similarity
        ``"cosine"`` (eq. 1; with ``across="kernel"`` a factor ``max(cosine, 0)``) or
        ``None`` to use the distance only, even when features exist.
    across_candidates
        ``across="iou"`` only. Size of the feature-space part of the candidate set of the across
        edges: per spot and other section, the ``across_candidates`` spots most similar in feature
        space (see ``feature_search``), joined with every spot whose disc overlaps (exact KD-tree
        range search). Weights of eq. 1 are then computed exactly for these candidates only, so at
        most ``n_obs * (n_sections - 1) * across_candidates`` pairs plus the overlaps are ever
        formed. Spots outside the set have IoU 0 and, with the exact search, a smaller similarity
        than all of its similarity candidates, so any value ``>= n_neighs_across`` (the default)
        gives the exact top-k of eq. 1 over all pairs; smaller values trade exactness for less
        memory and time. Ties between equal weights are broken by the search and may differ from
        another implementation's.
    feature_search
        ``across="iou"`` only. How the similarity candidates are found (the overlap
        candidates are always exact):

        - ``"exact"``: every pair of spots of every two sections (blockwise matrix products),
          ``O(n_a * n_b * dim)`` per pair of sections, the square of the stack: with 100k
          spots in 5 sections, about 20 s with 64-d features and 2-3 minutes with 1280-d
          ones on 2 CPU cores.
        - ``"approximate"``: an HNSW graph per section (:class:`faiss.IndexHNSWFlat`, inner
          product) over the unit features projected on the stack's 64 leading principal
          axes (not centred; features with at most 64 dimensions are used as they are).
          Each spot's ``2 * across_candidates`` nearest spots of every other section in
          that space are re-ranked by their cosine on the full features and the best
          ``across_candidates`` kept. Time ``O(n log n)``, memory linear in the number of
          spots: 100k spots in 5 sections take 5-10 s with 64-d or 1280-d features on one
          CPU core (more where the cores are busy with other work, see ``n_jobs``). Below a
          few thousand spots the fixed costs (principal axes, HNSW graphs) make it slower
          than the exact search (0.33 s against 0.17 s for 3k spots with 1280-d features).
          A true candidate is missed when neither the projection nor the graph search finds
          it: on the benchmark stacks (``benchmarks/graph.py``, 1k-100k spots) 99.85-100%
          of the exact top-k edges are kept, on EfficientNet-Lite0 embeddings of her2st
          patient C 99.99%, but features whose neighbours are decided by variance spread
          evenly over hundreds of dimensions (no low-dimensional structure) lose more (83%
          of the edges on a synthetic 256-d example).
        - ``"auto"`` (default): ``"exact"`` while ``n_a * n_b * dim <= 2**32`` for every
          pair of sections of every sample (two sections of about 1,800 spots with 1280-d
          features, 8,000 with 64-d ones, so her2st is searched exactly), else
          ``"approximate"``.

        The search used is recorded in ``params["feature_search"]``. The result is the
        same for the same input: the HNSW graphs are built with one thread and the
        principal axes from a seeded sample.
    similarity_radius
        ``across="iou"`` only. Look for similar spots only within this distance (units of
        ``obsm[spatial_key]``) instead of in the whole section: the candidates are then every spot
        of the other sections within ``max(similarity_radius, r_a + r_b)`` (KD-tree range search),
        and ``across_candidates`` and ``feature_search`` are not used. The cost is linear in the
        number of spots with a radius of a few spot pitches.
    section_spacing
        Distance between consecutive sections in units of ``obsm[spatial_key]`` (e.g. the
        cut thickness in µm divided by µm per pixel). Across-section distances in
        ``obsp[f"{key_added}_distances"]`` are 3D with it and in-plane without it.
    symmetric
        Also add the reverse of every edge, so the graph is undirected (weights and
        distances are symmetric already). Default: each spot's own top-k (rows are the
        spots; a spot may be chosen by more than ``k`` others).
    n_jobs
        CPU threads of the feature search (BLAS, faiss' OpenMP and torch's intra-op
        threads) during this call; ``None`` keeps their settings (all cores). On a machine
        whose cores are busy with other work one thread can be much faster: threads of a
        BLAS or OpenMP call wait for each other.
    key_added
        Prefix of the keys written (squidpy's convention, see Returns).
    copy
        Return a modified copy instead of writing into ``data``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Written to the spot table:

    - ``obsp[f"{key_added}_connectivities"]``: CSR ``(n_obs, n_obs)`` edge weights; row
      ``i`` holds the edges chosen by spot ``i``.
    - ``obsp[f"{key_added}_distances"]``: CSR with the same sparsity pattern, the
      Euclidean distance of each edge (with ``section_spacing`` along z across sections).
      Coincident spots give stored zeros, so use the connectivities for the pattern.
    - ``uns[f"{key_added}_neighbors"]``: ``{"connectivities_key", "distances_key",
      "params"}`` as squidpy's :func:`squidpy.gr.spatial_neighbors` writes it; ``params``
      holds the arguments (``across``, ``kernel_width``, ``across_radius`` among them), the
      weights' definitions (``within_weight``, ``across_weight``), the feature search used
      (``"exact"``, ``"approximate"``, or ``None`` without a whole-section similarity
      search, always with ``across="kernel"``) and, for the approximate one,
      its settings (``"approximate_search"``), the radii, pitches and scales used per
      section, and the edge counts.

    An edge is *within* a section when both spots have the same ``obs[library_key]`` and
    *across* otherwise; :func:`asign_sc.gr.split_graph` returns the two parts.

    Examples
    --------
    Patient B of her2st, with the authors' rigid alignment as ``obsm['spatial_aligned']``:

    >>> import asign_sc as asg
    >>> sdata = asg.io.read_her2st(
    ...     "../shared/data/her2st", patient="B", images=False, coordinates="aligned"
    ... )  # doctest: +SKIP
    >>> asg.gr.build_3d_graph(sdata)  # doctest: +SKIP
    >>> within, across = asg.gr.split_graph(sdata)  # doctest: +SKIP
    """
    _check_counts(n_neighs_within, n_neighs_across, across_candidates)
    _check_positive_or_none(
        "max_section_gap",
        max_section_gap,
        "a positive number of sections (1: adjacent sections only) or None (all sections)",
    )
    if similarity not in ("cosine", None):
        raise ValueError(f"similarity must be 'cosine' or None, got {similarity!r}.")
    _check_kernel(across, kernel_width, across_radius)
    if feature_search not in FEATURE_SEARCHES:
        raise ValueError(
            f"feature_search must be one of {FEATURE_SEARCHES}, got {feature_search!r}: 'exact' "
            "compares every pair of spots of two sections, 'approximate' uses a faiss HNSW "
            "index, 'auto' picks by the size of the sections."
        )
    _check_positive_or_none("n_jobs", n_jobs)
    if section_spacing is not None and not (np.isfinite(section_spacing) and section_spacing > 0):
        raise ValueError(
            f"section_spacing must be a positive number of coordinate units, got "
            f"{section_spacing!r}; pass None when it is not known."
        )
    if similarity_radius is not None and not (
        np.isfinite(similarity_radius) and similarity_radius > 0
    ):
        raise ValueError(
            f"similarity_radius must be a positive distance in units of obsm[{spatial_key!r}] "
            f"or None (whole sections), got {similarity_radius!r}."
        )
    if copy:
        data = copy_data(data)
    # Each section's own frame (for its spot radius); an AnnData holding only aligned
    # coordinates uses those.
    own_key = Key.obsm.spatial if Key.obsm.spatial in get_table(data).obsm else spatial_key
    stack = resolve_stack(
        data, library_key=library_key, sample_key=sample_key, spatial_key=own_key, min_sections=2
    )
    _require_two_sections(stack)
    table = stack.table
    coords = _coordinates(table, spatial_key)
    features, used_feature_key = _features(table, features_key, similarity, across)
    radii, scales = _radii(stack, coords, spot_radius, spatial_key)
    n_candidates = n_neighs_across if across_candidates is None else across_candidates

    search = None
    if (
        across == "iou"
        and features is not None
        and similarity_radius is None
        and n_neighs_across > 0
    ):
        sizes = [[s.n_spots for s in sections] for sections in stack.samples().values()]
        search = choose_feature_search(feature_search, sizes, features.values.shape[1])

    trees = {s.name: cKDTree(coords[s.rows]) for s in stack}
    within, pitches = _within_edges(stack, trees, n_neighs_within)
    if across == "kernel":
        across_edges, disjoint = _kernel_edges(
            stack,
            coords,
            trees,
            radii,
            pitches,
            features,
            k=n_neighs_across,
            width=kernel_width,
            reach=across_radius,
            max_gap=max_section_gap,
            section_spacing=section_spacing,
        )
    else:
        with search_threads(n_jobs):
            across_edges, disjoint = _across_edges(
                stack,
                coords,
                trees,
                radii,
                features,
                k=n_neighs_across,
                n_candidates=n_candidates,
                search=search,
                similarity_radius=similarity_radius,
                max_gap=max_section_gap,
                section_spacing=section_spacing,
            )
    for a, b in disjoint:
        logger.warning(
            "Sections %r and %r are adjacent in the stack but no spot of one %s a spot of the "
            "other in obsm[%r]%s. Check that the coordinates are aligned "
            "(asign_sc.tl.register_sections) and that spatial_key names the common frame.",
            a,
            b,
            "overlaps" if across == "iou" else f"is within {across_radius:g} pitches of",
            spatial_key,
            " (they are linked by feature similarity only)"
            if across == "iou" and features is not None
            else "",
        )

    n = table.n_obs
    rows_w, cols_w, w_w, d_w = within.arrays()
    rows_a, cols_a, w_a, d_a = across_edges.arrays()
    rows = np.concatenate([rows_w, rows_a])
    cols = np.concatenate([cols_w, cols_a])
    weights = np.concatenate([w_w, w_a])
    dists = np.concatenate([d_w, d_a])
    if symmetric:
        rows, cols, weights, dists = _symmetrise(rows, cols, weights, dists, n)
    connectivities = _csr(rows, cols, weights, n)
    distances = _csr(rows, cols, dists, n)

    conn_key = Key.obsp.connectivities(key_added)
    dist_key = Key.obsp.distances(key_added)
    same = _section_codes(table, library_key)
    is_within = same[rows] == same[cols]
    table.obsp[conn_key] = connectivities
    table.obsp[dist_key] = distances
    table.uns[Key.uns.neighbors(key_added)] = {
        "connectivities_key": conn_key,
        "distances_key": dist_key,
        "params": sanitize_uns(
            {
                "library_key": library_key,
                "sample_key": sample_key,
                "spatial_key": spatial_key,
                "features_key": used_feature_key,
                "similarity": similarity if features is not None else None,
                "n_neighs_within": n_neighs_within,
                "n_neighs_across": n_neighs_across,
                "max_section_gap": max_section_gap,
                "across": across,
                "kernel_width": kernel_width if across == "kernel" else None,
                "across_radius": across_radius if across == "kernel" else None,
                "across_candidates": n_candidates if across == "iou" else None,
                "feature_search": search,
                "approximate_search": (
                    approximate_search_settings() if search == "approximate" else None
                ),
                "similarity_radius": similarity_radius,
                "section_spacing": section_spacing,
                "symmetric": symmetric,
                "n_jobs": n_jobs,
                "within_weight": WITHIN_WEIGHT,
                "across_weight": ACROSS_WEIGHT[
                    across, similarity if features is not None else None
                ],
                "edge_type": f"within: same obs[{library_key!r}]; across: different",
                "sections": stack.names,
                "spot_radius": radii,
                "radius_scale": scales,
                "pitch": pitches,
                "n_edges_within": int(is_within.sum()),
                "n_edges_across": int((~is_within).sum()),
            }
        ),
    }
    logger.info(
        "Added obsp[%r] and obsp[%r] (%d within-section and %d across-section edges over %d "
        "spots) and uns[%r].",
        conn_key,
        dist_key,
        int(is_within.sum()),
        int((~is_within).sum()),
        n,
        Key.uns.neighbors(key_added),
    )
    return data if copy else None


# -- inputs ---------------------------------------------------------------------------------
def _check_counts(n_within: int, n_across: int, n_candidates: int | None) -> None:
    for name, value in (("n_neighs_within", n_within), ("n_neighs_across", n_across)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    _check_positive_or_none("across_candidates", n_candidates)


def _check_positive_or_none(
    name: str, value: object, what: str = "a positive integer or None"
) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    ):
        raise ValueError(f"{name} must be {what}, got {value!r}.")


def _check_kernel(across: str, width: float, reach: float) -> None:
    if across not in ACROSS_MODES:
        raise ValueError(
            f"across must be one of {ACROSS_MODES}, got {across!r}: 'kernel' links each spot to "
            "the nearest spots of every other section with a smooth distance weight, 'iou' "
            "is the paper's eq. 1 (disc overlap + feature similarity)."
        )
    for name, value in (("kernel_width", width), ("across_radius", reach)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise TypeError(f"{name} must be a number of spot pitches, got {value!r}.")
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of spot pitches, got {value!r}.")


def _require_two_sections(stack: SectionStack) -> None:
    for sample, sections in stack.samples().items():
        if len(sections) < 2:
            where = f" of sample {sample!r}" if sample is not None else ""
            raise InvalidStackError(
                f"A 3D graph needs at least 2 sections per stack, but the stack{where} has "
                f"only {[s.name for s in sections]}. Add sections, or check obs["
                f"{stack.library_key!r}]" + (f" and obs[{stack.sample_key!r}]." if sample else ".")
            )


def _coordinates(table: AnnData, spatial_key: str) -> np.ndarray:
    if spatial_key not in table.obsm:
        hint = (
            " Register the sections first (asign_sc.tl.register_sections) or, if the "
            "coordinates in obsm['spatial'] are aligned already, pass spatial_key='spatial'."
            if spatial_key == Key.obsm.spatial_aligned
            else ""
        )
        raise InvalidStackError(
            f"obsm[{spatial_key!r}] is missing: the 3D graph needs spot centres of all "
            f"sections in one common frame (obsm has {list(table.obsm)}).{hint}"
        )
    coords = np.asarray(table.obsm[spatial_key], dtype=float)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InvalidStackError(
            f"obsm[{spatial_key!r}] has shape {coords.shape}; expected (n_obs, 2) centres (x, y)."
        )
    coords = np.ascontiguousarray(coords[:, :2])
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InvalidStackError(
            f"{int(bad.sum())} spots have NaN/infinite coordinates in obsm[{spatial_key!r}] "
            f"(e.g. {table.obs_names[bad][:3].tolist()}); fix them or drop those spots."
        )
    return coords


@dataclass
class _Features:
    """Image features of the spots: float32 values and their float64 norms."""

    values: np.ndarray
    norms: np.ndarray

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """L2-normalised float32 features of ``rows`` (for the neighbour search)."""
        return (self.values[rows] / self.norms[rows, None]).astype(np.float32)


def _features(
    table: AnnData, features_key: str | None, similarity: str | None, across: str
) -> tuple[_Features | None, str | None]:
    """The features used for similarity, or ``None`` when the graph uses the overlap only."""
    if similarity is None:
        return None, None
    if features_key is None:
        if DEFAULT_FEATURE_KEY not in table.obsm:
            logger.info(
                "No image features (obsm[%r] is missing and features_key=None): across-section "
                "weights are the %s alone. Run asign_sc.tl.extract_features or pass "
                "features_key= to add the feature similarity.",
                DEFAULT_FEATURE_KEY,
                "disc overlap (IoU)" if across == "iou" else "distance kernel",
            )
            return None, None
        feature_key = DEFAULT_FEATURE_KEY
    elif Key.obsm.features(features_key, "spot") in table.obsm:
        feature_key = Key.obsm.features(features_key, "spot")
    elif features_key in table.obsm:
        feature_key = features_key
    else:
        raise InvalidStackError(
            f"Neither obsm[{Key.obsm.features(features_key, 'spot')!r}] (features extracted "
            f"with key_added={features_key!r}) nor obsm[{features_key!r}] exists (obsm has "
            f"{list(table.obsm)}). Extract image features with asign_sc.tl.extract_features, "
            "or pass features_key=None to build the graph from the overlap alone."
        )
    values = np.ascontiguousarray(table.obsm[feature_key], dtype=np.float32)
    if values.ndim != 2 or values.shape[1] == 0:
        raise InvalidStackError(
            f"obsm[{feature_key!r}] has shape {values.shape}; expected (n_obs, dim) features "
            "(pooled embeddings, not token grids)."
        )
    if not np.isfinite(values).all():
        raise InvalidStackError(f"obsm[{feature_key!r}] holds NaN or infinite values.")
    norms = np.sqrt(rowwise_dot(values, values, *(np.arange(len(values)),) * 2))
    zero = norms == 0
    if zero.any():
        raise InvalidStackError(
            f"{int(zero.sum())} spots have all-zero features in obsm[{feature_key!r}] (e.g. "
            f"{table.obs_names[zero][:3].tolist()}); their cosine similarity is undefined. "
            "Drop those spots or pass similarity=None."
        )
    return _Features(values, norms), feature_key


def _radii(
    stack: SectionStack,
    coords: np.ndarray,
    spot_radius: float | Mapping[str, float] | None,
    spatial_key: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """Spot radius per section in the units of ``coords``, and the scale applied."""
    radii: dict[str, float] = {}
    scales: dict[str, float] = {}
    for section in stack:
        if spot_radius is None:
            scale = _frame_scale(section, coords[section.rows])
            radius = section.spot_radius * scale
            if not np.isclose(scale, 1.0, rtol=1e-3):
                logger.info(
                    "Section %r: obsm[%r] is scaled by %.4g relative to the section's pixels; "
                    "spot radius %.4g -> %.4g.",
                    section.name,
                    spatial_key,
                    scale,
                    section.spot_radius,
                    radius,
                )
        else:
            scale = 1.0
            if isinstance(spot_radius, Mapping):
                if section.name not in spot_radius:
                    raise ValueError(
                        f"spot_radius has no entry for section {section.name!r}; give one per "
                        f"section ({stack.names}) or a single number."
                    )
                radius = float(spot_radius[section.name])
            else:
                radius = float(spot_radius)
        if np.isnan(radius):
            raise InvalidStackError(
                f"The spot radius of section {section.name!r} is unknown (a plain AnnData "
                "without uns['spatial'][section]['scalefactors']): pass spot_radius= in units "
                f"of obsm[{spatial_key!r}], one number or one per section."
            )
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(
                f"Spot radius of section {section.name!r} is {radius}; it must be > 0."
            )
        radii[section.name] = radius
        scales[section.name] = float(scale)
    return radii, scales


def _frame_scale(section: Section, target: np.ndarray) -> float:
    """Isotropic scale of the least-squares affine map from a section's own frame to ``target``.

    ``sqrt(|det A|)`` of the linear part: exact for similarity and affine registrations,
    the mean areal scale for a non-linear one. Fewer than 3 non-collinear spots carry no
    scale, and 1 is used.
    """
    source = np.c_[section.spatial, np.ones(section.n_spots)]
    if section.n_spots < 3 or np.linalg.matrix_rank(source) < 3:
        return 1.0
    if np.allclose(source[:, :2], target):
        return 1.0
    solution, *_ = np.linalg.lstsq(source, target, rcond=None)
    det = float(np.linalg.det(solution[:2, :2]))
    return float(np.sqrt(abs(det))) if det != 0 else 1.0


# -- edges ----------------------------------------------------------------------------------
def _within_edges(
    stack: SectionStack, trees: dict[str, cKDTree], k: int
) -> tuple[_Edges, dict[str, float]]:
    edges = _Edges.empty()
    pitches: dict[str, float] = {}
    for section in stack:
        # The pitch comes from the nearest neighbour, whatever k is.
        rows, cols, dist = within_neighbors(trees[section.name], max(k, 1))
        nearest = _first_per_row(rows, dist)
        positive = nearest[nearest > 0]
        pitch = float(np.median(positive)) if positive.size else float("nan")
        pitches[section.name] = pitch
        if k == 0 or rows.size == 0:
            continue
        weights = np.ones_like(dist) if not np.isfinite(pitch) else pitch / np.maximum(dist, pitch)
        edges.add(section.rows[rows], section.rows[cols], weights, dist)
    return edges, pitches


def _first_per_row(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    if rows.size == 0:
        return values
    starts = np.r_[True, rows[1:] != rows[:-1]]
    return values[starts]


def _across_edges(
    stack: SectionStack,
    coords: np.ndarray,
    trees: dict[str, cKDTree],
    radii: dict[str, float],
    features: _Features | None,
    *,
    k: int,
    n_candidates: int,
    search: Literal["exact", "approximate"] | None,
    similarity_radius: float | None,
    max_gap: int | None,
    section_spacing: float | None,
) -> tuple[_Edges, list[tuple[str, str]]]:
    edges = _Edges.empty()
    disjoint: list[tuple[str, str]] = []
    if k == 0:
        return edges, disjoint
    radius_of = np.zeros(stack.table.n_obs, dtype=float)
    for s in stack:
        radius_of[s.rows] = radii[s.name]
    for sections in stack.samples().values():
        names = [s.name for s in sections]
        overlaps: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for i, a in enumerate(names):
            for j, b in enumerate(names[i + 1 :], start=i + 1):
                if _too_far(i, j, max_gap):
                    continue
                ra, rb, _ = overlap_pairs(trees[a], trees[b], radii[a] + radii[b])
                overlaps[a, b] = (ra, rb)
                overlaps[b, a] = (rb, ra)
        disjoint += [(a, b) for a, b in pairwise(names) if overlaps[a, b][0].size == 0]
        # Most similar spots of b for each spot of a, for every ordered pair (a, b).
        similar = (
            _similar_spots(sections, features, n_candidates, search, max_gap)
            if features is not None and similarity_radius is None
            else {}
        )
        for ia, sa in enumerate(sections):
            cand_rows, cand_cols, cand_z = [], [], []
            for ib, sb in enumerate(sections):
                if ia == ib or _too_far(ia, ib, max_gap):
                    continue
                if features is None:
                    rows, cols = overlaps[sa.name, sb.name]
                elif similarity_radius is not None:
                    reach = max(similarity_radius, radii[sa.name] + radii[sb.name])
                    rows, cols, _ = overlap_pairs(trees[sa.name], trees[sb.name], reach)
                else:
                    rows, cols = overlaps[sa.name, sb.name]
                    near = similar[ia, ib]
                    found = near >= 0  # the approximate search may find fewer
                    rows = np.concatenate([rows, np.nonzero(found)[0]])
                    cols = np.concatenate([cols, near[found]])
                cand_rows.append(sa.rows[rows])
                cand_cols.append(sb.rows[cols])
                cand_z.append(np.full(rows.size, abs(ia - ib), dtype=float))
            rows, cols = np.concatenate(cand_rows), np.concatenate(cand_cols)
            z = np.concatenate(cand_z)
            if similar:  # a pair can come from both the overlap and the similarity search
                _, unique = np.unique(rows * coords.shape[0] + cols, return_index=True)
                rows, cols, z = rows[unique], cols[unique], z[unique]
            planar = np.linalg.norm(coords[rows] - coords[cols], axis=1)
            iou = circle_iou(planar, radii[sa.name], radius_of[cols])
            if features is None:
                keep = np.flatnonzero(iou > 0)
                keep = keep[top_k_per_row(rows[keep], cols[keep], iou[keep], k)]
                weights = iou[keep]
            else:
                keep, weights = cosine_top_k_per_row(
                    features.values, features.norms, rows, cols, iou, k
                )
            distance = (
                planar[keep]
                if section_spacing is None
                else np.hypot(planar[keep], section_spacing * z[keep])
            )
            edges.add(rows[keep], cols[keep], weights, distance)
    return edges, disjoint


def _kernel_edges(
    stack: SectionStack,
    coords: np.ndarray,
    trees: dict[str, cKDTree],
    radii: dict[str, float],
    pitches: dict[str, float],
    features: _Features | None,
    *,
    k: int,
    width: float,
    reach: float,
    max_gap: int | None,
    section_spacing: float | None,
) -> tuple[_Edges, list[tuple[str, str]]]:
    """The ``k`` nearest spots of each other section within ``reach`` pitches, Gaussian weights."""
    edges = _Edges.empty()
    disjoint: list[tuple[str, str]] = []
    if k == 0:
        return edges, disjoint
    for sections in stack.samples().values():
        linked: set[tuple[str, str]] = set()
        for ia, sa in enumerate(sections):
            for ib, sb in enumerate(sections):
                if ia == ib or sb.n_spots == 0 or _too_far(ia, ib, max_gap):
                    continue
                pitch = _pair_pitch(pitches, sa.name, sb.name)
                q = min(k, sb.n_spots)
                dist, idx = trees[sb.name].query(
                    coords[sa.rows], k=q, distance_upper_bound=reach * pitch
                )
                dist, idx = dist.reshape(sa.n_spots, q), idx.reshape(sa.n_spots, q)
                found = np.isfinite(dist)
                if found.any():
                    linked.add((sa.name, sb.name))
                rows = sa.rows[np.nonzero(found)[0]]
                cols = sb.rows[idx[found]]
                planar = dist[found]
                weights = gaussian_overlap(planar, radii[sa.name], radii[sb.name], width * pitch)
                if features is not None:
                    cosine = rowwise_dot(features.values, features.values, rows, cols) / (
                        features.norms[rows] * features.norms[cols]
                    )
                    weights = weights * np.maximum(cosine, 0.0)
                    keep = weights > 0
                    rows, cols, weights, planar = (
                        rows[keep],
                        cols[keep],
                        weights[keep],
                        planar[keep],
                    )
                distance = (
                    planar
                    if section_spacing is None
                    else np.hypot(planar, section_spacing * abs(ia - ib))
                )
                edges.add(rows, cols, weights, distance)
        disjoint += [
            (sa.name, sb.name)
            for sa, sb in pairwise(sections)
            if (sa.name, sb.name) not in linked and (sb.name, sa.name) not in linked
        ]
    return edges, disjoint


def _too_far(ia: int, ib: int, max_gap: int | None) -> bool:
    """Sections ``ia`` and ``ib`` of a stack are more than ``max_gap`` positions apart."""
    return max_gap is not None and abs(ia - ib) > max_gap


def _pair_pitch(pitches: dict[str, float], a: str, b: str) -> float:
    """Mean pitch of two sections; the known one when a section has no pitch (one spot)."""
    known = [p for p in (pitches[a], pitches[b]) if np.isfinite(p)]
    if not known:
        raise InvalidStackError(
            f"The spot pitch of sections {a!r} and {b!r} is unknown (fewer than two distinct "
            "spot positions each), so the across kernel has no scale. Drop those sections or "
            "pass across='iou'."
        )
    return float(np.mean(known))


def _similar_spots(
    sections: list[Section],
    features: _Features,
    k: int,
    search: Literal["exact", "approximate"],
    max_gap: int | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """``{(i, j): (n_i, k) positions in section j}`` of the most similar spots (``-1``: none).

    The exact search skips pairs of sections more than ``max_gap`` apart (never linked).
    """
    if search == "approximate":
        rows = [s.rows for s in sections]
        return approximate_feature_neighbors(features.values, features.norms, rows, k)
    sizes = np.array([s.n_spots for s in sections], dtype=float)
    n_pairs = (sizes.sum() ** 2 - (sizes**2).sum()) / 2
    if n_pairs > _MANY_PAIRS:
        logger.info(
            "Exact similarity search over whole sections: %.2g pairs of spots, a cost that "
            "grows with the square of the stack. feature_search='approximate' (or 'auto') "
            "finds the candidates with a faiss index instead.",
            n_pairs,
        )
    unit = [features.unit(s.rows) for s in sections]
    similar: dict[tuple[int, int], np.ndarray] = {}
    for i, j in combinations(range(len(sections)), 2):
        if not _too_far(i, j, max_gap):
            similar[i, j], similar[j, i] = feature_neighbors(unit[i], unit[j], k)
    return similar


def _symmetrise(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, dists: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Union of the edges and their reverses (values are symmetric, so duplicates agree)."""
    rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    weights, dists = np.concatenate([weights, weights]), np.concatenate([dists, dists])
    _, unique = np.unique(rows * n + cols, return_index=True)
    return rows[unique], cols[unique], weights[unique], dists[unique]


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
    """CSR matrix of unique edges; explicit zeros are kept so all graph matrices share a pattern."""
    matrix = sp.coo_matrix((values, (rows, cols)), shape=(n, n)).tocsr()
    matrix.sort_indices()
    return matrix


def _section_codes(table: AnnData, library_key: str) -> np.ndarray:
    import pandas as pd

    return pd.Categorical(table.obs[library_key].astype(str)).codes.astype(np.int64)
