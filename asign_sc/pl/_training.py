"""``pl.training``: loss curves of a fitted ASIGN model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign_sc._docs import doc_params
from asign_sc.pl._common import PLOT_DOCS, finish, panel_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from asign_sc.models import ASIGNModel

__all__ = ["training"]

#: Curves per panel: (history key, label, line style); missing keys are skipped. Training
#: curves are solid, validation dashed, the network's and the blend's own losses dotted and
#: dash-dotted, so every kind reads apart in black and white; colour tells the ensemble members.
LOSSES = (
    ("loss", "training loss", "-"),
    ("network_loss", "training: network (eq. 9)", ":"),
    ("blend_loss", "training: propagated blend", "-."),
    ("val_loss", "validation loss", "--"),
    ("val_loss_smoothed", "validation (smoothed)", (0, (6, 1.5, 1, 1.5, 1, 1.5))),
)
CORRELATIONS = (
    ("val_pcc", "validation PCC (blend)", "-"),
    ("val_network_pcc", "validation PCC (network only)", ":"),
)
#: Curves drawn fully opaque; the others are lighter so the watched curves stand out.
_STRONG = frozenset({"loss", "val_loss_smoothed", "val_pcc"})


@doc_params(**PLOT_DOCS)
def training(
    model: ASIGNModel | Mapping[str, Any] | pd.DataFrame,
    *,
    log_scale: bool = True,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure | None:
    """Loss curves of a fitted model, one colour per ensemble member.

    Left: training and validation losses per epoch. Line styles tell the curves apart
    (training solid, validation dashed, the validation loss early stopping watches
    dash-dot-dotted, the network's and the propagated blend's training losses dotted and
    dash-dotted); colours tell the ensemble members apart. The kept (best) epoch of each
    member is marked by a thin vertical line. Right, when the fit had validation spots:
    validation PCC of the blended prediction (solid) and of the network alone (dotted).

    Parameters
    ----------
    model
        A fitted :class:`~asign_sc.models.ASIGNModel` (:func:`asign_sc.tl.fit_asign`), or its
        ``history``: a :class:`pandas.DataFrame` or a mapping of lists (one row / value per
        epoch and member; columns ``epoch``, ``member``, ``loss``, ``val_loss``, ...).
    log_scale
        Logarithmic loss axis.
    figsize, dpi
        Figure size in inches (default 8 x 3, or 4 x 3 without validation) and resolution.
    {show_save}
    ax
        Axes to draw into: two (loss, PCC), or one, whose place in its figure's grid is
        then split into the loss and the PCC panel.

    Returns
    -------
    {returns}
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    history, best = _history(model)
    n = len(history["epoch"])
    member = np.asarray(history.get("member", [0] * n))
    has_val = any(k in history for k, _, _ in CORRELATIONS)
    fig, axes = panel_axes(
        ax, 2 if has_val else 1, figsize=figsize or (8 if has_val else 4, 3), dpi=dpi
    )
    colours = plt.get_cmap("tab10")
    members = list(dict.fromkeys(member.tolist()))
    panels = [(axes[0], LOSSES, "loss")]
    if len(axes) > 1:
        panels.append((axes[1], CORRELATIONS, "PCC"))
    for panel, curves, ylabel in panels:
        present = [(name, label, style) for name, label, style in curves if name in history]
        for k in members:
            m = member == k
            epochs = np.asarray(history["epoch"])[m]
            colour = colours(int(k) % 10)
            for name, _, style in present:
                values = np.asarray(history[name], dtype=float)[m]
                panel.plot(
                    epochs,
                    values,
                    linestyle=style,
                    color=colour,
                    lw=1.3 if name in _STRONG else 1.0,
                    alpha=1.0 if name in _STRONG else 0.7,
                    label=f"{name}, model {k}",
                )
            if best is not None and k < len(best):
                panel.axvline(best[int(k)], color=colour, lw=0.7, alpha=0.6)
        handles = [
            Line2D([], [], linestyle=style, color="0.2", lw=1.1, label=label)
            for _, label, style in present
        ]
        if len(members) > 1:
            handles += [
                Line2D([], [], color=colours(int(k) % 10), lw=3, label=f"model {k}")
                for k in members
            ]
        panel.set_xlabel("epoch")
        panel.set_ylabel(ylabel)
        panel.legend(handles=handles, fontsize="x-small", frameon=False)
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
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi)


def _history(model: Any) -> tuple[dict[str, list], list[int] | None]:
    if isinstance(model, pd.DataFrame | Mapping):
        history, best = _as_lists(model), None
    elif hasattr(model, "history"):
        history = _as_lists(model.history)
        settings = getattr(model, "settings", {}) or {}
        raw = settings.get("training", {}).get("best_epoch")
        best = [int(b) for b in np.atleast_1d(raw)] if raw is not None else None
    else:
        raise TypeError(
            f"Expected a fitted ASIGNModel or its history mapping, got {type(model).__name__}."
        )
    if not len(history.get("epoch", [])):
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


def _as_lists(history: pd.DataFrame | Mapping[str, Any]) -> dict[str, list]:
    """A history as ``{column: list}``, from a DataFrame (current models) or a mapping (older)."""
    if isinstance(history, pd.DataFrame):
        # a column that is NaN throughout was not recorded (e.g. no validation spots)
        return {str(c): history[c].tolist() for c in history if history[c].notna().any()}
    return {
        k: list(v) if isinstance(v, list | tuple | np.ndarray) else v for k, v in history.items()
    }
