"""benchmarks/scale.py runs every step on tiny stacks and writes its report."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def scale(load_benchmark):
    return load_benchmark("scale")


@pytest.mark.slow  # every step, two stacks, three zarr writes: ~15 s on 2 idle cores
def test_main_times_every_step_and_writes_the_report(scale, tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "scale.md"
    argv = [
        *("--sizes", "40", "--n-sections", "2", "--image-size", "256"),
        *("--n-genes", "8", "--default-encoder-max", "0", "--graph-sizes", "200", "400"),
        *("--feature-dim", "8", "--epochs", "2", "--batch-size", "none", "--in-process"),
        *("--out", str(out)),
    ]
    try:
        rows = scale.main(argv)
    finally:
        torch.set_num_threads(threads)
    steps = {(row["part"], row["step"]) for row in rows}
    for step in ("register", "features (user encoder)", "graph", "fit", "impute", "write zarr"):
        assert ("end to end", step) in steps
    for step in ("graph", "fit", "impute", "write zarr"):
        assert ("graph, fit, impute", step) in steps
    assert all(row["seconds"] > 0 for row in rows)
    epoch_rows = [row for row in rows if row["step"] == "fit, one epoch (median)"]
    assert len(epoch_rows) == 3  # one per fit; derived from the history, no memory of its own
    assert all(row["peak_rss_gb"] is None for row in epoch_rows)
    assert all(row["peak_rss_gb"] > 0 for row in rows if row not in epoch_rows)
    fits = [row for row in rows if row["step"] == "fit"]
    assert [row["epochs"] for row in fits] == [2, 2, 2]  # --epochs 2, too few to stop early
    assert all(e["seconds"] < f["seconds"] for e, f in zip(epoch_rows, fits, strict=True))
    assert not any(row["error"] for row in rows), rows
    text = out.read_text()
    assert "load average" in text and "growth exponent" in text
    assert "| fit (2 epochs) |" in text and "| fit, one epoch (median) |" in text
    assert "## End to end" in text and "## Graph, fit and impute" in text
    # two sizes: every step of the larger one has a growth exponent
    exponents = scale._exponents(rows)
    for step in ("graph", "fit", "fit, one epoch (median)", "impute"):
        assert ("graph, fit, impute", step, 400) in exponents
    assert not any(part == "end to end" for part, _, _ in exponents)  # one size only
