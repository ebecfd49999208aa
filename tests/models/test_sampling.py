from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from asign_sc.models import ASIGNNet
from asign_sc.models._sampling import (
    GraphSampler,
    khop_closure,
    khop_layers,
    message_passing_chunks,
    sample_layers,
    sample_neighbors,
    spatial_batches,
)

from .conftest import Toy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spatial_batches_partition_into_compact_tiles():
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2).astype(float)
    batches = spatial_batches(grid, 100)
    assert len(batches) == 4
    assert all(len(b) <= 100 for b in batches)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(400))
    # each tile is a 10 x 10 quarter of the grid, not a scattered sample
    for batch in batches:
        assert np.ptp(grid[batch], axis=0).max() == 9
    assert spatial_batches(grid, 1000)[0].tolist() == list(range(400))
    with pytest.raises(ValueError, match="batch_size"):
        spatial_batches(grid, 0)


def test_khop_closure_follows_the_rows_of_the_graph():
    # a path 0 - 1 - 2 - 3 - 4
    path = sp.diags([np.ones(4), np.ones(4)], [-1, 1], shape=(5, 5)).tocsr()
    assert khop_closure(path, np.array([0]), 0).tolist() == [0]
    assert khop_closure(path, np.array([0]), 2).tolist() == [0, 1, 2]
    assert khop_closure(path, np.array([2, 0]), 1).tolist() == [2, 0, 1, 3]
    # hop by hop: the nodes within k hops come first
    assert khop_closure(path, np.array([4]), 10).tolist() == [4, 3, 2, 1, 0]
    layers = khop_layers(path, np.array([2]), 5)
    assert [layer.tolist() for layer in layers] == [[2], [1, 3], [0, 4]]


def test_sample_layers_keep_every_in_edge_of_unsampled_hops():
    toy = Toy(n=300)
    graph = toy.graph.tocsr()
    degree = np.diff(graph.indptr)
    seeds = np.array([5, 17])
    layers, edges = sample_layers(graph, seeds, 3, [None, 2, 2], np.random.default_rng(0))
    exact = khop_layers(graph, seeds, 1)
    # the first hop is exact: the seeds keep all their in-edges, the same nodes are reached
    np.testing.assert_array_equal(layers[1], exact[1])
    targets = np.repeat(np.arange(300), degree)[edges]
    kept = np.bincount(targets, minlength=300)
    np.testing.assert_array_equal(kept[seeds], degree[seeds])
    # beyond it at most 2 in-edges per spot
    assert kept[layers[1]].max() <= 2 and len(layers) == 4
    with pytest.raises(ValueError, match="one entry per hop"):
        sample_layers(graph, seeds, 3, [None, 2], np.random.default_rng(0))
    with pytest.raises(ValueError, match="positive integer or None"):
        sample_layers(graph, seeds, 2, [None, 0], np.random.default_rng(0))


def test_sampler_core_is_the_spots_within_core_hops():
    toy = Toy(n=300)
    sampler = GraphSampler(_inputs(toy), n_hops=3, core_hops=1)
    seeds = np.array([3, 40])
    sub = sampler.closure(seeds)
    within_one = khop_closure(sampler.adjacency, seeds, 1)
    assert sub.n_seeds == 2 and sub.n_core == len(within_one)
    np.testing.assert_array_equal(sub.nodes[: sub.n_core], within_one)
    assert len(sub.nodes) == len(khop_closure(sampler.adjacency, seeds, 3)) > sub.n_core
    drawn = sampler.sampled(seeds, [None, 2, 2], np.random.default_rng(0))
    np.testing.assert_array_equal(drawn.nodes[: drawn.n_core], within_one)
    with pytest.raises(ValueError, match="core_hops"):
        GraphSampler(_inputs(toy), n_hops=1, core_hops=2)


def test_sample_neighbors_keeps_at_most_the_fanout_of_each_reached_spot():
    toy = Toy(n=300)
    graph = toy.graph.tocsr()
    degree = np.diff(graph.indptr)
    assert degree.max() > 4  # the cap bites
    seeds = np.array([5, 17])
    nodes, edges = sample_neighbors(graph, seeds, 2, 4, np.random.default_rng(0))
    assert nodes[:2].tolist() == [5, 17] and len(np.unique(nodes)) == len(nodes)
    targets = np.repeat(np.arange(300), degree)[edges]
    sources = graph.indices[edges]
    # real edges, each at most once; every target keeps min(degree, 4) of them
    assert len(np.unique(edges)) == len(edges)
    kept = np.bincount(targets, minlength=300)
    np.testing.assert_array_equal(
        kept[np.unique(targets)], np.minimum(degree, 4)[np.unique(targets)]
    )
    # the seeds and the first hop have in-edges; the second hop's nodes are leaves
    hop1 = np.setdiff1d(sources[np.isin(targets, seeds)], seeds)
    assert set(np.unique(targets)) == set(seeds) | set(hop1)
    assert set(nodes) == set(seeds) | set(sources)
    # a subset of the exact closure, smaller than it
    assert set(nodes) < set(khop_closure(graph, seeds, 2))
    # a fan-out above every degree gives the exact closure, every in-edge of its inner hops
    nodes, edges = sample_neighbors(graph, seeds, 2, 1000, np.random.default_rng(0))
    assert sorted(nodes) == sorted(khop_closure(graph, seeds, 2))
    # different draws differ, the same generator state draws the same
    draw = lambda seed: sample_neighbors(graph, seeds, 2, 4, np.random.default_rng(seed))[1]  # noqa: E731
    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.array_equal(np.sort(draw(1)), np.sort(draw(2)))
    with pytest.raises(ValueError, match="num_neighbors"):
        sample_neighbors(graph, seeds, 2, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_neighbors"):
        sample_neighbors(graph, seeds, 2, True, np.random.default_rng(0))


def test_sampled_subgraph_keeps_the_sampled_edges_and_the_induced_adjacency():
    toy = Toy(n=300)
    sampler = GraphSampler(_inputs(toy), n_hops=2)
    seeds = np.array([3, 40, 41])
    sub = sampler.sampled(seeds, 3, np.random.default_rng(0))
    nodes, edges = sample_neighbors(sampler.attention, seeds, 2, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(sub.nodes, nodes)
    assert sub.n_seeds == 3
    source, target = sub.inputs.edge_index.numpy()
    weights = sub.inputs.edge_weight.numpy()
    assert len(source) == len(edges) and np.bincount(target).max() <= 3
    # each local edge is the graph's edge between the same spots, with its weight
    np.testing.assert_allclose(
        weights, np.asarray(sampler.attention[nodes[target], nodes[source]]).ravel()
    )
    # the propagation keeps every edge among the subgraph's nodes
    induced = sampler.adjacency[nodes][:, nodes]
    assert sub.inputs.adjacency._nnz() == induced.nnz > len(edges)
    torch.testing.assert_close(sub.inputs.spot, toy.spot[nodes])


def _net(toy: Toy, graph_attention: bool = True) -> ASIGNNet:
    torch.manual_seed(0)
    net = ASIGNNet(*toy.dims, toy.n_genes, hidden_dim=16, n_gat_layers=3)
    if not graph_attention:
        net = ASIGNNet(*toy.dims, toy.n_genes, hidden_dim=16, graph_attention=False)
    return net.eval()


def _inputs(toy: Toy):
    from asign_sc.models import GraphInputs

    return GraphInputs(
        toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight, toy.adjacency
    )


def test_network_on_a_khop_closure_is_exact_at_the_seeds():
    toy = Toy(n=600)
    net = _net(toy)
    inputs = _inputs(toy)
    with torch.no_grad():
        full = net.network(*inputs.args()[:5])
        sampler = GraphSampler(inputs, n_hops=net.message_passing_rounds)
        seeds = khop_closure(toy.graph, np.array([0]), 1)  # a spot and its neighbours
        subgraph = sampler.closure(seeds)
        assert len(subgraph.nodes) < 600  # a real subgraph, not the whole stack
        part = net.network(*subgraph.inputs.args()[:5])
        torch.testing.assert_close(part["spot"][: len(seeds)], full["spot"][seeds])
        # one hop short and the seeds' outputs change
        short = GraphSampler(inputs, n_hops=1).closure(seeds)
        wrong = net.network(*short.inputs.args()[:5])["spot"][: len(seeds)]
        assert not torch.allclose(wrong, full["spot"][seeds], atol=1e-5)


@pytest.mark.parametrize("graph_attention", [True, False])
def test_chunked_prediction_equals_the_full_graph_pass(graph_attention):
    toy = Toy(n=300)
    net = _net(toy, graph_attention)
    args = (*_inputs(toy).args(), toy.values, toy.known)
    with torch.no_grad():
        full = net(*args)
        chunked = net(*args, chunk_size=37)
    for key in ("spot", "region", "global", "embedding", "prediction", "gate"):
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-5, atol=1e-5)


def test_message_passing_chunks_hold_every_in_edge_of_their_targets():
    toy = Toy(n=120)
    chunks = message_passing_chunks(toy.edge_index, toy.edge_weight, 120, 25)
    targets = torch.cat([c.targets for c in chunks])
    assert sorted(targets.tolist()) == list(range(120))
    in_degree = torch.bincount(toy.edge_index[1], minlength=120)
    for chunk in chunks:
        assert chunk.nodes[: len(chunk.targets)].tolist() == chunk.targets.tolist()
        local_degree = torch.bincount(chunk.edge_index[1], minlength=len(chunk.targets))
        assert local_degree.tolist() == in_degree[chunk.targets].tolist()


def test_layerwise_forward_is_for_evaluation_only():
    toy = Toy(n=60)
    net = _net(toy).train()
    with pytest.raises(RuntimeError, match="eval"):
        net.network.forward_layerwise(*_inputs(toy).args()[:5], chunk_size=10)
