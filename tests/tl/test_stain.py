"""extract_features(stain_normalization="macenko") and the per-section stain transforms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from asign_sc._errors import InvalidStackError
from asign_sc.io import SectionInput, build_spatialdata
from asign_sc.models.encoders import get_encoder
from asign_sc.tl import extract_features
from asign_sc.tl._stain import LIGHT, StainTransform, _estimate, _reference

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"windows": (24, 48, 96), "input_size": 64, "tokens": 2, "show_progress_bar": False}
#: Stain vectors (optical density per RGB channel, unit columns) of a bluer haematoxylin
#: and a more orange eosin than the reference slide's.
OTHER_STAIN = np.array([[0.75, 0.35], [0.60, 0.80], [0.28, 0.48]])


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=0)


def _concentrations(size: int, seed: int = 0) -> np.ndarray:
    """``(size, size, 2)`` haematoxylin (nuclei) and eosin (tissue around them) concentrations.

    Nuclei centres are haematoxylin alone and the tissue dense enough to pass Macenko's
    transparency threshold, as in a real H&E section.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    eosin = 0.9 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    nuclei = np.zeros((size, size))
    for cy, cx in rng.uniform(0, size, (size // 2, 2)):
        nuclei += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    nuclei = np.clip(nuclei, 0, 1)
    return np.stack([1.6 * nuclei, eosin * (1 - nuclei)], axis=-1)


def _render(concentrations: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    density = concentrations @ _unit(vectors).T
    return np.clip(LIGHT * np.exp(-density), 0, 255).astype(np.uint8)


def _stack(images: dict[str, np.ndarray], n_spots: int = 16):
    side = next(iter(images.values())).shape[0]
    grid = np.linspace(0.2 * side, 0.8 * side, int(np.sqrt(n_spots)))
    xy = np.array([(x, y) for y in grid for x in grid], dtype=float)
    return build_spatialdata(
        [
            SectionInput(
                name=name,
                counts=np.ones((len(xy), 2), np.float32),
                genes=["g1", "g2"],
                obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(len(xy))]),
                spatial=xy,
                spot_radius=5.0,
                image=image,
            )
            for name, image in images.items()
        ]
    )


def test_estimate_recovers_the_stain_vectors_of_an_image():
    vectors = _unit(OTHER_STAIN)
    estimated, maxima = _estimate(_render(_concentrations(160), vectors), "S1")
    cosine = (estimated * vectors).sum(0) / np.linalg.norm(estimated, axis=0)
    assert cosine.min() > 0.98, cosine
    assert (maxima > 0).all()


def test_transform_remixes_the_concentrations_with_the_reference_stain():
    reference, reference_max = _reference()
    concentrations = _concentrations(64)
    section = _render(concentrations, OTHER_STAIN)
    vectors, maxima = _estimate(section, "S1")
    transform = StainTransform(vectors, maxima, reference, reference_max)
    out = transform(section)
    assert out.dtype == np.uint8 and out.shape == section.shape
    # the same tissue drawn directly in the reference stain, at the reference's intensity
    scale = reference_max / maxima
    unmixed = (-np.log((section.reshape(-1, 3) + 1.0) / LIGHT)) @ np.linalg.pinv(vectors).T
    expected = np.clip(LIGHT * np.exp(-(unmixed * scale) @ reference.T), 0, 255)
    assert np.abs(out.reshape(-1, 3).astype(float) - expected).max() <= 1.0
    # and it looks like the reference stain, not like the section's
    assert np.abs(out.astype(float) - section).mean() > 5


def test_restained_sections_embed_alike_after_normalisation():
    """One tissue in two stains: normalised, their windows embed much closer together."""
    concentrations = _concentrations(160)
    reference, _ = _reference()
    images = {
        "S1": _render(concentrations, reference),
        "S2": _render(0.8 * concentrations, OTHER_STAIN),
    }
    encoder = get_encoder("default")

    def distance(stain_normalization):
        sdata = _stack(images)
        extract_features(sdata, encoder=encoder, stain_normalization=stain_normalization, **FAST)
        table = sdata.tables["table"]
        spot = table.obsm["X_asign_spot"]
        first = table.obs["section"].to_numpy() == "S1"
        return float(np.linalg.norm(spot[first] - spot[~first], axis=1).mean()), table

    plain, _ = distance(None)
    normalised, table = distance("macenko")
    assert normalised < 0.5 * plain, (normalised, plain)
    record = table.uns["asign"]["features"]["stain_normalization"]
    assert record["method"] == "macenko"
    assert set(record["sections"]) == {"S1", "S2"}


def test_plain_features_record_no_stain_normalisation():
    images = {"S1": _render(_concentrations(96), OTHER_STAIN)}
    images["S2"] = images["S1"].copy()
    sdata = _stack(images)
    extract_features(sdata, encoder=get_encoder("default"), **FAST)
    # anndata cannot store None: uns holds the string "None" for it, as for every record
    assert sdata.tables["table"].uns["asign"]["features"]["stain_normalization"] == "None"


def test_an_image_without_stain_is_refused_with_the_way_out():
    blank = np.full((96, 96, 3), 240, np.uint8)
    sdata = _stack({"S1": blank, "S2": blank.copy()})
    with pytest.raises(InvalidStackError, match="stain_normalization=None"):
        extract_features(
            sdata, encoder=get_encoder("default"), stain_normalization="macenko", **FAST
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stain_normalization": "reinhard"}, "must be one of"),
        ({"stain_normalization": "macenko", "encoder": "obsm:X_uni"}, "precomputed"),
    ],
)
def test_bad_stain_options(kwargs, match):
    images = {"S1": _render(_concentrations(96), OTHER_STAIN)}
    images["S2"] = images["S1"].copy()
    with pytest.raises(ValueError, match=match):
        extract_features(_stack(images), **{**FAST, **kwargs})
