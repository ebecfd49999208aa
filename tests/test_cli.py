"""The asign-sc command line: arguments, exit codes and the end-to-end run's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import spatialdata

from asign_sc._cli import main
from asign_sc._pipeline import write_zarr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One end-to-end demo run (few epochs: this tests the plumbing, not the model)."""
    out = tmp_path_factory.mktemp("demo")
    code = main(["run", "--demo", "--out", str(out), "--epochs", "3", "-q"])
    return code, out


def test_help_reads_like_a_tool(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "asign-sc run --demo --out results/" in text and "exit codes" in text


def test_demo_run_writes_every_output(demo_run):
    code, out = demo_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["section"] for s in summary["sections"]] == ["S1", "S2", "S3", "S4"]
    assert summary["known_sections"] == ["S1"]
    assert list(summary["steps"]) == [
        "register",
        "features",
        "graph",
        "fit",
        "impute",
        "evaluate",
        "figures",
        "write",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sections"] == ["S2", "S3", "S4"]
    assert set(metrics["scores"]) == {"asign", "mean", "propagation"}
    assert metrics["scores"]["mean"]["pcc_gene"] == 0.0
    for figure in summary["outputs"]["figures"]:
        assert (out / figure.split("/")[-1]).stat().st_size > 10_000
    assert (out / "model.pt").is_file()
    stored = spatialdata.read_zarr(out / "stack.zarr")
    table = stored.tables["table"]
    for key in ("spatial_aligned", "X_asign_spot", "X_asign_region_tokens", "asign"):
        assert key in table.obsm
    assert "spatial3d_connectivities" in table.obsp and "asign" in table.layers
    assert {"asign_registration", "spatial3d_neighbors", "asign", "asign_eval"} <= set(table.uns)


def test_existing_output_is_not_overwritten(demo_run):
    _, out = demo_run
    assert main(["run", "--demo", "--out", str(out), "-q"]) == 1


def test_zarr_input_and_bad_section(tmp_path, capsys):
    from asign_sc.datasets import synthetic_stack

    sdata, _ = synthetic_stack(n_sections=3, n_spots_per_section=50, image_size=256, n_genes=12)
    store = tmp_path / "small.zarr"
    write_zarr(sdata, store)
    args = ["run", str(store), "--epochs", "2", "-q"]
    assert main([*args, "--known", "S2", "--out", str(tmp_path / "b")]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["sections"] == ["S1", "S3"]
    assert main([*args, "--known", "S7", "--out", str(tmp_path / "c")]) == 1
    assert "Unknown section 'S7'" in capsys.readouterr().err


def test_argument_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--her2st", str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2


def test_missing_store_exits_1(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o"), "-q"]) == 1
    assert "No SpatialData zarr store" in capsys.readouterr().err


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "asign_sc._cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("asign-sc ")


def test_logs_our_steps_but_not_other_libraries_chatter(tmp_path):
    # faiss, for one, logs at INFO which CPU build it loads: noise for a shell user.
    code = (
        "import logging, sys\n"
        "from asign_sc._cli import main\n"
        f"main(['run', {str(tmp_path / 'nope.zarr')!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "print(logging.getLogger('asign_sc._pipeline').isEnabledFor(logging.INFO),\n"
        "      logging.getLogger('faiss.loader').isEnabledFor(logging.INFO))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "False"]
