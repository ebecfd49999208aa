from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from asign_sc import InvalidStackError
from asign_sc.models import ArchitectureConfig, ASIGNModel, TrainingConfig
from asign_sc.tl import evaluate, fit_asign, impute

REGION_OFFSETS = np.array([(-50, -50), (50, -50), (-50, 50), (50, 50)], dtype=float)
GLOBAL_OFFSETS = np.array([(dx, dy) for dx in (-200, 0, 200) for dy in (-200, 0, 200)], dtype=float)
SMALL = {"hidden_dim": 32, "n_heads": 4, "n_gat_layers": 2}
FAST = {
    "architecture": ArchitectureConfig(**SMALL),
    "epochs": 25,
    "n_models": 1,
    "show_progress_bar": False,
}


def make_stack(
    n_sections: int = 3,
    side: int = 12,
    n_genes: int = 30,
    dim: int = 24,
    shift: float = 0.0,
    unseen: float = 0.0,
    seed: int = 0,
) -> ad.AnnData:
    """A small legacy-layout stack: smooth latent tissue field -> features and counts.

    Sections are stacked along z over the same tissue, so expression is smooth across
    sections; spot features are a noisy linear map of the field plus, with ``shift``, a
    per-section offset and scale (stain/scanner shift). With ``unseen``, a second field that
    the images do not show drives expression too (only propagation can recover it).
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, side * 100, size=(6, 2))
    amp = rng.normal(size=(6, 3))
    hidden_centres = rng.uniform(0, side * 100, size=(6, 2))
    hidden_amp = rng.normal(size=(6, 2))

    def field(xy, centres=centres, amp=amp):
        d2 = ((xy[:, None, :] - centres[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * 250.0**2)) @ amp

    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 100.0
    loadings = rng.normal(size=(3, n_genes))
    hidden_loadings = rng.normal(size=(2, n_genes))
    base = rng.uniform(0.5, 3, size=n_genes)
    w_feat = rng.normal(size=(3, dim))
    spatial, sections, counts, spot, region, glob = [], [], [], [], [], []
    for s in range(n_sections):
        xy = grid + rng.normal(scale=10, size=grid.shape)
        z = field(xy)
        h = field(xy, hidden_centres, hidden_amp)
        rate = np.exp(base + z @ loadings * 0.8 + unseen * h @ hidden_loadings)
        lib = rng.uniform(0.5, 1.5, size=(len(xy), 1))
        counts.append(rng.poisson(rate * lib))
        offset = rng.normal(scale=shift, size=dim)
        scale = np.exp(rng.normal(scale=shift / 3, size=dim))

        def feats(pts, offset=offset, scale=scale):
            noise = rng.normal(scale=0.5, size=(len(pts), dim))
            return (field(pts) @ w_feat + noise) * scale + offset

        spot.append(feats(xy))
        region.append(np.stack([feats(xy + o) for o in REGION_OFFSETS], 1))
        glob.append(np.stack([feats(xy + o) for o in GLOBAL_OFFSETS], 1))
        spatial.append(xy)
        sections += [f"S{s}"] * len(xy)
    xy = np.concatenate(spatial)
    z_level = np.repeat(np.arange(n_sections) * 100.0, side * side)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.concatenate(counts).astype(np.float32)),
        obs=pd.DataFrame(
            {"section": pd.Categorical(sections, categories=[f"S{s}" for s in range(n_sections)])},
            index=[f"spot{i}" for i in range(len(sections))],
        ),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["spatial_aligned"] = xy.copy()
    adata.uns["spatial"] = {
        f"S{s}": {"scalefactors": {"spot_diameter_fullres": 50.0}} for s in range(n_sections)
    }
    adata.obsm["X_asign_spot"] = np.concatenate(spot).astype(np.float32)
    adata.obsm["X_asign_region_tokens"] = np.concatenate(region).astype(np.float32)
    adata.obsm["X_asign_global_tokens"] = np.concatenate(glob).astype(np.float32)
    for level in ("region", "global"):  # pooled embeddings, as extract_features writes them
        adata.obsm[f"X_asign_{level}"] = adata.obsm[f"X_asign_{level}_tokens"].mean(1)
    pts = np.c_[xy, z_level]
    dist, idx = cKDTree(pts).query(pts, k=11)
    rows = np.repeat(np.arange(len(pts)), 10)
    weights = 1.0 / (1.0 + dist[:, 1:].ravel() / 100)
    graph = sp.csr_matrix((weights, (rows, idx[:, 1:].ravel())), shape=(len(pts), len(pts)))
    adata.obsp["spatial3d_connectivities"] = graph.maximum(graph.T).tocsr()
    return adata


def per_gene_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    r = (p * t).sum(0) / np.sqrt((p**2).sum(0) * (t**2).sum(0) + 1e-12)
    return float(r.mean())


def truth_of(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    counts = adata.X.toarray()
    cols = [adata.var_names.get_loc(g) for g in genes]
    return np.log1p(counts[:, cols] / counts.sum(1, keepdims=True) * 1e4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stack() -> ad.AnnData:
    return make_stack()


@pytest.fixture(scope="module")
def fitted(stack) -> tuple[ad.AnnData, ASIGNModel]:
    adata = stack.copy()
    model = fit_asign(adata, known_sections=["S0"], n_top_genes=20, device="cpu", **FAST)
    return adata, model


# -- fit -----------------------------------------------------------------------------------
def test_fit_records_history_settings_and_uns(fitted, tmp_path):
    adata, model = fitted
    hist = model.history
    assert len(hist["epoch"]) <= FAST["epochs"]
    assert {"loss", "network_loss", "blend_loss", "val_loss", "val_pcc", "seconds"} <= set(hist)
    assert all(np.isfinite(hist["loss"]))
    assert (hist["seconds"] > 0).all()  # wall time of each epoch, validation included
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert len(model.genes) == 20
    s = model.settings
    assert s["features"] == {"key": "asign", "standardize": "section"}
    assert s["normalization"]["target_sum"] == 1e4
    assert s["known_sections"] == ["S0"]
    fit = adata.uns["asign"]["fit"]
    assert list(fit["known_sections"]) == ["S0"]
    assert len(fit["history"]["loss"]) == len(hist["loss"])
    # held-out spots come from the known section only
    (val,) = s["training"]["validation_obs"]
    assert len(val) == round(0.2 * 144)
    assert set(adata.obs.loc[val, "section"]) == {"S0"}
    adata.write_h5ad(tmp_path / "fitted.h5ad")  # everything recorded is writable


def test_unknown_sections_expression_is_never_read(stack):
    adata = stack.copy()
    x = adata.X.toarray()
    x[(adata.obs.section != "S0").to_numpy()] = np.nan
    adata.X = x
    model = fit_asign(adata, known_sections=["S0"], n_top_genes=5, **{**FAST, "epochs": 2})
    impute(adata, model)
    impute(adata, method="propagation", known_sections=["S0"], key_added="p", layer_added="p")
    assert np.isfinite(adata.obsm["asign"].to_numpy()).all()
    assert np.isfinite(adata.obsm["p"].to_numpy()).all()


def test_fit_selects_top_genes_by_mean_count(stack, fitted):
    _, model = fitted
    known = stack[stack.obs.section == "S0"].X.toarray().mean(0)
    top = stack.var_names[np.argsort(-known, kind="stable")[:20]]
    assert model.genes == list(top)


def test_fit_is_deterministic_under_a_seed(stack):
    kw = {**FAST, "epochs": 5, "n_top_genes": 10, "device": "cpu"}
    a = fit_asign(stack.copy(), known_sections=["S0"], seed=3, **kw)
    b = fit_asign(stack.copy(), known_sections=["S0"], seed=3, **kw)
    c = fit_asign(stack.copy(), known_sections=["S0"], seed=4, **kw)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    for (k, v), w in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert a.history["loss"].tolist() != c.history["loss"].tolist()


def test_validation_labels_never_reach_training(stack):
    """Scrambling the held-out spots' counts leaves every training quantity unchanged."""
    kw = {
        **FAST,
        "epochs": 8,
        "device": "cpu",
        "training": TrainingConfig(early_stopping=False),
    }
    genes = list(stack.var_names[:12])
    first = stack.copy()
    a = fit_asign(first, known_sections=["S0"], genes=genes, **kw)
    second = stack.copy()
    val = second.obs_names.get_indexer(a.settings["training"]["validation_obs"][0])
    x = second.X.toarray()
    x[val] = np.random.default_rng(0).permutation(x[val].ravel()).reshape(x[val].shape) * 3
    second.X = sp.csr_matrix(x)
    b = fit_asign(second, known_sections=["S0"], genes=genes, **kw)
    for key in ("loss", "network_loss", "blend_loss"):
        assert a.history[key].tolist() == b.history[key].tolist(), key
    assert a.history["val_loss"].tolist() != b.history["val_loss"].tolist()


def test_blocked_validation_holds_out_patches_far_from_training_spots(stack):
    adata = stack.copy()
    kw = {**FAST, "epochs": 3, "n_top_genes": 6, "device": "cpu"}
    training = TrainingConfig(validation="blocked", validation_buffer=1.0)
    model = fit_asign(adata, known_sections=["S0"], training=training, **kw)
    (val,) = model.settings["training"]["validation_obs"]
    assert len(val) == round(0.2 * 144)
    assert adata.uns["asign"]["fit"]["training"]["validation"] == "blocked"
    s0 = adata[adata.obs.section == "S0"]
    xy = s0.obsm["spatial"]
    is_val = s0.obs_names.isin(val)
    nearest = cKDTree(xy[is_val]).query(xy[is_val], k=2)[0][:, 1]
    assert np.median(nearest) < 150  # patches, not scattered spots (pitch 100)


def test_early_stopping_keeps_the_best_epoch(stack):
    model = fit_asign(
        stack.copy(),
        known_sections=["S0"],
        n_top_genes=10,
        device="cpu",
        **{**FAST, "epochs": 60},
        training=TrainingConfig(patience=3, lr=0.05),
    )
    hist = model.history
    (best,) = model.settings["training"]["best_epoch"]
    assert len(hist["epoch"]) < 60
    assert hist["val_loss_smoothed"][best] == min(hist["val_loss_smoothed"])
    assert len(hist["epoch"]) - 1 - best == 3


def test_ensemble_members_differ_and_their_spread_is_the_uncertainty(stack):
    adata = stack.copy()
    model = fit_asign(
        adata, known_sections=["S0"], n_top_genes=8, device="cpu", **{**FAST, "n_models": 2}
    )
    assert set(model.history["member"]) == {0, 1}
    first, second = model.settings["training"]["validation_obs"]
    assert set(first) != set(second)
    impute(adata, model)
    params = adata.uns["asign"]["impute"]
    assert params["uncertainty"] == "ensemble_std" and params["n_models"] == 2
    unknown = (adata.obs.section != "S0").to_numpy()
    unc = adata.obsm["asign_uncertainty"].to_numpy()
    assert np.all(unc[~unknown] == 0) and np.all(unc[unknown] > 0)
    # the ensemble's prediction is the mean of its members'
    single = ASIGNModel.from_settings(
        {**model.settings, "architecture": {**model.settings["architecture"], "n_models": 1}}
    )
    members = []
    for member in model.net.members:
        single.net.members[0].load_state_dict(member.state_dict())
        impute(adata, single, key_added="one", layer_added="one")
        members.append(adata.obsm["one"].to_numpy())
    np.testing.assert_allclose(adata.obsm["asign"].to_numpy(), np.mean(members, 0), atol=1e-5)


def _second_view(adata: ad.AnnData, key: str, seed: int = 1) -> None:
    """Another embedding of the same spots under ``key``: a random rotation plus noise."""
    rng = np.random.default_rng(seed)
    dim = adata.obsm["X_asign_spot"].shape[1]
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    for name in ("spot", "region", "global", "region_tokens", "global_tokens"):
        values = adata.obsm[f"X_asign_{name}"] @ rotation
        adata.obsm[f"X_{key}_{name}"] = values + rng.normal(scale=0.3, size=values.shape)


def test_models_on_two_feature_views_are_averaged(stack, tmp_path):
    adata = stack.copy()
    _second_view(adata, "view2")
    first = fit_asign(adata, known_sections=["S0"], n_top_genes=8, device="cpu", **FAST)
    second = fit_asign(
        adata,
        known_sections=["S0"],
        genes=first.genes,
        features_key="view2",
        key_added="view2",
        device="cpu",
        **FAST,
    )
    assert "fit" in adata.uns["asign"] and "fit" in adata.uns["view2"]
    alone = []
    for name, model in (("a", first), ("b", second)):
        impute(adata, model, key_added=name, layer_added=name)
        alone.append(adata.obsm[name].to_numpy())
    assert not np.allclose(alone[0], alone[1])  # the views give different predictions
    impute(adata, [first, second])
    np.testing.assert_allclose(adata.obsm["asign"].to_numpy(), np.mean(alone, 0), atol=1e-5)
    params = adata.uns["asign"]["impute"]
    assert list(params["features_keys"]) == ["asign", "view2"]
    assert params["features_key"] == "asign"
    assert params["n_averaged_models"] == 2 and params["n_models"] == 2 * first.n_models
    assert params["uncertainty"] == "total_std_over_models"
    assert params["models"]["1"]["features_key"] == "view2"
    # total std: each model's own spread and the spread between the models
    unc = adata.obsm["asign_uncertainty"].to_numpy()
    spreads = [adata.obsm[f"{n}_uncertainty"].to_numpy() for n in ("a", "b")]
    expected = np.sqrt((spreads[0] ** 2 + spreads[1] ** 2) / 2 + np.var(alone, axis=0))
    np.testing.assert_allclose(unc, expected, rtol=1e-4, atol=1e-6)
    known = (adata.obs.section == "S0").to_numpy()
    assert np.all(unc[known] == 0) and np.all(unc[~known] > 0)
    # evaluate scores the average, baselines from the first view's features
    scores = evaluate(adata, sections=["S1", "S2"], baselines=("ridge",))
    assert set(scores["method"]) == {"asign", "ridge"}
    adata.write_h5ad(tmp_path / "views.h5ad")  # the record is writable
    assert ad.read_h5ad(tmp_path / "views.h5ad").uns["asign"]["impute"]["n_averaged_models"] == 2


def test_averaging_refuses_models_that_do_not_fit_together(stack, fitted):
    _, model = fitted
    adata = stack.copy()
    other = fit_asign(adata, known_sections=["S1"], n_top_genes=20, device="cpu", **FAST)
    with pytest.raises(ValueError, match="known_sections"):
        impute(adata, [model, other])
    fewer = fit_asign(adata, known_sections=["S0"], n_top_genes=10, device="cpu", **FAST)
    with pytest.raises(ValueError, match="genes=model"):
        impute(adata, [model, fewer])
    with pytest.raises(ValueError, match="empty list"):
        impute(adata, [])
    with pytest.raises(TypeError, match=r"model\[1\]"):
        impute(adata, [model, "model"])


def test_fit_errors(stack):
    bad = stack.copy()
    del bad.obsm["X_asign_region_tokens"]
    with pytest.raises(InvalidStackError, match="extract_features"):
        fit_asign(bad, known_sections=["S0"], **FAST)
    bad = stack.copy()
    bad.obsm["X_asign_global_tokens"] = bad.obsm["X_asign_global_tokens"][:, :1]
    with pytest.raises(InvalidStackError, match="one token"):
        fit_asign(bad, known_sections=["S0"], **FAST)
    bad = stack.copy()
    del bad.obsp["spatial3d_connectivities"]
    with pytest.raises(InvalidStackError, match="build_3d_graph"):
        fit_asign(bad, known_sections=["S0"], **FAST)
    with pytest.raises(InvalidStackError, match="not sections"):
        fit_asign(stack.copy(), known_sections=["S9"], **FAST)
    with pytest.raises(ValueError, match="mask_fraction"):
        TrainingConfig(mask_fraction=1.0)
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        TrainingConfig(validation_fraction=0)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit_asign(stack.copy(), known_sections=["S0"], **{**FAST, "epochs": 0})


def _fit_ablated(adata: ad.AnnData, **switches: bool) -> ASIGNModel:
    kw = {**FAST, "epochs": 4, "n_top_genes": 8, "device": "cpu"}
    kw["architecture"] = ArchitectureConfig(**SMALL, **switches)
    return fit_asign(adata, known_sections=["S0"], **kw)


@pytest.mark.parametrize(
    "switches",
    [
        {"cross_attention": True, "graph_attention": True},
        {"cross_attention": True, "graph_attention": False},
        {"cross_attention": False, "graph_attention": True},
        {"cross_attention": False, "graph_attention": False},
    ],
)
def test_every_attention_setting_fits_imputes_and_round_trips(stack, tmp_path, switches):
    from torch_geometric.nn import GATConv

    adata = stack.copy()
    model = _fit_ablated(adata, **switches)
    arch = model.settings["architecture"]
    assert arch["cross_attention"] is switches["cross_attention"]
    assert arch["graph_attention"] is switches["graph_attention"]
    modules = list(model.net.modules())
    fusion = model.net.members[0].network.fusion
    has_attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in fusion.modules())
    assert has_attention is arch["cross_attention"]
    assert any(isinstance(m, GATConv) for m in modules) is arch["graph_attention"]
    impute(adata, model, key_added="before", layer_added="before")
    loaded = ASIGNModel.load(model.save(tmp_path / "ablated"))
    impute(adata, loaded, key_added="after", layer_added="after")
    before = adata.obsm["before"].to_numpy()
    np.testing.assert_array_equal(before, adata.obsm["after"].to_numpy())
    assert np.isfinite(before).all()
    known = (adata.obs.section == "S0").to_numpy()
    np.testing.assert_allclose(before[known], truth_of(adata, model.genes)[known], atol=1e-5)
    assert adata.uns["asign"]["fit"]["architecture"]["graph_attention"] == arch["graph_attention"]


def test_without_graph_attention_the_network_ignores_other_spots_images(stack):
    adata = stack.copy()
    model = _fit_ablated(adata, graph_attention=False)
    impute(adata, model, method="network", key_added="a", layer_added="a")
    edited = adata.copy()
    edited.obsm["X_asign_spot"][0] += 10.0  # one spot of S0; its 3D neighbours keep their own
    impute(edited, model, method="network", key_added="b", layer_added="b")
    changed = np.abs(adata.obsm["a"].to_numpy() - edited.obsm["b"].to_numpy()).sum(1) > 1e-5
    # section standardisation shifts S0's features slightly for all its spots, not others'
    other = (adata.obs.section != "S0").to_numpy()
    assert changed[0] and not changed[other].any()


def test_imputed_layer_holds_the_values_in_their_columns_without_zeros():
    from asign_sc.tl._impute import _dense_rows_as_csr

    values = np.array([[1.0, 0.0, 2.5], [0.0, 0.0, 0.0], [3.0, -1.0, 4.0]], dtype=np.float64)
    cols = np.array([4, 0, 2])  # not in var order
    matrix = _dense_rows_as_csr(values, cols, n_vars=6)
    expected = np.zeros((3, 6))
    expected[:, cols] = values
    assert matrix.dtype == np.float32 and matrix.shape == (3, 6)
    np.testing.assert_array_equal(matrix.toarray(), expected)
    assert matrix.nnz == 5 and matrix.has_canonical_format
    assert matrix.indices.dtype == matrix.indptr.dtype == np.int32


def test_ablation_switch_errors(stack):
    with pytest.raises(ValueError, match="graph_attention=False"):
        ArchitectureConfig(n_gat_layers=0)
    with pytest.raises(ValueError, match="spot-wise layers"):
        ArchitectureConfig(graph_attention=False, n_gat_layers=0)
    with pytest.raises(TypeError, match="cross_attention must be True or False"):
        ArchitectureConfig(cross_attention="no")


# -- impute --------------------------------------------------------------------------------
def test_impute_writes_layers_obsm_var_uns(fitted, tmp_path):
    adata, model = fitted
    impute(adata, model)
    genes = model.genes
    layer = adata.layers["asign"]
    adata.write_h5ad(tmp_path / "imputed.h5ad")
    assert sp.issparse(layer) and layer.shape == adata.shape
    modelled = adata.var["asign_modelled"]
    assert modelled.sum() == len(genes) and modelled[genes].all()
    assert layer[:, ~modelled.to_numpy()].nnz == 0
    frame = adata.obsm["asign"]
    assert list(frame.columns) == genes and (frame.index == adata.obs_names).all()
    np.testing.assert_allclose(layer[:, adata.var_names.get_indexer(genes)].toarray(), frame)
    assert layer.has_canonical_format
    known = (adata.obs.section == "S0").to_numpy()
    np.testing.assert_allclose(frame[known], truth_of(adata, genes)[known], rtol=1e-5, atol=1e-5)
    unc = adata.obsm["asign_uncertainty"]
    assert (unc[known] == 0).all().all()
    assert (unc[~known].to_numpy() >= 0).all()
    params = adata.uns["asign"]["impute"]
    assert params["method"] == "asign" and list(params["known_sections"]) == ["S0"]
    assert "fit" in adata.uns["asign"]  # earlier entries are kept


def test_impute_copy_leaves_input_alone(fitted):
    adata, model = fitted
    fresh = adata.copy()
    for key in ("asign_copy",):
        fresh.obsm.pop(key, None)
    out = impute(fresh, model, key_added="asign_copy", layer_added="asign_copy", copy=True)
    assert "asign_copy" in out.obsm and "asign_copy" not in fresh.obsm


def test_save_load_round_trip_gives_identical_predictions(fitted, tmp_path):
    adata, model = fitted
    path = model.save(tmp_path / "model")
    assert path.is_dir()
    torch.load(path / "weights.pt", weights_only=True)  # tensors only
    settings = json.loads((path / "settings.json").read_text())
    assert settings["genes"] == model.genes
    loaded = ASIGNModel.load(path)
    assert loaded.settings == model.settings
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)
    model.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    impute(adata, model, key_added="before", layer_added="before")
    impute(adata, loaded, key_added="after", layer_added="after")
    np.testing.assert_array_equal(adata.obsm["before"].to_numpy(), adata.obsm["after"].to_numpy())


def test_network_method_predicts_known_spots_too(fitted):
    adata, model = fitted
    impute(adata, model, method="network", key_added="net", layer_added="net")
    known = (adata.obs.section == "S0").to_numpy()
    truth = truth_of(adata, model.genes)
    assert not np.allclose(adata.obsm["net"].to_numpy()[known], truth[known])
    assert adata.uns["net"]["impute"]["method"] == "network"


def test_model_applies_to_a_new_stack_with_its_own_known_section(fitted):
    _, model = fitted
    other = make_stack(seed=5)
    impute(other, model, known_sections=["S2"])
    known = (other.obs.section == "S2").to_numpy()
    truth = truth_of(other, model.genes)
    np.testing.assert_allclose(other.obsm["asign"].to_numpy()[known], truth[known], atol=1e-5)
    assert per_gene_pcc(other.obsm["asign"].to_numpy()[~known], truth[~known]) > 0.3


def test_impute_errors(fitted):
    adata, model = fitted
    with pytest.raises(ValueError, match="needs a fitted model"):
        impute(adata, method="asign")
    with pytest.raises(ValueError, match="known_sections"):
        impute(adata, method="propagation")
    with pytest.raises(ValueError, match="method must be"):
        impute(adata, model, method="magic")
    small = make_stack(dim=8)
    with pytest.raises(InvalidStackError, match="Feature sizes"):
        impute(small, model)
    with pytest.raises(InvalidStackError, match="spatial_aligned"):
        bad = adata.copy()
        del bad.obsm["spatial_aligned"]
        impute(bad, method="overlap", known_sections=["S0"])


# -- baselines -----------------------------------------------------------------------------
def test_propagation_baseline_matches_the_propagation_block(stack):
    from asign_sc.models import propagate_labels
    from asign_sc.models._propagation import adjacency_tensor

    adata = stack.copy()
    impute(adata, method="propagation", known_sections=["S0"], n_top_genes=5, n_iterations=1)
    genes = list(adata.obsm["asign"].columns)
    truth = truth_of(adata, genes)
    known = torch.from_numpy((adata.obs.section == "S0").to_numpy())
    values = torch.from_numpy(truth.astype(np.float32)) * known[:, None]
    expected = propagate_labels(
        adjacency_tensor(adata.obsp["spatial3d_connectivities"]), values, known, n_iterations=1
    )
    reached = expected.reached.numpy()
    np.testing.assert_allclose(
        adata.obsm["asign"].to_numpy()[reached], expected.values.numpy()[reached], atol=1e-5
    )
    # with 1 step some spots of the far section are unreached: mean profile, NaN spread
    unreached = ~reached
    assert unreached.any()
    np.testing.assert_allclose(
        adata.obsm["asign"].to_numpy()[unreached][0], truth[known.numpy()].mean(0), rtol=1e-5
    )
    assert np.isnan(adata.obsm["asign_uncertainty"].to_numpy()[unreached]).all()


def test_overlap_baseline_takes_the_nearest_known_spot(stack):
    adata = stack.copy()
    impute(adata, method="overlap", known_sections=["S0"], n_top_genes=5)
    genes = list(adata.obsm["asign"].columns)
    truth = truth_of(adata, genes)
    known = (adata.obs.section == "S0").to_numpy()
    xy = adata.obsm["spatial_aligned"]
    _, nearest = cKDTree(xy[known]).query(xy[~known])
    np.testing.assert_allclose(
        adata.obsm["asign"].to_numpy()[~known], truth[known][nearest], rtol=1e-5
    )


def test_similarity_baseline_averages_most_similar_known_spots(stack):
    adata = stack.copy()
    impute(
        adata,
        method="similarity",
        known_sections=["S0"],
        n_top_genes=5,
        n_neighbors=1,
        standardize_features=None,
    )
    genes = list(adata.obsm["asign"].columns)
    truth = truth_of(adata, genes)
    known = (adata.obs.section == "S0").to_numpy()
    f = adata.obsm["X_asign_spot"]
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    best = np.argmax(f[~known] @ f[known].T, axis=1)
    np.testing.assert_allclose(
        adata.obsm["asign"].to_numpy()[~known], truth[known][best], rtol=1e-5
    )
    assert (adata.obsm["asign_uncertainty"].to_numpy() == 0).all()  # k = 1: no spread


def test_ridge_baselines_predict_from_images_and_spread_over_the_graph(stack):
    from asign_sc.tl import evaluate

    adata = stack.copy()
    for method in ("ridge", "ridge_propagation"):
        impute(
            adata,
            method=method,
            known_sections=["S0"],
            n_top_genes=10,
            key_added=method,
            layer_added=method,
        )
    genes = list(adata.obsm["ridge"].columns)
    known = (adata.obs.section == "S0").to_numpy()
    truth = truth_of(adata, genes)
    ridge = adata.obsm["ridge"].to_numpy()
    spread = adata.obsm["ridge_propagation"].to_numpy()
    np.testing.assert_allclose(ridge[known], truth[known], atol=1e-5)
    np.testing.assert_allclose(spread[known], truth[known], atol=1e-5)
    assert per_gene_pcc(ridge[~known], truth[~known]) > 0.3  # features follow the field
    assert not np.allclose(spread[~known], ridge[~known])
    assert adata.uns["ridge"]["impute"]["alpha"] > 0
    scores = evaluate(
        adata, sections=["S1", "S2"], key="ridge", baselines=("ridge", "ridge_propagation")
    )
    overall = scores.query("section == 'all' and metric == 'pcc_gene'").set_index("method")
    assert set(overall.index) == {"ridge", "ridge_propagation"}
    assert np.isfinite(overall["value"]).all()


@pytest.mark.slow
def test_paper_network_beats_every_baseline_on_unknown_sections(stack):
    """On this stack the features are noisy maps of a smooth field, so graph attention
    (averaging neighbours' features) pays; on her2st it does not (accuracy benchmark) and
    the default network leaves it out."""
    adata = stack.copy()
    paper_network = ArchitectureConfig(**SMALL, cross_attention=True, graph_attention=True)
    model = fit_asign(
        adata,
        known_sections=["S0"],
        n_top_genes=20,
        device="cpu",
        **{**FAST, "epochs": 150, "architecture": paper_network},
    )
    unknown = (adata.obs.section != "S0").to_numpy()
    truth = truth_of(adata, model.genes)[unknown]
    scores = {}
    for method in ("asign", "network", "propagation", "overlap", "similarity"):
        impute(
            adata, model, method=method, known_sections=["S0"], key_added=method, layer_added=method
        )
        scores[method] = per_gene_pcc(adata.obsm[method].to_numpy()[unknown], truth)
    assert scores["asign"] == max(scores.values()), scores


@pytest.mark.slow
def test_section_standardisation_removes_a_feature_shift():
    shifted = make_stack(shift=3.0)
    unknown = (shifted.obs.section != "S0").to_numpy()
    scores = {}
    for std in ("section", None):
        model = fit_asign(
            shifted,
            known_sections=["S0"],
            n_top_genes=20,
            device="cpu",
            training=TrainingConfig(standardize_features=std),
            **{**FAST, "epochs": 100},
        )
        impute(shifted, model, method="network")
        truth = truth_of(shifted, model.genes)[unknown]
        scores[std] = per_gene_pcc(shifted.obsm["asign"].to_numpy()[unknown], truth)
    assert scores["section"] > scores[None] + 0.02, scores


@pytest.mark.gpu
def test_fit_and_impute_on_cuda(stack):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    adata = stack.copy()
    model = fit_asign(
        adata, known_sections=["S0"], n_top_genes=10, device="cuda", **{**FAST, "epochs": 10}
    )
    assert model.device.type == "cuda"
    impute(adata, model, device="cuda")
    cpu = model.copy().to("cpu")
    impute(adata, cpu, device="cpu", key_added="cpu", layer_added="cpu")
    np.testing.assert_allclose(adata.obsm["asign"], adata.obsm["cpu"], atol=1e-4)


@pytest.mark.gpu
def test_minibatch_fit_and_chunked_prediction_on_cuda(stack):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from asign_sc._stack import resolve_stack
    from asign_sc.models import StackData

    adata = stack.copy()
    model = fit_asign(
        adata,
        known_sections=["S0"],
        n_top_genes=10,
        device="cuda",
        training=TrainingConfig(batch_size=32),
        **{**FAST, "epochs": 5},
    )
    data = StackData.from_table(
        adata, resolve_stack(adata), features_key="asign", graph_key="spatial3d", standardize=None
    )
    values = np.zeros((adata.n_obs, len(model.genes)), dtype=np.float32)
    known = (adata.obs["section"] == "S0").to_numpy()
    whole = model.predict(data.inputs, values, known, device="cuda", chunk_size=None)
    chunked = model.predict(data.inputs, values, known, device="cuda", chunk_size=50)
    np.testing.assert_allclose(chunked["prediction"], whole["prediction"], atol=1e-4)


def test_fit_and_impute_a_spatialdata_stack():
    """SpatialData in, results in its table; copy=True leaves the input untouched."""
    from asign_sc.datasets import synthetic_stack

    sdata, _ = synthetic_stack(n_sections=3, n_spots_per_section=60, image_size=256, n_genes=12)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    n = table.n_obs
    table.obsm["X_asign_spot"] = rng.normal(size=(n, 8)).astype(np.float32)
    table.obsm["X_asign_region_tokens"] = rng.normal(size=(n, 4, 8)).astype(np.float32)
    table.obsm["X_asign_global_tokens"] = rng.normal(size=(n, 4, 8)).astype(np.float32)
    xyz = np.c_[table.obsm["spatial"], table.obs["section"].cat.codes.to_numpy() * 50.0]
    dist, idx = cKDTree(xyz).query(xyz, k=7)
    rows = np.repeat(np.arange(n), 6)
    table.obsp["spatial3d_connectivities"] = sp.csr_matrix(
        (1 / (1 + dist[:, 1:].ravel()), (rows, idx[:, 1:].ravel())), shape=(n, n)
    )
    first = table.obs["section"].cat.categories[0]
    model = fit_asign(sdata, known_sections=[first], n_top_genes=6, **{**FAST, "epochs": 3})
    out = impute(sdata, model, copy=True)
    assert "asign" in out.tables["table"].obsm and "asign" not in table.obsm
    impute(sdata, model)
    assert table.obsm["asign"].shape == (n, 6)


def test_fit_and_impute_leave_the_features_untouched(stack):
    adata = stack.copy()
    adata.obsm["X_asign_region_tokens"] = adata.obsm["X_asign_region_tokens"].astype(np.float16)
    before = {k: np.array(v, copy=True) for k, v in adata.obsm.items()}
    model = fit_asign(adata, known_sections=["S0"], n_top_genes=5, **{**FAST, "epochs": 2})
    impute(adata, model)
    impute(adata, method="ridge", known_sections=["S0"], key_added="r", layer_added="r")
    for key, value in before.items():
        np.testing.assert_array_equal(adata.obsm[key], value, err_msg=key)
    assert adata.obsm["X_asign_region_tokens"].dtype == np.float16


# -- large stacks: mini-batches, chunked prediction, memory ----------------------------------
def test_auto_batch_size_trains_a_small_stack_full_graph_unchanged(stack, fitted):
    _, model = fitted  # TrainingConfig() default: batch_size="auto"
    again = stack.copy()
    full = fit_asign(
        again,
        known_sections=["S0"],
        n_top_genes=20,
        device="cpu",
        training=TrainingConfig(batch_size=None),
        **FAST,
    )
    # the same epochs, losses and validation (wall seconds differ from run to run)
    pd.testing.assert_frame_equal(
        full.history.drop(columns="seconds"), model.history.drop(columns="seconds")
    )


def test_chunked_prediction_equals_the_whole_stack_pass(stack, fitted):
    from asign_sc._stack import resolve_stack
    from asign_sc.models import StackData

    adata, model = fitted
    data = StackData.from_table(
        adata,
        resolve_stack(adata),
        features_key="asign",
        graph_key="spatial3d",
        standardize="section",
    )
    values = np.zeros((adata.n_obs, len(model.genes)), dtype=np.float32)
    known = (adata.obs["section"] == "S0").to_numpy()
    whole = model.predict(data.inputs, values, known, device="cpu", chunk_size=None)
    chunked = model.predict(data.inputs, values, known, device="cpu", chunk_size=50)
    for key, value in whole.items():
        np.testing.assert_allclose(chunked[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_minibatch_training_is_as_accurate_as_full_graph(stack):
    """Per-gene PCC on the unknown sections, 2 seeds per mode, 40 epochs.

    Measured over 4 seeds (60 epochs): full-graph 0.809 +- 0.0025, mini-batch (32 spots)
    0.832 +- 0.0014; the tolerance, 0.01, is four seed standard deviations. Mini-batches on
    neighbour-sampled subgraphs (at most 4 in-edges per spot, of 11 on average here:
    0.821 against 0.822 exact) as
    well.
    """
    modes = {
        "full": {"batch_size": None},
        "exact": {"batch_size": 32, "num_neighbors": None},
        "sampled": {"batch_size": 32, "num_neighbors": 4},
    }
    scores = {}
    for mode, settings in modes.items():
        for seed in (0, 1):
            adata = stack.copy()
            model = fit_asign(
                adata,
                known_sections=["S0"],
                n_top_genes=20,
                device="cpu",
                seed=seed,
                training=TrainingConfig(**settings),
                # networks only (no linear member): the comparison sees the training alone
                **{
                    **FAST,
                    "epochs": 40,
                    "architecture": ArchitectureConfig(**SMALL, ridge_member=0),
                },
            )
            impute(adata, model, device="cpu")
            unknown = (adata.obs["section"] != "S0").to_numpy()
            pred = adata.obsm["asign"].to_numpy()[unknown]
            score = per_gene_pcc(pred, truth_of(adata, model.genes)[unknown])
            scores.setdefault(mode, []).append(score)
    full = np.mean(scores["full"])
    assert full > 0.6
    for mode in ("exact", "sampled"):
        assert np.mean(scores[mode]) >= full - 0.01, scores


def test_fit_and_impute_fail_early_when_the_settings_need_too_much_memory(stack, fitted):
    from asign_sc.models import InsufficientMemoryError

    adata = stack.copy()
    tiny = TrainingConfig(max_memory_gb=1e-6)
    with pytest.raises(InsufficientMemoryError, match=r"features.*extract_features"):
        fit_asign(adata, known_sections=["S0"], n_top_genes=5, training=tiny, **FAST)
    assert "asign" not in adata.uns
    budget = 2e-3  # GB: the features (0.6 MB) fit, one training step does not
    with pytest.raises(InsufficientMemoryError, match=r"batch_size=") as info:
        fit_asign(
            adata,
            known_sections=["S0"],
            n_top_genes=5,
            training=TrainingConfig(max_memory_gb=budget),
            **FAST,
        )
    assert "TrainingConfig(batch_size=...)" in str(info.value)
    assert "asign" not in adata.uns
    _, model = fitted
    from asign_sc._stack import resolve_stack
    from asign_sc.models import StackData

    data = StackData.from_table(
        adata, resolve_stack(adata), features_key="asign", graph_key="spatial3d", standardize=None
    )
    values = np.zeros((adata.n_obs, len(model.genes)), dtype=np.float32)
    with pytest.raises(InsufficientMemoryError, match=r"Prediction on 432 spots"):
        model.predict(data.inputs, values, values[:, 0] > 0, max_memory_gb=1e-6)
