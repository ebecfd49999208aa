"""pl.training: image comparison on a fixed history, a real fitted model, errors."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc


def _history() -> dict[str, list]:
    """Two members' curves: an exponential decay with a ripple (the plot's input, not a result)."""
    history: dict[str, list] = {}
    for member, (rate, stop) in enumerate([(0.08, 40), (0.05, 30)]):
        epochs = np.arange(stop)
        decay = np.exp(-rate * epochs)
        entries = {
            "epoch": epochs,
            "loss": 2.0 + 8.0 * decay + 0.2 * np.sin(epochs),
            "network_loss": 1.5 + 6.0 * decay,
            "blend_loss": 0.5 + 2.0 * decay,
            "val_loss": 2.5 + 7.0 * decay + 0.4 * np.cos(epochs),
            "val_loss_smoothed": 2.5 + 7.0 * decay,
            "val_pcc": 0.6 * (1 - decay),
            "val_network_pcc": 0.4 * (1 - decay),
            "member": [member] * stop,
        }
        for key, values in entries.items():
            history.setdefault(key, []).extend(np.asarray(values).tolist())
    return history


def test_training_matches_reference_image(tmp_path, check_image):
    fig = asc.pl.training(_history(), figsize=(7, 2.8), dpi=50, show=False)
    check_image(fig, "training.png", tmp_path, dpi=50)


def test_fitted_model_curves_and_best_epoch(tmp_path, imputed_stack):
    import torch

    sdata = imputed_stack()
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    n = table.n_obs
    table.obsm["X_asign_spot"] = rng.normal(size=(n, 8)).astype("float32")
    table.obsm["X_asign_region_tokens"] = rng.normal(size=(n, 4, 8)).astype("float32")
    table.obsm["X_asign_global_tokens"] = rng.normal(size=(n, 9, 8)).astype("float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = asc.tl.fit_asign(
            sdata, known_sections=["S2"], n_top_genes=5, epochs=6, show_progress_bar=False,
            architecture=asc.models.ArchitectureConfig(hidden_dim=16, n_heads=2, n_gat_layers=1,
                                                       n_components=None),
            device="cpu",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    fig = asc.pl.training(model, save=tmp_path / "t.png")
    losses, scores = fig.axes
    history = pd.DataFrame(model.history)  # a DataFrame (current models) or a dict (older)
    train = next(line for line in losses.get_lines() if line.get_label() == "loss, model 0")
    first = history["member"].to_numpy() == 0  # default ensemble: one colour each
    np.testing.assert_allclose(train.get_ydata(), history["loss"].to_numpy()[first])
    n_models = history["member"].nunique()
    assert losses.get_title().startswith(f"{n_models} model(s)")
    best = model.settings["training"]["best_epoch"][0]
    assert f"kept epoch {best}" in losses.get_title()
    assert any(line.get_label() == "val_pcc, model 0" for line in scores.get_lines())
    assert (tmp_path / "t.png").stat().st_size > 0
    plt.close(fig)


def _lines(ax, member: int = 0) -> dict:
    return {
        line.get_label().split(",")[0]: line
        for line in ax.get_lines()
        if line.get_label().endswith(f"model {member}")
    }


def test_curves_are_told_apart_by_style_and_members_by_colour():
    fig = asc.pl.training(_history(), show=False)
    losses, scores = fig.axes
    lines = _lines(losses)
    styles = {name: str(line._unscaled_dash_pattern) for name, line in lines.items()}
    assert len(set(styles.values())) == 5  # training, validation, smoothed, network, blend
    assert styles["loss"] != styles["val_loss"]
    assert styles["network_loss"] != styles["blend_loss"]
    colour = {matplotlib.colors.to_hex(line.get_color()) for line in lines.values()}
    other = {matplotlib.colors.to_hex(line.get_color()) for line in _lines(losses, 1).values()}
    assert len(colour) == 1 and len(other) == 1 and colour != other
    # the legend shows each curve kind once in its style, and each model in its colour
    legend = [t.get_text() for t in losses.get_legend().get_texts()]
    assert legend[:2] == ["training loss", "training: network (eq. 9)"]
    assert legend[-2:] == ["model 0", "model 1"]
    handles = losses.get_legend().legend_handles
    assert handles[0].get_linestyle() != handles[3].get_linestyle()  # training vs validation
    assert (
        _lines(scores)["val_pcc"].get_linestyle()
        != _lines(scores)["val_network_pcc"].get_linestyle()
    )
    plt.close(fig)


def test_dataframe_history_draws_the_same_as_a_dict():
    history = _history()
    as_dict = asc.pl.training(history, show=False)
    as_frame = asc.pl.training(pd.DataFrame(history), show=False)
    for a, b in zip(as_dict.axes, as_frame.axes, strict=True):
        for la, lb in zip(a.get_lines(), b.get_lines(), strict=True):
            np.testing.assert_allclose(la.get_xydata(), lb.get_xydata())
    no_val = pd.DataFrame(history).assign(val_pcc=np.nan, val_network_pcc=np.nan)
    assert len(asc.pl.training(no_val, show=False).axes) == 1  # all-NaN columns: not recorded
    plt.close("all")


def test_given_axes_keep_the_pcc_panel():
    fig, (left, right) = plt.subplots(1, 2)
    out = asc.pl.training(_history(), ax=(left, right), show=False)
    assert out is fig and left.get_ylabel() == "loss" and right.get_ylabel() == "PCC"
    plt.close(fig)
    fig, axes = plt.subplots(2, 1)
    asc.pl.training(_history(), ax=axes[0], show=False)  # one cell split in two panels
    labels = sorted(ax.get_ylabel() for ax in fig.axes)
    assert labels == ["", "PCC", "loss"]  # the bottom axes is untouched
    with pytest.raises(ValueError, match="ax has 3 axes but this figure has 2"):
        asc.pl.training(_history(), ax=[axes[1]] * 3, show=False)
    plt.close(fig)


def test_errors():
    with pytest.raises(ValueError, match="no training history"):
        asc.pl.training({"epoch": []}, show=False)
    with pytest.raises(ValueError, match="one value per epoch"):
        asc.pl.training({"epoch": [0, 1], "loss": [1.0]}, show=False)
    with pytest.raises(TypeError, match="ASIGNModel"):
        asc.pl.training(3, show=False)
