"""Helpers shared by the plotting functions: values to colour by, showing and saving."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from asign_sc._keys import Key

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure

__all__ = ["finish", "imputed_values", "measured_values"]


def imputed_values(table: AnnData, gene: str, *, layer: str | None, key: str) -> np.ndarray:
    """Imputed expression of ``gene`` for every spot: ``layers[layer]`` or ``obsm[key]``."""
    if layer is not None:
        if layer not in table.layers:
            raise KeyError(
                f"layers[{layer!r}] is missing; the table has layers {list(table.layers)}. Run "
                f"asign_sc.tl.impute(..., layer_added={layer!r}) or pass layer=None to read "
                f"obsm[{key!r}]."
            )
        _check_gene(table, gene, f"var_names of layers[{layer!r}]", list(table.var_names))
        modelled = Key.var.modelled_by(key)
        if modelled in table.var and not bool(table.var.loc[gene, modelled]):
            raise ValueError(
                f"Gene {gene!r} was not imputed (var[{modelled!r}] is False): its column of "
                f"layers[{layer!r}] holds zeros. Impute it with asign_sc.tl.impute(..., genes=)."
            )
        column = table.layers[layer][:, table.var_names.get_loc(gene)]
        column = column.toarray() if sp.issparse(column) else np.asarray(column)
        return column.ravel().astype(float)
    if key not in table.obsm:
        raise KeyError(
            f"obsm[{key!r}] is missing: no imputation under key {key!r}. Run "
            f"asign_sc.tl.impute(..., key_added={key!r}) first, or pass key= or layer=."
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


def finish(fig: Figure, *, show: bool | None, save: str | Path | None, dpi: Any = None) -> None:
    """Save and/or show a finished figure (show by default only when not saving)."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=dpi or fig.dpi, bbox_inches="tight")
    interactive = matplotlib.get_backend().lower() not in {
        "agg",
        "pdf",
        "svg",
        "ps",
        "cairo",
        "template",
    }
    if show or (show is None and save is None and interactive):
        plt.show()
