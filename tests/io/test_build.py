"""io.build_spatialdata: odd but valid inputs are converted, invalid ones named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from asign_sc import InvalidStackError
from asign_sc._stack import resolve_stack
from asign_sc.io import SectionInput, build_spatialdata


def _section(name: str = "S1", *, image=None, n: int = 3, **kwargs) -> SectionInput:
    fields = {
        "name": name,
        "counts": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
        "genes": ["A", "B"],
        "obs": pd.DataFrame(index=[f"{name}_{i}" for i in range(n)]),
        "spatial": np.column_stack([np.arange(n) * 4.0 + 2, np.full(n, 5.0)]),
        "spot_radius": 1.5,
        "image": image,
    }
    return SectionInput(**(fields | kwargs))


def _image(sdata, name="S1"):
    return resolve_stack(sdata).image(name)[0]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((16, 16), 90, np.uint8), [90, 90, 90]),  # grayscale 2-D
        (np.dstack([np.full((16, 16, 3), 30, np.uint8), np.zeros((16, 16), np.uint8)]), [255] * 3),
        (np.full((16, 16, 3), 65535, np.uint16), [255] * 3),
        (np.full((16, 16, 3), 257 * 100, np.uint16), [100] * 3),  # not clipped to white
        (np.full((16, 16, 3), 0.2, np.float32), [51] * 3),
        (np.full((16, 16, 3), 51.0, np.float64), [51] * 3),
    ],
)
def test_images_are_stored_as_uint8_rgb(image, expected):
    sdata = build_spatialdata([_section(image=image)])
    stored = _image(sdata)
    assert stored.shape == (16, 16, 3) and stored.dtype == np.uint8
    assert stored[0, 0].tolist() == expected
    assert list(sdata.images["S1_image"].c.values) == ["r", "g", "b"]


def test_the_input_image_is_not_modified():
    image = np.full((16, 16, 4), 70, np.uint8)
    build_spatialdata([_section(image=image)])
    assert image.shape == (16, 16, 4) and (image == 70).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "Section 'S2' has no spots"),
        ({"image": np.full((8, 8, 3), 70000, np.uint32)}, r"section 'S2' has dtype uint32"),
        ({"image": np.ones((8, 8, 3), bool)}, r"section 'S2' has dtype bool"),
        ({"spatial": np.ones((3, 3))}, r"Section 'S2': spatial has shape \(3, 3\)"),
        ({"spatial": np.full((3, 2), np.nan)}, "Section 'S2': spot centres must be finite"),
        ({"spot_radius": 0.0}, "Section 'S2': spot_radius 0.0"),
        ({"image_scale": float("nan")}, "Section 'S2': image_scale nan"),
        ({"genes": ["A", "A"]}, "Section 'S2' has duplicated gene names"),
        ({"counts": np.ones((2, 2))}, r"Section 'S2': counts are \(2, 2\)"),
        ({"obsm": {"emb": np.ones((2, 4))}}, r"obsm\['emb'\] has shape \(2, 4\)"),
    ],
)
def test_bad_sections_are_refused_by_name(kwargs, match):
    with pytest.raises(InvalidStackError, match=match):
        build_spatialdata([_section("S1"), _section("S2", **kwargs)])


def test_no_sections_is_an_error():
    with pytest.raises(InvalidStackError, match="No sections given"):
        build_spatialdata([])


@pytest.mark.parametrize("shape", [(1101, 1203), (1024, 2050)])
def test_pyramid_levels_equal_spatialdata_coarsening(shape):
    """Each level is the box mean spatialdata's own pyramid gives, byte for byte."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    sdata = build_spatialdata([_section(image=image)])
    ours = sdata.images["S1_image"]
    theirs = Image2DModel.parse(
        image,
        dims=("y", "x", "c"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * (len(ours.children) - 1),
        chunks=(3, 2048, 2048),
        transformations={"S1": Identity()},
    )
    assert len(ours.children) >= 2
    for level in theirs.children:
        a, b = ours[level]["image"], theirs[level]["image"]
        np.testing.assert_array_equal(a.values, b.values)
        assert a.attrs.keys() == b.attrs.keys()
        np.testing.assert_array_equal(a["x"].values, b["x"].values)
        np.testing.assert_array_equal(a["y"].values, b["y"].values)
    # the finest level's chunks are slices of the input array: no second full-resolution copy
    import dask

    finest = ours["scale0"]["image"].data
    block = dask.get(dict(finest.__dask_graph__()), finest.__dask_keys__()[0][0][0])
    assert np.shares_memory(block, image)
