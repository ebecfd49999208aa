from __future__ import annotations

import numpy as np
import pytest

from asign_sc.pp import crop_windows
from asign_sc.pp._patches import window_boxes


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)


def test_interior_window_is_the_plain_slice(image):
    windows, inside = crop_windows(image, np.array([[20.0, 15.0]]), 8)
    # An 8 px window centred on x=20, y=15 covers columns 16..23 and rows 11..18.
    np.testing.assert_array_equal(windows[0], image[11:19, 16:24])
    assert inside.tolist() == [1.0]


def test_odd_size_is_centred_on_the_pixel(image):
    windows, _ = crop_windows(image, np.array([[20.0, 15.0]]), 5)
    np.testing.assert_array_equal(windows[0], image[13:18, 18:23])
    assert windows[0, 2, 2].tolist() == image[15, 20].tolist()


def test_border_window_is_padded_and_reported(image):
    windows, inside = crop_windows(image, np.array([[0.0, 0.0]]), 10, pad_value=255)
    # Top-left quadrant lies outside the image: rows/cols 0..4 of the window are padding.
    assert np.all(windows[0, :5, :] == 255) and np.all(windows[0, :, :5] == 255)
    np.testing.assert_array_equal(windows[0, 5:, 5:], image[0:5, 0:5])
    assert inside[0] == pytest.approx(0.25)


def test_mask_marks_pixels_inside(image):
    _, mask = crop_windows(image, np.array([[49.0, 39.0]]), 6, return_mask=True)
    assert mask.shape == (1, 6, 6)
    # Columns 46..51 and rows 36..41: the first 4 of each lie inside the 50 x 40 image.
    assert mask[0, :4, :4].all() and not mask[0, 4:, :].any() and not mask[0, :, 4:].any()


def test_window_entirely_outside_is_all_padding(image):
    windows, inside = crop_windows(image, np.array([[500.0, 500.0]]), 6, pad_value=(1, 2, 3))
    assert inside[0] == 0.0
    assert np.all(windows[0] == np.array([1, 2, 3], dtype=np.uint8))


def test_fractional_size_rounds_and_all_windows_share_a_shape(image):
    centers = np.array([[10.3, 10.7], [30.5, 20.5], [0.0, 39.0]])
    windows, inside = crop_windows(image, centers, 7.6)
    assert windows.shape == (3, 8, 8, 3)
    assert inside[0] == 1.0 and inside[2] < 1.0


def test_grayscale_and_rectangular_windows():
    gray = np.arange(100, dtype=np.float32).reshape(10, 10)
    windows, _ = crop_windows(gray, np.array([[5.0, 5.0]]), (4, 2), pad_value=-1)
    assert windows.shape == (1, 2, 4)
    np.testing.assert_array_equal(windows[0], gray[4:6, 3:7])


def test_window_boxes_are_exclusive_bounds():
    boxes = window_boxes(np.array([[10.0, 10.0]]), 4)
    assert boxes.tolist() == [[8, 8, 12, 12]]


@pytest.mark.parametrize(
    ("centers", "size", "match"),
    [
        (np.zeros((3, 3)), 4, "shape"),
        (np.array([[np.nan, 1.0]]), 4, "NaN"),
        (np.zeros((1, 2)), 0, "positive"),
    ],
)
def test_bad_input_is_rejected(image, centers, size, match):
    with pytest.raises(ValueError, match=match):
        crop_windows(image, centers, size)
