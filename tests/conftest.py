"""Shared fixtures: the real her2st subset (read once per session) and small synthetic stacks."""

from __future__ import annotations

from pathlib import Path

import pytest

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_path() -> Path:
    if not (HER2ST / "counts").is_dir():
        pytest.skip(f"the her2st subset is not at {HER2ST} (../shared/data/her2st beside the repo)")
    return HER2ST


@pytest.fixture(scope="session")
def her2st_c(her2st_path):
    """Patient C's five imaged sections; read once, never modified by tests (copy it)."""
    from asign_sc.io import read_her2st

    return read_her2st(her2st_path, patient="C")


@pytest.fixture(scope="session")
def _synthetic_small():
    from asign_sc.datasets import synthetic_stack

    return synthetic_stack(n_sections=3, n_spots_per_section=60, image_size=256, n_genes=20, seed=3)


@pytest.fixture
def synthetic_small(_synthetic_small):
    """A fresh deep copy of a small 3-section synthetic stack and its truth."""
    from spatialdata import deepcopy

    sdata, truth = _synthetic_small
    return deepcopy(sdata), truth


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny-tensor tests.

    Many small ops on 2 shared cores stall at OpenMP barriers with 2 threads; opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
