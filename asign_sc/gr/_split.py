"""Within- and across-section parts of a 3D spot graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["split_graph"]


def split_graph(
    data: AnnData | SpatialData,
    *,
    key: str = Key.obsp.graph3d,
    which: Literal["connectivities", "distances"] = "connectivities",
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split a 3D spot graph into its within-section and across-section edges.

    An edge is within a section when both spots have the same ``obs[library_key]`` (the
    ``library_key`` the graph was built with) and across sections otherwise.

    Parameters
    ----------
    data
        AnnData or SpatialData holding a graph from :func:`asign_sc.gr.build_3d_graph`.
    key
        ``key_added`` of the graph.
    which
        Split ``obsp[f"{key}_connectivities"]`` (weights) or ``obsp[f"{key}_distances"]``.

    Returns
    -------
    ``(within, across)``: two CSR matrices of the same shape that add up to the graph.
    """
    if which not in ("connectivities", "distances"):
        raise ValueError(f"which must be 'connectivities' or 'distances', got {which!r}.")
    table = get_table(data)
    info_key = Key.uns.neighbors(key)
    if info_key not in table.uns:
        raise InvalidStackError(
            f"uns[{info_key!r}] is missing: build the graph with "
            f"asign_sc.gr.build_3d_graph(..., key_added={key!r}) first."
        )
    info = table.uns[info_key]
    matrix = sp.csr_matrix(table.obsp[info[f"{which}_key"]])
    library_key = str(info["params"]["library_key"])
    codes = pd.Categorical(table.obs[library_key].astype(str)).codes
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    same = codes[rows] == codes[matrix.indices]
    return _masked(matrix, same), _masked(matrix, ~same)


def _masked(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """The entries of ``matrix`` where ``keep`` holds (explicit zeros kept)."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))[keep]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))]
    return sp.csr_matrix(
        (matrix.data[keep], matrix.indices[keep], indptr.astype(matrix.indptr.dtype)),
        shape=matrix.shape,
    )
