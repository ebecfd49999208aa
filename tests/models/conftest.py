from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from asign_sc.models._propagation import adjacency_tensor


def knn_graph(points: np.ndarray, k: int = 6) -> sp.csr_matrix:
    """Symmetric inverse-distance kNN graph (squidpy-style connectivities)."""
    dist, idx = cKDTree(points).query(points, k=k + 1)
    n = len(points)
    rows = np.repeat(np.arange(n), k)
    cols = idx[:, 1:].ravel()
    w = 1.0 / (1.0 + dist[:, 1:].ravel())
    graph = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


class Toy:
    """Random multi-level features on a kNN graph over a 3-section stack."""

    def __init__(self, n: int = 60, dims=(16, 12, 10), tokens=(4, 9), n_genes: int = 7, seed=0):
        rng = np.random.default_rng(seed)
        xyz = np.c_[rng.uniform(0, 10, size=(n, 2)), np.repeat([0, 1, 2], n // 3)[:n]]
        self.graph = knn_graph(xyz)
        coo = self.graph.tocoo()
        self.edge_index = torch.from_numpy(np.vstack([coo.col, coo.row]).astype(np.int64))
        self.edge_weight = torch.from_numpy(coo.data.astype(np.float32))
        self.adjacency = adjacency_tensor(self.graph)
        g = torch.Generator().manual_seed(seed)
        self.spot = torch.randn(n, dims[0], generator=g)
        self.region = torch.randn(n, tokens[0], dims[1], generator=g)
        self.glob = torch.randn(n, tokens[1], dims[2], generator=g)
        self.values = torch.randn(n, n_genes, generator=g)
        self.known = torch.from_numpy(xyz[:, 2] == 0)
        self.n, self.dims, self.n_genes = n, dims, n_genes


@pytest.fixture
def toy() -> Toy:
    return Toy()


def toy_plan(
    toy: Toy,
    config,
    *,
    pool_pos: np.ndarray,
    val_pos: np.ndarray,
    rng: np.random.Generator,
    batch_size: int | None = None,
    graph_attention: bool = True,
):
    """A :class:`~asign_sc.models.TrainingPlan` of a small network on ``toy``, 3 epochs."""
    from asign_sc.models import ASIGNNet, GraphInputs
    from asign_sc.models._training import TrainingPlan

    known = np.flatnonzero(toy.known.numpy())
    targets = toy.values.numpy()[known]
    torch.manual_seed(0)
    net = ASIGNNet(
        *toy.dims, toy.n_genes, hidden_dim=16, n_gat_layers=2, graph_attention=graph_attention
    )
    inputs = GraphInputs(
        toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight, toy.adjacency
    )
    return TrainingPlan(
        net,
        config,
        3,
        inputs,
        known,
        targets,
        {level: targets[pool_pos] for level in ("spot", "region", "global")},
        pool_pos=pool_pos,
        val_pos=val_pos,
        rng=rng,
        device=torch.device("cpu"),
        batch_size=batch_size,
        tile_coords=np.random.default_rng(1).uniform(size=(len(known), 2)),
    )
