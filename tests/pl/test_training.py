"""pl.training: image comparison on a fixed history, a real fitted model, errors."""

from __future__ import annotations

import matplotlib
import numpy as np
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
            sdata, known_sections=["S2"], n_top_genes=5, hidden_dim=16, n_heads=2,
            n_gat_layers=1, epochs=6, show_progress_bar=False, device="cpu",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    fig = asc.pl.training(model, save=tmp_path / "t.png")
    losses, scores = fig.axes
    train = next(line for line in losses.get_lines() if line.get_label() == "training loss")
    first = np.asarray(model.history["member"]) == 0  # default ensemble: one colour each
    np.testing.assert_allclose(train.get_ydata(), np.asarray(model.history["loss"])[first])
    n_models = len(set(model.history["member"]))
    assert losses.get_title().startswith(f"{n_models} model(s)")
    best = model.settings["training"]["best_epoch"][0]
    assert f"kept epoch {best}" in losses.get_title()
    assert any(line.get_label() == "validation PCC" for line in scores.get_lines())
    assert (tmp_path / "t.png").stat().st_size > 0
    plt.close(fig)


def test_errors():
    with pytest.raises(ValueError, match="no training history"):
        asc.pl.training({"epoch": []}, show=False)
    with pytest.raises(ValueError, match="one value per epoch"):
        asc.pl.training({"epoch": [0, 1], "loss": [1.0]}, show=False)
    with pytest.raises(TypeError, match="ASIGNModel"):
        asc.pl.training(3, show=False)
