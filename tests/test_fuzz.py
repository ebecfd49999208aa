"""Fuzzed inputs: the readers and the stack validation raise our documented errors or work.

Random shapes, dtypes, NaN/inf and empty pieces go into :func:`asign_sc.io.build_spatialdata`,
:func:`asign_sc.io.from_legacy_anndata` and the stack validation (``resolve_stack``,
``validate_counts``). Allowed outcomes: a result that passes the stack contract, or
:class:`~asign_sc.InvalidStackError` / ``ValueError`` / ``TypeError`` with a message.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asign_sc import InvalidStackError
from asign_sc._stack import resolve_stack, validate_counts
from asign_sc.io import SectionInput, build_spatialdata, from_legacy_anndata

DOCUMENTED = (InvalidStackError, ValueError, TypeError)
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_]
)
ODD_FLOATS = st.sampled_from([0.0, 1.0, 0.5, 255.0, 300.0, 70000.0, -1.0, np.nan, np.inf])
#: Each input gets at most a couple of these defects (else almost nothing would be valid).
DEFECTS = (
    "no spots",
    "spatial shape",
    "spatial nan",
    "radius",
    "counts shape",
    "counts values",
    "duplicate genes",
    "image",
    "image scale",
)


def _array(draw, shape, dtype):
    """An array of ``shape``/``dtype`` whose values include edge cases (NaN, inf, big)."""
    values = draw(hnp.arrays(np.float64, shape, elements=ODD_FLOATS))
    if np.dtype(dtype).kind in "iub":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0)
        if dtype is not np.bool_:
            info = np.iinfo(dtype)
            values = np.clip(values, info.min, info.max)
    return values.astype(dtype)


@st.composite
def images(draw, broken=False):
    """A small image: valid for its dtype, or (``broken``) of any shape, dtype and values."""
    if broken:
        h, w = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        c = draw(st.sampled_from([(), (1,), (2,), (3,), (4,), (5,)]))
        return _array(draw, (h, w, *c), draw(DTYPES))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    c = draw(st.sampled_from([(), (1,), (2,), (3,), (4,)]))
    dtype, high = draw(
        st.sampled_from(
            [
                (np.uint8, 255),
                (np.uint16, 65535),
                (np.int32, 255),
                (np.float32, 1.0),
                (np.float64, 255.0),
            ]
        )
    )
    values = draw(hnp.arrays(np.float64, (h, w, *c), elements=st.floats(0, 1)))
    return (values * high).astype(dtype)


@st.composite
def section_inputs(draw, name, defects):
    n = 0 if "no spots" in defects else draw(st.integers(1, 5))
    n_genes = draw(st.integers(0 if defects else 1, 4))
    spatial_shape = (
        draw(st.sampled_from([(n, 3), (n,), (n, 1)])) if "spatial shape" in defects else (n, 2)
    )
    points = [0.0, 1.0, 5.0, 11.0] + (
        [-3.0, 1e9, np.nan, np.inf] if "spatial nan" in defects else []
    )
    spatial = draw(hnp.arrays(np.float64, spatial_shape, elements=st.sampled_from(points)))
    counts_shape = (n + 1, n_genes) if "counts shape" in defects else (n, n_genes)
    if "counts values" in defects:
        counts = _array(draw, counts_shape, draw(DTYPES))
    else:
        counts = draw(hnp.arrays(np.int64, counts_shape, elements=st.integers(0, 9)))
    if draw(st.booleans()):
        counts = sp.csr_matrix(counts)
    pool = ["A", "B"] if "duplicate genes" in defects else ["A", "B", "C", "D"]
    genes = draw(
        st.lists(
            st.sampled_from(pool),
            min_size=n_genes,
            max_size=n_genes,
            unique="duplicate genes" not in defects,
        )
    )
    radius = [0.0, -1.0, np.nan, np.inf] if "radius" in defects else [1.0, 2.5]
    scale = [0.0, -2.0, np.nan] if "image scale" in defects else [1.0, 0.5, 2.0]
    return SectionInput(
        name=name,
        counts=counts,
        genes=genes,
        obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(n)]),
        spatial=spatial,
        spot_radius=draw(st.sampled_from(radius)),
        image=draw(st.one_of(st.none(), images(broken="image" in defects))),
        image_scale=draw(st.sampled_from(scale)),
    )


@st.composite
def stacks(draw):
    names = draw(st.lists(st.sampled_from(["S1", "S2", "S3"]), min_size=0, max_size=3))
    return [
        draw(section_inputs(name, draw(st.sets(st.sampled_from(DEFECTS), max_size=2))))
        for name in names
    ]


def _quietly(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func(*args, **kwargs)


@FUZZ
@given(stacks())
def test_build_spatialdata_raises_only_documented_errors(sections):
    try:
        sdata = _quietly(build_spatialdata, sections)
    except DOCUMENTED as error:
        assert str(error)
        event("refused by build_spatialdata")
        return
    try:
        stack = _quietly(resolve_stack, sdata)
    except DOCUMENTED as error:
        assert str(error)
        event("refused by resolve_stack")
        return
    event("built and resolved")
    for section in stack:
        if section.has_image:
            image, _ = stack.image(section.name)
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@st.composite
def legacy_anndatas(draw):
    n = draw(st.integers(1, 8))
    n_genes = draw(st.integers(1, 3))
    defects = draw(st.sets(st.sampled_from(["labels", "x", "spatial", "uns", "image"]), max_size=2))
    label_pool = ["a", "b", None] if "labels" in defects else ["a", "b"]
    labels = draw(st.lists(st.sampled_from(label_pool), min_size=n, max_size=n))
    if "x" in defects:
        x = _array(draw, (n, n_genes), draw(DTYPES))
    else:
        x = draw(hnp.arrays(np.float32, (n, n_genes), elements=st.integers(0, 9)))
    if draw(st.booleans()):
        x = sp.csr_matrix(x)
    obs = pd.DataFrame({"section": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)])
    adata = AnnData(X=x, obs=obs)
    points = [0.0, 3.0, 7.0] + ([np.nan, -1.0] if "spatial" in defects else [])
    adata.obsm["spatial"] = draw(hnp.arrays(np.float64, (n, 2), elements=st.sampled_from(points)))
    libraries = {}
    names = (
        st.lists(st.sampled_from(["a", "b"]), unique=True)
        if "uns" in defects
        else st.just(["a", "b"])
    )
    for library in draw(names):
        if "uns" in defects:
            scalefactors = draw(
                st.dictionaries(
                    st.sampled_from(["spot_diameter_fullres", "tissue_hires_scalef"]),
                    st.sampled_from([1.0, 2.0, 0.0, -1.0, np.nan]),
                )
            )
        else:
            scalefactors = {"spot_diameter_fullres": 2.0, "tissue_hires_scalef": 1.0}
        image = draw(st.one_of(st.none(), images(broken="image" in defects)))
        libraries[library] = {
            "scalefactors": scalefactors,
            "images": {} if image is None else {"hires": image},
        }
    adata.uns["spatial"] = libraries
    return adata


@FUZZ
@given(legacy_anndatas())
def test_from_legacy_anndata_raises_only_documented_errors(adata):
    before = adata.copy()
    try:
        sdata = _quietly(from_legacy_anndata, adata)
    except DOCUMENTED as error:
        assert str(error)
        event("refused")
    else:
        assert sdata.tables["table"].n_obs == adata.n_obs
        event("converted")
    # never modified, whatever happened
    assert adata.obs.equals(before.obs) and set(adata.uns["spatial"]) == set(before.uns["spatial"])


@st.composite
def tables(draw):
    n, m = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    matrix = _array(draw, (n, m), draw(DTYPES))
    if draw(st.booleans()):
        matrix = sp.csr_matrix(matrix)
    adata = AnnData(X=matrix)
    if draw(st.booleans()):
        adata.layers["counts"] = np.round(
            np.abs(
                np.nan_to_num(
                    np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X, dtype=float),
                    nan=0.0,
                    posinf=0.0,
                )
            )
        )
    rows = draw(st.one_of(st.none(), st.lists(st.integers(0, max(n - 1, 0)), max_size=n)))
    if rows is not None and n:
        rows = np.asarray(rows, dtype=int)
        if draw(st.booleans()):
            rows = {"s1": rows[: len(rows) // 2], "s2": rows[len(rows) // 2 :]}
    elif n == 0:
        rows = None
    return adata, rows, draw(st.sampled_from([None, "counts", "missing"]))


@FUZZ
@given(tables())
def test_counts_validation_raises_only_documented_errors(case):
    adata, rows, layer = case
    try:
        validate_counts(adata, layer, rows=rows)
    except DOCUMENTED as error:
        assert str(error)
        event("refused")
    else:
        event("valid counts")


def test_fuzz_strategies_reach_both_outcomes():
    """The fuzzing is not vacuous: valid inputs pass, invalid ones fail, with our errors."""
    good = SectionInput(
        name="S1",
        counts=np.ones((2, 1)),
        genes=["A"],
        obs=pd.DataFrame(index=["x", "y"]),
        spatial=np.array([[1.0, 1.0], [5.0, 5.0]]),
        spot_radius=1.0,
        image=np.full((8, 8, 4), 40000, np.uint16),
    )
    stack = resolve_stack(_quietly(build_spatialdata, [good]))
    assert stack.image("S1")[0].shape == (8, 8, 3)
    with pytest.raises(InvalidStackError, match="Section 'S1' has no spots"):
        build_spatialdata(
            [SectionInput("S1", np.ones((0, 1)), ["A"], pd.DataFrame(), np.ones((0, 2)), 1.0)]
        )
