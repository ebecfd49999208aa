"""Small helpers shared by several modules."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["copy_data", "is_spatialdata", "sanitize_uns"]

logger = logging.getLogger("asign_sc")


def is_spatialdata(data: Any) -> bool:
    """Whether ``data`` is a :class:`spatialdata.SpatialData`, without importing spatialdata.

    A user who passes a SpatialData has imported spatialdata already, so checking the loaded
    module keeps ``import asign_sc`` cheap for AnnData-only work.
    """
    module = sys.modules.get("spatialdata")
    return module is not None and isinstance(data, module.SpatialData)


def copy_data(data: AnnData | SpatialData) -> AnnData | SpatialData:
    """Deep copy of an AnnData or SpatialData (images included)."""
    if is_spatialdata(data):
        from spatialdata import deepcopy

        return deepcopy(data)
    return data.copy()


def sanitize_uns(value: Any) -> Any:
    """Turn a parameter record into something :mod:`anndata` writes to h5ad and zarr.

    ``None`` becomes the string ``"None"`` (anndata cannot store it), tuples become lists,
    numpy scalars become Python scalars and mappings are handled recursively.
    """
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return {str(k): sanitize_uns(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        items = [sanitize_uns(v) for v in value]
        if items and all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object)
        return np.asarray(items) if all(np.isscalar(v) for v in items) else items
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | str | int | float | bool):
        return value
    return str(value)
