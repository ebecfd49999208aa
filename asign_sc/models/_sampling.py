"""Subgraphs of the 3D spot graph for mini-batch training and bounded-memory inference.

A mini-batch is a spatially contiguous set of *seed* spots (a tile of the aligned xy plane,
so with several known sections a column through them) plus its ``k``-hop closure in the 3D
graph. With ``k`` equal to the number of graph-attention rounds the network's outputs at the
seeds are exactly those of a full-graph pass: a node's output after ``r`` rounds depends only
on nodes within ``r`` hops, and every node within ``k - r`` hops of a seed keeps all its
in-edges in the closure.

Training takes the closure of ``propagation_hops + r`` hops: its *core* (the nodes within
``propagation_hops`` hops, :attr:`Subgraph.n_core`) gets exact network outputs, for the
label propagation and the consistency term. The closure can instead be *sampled*
(:func:`sample_neighbors`), as GraphSAGE and torch_geometric's ``NeighborLoader`` do: every
node reached keeps at most ``num_neighbors`` of its in-edges (per hop; ``None`` keeps them
all, as training does on the core), drawn at random, so a subgraph's size is bounded by the
fan-out instead of the graph's degree and reach, and the outputs are a stochastic estimate
of the full-graph ones. ``NeighborLoader`` needs pyg-lib or torch-sparse for its sampler (neither
is installable here with the CPU torch), and its subgraphs would still have to be mapped to
our tiles, masks and propagation adjacency; the closure and the sampler here are
vectorised numpy on the CSR matrix of the graph (scipy), dependency-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from asign_sc._keys import Key
from asign_sc.models._data import GraphInputs

if TYPE_CHECKING:
    from asign_sc._stack import SectionStack

__all__ = [
    "GraphSampler",
    "MessageChunk",
    "Subgraph",
    "khop_closure",
    "khop_layers",
    "message_passing_chunks",
    "sample_layers",
    "sample_neighbors",
    "spatial_batches",
    "tile_coordinates",
]


def spatial_batches(coords: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split points into spatially contiguous batches of at most ``batch_size``.

    Recursive coordinate bisection: a set larger than ``batch_size`` is cut at the median of
    its longer axis, so batches are compact tiles of (nearly) equal size.

    Parameters
    ----------
    coords
        ``(n, 2)`` point positions (aligned xy: a tile then spans every section).
    batch_size
        Maximum points per batch.

    Returns
    -------
    Positions into ``coords``, one sorted array per batch, in a deterministic order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    coords = np.asarray(coords, dtype=float)
    batches: list[np.ndarray] = []
    stack = [np.arange(len(coords))]
    while stack:
        members = stack.pop()
        if len(members) <= batch_size:
            if len(members):
                batches.append(np.sort(members))
            continue
        points = coords[members]
        axis = int(np.argmax(np.ptp(points, axis=0)))
        order = members[np.argsort(points[:, axis], kind="stable")]
        half = len(order) // 2
        stack.extend([order[half:], order[:half]])
    return batches


def tile_coordinates(stack: SectionStack) -> np.ndarray:
    """``(n_obs, 2)`` positions the training tiles are cut in.

    The aligned frame (``obsm["spatial_aligned"]`` of :func:`asign_sc.tl.register_sections`)
    when present, so a tile is a column through all known sections; else each section's own
    spot centres.
    """
    table = stack.table
    if Key.obsm.spatial_aligned in table.obsm:
        coords = np.asarray(table.obsm[Key.obsm.spatial_aligned], dtype=float)[:, :2]
        if np.all(np.isfinite(coords)):
            return coords
    coords = np.zeros((table.n_obs, 2))
    for section in stack:
        coords[section.rows] = section.spatial
    return coords


def khop_layers(graph: sp.csr_matrix, seeds: np.ndarray, n_hops: int) -> list[np.ndarray]:
    """The seeds, then the nodes first reached at each of ``n_hops`` steps along ``graph``'s rows.

    Row ``i`` of ``graph`` lists the neighbours whose messages spot ``i`` receives, so the
    union is the set of nodes a ``n_hops``-round message passing at the seeds reads. The
    exact case of :func:`sample_layers` (every in-edge kept).

    Returns
    -------
    ``[seeds, hop 1, ..., hop k]`` (``k <= n_hops``: it stops when nothing new is reached),
    each hop's nodes in ascending order.
    """
    return sample_layers(graph, seeds, n_hops, [None] * n_hops)[0]


def khop_closure(graph: sp.csr_matrix, seeds: np.ndarray, n_hops: int) -> np.ndarray:
    """Seeds plus every node within ``n_hops`` steps along the rows of ``graph``.

    Returns
    -------
    Node indices: the seeds first (in the given order), then the nodes of each hop (see
    :func:`khop_layers`), so the nodes within ``k`` hops come before the others.
    """
    return np.concatenate(khop_layers(graph, seeds, n_hops))


def sample_neighbors(
    graph: sp.csr_matrix,
    seeds: np.ndarray,
    n_hops: int,
    num_neighbors: int | Sequence[int | None],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A fan-out-limited ``n_hops``-hop closure of ``seeds`` (GraphSAGE neighbour sampling).

    Hop by hop, every node reached for the first time keeps at most ``num_neighbors`` of its
    in-edges (row ``i`` of ``graph`` lists the sources of spot ``i``), drawn uniformly
    without replacement (all of them when it has fewer); their sources are the next hop's
    nodes. The nodes of the last hop keep no in-edges.

    Parameters
    ----------
    graph
        Targets x sources.
    seeds
        Node indices to start from.
    n_hops
        Hops of the closure.
    num_neighbors
        In-edges kept per node, one number for every hop or one per hop (``None``: all of
        them, as torch_geometric's ``NeighborLoader`` takes ``-1``).
    rng
        Random generator of the draws.

    Returns
    -------
    nodes
        Node indices: the seeds first (in the given order), then the others in the order
        they were reached.
    edges
        Positions into ``graph.indices`` / ``graph.data`` of the sampled edges (target: the
        row, source: the column).
    """
    layers, edges = sample_layers(graph, seeds, n_hops, num_neighbors, rng)
    return np.concatenate(layers), edges


def sample_layers(
    graph: sp.csr_matrix,
    seeds: np.ndarray,
    n_hops: int,
    num_neighbors: int | Sequence[int | None],
    rng: np.random.Generator | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`sample_neighbors` with the nodes as ``[seeds, hop 1, ...]`` (reached order).

    ``rng`` may be ``None`` when no hop samples (every entry of ``num_neighbors`` ``None``).
    """
    fanouts = [num_neighbors] * n_hops if not isinstance(num_neighbors, Sequence) else num_neighbors
    if len(fanouts) != n_hops:
        raise ValueError(f"num_neighbors needs one entry per hop ({n_hops}), got {fanouts}.")
    for fanout in fanouts:
        if fanout is not None and (isinstance(fanout, bool) or fanout < 1):
            raise ValueError(
                f"num_neighbors must be a positive integer or None (all), got {fanout}."
            )
    seeds = np.asarray(seeds, dtype=np.int64)
    indptr, indices = graph.indptr, graph.indices
    inside = np.zeros(graph.shape[0], dtype=bool)
    inside[seeds] = True
    frontier, reached, sampled = seeds, [seeds], []
    for fanout in fanouts:
        if not len(frontier):
            break
        starts = indptr[frontier]
        degrees = indptr[frontier + 1] - starts
        # every in-edge of the frontier (its position in the CSR arrays), with a random key;
        # the num_neighbors smallest keys of each row are a uniform sample of that row
        row = np.repeat(np.arange(len(frontier)), degrees)
        offsets = np.arange(len(row)) - np.repeat(np.cumsum(degrees) - degrees, degrees)
        positions = np.repeat(starts, degrees) + offsets
        if fanout is not None:
            if rng is None:
                raise ValueError("Sampling in-edges needs a random generator (rng).")
            order = np.lexsort((rng.random(len(row)), row))
            rank = np.empty(len(row), dtype=np.int64)
            rank[order] = offsets
            positions = positions[rank < fanout]
        sampled.append(positions)
        sources = np.unique(indices[positions])
        frontier = sources[~inside[sources]]
        inside[frontier] = True
        if len(frontier):
            reached.append(frontier)
    edges = np.concatenate(sampled) if sampled else np.zeros(0, dtype=np.int64)
    return reached, edges


@dataclass
class Subgraph:
    """The induced subgraph of some nodes, as network inputs."""

    nodes: np.ndarray
    """Table rows of the subgraph's nodes; the first ``n_seeds`` are the seeds."""
    n_seeds: int
    """Number of seed nodes (whose network outputs are exact)."""
    inputs: GraphInputs
    """Features, edges and adjacency of the subgraph (node ``k`` = table row ``nodes[k]``)."""
    n_core: int
    """Number of nodes within the sampler's ``core_hops`` of the seeds (the first ``n_core``,
    seeds included)."""


class GraphSampler:
    """Induced subgraphs (and ``k``-hop closures) of a stack's :class:`GraphInputs`.

    Parameters
    ----------
    inputs
        The stack's inputs (reduced features; any device).
    n_hops
        Hops of the closure around the seeds (at least the number of graph-attention rounds
        for exact network outputs at the seeds).
    core_hops
        Hops around the seeds that make a subgraph's *core* (:attr:`Subgraph.n_core`): with
        ``n_hops = core_hops + r`` and ``r`` graph-attention rounds, the network's outputs
        on the exact closure's core are those of a full-graph pass.
    """

    def __init__(self, inputs: GraphInputs, n_hops: int, *, core_hops: int = 0) -> None:
        if not 0 <= core_hops <= n_hops:
            raise ValueError(f"core_hops must be in [0, n_hops={n_hops}], got {core_hops}.")
        self.inputs, self.n_hops, self.core_hops = inputs, int(n_hops), int(core_hops)
        n = inputs.spot.shape[0]
        adjacency = inputs.adjacency.coalesce().cpu()
        rows, cols = adjacency.indices().numpy()
        self.adjacency = sp.csr_matrix(
            (adjacency.values().numpy(), (rows, cols)), shape=(n, n), dtype=np.float32
        )
        # edge_index is (source j, target i); the scaled attention weights as a CSR matrix of
        # targets x sources, so both slice the same way
        source, target = inputs.edge_index.cpu().numpy()
        self.attention = sp.csr_matrix(
            (inputs.edge_weight.cpu().numpy(), (target, source)), shape=(n, n), dtype=np.float32
        )

    def closure_layers(self, seeds: np.ndarray) -> list[np.ndarray]:
        """The ``n_hops``-hop closure of ``seeds`` (table rows) hop by hop (:func:`khop_layers`)."""
        return khop_layers(self.adjacency, seeds, self.n_hops)

    def closure_nodes(self, seeds: np.ndarray) -> np.ndarray:
        """The ``n_hops``-hop closure of ``seeds`` (table rows), the seeds first."""
        return np.concatenate(self.closure_layers(seeds))

    def closure(self, seeds: np.ndarray) -> Subgraph:
        """The ``n_hops``-hop closure of ``seeds`` (table rows) as a :class:`Subgraph`."""
        layers = self.closure_layers(seeds)
        return self.induced(
            np.concatenate(layers), n_seeds=len(seeds), n_core=self.core_size(layers)
        )

    def core_size(self, layers: list[np.ndarray]) -> int:
        """Nodes within ``core_hops`` of the seeds, given a closure's ``[seeds, hop 1, ...]``."""
        return sum(len(layer) for layer in layers[: self.core_hops + 1])

    def sampled(
        self,
        seeds: np.ndarray,
        num_neighbors: int | Sequence[int | None],
        rng: np.random.Generator,
    ) -> Subgraph:
        """A neighbour-sampled closure of ``seeds`` (:func:`sample_neighbors`), as a subgraph.

        ``num_neighbors``: in-edges kept per node, for every hop or per hop (``None``: all).
        Its graph-attention edges are the sampled ones; its propagation adjacency is the one
        induced by its nodes (the label propagation is a cheap sparse product, so it keeps
        every edge among the nodes it has).
        """
        layers, edges = sample_layers(self.attention, seeds, self.n_hops, num_neighbors, rng)
        return self.from_draw(seeds, layers, edges)

    def from_draw(self, seeds: np.ndarray, layers: list[np.ndarray], edges: np.ndarray) -> Subgraph:
        """The subgraph of a draw of :func:`sample_layers` (its layers and CSR positions)."""
        nodes = np.concatenate(layers)
        attention = self.attention
        # the row (target) of each sampled CSR position
        target = np.searchsorted(attention.indptr, edges, side="right") - 1
        local = np.full(attention.shape[0], -1, dtype=np.int64)
        local[nodes] = np.arange(len(nodes))
        edge_index = np.vstack([local[attention.indices[edges]], local[target]])
        return self.induced(
            nodes,
            n_seeds=len(seeds),
            edges=(edge_index, attention.data[edges]),
            n_core=self.core_size(layers),
        )

    def n_edges(self, nodes: np.ndarray) -> int:
        """Edges of the subgraph induced by ``nodes`` (without building it)."""
        return int(self.attention[nodes][:, nodes].nnz)

    def induced(
        self,
        nodes: np.ndarray,
        *,
        n_seeds: int | None = None,
        edges: tuple[np.ndarray, np.ndarray] | None = None,
        n_core: int | None = None,
    ) -> Subgraph:
        """The subgraph induced by ``nodes`` (table rows; the first ``n_seeds`` are seeds).

        ``edges``: local ``(2, n_edges)`` (source, target) indices and weights of the graph
        attention's edges, instead of all edges among ``nodes``; ``n_core``: the first nodes
        that make its core (default: the seeds).
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        device = self.inputs.spot.device
        index = torch.as_tensor(nodes, device=device)
        adjacency = self.adjacency[nodes][:, nodes].tocoo()
        if edges is None:
            attention = self.attention[nodes][:, nodes].tocoo()
            edge_index = np.vstack([attention.col, attention.row])
            edges = (edge_index, attention.data)
        n = len(nodes)
        adjacency_index = torch.from_numpy(
            np.vstack([adjacency.row, adjacency.col]).astype(np.int64)
        )
        inputs = GraphInputs(
            spot=self.inputs.spot[index],
            region_tokens=self.inputs.region_tokens[index],
            global_tokens=self.inputs.global_tokens[index],
            edge_index=torch.from_numpy(edges[0].astype(np.int64)).to(device),
            edge_weight=torch.from_numpy(np.asarray(edges[1], dtype=np.float32)).to(device),
            adjacency=torch.sparse_coo_tensor(
                adjacency_index,
                torch.from_numpy(adjacency.data),
                size=(n, n),
                check_invariants=False,  # indices come from a valid scipy matrix
            )
            .coalesce()
            .to(device),
        )
        n_seeds = n if n_seeds is None else int(n_seeds)
        return Subgraph(
            nodes=nodes,
            n_seeds=n_seeds,
            inputs=inputs,
            n_core=n_seeds if n_core is None else int(n_core),
        )


@dataclass
class MessageChunk:
    """A set of target nodes with every edge into them: one exact message-passing round."""

    targets: torch.Tensor
    """Global indices of the targets (local nodes ``0 .. len(targets) - 1``)."""
    nodes: torch.Tensor
    """Global indices of the local nodes: the targets, then their other sources."""
    edge_index: torch.Tensor
    """``(2, n_edges)`` local (source, target) indices of all edges into the targets."""
    edge_weight: torch.Tensor
    """``(n_edges,)`` weights of those edges."""


def message_passing_chunks(
    edge_index: torch.Tensor, edge_weight: torch.Tensor, n_nodes: int, chunk_size: int
) -> list[MessageChunk]:
    """Cut a graph's targets into chunks of ``chunk_size``, each with all its in-edges.

    A message-passing layer applied to a chunk's local graph gives exactly the full graph's
    outputs at the chunk's targets, so a layer can run chunk by chunk in bounded memory.
    Targets are taken in reverse Cuthill-McKee order (scipy), which keeps neighbours in the
    same chunk, so a chunk's sources are mostly its own targets whatever the table's row
    order.
    """
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    source, target = edge_index.cpu().numpy()
    incoming = sp.csr_matrix(
        (edge_weight.cpu().numpy(), (target, source)), shape=(n_nodes, n_nodes), dtype=np.float32
    )
    order = reverse_cuthill_mckee(incoming + incoming.T, symmetric_mode=True)
    device = edge_index.device
    local = np.full(n_nodes, -1, dtype=np.int64)
    chunks = []
    for start in range(0, n_nodes, chunk_size):
        targets = np.asarray(order[start : start + chunk_size], dtype=np.int64)
        block = incoming[targets].tocoo()
        others = np.unique(block.col)
        local[targets] = np.arange(len(targets))
        others = others[local[others] < 0]
        nodes = np.concatenate([targets, others])
        local[others] = np.arange(len(targets), len(nodes))
        chunks.append(
            MessageChunk(
                targets=torch.from_numpy(targets).to(device),
                nodes=torch.from_numpy(nodes).to(device),
                edge_index=torch.from_numpy(
                    np.vstack([local[block.col], block.row]).astype(np.int64)
                ).to(device),
                edge_weight=torch.from_numpy(block.data).to(device),
            )
        )
        local[nodes] = -1
    return chunks
