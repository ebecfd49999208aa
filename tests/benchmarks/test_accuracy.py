"""benchmarks/accuracy.py runs end to end in its reduced mode on a tiny synthetic stack."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope="module")
def accuracy(load_benchmark):
    return load_benchmark("accuracy")


@pytest.fixture(scope="module")
def report(accuracy, tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("accuracy")
    readme = out / "README.md"
    readme.write_text(
        f"# Title\n\nkept\n{accuracy.README_START}\nold\n{accuracy.README_END}\nkept too\n"
    )
    try:
        argv = ["--synthetic", "--ablations", "--views", "--readme", "--readme-path", str(readme)]
        summary = accuracy.main([*argv, "--out", str(out)])
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
        "ridge",
        "ridge_propagation",
        "network",
        "networks_only",
        "asign",
        "asign_views",
        "same_section",
    }
    # the ceiling reads the scored sections' own counts: never the "best other" method
    ceiling = main.set_index("method").loc["same_section"]
    assert np.isfinite(ceiling["pcc_gene_mean"]) and ceiling["n_seeds"] == 0
    assert (out / "accuracy.md").exists() and (out / "accuracy.csv").exists()
    csv = pd.read_csv(out / "accuracy.csv")
    assert len(csv) == len(summary)
    mean = main.set_index("method").loc["mean"]
    # the mean profile is constant over spots: per-gene PCC exactly 0, per-spot PCC not
    assert mean["pcc_gene_mean"] == 0.0
    assert mean["pcc_spot_mean"] > 0.3
    for metric in ("pcc_gene_mean", "pcc_gene_top50_mean", "pcc_spot_mean", "mse_mean", "mae_mean"):
        assert np.isfinite(main[metric]).all()
    text = (out / "accuracy.md").read_text()
    assert "| per-gene PCC | per-gene PCC, top 50 | per-spot PCC |" in text
    assert "Where ASIGN wins" in text and "known S1:" in text
    assert "against the best method without a network" in text
    assert "vs best other ceiling" not in text
    assert "with two feature views ASIGN's per-gene PCC" in text
    assert "best other ASIGN, two feature views" not in text  # compared apart, not a rival
    assert "'ASIGN, two feature views': a feature-view ensemble" in text


def test_ablations_present_and_two_d_graph_cuts_propagation_across_sections(report):
    summary, _ = report
    variants = set(summary["variant"])
    assert {
        "2D graph (within-section edges)",
        "10% of known spots",
        "fixed node weights",
        "blocked validation",
    } <= variants
    two_d = summary[summary["variant"] == "2D graph (within-section edges)"].set_index("method")
    # without across-section edges nothing reaches the unknown sections: mean-profile fallback
    assert two_d.loc["propagation", "pcc_gene_mean"] == pytest.approx(0.0, abs=1e-6)
    fraction = summary[summary["variant"] == "10% of known spots"]
    assert {"asign", "mean", "propagation"} <= set(fraction["method"])


def test_block_ablations_are_run_and_differ_from_the_default_model(accuracy, report):
    summary, _ = report
    asign = summary[summary["method"] == "asign"].set_index("variant")
    blocks = [
        accuracy.PAPER_NETWORK,
        "with cross-attention",
        "with graph attention",
        "with graph attention, GATv2 layers",
    ]
    assert set(blocks) <= set(asign.index)
    for variant in blocks:
        assert np.isfinite(asign.loc[variant, "pcc_gene_mean"])
        assert asign.loc[variant, "pcc_gene_mean"] != asign.loc["main", "pcc_gene_mean"]


def test_readme_block_replaces_only_between_the_markers(accuracy, report):
    summary, out = report
    text = (out / "README.md").read_text()
    head, rest = text.split(accuracy.README_START)
    block, tail = rest.split(accuracy.README_END)
    assert head == "# Title\n\nkept\n" and tail == "\nkept too\n"
    assert "old" not in block
    assert "| known | method | per-gene PCC | per-gene PCC, top 50 | per-spot PCC |" in block
    assert "| S1 | ASIGN, with graph attention |" in block
    asign = summary[(summary["variant"] == "main") & (summary["method"] == "asign")].iloc[0]
    assert f"| S1 | ASIGN | {asign['pcc_gene_mean']:.3f} |" in block
    assert "known S1:" in block and "No cross-layer imputation" in block


def test_readme_markers_are_checked_before_the_run(accuracy, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="accuracy-table:start"):
        accuracy.main(["--synthetic", "--readme", "--readme-path", str(readme)])
    readme.write_text(f"{accuracy.README_END}\n{accuracy.README_START}\n")
    with pytest.raises(ValueError, match="swap them"):
        accuracy.write_readme(readme, "table")
    assert readme.read_text() == f"{accuracy.README_END}\n{accuracy.README_START}\n"


@pytest.mark.parametrize(
    ("argv", "writes_readme"),
    [([], True), (["--no-readme"], False), (["--quick"], False), (["--synthetic"], False)],
)
def test_only_the_full_mode_writes_the_readme_by_default(
    accuracy, monkeypatch, argv, writes_readme
):
    checked = []
    # the markers are checked before any work when the README is to be written
    monkeypatch.setattr(accuracy, "_readme_parts", lambda path: checked.append(path))
    monkeypatch.setattr(accuracy, "patient_c", _stop)
    monkeypatch.setattr(accuracy, "synthetic_table", _stop)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Stop):
            accuracy.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert bool(checked) is writes_readme


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop
