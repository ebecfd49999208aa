"""The asign-sc command line: arguments, exit codes and the end-to-end run's outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from asign_sc.datasets import synthetic_stack

    sdata, _ = synthetic_stack(n_sections=3, n_spots_per_section=50, image_size=256, n_genes=12)
    store = tmp_path_factory.mktemp("store") / "small.zarr"
    write_zarr(sdata, store)
    return store


@pytest.fixture(scope="module")
def small_run(small_store, tmp_path_factory):
    """A run on a small stored stack, known section S2 (few epochs: plumbing, not the model)."""
    out = tmp_path_factory.mktemp("small") / "run1"
    code = main(
        ["run", str(small_store), "--known", "S2", "--epochs", "2", "--out", str(out), "-q"]
    )
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
    assert set(metrics["scores"]) == {"asign", "mean", "propagation", "ridge", "ridge_propagation"}
    assert metrics["scores"]["mean"]["pcc_gene"] == 0.0
    for figure in summary["outputs"]["figures"]:
        assert (out / figure.split("/")[-1]).stat().st_size > 10_000
    model = Path(summary["outputs"]["model"])
    assert model.exists() and model.parent == out
    stored = spatialdata.read_zarr(out / "stack.zarr")
    table = stored.tables["table"]
    for key in ("spatial_aligned", "X_asign_spot", "X_asign_region_tokens", "asign"):
        assert key in table.obsm
    assert "spatial3d_connectivities" in table.obsp and "asign" in table.layers
    assert {"asign_registration", "spatial3d_neighbors", "asign", "asign_eval"} <= set(table.uns)


def test_existing_output_is_not_overwritten(demo_run, capsys):
    _, out = demo_run
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--demo", "--out", str(out), "-q"])
    assert exit_.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


def test_unknown_known_section_exits_2_before_any_work(small_store, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(small_store), "--known", "S7", "--epochs", "2", "--out", str(out), "-q"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--known S7: not a section of this stack" in err and "S1 S2 S3" in err
    assert "Traceback" not in err and not out.exists()


def test_argument_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--her2st", str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2


def _bad_inputs(tmp_path):
    (tmp_path / "file.zarr").write_text("not a store")
    (tmp_path / "empty.zarr").mkdir()
    her2st = tmp_path / "her2st"
    (her2st / "counts").mkdir(parents=True)
    for name in ("C1", "C2", "D1"):
        (her2st / "counts" / f"{name}.tsv.gz").write_text("")
    return her2st


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--demo", "--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--demo", "--epochs", "-5"], "--epochs must be at least 1, got -5"),
        (["--demo", "--device", "foo"], "'foo' is not a torch device"),
        (["--demo", "--seed", "-1"], "--seed must be a non-negative"),
        (["--demo", "--devices", "0"], "--devices must be at least 1, got 0"),
        (["--demo", "--scheduler", " "], "--scheduler is empty"),
        (["--demo", "--encoder", "obsm:"], "needs a key"),
        (["--demo", "--encoder", "no_such_net"], "Unknown encoder 'no_such_net'"),
        (["--demo", "--stain-normalization", "reinhard"], "invalid choice: 'reinhard'"),
        (["--demo", "--patient", "C"], "--patient applies to --her2st only"),
        (["--demo", "--add-view", "obsm:X_uni"], "precomputed embeddings"),
        (["--demo", "--add-view", "efficientnet_lite2:reinhard"], "unknown stain normalisation"),
        (["--demo", "--add-view", "efficientnet_lite0"], "repeats a view already used"),
        (["--demo", "--add-view", "no_such_net"], "--add-view no_such_net: Unknown encoder"),
        (["{tmp}/nope.zarr"], "No SpatialData zarr store"),
        (["{tmp}/file.zarr"], r"is not a SpatialData zarr store \(a file\)"),
        (["{tmp}/empty.zarr"], "a folder without zarr.json"),
        (["--her2st", "{tmp}/her2st", "--patient", ""], "is empty"),
        (["--her2st", "{tmp}/her2st", "--patient", "Z"], r"patients there: \['C', 'D'\]"),
        (["--her2st", "{tmp}/her2st", "--patient", "C2"], "looks like a section name"),
        (["--her2st", "{tmp}/nowhere", "--patient", "C"], "no 'counts/' folder"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, args, match):
    _bad_inputs(tmp_path)
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(["run", *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert re.search(match, err.strip().splitlines()[-1]), err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(("flag", "passed"), [("none", None), ("macenko", "macenko")])
def test_stain_normalization_reaches_the_pipeline(monkeypatch, tmp_path, flag, passed):
    import asign_sc._pipeline

    seen = {}
    monkeypatch.setattr(asign_sc._pipeline, "run_pipeline", lambda sdata, **kw: seen.update(kw))
    out = tmp_path / "out"
    main(["run", "--demo", "--stain-normalization", flag, "--out", str(out), "-q"])
    assert seen["stain_normalization"] == passed


@pytest.mark.parametrize(
    ("spec", "encoder", "stain", "key"),
    [
        ("efficientnet_lite2", "efficientnet_lite2", None, "asign_efficientnet_lite2"),
        ("efficientnet_lite2:macenko", "efficientnet_lite2", "macenko", None),
        ("efficientnet_lite2:none", "efficientnet_lite2", None, None),
        ("timm:resnet18", "timm:resnet18", None, "asign_timm_resnet18"),
        ("timm:resnet18:Macenko", "timm:resnet18", "macenko", "asign_timm_resnet18_macenko"),
    ],
)
def test_feature_view_specs(spec, encoder, stain, key):
    from asign_sc._pipeline import FeatureView

    view = FeatureView.parse(spec)
    assert (view.encoder, view.stain_normalization) == (encoder, stain)
    if key is not None:
        assert view.key == key


def test_added_views_are_fitted_saved_and_averaged(small_store, tmp_path):
    out = tmp_path / "views"
    view = "efficientnet_lite1"
    args = ["run", str(small_store), "--known", "S2", "--epochs", "2", "--add-view", view]
    assert main([*args, "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    key = f"asign_{view}"
    assert [v["key"] for v in summary["feature_views"]] == ["asign", key]
    assert summary["feature_views"][1]["encoder"] == view
    assert (out / "model" / "settings.json").exists()
    settings = json.loads((out / f"model_{key}" / "settings.json").read_text())
    assert settings["features"]["key"] == key
    table = spatialdata.read_zarr(out / "stack.zarr").tables["table"]
    assert f"X_{key}_spot" in table.obsm and "fit" in table.uns[key]
    record = table.uns["asign"]["impute"]
    assert list(record["features_keys"]) == ["asign", key] and record["n_averaged_models"] == 2


@pytest.mark.parametrize(("flags", "shown"), [([], True), (["-q"], False)])
def test_quiet_hides_the_progress_bars(monkeypatch, tmp_path, flags, shown):
    import asign_sc._pipeline

    seen = {}
    monkeypatch.setattr(asign_sc._pipeline, "run_pipeline", lambda sdata, **kw: seen.update(kw))
    main(["run", "--demo", "--out", str(tmp_path / "out"), *flags])
    assert seen["show_progress_bar"] is shown


def test_quiet_run_prints_no_progress_bar(small_store, tmp_path, capfd):
    out = tmp_path / "out"
    code = main(["run", str(small_store), "--epochs", "2", "--out", str(out), "-q"])
    err = capfd.readouterr().err
    assert code == 0
    assert "it/s" not in err and "win/s" not in err and "%|" not in err, err


def test_missing_embeddings_key_exits_2_before_registration(small_store, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(small_store), "--encoder", "obsm:missing", "--out", str(out), "-q"])
    assert exit_.value.code == 2
    assert "the table has no obsm['missing']" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_store_is_reported_with_its_path(tmp_path, capsys):
    store = tmp_path / "broken.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{ truncated")
    assert main(["run", str(store), "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"Could not read the SpatialData zarr store {store}" in err
    assert not (tmp_path / "o").exists()
    last = (tmp_path / "o.log").read_text().splitlines()[-1]  # the log says why it stopped
    assert f"ERROR run failed: Could not read the SpatialData zarr store {store}" in last


def test_rerun_on_its_own_output_and_a_stopped_rerun_keep_a_complete_result(
    small_run, monkeypatch, capsys
):
    import asign_sc._pipeline as pipeline

    code, out = small_run
    assert code == 0
    first = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["sections"] == ["S1", "S3"]
    (out / "sections_STALE.png").write_text("from an older run")
    args = ["--epochs", "2", "--out", str(out), "-q", "--overwrite"]
    # the "target path in use": read the previous result and replace it
    assert main(["run", str(out / "stack.zarr"), "--known", "S1", *args]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert first["known_sections"] == ["S2"] and second["known_sections"] == ["S1"]
    assert not (out / "sections_STALE.png").exists()
    assert second["outputs"]["zarr"] == str(out / "stack.zarr")

    real_write = pipeline.write_zarr

    def stopped_while_writing(sdata, path, **kwargs):
        real_write(sdata, path, **kwargs)  # the store is written, then SIGTERM arrives
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pipeline, "write_zarr", stopped_while_writing)
    code = main(["run", str(out / "stack.zarr"), "--known", "S3", *args])
    assert code == 130 and "stopped; nothing was written" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == second
    # no temporary folders; the progress log beside the result
    assert sorted(p.name for p in out.parent.iterdir()) == ["run1", "run1.log"]
    table = spatialdata.read_zarr(out / "stack.zarr").tables["table"]
    assert "asign" in table.layers and "spatial_aligned" in table.obsm


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
        "try:\n"
        f"    main(['run', {str(tmp_path / 'nope.zarr')!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(logging.getLogger('asign_sc._pipeline').isEnabledFor(logging.INFO),\n"
        "      logging.getLogger('faiss.loader').isEnabledFor(logging.INFO))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "False"]


def test_progress_goes_to_a_log_file_that_tail_f_can_follow(small_run):
    code, out = small_run  # run with -q: the terminal is quiet, the log file is not
    assert code == 0
    live = out.parent / f"{out.name}.log"
    lines = live.read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
    assert all(re.match(stamp + r"(INFO|WARNING|ERROR|DEBUG) ", line) for line in lines)
    # the first run's lines (later runs into the same --out append theirs)
    lines = lines[: next(i for i, line in enumerate(lines) if "run complete" in line) + 1]
    steps = [re.search(r"step (\d)/(\d) (\w+): (started|done)", line) for line in lines]
    steps = [m.groups() for m in steps if m]
    names = ["register", "features", "graph", "fit", "impute", "evaluate", "figures", "write"]
    assert steps[:16:2] == [(str(i), "8", n, "started") for i, n in enumerate(names, 1)]
    assert steps[1:16:2] == [(str(i), "8", n, "done") for i, n in enumerate(names, 1)]
    assert "asign-sc run started: run" in lines[0] and "--known S2" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 1 and summary["scheduler"] is None
    copy = (out / "asign-sc.log").read_text()  # the last run's lines only
    assert copy.count("asign-sc run started") == 1 and "step 8/8 write: done" in copy
    assert summary["outputs"]["log"] == str(out / "asign-sc.log")


def test_unreachable_scheduler_exits_2_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import asign_sc._cli as cli

    monkeypatch.setattr(cli, "SCHEDULER_TIMEOUT", "1s")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--demo", "--scheduler", "tcp://127.0.0.1:1", "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--scheduler tcp://127.0.0.1:1: no Dask scheduler answered within 1s" in err
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_scheduler_runs_the_image_tiles_on_a_dask_cluster(small_store, tmp_path):
    from distributed import LocalCluster

    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        address = cluster.scheduler_address
        args = ["run", str(small_store), "--scheduler", address, "--epochs", "2", "-q"]
        assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheduler"] == address
    table = spatialdata.read_zarr(out / "stack.zarr").tables["table"]
    assert table.uns["asign"]["features"]["client"]  # the tiles ran on the cluster
    log = (out / "asign-sc.log").read_text()
    assert f"connected to the Dask scheduler {address} (1 workers)" in log
