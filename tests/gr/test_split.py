from __future__ import annotations

import numpy as np
import pytest

from asign_sc import InvalidStackError
from asign_sc.gr import build_3d_graph, split_graph


def test_parts_add_up_and_have_the_right_kind(make_stack):
    adata = make_stack(3, (5, 5), seed=30)
    build_3d_graph(adata, spatial_key="spatial", section_spacing=10.0)
    codes = adata.obs["section"].cat.codes.to_numpy()
    for which in ("connectivities", "distances"):
        within, across = split_graph(adata, which=which)
        whole = adata.obsp[f"spatial3d_{which}"]
        assert within.nnz + across.nnz == whole.nnz
        assert abs(within + across - whole).max() == 0
        rows, cols = within.nonzero()
        assert np.all(codes[rows] == codes[cols])
        rows, cols = across.nonzero()
        assert np.all(codes[rows] != codes[cols])
    _, across = split_graph(adata, which="distances")
    assert across.data.min() >= 10.0  # at least one section spacing apart


def test_keeps_stored_zero_distances(make_stack):
    adata = make_stack(2, (3, 3), seed=31)
    xy = adata.obsm["spatial"]
    xy[9:] = xy[:9]
    build_3d_graph(adata, spatial_key="spatial")
    _, across = split_graph(adata, which="distances")
    _, conn_across = split_graph(adata)
    assert across.nnz == conn_across.nnz and np.any(across.data == 0)


def test_errors(make_stack):
    adata = make_stack(2, (3, 3), seed=32)
    with pytest.raises(InvalidStackError, match="build_3d_graph"):
        split_graph(adata)
    build_3d_graph(adata, spatial_key="spatial")
    with pytest.raises(ValueError, match="which"):
        split_graph(adata, which="weights")
