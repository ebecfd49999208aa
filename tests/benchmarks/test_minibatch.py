"""benchmarks/minibatch.py: its epoch-cost part runs on a tiny stack and writes a report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "minibatch.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minibatch():
    spec = importlib.util.spec_from_file_location("minibatch_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epoch_cost_report(minibatch, tmp_path):
    out = tmp_path / "minibatch.md"
    minibatch.main(["--skip-accuracy", "--sizes", "400", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert "Seconds per epoch" in text and "full-graph" in text and "mini-batch" in text
    assert "load average" in text


def test_missing_cache_says_how_to_prepare_it(minibatch, tmp_path):
    with pytest.raises(SystemExit, match=r"accuracy\.py --quick"):
        minibatch.patient_c(tmp_path)
