from __future__ import annotations

import pytest
import torch

from asign_sc.models import MultiLevelFusion


def test_fusion_shapes_and_attention_not_uniform(toy):
    torch.manual_seed(0)
    fusion = MultiLevelFusion(*toy.dims, hidden_dim=32, n_heads=4, dropout=0.0).eval()
    out = fusion(toy.spot, toy.region, toy.glob, return_attention=True)
    assert out["fused"].shape == (toy.n, 96)
    assert fusion.out_dim == 96
    assert out["attention_region"].shape == (toy.n, 4, 4)
    assert out["attention_global"].shape == (toy.n, 4, 9)
    for key in ("attention_region", "attention_global"):
        w = out[key]
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        # attention is informative: weights differ across keys
        assert (w.max(-1).values - w.min(-1).values).mean() > 1e-3
    # F = concat(f_s, f'_s, f''_s): the first block is the projected spot query itself
    torch.testing.assert_close(out["fused"][:, :32], out["spot"])


def test_fusion_attended_output_depends_on_tokens(toy):
    fusion = MultiLevelFusion(*toy.dims, hidden_dim=16, n_heads=2, dropout=0.0).eval()
    a = fusion(toy.spot, toy.region, toy.glob)["fused"]
    b = fusion(toy.spot, toy.region + 1.0, toy.glob)["fused"]
    assert torch.allclose(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:32], b[:, 16:32])
    assert torch.allclose(a[:, 32:], b[:, 32:])


def test_fusion_rejects_single_token(toy):
    fusion = MultiLevelFusion(*toy.dims, hidden_dim=16, n_heads=2)
    with pytest.raises(ValueError, match="single token"):
        fusion(toy.spot, toy.region[:, :1], toy.glob)
    with pytest.raises(ValueError, match="n_spots"):
        fusion(toy.spot, toy.region[:5], toy.glob)


def test_fusion_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiLevelFusion(4, 4, 4, hidden_dim=10, n_heads=4)


def test_fusion_without_cross_attention_mean_pools_tokens(toy):
    torch.manual_seed(0)
    fusion = MultiLevelFusion(
        *toy.dims, hidden_dim=16, n_heads=2, dropout=0.0, cross_attention=False
    ).eval()
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in fusion.modules())
    out = fusion(toy.spot, toy.region, toy.glob)
    assert out["fused"].shape == (toy.n, 48) and fusion.out_dim == 48
    # f'_s is a linear map of the projected mean token (close to uniform attention weights)
    torch.testing.assert_close(out["fused"][:, 16:32], fusion.pool_region(out["region"]))
    torch.testing.assert_close(out["fused"][:, 32:], fusion.pool_global(out["global"]))
    torch.testing.assert_close(out["region"], fusion.proj_region(toy.region.mean(1)))
    # so the tokens enter through their mean only: other tokens with the same mean agree
    shifted = toy.region + torch.tensor([1.0, -1.0, 2.0, -2.0])[None, :, None]
    torch.testing.assert_close(fusion(toy.spot, shifted, toy.glob)["fused"], out["fused"])
    # one token per window is fine without attention
    assert fusion(toy.spot, toy.region[:, :1], toy.glob[:, :1])["fused"].shape == (toy.n, 48)
    with pytest.raises(ValueError, match="cross_attention=False"):
        fusion(toy.spot, toy.region, toy.glob, return_attention=True)


def test_fusion_can_average_projected_tokens_as_models_saved_before(toy):
    torch.manual_seed(0)
    fusion = MultiLevelFusion(
        *toy.dims,
        hidden_dim=16,
        n_heads=2,
        dropout=0.0,
        cross_attention=False,
        token_pooling="project_then_mean",
    ).eval()
    out = fusion(toy.spot, toy.region, toy.glob)
    torch.testing.assert_close(out["region"], fusion.proj_region(toy.region).mean(1))
    torch.testing.assert_close(out["global"], fusion.proj_global(toy.glob).mean(1))
    torch.testing.assert_close(out["fused"][:, 16:32], fusion.pool_region(out["region"]))
    with pytest.raises(ValueError, match="token_pooling"):
        MultiLevelFusion(*toy.dims, hidden_dim=16, n_heads=2, token_pooling="max")


@pytest.mark.parametrize("cross_attention", [True, False])
def test_region_block_depends_on_the_spot_query_only_with_cross_attention(toy, cross_attention):
    torch.manual_seed(0)
    fusion = MultiLevelFusion(
        *toy.dims, hidden_dim=16, n_heads=2, dropout=0.0, cross_attention=cross_attention
    ).eval()
    a = fusion(toy.spot, toy.region, toy.glob)["fused"]
    b = fusion(toy.spot + 1.0, toy.region, toy.glob)["fused"]
    assert not torch.allclose(a[:, :16], b[:, :16])
    assert torch.allclose(a[:, 16:], b[:, 16:]) is not cross_attention
