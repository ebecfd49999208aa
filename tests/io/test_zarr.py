"""Write/read round trip through zarr preserves the stack."""

from __future__ import annotations

import numpy as np
import spatialdata

from asign_sc._pipeline import write_zarr
from asign_sc._stack import resolve_stack


def test_zarr_round_trip_preserves_everything(synthetic_small, tmp_path):
    sdata, _ = synthetic_small
    store = tmp_path / "stack.zarr"
    write_zarr(sdata, store)
    back = spatialdata.read_zarr(store)
    a, b = sdata.tables["table"], back.tables["table"]
    assert list(a.obs_names) == list(b.obs_names)
    assert list(b.obs["section"].cat.categories) == ["S1", "S2", "S3"]
    assert b.obs["section"].cat.ordered
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert b.uns["asign_stack"]["spot_radius_px"] == a.uns["asign_stack"]["spot_radius_px"]
    assert list(b.var["program"]) == list(a.var["program"])
    s1, s2 = resolve_stack(sdata), resolve_stack(back)
    assert s1.names == s2.names
    for x, y in zip(s1, s2, strict=True):
        np.testing.assert_allclose(x.spatial, y.spatial)
        assert x.spot_radius == y.spot_radius
        np.testing.assert_array_equal(s1.image(x.name)[0], s2.image(y.name)[0])
