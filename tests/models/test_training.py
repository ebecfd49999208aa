"""The training plan's validation splits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from asign_sc import InvalidStackError
from asign_sc.models._training import split_validation


def grid(side: int = 20) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 100.0


def test_random_split_is_disjoint_and_covers_everything():
    val, pool = split_validation(400, 0.2, True, np.random.default_rng(0))
    assert len(val) == 80 and len(pool) == 320
    assert set(val).isdisjoint(pool) and set(val) | set(pool) == set(range(400))


def test_blocked_split_makes_patches_with_a_buffer_ring():
    coords = grid()
    val, pool = split_validation(
        len(coords), 0.2, True, np.random.default_rng(0), coords=coords, buffer=1.0, n_blocks=4
    )
    assert len(val) == 80
    assert set(val).isdisjoint(pool)
    # no training spot within one pitch of a validation spot (the buffer ring is left out)
    distance, _ = cKDTree(coords[pool]).query(coords[val])
    assert distance.min() > 100.0
    # contiguous patches: most validation spots have a validation neighbour one pitch away
    near = cKDTree(coords[val]).query(coords[val], k=2)[0][:, 1]
    assert np.mean(near <= 100.0 + 1e-6) > 0.9
    left_out = len(coords) - len(val) - len(pool)
    assert 0 < left_out < len(coords) * 0.4
    again = split_validation(
        len(coords), 0.2, True, np.random.default_rng(0), coords=coords, buffer=1.0, n_blocks=4
    )
    np.testing.assert_array_equal(again[0], val)


def test_blocked_split_without_buffer_keeps_every_spot():
    coords = grid(10)
    val, pool = split_validation(
        len(coords), 0.3, True, np.random.default_rng(1), coords=coords, buffer=0.0
    )
    assert len(val) + len(pool) == len(coords)


def test_split_errors():
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        split_validation(100, 0.0, True, np.random.default_rng(0))
    with pytest.raises(InvalidStackError, match="at least 4"):
        split_validation(5, 0.4, True, np.random.default_rng(0))
