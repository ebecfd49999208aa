from __future__ import annotations

import torch

from asign_sc.models import MSAGNet, SpatialGraphAttention


def _net(toy, **kw):
    return MSAGNet(*toy.dims, toy.n_genes, hidden_dim=32, n_gat_layers=3, n_heads=4, **kw)


def test_msagnet_shapes(toy):
    net = _net(toy).eval()
    out = net(toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    for level in ("spot", "region", "global"):
        assert out[level].shape == (toy.n, toy.n_genes)
        assert torch.isfinite(out[level]).all()
    assert out["embedding"].shape == (toy.n, 32)


def test_gradients_reach_every_branch(toy):
    torch.manual_seed(0)
    net = _net(toy)
    spot = toy.spot.clone().requires_grad_(True)
    out = net(spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight)
    (out["spot"].pow(2).mean()).backward()
    assert spot.grad is not None and spot.grad.abs().sum() > 0
    for name in (
        "fusion.proj_spot.0.weight",
        "fusion.attn_region.in_proj_weight",
        "fusion.proj_global.0.weight",
        "gat.convs.0.lin_l.weight",
        "gat.convs.0.lin_edge.weight",
        "gat.out.weight",
        "heads.spot.weight",
    ):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


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
