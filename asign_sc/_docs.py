"""Shared parameter docs, filled into docstrings (like scanpy's ``_doc_params``).

A parameter used by several functions is described once here; a docstring names it as
``{library_key}`` and :func:`doc_params` fills it in, so the descriptions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["doc_params"]

F = TypeVar("F", bound=Callable)

_SHARED = {
    "library_key": """\
library_key
        Column of ``obs`` naming each spot's section (categorical; its categories give the
        stacking order).""",
    "counts_layer": """\
counts_layer
        Layer with the raw counts of the measured sections; ``None`` for ``X``.""",
    "features_key": """\
features_key
        ``key_added`` of :func:`asign_sc.tl.extract_features`: the spot embedding
        ``obsm[f"X_{features_key}_spot"]`` and the token grids
        ``obsm[f"X_{features_key}_region_tokens"]`` and
        ``obsm[f"X_{features_key}_global_tokens"]``.""",
    "graph_key": """\
graph_key
        ``key_added`` of :func:`asign_sc.gr.build_3d_graph`:
        ``obsp[f"{graph_key}_connectivities"]``.""",
    "device": """\
device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...""",
    "show_progress_bar": """\
show_progress_bar
        Show a progress bar.""",
    "copy": """\
copy
        Return a modified copy instead of writing into ``data``.""",
}


def doc_params(**extra: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of a docstring with the shared parameter docs.

    Parameters
    ----------
    **extra
        More (or overriding) placeholder texts.

    Returns
    -------
    A decorator that formats the function's docstring.
    """
    values = {**_SHARED, **extra}

    def decorate(func: F) -> F:
        if func.__doc__:
            func.__doc__ = func.__doc__.format(**values)
        return func

    return decorate
