"""read_her2st on small broken her2st-layout folders: every error names the file and section."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from asign_sc import InvalidStackError
from asign_sc._stack import resolve_stack
from asign_sc.io import read_her2st


def _write_section(root: Path, name: str, *, n: int = 9, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for folder in ("counts", "spots", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    grid = [(x, y) for x in range(3, 6) for y in range(4, 7)][:n]
    ids = [f"{x}x{y}" for x, y in grid]
    counts = pd.DataFrame(rng.poisson(2, (n, 3)), index=ids, columns=["ERBB2", "GAPDH", "KRT19"])
    with gzip.open(root / "counts" / f"{name}.tsv.gz", "wt") as handle:
        counts.to_csv(handle, sep="\t")
    spots = pd.DataFrame(
        {
            "x": [x for x, _ in grid],
            "y": [y for _, y in grid],
            "new_x": [x + 0.01 for x, _ in grid],
            "new_y": [y - 0.02 for _, y in grid],
            "pixel_x": [20.0 * x for x, _ in grid],
            "pixel_y": [20.0 * y for _, y in grid],
            "selected": 1,
        }
    )
    spots.to_csv(root / "spots" / f"{name}_selection.tsv", sep="\t", index=False)
    image = rng.integers(100, 255, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"{name}.jpg")


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "her2st"
    for i, name in enumerate(("C1", "C2", "D1")):
        _write_section(root, name, seed=i)
    return root


def test_a_small_release_reads(release):
    stack = resolve_stack(read_her2st(release, "C"), require_images=True)
    assert stack.names == ["C1", "C2"] and stack["C1"].n_spots == 9


def test_sections_read_on_threads_keep_their_order_and_pils_guard(tmp_path):
    root = tmp_path / "her2st"
    names = ["C3", "C1", "C4", "C2"]
    for i, name in enumerate(names):
        _write_section(root, name, n=4 + i, seed=i)
    guard = Image.MAX_IMAGE_PIXELS
    stack = resolve_stack(read_her2st(root, "C"), require_images=True)
    assert Image.MAX_IMAGE_PIXELS == guard  # lifted for each file only, then restored
    assert stack.names == ["C1", "C2", "C3", "C4"]
    assert [stack[s].n_spots for s in stack.names] == [5, 7, 4, 6]


@pytest.mark.parametrize(
    ("patient", "error", "match"),
    [
        ("", ValueError, r"patient='' is empty.*\['C', 'D'\]"),
        ("  ", ValueError, "is empty"),
        ("Z", FileNotFoundError, r"No counts for patient 'Z'.*patients there: \['C', 'D'\]"),
        ("C2", FileNotFoundError, r"looks like a section name: pass patient='C'"),
        ("C*", FileNotFoundError, "No counts for patient 'C\\*'"),
    ],
)
def test_empty_or_ambiguous_patient_is_an_error(release, patient, error, match):
    with pytest.raises(error, match=match):
        read_her2st(release, patient)


def _garble(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b\x08garbage")


def _drop_column(path: Path) -> None:
    pd.read_csv(path, sep="\t").drop(columns="pixel_x").to_csv(path, sep="\t", index=False)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _unmatched(path: Path) -> None:
    frame = pd.read_csv(path, sep="\t")
    frame["x"] += 100
    frame.to_csv(path, sep="\t", index=False)


@pytest.mark.parametrize(
    ("target", "damage", "match"),
    [
        ("counts/C2.tsv.gz", _garble, "could not read counts file"),
        ("counts/C2.tsv.gz", lambda p: p.unlink(), "no counts file|counts file .* is missing"),
        ("spots/C2_selection.tsv", lambda p: p.unlink(), "spot positions file .* is missing"),
        ("spots/C2_selection.tsv", _drop_column, r"lacks columns \['pixel_x'\]"),
        ("spots/C2_selection.tsv", lambda p: p.write_text(""), "could not read spot positions"),
        ("spots/C2_selection.tsv", _unmatched, "no spot of counts file"),
        ("images/C2.jpg", _truncate, "could not read image"),
    ],
)
def test_broken_files_are_named_with_their_section(release, target, damage, match):
    damage(release / target)
    with pytest.raises((InvalidStackError, FileNotFoundError), match=match) as error:
        read_her2st(release, "C", sections=["C1", "C2"])
    message = str(error.value)
    assert "'C2'" in message
    if "no counts file" not in message:
        assert str(release / target.split("/")[0]) in message
