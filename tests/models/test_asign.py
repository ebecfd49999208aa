from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asign_sc._utils import resolve_device
from asign_sc.models import ArchitectureConfig, ASIGNModel, ASIGNNet
from asign_sc.models._asign import PCAReduction


def _net(toy, **kw):
    torch.manual_seed(0)
    return ASIGNNet(*toy.dims, toy.n_genes, hidden_dim=16, n_heads=2, n_gat_layers=2, **kw)


def _arch(toy, **kw):
    """Architecture settings of a small network on the toy features."""
    dims = dict(zip(("spot_dim", "region_dim", "global_dim"), toy.dims, strict=True))
    return {**dims, "n_genes": toy.n_genes, "hidden_dim": 16, "n_heads": 2, "n_gat_layers": 2, **kw}


def _args(toy):
    return (toy.spot, toy.region, toy.glob, toy.edge_index, toy.edge_weight, toy.adjacency)


@pytest.mark.parametrize("train", [False, True])
def test_hidden_labels_never_enter_any_prediction(toy, train):
    """Labels of spots outside `known` (e.g. the hidden, supervised ones) are never read."""
    net = _net(toy).train(train)
    known = toy.known.clone()
    known[::2] = False  # hide half of the known section too
    other = toy.values.clone()
    other[~known] = torch.randn_like(other[~known]) * 100
    torch.manual_seed(1)
    a = net(*_args(toy), toy.values, known)
    torch.manual_seed(1)
    b = net(*_args(toy), other, known)
    for key in ("prediction", "propagated", "spot", "gate"):
        torch.testing.assert_close(a[key], b[key], msg=key)
    torch.testing.assert_close(a["prediction"][known], toy.values[known])


def test_spot_gradients_reach_the_spot_branch_through_the_blend(toy):
    net = _net(toy)
    spot = toy.spot.clone().requires_grad_(True)
    out = net(spot, *_args(toy)[1:], toy.values, toy.known)
    out["prediction"][~toy.known].pow(2).mean().backward()
    assert spot.grad.abs().sum() > 0
    assert net.network.fusion.proj_spot[0].weight.grad.abs().sum() > 0


def test_pca_reduction_matches_svd_and_is_saved(toy, tmp_path):
    x = toy.region  # (n, tokens, dim)
    pca = PCAReduction(x.shape[-1], 5).fit(x)
    z = pca(x)
    assert z.shape == (*x.shape[:2], 5)
    flat = z.reshape(-1, 5)
    # uncorrelated, decreasing variance, unit mean variance
    cov = torch.cov(flat.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3
    assert torch.all(torch.diag(cov)[:-1] >= torch.diag(cov)[1:])
    assert torch.diag(cov).mean() == pytest.approx(1.0, rel=1e-3)
    net = _net(toy, n_components=4)
    net.fit_reduction({"spot": toy.spot, "region": toy.region, "global": toy.glob})
    assert net.reduce("global", toy.glob).shape == (toy.n, toy.glob.shape[1], 4)
    state = net.state_dict()
    assert "reduction.spot.components" in state


@pytest.mark.parametrize("n_rows", [40, 300])  # fewer and more rows than features
def test_pca_reduction_components_are_the_leading_singular_vectors(n_rows):
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -2, 96)
    x = torch.randn(n_rows, 96, generator=g) * scales + 5.0
    pca = PCAReduction(96, 8).fit(x)
    centred = (x - x.mean(0)).double()
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    cosines = (pca.components.double() * vh[:8].T).sum(0).abs()
    assert torch.all(cosines > 0.9999), cosines
    std = singular[:8] / (n_rows - 1) ** 0.5
    assert float(pca.scale[0]) == pytest.approx(float(std.pow(2).mean().sqrt()), rel=1e-4)


def test_pca_reduction_of_rank_deficient_features_stays_finite():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g) @ torch.randn(2, 64, generator=g)  # rank 2, k = 6
    pca = PCAReduction(64, 6).fit(x)
    z = pca(x)
    assert torch.isfinite(z).all()
    # the two real directions carry the variance; the others are exactly silent
    assert torch.all(pca.components[:, 2:] == 0)
    assert z[:, :2].std(0).min() > 0.1


def test_model_save_load_weights_only(toy, tmp_path):
    settings = {
        "architecture": _arch(toy, n_components=4),
        "genes": [f"g{i}" for i in range(toy.n_genes)],
    }
    model = ASIGNModel.from_settings(settings)
    model.net.fit_reduction({"spot": toy.spot, "region": toy.region, "global": toy.glob})
    model.history = {"loss": [1.0, 0.5]}
    path = model.save(tmp_path / "m")
    assert json.loads((path / "settings.json").read_text())["format"] == "asign_sc.ASIGNModel"
    torch.load(path / "weights.pt", weights_only=True)
    loaded = ASIGNModel.load(path)
    assert loaded.genes == model.genes and loaded.history["loss"].tolist() == [1.0, 0.5]
    model.net.eval()
    for level, x in (("spot", toy.spot), ("region", toy.region)):
        torch.testing.assert_close(loaded.net.reduce(level, x), model.net.reduce(level, x))

    def reduced(net):
        return (
            net.reduce("spot", toy.spot),
            net.reduce("region", toy.region),
            net.reduce("global", toy.glob),
            *_args(toy)[3:],
        )

    a = model.net(*reduced(model.net), toy.values, toy.known)
    b = loaded.net(*reduced(loaded.net), toy.values, toy.known)
    torch.testing.assert_close(a["prediction"], b["prediction"])
    assert "n_genes=7" in repr(loaded)


def test_load_rejects_other_files_in_our_own_words(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an asign_sc model"):
        ASIGNModel.load(tmp_path / "x.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty or truncated"):
        ASIGNModel.load(tmp_path / "empty.pt")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not an asign_sc model file") as info:
        ASIGNModel.load(tmp_path / "noise.pt")
    assert "weights_only" not in str(info.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not an asign_sc model folder"):
        ASIGNModel.load(tmp_path / "folder")
    with pytest.raises(FileNotFoundError):
        ASIGNModel.load(tmp_path / "missing")


def test_single_file_checkpoints_of_version_1_still_load(toy, tmp_path):
    """The format of 0.1: one torch.save file with settings, history and state dict."""
    arch = _arch(toy, n_components=4, n_models=2)
    torch.manual_seed(0)
    model = ASIGNModel.from_settings({"architecture": arch, "genes": list("abcdefg")})
    settings = {
        **model.settings,
        "sample_key": None,
        "training": {"epochs": 5, "lr": 1e-3, "seed": 0, "best_epoch": [3, 4]},
    }
    state = {k: v.clone() for k, v in model.net.state_dict().items()}
    old = {
        "format": "asign_sc.ASIGNModel",
        "version": 1,
        "settings": settings,
        "history": {"loss": [2.0, 1.0], "member": [0, 1]},
        "state_dict": state,
    }
    torch.save(old, tmp_path / "old.pt")
    loaded = ASIGNModel.load(tmp_path / "old.pt")
    assert loaded.genes == list("abcdefg") and loaded.n_models == 2
    assert loaded.run["best_epoch"] == [3, 4]
    assert loaded.history["loss"].tolist() == [2.0, 1.0]
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_save_refuses_to_overwrite_unless_asked(toy, tmp_path):
    model = ASIGNModel.from_settings({"architecture": _arch(toy), "genes": list("abcdefg")})
    path = model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)
    (tmp_path / "file").write_text("not a model")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "file")
    model.save(tmp_path / "file", overwrite=True)
    assert ASIGNModel.load(tmp_path / "file").genes == model.genes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m"]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("switches", "absent"),
    [
        ({"cross_attention": False, "graph_attention": True}, ".attn_"),
        ({"cross_attention": True, "graph_attention": False}, ".gat."),
        ({"cross_attention": False, "graph_attention": False}, ".attn_"),
    ],
)
def test_ablated_architecture_is_rebuilt_from_a_checkpoint(toy, tmp_path, switches, absent):
    arch = _arch(toy, n_models=2, **switches)
    torch.manual_seed(0)
    model = ASIGNModel.from_settings({"architecture": arch, "genes": []})
    state = model.net.state_dict()
    assert not any(absent in k for k in state)
    on = [k for k, v in switches.items() if v]
    assert (f"attention={on}" in repr(model)) if on else ("attention=" not in repr(model))
    loaded = ASIGNModel.load(model.save(tmp_path / "m"))
    stored = loaded.settings["architecture"]
    assert {k: stored[k] for k in arch} == arch  # the rest: defaults, spelled out
    assert loaded.net.state_dict().keys() == state.keys()
    model.net.eval()
    a = model.net(*_args(toy), toy.values, toy.known)
    b = loaded.net(*_args(toy), toy.values, toy.known)
    torch.testing.assert_close(a["prediction"], b["prediction"])


def test_settings_without_switches_build_the_full_network(toy):
    """Checkpoints written before the ablation switches existed load as the full network."""
    arch = {"spot_dim": 8, "region_dim": 8, "global_dim": 8, "n_genes": 3, "hidden_dim": 8}
    net = ASIGNModel.from_settings({"architecture": arch}).net.members[0].network
    assert net.graph_attention and net.fusion.cross_attention
    shown = "attention=['cross_attention', 'graph_attention']"
    assert shown in repr(ASIGNModel.from_settings({"architecture": arch}))


def _saved_without(model, setting: str, tmp_path):
    """``model`` saved and loaded back as if written before ``setting`` existed."""
    path = model.save(tmp_path / "m")
    settings = json.loads((path / "settings.json").read_text())
    del settings["architecture"][setting]
    (path / "settings.json").write_text(json.dumps(settings))
    return ASIGNModel.load(path)


def test_models_saved_before_gat_variant_existed_load_their_gatv2_layers(toy, tmp_path):
    model = ASIGNModel.from_settings(
        {"architecture": _arch(toy, gat_variant="gatv2"), "genes": list("abcdefg")}
    )
    loaded = _saved_without(model, "gat_variant", tmp_path)
    assert loaded.architecture.gat_variant == "gatv2"
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, model.net.state_dict()[key])
    # new models use the paper's GAT layers
    assert ArchitectureConfig().gat_variant == "gat"


def test_models_saved_before_token_pooling_existed_predict_as_they_did(toy, tmp_path):
    arch = _arch(toy, cross_attention=False, graph_attention=False)
    torch.manual_seed(0)
    model = ASIGNModel.from_settings(
        {"architecture": {**arch, "token_pooling": "project_then_mean"}, "genes": list("abcdefg")}
    )
    loaded = _saved_without(model, "token_pooling", tmp_path)
    assert loaded.architecture.token_pooling == "project_then_mean"
    model.net.eval()
    a = model.net(*_args(toy), toy.values, toy.known)
    b = loaded.net(*_args(toy), toy.values, toy.known)
    torch.testing.assert_close(a["prediction"], b["prediction"])
    # the same weights pooled the new way predict otherwise: the setting is not cosmetic
    renewed = ASIGNModel.from_settings(
        {"architecture": {**arch, "token_pooling": "mean_then_project"}, "genes": list("abcdefg")}
    )
    renewed.net.load_state_dict(model.net.state_dict())
    renewed.net.eval()
    c = renewed.net(*_args(toy), toy.values, toy.known)
    assert not torch.allclose(a["prediction"], c["prediction"])
    assert ArchitectureConfig().token_pooling == "mean_then_project"
    with pytest.raises(ValueError, match="token_pooling must be"):
        ArchitectureConfig(token_pooling="max")


def test_defaults_leave_out_both_attention_blocks_and_paper_restores_them(toy):
    default = ArchitectureConfig()
    assert not default.cross_attention and not default.graph_attention
    assert default.ridge_member == 0.5
    paper = ArchitectureConfig.paper(hidden_dim=16, n_heads=2)
    assert paper.cross_attention and paper.graph_attention
    assert (paper.gat_variant, paper.ridge_member, paper.hidden_dim) == ("gat", 0.0, 16)
    dims = dict(zip(("spot_dim", "region_dim", "global_dim"), toy.dims, strict=True))
    settings = {**dims, "n_genes": toy.n_genes, **paper.to_dict()}
    state = ASIGNModel.from_settings({"architecture": settings}).net.state_dict()
    assert any(".gat." in k for k in state) and any(".attn_" in k for k in state)
