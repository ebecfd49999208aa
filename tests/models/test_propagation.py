from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from asign_sc.models import CrossLayerImputation, propagate_labels
from asign_sc.models._propagation import adjacency_tensor


def _chain(weights):
    n = len(weights) + 1
    i = np.arange(n - 1)
    g = sp.coo_matrix((np.r_[weights, weights], (np.r_[i, i + 1], np.r_[i + 1, i])), shape=(n, n))
    return adjacency_tensor(g)


def test_chain_converges_to_harmonic_interpolation():
    # chain with known ends: the fixed point is linear in the cumulative resistance 1/e
    weights = np.array([1.0, 2.0, 0.5, 1.0, 4.0, 1.0])
    n = len(weights) + 1
    values = torch.zeros(n, 2)
    values[0] = torch.tensor([0.0, 3.0])
    values[-1] = torch.tensor([1.0, -1.0])
    known = torch.zeros(n, dtype=torch.bool)
    known[[0, -1]] = True
    res = propagate_labels(_chain(weights), values, known, n_iterations=3000)
    resistance = np.r_[0, np.cumsum(1 / weights)] / np.sum(1 / weights)
    expected = np.outer(1 - resistance, [0.0, 3.0]) + np.outer(resistance, [1.0, -1.0])
    np.testing.assert_allclose(res.values.numpy(), expected, atol=1e-4)
    assert torch.all(res.coverage > 0.999)


def test_known_spots_stay_exact_and_reach_grows_by_hops():
    weights = np.ones(9)
    values = torch.randn(10, 3)
    known = torch.zeros(10, dtype=torch.bool)
    known[0] = True
    adj = _chain(weights)
    for t in (1, 3, 5):
        res = propagate_labels(adj, values, known, n_iterations=t)
        torch.testing.assert_close(res.values[0], values[0])
        # spot k is reached after k steps; unreached spots stay 0 (never read labels)
        assert res.reached.tolist() == [True] * (t + 1) + [False] * (9 - t)
        assert torch.all(res.values[t + 1 :] == 0)
    # one known source: everything reached equals it exactly
    res = propagate_labels(adj, values, known, n_iterations=20)
    torch.testing.assert_close(res.values, values[:1].expand(10, 3))


def test_unknown_labels_are_never_read():
    adj = _chain(np.ones(5))
    known = torch.tensor([True, False, False, True, False, False])
    a = torch.randn(6, 2)
    b = a.clone()
    b[~known] = 1e6
    ra = propagate_labels(adj, a, known, n_iterations=4)
    rb = propagate_labels(adj, b, known, n_iterations=4)
    torch.testing.assert_close(ra.values, rb.values)


def test_node_weights_change_the_average_and_get_gradient():
    # spot 2 has two known neighbours 1 (value 0) and 3 (value 1)
    adj = _chain(np.ones(4))
    values = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0]])
    known = torch.tensor([True, True, False, True, True])
    alpha = torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0], requires_grad=True)
    res = propagate_labels(adj, values, known, n_iterations=1, node_weights=alpha)
    assert res.values[2, 0].item() == pytest.approx(0.75)  # 3 / (1 + 3)
    res.values[2, 0].backward()
    assert alpha.grad[3] > 0 and alpha.grad[1] < 0


def test_spread_is_neighbour_std():
    adj = _chain(np.ones(2))
    values = torch.tensor([[0.0], [5.0], [2.0]])
    known = torch.tensor([True, False, True])
    res = propagate_labels(adj, values, known, n_iterations=1, return_spread=True)
    assert res.values[1, 0].item() == pytest.approx(1.0)
    assert res.spread[1, 0].item() == pytest.approx(1.0)
    assert res.spread[0, 0].item() == 0


def test_adjacency_rejects_negative_weights():
    g = sp.csr_matrix(np.array([[0, -1.0], [1.0, 0]]))
    with pytest.raises(ValueError, match="negative"):
        adjacency_tensor(g)


def test_cli_block_blends_and_falls_back(toy):
    cli = CrossLayerImputation(8, toy.n_genes, n_iterations=2)
    emb = torch.randn(toy.n, 8)
    network = torch.randn(toy.n, toy.n_genes)
    out = cli(emb, toy.adjacency, toy.values, toy.known, network)
    known = toy.known
    torch.testing.assert_close(out["prediction"][known], toy.values[known])
    reached = (out["coverage"] > 0) & ~known
    unreached = out["coverage"] == 0
    # neutral start: alpha = 1, gate = 1/2
    torch.testing.assert_close(out["node_weights"], torch.ones(toy.n))
    expected = 0.5 * network + 0.5 * out["propagated"]
    torch.testing.assert_close(out["prediction"][reached], expected[reached])
    torch.testing.assert_close(out["prediction"][unreached], network[unreached])


def test_cli_block_gradients_reach_gate_and_node_weights(toy):
    cli = CrossLayerImputation(8, toy.n_genes, n_iterations=3)
    emb = torch.randn(toy.n, 8, requires_grad=True)
    out = cli(emb, toy.adjacency, toy.values, toy.known, torch.randn(toy.n, toy.n_genes))
    (out["prediction"][~toy.known] - 1).pow(2).mean().backward()
    assert cli.gate.weight.grad.abs().sum() > 0
    assert cli.node_weight.weight.grad.abs().sum() > 0


def test_gradients_match_autograd_through_torch_sparse_mm_on_an_asymmetric_graph(monkeypatch):
    """The propagation's own backward (A^T built once) gives autograd's gradients."""
    from asign_sc.models import _propagation

    g = torch.Generator().manual_seed(0)
    n, n_genes = 40, 6
    dense = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.15)
    dense.fill_diagonal_(0)
    assert not torch.allclose(dense, dense.T)
    adjacency = dense.to_sparse_coo().coalesce()
    values = torch.randn(n, n_genes, generator=g)
    known = torch.rand(n, generator=g) < 0.3
    logits = torch.randn(n, generator=g)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_(True)
        result = propagate_labels(adjacency, values, known, node_weights=2 * torch.sigmoid(x))
        (result.values.pow(2).sum() + result.coverage.sum()).backward()
        return result.values.detach(), x.grad

    ours, ours_grad = run()
    # the reference: autograd differentiates torch.sparse.mm itself
    monkeypatch.setattr(
        _propagation._SparseProduct, "__call__", lambda self, x: torch.sparse.mm(self.matrix, x)
    )
    reference, reference_grad = run()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_grad, reference_grad)
    assert ours_grad.abs().sum() > 0


@pytest.mark.parametrize("return_spread", [False, True])
def test_propagation_without_autograd_equals_the_training_path_bit_for_bit(return_spread):
    """Prediction's in-place steps give what training's out-of-place steps give, exactly."""
    g = torch.Generator().manual_seed(1)
    n, n_genes = 60, 5
    dense = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.08)
    dense.fill_diagonal_(0)
    dense[:3] = 0  # spots without neighbours: never reached
    dense[:, :3] = 0
    adjacency = dense.to_sparse_coo().coalesce()
    values = torch.randn(n, n_genes, generator=g)
    known = torch.rand(n, generator=g) < 0.2
    known[0], known[1:3] = True, False  # isolated spots: one known, two never reached
    weights = 2 * torch.sigmoid(torch.randn(n, generator=g))

    with torch.no_grad():
        lean = propagate_labels(
            adjacency, values, known, node_weights=weights, return_spread=return_spread
        )
    trained = propagate_labels(
        adjacency,
        values,
        known,
        node_weights=weights.clone().requires_grad_(True),
        return_spread=return_spread,
    )
    assert trained.values.requires_grad and not lean.values.requires_grad
    for field in ("values", "coverage", "known_share") + (("spread",) if return_spread else ()):
        assert torch.equal(getattr(lean, field), getattr(trained, field).detach()), field
    assert torch.equal(lean.values[known], values[known])
    assert (lean.coverage[1:3] == 0).all() and (lean.values[1:3] == 0).all()
    assert (lean.coverage[~known] > 0).sum() > n // 2  # most unknown spots were reached
