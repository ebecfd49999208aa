"""Small helpers shared by several modules."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "by_row_chunks",
    "copy_data",
    "is_spatialdata",
    "resolve_device",
    "row_slices",
    "sanitize_uns",
    "unsanitize_none",
    "update_params",
]

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


def unsanitize_none(value: Any) -> Any:
    """Undo :func:`sanitize_uns` for ``None``: the string ``"None"`` read back from uns."""
    return None if isinstance(value, str) and value == "None" else value


def update_params(table: AnnData, key_added: str, entry: str, record: Mapping) -> None:
    """Write ``record`` to ``uns[key_added][entry]``, keeping the other entries of that dict."""
    from asign_sc._keys import Key

    key = Key.uns.params(key_added)
    params = table.uns.get(key)
    params = dict(params) if isinstance(params, Mapping) else {}
    params[entry] = sanitize_uns(record)
    table.uns[key] = params


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked and passed to torch.

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a :class:`torch.device`.

    Returns
    -------
    The device to use.
    """
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(resolved)!r} was requested but CUDA is not available here; use "
            "device='auto' or 'cpu'."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(
            f"device={str(resolved)!r} was requested but MPS is not available here; use "
            "device='auto' or 'cpu'."
        )
    return resolved


def row_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def by_row_chunks(
    fn: Callable[[slice], torch.Tensor | dict[str, torch.Tensor]], n: int, size: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``fn`` over :func:`row_slices`, its outputs written into ``(n, ...)`` tensors.

    Each output is allocated once at its full size and filled chunk by chunk: a list of
    chunks concatenated at the end would hold every output twice at its peak.

    Parameters
    ----------
    fn
        Maps a slice of rows to a tensor, or a dict of tensors, with one row per row.
    n
        Number of rows.
    size
        Rows per call of ``fn``.

    Returns
    -------
    What ``fn`` returns (a tensor or a dict of them), for all ``n`` rows.
    """
    out: dict[str | None, torch.Tensor] = {}
    single = False
    for rows in row_slices(n, size):
        result = fn(rows)
        single = not isinstance(result, dict)
        for key, value in ({None: result} if single else result).items():
            if key not in out:
                out[key] = value.new_empty((n, *value.shape[1:]))
            out[key][rows] = value
    return out[None] if single else out
