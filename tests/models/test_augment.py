"""Test-time augmentation of encoders over the 8 rotations and flips (dihedral group)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from asign_sc.models.encoders import DihedralAverage, dihedral_average, get_encoder


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


@pytest.mark.parametrize(("turns", "flip"), [(1, False), (2, True), (3, True), (0, True)])
def test_averaged_map_is_equivariant_and_its_pooled_vector_invariant(turns, flip):
    module = DihedralAverage(small_cnn()).eval()
    images = torch.rand(2, 3, 16, 16)
    moved = torch.rot90(images, turns, dims=(2, 3))
    moved = torch.flip(moved, dims=(3,)) if flip else moved
    with torch.no_grad():
        out, out_moved = module(images), module(moved)
    expected = torch.rot90(out, turns, dims=(2, 3))
    expected = torch.flip(expected, dims=(3,)) if flip else expected
    torch.testing.assert_close(out_moved, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_moved.mean((2, 3)), out.mean((2, 3)), rtol=1e-5, atol=1e-6)
    # and it is not the plain encoder (which a rotated window would change)
    with torch.no_grad():
        plain, plain_moved = module.module(images), module.module(moved)
    assert not torch.allclose(plain_moved.mean((2, 3)), plain.mean((2, 3)), atol=1e-4)


def test_vector_outputs_are_averaged_over_the_eight_views():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    images = torch.rand(3, 3, 4, 4)
    views = []
    for turns in range(4):
        for flip in (False, True):
            v = torch.rot90(images, turns, dims=(2, 3))
            views.append(net(torch.flip(v, dims=(3,)) if flip else v))
    with torch.no_grad():
        np.testing.assert_allclose(
            DihedralAverage(net)(images).numpy(),
            torch.stack(views).mean(0).detach().numpy(),
            rtol=1e-5,
            atol=1e-6,
        )


def test_dihedral_average_names_itself_in_the_record_and_the_cache_key():
    base = get_encoder(small_cnn(), name="small")
    augmented = dihedral_average(base)
    assert augmented.name == "small+dihedral"
    assert augmented.params["test_time_augmentation"] == "dihedral"
    assert augmented.fingerprint != base.fingerprint
    assert isinstance(augmented.module, DihedralAverage)


def test_dihedral_average_refuses_plain_functions():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        dihedral_average(get_encoder(lambda x: x.mean((2, 3)), name="f", dim=3))
