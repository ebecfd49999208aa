"""benchmarks/cohort.py runs end to end on a tiny synthetic cohort (a smoke test, not a result)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch


@pytest.mark.slow
def test_tiny_cohort_report(tmp_path, load_benchmark):
    module = load_benchmark("cohort")
    threads = torch.get_num_threads()
    try:
        results = module.main(["--tiny", "--seeds", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    model = results[results["method"] == "asign"].set_index("training")
    alone, cohort = model.index
    assert alone.startswith("target's") and cohort.startswith("cohort")
    # the cohort fit saw the target's known section and every section of the other tumour
    assert model.loc[cohort, "n_training_spots"] > 2 * model.loc[alone, "n_training_spots"]
    assert model["pcc_gene"].between(-1, 1).all()
    report = (tmp_path / "cohort.md").read_text()
    assert "## Findings" in report and "**synthetic, one disease**: the cohort" in report
    assert "| synthetic, one disease | propagation baseline (no model) |" in report
    assert len(pd.read_csv(tmp_path / "cohort.csv")) == len(results)
