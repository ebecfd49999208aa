"""Helpers shared by the plotting functions: values to colour by, showing and saving."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_DOCS",
    "finish",
    "imputed_values",
    "interactive_backend",
    "measured_values",
    "panel_axes",
]


#: Parameters every plot shares, filled into docstrings by :func:`asign_sc._docs.doc_params`.
PLOT_DOCS = {
    "show_save": """\
show
        Show the figure. Default: in interactive use (a notebook or a GUI backend) and
        when not saving. A shown figure is not returned, so a notebook displays it once.
    save
        Write the figure to this path (format from the suffix).
    return_fig
        Return the figure instead of showing it.""",
    "returns": """\
The figure with ``show=False`` or ``return_fig=True``, else ``None`` (as scanpy).""",
}


def imputed_values(table: AnnData, gene: str, *, key: str) -> np.ndarray:
    """Imputed expression of ``gene`` for every spot, from ``obsm[key]`` (``tl.impute``)."""
    if key not in table.obsm:
        raise KeyError(
            f"obsm[{key!r}] is missing: no imputation under key {key!r}. Run "
            f"asign_sc.tl.impute(..., key_added={key!r}) first, or pass key=."
        )
    frame = table.obsm[key]
    _check_gene(table, gene, f"obsm[{key!r}] (the imputed genes)", list(frame.columns))
    return frame[gene].to_numpy(dtype=float)


def measured_values(
    table: AnnData, gene: str, *, layer: str | None, target_sum: float
) -> tuple[np.ndarray, np.ndarray]:
    """Measured ``log1p`` counts per ``target_sum`` of ``gene`` and whether each spot has counts.

    The scale of the imputation (:func:`asign_sc.pp.log_normalize`; library size over all
    genes). A spot "has counts" when its library size is positive and finite.
    """
    from asign_sc.pp import log_normalize

    matrix = table.X if layer is None else table.layers[layer]
    if matrix is None:
        return np.zeros(table.n_obs), np.zeros(table.n_obs, dtype=bool)
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    has = np.isfinite(totals) & (totals > 0)
    if gene not in table.var_names:
        return np.zeros(table.n_obs), np.zeros(table.n_obs, dtype=bool)
    column = matrix[:, [table.var_names.get_loc(gene)]]
    values = log_normalize(column, np.where(has, totals, 0.0), target_sum=target_sum)
    return values.ravel().astype(float), has


def _check_gene(table: AnnData, gene: str, where: str, available: list[str]) -> None:
    if gene in available:
        return
    hint = "" if gene not in table.var_names else " It is in var_names but was not imputed."
    close = [g for g in available if g.lower() == gene.lower()]
    if close:
        hint += f" Did you mean {close[0]!r}?"
    shown = ", ".join(available[:8]) + (" ..." if len(available) > 8 else "")
    raise KeyError(f"Gene {gene!r} is not in {where}: {shown}.{hint}")


def panel_axes(
    ax: Axes | Sequence[Axes] | None,
    n: int,
    *,
    figsize: tuple[float, float],
    dpi: float | None,
    width_ratios: Sequence[float] | None = None,
) -> tuple[Figure, list[Axes]]:
    """``n`` panels side by side: a new figure, the ``n`` axes given, or one axes split in ``n``.

    A single axes is replaced by ``n`` panels in its cell of the figure's grid, so a
    multi-panel plot keeps every panel when drawn into a figure the caller laid out.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, axes = plt.subplots(
            1, n, figsize=figsize, dpi=dpi, layout="constrained", width_ratios=width_ratios
        )
        return fig, list(np.atleast_1d(axes))
    if isinstance(ax, Sequence | np.ndarray):
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != n:
            raise ValueError(f"ax has {len(axes)} axes but this figure has {n} panel(s).")
        return axes[0].figure, axes
    if n == 1:
        return ax.figure, [ax]
    spec = ax.get_subplotspec()
    if spec is None:
        raise ValueError(
            f"ax is not part of a subplot grid, so it cannot be split into the {n} panels of "
            f"this figure; pass a list of {n} axes instead."
        )
    fig = ax.figure
    ax.remove()
    cells = spec.subgridspec(1, n, wspace=0.4, width_ratios=width_ratios)
    return fig, [fig.add_subplot(cells[0, i]) for i in range(n)]


def finish(
    fig: Figure,
    *,
    show: bool | None,
    save: str | Path | None,
    return_fig: bool = False,
    dpi: Any = None,
) -> Figure | None:
    """Save and/or show a finished figure, and return it as scanpy's plotting functions do.

    ``show=None`` shows the figure in interactive use (a notebook or a GUI backend) unless it
    is saved or ``return_fig`` asks for it. A shown figure is not returned, so a notebook
    displays it once; with ``show=False`` or ``return_fig=True`` the figure is returned.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=dpi or fig.dpi, bbox_inches="tight")
    if show is None:
        show = save is None and not return_fig and interactive_backend()
    if show:
        plt.show()
    return fig if return_fig or not show else None


def interactive_backend() -> bool:
    """Whether matplotlib draws to a screen or a notebook (not only to files)."""
    import matplotlib

    return matplotlib.get_backend().lower() not in _FILE_BACKENDS


#: Backends that only write files: ``show=None`` does not show on them.
_FILE_BACKENDS = frozenset({"agg", "pdf", "svg", "ps", "cairo", "pgf", "template"})
