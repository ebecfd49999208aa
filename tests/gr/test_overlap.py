from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from asign_sc.gr import circle_intersection_area, circle_iou

# Polygon reference: a circle as a regular polygon with 4 * 4096 vertices (shapely's
# buffer); its area is short of the disc's by a relative (2 pi^2 / 3) / n^2 ~ 2.5e-8, so
# IoU from it is exact to ~1e-7, well inside the 1e-6 we require.
QUAD_SEGS = 4096


def _random_configs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    r1 = rng.uniform(1.0, 150.0, n)
    r2 = np.where(rng.random(n) < 0.5, r1, rng.uniform(1.0, 150.0, n))  # equal radii often
    d = rng.uniform(0.0, 1.1, n) * (r1 + r2)
    return d, r1, r2


def _polygon_iou(d: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    a = shapely.buffer(shapely.points(np.zeros(len(d)), np.zeros(len(d))), r1, quad_segs=QUAD_SEGS)
    b = shapely.buffer(shapely.points(d, np.zeros(len(d))), r2, quad_segs=QUAD_SEGS)
    inter = shapely.area(shapely.intersection(a, b))
    return inter / (shapely.area(a) + shapely.area(b) - inter)


def _integrated_area(d: float, r1: float, r2: float) -> float:
    """Intersection area by adaptive quadrature of the vertical chord overlap."""

    def overlap(x: float) -> float:
        h1 = np.sqrt(max(r1 * r1 - x * x, 0.0))
        h2 = np.sqrt(max(r2 * r2 - (x - d) ** 2, 0.0))
        return 2 * min(h1, h2) if abs(x) <= r1 and abs(x - d) <= r2 else 0.0

    lo, hi = max(-r1, d - r2), min(r1, d + r2)
    if hi <= lo:
        return 0.0
    # Where the chords cross, the integrand has a kink: tell quad about it.
    points = []
    if d > 0:
        xc = (d * d + r1 * r1 - r2 * r2) / (2 * d)
        if lo < xc < hi:
            points.append(xc)
    value, _ = quad(overlap, lo, hi, points=points or None, epsabs=1e-12, epsrel=1e-12, limit=200)
    return value


def test_iou_matches_polygon_reference_to_1e6():
    d, r1, r2 = _random_configs(300, seed=0)
    np.testing.assert_allclose(circle_iou(d, r1, r2), _polygon_iou(d, r1, r2), rtol=0, atol=1e-6)


def test_area_matches_quadrature_reference():
    d, r1, r2 = _random_configs(200, seed=1)
    expected = np.array([_integrated_area(*args) for args in zip(d, r1, r2, strict=True)])
    got = circle_intersection_area(d, r1, r2)
    # Relative to the smaller disc: IoU error is below this.
    np.testing.assert_allclose(
        got / (np.pi * np.minimum(r1, r2) ** 2),
        expected / (np.pi * np.minimum(r1, r2) ** 2),
        rtol=0,
        atol=1e-9,
    )


def test_iou_matches_monte_carlo_loosely():
    # An independent, assumption-free check (sampling cannot reach 1e-6).
    rng = np.random.default_rng(2)
    d, r1, r2 = 30.0, 27.5, 20.0
    n = 400_000
    x = rng.uniform(-r1, d + r2, n)
    y = rng.uniform(-max(r1, r2), max(r1, r2), n)
    in1 = x**2 + y**2 <= r1**2
    in2 = (x - d) ** 2 + y**2 <= r2**2
    assert circle_iou(d, r1, r2) == pytest.approx((in1 & in2).sum() / (in1 | in2).sum(), abs=3e-3)


def test_special_cases():
    assert circle_iou(0.0, 5.0, 5.0) == 1.0
    assert circle_iou(10.0, 5.0, 5.0) == 0.0  # tangent
    assert circle_iou(11.0, 5.0, 5.0) == 0.0
    assert circle_iou(1.0, 2.0, 5.0) == pytest.approx(4 / 25)  # contained
    assert circle_iou(3.0, 2.0, 5.0) == pytest.approx(4 / 25)  # internally tangent
    assert circle_intersection_area(0.0, 3.0, 3.0) == pytest.approx(9 * np.pi)
    # Equal radii, d = r: lens area 2 r^2 acos(1/2) - r^2 sqrt(3) / 2.
    assert circle_intersection_area(1.0, 1.0, 1.0) == pytest.approx(2 * np.pi / 3 - np.sqrt(3) / 2)


def test_nearly_tangent_is_continuous():
    r = 50.0
    eps = np.array([1e-9, 1e-6, 1e-3])
    outer = circle_iou(2 * r - eps, r, r)
    inner = circle_iou(3.0 + eps, 2.0, 5.0)
    assert np.all(outer >= 0) and np.all(outer < 1e-6)
    np.testing.assert_allclose(inner, 4 / 25, atol=1e-3)


def test_broadcasting_and_dtype():
    out = circle_iou(np.array([[0.0], [3.0]]), np.array([2.0, 3.0]), 3.0)
    assert out.shape == (2, 2) and out.dtype == np.float64


@settings(max_examples=200, deadline=None)
@given(
    d=st.floats(0, 500, allow_nan=False),
    r1=st.floats(0.5, 200, allow_nan=False),
    r2=st.floats(0.5, 200, allow_nan=False),
)
def test_iou_properties(d, r1, r2):
    iou = float(circle_iou(d, r1, r2))
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(float(circle_iou(d, r2, r1)), abs=1e-12)
    assert iou <= (min(r1, r2) / max(r1, r2)) ** 2 + 1e-12
    # Moving the centres apart never increases the overlap.
    assert float(circle_iou(d + 1.0, r1, r2)) <= iou + 1e-12


@pytest.mark.parametrize(
    ("d", "r1", "r2"), [(-1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -2.0), (np.nan, 1.0, 1.0)]
)
def test_rejects_invalid_input(d, r1, r2):
    with pytest.raises(ValueError, match="must be"):
        circle_iou(d, r1, r2)
