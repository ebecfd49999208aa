"""benchmarks/minibatch.py: its epoch-cost part runs on a tiny stack and writes a report."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minibatch(load_benchmark):
    return load_benchmark("minibatch")


def test_epoch_cost_report(minibatch, tmp_path):
    out = tmp_path / "minibatch.md"
    minibatch.main(["--skip-accuracy", "--sizes", "400", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert "Seconds per epoch" in text and "full-graph" in text and "mini-batch" in text
    assert "load average" in text


def test_missing_cache_says_how_to_prepare_it(minibatch, tmp_path):
    with pytest.raises(SystemExit, match=r"accuracy\.py --quick"):
        minibatch.patient_c(tmp_path)
