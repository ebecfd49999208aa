from __future__ import annotations

import pytest
import torch

from asign_sc.models import MSAGNet, SpatialGraphAttention, SpotwiseLayers


def _net(toy, **kw):
    return MSAGNet(*toy.dims, toy.n_genes, hidden_dim=32, n_gat_layers=3, n_heads=4, **kw)


def test_msagnet_shapes(toy):
    net = _net(toy).eval()
    out = net(toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    for level in ("spot", "region", "global"):
        assert out[level].shape == (toy.n, toy.n_genes)
        assert torch.isfinite(out[level]).all()
    assert out["embedding"].shape == (toy.n, 32)


@pytest.mark.parametrize(
    ("variant", "gat_weights"),
    [("gat", ("lin.weight", "att_src", "att_edge")), ("gatv2", ("lin_l.weight", "att"))],
)
def test_gradients_reach_every_branch(toy, variant, gat_weights):
    torch.manual_seed(0)
    net = _net(toy, gat_variant=variant)
    spot = toy.spot.clone().requires_grad_(True)
    out = net(spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    (out["spot"].pow(2).mean()).backward()
    assert spot.grad is not None and spot.grad.abs().sum() > 0
    for name in (
        "fusion.proj_spot.0.weight",
        "fusion.attn_region.in_proj_weight",
        "fusion.proj_global.0.weight",
        *(f"gat.convs.0.{w}" for w in gat_weights),
        "gat.convs.0.lin_edge.weight",
        "gat.out.weight",
        "heads.spot.weight",
    ):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_gat_variant_picks_the_layer(toy):
    from torch_geometric.nn import GATConv, GATv2Conv

    assert isinstance(_net(toy).gat.convs[0], GATConv)
    assert isinstance(_net(toy, gat_variant="gatv2").gat.convs[0], GATv2Conv)
    with pytest.raises(ValueError, match="'gat' or 'gatv2'"):
        _net(toy, gat_variant="gcn")


def test_graph_attention_uses_neighbours(toy):
    torch.manual_seed(0)
    gat = SpatialGraphAttention(toy.dims[0], hidden_dim=16, n_layers=2, n_heads=2, dropout=0.0)
    gat.eval()
    a = gat(toy.spot, toy.edge_index, toy.edge_weight)
    assert a.shape == (toy.n, 16)
    # perturbing one spot changes its neighbours' embeddings, not far-away spots'
    x = toy.spot.clone()
    x[0] += 5.0
    b = gat(x, toy.edge_index, toy.edge_weight)
    changed = (a - b).abs().sum(1) > 1e-6
    neighbours = set(toy.edge_index[1][toy.edge_index[0] == 0].tolist())
    assert all(changed[j] for j in neighbours)
    assert not changed.all()
    # edge weights are features of the attention
    c = gat(toy.spot, toy.edge_index, toy.edge_weight * 3)
    assert not torch.allclose(a, c)


def test_msagnet_set_output_bias(toy):
    net = _net(toy)
    mean = torch.arange(toy.n_genes, dtype=torch.float32)
    net.set_output_bias({"spot": mean})
    torch.testing.assert_close(net.heads["spot"].bias.detach(), mean)


def test_without_graph_attention_no_message_passing(toy):
    from torch_geometric.nn import GATConv, GATv2Conv

    torch.manual_seed(0)
    net = _net(toy, graph_attention=False, dropout=0.0).eval()
    assert not any(isinstance(m, GATConv | GATv2Conv) for m in net.modules())
    assert isinstance(net.spotwise, SpotwiseLayers) and len(net.spotwise.layers) == 3
    a = net(toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    # another spot's features never change a spot's output, even its graph neighbours'
    x = toy.spot.clone()
    x[0] += 5.0
    b = net(x, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    changed = (a["spot"] - b["spot"]).abs().sum(1) > 1e-6
    assert changed[0] and not changed[1:].any()
    # the graph is not read at all
    empty = torch.zeros(2, 0, dtype=torch.long)
    c = net(toy.spot, toy.region, toy.glob, empty, torch.zeros(0))
    torch.testing.assert_close(a["spot"], c["spot"])
    # the full network does spread the change to the neighbours of spot 0
    full = _net(toy, dropout=0.0).eval()
    d = full(toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)["spot"]
    e = full(x, toy.region, toy.glob, toy.edge_index, toy.edge_weight)["spot"]
    neighbours = toy.edge_index[1][toy.edge_index[0] == 0]
    assert ((d - e)[neighbours].abs().sum(1) > 1e-6).all()


def test_switches_keep_every_width(toy):
    torch.manual_seed(0)
    for kw in ({"cross_attention": False}, {"graph_attention": False}):
        net = _net(toy, **kw).eval()
        out = net(toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
        assert out["embedding"].shape == (toy.n, 32)
        assert out["spot"].shape == (toy.n, toy.n_genes)
    with pytest.raises(ValueError, match="n_layers"):
        SpotwiseLayers(8, hidden_dim=8, n_layers=0)
