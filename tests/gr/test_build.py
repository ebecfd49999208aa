from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from asign_sc import InvalidStackError, Key
from asign_sc.gr import build_3d_graph, circle_iou, split_graph

#: Spot radius of the stacks of the ``make_stack`` fixture (tests/gr/conftest.py).
RADIUS = 27.5


def brute_force_edges(
    adata: ad.AnnData,
    *,
    k_within: int,
    k_across: int,
    features_key: str | None,
    radius: dict[str, float],
    sample_key: str | None = None,
    similarity_radius: float | None = None,
) -> dict[tuple[int, int], float]:
    """All-pairs construction of the graph's edges and weights (the definition, no search)."""
    xy = adata.obsm["spatial"]
    section = adata.obs["section"].astype(str).to_numpy()
    sample = adata.obs[sample_key].astype(str).to_numpy() if sample_key else np.zeros(len(xy))
    r = np.array([radius[s] for s in section])
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    w_across = circle_iou(d, r[:, None], r[None, :])
    if features_key is not None:
        f = adata.obsm[features_key].astype(float)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        w_across = w_across + np.maximum(f @ f.T, 0)
    if similarity_radius is not None:
        reach = np.maximum(similarity_radius, r[:, None] + r[None, :])
        w_across = np.where(d <= reach, w_across, 0.0)
    edges: dict[tuple[int, int], float] = {}
    for name in np.unique(section):
        idx = np.flatnonzero(section == name)
        dd = d[np.ix_(idx, idx)] + np.diag(np.full(len(idx), np.inf))
        pitch = np.median(dd.min(axis=1))
        for row, i in enumerate(idx):
            for j in np.argsort(dd[row], kind="stable")[:k_within]:
                edges[i, idx[j]] = min(1.0, pitch / dd[row, j])
    for i in range(len(xy)):
        others = np.flatnonzero((section != section[i]) & (sample == sample[i]))
        w = w_across[i, others]
        order = np.lexsort((others, -w))
        for j in order[:k_across]:
            if w[j] > 0:
                edges[i, others[j]] = w[j]
    return edges


def graph_edges(adata: ad.AnnData, key: str = "spatial3d") -> dict[tuple[int, int], float]:
    conn = adata.obsp[f"{key}_connectivities"].tocoo()
    return {
        (int(i), int(j)): float(v) for i, j, v in zip(conn.row, conn.col, conn.data, strict=True)
    }


def assert_same_edges(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    np.testing.assert_allclose(
        [got[e] for e in expected], [expected[e] for e in expected], rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("feature_dim", [None, 5])
def test_matches_brute_force(seed, feature_dim, make_stack):
    adata = make_stack(
        4, (7, 6), seed=seed, feature_dim=feature_dim, radii=[27.5, 40.0, 20.0, 33.0]
    )
    feature_key = "feat" if feature_dim else None
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key=feature_key,
        n_neighs_within=6,
        n_neighs_across=5,
        across="iou",
    )
    radius = {f"p0s{s}": r for s, r in enumerate([27.5, 40.0, 20.0, 33.0])}
    expected = brute_force_edges(
        adata, k_within=6, k_across=5, features_key=feature_key, radius=radius
    )
    assert_same_edges(graph_edges(adata), expected)


def test_matches_brute_force_with_blockwise_torch_search(monkeypatch, make_stack):
    from asign_sc.gr import _search

    monkeypatch.setattr(_search, "_SMALL_ELEMENTS", 0)
    monkeypatch.setattr(_search, "_BLOCK_ELEMENTS", 100)
    adata = make_stack(3, (7, 6), seed=3, feature_dim=7)
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", n_neighs_across=6, across="iou"
    )
    expected = brute_force_edges(
        adata,
        k_within=8,
        k_across=6,
        features_key="feat",
        radius=dict.fromkeys(adata.obs["section"].cat.categories, RADIUS),
    )
    assert_same_edges(graph_edges(adata), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_similarity_radius_matches_brute_force(seed, make_stack):
    radii = [27.5, 40.0, 20.0]
    adata = make_stack(3, (7, 6), seed=seed, feature_dim=5, radii=radii)
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key="feat",
        n_neighs_across=5,
        similarity_radius=150.0,
        across="iou",
    )
    expected = brute_force_edges(
        adata,
        k_within=8,
        k_across=5,
        features_key="feat",
        radius={f"p0s{s}": r for s, r in enumerate(radii)},
        similarity_radius=150.0,
    )
    assert_same_edges(graph_edges(adata), expected)
    assert adata.uns["spatial3d_neighbors"]["params"]["similarity_radius"] == 150.0
    _, across = split_graph(adata)
    rows, cols = across.nonzero()
    assert (
        np.linalg.norm(adata.obsm["spatial"][rows] - adata.obsm["spatial"][cols], axis=1).max()
        <= 150.0
    )


def test_matches_brute_force_with_samples_and_no_edges_between_them(make_stack):
    adata = make_stack(3, (6, 5), seed=4, n_samples=2, shift=0.0, feature_dim=8)
    # The two samples lie on top of each other: only sample_key keeps them apart.
    build_3d_graph(
        adata,
        spatial_key="spatial",
        sample_key="sample",
        features_key="feat",
        n_neighs_across=4,
        across="iou",
    )
    expected = brute_force_edges(
        adata,
        k_within=8,
        k_across=4,
        features_key="feat",
        radius=dict.fromkeys(adata.obs["section"].cat.categories, RADIUS),
        sample_key="sample",
    )
    got = graph_edges(adata)
    assert_same_edges(got, expected)
    sample = adata.obs["sample"].to_numpy()
    assert all(sample[i] == sample[j] for i, j in got)


def test_default_candidates_are_exact_and_fewer_are_a_subset_of_candidates(make_stack):
    adata = make_stack(3, (8, 8), seed=5, feature_dim=6)
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", across="iou", n_neighs_across=6
    )
    exact = graph_edges(adata)
    _, exact_across = split_graph(adata)
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key="feat",
        across="iou",
        n_neighs_across=6,
        across_candidates=40,
    )
    assert_same_edges(graph_edges(adata), exact)
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key="feat",
        across="iou",
        n_neighs_across=6,
        across_candidates=1,
    )
    assert adata.uns["spatial3d_neighbors"]["params"]["across_candidates"] == 1
    # Each across edge is an overlap or the single most similar spot of that section.
    _, across = split_graph(adata)
    xy, feat = adata.obsm["spatial"], adata.obsm["feat"].astype(float)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    codes = adata.obs["section"].cat.codes.to_numpy()
    for i, j in zip(*across.nonzero(), strict=True):
        overlapping = np.linalg.norm(xy[i] - xy[j]) < 2 * RADIUS
        same = np.flatnonzero(codes == codes[j])
        assert overlapping or same[np.argmax(feat[same] @ feat[i])] == j
    assert 0 < across.nnz < exact_across.nnz


def test_auto_search_is_exact_on_small_stacks_and_recorded(make_stack):
    adata = make_stack(3, (8, 8), seed=5, feature_dim=6)
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", across="iou", n_neighs_across=6
    )
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["feature_search"] == "exact" and params["approximate_search"] == "None"
    exact = graph_edges(adata)
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key="feat",
        across="iou",
        n_neighs_across=6,
        feature_search="exact",
    )
    assert graph_edges(adata) == exact
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=6, similarity=None, across="iou")
    assert adata.uns["spatial3d_neighbors"]["params"]["feature_search"] == "None"
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", across="iou", similarity_radius=200.0
    )
    assert adata.uns["spatial3d_neighbors"]["params"]["feature_search"] == "None"


def test_auto_search_is_approximate_on_large_sections(monkeypatch, make_stack):
    from asign_sc.gr import _ann

    adata = make_stack(3, (8, 8), seed=5, feature_dim=6)
    monkeypatch.setattr(_ann, "EXACT_MAX_WORK", 64 * 64 * 6 - 1)
    build_3d_graph(adata, spatial_key="spatial", features_key="feat", across="iou")
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["feature_search"] == "approximate"
    assert params["approximate_search"]["search_dim"] == 64


def test_approximate_search_recalls_the_exact_edges(clustered_features, make_stack):
    adata = make_stack(4, (30, 30), seed=30)
    adata.obsm["feat"] = clustered_features(adata.n_obs, 40, seed=30)
    found = {}
    for search in ("exact", "approximate"):
        build_3d_graph(
            adata, spatial_key="spatial", features_key="feat", across="iou", feature_search=search
        )
        assert adata.uns["spatial3d_neighbors"]["params"]["feature_search"] == search
        found[search] = graph_edges(adata)
    exact, approximate = found["exact"], found["approximate"]
    shared = exact.keys() & approximate.keys()
    assert len(shared) / len(exact) >= 0.99
    # Weights are exact for every edge found, whichever search found it.
    np.testing.assert_allclose(
        [approximate[e] for e in shared], [exact[e] for e in shared], rtol=0, atol=1e-12
    )
    params = adata.uns["spatial3d_neighbors"]["params"]["approximate_search"]
    assert params["index"].startswith("faiss.IndexHNSWFlat") and params["M"] > 0


def test_approximate_search_on_a_small_stack_is_the_exact_graph(make_stack):
    adata = make_stack(3, (8, 8), seed=5, feature_dim=6)
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", across="iou", n_neighs_across=6
    )
    exact = graph_edges(adata)
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key="feat",
        across="iou",
        n_neighs_across=6,
        feature_search="approximate",
        n_jobs=1,
    )
    assert_same_edges(graph_edges(adata), exact)
    assert adata.uns["spatial3d_neighbors"]["params"]["n_jobs"] == 1


def test_degrees_and_weight_ranges(make_stack):
    adata = make_stack(3, (8, 6), seed=6, feature_dim=4)
    build_3d_graph(adata, spatial_key="spatial", features_key="feat", across="iou")
    within, across = split_graph(adata)
    assert np.all(within.getnnz(axis=1) == 8)
    assert np.all(across.getnnz(axis=1) == 12)  # features make every candidate positive
    assert within.data.min() > 0 and within.data.max() == 1.0
    assert across.data.min() > 0 and across.data.max() <= 2.0


def test_symmetric_option(make_stack):
    adata = make_stack(3, (6, 6), seed=7, feature_dim=3)
    build_3d_graph(adata, spatial_key="spatial", features_key="feat", n_neighs_across=4)
    directed = adata.obsp["spatial3d_connectivities"].copy()
    build_3d_graph(
        adata, spatial_key="spatial", features_key="feat", n_neighs_across=4, symmetric=True
    )
    conn = adata.obsp["spatial3d_connectivities"]
    dist = adata.obsp["spatial3d_distances"]
    assert (conn != conn.T).nnz == 0 and (dist != dist.T).nnz == 0
    assert conn.nnz > directed.nnz
    # Every directed edge is kept with its weight.
    rows, cols = directed.nonzero()
    np.testing.assert_allclose(
        np.asarray(conn[rows, cols]).ravel(), np.asarray(directed[rows, cols]).ravel()
    )
    assert adata.uns["spatial3d_neighbors"]["params"]["symmetric"]


def test_identical_points_across_and_within_sections(make_stack):
    adata = make_stack(2, (4, 4), seed=8, jitter=10.0)
    xy = adata.obsm["spatial"]
    n = len(xy) // 2
    xy[1] = xy[0]  # two coincident spots within section 1
    xy[n:] = xy[:n]  # section 2 is an exact copy of section 1
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=3)
    conn, dist = adata.obsp["spatial3d_connectivities"], adata.obsp["spatial3d_distances"]
    # Each spot's strongest across edge is its twin, with IoU 1.
    for i in range(n):
        assert conn[i, i + n] == pytest.approx(1.0)
        assert conn[i + n, i] == pytest.approx(1.0)
    # Coincident spots: weight 1, distance 0 stored explicitly, same pattern everywhere.
    assert conn[0, 1] == 1.0 and conn[1, 0] == 1.0
    assert np.array_equal(conn.indptr, dist.indptr) and np.array_equal(conn.indices, dist.indices)
    i0 = dist.indices[dist.indptr[0] : dist.indptr[1]].tolist().index(1)
    assert dist.data[dist.indptr[0] + i0] == 0.0
    assert np.all(np.isfinite(conn.data))


def test_section_with_one_spot(make_stack):
    adata = make_stack(2, (5, 5), seed=9)
    lonely = adata[:26].copy()  # section 1 (25 spots) and one spot of section 2
    build_3d_graph(lonely, spatial_key="spatial")
    within, across = split_graph(lonely)
    assert within[25].nnz == 0
    assert within.getnnz(axis=1)[:25].min() == 8
    assert across[25].nnz >= 0 and across.nnz > 0


def test_disjoint_sections_give_iou_zero_and_a_warning(caplog, make_stack):
    adata = make_stack(3, (5, 5), seed=10)
    second = adata.obs["section"] == "p0s1"
    adata.obsm["spatial"][second.to_numpy()] += 1e5
    with caplog.at_level(logging.WARNING, logger="asign_sc"):
        build_3d_graph(adata, spatial_key="spatial")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'p0s0' and 'p0s1'" in m for m in messages)
    assert any("'p0s1' and 'p0s2'" in m for m in messages)
    _, across = split_graph(adata)
    codes = adata.obs["section"].cat.codes.to_numpy()
    rows, cols = across.nonzero()
    assert not np.any((codes[rows] == 1) | (codes[cols] == 1))
    assert across.nnz > 0  # sections 0 and 2 still overlap


def test_note_without_features_and_default_feature_key(caplog, make_stack):
    adata = make_stack(2, (4, 4), seed=11)
    with caplog.at_level(logging.INFO, logger="asign_sc"):
        build_3d_graph(adata, spatial_key="spatial", across="iou")
    assert any("IoU) alone" in r.getMessage() for r in caplog.records)
    assert adata.uns["spatial3d_neighbors"]["params"]["features_key"] == "None"
    adata.obsm[Key.obsm.features("asign", "spot")] = np.abs(
        np.random.default_rng(0).normal(size=(adata.n_obs, 4))
    )
    build_3d_graph(adata, spatial_key="spatial", across="iou")
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["features_key"] == "X_asign_spot"
    assert params["across_weight"] == "IoU + max(cosine, 0)"
    build_3d_graph(adata, spatial_key="spatial", similarity=None, across="iou")
    assert adata.uns["spatial3d_neighbors"]["params"]["across_weight"] == "IoU"
    # The default kernel: the same features as a factor.
    build_3d_graph(adata, spatial_key="spatial")
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["features_key"] == "X_asign_spot" and params["across"] == "kernel"
    assert params["across_weight"].endswith("* max(cosine, 0)")


def test_storage_keys_params_and_h5ad_roundtrip(tmp_path, make_stack):
    adata = make_stack(3, (4, 4), seed=12, feature_dim=3)
    adata.obsm["spatial_aligned"] = adata.obsm["spatial"].copy()
    out = build_3d_graph(adata, features_key="feat", key_added="g3", section_spacing=50.0)
    assert out is None
    assert isinstance(adata.obsp["g3_connectivities"], sp.csr_matrix)
    assert isinstance(adata.obsp["g3_distances"], sp.csr_matrix)
    info = adata.uns["g3_neighbors"]
    assert info["connectivities_key"] == "g3_connectivities"
    assert info["distances_key"] == "g3_distances"
    params = info["params"]
    assert params["spatial_key"] == "spatial_aligned"
    assert params["n_neighs_within"] == 8 and params["n_neighs_across"] == 12
    assert params["section_spacing"] == 50.0
    assert params["across"] == "kernel" and params["across_candidates"] == "None"
    assert params["kernel_width"] == 2.0 and params["across_radius"] == 3.5
    assert params["spot_radius"] == {f"p0s{s}": RADIUS for s in range(3)}
    assert (
        params["n_edges_within"] + params["n_edges_across"] == adata.obsp["g3_connectivities"].nnz
    )
    path = tmp_path / "graph.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.obsp["g3_connectivities"] != adata.obsp["g3_connectivities"]).nnz == 0
    assert back.uns["g3_neighbors"]["params"]["pitch"].keys() == params["pitch"].keys()


def test_section_spacing_makes_across_distances_3d(make_stack):
    adata = make_stack(3, (5, 5), seed=13)
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=4)
    flat = adata.obsp["spatial3d_distances"].copy()
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=4, section_spacing=40.0)
    deep = adata.obsp["spatial3d_distances"]
    codes = adata.obs["section"].cat.codes.to_numpy()
    rows = np.repeat(np.arange(deep.shape[0]), np.diff(deep.indptr))
    gap = np.abs(codes[rows] - codes[deep.indices])
    np.testing.assert_allclose(deep.data, np.hypot(flat.data, 40.0 * gap))
    assert gap.max() == 2  # top-k reaches past the adjacent section too


def test_radius_follows_the_scale_of_the_aligned_frame(caplog, make_stack):
    adata = make_stack(2, (5, 5), seed=14)
    build_3d_graph(adata, spatial_key="spatial")
    reference = adata.obsp["spatial3d_connectivities"].copy()
    theta = 0.4
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    adata.obsm["spatial_aligned"] = 2.5 * adata.obsm["spatial"] @ rot.T + 1000.0
    with caplog.at_level(logging.INFO, logger="asign_sc"):
        build_3d_graph(adata)
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["radius_scale"]["p0s0"] == pytest.approx(2.5)
    assert params["spot_radius"]["p0s1"] == pytest.approx(2.5 * RADIUS)
    assert any("scaled by 2.5" in r.getMessage() for r in caplog.records)
    # IoU and the normalised inverse distance are scale-free: same graph, same weights.
    conn = adata.obsp["spatial3d_connectivities"]
    np.testing.assert_allclose(conn.toarray(), reference.toarray(), atol=1e-9)


def test_spot_radius_argument(make_stack):
    adata = make_stack(2, (5, 5), seed=15)
    build_3d_graph(adata, spatial_key="spatial", spot_radius={"p0s0": 10.0, "p0s1": 12.0})
    assert adata.uns["spatial3d_neighbors"]["params"]["spot_radius"] == {"p0s0": 10.0, "p0s1": 12.0}
    with pytest.raises(ValueError, match="no entry for section 'p0s1'"):
        build_3d_graph(adata, spatial_key="spatial", spot_radius={"p0s0": 10.0})
    with pytest.raises(ValueError, match="must be > 0"):
        build_3d_graph(adata, spatial_key="spatial", spot_radius=0.0)


def test_copy_leaves_input_untouched(make_stack):
    adata = make_stack(2, (4, 4), seed=16)
    out = build_3d_graph(adata, spatial_key="spatial", copy=True)
    assert "spatial3d_connectivities" in out.obsp
    assert "spatial3d_connectivities" not in adata.obsp
    assert "spatial3d_neighbors" not in adata.uns


def test_errors_say_what_to_do(make_stack):
    adata = make_stack(2, (4, 4), seed=17, feature_dim=3)
    with pytest.raises(InvalidStackError, match="register_sections"):
        build_3d_graph(adata)
    with pytest.raises(InvalidStackError, match=r"nor obsm\['nope'\] exists"):
        build_3d_graph(adata, spatial_key="spatial", features_key="nope")
    adata.obsm["feat"][3] = 0
    with pytest.raises(InvalidStackError, match="all-zero features"):
        build_3d_graph(adata, spatial_key="spatial", features_key="feat")
    with pytest.raises(ValueError, match="n_neighs_across"):
        build_3d_graph(adata, spatial_key="spatial", n_neighs_across=-1)
    with pytest.raises(ValueError, match="similarity"):
        build_3d_graph(adata, spatial_key="spatial", similarity="euclidean")
    with pytest.raises(ValueError, match="similarity_radius"):
        build_3d_graph(adata, spatial_key="spatial", similarity_radius=-1.0)
    with pytest.raises(ValueError, match="section_spacing"):
        build_3d_graph(adata, spatial_key="spatial", section_spacing=0.0)
    with pytest.raises(ValueError, match="feature_search must be one of"):
        build_3d_graph(adata, spatial_key="spatial", feature_search="hnsw")
    with pytest.raises(ValueError, match="n_jobs"):
        build_3d_graph(adata, spatial_key="spatial", n_jobs=0)
    one = make_stack(1, (4, 4), seed=18)
    with pytest.raises(InvalidStackError, match="at least 2 sections"):
        build_3d_graph(one, spatial_key="spatial")
    two_samples = make_stack(2, (3, 3), seed=19, n_samples=2)
    two_samples = two_samples[two_samples.obs["section"] != "p1s1"].copy()
    with pytest.raises(InvalidStackError, match="sample 'p1'"):
        build_3d_graph(two_samples, spatial_key="spatial", sample_key="sample")
    nan = make_stack(2, (3, 3), seed=20)
    nan.obsm["spatial_aligned"] = nan.obsm["spatial"].copy()
    nan.obsm["spatial_aligned"][2] = np.nan
    with pytest.raises(InvalidStackError, match="NaN"):
        build_3d_graph(nan)


def test_zero_neighbours_of_a_kind(make_stack):
    adata = make_stack(2, (4, 4), seed=21)
    build_3d_graph(adata, spatial_key="spatial", n_neighs_within=0)
    within, across = split_graph(adata)
    assert within.nnz == 0 and across.nnz > 0
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=0)
    within, across = split_graph(adata)
    assert within.nnz > 0 and across.nnz == 0


def test_squidpy_nhood_enrichment_accepts_the_graph(make_stack):
    sq = pytest.importorskip("squidpy")
    adata = make_stack(3, (6, 6), seed=22)
    rng = np.random.default_rng(0)
    adata.obs["cluster"] = pd.Categorical(rng.choice(["a", "b", "c"], adata.n_obs))
    build_3d_graph(adata, spatial_key="spatial")
    result = sq.gr.nhood_enrichment(
        adata,
        cluster_key="cluster",
        connectivity_key="spatial3d",
        n_perms=20,
        seed=0,
        copy=True,
        show_progress_bar=False,
    )
    zscore, counts = result
    assert zscore.shape == (3, 3) and counts.sum() == adata.obsp["spatial3d_connectivities"].nnz


def test_spatialdata_input(synthetic_small, make_stack):
    sdata, truth = synthetic_small
    table = sdata.tables["table"]
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    aligned = np.empty_like(xy)
    for name, matrix in truth.transforms.items():
        rows = (table.obs["section"] == name).to_numpy()
        aligned[rows] = np.c_[xy[rows], np.ones(rows.sum())] @ np.asarray(matrix)[:2].T
    table.obsm["spatial_aligned"] = aligned
    build_3d_graph(sdata, across="iou")
    within, across = split_graph(sdata)
    assert within.nnz > 0 and across.nnz > 0
    params = table.uns["spatial3d_neighbors"]["params"]
    # Rigid (possibly mirrored) maps: the radius needs no rescaling.
    assert all(v == pytest.approx(1.0) for v in params["radius_scale"].values())
    # Without features, across edges are overlaps: centres closer than two radii, and every
    # pair of adjacent sections is linked.
    rows, cols = across.nonzero()
    radius = max(params["spot_radius"].values())
    assert np.linalg.norm(aligned[rows] - aligned[cols], axis=1).max() < 2 * radius
    codes = table.obs["section"].cat.codes.to_numpy()
    linked = {tuple(sorted(p)) for p in zip(codes[rows], codes[cols], strict=True)}
    assert {(0, 1), (1, 2)} <= linked


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:squidpy.*")
@pytest.mark.filterwarnings("ignore:No data for colormapping:UserWarning")
def test_squidpy_spatial_scatter_draws_the_graph(make_stack):
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = make_stack(2, (4, 4), seed=23)
    for library in adata.uns["spatial"].values():
        library["scalefactors"]["tissue_hires_scalef"] = 1.0
    build_3d_graph(adata, spatial_key="spatial")
    sq.pl.spatial_scatter(
        adata,
        shape=None,
        color="section",
        library_key="section",
        img=False,
        connectivity_key="spatial3d_connectivities",
    )
    axes = plt.gcf().axes
    # One panel per section, each with the section's within-section edges drawn.
    assert len([ax for ax in axes if ax.collections]) >= 2
    assert all(len(ax.collections) >= 2 for ax in axes if ax.collections)
    plt.close("all")
