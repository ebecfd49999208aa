"""Readers and writers: her2st release layout, Visium stacks, legacy AnnData."""

from asign_sc.io._build import SectionInput, build_spatialdata
from asign_sc.io._her2st import read_her2st
from asign_sc.io._legacy import from_legacy_anndata, to_legacy_anndata
from asign_sc.io._squidpy import add_squidpy_spatial
from asign_sc.io._visium import read_visium_stack

__all__ = [
    "SectionInput",
    "add_squidpy_spatial",
    "build_spatialdata",
    "from_legacy_anndata",
    "read_her2st",
    "read_visium_stack",
    "to_legacy_anndata",
]
