"""``pl.training``: loss curves of a fitted ASIGN model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asign_sc.pl._common import finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from asign_sc.models import ASIGNModel

__all__ = ["training"]

#: Curves per panel: (history key, label, line style); missing keys are skipped.
LOSSES = (
    ("loss", "training loss", "-"),
    ("network_loss", "network (eq. 9)", ":"),
    ("blend_loss", "propagated blend", ":"),
    ("val_loss", "validation loss", "-"),
    ("val_loss_smoothed", "validation (smoothed)", "--"),
)
CORRELATIONS = (
    ("val_pcc", "validation PCC", "-"),
    ("val_network_pcc", "validation PCC, network only", "--"),
)


def training(
    model: ASIGNModel | Mapping[str, Any],
    *,
    log_scale: bool = True,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Loss curves of a fitted model, one colour per ensemble member.

    Left: training and validation losses per epoch (the validation loss early stopping
    watches is dashed); the kept (best) epoch of each member is marked. Right, when the fit
    had validation spots: validation PCC of the blended prediction and of the network alone.

    Parameters
    ----------
    model
        A fitted :class:`~asign_sc.models.ASIGNModel` (:func:`asign_sc.tl.fit_asign`), or its
        ``history`` mapping (e.g. ``uns["asign"]["fit"]["history"]``).
    log_scale
        Logarithmic loss axis.
    figsize, dpi
        Figure size in inches (default 8 x 3, or 4 x 3 without validation) and resolution.
    show, save
        As in :func:`asign_sc.pl.sections`.
    ax
        Axes for the loss panel only (the PCC panel is then left out).

    Returns
    -------
    The figure.
    """
    import matplotlib.pyplot as plt

    history, best = _history(model)
    n = len(history["epoch"])
    member = np.asarray(history.get("member", [0] * n))
    has_val = any(k in history for k, _, _ in CORRELATIONS)
    if ax is None:
        ncols = 2 if has_val else 1
        fig, axes = plt.subplots(
            1, ncols, figsize=figsize or (4 * ncols, 3), dpi=dpi, layout="constrained"
        )
        axes = list(np.atleast_1d(axes))
    else:
        fig, axes = ax.figure, [ax]
    colours = plt.get_cmap("tab10")
    members = list(dict.fromkeys(member.tolist()))
    panels = [(axes[0], LOSSES, "loss")]
    if len(axes) > 1:
        panels.append((axes[1], CORRELATIONS, "PCC"))
    for panel, curves, ylabel in panels:
        for k in members:
            m = member == k
            epochs = np.asarray(history["epoch"])[m]
            colour = colours(int(k) % 10)
            for name, label, style in curves:
                if name not in history:
                    continue
                values = np.asarray(history[name], dtype=float)[m]
                panel.plot(
                    epochs,
                    values,
                    style,
                    color=colour,
                    lw=1.2 if style == "-" else 0.9,
                    alpha=1.0 if name in ("loss", "val_loss_smoothed", "val_pcc") else 0.6,
                    label=label if k == members[0] else None,
                )
            if best is not None and k < len(best):
                panel.axvline(best[int(k)], color=colour, lw=0.7, ls="-.", alpha=0.7)
        panel.set_xlabel("epoch")
        panel.set_ylabel(ylabel)
        panel.legend(fontsize="x-small", frameon=False)
    if log_scale and all(
        np.all(np.asarray(history[k], dtype=float) > 0) for k, _, _ in LOSSES if k in history
    ):
        axes[0].set_yscale("log")
    runs = ", ".join(str(int((member == k).sum())) for k in members)
    title = f"{len(members)} model(s), {runs} epochs"
    if best is not None:
        title += f"; kept epoch {', '.join(str(b) for b in best)}"
    axes[0].set_title(title, fontsize="medium")
    if len(axes) > 1:
        axes[-1].set_title("validation", fontsize="medium")
    finish(fig, show=show, save=save, dpi=dpi)
    return fig


def _history(model: Any) -> tuple[dict[str, list], list[int] | None]:
    if isinstance(model, Mapping):
        history, best = dict(model), None
    elif hasattr(model, "history"):
        history = dict(model.history)
        settings = getattr(model, "settings", {}) or {}
        raw = settings.get("training", {}).get("best_epoch")
        best = [int(b) for b in np.atleast_1d(raw)] if raw is not None else None
    else:
        raise TypeError(
            f"Expected a fitted ASIGNModel or its history mapping, got {type(model).__name__}."
        )
    if not history.get("epoch"):
        raise ValueError(
            "The model has no training history (history['epoch'] is empty): fit it with "
            "asign_sc.tl.fit_asign first."
        )
    lengths = {k: len(v) for k, v in history.items() if isinstance(v, list | tuple | np.ndarray)}
    n = len(history["epoch"])
    ragged = [k for k, v in lengths.items() if v != n]
    if ragged:
        raise ValueError(f"History entries {ragged} do not have one value per epoch ({n}).")
    return history, best
