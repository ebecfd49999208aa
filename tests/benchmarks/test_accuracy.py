"""benchmarks/accuracy.py runs end to end in its reduced mode on a tiny synthetic stack."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(accuracy, tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("accuracy")
    try:
        summary = accuracy.main(["--synthetic", "--ablations", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return summary, out


def test_reduced_mode_writes_every_method_beside_the_baselines(report):
    summary, out = report
    main = summary[summary["variant"] == "main"]
    assert set(main["method"]) == {
        "mean",
        "overlap",
        "similarity",
        "propagation",
        "network",
        "asign",
    }
    assert (out / "accuracy.md").exists() and (out / "accuracy.csv").exists()
    csv = pd.read_csv(out / "accuracy.csv")
    assert len(csv) == len(summary)
    mean = main.set_index("method").loc["mean"]
    # the mean profile is constant over spots: per-gene PCC exactly 0, per-spot PCC not
    assert mean["pcc_gene_mean"] == 0.0
    assert mean["pcc_spot_mean"] > 0.3
    for metric in ("pcc_gene_mean", "pcc_spot_mean", "mse_mean", "mae_mean"):
        assert np.isfinite(main[metric]).all()
    text = (out / "accuracy.md").read_text()
    assert "| per-gene PCC | per-spot PCC |" in text
    assert "Where ASIGN wins" in text and "known S1:" in text


def test_ablations_present_and_two_d_graph_cuts_propagation_across_sections(report):
    summary, _ = report
    variants = set(summary["variant"])
    assert {"2D graph (within-section edges)", "10% of known spots", "fixed node weights"} <= (
        variants
    )
    two_d = summary[summary["variant"] == "2D graph (within-section edges)"].set_index("method")
    # without across-section edges nothing reaches the unknown sections: mean-profile fallback
    assert two_d.loc["propagation", "pcc_gene_mean"] == pytest.approx(0.0, abs=1e-6)
    fraction = summary[summary["variant"] == "10% of known spots"]
    assert {"asign", "mean", "propagation"} <= set(fraction["method"])
