"""The default across-section neighbourhood: nearest spots per section, Gaussian weights."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from asign_sc.gr import build_3d_graph, circle_iou, gaussian_overlap, split_graph


def brute_force_kernel_edges(
    adata: ad.AnnData,
    *,
    k: int,
    width: float,
    reach: float,
    radius: dict[str, float],
    features_key: str | None = None,
    sample_key: str | None = None,
) -> dict[tuple[int, int], float]:
    """All-pairs construction of the kernel's across edges (the definition, no search)."""
    xy = adata.obsm["spatial"]
    section = adata.obs["section"].astype(str).to_numpy()
    sample = adata.obs[sample_key].astype(str).to_numpy() if sample_key else np.zeros(len(xy))
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    pitch = {}
    for name in np.unique(section):
        idx = np.flatnonzero(section == name)
        dd = d[np.ix_(idx, idx)] + np.diag(np.full(len(idx), np.inf))
        pitch[name] = np.median(dd.min(axis=1))
    cosine = None
    if features_key is not None:
        f = adata.obsm[features_key].astype(float)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        cosine = f @ f.T
    edges: dict[tuple[int, int], float] = {}
    for i in range(len(xy)):
        for name in np.unique(section[sample == sample[i]]):
            if name == section[i]:
                continue
            p = (pitch[section[i]] + pitch[name]) / 2
            others = np.flatnonzero(section == name)
            near = others[np.argsort(d[i, others], kind="stable")[:k]]
            for j in near[d[i, near] <= reach * p]:
                r1, r2 = radius[section[i]], radius[name]
                w = (min(r1, r2) / max(r1, r2)) ** 2 * np.exp(-0.5 * (d[i, j] / (width * p)) ** 2)
                if cosine is not None:
                    w *= max(cosine[i, j], 0.0)
                if w > 0:
                    edges[i, j] = w
    return edges


def across_edges(adata: ad.AnnData) -> dict[tuple[int, int], float]:
    _, across = split_graph(adata)
    across = across.tocoo()
    return {
        (int(i), int(j)): float(v)
        for i, j, v in zip(across.row, across.col, across.data, strict=True)
    }


def test_gaussian_overlap_is_the_iou_at_zero_and_falls_smoothly():
    radii = np.array([[27.5, 27.5], [27.5, 40.0], [20.0, 33.0]])
    np.testing.assert_allclose(
        gaussian_overlap(0.0, radii[:, 0], radii[:, 1], 50.0),
        circle_iou(0.0, radii[:, 0], radii[:, 1]),
        rtol=1e-12,
    )
    assert gaussian_overlap(0.0, 27.5, 27.5, 10.0) == 1.0
    d = np.linspace(0, 500, 101)
    w = gaussian_overlap(d, 27.5, 27.5, 100.0)
    assert np.all(np.diff(w) < 0) and w.min() > 0  # never 0, unlike the IoU past 2 radii
    assert gaussian_overlap(100.0, 27.5, 27.5, 100.0) == pytest.approx(np.exp(-0.5))
    assert circle_iou(60.0, 27.5, 27.5) == 0 and gaussian_overlap(60.0, 27.5, 27.5, 100.0) > 0.8
    with pytest.raises(ValueError, match="width"):
        gaussian_overlap(1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_overlap(-1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("feature_dim", [None, 5])
def test_kernel_edges_match_brute_force(seed, feature_dim, make_stack):
    radii = [27.5, 40.0, 20.0, 33.0]
    adata = make_stack(4, (7, 6), seed=seed, feature_dim=feature_dim, radii=radii)
    feature_key = "feat" if feature_dim else None
    build_3d_graph(
        adata,
        spatial_key="spatial",
        features_key=feature_key,
        n_neighs_across=3,
        kernel_width=1.5,
        across_radius=2.0,
    )
    expected = brute_force_kernel_edges(
        adata,
        k=3,
        width=1.5,
        reach=2.0,
        radius={f"p0s{s}": r for s, r in enumerate(radii)},
        features_key=feature_key,
    )
    got = across_edges(adata)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose(
        [got[e] for e in expected], [expected[e] for e in expected], rtol=1e-12
    )
    params = adata.uns["spatial3d_neighbors"]["params"]
    assert params["across"] == "kernel" and params["kernel_width"] == 1.5
    assert params["across_radius"] == 2.0
    assert params["across_weight"].startswith("IoU(0) * exp(")
    assert params["across_weight"].endswith("max(cosine, 0)") == (feature_dim is not None)


def test_k_per_other_section_and_the_radius_cut(make_stack):
    adata = make_stack(4, (8, 8), seed=3)
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=5)
    _, across = split_graph(adata)
    codes = adata.obs["section"].cat.codes.to_numpy()
    rows, cols = across.nonzero()
    per_pair = np.zeros((adata.n_obs, 4), dtype=int)
    np.add.at(per_pair, (rows, codes[cols]), 1)
    others = np.ones_like(per_pair, dtype=bool)
    others[np.arange(adata.n_obs), codes] = False
    # 5 from each of the 3 other sections (every spot has 5 within 3.5 pitches here).
    assert np.all(per_pair[others] == 5) and np.all(per_pair[~others] == 0)
    # A narrow radius keeps only close spots and leaves some spots with fewer.
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=5, across_radius=0.6)
    _, narrow = split_graph(adata)
    params = adata.uns["spatial3d_neighbors"]["params"]
    pitch = np.mean(list(params["pitch"].values()))
    rows, cols = narrow.nonzero()
    xy = adata.obsm["spatial"]
    assert np.linalg.norm(xy[rows] - xy[cols], axis=1).max() <= 0.6 * pitch * 1.05
    assert 0 < narrow.nnz < across.nnz
    # The weight falls with the distance, 1 at coincidence for equal radii.
    assert across.data.max() <= 1.0 and across.data.min() > 0


def test_zero_distance_is_the_iou_and_the_twin_is_the_strongest_edge(make_stack):
    adata = make_stack(2, (4, 4), seed=8, jitter=10.0, radii=[27.5, 40.0])
    xy = adata.obsm["spatial"]
    n = len(xy) // 2
    xy[n:] = xy[:n]  # section 2 is a copy of section 1, with larger spots
    build_3d_graph(adata, spatial_key="spatial", n_neighs_across=3)
    conn = adata.obsp["spatial3d_connectivities"]
    at_zero = circle_iou(0.0, 27.5, 40.0)
    for i in range(n):
        assert conn[i, i + n] == pytest.approx(at_zero) and conn[i + n, i] == pytest.approx(at_zero)
        assert conn[i, n:].max() == pytest.approx(at_zero)


def test_no_edges_across_samples_and_deterministic(make_stack):
    adata = make_stack(3, (6, 5), seed=4, n_samples=2, shift=0.0, feature_dim=4)
    # The two samples lie on top of each other: only sample_key keeps them apart.
    build_3d_graph(adata, spatial_key="spatial", sample_key="sample", features_key="feat")
    first = adata.obsp["spatial3d_connectivities"].copy()
    sample = adata.obs["sample"].to_numpy()
    rows, cols = first.nonzero()
    assert np.all(sample[rows] == sample[cols])
    expected = brute_force_kernel_edges(
        adata,
        k=12,
        width=2.0,
        reach=3.5,
        radius=dict.fromkeys(adata.obs["section"].cat.categories, 27.5),
        features_key="feat",
        sample_key="sample",
    )
    assert across_edges(adata).keys() == expected.keys()
    build_3d_graph(adata, spatial_key="spatial", sample_key="sample", features_key="feat")
    again = adata.obsp["spatial3d_connectivities"]
    assert (again != first).nnz == 0


def test_kernel_options_are_checked(make_stack):
    adata = make_stack(2, (4, 4), seed=17)
    with pytest.raises(ValueError, match="across must be one of"):
        build_3d_graph(adata, spatial_key="spatial", across="overlap")
    with pytest.raises(ValueError, match="kernel_width"):
        build_3d_graph(adata, spatial_key="spatial", kernel_width=0.0)
    with pytest.raises(ValueError, match="across_radius"):
        build_3d_graph(adata, spatial_key="spatial", across_radius=np.inf)
    with pytest.raises(TypeError, match="across_radius"):
        build_3d_graph(adata, spatial_key="spatial", across_radius="3")
    assert "spatial3d_connectivities" not in adata.obsp


@pytest.mark.parametrize("across", ["kernel", "iou"])
def test_max_section_gap_links_only_nearby_sections(across, make_stack):
    adata = make_stack(5, (6, 6), seed=5, jitter=5.0, shift=5.0)
    codes = adata.obs["section"].cat.codes.to_numpy()
    build_3d_graph(adata, spatial_key="spatial", across=across)
    _, everything = split_graph(adata)
    build_3d_graph(adata, spatial_key="spatial", across=across, max_section_gap=1)
    _, adjacent = split_graph(adata)
    assert adata.uns["spatial3d_neighbors"]["params"]["max_section_gap"] == 1
    rows, cols = adjacent.nonzero()
    gaps = np.abs(codes[rows] - codes[cols])
    assert gaps.max() == 1 and adjacent.nnz < everything.nnz
    # With the kernel (k per other section) adjacent pairs keep exactly the edges they had;
    # the paper's top-k over all sections together may pick other ones.
    rows, cols = everything.nonzero()
    near = np.abs(codes[rows] - codes[cols]) == 1
    kept = everything.copy()
    kept.data = np.where(near, kept.data, 0.0)
    kept.eliminate_zeros()
    if across == "kernel":
        assert (kept != adjacent).nnz == 0
    # Every spot of a middle section has neighbours in both adjacent sections only.
    rows, cols = adjacent.nonzero()
    middle = codes[rows] == 2
    assert set(codes[cols[middle]]) == {1, 3}


def test_max_section_gap_is_checked(make_stack):
    adata = make_stack(2, (4, 4), seed=17)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_section_gap must be a positive number"):
            build_3d_graph(adata, spatial_key="spatial", max_section_gap=bad)
    assert "spatial3d_connectivities" not in adata.obsp
