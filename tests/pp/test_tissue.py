"""pp.tissue_mask / pp.tissue_channel on small drawn H&E-like images."""

from __future__ import annotations

import numpy as np
import pytest

from asign_sc.pp import tissue_channel, tissue_mask

GLASS = (242, 240, 244)
EOSIN = (230, 150, 190)
NUCLEI = (70, 40, 120)


def _slide(size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Glass with a pink ellipse (a white hole inside, purple nuclei) and a dark speck."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    tissue = ((xx - 90) / 60.0) ** 2 + ((yy - 100) / 45.0) ** 2 < 1
    hole = (xx - 80) ** 2 + (yy - 95) ** 2 < 8**2
    image = np.empty((size, size, 3))
    image[:] = GLASS
    image[tissue] = EOSIN
    nuclei = tissue & (rng.random((size, size)) < 0.08)
    image[nuclei] = NUCLEI
    image[hole] = GLASS
    image[185:188, 185:188] = (90, 80, 90)  # dust, away from the tissue
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), tissue


def test_mask_finds_tissue_fills_holes_and_drops_debris():
    image, tissue = _slide()
    mask = tissue_mask(image)
    assert mask.dtype == bool and mask.shape == tissue.shape
    dice = 2 * (mask & tissue).sum() / (mask.sum() + tissue.sum())
    assert dice > 0.95
    assert mask[95, 80]  # the hole is filled
    assert not mask[180:195, 180:195].any()  # the speck is gone
    kept = tissue_mask(image, fill_holes=False, min_fraction=0.0)
    assert not kept[95, 80]
    assert kept[186, 186]


def test_blank_image_gives_empty_mask():
    blank = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert not tissue_mask(blank).any()


def test_threshold_and_float_input():
    image, _ = _slide()
    as_float = image.astype(np.float32) / 255.0
    np.testing.assert_array_equal(tissue_mask(as_float), tissue_mask(image))
    assert tissue_mask(image, threshold=50.0).sum() == 0  # optical density never reaches 50


def test_channels_are_bright_on_tissue_and_haematoxylin_on_nuclei():
    image, tissue = _slide()
    rng = np.random.default_rng(0)
    nuclei = tissue & (rng.random(tissue.shape) < 0.08)  # same draw as in _slide
    for channel in ("grey", "hematoxylin", "od"):
        values = tissue_channel(image, channel=channel)
        assert values.dtype == np.float32 and values.shape == tissue.shape
        assert 0.0 <= values.min() and values.max() <= 1.0
        if channel != "hematoxylin":
            assert values[tissue].mean() > values[~tissue].mean() + 0.1
    h = tissue_channel(image, channel="hematoxylin")
    # nuclei (purple) stand out from eosin-only tissue (pink) and from glass
    assert h[nuclei].mean() > h[tissue & ~nuclei].mean() + 0.3
    assert h[nuclei].mean() > h[~tissue].mean() + 0.3


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros((32, 32)), {}, "RGB image"),
        (np.zeros((4, 4, 3)), {}, "too small"),
        (np.zeros((32, 32, 3)), {"min_fraction": 2.0}, "min_fraction"),
    ],
)
def test_bad_input_is_refused(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tissue_mask(image, **kwargs)


def test_unknown_channel_is_refused():
    with pytest.raises(ValueError, match="channel must be one of"):
        tissue_channel(np.zeros((32, 32, 3)), channel="eosin")
