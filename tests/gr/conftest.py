"""Small section stacks for the graph tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

PITCH = 100.0
RADIUS = 27.5


def _make_stack(
    n_sections: int = 3,
    grid: tuple[int, int] = (8, 6),
    *,
    seed: int = 0,
    jitter: float = 25.0,
    shift: float = 30.0,
    n_samples: int = 1,
    feature_dim: int | None = None,
    radii: list[float] | None = None,
) -> ad.AnnData:
    """Jittered-grid sections in a legacy AnnData; obsm['spatial'] is the common frame."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]))
    base = np.c_[gx.ravel(), gy.ravel()] * PITCH
    xy, section, sample, spatial = [], [], [], {}
    names = []
    for p in range(n_samples):
        for s in range(n_sections):
            name = f"p{p}s{s}"
            names.append(name)
            pts = base + rng.normal(0, jitter, base.shape) + rng.uniform(-shift, shift, 2)
            xy.append(pts)
            section += [name] * len(pts)
            sample += [f"p{p}"] * len(pts)
            r = RADIUS if radii is None else radii[s]
            spatial[name] = {"scalefactors": {"spot_diameter_fullres": 2 * r}}
    n = len(section)
    adata = ad.AnnData(np.zeros((n, 2), dtype=np.float32))
    adata.obs_names = [f"spot{i}" for i in range(n)]
    adata.obs["section"] = pd.Categorical(section, categories=names)
    adata.obs["sample"] = pd.Categorical(sample)
    adata.obsm["spatial"] = np.concatenate(xy)
    adata.uns["spatial"] = spatial
    if feature_dim is not None:
        adata.obsm["feat"] = rng.normal(size=(n, feature_dim)).astype(np.float32)
    return adata


@pytest.fixture
def make_stack():
    """Factory of jittered-grid stacks (see :func:`_make_stack`)."""
    return _make_stack


def _clustered_features(
    n: int, dim: int, *, n_clusters: int = 12, rank: int = 8, spread: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Image-like features: cluster centres plus variation along a few shared directions.

    Within a cluster, the neighbours of a spot are decided by ``rank`` directions (plus a
    little isotropic noise), the low-dimensional structure that real embeddings have.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    directions = rng.normal(size=(rank, dim))
    label = rng.integers(0, n_clusters, n)
    values = (
        centres[label]
        + spread * rng.normal(size=(n, rank)) @ directions
        + 0.05 * rng.normal(size=(n, dim))
    )
    return values.astype(np.float32)


@pytest.fixture
def clustered_features():
    """Factory of clustered feature matrices (see :func:`_clustered_features`)."""
    return _clustered_features
