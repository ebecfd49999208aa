"""asign_sc: 3D spatial transcriptomics from H&E section stacks (ASIGN), scverse-native."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from asign_sc import datasets, gr, io, models, pl, pp, tl
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._settings import settings

try:
    __version__ = version("asign-sc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "InvalidStackError",
    "Key",
    "datasets",
    "gr",
    "io",
    "models",
    "pl",
    "pp",
    "settings",
    "tl",
]
