from __future__ import annotations

import numpy as np
import pytest
import torch

from asign_sc.models import ASIGNLoss, LossWeights, pcc_loss


def test_pcc_loss_matches_numpy_per_gene_and_per_spot():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
    per_gene = np.mean([np.corrcoef(pred[:, j], target[:, j])[0, 1] for j in range(5)])
    per_spot = np.mean([np.corrcoef(pred[i], target[i])[0, 1] for i in range(30)])
    assert pcc_loss(pred, target).item() == pytest.approx(1 - per_gene, abs=1e-5)
    assert pcc_loss(pred, target, axis="spot").item() == pytest.approx(1 - per_spot, abs=1e-5)


def test_pcc_loss_bounds_and_constant_columns_are_finite():
    x = torch.randn(20, 3)
    assert pcc_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    assert pcc_loss(-x, x).item() == pytest.approx(2.0, abs=1e-5)
    const = torch.zeros(20, 3, requires_grad=True)
    loss = pcc_loss(const, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(const.grad).all()


def test_pcc_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        pcc_loss(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="axis"):
        pcc_loss(torch.zeros(3, 2), torch.zeros(3, 2), axis="cell")


def test_asign_loss_composes_eq_7_to_9():
    g = torch.Generator().manual_seed(1)
    pred = {k: torch.randn(25, 4, generator=g) for k in ("spot", "region", "global")}
    target = {k: torch.randn(25, 4, generator=g) for k in ("spot", "region", "global")}
    w = LossWeights()
    total, parts = ASIGNLoss(w)(pred, target)
    mse = torch.mean((pred["spot"] - target["spot"]) ** 2)
    l_p = (
        mse
        + w.lambda_s * pcc_loss(pred["spot"], target["spot"])
        + w.lambda_r * pcc_loss(pred["region"], target["region"])
        + w.lambda_g * pcc_loss(pred["global"], target["global"])
    )
    l_c = w.lambda_1 * pcc_loss(pred["spot"], pred["region"]) + w.lambda_2 * pcc_loss(
        pred["spot"], pred["global"]
    )
    assert total.item() == pytest.approx((l_p + l_c).item(), rel=1e-6)
    assert parts["mse"].item() == pytest.approx(mse.item())
    # the paper's defaults
    assert (w.lambda_s, w.lambda_r, w.lambda_g, w.lambda_1, w.lambda_2) == (
        0.75,
        0.5,
        0.5,
        0.25,
        0.25,
    )
    assert (w.gamma_1, w.gamma_2) == (1.0, 1.0)
